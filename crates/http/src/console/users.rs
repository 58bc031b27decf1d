//! Users: the search, a user's page, disabling, ending a session.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use std::time::Instant;

use portcullis_console::pages::{self, UserLine, UserPage};
use portcullis_console::Action;
use serde::Deserialize;
use serde_json::Value;

use super::{at, error_text, html, strings, Console};

fn user_line(u: &Value) -> UserLine {
    UserLine {
        name: at(u, "name").as_str().unwrap_or_default().to_string(),
        active: at(u, "active").as_bool().unwrap_or(false),
        groups: strings(at(u, "groups")),
        source: at(u, "source").as_str().unwrap_or_default().to_string(),
        sessions: at(u, "sessions")
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0),
    }
}

#[derive(Deserialize)]
pub(super) struct Find {
    #[serde(default)]
    q: String,
}

pub(super) async fn users(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    find: Result<Query<Find>, QueryRejection>,
) -> Response {
    let chrome = match c.gate(&headers, Action::ReadUsers).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let q = find.map(|Query(f)| f.q).unwrap_or_default();
    let (status, list) = c.call(&chrome.user, Method::GET, "/users").await;
    if !status.is_success() {
        return html(
            StatusCode::BAD_GATEWAY,
            pages::message(Some(&chrome), "Users", &error_text(&list)),
        );
    }
    let needle = q.trim().to_lowercase();
    let lines: Vec<UserLine> = list
        .as_array()
        .map(|a| a.iter().map(user_line).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|u: &UserLine| {
            needle.is_empty()
                || u.name.to_lowercase().contains(&needle)
                || u.groups.iter().any(|g| g.to_lowercase().contains(&needle))
        })
        .collect();
    html(StatusCode::OK, pages::users(&chrome, &q, &lines))
}

pub(super) async fn user(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let chrome = match c.gate(&headers, Action::ReadUsers).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let (_, list) = c.call(&chrome.user, Method::GET, "/users").await;
    let Some(found) = list
        .as_array()
        .and_then(|a| a.iter().find(|u| at(u, "name") == name.as_str()))
    else {
        return html(
            StatusCode::NOT_FOUND,
            pages::message(Some(&chrome), "No such user", &format!("no user {name:?}")),
        );
    };
    let (_, sessions) = c.call(&chrome.user, Method::GET, "/sessions").await;
    let query = serde_urlencoded::to_string([("user", name.as_str())]).unwrap_or_default();
    let (_, devices) = c
        .call(&chrome.user, Method::GET, &format!("/devices?{query}"))
        .await;
    let (_, recent) = c
        .call(
            &chrome.user,
            Method::GET,
            &format!("/audit/events?{query}&order=desc&limit=20"),
        )
        .await;
    let page = UserPage {
        recent: super::pick(&recent, &pages::RECENT_COLUMNS),
        line: user_line(found),
        tags: strings(at(found, "tags")),
        sessions: sessions
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|s| at(s, "user") == name.as_str())
                    .map(|s| {
                        (
                            at(s, "id").as_u64().unwrap_or(0),
                            at(s, "device").as_str().unwrap_or_default().to_string(),
                            at(s, "endpoint").as_str().unwrap_or_default().to_string(),
                            at(s, "started").as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        devices: devices
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| {
                        (
                            at(d, "id").as_str().unwrap_or_default().to_string(),
                            at(d, "name").as_str().unwrap_or_default().to_string(),
                            at(d, "public_key").as_str().unwrap_or_default().to_string(),
                            at(d, "expires").as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    html(StatusCode::OK, pages::user(&chrome, &page))
}

#[derive(Deserialize)]
pub(super) struct DisableForm {
    csrf: String,
    #[serde(default)]
    confirm: Option<String>,
}

pub(super) async fn disable(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(f): Form<DisableForm>,
) -> Response {
    let chrome = match c.gate_post(&headers, Action::DisableUser, &f.csrf).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let back = format!("/console/users/{}", pages::percent(&name));
    if f.confirm.as_deref() != Some("yes") {
        return html(
            StatusCode::BAD_REQUEST,
            pages::message(
                Some(&chrome),
                "Not confirmed",
                "Tick the confirmation to disable the user.",
            ),
        );
    }
    let started = Instant::now();
    let (status, answer) = c
        .call(
            &chrome.user,
            Method::POST,
            &format!("/users/{}/disable", pages::percent(&name)),
        )
        .await;
    // The API answers once the loop has cut every tunnel of the user.
    let took = started.elapsed();
    if !status.is_success() {
        return html(
            status,
            pages::message(Some(&chrome), "Not disabled", &error_text(&answer)),
        );
    }
    tracing::info!(user = %name, by = %chrome.user, ms = took.as_secs_f64() * 1e3, "console: user disabled");
    html(
        StatusCode::OK,
        pages::done(
            &chrome,
            "User disabled",
            &format!(
                "{name} is disabled: every tunnel was cut in {:.1} ms.",
                took.as_secs_f64() * 1e3
            ),
            &back,
        ),
    )
}

#[derive(Deserialize)]
pub(super) struct KillForm {
    csrf: String,
    #[serde(default)]
    user: String,
}

pub(super) async fn kill(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Form(f): Form<KillForm>,
) -> Response {
    let uri = format!("/sessions/{id}/kill");
    let (chrome, _) = match c
        .act(
            &headers,
            Action::KillSession,
            &f.csrf,
            (Method::POST, &uri, None),
            "Not ended",
        )
        .await
    {
        Ok(done) => done,
        Err(r) => return r,
    };
    html(
        StatusCode::OK,
        pages::done(
            &chrome,
            "Session ended",
            &format!("Session {id} is ended."),
            &format!("/console/users/{}", pages::percent(&f.user)),
        ),
    )
}

fn text_of(v: &Value, key: &str) -> String {
    let x = at(v, key);
    x.as_str().map_or_else(|| x.to_string(), str::to_string)
}

pub(super) async fn sessions_devices(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
) -> Response {
    let chrome = match c.gate(&headers, Action::ReadUsers).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let (_, sessions) = c.call(&chrome.user, Method::GET, "/sessions").await;
    let (_, devices) = c.call(&chrome.user, Method::GET, "/devices").await;
    let sessions: Vec<_> = sessions
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        at(s, "id").as_u64().unwrap_or(0),
                        text_of(s, "user"),
                        text_of(s, "device"),
                        text_of(s, "endpoint"),
                        text_of(s, "started"),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let devices: Vec<_> = devices
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    (
                        text_of(d, "id"),
                        text_of(d, "user"),
                        text_of(d, "name"),
                        text_of(d, "public_key"),
                        text_of(d, "expires"),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    html(
        StatusCode::OK,
        pages::sessions_devices(&chrome, &sessions, &devices),
    )
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    csrf: String,
}

pub(super) async fn rotate_device(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let uri = format!("/devices/{}/rotate", pages::percent(&id));
    let body = serde_json::json!({});
    let (chrome, v) = match c
        .act(
            &headers,
            Action::ManageDevices,
            &f.csrf,
            (Method::POST, &uri, Some(&body)),
            "Not rotated",
        )
        .await
    {
        Ok(done) => done,
        Err(r) => return r,
    };
    let profile = text_of(&v, "profile");
    let qr = crate::qr_svg(&profile, 240);
    html(
        StatusCode::OK,
        pages::rotated(&chrome, &text_of(at(&v, "device"), "user"), &profile, &qr),
    )
}

pub(super) async fn remove_device(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let uri = format!("/devices/{}", pages::percent(&id));
    let (chrome, v) = match c
        .act(
            &headers,
            Action::ManageDevices,
            &f.csrf,
            (Method::DELETE, &uri, None),
            "Not removed",
        )
        .await
    {
        Ok(done) => done,
        Err(r) => return r,
    };
    html(
        StatusCode::OK,
        pages::done(
            &chrome,
            "Device removed",
            &format!(
                "{}'s device {} is removed; its tunnel is cut.",
                text_of(at(&v, "device"), "user"),
                text_of(at(&v, "device"), "name")
            ),
            "/console/devices",
        ),
    )
}
