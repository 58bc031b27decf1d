//! Single sign-on and device enrollment: the `[saml]` pages on the `[http]` listener.
//!
//! - `GET /saml/metadata`: this SP's metadata.
//! - `GET /saml/login?return=/enroll`: starts an SP-initiated login (303 to the IdP).
//! - `POST /saml/acs`: the IdP's answer; on success a login session (cookie) and 303 back.
//! - `GET /saml/logout`: ends the login session here.
//! - `GET /enroll`: the user's devices and the enrollment form (login first otherwise).
//! - `/mfa`: the second factor (TOTP) after the IdP's answer, and setting one up
//!   ([`totp`]).
//! - `/access`: the user's just-in-time access requests, and approvers' decisions
//!   ([`access`]).
//! - `POST /enroll`: registers a device (the device's own public key, or a key pair the
//!   gateway generates and shows once) and answers its WireGuard profile as text, as a
//!   download and as a QR code.
//!
//! A profile's AllowedIPs cover the tunnel and the networks the policies could let the
//! user reach (conditions aside), unless `[devices] allowed_ips` fixes them.
//!
//! Plain server-rendered HTML, no JavaScript, every value escaped. A login lasts until
//! the IdP's SessionNotOnOrAfter capped by `login_max_secs`; devices enrolled in it
//! expire then, and a new login renews the user's devices. Sessions live in memory (a
//! restart logs everyone out; devices stay), or in a cluster in the shared database
//! (a cookie one node set works on every node; a login started on one node can finish
//! on another; request and assertion ids are used up cluster-wide). Logins and ACS
//! posts are rate-limited per address; every login, refused or not, is an audit event.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, TimeDelta, Utc};
use portcullis_apiauth::RateLimit;
use portcullis_config::{Loaded, MfaConfig, SamlConfig};
use portcullis_identity::{Identity, ProfileSettings, SignOn};
use portcullis_model::Event;
use portcullis_saml::{Sp, SpConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use portcullis_control::Command;

mod access;
mod enroll;
mod html;
mod login;
mod totp;

pub use totp::{record_id as totp_record_id, KIND as TOTP_KIND};

use html::{cookie, random_b64, unavailable};
use login::session_key;

const COOKIE: &str = "portcullis_session";
/// Logins started or answers posted per address per minute.
const ATTEMPTS_PER_MINUTE: u32 = 30;
/// Login sessions kept at most (the oldest go first).
const MAX_SESSIONS: usize = 100_000;
/// Largest IdP metadata document fetched.
const MAX_METADATA_BYTES: usize = 1 << 20;

/// A browser's login.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct WebSession {
    user: String,
    until: DateTime<Utc>,
    /// The sign-on this login was: devices enrolled through it carry it.
    #[serde(default)]
    sign_on: SignOn,
    /// Sent with every form, compared in constant time.
    csrf: String,
    /// The groups the IdP gave (to renew the devices again once a second factor is added).
    #[serde(default)]
    groups: Vec<String>,
    /// Set while the sign-on waits for its second factor (`/mfa`): such a session is
    /// no login; the pages treat it as signed out.
    #[serde(default)]
    pending: Option<PendingLogin>,
}

/// A signed-in browser as the console sees it.
pub(crate) struct ConsoleLogin {
    pub user: String,
    /// The IdP's groups at this sign-in: the console's roles come from them.
    pub groups: Vec<String>,
    pub csrf: String,
    pub key: [u8; 32],
}

/// What finishing a sign-on after its second factor needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PendingLogin {
    /// When the full login ends (the IdP's session, capped).
    until: DateTime<Utc>,
    /// Where the browser goes once signed in.
    back: String,
}

pub struct Sso {
    config: SamlConfig,
    /// `[mfa]` (its defaults without one: the IdP's own second factor counts).
    mfa: MfaConfig,
    /// `None` while an IdP metadata URL has not answered yet (the pages answer 503).
    sp: Mutex<Option<Sp>>,
    limit: Mutex<RateLimit>,
    /// SHA-256 of the cookie value → session (the cookie itself is not kept).
    sessions: Mutex<HashMap<[u8; 32], WebSession>>,
    identity: Arc<Identity>,
    profile: Arc<ProfileSettings>,
    commands: mpsc::Sender<Command>,
    secure_cookie: bool,
    scope: crate::devices::ProfileScope,
    /// `[cluster]`: sessions and one-time ids in the shared database.
    shared: Option<Arc<portcullis_cluster::shared::Shared>>,
    /// Just-in-time access requests (`/access`).
    access: Option<Arc<crate::access::AccessService>>,
    /// `[mfa] secret_key_file`: seals TOTP secrets (with `[mfa] totp`).
    sealing: Option<portcullis_mfa::SealingKey>,
}

/// Pending SAML requests imported at one answer, at most.
const MAX_SHARED_PENDING: i64 = 10_000;

/// The SP's settings from `[saml]`.
fn sp_config(c: &SamlConfig, mfa: &MfaConfig) -> SpConfig {
    SpConfig {
        entity_id: c.entity_id(),
        metadata_url: c.metadata_url(),
        acs_url: format!("{}/saml/acs", c.base()),
        logout_url: format!("{}/saml/logout", c.base()),
        user_attribute: c.user_attribute.clone(),
        groups_attribute: c.groups_attribute.clone(),
        max_clock_skew: TimeDelta::seconds(i64::try_from(c.max_clock_skew_secs).unwrap_or(60)),
        request_lifetime: TimeDelta::minutes(10),
        allow_idp_initiated: c.allow_idp_initiated,
        mfa_attribute: mfa.saml_attribute.clone(),
    }
}

/// The `meta` key of the IdP metadata the refresh lease's holder fetched.
const SHARED_METADATA: &str = "saml.idp_metadata";
/// How often a cluster node looks at the shared copy.
const SHARED_METADATA_POLL: Duration = Duration::from_secs(5);

/// The IdP metadata as one node fetched it for the cluster.
#[derive(Serialize, Deserialize)]
struct SharedMetadata {
    url: String,
    fetched_at: DateTime<Utc>,
    xml: String,
}

/// The shared copy, if it was fetched from the URL this node is configured with.
async fn shared_metadata(
    shared: &portcullis_cluster::shared::Shared,
    c: &SamlConfig,
) -> Option<SharedMetadata> {
    match shared.meta(SHARED_METADATA).await {
        Ok(Some(v)) => serde_json::from_str::<SharedMetadata>(&v)
            .ok()
            .filter(|m| m.url == c.idp_metadata),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("saml: the shared idp metadata is not readable: {e}");
            None
        }
    }
}

async fn publish_metadata(shared: &portcullis_cluster::shared::Shared, c: &SamlConfig, xml: &str) {
    let copy = SharedMetadata {
        url: c.idp_metadata.clone(),
        fetched_at: Utc::now(),
        xml: xml.to_string(),
    };
    let Ok(v) = serde_json::to_string(&copy) else {
        return;
    };
    if let Err(e) = shared.set_meta(SHARED_METADATA, &v).await {
        tracing::warn!("saml: the fetched idp metadata could not be shared: {e}");
    }
}

/// Reads the IdP metadata: the file, or the URL.
async fn read_metadata(c: &SamlConfig) -> anyhow::Result<String> {
    if c.idp_metadata_is_url() {
        fetch(&c.idp_metadata)
            .await
            .with_context(|| format!("fetching saml.idp_metadata {}", c.idp_metadata))
    } else {
        tokio::fs::read_to_string(&c.idp_metadata)
            .await
            .with_context(|| format!("reading saml.idp_metadata {}", c.idp_metadata))
    }
}

/// One GET with hyper's client (HTTPS with the system CAs); the body, capped.
async fn fetch(url: &str) -> anyhow::Result<String> {
    use http_body_util::BodyExt as _;
    let uri: axum::http::Uri = url.parse().context("not a URL")?;
    let host = uri.host().ok_or_else(|| anyhow!("no host"))?.to_string();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let request = axum::http::Request::get(path)
        .header(header::HOST, &host)
        .header(header::USER_AGENT, "portcullis")
        .body(http_body_util::Empty::<axum::body::Bytes>::new())?;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let response = if https {
            let name = rustls_pki_types::ServerName::try_from(host.clone())?;
            let tls = tokio_rustls::TlsConnector::from(crate::tls::client_config(None)?)
                .connect(name, tcp)
                .await?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            send.send_request(request).await?
        } else {
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            send.send_request(request).await?
        };
        if !response.status().is_success() {
            return Err(anyhow!("answered {}", response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_METADATA_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the body: {e}"))?
            .to_bytes();
        Ok(String::from_utf8(body.to_vec())?)
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| anyhow!("no answer within 10 s"))?
}

impl Sso {
    /// Reads the IdP metadata (refusing one without a signing certificate) and starts its
    /// refresh.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        loaded: &Loaded,
        c: &SamlConfig,
        identity: Arc<Identity>,
        profile: Arc<ProfileSettings>,
        commands: mpsc::Sender<Command>,
        shared: Option<Arc<portcullis_cluster::shared::Shared>>,
        metadata_lease: Option<tokio::sync::watch::Receiver<bool>>,
        access: Option<Arc<crate::access::AccessService>>,
    ) -> anyhow::Result<Arc<Sso>> {
        let context = || {
            format!(
                "{}: key `saml.idp_metadata`: {}",
                loaded.path.display(),
                c.idp_metadata
            )
        };
        // In a cluster with a metadata URL one node (the lease holder) fetches it and
        // shares what it fetched; the others read the shared copy.
        let fetcher = match (c.idp_metadata_is_url(), &shared, metadata_lease) {
            (true, Some(shared), Some(lease)) => Some((shared.clone(), lease)),
            _ => None,
        };
        // A file that cannot be read, or a document without a signing certificate, is a
        // configuration error; an IdP that does not answer yet must not keep the gateway
        // (and its tunnels) down: sign-on waits for it.
        let first = match &fetcher {
            Some((shared, _)) => match shared_metadata(shared, c).await {
                Some(copy) => Ok(copy.xml),
                None => {
                    let r = read_metadata(c).await;
                    if let Ok(md) = &r {
                        publish_metadata(shared, c, md).await;
                    }
                    r
                }
            },
            None => read_metadata(c).await,
        };
        let mfa = loaded.config.mfa.clone().unwrap_or_default();
        let sealing = match (&mfa.secret_key_file, mfa.totp) {
            (Some(file), true) => {
                let text =
                    portcullis_config::read_secret(&loaded.path, "mfa.secret_key_file", file)?;
                Some(portcullis_mfa::SealingKey::parse(&text.0).map_err(|e| {
                    anyhow!(
                        "{}: key `mfa.secret_key_file`: {}: {e}",
                        loaded.path.display(),
                        file.display()
                    )
                })?)
            }
            _ => None,
        };
        let mut applied = first.as_ref().ok().map(|md| Sha256::digest(md.as_bytes()));
        let sp = match first {
            Ok(md) => Some(Sp::new(sp_config(c, &mfa), &md).with_context(context)?),
            Err(e) if c.idp_metadata_is_url() => {
                tracing::error!("saml: {e:#}; sign-on is unavailable until the IdP answers");
                None
            }
            Err(e) => return Err(e.context(context())),
        };
        let sso = Arc::new(Sso {
            config: c.clone(),
            mfa,
            sp: Mutex::new(sp),
            limit: Mutex::new(RateLimit::new(ATTEMPTS_PER_MINUTE, 100_000)),
            sessions: Mutex::new(HashMap::new()),
            identity,
            profile,
            commands,
            secure_cookie: c.base().starts_with("https://"),
            scope: crate::devices::ProfileScope::new(loaded),
            shared,
            access,
            sealing,
        });
        let refresh = sso.clone();
        tokio::spawn(async move {
            let every = Duration::from_secs(refresh.config.metadata_refresh_secs);
            loop {
                let loaded = refresh.sp.lock().map(|sp| sp.is_some()).unwrap_or(true);
                // Until the first document arrives, ask again soon; in a cluster, look at
                // the shared copy often (a cheap read) so a refresh reaches every node soon.
                tokio::time::sleep(match (&fetcher, loaded) {
                    (_, false) => Duration::from_secs(15),
                    (Some(_), true) => SHARED_METADATA_POLL,
                    (None, true) => every,
                })
                .await;
                let md = match &fetcher {
                    None => read_metadata(&refresh.config).await,
                    Some((shared, lease)) => {
                        let copy = shared_metadata(shared, &refresh.config).await;
                        let stale = copy.as_ref().is_none_or(|m| {
                            Utc::now() - m.fetched_at
                                >= TimeDelta::from_std(every).unwrap_or(TimeDelta::MAX)
                        });
                        if *lease.borrow() && stale {
                            match read_metadata(&refresh.config).await {
                                Ok(md) => {
                                    publish_metadata(shared, &refresh.config, &md).await;
                                    Ok(md)
                                }
                                Err(e) => Err(e),
                            }
                        } else {
                            match copy {
                                Some(m) => Ok(m.xml),
                                None => continue,
                            }
                        }
                    }
                };
                let md = match md {
                    Ok(md) => md,
                    Err(e) => {
                        tracing::warn!(
                            "saml: idp metadata not refreshed, the previous one stays: {e:#}"
                        );
                        continue;
                    }
                };
                let digest = Sha256::digest(md.as_bytes());
                if fetcher.is_some() && applied == Some(digest) {
                    continue;
                }
                let r = match refresh.sp.lock() {
                    Ok(mut slot) => match slot.as_mut() {
                        Some(sp) => sp.handle_idp_metadata(&md),
                        None => Sp::new(sp_config(&refresh.config, &refresh.mfa), &md).map(|sp| {
                            *slot = Some(sp);
                        }),
                    },
                    Err(_) => continue,
                };
                match r {
                    Ok(()) => {
                        applied = Some(digest);
                        tracing::info!("saml: idp metadata refreshed");
                    }
                    Err(e) => tracing::error!(
                        "saml: refreshed idp metadata refused, the previous one stays: {e}"
                    ),
                }
            }
        });
        tracing::info!(entity_id = %c.entity_id(), "saml sign-on up");
        Ok(sso)
    }

    /// Records `event` and waits until it is durable (audit before answer); false when
    /// the audit trail refused it (logged: the answer goes out anyway, the sign-on
    /// already happened or was already refused).
    async fn report(&self, event: Event) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self
            .commands
            .send(Command::Report(event, Some(tx)))
            .await
            .is_err()
        {
            return false;
        }
        let durable = matches!(
            tokio::time::timeout(std::time::Duration::from_secs(10), rx).await,
            Ok(Ok(true))
        );
        if !durable {
            tracing::error!("saml: audit event could not be recorded");
        }
        durable
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.limit
            .lock()
            .map(|mut l| l.handle_attempt(ip, Utc::now()))
            .unwrap_or(false)
    }

    /// The browser's unexpired session. In a cluster the shared database answers (a
    /// session another node opened, or ended); unreachable, nobody is signed in.
    async fn session(&self, headers: &HeaderMap) -> Option<WebSession> {
        self.any_session(headers)
            .await
            .filter(|s| s.pending.is_none())
    }

    /// [`Sso::session`], including one that waits for its second factor.
    async fn any_session(&self, headers: &HeaderMap) -> Option<WebSession> {
        let key = session_key(cookie(headers, COOKIE)?);
        if let Some(shared) = &self.shared {
            return match shared.session(&hex::encode(key)).await {
                Ok(body) => body
                    .and_then(|b| serde_json::from_value::<WebSession>(b).ok())
                    .filter(|s| s.until > Utc::now()),
                Err(e) => {
                    tracing::error!("saml: login session not readable from the cluster: {e}");
                    None
                }
            };
        }
        let sessions = self.sessions.lock().ok()?;
        sessions.get(&key).filter(|s| s.until > Utc::now()).cloned()
    }

    /// The browser's completed login, for the console (`key` identifies the session;
    /// the console keeps its own idle time per key).
    pub(crate) async fn console_login(&self, headers: &HeaderMap) -> Option<ConsoleLogin> {
        let key = session_key(cookie(headers, COOKIE)?);
        let s = self.session(headers).await?;
        Some(ConsoleLogin {
            user: s.user,
            groups: s.groups,
            csrf: s.csrf,
            key,
        })
    }

    /// A console session for `user` opened without the IdP (a break-glass link): the
    /// answer with its cookie set, and `login_succeeded` (method `console-link`)
    /// recorded; `None` when the session could not be stored.
    pub(crate) async fn open_link_session(
        &self,
        user: &str,
        groups: &[String],
        ip: IpAddr,
        answer: Response,
        lifetime: TimeDelta,
    ) -> Option<Response> {
        let until = Utc::now() + lifetime;
        let sign_on = SignOn {
            at: Utc::now().timestamp(),
            mfa: false,
        };
        let token = self
            .open_session(user, until, sign_on, groups, None)
            .await?;
        self.report(Event::LoginSucceeded {
            user: user.to_string(),
            method: "console-link".into(),
            remote: Some(ip.to_string()),
        })
        .await;
        Some(login::with_cookie(self, answer, &token, lifetime))
    }

    /// Ends the browser's session (sign-out; a second factor's pending session once the
    /// sign-on it waited for completed). In a cluster the shared database must take it.
    pub(crate) async fn end_session(&self, headers: &HeaderMap) -> Result<(), Response> {
        let Some(value) = cookie(headers, COOKIE) else {
            return Ok(());
        };
        let key = session_key(value);
        if let Some(shared) = &self.shared {
            if let Err(e) = shared.end_session(&hex::encode(key)).await {
                tracing::error!("saml: login session not ended in the cluster: {e}");
                return Err(unavailable());
            }
        }
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(&key);
        }
        Ok(())
    }

    /// A new session; the cookie value to set.
    async fn open_session(
        &self,
        user: &str,
        until: DateTime<Utc>,
        sign_on: SignOn,
        groups: &[String],
        pending: Option<PendingLogin>,
    ) -> Option<String> {
        let token = random_b64::<32>();
        let key = session_key(&token);
        let session = WebSession {
            user: user.to_string(),
            until,
            sign_on,
            csrf: random_b64::<24>(),
            groups: groups.to_vec(),
            pending,
        };
        if let Some(shared) = &self.shared {
            let body = serde_json::to_value(&session).ok()?;
            return match shared.put_session(&hex::encode(key), &body, until).await {
                Ok(()) => Some(token),
                Err(e) => {
                    tracing::error!("saml: login session not stored in the cluster: {e}");
                    None
                }
            };
        }
        let mut sessions = self.sessions.lock().ok()?;
        let now = Utc::now();
        sessions.retain(|_, s| s.until > now);
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.until)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                sessions.remove(&k);
            }
        }
        sessions.insert(key, session);
        Some(token)
    }

    /// In a cluster: the logins other nodes started, so that their answers are accepted
    /// here too.
    async fn import_pending(&self) -> Result<(), Response> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let offered = shared
            .offered("saml-request", MAX_SHARED_PENDING)
            .await
            .map_err(|e| {
                tracing::error!("saml: started logins not readable from the cluster: {e}");
                unavailable()
            })?;
        if let Ok(Some(sp)) = self.sp.lock().as_deref_mut() {
            for (id, relay, expires) in offered {
                sp.add_pending(id, expires, relay);
            }
        }
        Ok(())
    }

    /// In a cluster: uses up the login's request and assertion ids cluster-wide; an
    /// error names why the login is refused.
    async fn use_up(&self, login: &portcullis_saml::Login) -> Result<(), String> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let unreachable = |e: portcullis_cluster::ClusterError| {
            tracing::error!("saml: cluster database: {e}");
            "the sign-in could not be checked against the cluster; try again".to_string()
        };
        if let Some(id) = &login.request_id {
            if !shared.take("saml-request", id).await.map_err(unreachable)? {
                return Err(format!("the login {id} was already finished"));
            }
        }
        if !shared
            .claim(
                "saml-assertion",
                &login.assertion_id,
                login.assertion_forget_at,
            )
            .await
            .map_err(unreachable)?
        {
            return Err(format!("assertion {} was already used", login.assertion_id));
        }
        Ok(())
    }
}

/// The routes, without authentication (the pages need a login session instead).
pub fn routes(sso: Arc<Sso>) -> Router {
    Router::new()
        .route("/saml/metadata", get(login::metadata))
        .route("/saml/login", get(login::login))
        .route("/saml/acs", axum::routing::post(login::acs))
        .route("/saml/logout", get(login::logout))
        .route("/enroll", get(enroll::enroll_page).post(enroll::enroll))
        .route("/mfa", get(totp::mfa_page).post(totp::mfa_submit))
        .route("/access", get(access::access_page))
        .route("/access/request", axum::routing::post(access::request))
        .route("/access/decide", axum::routing::post(access::decide))
        .route("/access/revoke", axum::routing::post(access::revoke))
        .with_state(sso)
}
