//! The loop's handlers, one per source: [`Loop::on_command`] (the control plane's
//! commands, identity changes among them), [`Loop::on_tick`] (the 200 ms status),
//! [`Loop::on_reload`] (a policy directory read on SIGHUP), and [`Loop::flush`] after
//! each (datagrams, TUN packets and events out).

use std::sync::Arc;
use std::time::Instant;

use portcullis_audit::Pipeline;
use portcullis_config::Loaded;
use portcullis_control::{Apply, Command, Readiness, Revoke, Snapshot, Status, UserRow};
use portcullis_core::Gateway;
use portcullis_model::latency::Latency;
use portcullis_model::DeviceChange;
use portcullis_policy::PolicyBundle;
use tokio::sync::{mpsc, oneshot};

use crate::Datapath;

/// The packet loop's state.
pub(crate) struct Loop {
    pub gw: Gateway,
    pub dp: Datapath,
    pub audit: Pipeline,
    pub loaded: Arc<Loaded>,
    pub fail_closed: bool,
    pub status: mpsc::Sender<Status>,
    /// Revocations seen in `user_revoked` events.
    pub revocation_latency: Latency,
}

/// An answer held until the events the command caused are durable (audit before
/// answer); it is told whether they are.
type Reply = Box<dyn FnOnce(bool) + Send>;

impl Loop {
    /// A command from the control plane. Commands that changed something are answered
    /// once their events are durable, from a task: the loop goes on at once.
    pub async fn on_command(&mut self, cmd: Command) {
        let cmd = match cmd {
            Command::Apply(apply) => return self.on_apply(apply).await,
            Command::Revoke(revoke) => return self.on_revoke(revoke),
            cmd => cmd,
        };
        if let Some(reply) = self.command(cmd) {
            let ack = self.flush(true).await;
            reply_when_durable(ack, reply);
        }
    }

    /// Identity changes, in the identity store's commit order. A change the policy
    /// entities refuse revokes the user (in the core).
    async fn on_apply(&mut self, apply: Apply) {
        let now = Instant::now();
        for change in apply.changes {
            let user = change.user.clone();
            match self
                .gw
                .handle_identity_change(now, change, apply.requested, apply.requested_at)
            {
                Ok(o) if o.refused.is_some() => {
                    tracing::error!(%user, "identity change refused, user revoked")
                }
                Ok(o) if o.sessions_cut + o.flows_cut > 0 || o.latency.as_nanos() > 0 => {
                    tracing::info!(
                    %user, sessions_cut = o.sessions_cut, flows_cut = o.flows_cut,
                    latency_us = o.latency.as_micros() as u64, "identity change applied")
                }
                Ok(_) => tracing::info!(%user, "identity change applied"),
                Err(e) => tracing::error!(%user, "identity change: {e}"),
            }
        }
        for change in apply.devices {
            if let DeviceChange::Added { routes, .. } = &change {
                crate::routes::install_in_background(
                    &self.loaded.config.gateway.tun_name,
                    routes.clone(),
                );
            }
            if let Err(e) = self.gw.handle_device_change(now, change) {
                tracing::error!("device change not applied: {e}");
            }
        }
        // Resets out, and the events durable, before the source hears "done".
        let ack = self.flush(true).await;
        let done = apply.done;
        reply_when_durable(ack, move |_| {
            let _ = done.send(());
        });
    }

    /// Users cut ahead of their change's commit. Nobody waits for this: the change's
    /// `Apply` comes next and is answered once durable (its events after these).
    fn on_revoke(&mut self, revoke: Revoke) {
        let now = Instant::now();
        for user in revoke.users {
            match self.gw.handle_revocation(
                now,
                user.clone(),
                revoke.source.clone(),
                revoke.requested,
                revoke.requested_at,
            ) {
                Ok(o) => {
                    tracing::info!(%user, sessions_cut = o.sessions_cut, flows_cut = o.flows_cut,
                    latency_us = o.latency.as_micros() as u64, "user revoked ahead of the commit")
                }
                Err(e) => tracing::error!(%user, "revocation: {e}"),
            }
        }
    }

    /// Every 200 ms: the status for the control plane (readiness and counters). Never
    /// waits: a status the control plane has no room for is dropped.
    pub fn on_tick(&mut self) {
        let status = Status {
            at: Instant::now(),
            ready: Readiness {
                tun_up: true,
                udp_bound: true,
                policy_loaded: true,
                audit_writable: !self.audit.blocked(),
            },
            snapshot: self.snapshot(),
        };
        let _ = self.status.try_send(status);
    }

    /// A policy directory read after SIGHUP; a rejected set leaves the running one.
    pub fn on_reload(&mut self, loaded: Result<PolicyBundle, portcullis_policy::LoadError>) {
        match loaded {
            Ok(bundle) => {
                let _ = apply_bundle(&mut self.gw, Arc::new(bundle), "reloaded");
            }
            Err(e) => {
                tracing::error!("policy reload rejected, previous policy stays in force:\n{e}");
                self.gw
                    .handle_policy_rejected(e.errors.iter().map(|e| e.to_string()).collect());
            }
        }
    }

    /// Sends what the core queued (datagrams, TUN packets, events). With `durable`, the
    /// last event goes in with a durability receiver: the writer commits in order, so
    /// once it answers every event of this flush is durable (None: there was no event).
    pub async fn flush(&mut self, durable: bool) -> Option<oneshot::Receiver<bool>> {
        let mut ack = None;
        while let Some(t) = self.gw.poll_transmit() {
            self.dp.send_datagram(t.dst, &t.payload).await;
        }
        while let Some(p) = self.gw.poll_tun_packet() {
            self.dp.write_tun_packet(&p).await;
        }
        // Read the clock only in iterations that have events (most carry only packets).
        let mut now = None;
        let mut pending = self.gw.poll_event();
        while let Some(e) = pending.take() {
            if let portcullis_model::Event::UserRevoked { latency_us, .. } = &e {
                self.revocation_latency
                    .observe(std::time::Duration::from_micros(*latency_us));
            }
            let time = *now.get_or_insert_with(chrono::Utc::now);
            pending = self.gw.poll_event();
            if durable && pending.is_none() {
                ack = Some(self.audit.submit_durable(e, time));
            } else {
                self.audit.submit(e, time);
            }
        }
        let blocked = self.fail_closed && self.audit.blocked();
        if blocked != self.gw.enforcer().audit_blocked() {
            if blocked {
                tracing::error!("audit trail cannot take events: denying new flows until it can");
            } else {
                tracing::warn!("audit trail writable again: new flows are decided by policy");
            }
            self.gw.handle_audit_blocked(blocked);
        }
        ack
    }

    /// The loop's numbers for `/metrics` and the log.
    pub fn snapshot(&self) -> Snapshot {
        let a = self.audit.stats();
        let r = std::sync::atomic::Ordering::Relaxed;
        Snapshot {
            enforce: self.gw.enforcer().stats,
            wireguard: self.gw.stats,
            datapath: self.dp.stats,
            audit_written: a.written.load(r),
            audit_refused: a.refused.load(r),
            audit_uploaded: a.uploaded.load(r),
            audit_upload_batches: a.batches.load(r),
            audit_upload_errors: a.upload_errors.load(r),
            audit_backlog: a.backlog.load(r),
            audit_lag_ms: a.lag_ms.load(r),
            audit_spool_bytes: a.spool_bytes.load(r),
            sessions: self.gw.session_count() as u64,
            flows: self.gw.enforcer().flows().len() as u64,
            peers: self.gw.peers().count() as u64,
            revocation_latency: self.revocation_latency,
            audit_commit_latency: a.commit_latency.snapshot(),
            upload_latency: a.upload_latency.snapshot(),
        }
    }

    /// Runs one admin command on the loop; commands that changed something return their
    /// answer, to be sent once their events are durable.
    fn command(&mut self, cmd: Command) -> Option<Reply> {
        let gw = &mut self.gw;
        match cmd {
            Command::Sessions(tx) => {
                let _ = tx.send(gw.sessions());
                None
            }
            Command::KillSession(id, tx) => {
                let killed = gw.handle_session_kill(Instant::now(), id, "killed by admin");
                if killed {
                    tracing::info!(session = id, "admin: session killed");
                }
                Some(Box::new(move |_| {
                    let _ = tx.send(killed);
                }))
            }
            Command::Users(tx) => {
                let sessions = gw.sessions();
                let rows = gw
                    .enforcer()
                    .engine()
                    .users()
                    .map(|p| {
                        let in_config = self.loaded.config.users.iter().any(|u| u.name == p.name);
                        // The control plane names the identity store's sources.
                        let source = if in_config { "config" } else { "" }.to_string();
                        UserRow {
                            name: p.name.clone(),
                            source,
                            active: true,
                            groups: p.groups.clone(),
                            tags: p.tags.clone(),
                            devices: gw
                                .peers()
                                .filter(|(u, _, _)| *u == p.name)
                                .map(|(_, d, _)| d.to_string())
                                .collect(),
                            sessions: sessions.iter().filter(|s| s.user == p.name).count(),
                        }
                    })
                    .collect::<Vec<_>>();
                // A configured user the engine no longer holds was disabled (until a
                // restart): listed as such, not forgotten.
                let mut rows = rows;
                for u in &self.loaded.config.users {
                    if gw.enforcer().engine().user(&u.name).is_none() {
                        rows.push(UserRow {
                            name: u.name.clone(),
                            source: "config".into(),
                            active: false,
                            groups: u.groups.clone(),
                            tags: Vec::new(),
                            devices: Vec::new(),
                            sessions: 0,
                        });
                    }
                }
                let _ = tx.send(rows);
                None
            }
            Command::DisableConfigUser {
                name,
                actor,
                requested,
                requested_at,
                done,
            } => {
                let known = gw.enforcer().engine().user(&name).is_some();
                if known {
                    let r = gw.handle_identity_change(
                        Instant::now(),
                        portcullis_model::IdentityChange::revoked(actor, name.clone()),
                        requested,
                        requested_at,
                    );
                    if let Err(e) = r {
                        tracing::error!(user = %name, "admin disable: {e}");
                    }
                    tracing::info!(user = %name, "admin: user disabled");
                }
                Some(Box::new(move |_| {
                    let _ = done.send(known);
                }))
            }
            // Taken by `on_command` before it gets here.
            Command::Apply(_) | Command::Revoke(_) => None,
            Command::Report(event, durable) => {
                gw.handle_report(event);
                durable.map(|tx| -> Reply {
                    Box::new(move |ok| {
                        let _ = tx.send(ok);
                    })
                })
            }
            Command::Policy(tx) => {
                let _ = tx.send(gw.enforcer().engine().bundle().clone());
                None
            }
            Command::Access(user, tx) => {
                let engine = gw.enforcer().engine();
                let groups = engine
                    .user(&user)
                    .map(|p| p.groups.clone())
                    .unwrap_or_default();
                let _ = tx.send((engine.bundle().clone(), groups));
                None
            }
            Command::Grants(grants, done) => {
                let cut = gw.handle_grants(Instant::now(), grants);
                Some(Box::new(move |_| {
                    let _ = done.send(cut);
                }))
            }
            Command::ApplyPolicy(bundle, done) => {
                let applied = apply_bundle(gw, bundle, "replaced through the api");
                Some(Box::new(move |_| {
                    let _ = done.send(applied);
                }))
            }
        }
    }
}

/// Applies a validated bundle (`how` it came, for the log); a set the core refuses is
/// recorded and the running one stays. Flows cut, or why it was refused.
fn apply_bundle(gw: &mut Gateway, bundle: Arc<PolicyBundle>, how: &str) -> Result<usize, String> {
    let dir = bundle.dir.clone();
    match gw.handle_policy_bundle(Instant::now(), bundle) {
        Ok(cut) => {
            tracing::info!(dir = %dir.display(), flows_cut = cut, "policy {how}");
            Ok(cut)
        }
        Err(e) => {
            tracing::error!("policy not {how}, the running one stays: {e}");
            gw.handle_policy_rejected(vec![e.to_string()]);
            Err(e.to_string())
        }
    }
}

/// Runs `reply` once `ack` says the events before it are durable (true), refused
/// (false), or at once when nothing was recorded. The packet loop does not wait: the
/// reply waits in a task of its own.
fn reply_when_durable(
    ack: Option<oneshot::Receiver<bool>>,
    reply: impl FnOnce(bool) + Send + 'static,
) {
    match ack {
        None => reply(true),
        Some(rx) => {
            tokio::spawn(async move {
                let durable = rx.await.unwrap_or(false);
                if !durable {
                    tracing::error!(
                        "a control-plane event could not be recorded before its answer"
                    );
                }
                reply(durable);
            });
        }
    }
}

/// The counters in the log (every minute and at shutdown): the numbers `/metrics` gets.
pub(crate) fn log_stats(s: &Snapshot) {
    let (e, w, dp) = (&s.enforce, &s.wireguard, &s.datapath);
    tracing::info!(
        flows = s.flows,
        forwarded_out = e.forwarded_out,
        forwarded_in = e.forwarded_in,
        denied = e.denied,
        policy_errors = e.policy_errors,
        spoofed = e.spoofed,
        malformed = e.malformed,
        fragments_dropped = e.fragments_dropped,
        inbound_no_flow = e.inbound_no_flow,
        inbound_multicast = e.inbound_multicast,
        flows_opened = e.flows_opened,
        flows_evicted = e.flows_evicted,
        flows_revoked = e.flows_revoked,
        datagrams = w.datagrams,
        malformed_datagrams = w.malformed_datagrams,
        unknown_peer = w.unknown_peer,
        wg_errors = w.wg_errors,
        handshakes = w.handshakes,
        cookie_replies = w.cookie_replies,
        resume_handshakes = w.resume_handshakes,
        resume_limited = w.resume_limited,
        udp_batches = dp.udp_batches,
        udp_datagrams = dp.udp_datagrams,
        udp_sends = dp.udp_sends,
        tun_reads = dp.tun_reads,
        tun_writes = dp.tun_writes,
        send_errors = dp.send_errors,
        audit_written = s.audit_written,
        audit_refused = s.audit_refused,
        audit_uploaded = s.audit_uploaded,
        audit_batches = s.audit_upload_batches,
        audit_upload_errors = s.audit_upload_errors,
        audit_backlog = s.audit_backlog,
        audit_lag_ms = s.audit_lag_ms,
        audit_spool_bytes = s.audit_spool_bytes,
        "counters"
    );
}
