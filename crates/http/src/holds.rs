//! Legal holds on the audit trail, under `/audit/holds` of the admin API (and the
//! `portcullis audit hold add|list|remove` commands):
//! - `GET /audit/holds`: the active holds.
//! - `POST /audit/holds` `{"user"?, "since", "until", "reason"}`: places one (times RFC
//!   3339 or a duration ago); answers its id.
//! - `POST /audit/holds/{id}/remove` `{"reason"}`: lifts one.
//!
//! A hold is kept in ClickHouse's append-only `legal_holds` (retention reads it there and
//! keeps every partition it covers) and recorded as a `legal_hold` event in the trail,
//! durable before the answer, besides the API's own `admin_action`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use portcullis_audit::store::HoldRecord;
use portcullis_control::Command;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use crate::api::{error, Actor, AdminState};

pub(crate) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/holds", get(list).post(add))
        .route("/holds/{id}/remove", post(remove))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    #[serde(default)]
    user: Option<String>,
    since: String,
    until: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveBody {
    reason: String,
}

async fn store(s: &AdminState) -> Result<portcullis_audit::Store, Response> {
    match &s.audit_store {
        Some(h) => h.store().await,
        None => Err(error(
            StatusCode::NOT_FOUND,
            "no [audit.clickhouse] section is configured",
        )),
    }
}

fn to_time(secs: u32) -> DateTime<Utc> {
    DateTime::from_timestamp(i64::from(secs), 0).unwrap_or_default()
}

async fn list(State(s): State<AdminState>) -> Response {
    let store = match store(&s).await {
        Ok(st) => st,
        Err(r) => return r,
    };
    match store.holds().await {
        Ok(holds) => Json(json!({
            "holds": holds.iter().map(|h| json!({
                "id": h.id,
                "user": h.user,
                "since": to_time(h.since_secs).to_rfc3339(),
                "until": to_time(h.until_secs).to_rfc3339(),
                "reason": h.reason,
                "placed_by": h.actor,
                "placed_at": to_time(h.placed_secs).to_rfc3339(),
            })).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// Records the hold's event in the trail, durable before the answer.
async fn record(s: &AdminState, h: &HoldRecord) -> Result<(), Response> {
    let (tx, rx) = oneshot::channel();
    let event = portcullis_model::Event::LegalHold {
        hold_id: h.id.clone(),
        action: h.action.clone(),
        user: h.user.clone(),
        since: to_time(h.since_secs),
        until: to_time(h.until_secs),
        reason: h.reason.clone(),
        actor: h.actor.clone(),
    };
    let sent = s.commands.send(Command::Report(event, Some(tx))).await;
    let durable = sent.is_ok()
        && matches!(
            tokio::time::timeout(std::time::Duration::from_secs(10), rx).await,
            Ok(Ok(true))
        );
    if durable {
        Ok(())
    } else {
        Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the hold is stored, but its audit event could not be recorded: the audit trail is unavailable",
        ))
    }
}

/// Why a hold's reason is refused, if it is.
fn bad_reason(reason: &str) -> Option<Response> {
    (reason.trim().is_empty() || reason.len() > 1000).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "reason: required, at most 1000 bytes (the case or request the hold is for)",
        )
    })
}

async fn add(
    State(s): State<AdminState>,
    actor: Option<axum::Extension<Actor>>,
    body: Result<Json<AddBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if let Some(r) = bad_reason(&b.reason) {
        return r;
    }
    let now = Utc::now();
    let bound = |name: &str, t: &str| {
        portcullis_auditor::filter::parse_time(t, now)
            .map(|t| portcullis_auditor::filter::db_seconds(t) as u32)
            .map_err(|e| format!("{name}: {e}"))
    };
    let (since, until) = match (bound("since", &b.since), bound("until", &b.until)) {
        (Ok(s), Ok(u)) if s <= u => (s, u),
        (Ok(_), Ok(_)) => return error(StatusCode::BAD_REQUEST, "since: after until"),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let user = b.user.unwrap_or_default();
    if user.len() > 256 {
        return error(StatusCode::BAD_REQUEST, "user: at most 256 bytes");
    }
    let store = match store(&s).await {
        Ok(st) => st,
        Err(r) => return r,
    };
    let id = format!("lh-{}", hex::encode(rand::random::<[u8; 8]>()));
    let h = HoldRecord {
        id: id.clone(),
        action: "add".into(),
        user,
        since_secs: since,
        until_secs: until,
        reason: b.reason,
        actor: actor.map_or_else(|| "admin".to_string(), |a| a.0 .0.clone()),
    };
    if let Err(e) = store.record_hold(&h).await {
        return error(StatusCode::BAD_GATEWAY, e.to_string());
    }
    if let Err(r) = record(&s, &h).await {
        return r;
    }
    tracing::info!(hold = %id, user = %h.user, actor = %h.actor, "legal hold placed");
    Json(json!({
        "id": id,
        "user": h.user,
        "since": to_time(since).to_rfc3339(),
        "until": to_time(until).to_rfc3339(),
    }))
    .into_response()
}

async fn remove(
    State(s): State<AdminState>,
    actor: Option<axum::Extension<Actor>>,
    Path(id): Path<String>,
    body: Result<Json<RemoveBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if let Some(r) = bad_reason(&b.reason) {
        return r;
    }
    let store = match store(&s).await {
        Ok(st) => st,
        Err(r) => return r,
    };
    let held = match store.holds().await {
        Ok(h) => h,
        Err(e) => return error(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    let Some(hold) = held.into_iter().find(|h| h.id == id) else {
        return error(StatusCode::NOT_FOUND, format!("no active hold {id:?}"));
    };
    let h = HoldRecord {
        id: id.clone(),
        action: "remove".into(),
        user: hold.user,
        since_secs: hold.since_secs,
        until_secs: hold.until_secs,
        reason: b.reason,
        actor: actor.map_or_else(|| "admin".to_string(), |a| a.0 .0.clone()),
    };
    if let Err(e) = store.record_hold(&h).await {
        return error(StatusCode::BAD_GATEWAY, e.to_string());
    }
    if let Err(r) = record(&s, &h).await {
        return r;
    }
    tracing::info!(hold = %id, actor = %h.actor, "legal hold lifted");
    Json(json!({"id": id, "removed": true})).into_response()
}
