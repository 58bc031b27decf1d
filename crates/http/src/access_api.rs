//! The access-request routes of the admin API (`portcullis access …` uses them):
//! - `GET /admin/v1/access-requests[?user=NAME&state=STATE]`: requests, newest first;
//! - `POST /admin/v1/access-requests` `{"user", "network", "dst"?, "port"?, "duration",
//!   "reason"}`: files a request for the user (201);
//! - `GET /admin/v1/access-requests/{id}`;
//! - `POST /admin/v1/access-requests/{id}/approve` `{"as"}`: approval by the user `as`,
//!   checked against the `approve_access` policies (403 for the requester or a user they
//!   do not allow); the grant is live in the packet loop when this answers;
//! - `POST /admin/v1/access-requests/{id}/deny` `{"as", "reason"}`;
//! - `POST /admin/v1/access-requests/{id}/revoke` `{"reason"?}`: ends a grant (its flows
//!   are cut before the answer) or withdraws a pending request.
//!
//! The token holder acts for `as`: whether `as` may approve is the policies' answer, and
//! the call itself is recorded as an `admin_action` with its actor and outcome.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use portcullis_access::{parse_dst, parse_duration, NewRequest, PortSpec};
use serde::Deserialize;

use crate::access::AccessService;
use crate::api::{body, Actor, AdminState, ApiError};

pub(crate) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/access-requests", get(list).post(create))
        .route("/access-requests/{id}", get(show))
        .route("/access-requests/{id}/approve", post(approve))
        .route("/access-requests/{id}/deny", post(deny))
        .route("/access-requests/{id}/revoke", post(revoke))
}

fn service(s: &AdminState) -> Result<&Arc<AccessService>, ApiError> {
    s.access.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "access requests need the identity store (configure [identity] or [cluster])".into(),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    user: Option<String>,
    state: Option<String>,
}

async fn list(
    State(s): State<AdminState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let all = service(&s)?.list(q.user.as_deref());
    let all: Vec<_> = all
        .into_iter()
        .filter(|r| q.state.as_deref().is_none_or(|st| r.state.as_str() == st))
        .collect();
    Ok(Json(serde_json::json!({ "requests": all })).into_response())
}

async fn show(State(s): State<AdminState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match service(&s)?.get(&id) {
        Some(r) => Ok(Json(r).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no access request {id:?}"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    user: String,
    network: String,
    dst: Option<String>,
    /// `5432/tcp`.
    port: Option<String>,
    /// `2h`, `90m`, `1h30m`.
    duration: String,
    reason: String,
}

async fn create(
    State(s): State<AdminState>,
    actor: Option<Extension<Actor>>,
    b: Result<Json<CreateBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let access = service(&s)?;
    let b = body(b)?;
    let new = NewRequest {
        dst: b.dst.as_deref().map(parse_dst).transpose()?,
        port: b.port.as_deref().map(str::parse::<PortSpec>).transpose()?,
        duration_secs: parse_duration(&b.duration)?,
        user: b.user,
        network: b.network,
        reason: b.reason,
        filed_by: actor.map(|a| a.0 .0.clone()).unwrap_or_default(),
    };
    let r = access.request(new).await?;
    Ok((StatusCode::CREATED, Json(r)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    #[serde(rename = "as")]
    approver: String,
    #[serde(default)]
    reason: Option<String>,
}

async fn approve(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    b: Result<Json<DecideBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let b = body(b)?;
    // An administrator's call is no sign-on: no second factor.
    let r = service(&s)?
        .approve(&id, &b.approver, portcullis_model::SignOn::default())
        .await?;
    Ok(Json(r).into_response())
}

async fn deny(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    b: Result<Json<DecideBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let b = body(b)?;
    let reason = b.reason.ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "request body: a denial needs a \"reason\"".into(),
        )
    })?;
    let r = service(&s)?
        .deny(
            &id,
            &b.approver,
            &reason,
            portcullis_model::SignOn::default(),
        )
        .await?;
    Ok(Json(r).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn revoke(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    actor: Option<Extension<Actor>>,
    b: Result<Json<RevokeBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let b = body(b)?;
    let actor = actor.map(|a| a.0 .0.clone()).unwrap_or_default();
    let r = service(&s)?
        .revoke(
            &id,
            &actor,
            b.reason.as_deref().unwrap_or("revoked by an administrator"),
        )
        .await?;
    Ok(Json(r).into_response())
}
