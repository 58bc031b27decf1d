//! The read-only HTTP API for auditors' tools.
//!
//! [`router`] is what `portcullis audit serve` runs: every request needs
//! `Authorization: Bearer <token>` (compared in constant time); nothing here writes.
//! [`routes`] are the same routes without authentication, for the gateway to mount
//! under its signed `/api/v1/audit`. Routes (query parameters are the CLI's filter names):
//! - `GET /v1/events?user=&group=&dst=&port=&decision=&since=&until=&session=&kind=&limit=`
//! - `GET /v1/reports/{sessions|who-reached|denied|top-talkers|access-requests|revocations|policy-changes}?…same filters…`
//! - `GET /v1/verify?gateway=&since=&until=`
//!
//! Answers are JSON: a [`Table`](crate::Table) (`columns`, `rows`) or a
//! [`VerifyReport`](crate::VerifyReport); errors are `{"error": "..."}` with 400 (bad
//! filter), 401 (token) or 502 (ClickHouse).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use portcullis_audit::{Store, StoreConfig};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::{filter, AuditorError, Filter, Report};

/// A store connected on first use and kept: the gateway starts while ClickHouse may be
/// down, and a query then answers 502 instead of the gateway refusing to start.
pub struct StoreHandle {
    config: Option<StoreConfig>,
    store: tokio::sync::Mutex<Option<Store>>,
    /// Keys `verify` checks signed checkpoints with.
    keys: Vec<portcullis_audit::checkpoint::PublicKey>,
}

impl StoreHandle {
    /// Connects on the first query.
    pub fn lazy(config: StoreConfig) -> StoreHandle {
        StoreHandle {
            config: Some(config),
            store: tokio::sync::Mutex::new(None),
            keys: Vec::new(),
        }
    }

    /// Already connected.
    pub fn connected(store: Store) -> StoreHandle {
        StoreHandle {
            config: None,
            store: tokio::sync::Mutex::new(Some(store)),
            keys: Vec::new(),
        }
    }

    /// Checks signed checkpoints in `verify` with these keys.
    pub fn with_keys(mut self, keys: Vec<portcullis_audit::checkpoint::PublicKey>) -> StoreHandle {
        self.keys = keys;
        self
    }

    /// A query failed: with the config at hand, the next one connects again, to the
    /// replica after this one (a lost replica does not keep answering 502).
    async fn failed(&self, failed: &Store) {
        let Some(cfg) = &self.config else {
            return;
        };
        let mut slot = self.store.lock().await;
        if slot
            .as_ref()
            .is_some_and(|s| s.url_index == failed.url_index)
        {
            *slot = Store::connect_from(cfg, failed.url_index + 1).await.ok();
        }
    }

    /// The connected store (connecting now if needed), or a JSON error response.
    pub async fn store(&self) -> Result<Store, Response> {
        self.get().await
    }

    async fn get(&self) -> Result<Store, Response> {
        let mut slot = self.store.lock().await;
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let Some(cfg) = &self.config else {
            return Err(error(StatusCode::BAD_GATEWAY, "no clickhouse connection"));
        };
        match Store::connect(cfg).await {
            Ok(s) => {
                *slot = Some(s.clone());
                Ok(s)
            }
            Err(e) => {
                tracing::warn!("auditor api: {e}");
                Err(error(StatusCode::BAD_GATEWAY, e))
            }
        }
    }
}

struct ApiState {
    token_digest: [u8; 32],
}

/// The API with bearer-token authentication (`portcullis audit serve`).
pub fn router(store: Store, token: String) -> Router {
    router_with(StoreHandle::connected(store), token)
}

/// [`router`] over a handle (lazy, reconnecting, with checkpoint keys).
pub fn router_with(handle: StoreHandle, token: String) -> Router {
    let state = Arc::new(ApiState {
        token_digest: Sha256::digest(token.as_bytes()).into(),
    });
    Router::new()
        .nest("/v1", routes(Arc::new(handle)))
        // The token is checked before anything else looks at the request, so a caller
        // without it learns nothing from parameter errors.
        .route_layer(axum::middleware::from_fn_with_state(state, require_token))
}

/// The routes (`/events`, `/reports/{name}`, `/verify`) without authentication: the
/// caller mounts them behind its own.
pub fn routes<S: Clone + Send + Sync + 'static>(store: Arc<StoreHandle>) -> Router<S> {
    Router::new()
        .route("/events", get(events))
        .route("/reports/{name}", get(report))
        .route("/verify", get(verify))
        .with_state(store)
}

async fn require_token(
    State(st): State<Arc<ApiState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if authorized(&st, request.headers()) {
        next.run(request).await
    } else {
        error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
    }
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": msg.to_string() })),
    )
        .into_response()
}

fn authorized(state: &ApiState, headers: &HeaderMap) -> bool {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Digests have one length: the comparison leaks neither where nor how long.
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    bool::from(digest.ct_eq(&state.token_digest))
}

fn failure(e: AuditorError) -> Response {
    match e {
        AuditorError::Filter(f) => error(StatusCode::BAD_REQUEST, f),
        other => {
            tracing::warn!("auditor api: {other}");
            error(StatusCode::BAD_GATEWAY, other)
        }
    }
}

async fn events(
    State(st): State<Arc<StoreHandle>>,
    f: Result<Query<Filter>, QueryRejection>,
) -> Response {
    let f = match f {
        Ok(Query(f)) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let store = match st.get().await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let answer = crate::run_query(&store, &f, None, chrono::Utc::now()).await;
    if answer.is_err() {
        st.failed(&store).await;
    }
    match answer {
        Ok(t) => Json(t).into_response(),
        Err(e) => failure(e),
    }
}

async fn report(
    State(st): State<Arc<StoreHandle>>,
    Path(name): Path<String>,
    f: Result<Query<Filter>, QueryRejection>,
) -> Response {
    let f = match f {
        Ok(Query(f)) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let report: Report = match name.parse() {
        Ok(r) => r,
        Err(e) => return error(StatusCode::NOT_FOUND, e),
    };
    let store = match st.get().await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let answer = crate::run_query(&store, &f, Some(report), chrono::Utc::now()).await;
    if answer.is_err() {
        st.failed(&store).await;
    }
    match answer {
        Ok(t) => Json(t).into_response(),
        Err(e) => failure(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyParams {
    gateway: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

async fn verify(
    State(st): State<Arc<StoreHandle>>,
    p: Result<Query<VerifyParams>, QueryRejection>,
) -> Response {
    let p = match p {
        Ok(Query(p)) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let now = chrono::Utc::now();
    let parse = |t: &Option<String>| t.as_deref().map(|t| filter::parse_time(t, now)).transpose();
    let (since, until) = match (parse(&p.since), parse(&p.until)) {
        (Ok(s), Ok(u)) => (s, u),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let store = match st.get().await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let opts = crate::VerifyOptions {
        gateway: p.gateway.clone(),
        since,
        until,
        keys: st.keys.clone(),
        outside: Vec::new(),
        grace: std::time::Duration::ZERO,
    };
    match crate::verify_trail(&store, &opts).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => {
            st.failed(&store).await;
            failure(e)
        }
    }
}
