//! The LDAP sync driver: connects with ldap3, runs the two refreshAndPersist searches
//! (users, groups), feeds their messages to [`LdapSync`] and applies its passes to the
//! identity store. Reconnects with backoff (resuming from the cookies), re-reads the
//! whole directory every `reconcile_interval_secs`, and answers the admin API's LDAP
//! calls (status, approving a refused pass, looking a user up).
//!
//! Part of the control plane: it runs on the control plane's thread, commits through
//! [`Identity`] and reaches the packet loop only through the [`Command`] channel (the
//! identity store's hand-off, and reports of refused passes).
//!
//! In a cluster (one consumer at a time, under a lease) the mirror is saved through a
//! [`MirrorStore`] after every applied pass, so the node that takes the lease over
//! resumes from the saved cookies instead of reading the whole directory again.
//!
//! What it deliberately does not: no LDAP message parsing or pass planning (that is
//! `portcullis-ldap`, sans-IO), no HTTP, no SQL (the [`MirrorStore`] is given).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ldap3::controls::{RefreshMode, SyncRequest};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchStream};
use portcullis_config::LdapConfig;
use portcullis_identity::{Identity, IdentityError, Mutation, SyncScope};
use portcullis_ldap::{
    guard, proto, user_lookup_filter, Kind, LdapSync, MirrorDelta, MirrorState, Pass, Refusal,
};
use portcullis_model::Event;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use portcullis_control::Command;

/// What `portcullis ldap status` shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LdapStatus {
    pub url: String,
    pub connected: bool,
    /// Both searches have refreshed and are receiving pushed changes.
    pub live: bool,
    pub users: usize,
    pub groups: usize,
    pub last_pass_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// The last full pass the mass-removal guard refused, until one is applied.
    pub refused: Option<String>,
    /// Entries the last pass skipped (a name held elsewhere, a missing attribute).
    pub skipped: Vec<String>,
    /// In a cluster: this consumer resumed from the mirror another node saved (its
    /// cookies), not from an empty one.
    pub resumed: bool,
    /// How many entries it restored then.
    pub restored_entries: usize,
}

/// A boxed future (the [`MirrorStore`] methods).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where a cluster keeps the consumer's mirror. `source` names the directory as
/// configured (URL, bases, filters, attributes): a state saved for another source is not
/// loaded.
pub trait MirrorStore: Send + Sync {
    fn load<'a>(&'a self, source: &'a str) -> BoxFuture<'a, Result<Option<MirrorState>, String>>;
    /// Applies `delta`; with `replace`, the delta's upserts are the whole mirror.
    fn save<'a>(
        &'a self,
        source: &'a str,
        delta: &'a MirrorDelta,
        replace: bool,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// The directory as `[ldap]` names it: what a saved mirror must match to be resumed.
pub fn source_name(cfg: &LdapConfig) -> String {
    format!(
        "{}|{}|{}|{}|{}|{:?}|{:?}",
        cfg.url,
        cfg.user_base,
        cfg.user_filter,
        cfg.group_base,
        cfg.group_filter,
        cfg.attributes,
        cfg.disabled
    )
}

/// Requests from the admin API.
#[derive(Debug)]
pub enum LdapControl {
    /// Apply the current directory as a full pass, past the mass-removal guard.
    ApproveRemoval(oneshot::Sender<Result<String, String>>),
}

/// The admin API's handle on the sync task.
#[derive(Clone, Debug)]
pub struct LdapHandle {
    pub status: Arc<Mutex<LdapStatus>>,
    pub control: mpsc::Sender<LdapControl>,
    config: Arc<LdapConfig>,
    password: Option<Arc<str>>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error(transparent)]
    Refused(Refusal),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// Reads `[ldap] password_file` (first line).
pub fn read_password(cfg: &LdapConfig) -> anyhow::Result<Option<Arc<str>>> {
    let Some(f) = &cfg.password_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(f)
        .map_err(|e| anyhow::anyhow!("ldap.password_file {}: {e}", f.display()))?;
    Ok(Some(Arc::from(
        text.lines().next().unwrap_or("").trim_end(),
    )))
}

/// Starts the sync task.
pub fn spawn(
    config: LdapConfig,
    password: Option<Arc<str>>,
    tls: Option<Arc<rustls::ClientConfig>>,
    identity: Arc<Identity>,
    reports: mpsc::Sender<Command>,
    cluster: Option<(watch::Receiver<bool>, Arc<dyn MirrorStore>)>,
) -> LdapHandle {
    let status = Arc::new(Mutex::new(LdapStatus {
        url: config.url.clone(),
        ..LdapStatus::default()
    }));
    // Approvals are rare and answered in order; a few may wait.
    let (control, control_rx) = mpsc::channel(8);
    let handle = LdapHandle {
        status: status.clone(),
        control,
        config: Arc::new(config),
        password,
        tls,
    };
    let driver = Driver {
        cfg: handle.config.clone(),
        password: handle.password.clone(),
        tls: handle.tls.clone(),
        identity,
        status,
        reports,
        sync: LdapSync::new(
            handle.config.attributes.clone(),
            handle.config.disabled.clone(),
        ),
        first_received: None,
        source: source_name(&handle.config),
        lease: cluster.as_ref().map(|(l, _)| l.clone()),
        saved: cluster.map(|(_, s)| s),
        save_all: false,
    };
    tokio::spawn(driver.run(control_rx));
    handle
}

enum Restart {
    Reconcile,
    RefreshRequired,
    /// In a cluster, another node holds the consumer's lease now.
    LeaseLost,
}

struct Driver {
    cfg: Arc<LdapConfig>,
    password: Option<Arc<str>>,
    tls: Option<Arc<rustls::ClientConfig>>,
    identity: Arc<Identity>,
    status: Arc<Mutex<LdapStatus>>,
    reports: mpsc::Sender<Command>,
    sync: LdapSync,
    /// When the first message of the pending pass arrived (the revocation clock starts).
    first_received: Option<(Instant, DateTime<Utc>)>,
    /// In a cluster: whether this node holds the consumer's lease (one consumer per
    /// cluster; a takeover resumes from the saved mirror).
    lease: Option<watch::Receiver<bool>>,
    /// In a cluster: where the mirror is saved.
    saved: Option<Arc<dyn MirrorStore>>,
    /// [`source_name`] of `cfg`.
    source: String,
    /// A save failed: the next one writes the whole mirror.
    save_all: bool,
}

async fn connect(
    cfg: &LdapConfig,
    password: Option<&str>,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Ldap, String> {
    let timeout = Duration::from_secs(cfg.timeout_secs);
    let mut settings = LdapConnSettings::new().set_conn_timeout(timeout);
    if let Some(tls) = tls {
        settings = settings.set_config(tls.clone());
    }
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &cfg.url)
        .await
        .map_err(|e| format!("connecting to {}: {e}", cfg.url))?;
    tokio::spawn(async move {
        if let Err(e) = conn.drive().await {
            tracing::debug!("ldap connection ended: {e}");
        }
    });
    if let Some(dn) = &cfg.bind_dn {
        ldap.with_timeout(timeout)
            .simple_bind(dn, password.unwrap_or(""))
            .await
            .and_then(|r| r.success())
            .map_err(|e| format!("binding as {dn:?}: {e}"))?;
    }
    Ok(ldap)
}

impl Driver {
    fn status(&self) -> std::sync::MutexGuard<'_, LdapStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// In a cluster: waits until this node holds the consumer's lease (answering the
    /// admin API meanwhile); false when the gateway stops.
    async fn wait_for_lease(&mut self, control: &mut mpsc::Receiver<LdapControl>) -> bool {
        let Some(lease) = self.lease.as_mut() else {
            return true;
        };
        if *lease.borrow_and_update() {
            return true;
        }
        tracing::info!("ldap: another cluster node consumes the directory; standing by");
        loop {
            tokio::select! {
                changed = lease.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                    if *lease.borrow_and_update() {
                        tracing::info!("ldap: this node took the consumer's lease; reading the directory");
                        return true;
                    }
                }
                c = control.recv() => match c {
                    Some(LdapControl::ApproveRemoval(tx)) => {
                        let _ = tx.send(Err("another cluster node consumes the directory: approve there".into()));
                    }
                    None => return false,
                },
            }
        }
    }

    /// In a cluster, before the first searches of a new consumer: seeds the mirror with
    /// the saved one (a state that cannot be read means reading everything: slower,
    /// never wrong).
    async fn restore(&mut self) {
        let Some(saved) = self.saved.clone() else {
            return;
        };
        if self.sync.counts() != (0, 0) {
            return;
        }
        match saved.load(&self.source).await {
            Ok(Some(state)) => {
                let n = state.entries.len();
                if self.sync.handle_restored(state) {
                    tracing::info!(
                        entries = n,
                        "ldap: resuming from the mirror saved in the cluster"
                    );
                    let mut st = self.status();
                    st.resumed = true;
                    st.restored_entries = n;
                }
            }
            Ok(None) => {
                tracing::info!("ldap: no saved mirror for this directory; reading it whole")
            }
            Err(e) => tracing::warn!(
                "ldap: the saved mirror could not be read ({e}); reading the directory whole"
            ),
        }
    }

    /// Saves what changed in the mirror (after its passes were applied).
    async fn save(&mut self) {
        let Some(saved) = self.saved.clone() else {
            return;
        };
        let delta = if self.save_all {
            let state = self.sync.state();
            // Take what is pending too: the whole state covers it.
            let _ = self.sync.poll_saved();
            MirrorDelta {
                users_cookie: state.users_cookie,
                groups_cookie: state.groups_cookie,
                upserts: state.entries,
                removes: Vec::new(),
            }
        } else {
            match self.sync.poll_saved() {
                Some(d) => d,
                None => return,
            }
        };
        match saved.save(&self.source, &delta, self.save_all).await {
            Ok(()) => self.save_all = false,
            Err(e) => {
                tracing::warn!(
                    "ldap: the mirror could not be saved ({e}); the next save writes it whole"
                );
                self.save_all = true;
            }
        }
    }

    /// Resolves when this node loses the consumer's lease (never without one).
    async fn lease_lost(lease: &mut Option<watch::Receiver<bool>>) {
        match lease {
            Some(l) => {
                while l.changed().await.is_ok() {
                    if !*l.borrow_and_update() {
                        return;
                    }
                }
                std::future::pending::<()>().await
            }
            None => std::future::pending::<()>().await,
        }
    }

    async fn run(mut self, mut control: mpsc::Receiver<LdapControl>) {
        let mut backoff = Duration::from_millis(250);
        loop {
            if !self.wait_for_lease(&mut control).await {
                return;
            }
            self.restore().await;
            let outcome = self.session(&mut control, &mut backoff).await;
            self.sync.handle_search_lost(Kind::Users);
            self.sync.handle_search_lost(Kind::Groups);
            {
                let mut st = self.status();
                st.connected = false;
                st.live = false;
            }
            match outcome {
                Ok(Restart::Reconcile) => {
                    tracing::info!("ldap: periodic reconciliation, re-reading the directory");
                    self.sync.request_full_refresh();
                }
                Ok(Restart::RefreshRequired) => {
                    tracing::warn!("ldap: the server asked for a full refresh");
                    self.sync.request_full_refresh();
                }
                Ok(Restart::LeaseLost) => {
                    tracing::warn!(
                        "ldap: the consumer's lease went to another node; stopping here"
                    );
                    // The next holder goes on from what it saved; if this node takes the
                    // lease back, it resumes from the database too, not from its own
                    // (older) mirror.
                    self.sync =
                        LdapSync::new(self.cfg.attributes.clone(), self.cfg.disabled.clone());
                    self.save_all = false;
                }
                Err(e) => {
                    // Nobody is deprovisioned while the directory is away.
                    tracing::warn!(
                        "ldap: {e}; retrying in {backoff:?}, access unchanged meanwhile"
                    );
                    self.status().last_error = Some(e);
                    let wake = tokio::time::sleep(backoff);
                    tokio::pin!(wake);
                    loop {
                        tokio::select! {
                            _ = &mut wake => break,
                            c = control.recv() => match c {
                                Some(LdapControl::ApproveRemoval(tx)) => {
                                    let _ = tx.send(Err("the directory is not connected; nothing to approve".into()));
                                }
                                None => return,
                            },
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn start(
        &mut self,
        ldap: &mut Ldap,
        kind: Kind,
    ) -> Result<SearchStream<'static, String, Vec<String>>, String> {
        let cookie = self.sync.handle_search_started(kind);
        let (base, filter) = match kind {
            Kind::Users => (&self.cfg.user_base, &self.cfg.user_filter),
            Kind::Groups => (&self.cfg.group_base, &self.cfg.group_filter),
        };
        let attrs = self.sync.wanted_attributes(kind);
        ldap.with_controls(SyncRequest {
            mode: RefreshMode::RefreshAndPersist,
            cookie,
            reload_hint: false,
        })
        .streaming_search(base, Scope::Subtree, filter, attrs)
        .await
        .map_err(|e| format!("starting the {kind:?} sync search under {base:?}: {e}"))
    }

    async fn session(
        &mut self,
        control: &mut mpsc::Receiver<LdapControl>,
        backoff: &mut Duration,
    ) -> Result<Restart, String> {
        let mut ldap = connect(&self.cfg, self.password.as_deref(), self.tls.as_ref()).await?;
        let mut users = self.start(&mut ldap, Kind::Users).await?;
        let mut groups = self.start(&mut ldap, Kind::Groups).await?;
        {
            let mut st = self.status();
            st.connected = true;
            st.last_error = None;
        }
        *backoff = Duration::from_millis(250);
        tracing::info!(url = %self.cfg.url, "ldap: connected, sync searches started");
        let reconcile = tokio::time::sleep(Duration::from_secs(self.cfg.reconcile_interval_secs));
        tokio::pin!(reconcile);
        loop {
            tokio::select! {
                _ = Self::lease_lost(&mut self.lease) => {
                    let _ = ldap.unbind().await;
                    return Ok(Restart::LeaseLost);
                }
                r = users.next() => {
                    if let Some(restart) = self.on_message(Kind::Users, r, &mut users).await? {
                        return Ok(restart);
                    }
                }
                r = groups.next() => {
                    if let Some(restart) = self.on_message(Kind::Groups, r, &mut groups).await? {
                        return Ok(restart);
                    }
                }
                _ = &mut reconcile => {
                    let _ = ldap.unbind().await;
                    return Ok(Restart::Reconcile);
                }
                c = control.recv() => match c {
                    Some(LdapControl::ApproveRemoval(tx)) => {
                        let answer = if self.sync.is_live() {
                            let a = self.apply(Pass::Full, true).await;
                            if a.is_ok() {
                                self.save().await;
                            }
                            a
                        } else {
                            Err("the directory is still refreshing; try again in a moment".into())
                        };
                        let _ = tx.send(answer);
                    }
                    None => return Err("the gateway is stopping".into()),
                },
            }
            let mut all_applied = true;
            while let Some(pass) = self.sync.poll_pass() {
                // A refusal is reported and kept in the status; the session goes on.
                all_applied &= self.apply(pass, false).await.is_ok();
            }
            // A mirror whose passes were not applied is not saved: a node taking over
            // must see those changes again.
            if all_applied {
                self.save().await;
            }
            let (u, g) = self.sync.counts();
            let mut st = self.status();
            st.users = u;
            st.groups = g;
            st.live = self.sync.is_live();
        }
    }

    async fn on_message(
        &mut self,
        kind: Kind,
        r: ldap3::result::Result<Option<ldap3::ResultEntry>>,
        stream: &mut SearchStream<'static, String, Vec<String>>,
    ) -> Result<Option<Restart>, String> {
        let received = (Instant::now(), Utc::now());
        let re = match r {
            Ok(Some(re)) => re,
            Ok(None) => {
                let res = stream.finish().await;
                // e-syncRefreshRequired (RFC 4533 §3.5): start again without a cookie.
                if res.rc == 4096 {
                    return Ok(Some(Restart::RefreshRequired));
                }
                return Err(format!(
                    "the {kind:?} sync search ended: result {} {}",
                    res.rc, res.text
                ));
            }
            Err(e) => return Err(format!("the {kind:?} sync search failed: {e}")),
        };
        if re.is_ref() {
            return Ok(None);
        }
        self.first_received.get_or_insert(received);
        if re.is_intermediate() {
            let info = proto::sync_info(re.0).map_err(|e| e.to_string())?;
            self.sync.handle_info(kind, info);
            return Ok(None);
        }
        let state =
            re.1.iter()
                .find(|c| c.1.ctype == proto::SYNC_STATE_OID)
                .and_then(|c| c.1.val.as_deref())
                .ok_or_else(|| format!("a {kind:?} entry came without a sync state control"))?;
        let state = proto::sync_state(state).map_err(|e| e.to_string())?;
        let entry = proto::entry(re.0).map_err(|e| e.to_string())?;
        self.sync
            .handle_entry(kind, state.state, state.uuid, entry, state.cookie);
        Ok(None)
    }

    async fn apply(&mut self, pass: Pass, approved: bool) -> Result<String, String> {
        let (received, received_at) = self
            .first_received
            .take()
            .unwrap_or_else(|| (Instant::now(), Utc::now()));
        let (users, groups, problems) = self.sync.desired();
        let scope = match pass {
            Pass::Full => SyncScope::Full,
            Pass::Scoped(s) => s,
        };
        let full = scope == SyncScope::Full;
        let share = self.cfg.max_removal_share;
        let mut skipped = problems;
        let users_after = users.len();
        let result = self
            .identity
            .change::<PassError>("ldap", received, received_at, |dir, now| {
                let plan = dir.plan_sync("ldap", &users, &groups, &scope, now);
                skipped.extend(plan.conflicts.iter().cloned());
                if full && !approved {
                    guard(&plan, users_after, share).map_err(PassError::Refused)?;
                }
                Ok::<Mutation, PassError>(plan.mutation)
            })
            .await;
        for s in &skipped {
            tracing::warn!("ldap: entry skipped: {s}");
        }
        let mut st = self.status();
        st.skipped = skipped;
        match result {
            Ok(c) => {
                st.last_pass_at = Some(Utc::now());
                if full {
                    st.refused = None;
                }
                let msg = format!(
                    "{} pass applied: {} users and {} groups written, {} users' access changed",
                    if full { "full" } else { "pushed" },
                    c.users.len(),
                    c.groups.len(),
                    c.changes
                );
                if c.changes > 0 || full {
                    tracing::info!("ldap: {msg}");
                }
                Ok(msg)
            }
            Err(PassError::Refused(r)) => {
                tracing::error!("ldap: full pass {r}");
                st.refused = Some(r.to_string());
                // try_send: a full channel (the loop far behind) loses this report only,
                // and says so; the refused pass itself is kept in the sync's state.
                if let Err(e) = self.reports.try_send(Command::Report(
                    Event::SyncRefused {
                        source: "ldap".into(),
                        known: r.known as u64,
                        would_remove: r.would_remove as u64,
                        sample: r.sample.clone(),
                        reason: r.reason.clone(),
                    },
                    None,
                )) {
                    tracing::error!("ldap: the refused pass could not be reported: {e}");
                }
                Err(r.to_string())
            }
            Err(PassError::Identity(e)) => {
                tracing::error!("ldap: pass not applied: {e}");
                st.last_error = Some(e.to_string());
                Err(e.to_string())
            }
        }
    }
}

/// A user as `portcullis ldap lookup` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LookupRow {
    pub dn: String,
    pub user_name: Option<String>,
    pub email: String,
    pub active: bool,
    pub tags: Vec<String>,
    pub problem: Option<String>,
}

impl LdapHandle {
    /// Looks users up by name in the directory itself (not the mirror), with the name
    /// escaped into the filter: `*` or `)(` in a name match only themselves.
    pub async fn lookup(&self, name: &str) -> Result<Vec<LookupRow>, String> {
        let cfg = &self.config;
        let mut ldap = connect(cfg, self.password.as_deref(), self.tls.as_ref()).await?;
        let filter = user_lookup_filter(&cfg.user_filter, &cfg.attributes.user_name, name);
        let mapper = LdapSync::new(cfg.attributes.clone(), cfg.disabled.clone());
        let attrs = mapper.wanted_attributes(Kind::Users);
        let result = ldap
            .with_timeout(Duration::from_secs(cfg.timeout_secs))
            .search(&cfg.user_base, Scope::Subtree, &filter, attrs)
            .await
            .and_then(|r| r.success())
            .map_err(|e| format!("searching {:?} with {filter:?}: {e}", cfg.user_base));
        let _ = ldap.unbind().await;
        let (entries, _) = result?;
        entries
            .into_iter()
            .map(|re| {
                let e = proto::entry(re.0).map_err(|e| e.to_string())?;
                Ok(match mapper.user("", &e) {
                    Ok(u) => LookupRow {
                        dn: e.dn,
                        user_name: Some(u.user_name),
                        email: u.email,
                        active: u.active,
                        tags: u.tags,
                        problem: None,
                    },
                    Err(p) => LookupRow {
                        dn: e.dn,
                        user_name: None,
                        email: String::new(),
                        active: false,
                        tags: vec![],
                        problem: Some(p),
                    },
                })
            })
            .collect()
    }
}
