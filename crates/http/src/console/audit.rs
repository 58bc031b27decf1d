//! The audit search, its CSV export, and the chain verification.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use portcullis_console::pages::{self, Chrome};
use portcullis_console::Action;
use serde_json::Value;

use axum::http::header;
use portcullis_console::csv;

use super::{at, error_text, html, strings, Console, CSV_ROWS, PAGE_ROWS};

/// The audit form's filters and report that are filled in, in the form's order.
fn audit_fields(raw: &[(String, String)]) -> Vec<(String, String)> {
    pages::AUDIT_FIELDS
        .iter()
        .map(|(name, _)| *name)
        .chain(["report"])
        .filter_map(|name| {
            raw.iter()
                .find(|(k, v)| k == name && !v.trim().is_empty())
                .map(|(k, v)| (k.clone(), v.trim().to_string()))
        })
        .collect()
}

/// `offset=` of the page asked for (0 when absent or not a number: the first page).
fn offset(raw: &[(String, String)]) -> u64 {
    raw.iter()
        .find(|(k, _)| k == "offset")
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The events or a report for `fields`, through the API's own audit routes.
async fn search(
    c: &Console,
    chrome: &Chrome,
    fields: &[(String, String)],
    offset: u64,
    limit: u64,
) -> Result<(Vec<String>, Vec<Vec<Value>>), String> {
    let report = fields
        .iter()
        .find(|(k, _)| k == "report")
        .map(|(_, v)| v.clone());
    let mut params: Vec<(String, String)> = fields
        .iter()
        .filter(|(k, _)| k != "report")
        .cloned()
        .collect();
    params.push(("limit".into(), limit.to_string()));
    if offset > 0 {
        params.push(("offset".into(), offset.to_string()));
    }
    let query = serde_urlencoded::to_string(&params).map_err(|e| e.to_string())?;
    let route = match report {
        Some(r) => {
            if !pages::REPORTS.iter().any(|(name, _)| *name == r) {
                return Err(format!("no report {r:?}"));
            }
            format!("/audit/reports/{r}?{query}")
        }
        None => format!("/audit/events?{query}"),
    };
    let (status, answer) = c.call(&chrome.user, Method::GET, &route).await;
    if !status.is_success() {
        return Err(error_text(&answer));
    }
    let columns = strings(at(&answer, "columns"));
    let rows = at(&answer, "rows")
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| r.as_array().cloned().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    Ok((columns, rows))
}

pub(super) async fn audit(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    raw: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let chrome = match c.gate(&headers, Action::ReadAudit).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let raw = raw.map(|Query(q)| q).unwrap_or_default();
    let fields = audit_fields(&raw);
    let offset = offset(&raw);
    let result = if raw.is_empty() {
        None
    } else {
        Some(search(&c, &chrome, &fields, offset, PAGE_ROWS).await)
    };
    let query = serde_urlencoded::to_string(&fields).unwrap_or_default();
    let answer = result.as_ref().map(|r| match r {
        Ok((cols, rows)) => Ok((cols.as_slice(), rows.as_slice())),
        Err(e) => Err(e.clone()),
    });
    let status = match &answer {
        Some(Err(_)) => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    };
    html(
        status,
        pages::audit(
            &chrome,
            &pages::AuditSearch {
                fields: &fields,
                answer,
                query,
                offset,
                page_rows: PAGE_ROWS,
            },
        ),
    )
}

/// The whole search (not one page) as CSV.
pub(super) async fn audit_csv(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    raw: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let chrome = match c.gate(&headers, Action::ReadAudit).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let fields = audit_fields(&raw.map(|Query(q)| q).unwrap_or_default());
    match search(&c, &chrome, &fields, 0, CSV_ROWS).await {
        Ok((columns, rows)) => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"audit.csv\"",
                ),
            ],
            csv::write(&columns, &rows),
        )
            .into_response(),
        Err(e) => html(
            StatusCode::BAD_REQUEST,
            pages::message(Some(&chrome), "Audit export", &e),
        ),
    }
}

/// Every node's hash chain checked (`portcullis audit verify`).
pub(super) async fn verify(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let chrome = match c.gate(&headers, Action::ReadAudit).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let (status, answer) = c.call(&chrome.user, Method::GET, "/audit/verify").await;
    let report = if status.is_success() {
        Ok(&answer)
    } else {
        Err(error_text(&answer))
    };
    html(
        if status.is_success() {
            StatusCode::OK
        } else {
            StatusCode::BAD_GATEWAY
        },
        pages::verify(&chrome, report),
    )
}
