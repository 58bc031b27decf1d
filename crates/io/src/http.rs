//! The one HTTP listener (`[http] listen`): SCIM under `/scim/v2` and the admin API under
//! `/admin/v1`, which the `portcullis users|sessions` commands use.
//!
//! Admin API (bearer token from `[admin] token_file`, JSON, errors as `{"error": "..."}`):
//! - `GET /admin/v1/users`: every user the policies know, with source and devices.
//! - `POST /admin/v1/users/{name}/disable`: revokes at once (answers after the cut).
//! - `GET /admin/v1/sessions`: live sessions.
//! - `POST /admin/v1/sessions/{id}/kill`: ends one session (the device may reconnect).
//! - `GET /admin/v1/ldap`: the LDAP sync's state (connected, counts, a refused pass).
//! - `POST /admin/v1/ldap/approve-removal`: applies the directory as it is now, past the
//!   mass-removal guard.
//! - `GET /admin/v1/ldap/users/{name}`: looks a user up in the directory itself.
//! - `/admin/v1/devices`: registered devices (see [`crate::devices`]).

use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use portcullis_config::TokenSet;
use portcullis_core::SessionInfo;
use portcullis_identity::{DirectoryError, Identity};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::ldap::{LdapControl, LdapHandle};

/// What the admin API asks the event loop (which owns the core).
#[derive(Debug)]
pub enum AdminCommand {
    Users(oneshot::Sender<Vec<UserRow>>),
    Sessions(oneshot::Sender<Vec<SessionInfo>>),
    KillSession(u64, oneshot::Sender<bool>),
    /// Revokes a user the configuration file defines (until the gateway restarts).
    DisableConfigUser {
        name: String,
        actor: String,
        requested: Instant,
        requested_at: DateTime<Utc>,
        done: oneshot::Sender<bool>,
    },
    /// An event to record in the audit stream (an identity source's report).
    Report(portcullis_model::Event),
}

/// A user as `users list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct UserRow {
    pub name: String,
    pub source: String,
    pub active: bool,
    pub groups: Vec<String>,
    pub tags: Vec<String>,
    pub devices: Vec<String>,
    pub sessions: usize,
}

#[derive(Clone)]
pub(crate) struct AdminState {
    tokens: Arc<RwLock<TokenSet>>,
    pub(crate) identity: Option<Arc<Identity>>,
    pub(crate) commands: mpsc::UnboundedSender<AdminCommand>,
    ldap: Option<LdapHandle>,
    /// What device profiles carry (`[devices]` configured).
    pub(crate) profile: Option<Arc<portcullis_identity::ProfileSettings>>,
}

/// The admin routes.
pub fn admin_router(
    tokens: Arc<RwLock<TokenSet>>,
    identity: Option<Arc<Identity>>,
    commands: mpsc::UnboundedSender<AdminCommand>,
    ldap: Option<LdapHandle>,
    profile: Option<Arc<portcullis_identity::ProfileSettings>>,
) -> Router {
    let state = AdminState {
        tokens,
        identity,
        commands,
        ldap,
        profile,
    };
    Router::new()
        .route("/admin/v1/users", get(users))
        .route("/admin/v1/users/{name}/disable", post(disable_user))
        .route("/admin/v1/sessions", get(sessions))
        .route("/admin/v1/sessions/{id}/kill", post(kill_session))
        .route("/admin/v1/ldap", get(ldap_status))
        .route("/admin/v1/ldap/approve-removal", post(ldap_approve))
        .route("/admin/v1/ldap/users/{name}", get(ldap_lookup))
        .merge(crate::devices::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin,
        ))
        .with_state(state)
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

async fn require_admin(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| {
            s.tokens
                .read()
                .map(|set| set.verify(t.trim()))
                .unwrap_or(false)
        });
    if !ok {
        tracing::warn!(path = %req.uri().path(), "admin: request without a valid bearer token refused");
        return error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
    }
    next.run(req).await
}

async fn ask<T>(
    s: &AdminState,
    make: impl FnOnce(oneshot::Sender<T>) -> AdminCommand,
) -> Result<T, Response> {
    let (tx, rx) = oneshot::channel();
    s.commands.send(make(tx)).map_err(|_| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        )
    })?;
    rx.await.map_err(|_| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        )
    })
}

async fn users(State(s): State<AdminState>) -> Response {
    match ask(&s, AdminCommand::Users).await {
        Ok(mut rows) => {
            // Users the directory holds but the policies do not (inactive) are listed too.
            if let Some(identity) = &s.identity {
                identity.read(|d| {
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

async fn disable_user(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    let (requested, requested_at) = (Instant::now(), Utc::now());
    let actor = "admin:cli".to_string();
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
    let found = ask(&s, |done| AdminCommand::DisableConfigUser {
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
    match ask(&s, AdminCommand::Sessions).await {
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
    match ask(&s, |tx| AdminCommand::KillSession(id, tx)).await {
        Ok(true) => Json(json!({"session": id, "killed": true})).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no live session {id}")),
        Err(r) => r,
    }
}

fn no_ldap() -> Response {
    error(StatusCode::NOT_FOUND, "no [ldap] section is configured")
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
    if l.control.send(LdapControl::ApproveRemoval(tx)).is_err() {
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
