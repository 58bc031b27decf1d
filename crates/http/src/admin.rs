//! The one HTTP listener (`[http] listen`): SCIM under `/scim/v2` and the admin API,
//! mounted twice with the same routes:
//! - `/admin/v1`: a bearer token from `[admin] token_file` (what the `portcullis users|
//!   sessions|devices|ldap` commands on the gateway host use);
//! - `/api/v1`: HMAC-SHA256 signed requests with scoped, expiring tokens from
//!   `[api] tokens_file` (automation; the recipe is in `portcullis_apiauth`). An auditor
//!   token may only read.
//!
//! Every mutating call (not GET/HEAD) is recorded as an `admin_action` event: the actor
//! (`admin:cli` or `api:<token id>`), the route, the path and the outcome.
//!
//! The OpenAPI document is `docs/openapi.json`, served at `/api/v1/openapi.json` (and
//! `/admin/v1/openapi.json`) without credentials.
//!
//! Routes (JSON, errors as `{"error": "..."}`), shown under `/admin/v1`:
//! - `GET /admin/v1/users`: every user the policies know, with source and devices.
//! - `POST /admin/v1/users/{name}/disable`: revokes at once (answers after the cut).
//! - `GET /admin/v1/sessions`: live sessions.
//! - `POST /admin/v1/sessions/{id}/kill`: ends one session (the device may reconnect).
//! - `GET /admin/v1/ldap`: the LDAP sync's state (connected, counts, a refused pass).
//! - `POST /admin/v1/ldap/approve-removal`: applies the directory as it is now, past the
//!   mass-removal guard.
//! - `GET /admin/v1/ldap/users/{name}`: looks a user up in the directory itself.
//! - `/admin/v1/devices`: registered devices (see [`crate::devices`]).
//! - `/admin/v1/policies`, `/networks`, `/groups`: the policy set, read, validated and
//!   replaced (see `policy_api`).
//! - `/admin/v1/audit/events|reports/{name}|verify`: the auditor's queries
//!   (`portcullis_auditor::http`), with `[audit.clickhouse]`.
//! - `/admin/v1/audit/holds`: legal holds on the trail (see [`crate::holds`]).

use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, OriginalUri, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use portcullis_config::TokenSet;
use portcullis_identity::{DirectoryError, Identity};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use portcullis_control::{Command, UserRow};

use crate::api::{ask, error, Actor, AdminState};
use portcullis_ldap_sync::{LdapControl, LdapHandle};

/// What the admin API needs.
pub struct AdminApi {
    /// `[admin] token_file` (the `/admin/v1` bearer tokens).
    pub tokens: Option<Arc<RwLock<TokenSet>>>,
    /// `[api]`: the `/api/v1` verifier.
    pub api: Option<Arc<std::sync::Mutex<portcullis_apiauth::Verifier>>>,
    /// `[api] nonce_file`: used nonces are written here before the answer.
    pub nonce_log: Option<Arc<std::sync::Mutex<crate::nonces::NonceLog>>>,
    pub identity: Option<Arc<Identity>>,
    pub commands: mpsc::Sender<Command>,
    pub ldap: Option<LdapHandle>,
    pub profile: Option<Arc<portcullis_identity::ProfileSettings>>,
    pub max_body_bytes: usize,
    /// `[policy] dir`.
    pub policy_dir: std::path::PathBuf,
    pub profile_scope: crate::devices::ProfileScope,
    /// `[audit.clickhouse]`: the audit queries under `/audit`.
    pub store: Option<Arc<portcullis_auditor::http::StoreHandle>>,
    /// `[cluster]`: `GET /cluster` reads the registry; API nonces are taken there.
    pub shared: Option<Arc<portcullis_cluster::shared::Shared>>,
    /// `[cluster]`: the shared policy set.
    pub cluster_policy: Option<Arc<crate::policy_cluster::ClusterPolicy>>,
    /// Just-in-time access requests: `/access-requests`.
    pub access: Option<Arc<crate::access::AccessService>>,
    /// `[console]`: break-glass sign-in links (`POST /console/login-links`).
    pub console_links: Option<Arc<crate::console::Links>>,
}

/// The admin routes under `/admin/v1` (bearer) and, with `[api]`, `/api/v1` (signed),
/// and the same routes for the console ([`AdminRouters::console`]).
pub struct AdminRouters {
    pub public: Router,
    /// No authentication of its own: the console checks the user and the role, then
    /// calls these with its user as the [`Actor`], so each change is the same
    /// `admin_action` an API call is.
    pub console: Router,
}

pub fn admin_router(a: AdminApi) -> AdminRouters {
    let state = AdminState {
        tokens: a.tokens,
        api: a.api,
        nonce_log: a.nonce_log,
        max_body_bytes: a.max_body_bytes,
        identity: a.identity,
        commands: a.commands,
        ldap: a.ldap,
        profile: a.profile,
        policy_dir: Arc::from(a.policy_dir.as_path()),
        scope: Arc::new(a.profile_scope),
        policy_lock: a
            .cluster_policy
            .as_ref()
            .map_or_else(|| Arc::new(tokio::sync::Mutex::new(())), |c| c.lock.clone()),
        shared: a.shared,
        cluster_policy: a.cluster_policy,
        access: a.access,
        console_links: a.console_links,
        audit_store: a.store.clone(),
    };
    let audit = a.store;
    let routes = || {
        Router::new()
            .route("/users", get(users))
            .route("/users/{name}/disable", post(disable_user))
            .route("/users/{name}/reset-mfa", post(reset_mfa))
            .route("/console/login-links", post(crate::console::mint_link))
            .route("/sessions", get(sessions))
            .route("/sessions/{id}/kill", post(kill_session))
            .route("/cluster", get(cluster_status))
            .route("/ldap", get(ldap_status))
            .route("/ldap/approve-removal", post(ldap_approve))
            .route("/ldap/users/{name}", get(ldap_lookup))
            .merge(crate::devices::routes())
            .merge(crate::policy_api::routes())
            .merge(crate::access_api::routes())
            .nest("/audit", audit_routes(audit.clone()))
            // Inner layer: runs after authentication, sees the actor.
            .route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                audit_mutations,
            ))
    };
    let console = routes()
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .with_state(state.clone());
    let mut router = Router::new();
    if state.tokens.is_some() {
        router = router.nest(
            "/admin/v1",
            routes()
                .route_layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    require_admin,
                ))
                // Added after the layer: the document needs no credentials.
                .route("/openapi.json", get(openapi))
                .fallback(no_route)
                .method_not_allowed_fallback(no_method),
        );
    }
    if state.api.is_some() {
        router = router.nest(
            "/api/v1",
            routes()
                .route_layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    require_signature,
                ))
                .route("/openapi.json", get(openapi))
                .fallback(no_route)
                .method_not_allowed_fallback(no_method),
        );
    }
    AdminRouters {
        public: router.with_state(state),
        console,
    }
}

/// The auditor's queries (`portcullis_auditor::http`), or a clear 404 without ClickHouse.
fn audit_routes(store: Option<Arc<portcullis_auditor::http::StoreHandle>>) -> Router<AdminState> {
    match store {
        Some(store) => portcullis_auditor::http::routes(store).merge(crate::holds::routes()),
        None => Router::new().route(
            "/{*rest}",
            axum::routing::any(|| async {
                error(
                    StatusCode::NOT_FOUND,
                    "no [audit.clickhouse] section is configured",
                )
            }),
        ),
    }
}

/// Unknown routes answer JSON too (before any authentication: they hold nothing).
async fn no_route(OriginalUri(uri): OriginalUri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no route {} (see /api/v1/openapi.json)", uri.path()),
    )
}

async fn no_method(method: axum::http::Method, OriginalUri(uri): OriginalUri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

/// The API's OpenAPI document, kept in the repository (`docs/openapi.json`); a test
/// checks it against the routes both ways.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Checks an `/api/v1` request's HMAC signature (the body is read first, within
/// `max_body_bytes`, since it is signed).
async fn require_signature(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    let Some(api) = &s.api else {
        return error(StatusCode::NOT_FOUND, "no [api] section is configured");
    };
    let remote = req
        .extensions()
        .get::<ConnectInfo<crate::serve::Peer>>()
        .map(|c| c.0 .0.ip())
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    let uri = req
        .extensions()
        .get::<OriginalUri>()
        .map(|u| u.0.clone())
        .unwrap_or_else(|| req.uri().clone());
    let (mut parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, s.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {} bytes", s.max_body_bytes),
            )
        }
    };
    // A header that is there but not visible ASCII is passed on as such (the verifier
    // then names it malformed), not as missing.
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("\u{fffd}"))
    };
    let headers = portcullis_apiauth::Headers {
        token: header(portcullis_apiauth::HEADER_TOKEN),
        timestamp: header(portcullis_apiauth::HEADER_TIMESTAMP),
        nonce: header(portcullis_apiauth::HEADER_NONCE),
        signature: header(portcullis_apiauth::HEADER_SIGNATURE),
    };
    let now = Utc::now();
    let (verdict, limited) = match api.lock() {
        Ok(mut v) => {
            let verdict = v.handle_request(
                &headers,
                &portcullis_apiauth::Request {
                    method: parts.method.as_str(),
                    path: uri.path(),
                    query: uri.query(),
                    body: &bytes,
                },
                remote,
                now,
            );
            // The nonce is on disk before the request runs; compaction sees the
            // verifier's live set under the same lock.
            let verdict = match (verdict, &s.nonce_log) {
                (Ok(who), Some(log)) => match log.lock() {
                    Ok(mut log) => match log.append(&who.nonce) {
                        Ok(()) => {
                            let live = v.nonces();
                            if log.wants_compaction(live) {
                                if let Err(e) = log.compact(&v.live_nonces()) {
                                    tracing::error!("api nonce file not compacted: {e}");
                                }
                            }
                            Ok(who)
                        }
                        Err(e) => {
                            tracing::error!("api nonce not recorded, request refused: {e}");
                            Err(portcullis_apiauth::AuthError::Busy)
                        }
                    },
                    Err(_) => Err(portcullis_apiauth::AuthError::Busy),
                },
                (verdict, _) => verdict,
            };
            let limited = v.limited(remote, now);
            (verdict, limited)
        }
        Err(_) => (Err(portcullis_apiauth::AuthError::Busy), false),
    };
    // In a cluster the nonce is also taken cluster-wide: a request replayed against
    // another node is refused there; without the database nothing is accepted.
    let verdict = match (verdict, &s.shared) {
        (Ok(who), Some(shared)) => {
            let forget = chrono::DateTime::from_timestamp(who.nonce.forget_at, 0)
                .unwrap_or_else(|| now + chrono::TimeDelta::hours(2));
            match shared
                .claim("api-nonce", &format!("{:032x}", who.nonce.digest), forget)
                .await
            {
                Ok(true) => Ok(who),
                Ok(false) => Err(portcullis_apiauth::AuthError::Replayed),
                Err(e) => {
                    tracing::error!("api nonce not recorded in the cluster, request refused: {e}");
                    Err(portcullis_apiauth::AuthError::Busy)
                }
            }
        }
        (verdict, _) => verdict,
    };
    match verdict {
        Ok(who) => {
            parts.extensions.insert(Actor(format!("api:{}", who.token)));
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Err(e) => {
            // Past the failure limit, refusals are not logged one by one.
            if !limited {
                tracing::warn!(path = %uri.path(), %remote, token = headers.token.unwrap_or("-"), "api: request refused: {e}");
            }
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            error(status, e.to_string())
        }
    }
}

/// Records every mutating call as an `admin_action` event: actor, route, path, outcome
/// (`ok`, or the status and the error message).
async fn audit_mutations(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    if matches!(req.method().as_str(), "GET" | "HEAD") {
        return next.run(req).await;
    }
    let actor = req
        .extensions()
        .get::<Actor>()
        .map(|a| a.0.clone())
        .unwrap_or_else(|| "unknown".into());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str())
        .unwrap_or_default();
    // The same action whichever mount it came through; the actor says which.
    let route = ["/admin/v1", "/api/v1"]
        .iter()
        .find_map(|p| route.strip_prefix(p))
        .unwrap_or(route)
        .to_string();
    let action = format!("{} {route}", req.method());
    let target = req
        .extensions()
        .get::<OriginalUri>()
        .map(|u| u.0.path().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let response = next.run(req).await;
    let status = response.status();
    let version = status
        .is_success()
        .then(|| response.headers().get(header::ETAG))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_matches('"').to_string());
    let (response, outcome) = if status.is_success() {
        (response, "ok".to_string())
    } else {
        // Error bodies are small JSON; keep the message for the audit trail.
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 64 * 1024)
            .await
            .unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_default();
        (
            Response::from_parts(parts, axum::body::Body::from(bytes)),
            format!("{}: {message}", status.as_u16()),
        )
    };
    // Audit before answer: the admin_action is durable before the client hears back.
    let (tx, rx) = oneshot::channel();
    let sent = s
        .commands
        .send(Command::Report(
            portcullis_model::Event::AdminAction {
                actor,
                action,
                target,
                outcome,
                version,
            },
            Some(tx),
        ))
        .await;
    let durable = sent.is_ok()
        && matches!(
            tokio::time::timeout(std::time::Duration::from_secs(10), rx).await,
            Ok(Ok(true))
        );
    if !durable {
        tracing::error!("admin action applied but its audit event could not be recorded");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the action was applied, but its audit event could not be recorded: the audit trail is unavailable",
        );
    }
    response
}

async fn require_admin(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| {
            s.tokens
                .as_ref()
                .and_then(|tokens| tokens.read().ok().map(|set| set.verify(t.trim())))
                .unwrap_or(false)
        });
    if !ok {
        // Logged (and limited per address) by the listener's bearer-failure layer.
        return error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
    }
    let mut req = req;
    req.extensions_mut().insert(Actor("admin:cli".into()));
    next.run(req).await
}

async fn users(State(s): State<AdminState>) -> Response {
    match ask(&s, Command::Users).await {
        Ok(mut rows) => {
            // The loop knows who the policies know; the directory says where each came
            // from, and lists the users it holds but the policies do not (inactive).
            if let Some(identity) = &s.identity {
                identity.read(|d| {
                    for row in rows.iter_mut().filter(|r| r.source.is_empty()) {
                        if let Some(u) = d.user_by_name(&row.name) {
                            row.source = u.source.clone();
                        }
                    }
                    for u in d.users().filter(|u| !u.active) {
                        rows.push(UserRow {
                            name: u.user_name.clone(),
                            source: u.source.clone(),
                            active: false,
                            groups: d.groups_of(&u.id).map(|g| g.display_name.clone()).collect(),
                            tags: u.tags.clone(),
                            devices: Vec::new(),
                            sessions: 0,
                        });
                    }
                });
            }
            rows.sort_by(|a, b| a.name.cmp(&b.name));
            Json(rows).into_response()
        }
        Err(r) => r,
    }
}

/// Removes a user's authenticator (lost phone): their next sign-on sets one up again
/// (or, without `[mfa] required`, signs in without). Recorded as an `admin_action`.
async fn reset_mfa(
    State(s): State<AdminState>,
    actor: Option<axum::Extension<Actor>>,
    Path(name): Path<String>,
) -> Response {
    let Some(identity) = &s.identity else {
        return error(StatusCode::NOT_FOUND, "no identity store is configured");
    };
    let id = crate::sso::totp_record_id(&name);
    match identity.record(crate::sso::TOTP_KIND, &id).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("user {name:?} has no authenticator"),
            )
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
    let body = json!({"user": name, "reset": true});
    match identity
        .save_record(crate::sso::TOTP_KIND, &id, &body)
        .await
    {
        Ok(()) => {
            let actor = actor.map_or_else(|| "admin".to_string(), |a| a.0 .0.clone());
            tracing::info!(user = %name, %actor, "admin: authenticator reset");
            Json(json!({"user": name, "mfa_reset": true})).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn disable_user(
    State(s): State<AdminState>,
    actor: Option<axum::Extension<Actor>>,
    Path(name): Path<String>,
) -> Response {
    let (requested, requested_at) = (Instant::now(), Utc::now());
    let actor = actor.map_or_else(|| "admin".to_string(), |a| a.0 .0.clone());
    if let Some(identity) = &s.identity {
        let in_directory = identity.read(|d| d.user_by_name(&name).map(|u| u.id));
        if let Some(id) = in_directory {
            let r = identity
                .change(&actor, requested, requested_at, |d, now| {
                    let mut u = d
                        .user(&id)
                        .cloned()
                        .ok_or_else(|| DirectoryError::NoSuchUser(id.to_string()))?;
                    u.active = false;
                    Ok::<_, portcullis_identity::IdentityError>(d.plan_update_user(u, now)?)
                })
                .await;
            return match r {
                Ok(_) => {
                    tracing::info!(user = %name, "admin: user disabled");
                    Json(json!({"user": name, "disabled": true, "persistent": true}))
                        .into_response()
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            };
        }
    }
    let found = ask(&s, |done| Command::DisableConfigUser {
        name: name.clone(),
        actor,
        requested,
        requested_at,
        done,
    })
    .await;
    match found {
        Ok(true) => Json(json!({
            "user": name, "disabled": true, "persistent": false,
            "note": "defined in the configuration file: remove it there to keep it disabled after a restart"
        }))
        .into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no user {name:?}")),
        Err(r) => r,
    }
}

#[derive(Serialize)]
struct SessionRow {
    id: u64,
    user: String,
    device: String,
    endpoint: String,
    started: DateTime<Utc>,
    rx_bytes: u64,
    tx_bytes: u64,
}

async fn sessions(State(s): State<AdminState>) -> Response {
    match ask(&s, Command::Sessions).await {
        Ok(list) => Json(
            list.into_iter()
                .map(|s| SessionRow {
                    id: s.id,
                    user: s.user,
                    device: s.device,
                    endpoint: s.endpoint.to_string(),
                    started: s.started,
                    rx_bytes: s.rx.bytes,
                    tx_bytes: s.tx.bytes,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(r) => r,
    }
}

async fn kill_session(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("session id {id:?} is not a number"),
        );
    };
    match ask(&s, |tx| Command::KillSession(id, tx)).await {
        Ok(true) => Json(json!({"session": id, "killed": true})).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no live session {id}")),
        Err(r) => r,
    }
}

fn no_ldap() -> Response {
    error(StatusCode::NOT_FOUND, "no [ldap] section is configured")
}

/// The cluster's nodes and leases, as `portcullis cluster status --json` shows them.
async fn cluster_status(State(s): State<AdminState>) -> Response {
    let Some(shared) = &s.shared else {
        return error(StatusCode::NOT_FOUND, "no [cluster] section is configured");
    };
    let overview = async {
        let client = shared.client().await?;
        portcullis_cluster::overview(&client).await
    };
    match overview.await {
        Ok(o) => Json(o).into_response(),
        Err(e) => {
            tracing::warn!("GET /cluster: {e}");
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

async fn ldap_status(State(s): State<AdminState>) -> Response {
    match &s.ldap {
        Some(l) => {
            let st = l.status.lock().map(|g| g.clone()).unwrap_or_default();
            Json(st).into_response()
        }
        None => no_ldap(),
    }
}

async fn ldap_approve(State(s): State<AdminState>) -> Response {
    let Some(l) = &s.ldap else {
        return no_ldap();
    };
    let (tx, rx) = oneshot::channel();
    if l.control
        .send(LdapControl::ApproveRemoval(tx))
        .await
        .is_err()
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the ldap sync is not running",
        );
    }
    match rx.await {
        Ok(Ok(msg)) => {
            tracing::warn!("admin: ldap removal approved: {msg}");
            Json(json!({"outcome": msg})).into_response()
        }
        Ok(Err(e)) => error(StatusCode::CONFLICT, e),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the ldap sync is not running",
        ),
    }
}

async fn ldap_lookup(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    let Some(l) = &s.ldap else {
        return no_ldap();
    };
    match l.lookup(&name).await {
        Ok(rows) => Json(json!({"matches": rows})).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, e),
    }
}

#[cfg(test)]
mod tests;
