//! The read-only HTTP API for auditors' tools.
//!
//! Every request needs `Authorization: Bearer <token>` (compared in constant time);
//! nothing here writes. Routes (query parameters are the CLI's filter names):
//! - `GET /v1/events?user=&group=&dst=&port=&decision=&since=&until=&session=&kind=&limit=`
//! - `GET /v1/reports/{sessions|who-reached|denied|top-talkers}?…same filters…`
//! - `GET /v1/verify?gateway=&since=&until=`
//!
//! Answers are JSON: a [`Table`] (`columns`, `rows`) or a [`VerifyReport`]; errors are
//! `{"error": "..."}` with 400 (bad filter), 401 (token) or 502 (ClickHouse).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use portcullis_audit::Store;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::{filter, AuditorError, Filter, Report};

struct ApiState {
    store: Store,
    token: String,
}

/// The API's routes.
pub fn router(store: Store, token: String) -> Router {
    let state = Arc::new(ApiState { store, token });
    Router::new()
        .route("/v1/events", get(events))
        .route("/v1/reports/{name}", get(report))
        .route("/v1/verify", get(verify))
        // The token is checked before anything else looks at the request, so a caller
        // without it learns nothing from parameter errors.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
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
    // Lengths may differ; ct_eq on slices of different length is false without leaking
    // where they differ.
    bool::from(presented.as_bytes().ct_eq(state.token.as_bytes()))
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
    State(st): State<Arc<ApiState>>,
    f: Result<Query<Filter>, QueryRejection>,
) -> Response {
    let f = match f {
        Ok(Query(f)) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match crate::run_query(&st.store, &f, None, chrono::Utc::now()).await {
        Ok(t) => Json(t).into_response(),
        Err(e) => failure(e),
    }
}

async fn report(
    State(st): State<Arc<ApiState>>,
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
    match crate::run_query(&st.store, &f, Some(report), chrono::Utc::now()).await {
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
    State(st): State<Arc<ApiState>>,
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
    match crate::verify_trail(&st.store, p.gateway.as_deref(), since, until).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => failure(e),
    }
}
