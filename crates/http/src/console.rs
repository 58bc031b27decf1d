//! The web console under `/console` (`[console]`): pages from `portcullis-console`,
//! served on the `[http]` listener.
//!
//! - Sign-in is the `[saml]` sign-on (`/saml/login?return=/console`); the roles come
//!   from the IdP groups of that sign-in, so a new sign-in re-reads them. A session
//!   idle past `[console] idle_timeout_secs` is ended (the login with it).
//! - Every request is checked here: a login, a role that may take the page's
//!   [`Action`], and for a POST the session's CSRF token (constant-time). Pages hide
//!   what a role may not do; the check does not rely on that.
//! - Every action runs the admin API's own route (no authentication of its own, the
//!   console user as the actor `console:<name>`), so the console can do nothing the
//!   API cannot and every change is the API's `admin_action`.
//! - Every answer carries a strict content security policy (no script, no inline
//!   style, no framing), `nosniff`, no referrer and no caching.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use portcullis_console::pages::{self, Chrome, UserLine, UserPage};
use portcullis_console::{csv, Action, RoleGroups, Roles};
use serde::Deserialize;
use serde_json::Value;
use subtle::ConstantTimeEq as _;
use tower::ServiceExt as _;

use crate::api::Actor;
use crate::sso::Sso;

/// Rows on one page of an audit search.
const PAGE_ROWS: u64 = 100;
/// Rows in one CSV export at most.
const CSV_ROWS: u64 = 100_000;
/// Console sessions remembered for their idle time at most (the oldest go first).
const MAX_TRACKED: usize = 10_000;

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub(crate) struct Console {
    sso: Arc<Sso>,
    /// The admin API's routes without their authentication.
    api: Router,
    groups: RoleGroups,
    /// `[policy] dir`: the policy tests the editor runs.
    policy_dir: std::path::PathBuf,
    /// To the packet loop: the running policy set (explain).
    commands: tokio::sync::mpsc::Sender<portcullis_control::Command>,
    idle: Duration,
    /// Session key → last request.
    seen: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Console {
    pub(crate) fn new(
        c: &portcullis_config::ConsoleConfig,
        sso: Arc<Sso>,
        api: Router,
        commands: tokio::sync::mpsc::Sender<portcullis_control::Command>,
        policy_dir: std::path::PathBuf,
    ) -> Arc<Console> {
        Arc::new(Console {
            policy_dir,
            sso,
            api,
            commands,
            groups: RoleGroups {
                admin: c.admin_groups.clone(),
                auditor: c.auditor_groups.clone(),
                helpdesk: c.helpdesk_groups.clone(),
            },
            idle: Duration::from_secs(c.idle_timeout_secs),
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Who is asking, if they may take `action`; else the answer to give.
    async fn gate(&self, headers: &HeaderMap, action: Action) -> Result<Chrome, Response> {
        let Some(login) = self.sso.console_login(headers).await else {
            return Err(html(StatusCode::UNAUTHORIZED, pages::sign_in()));
        };
        let now = Instant::now();
        let timed_out = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let last = seen.get(&login.key).copied();
            if seen.len() >= MAX_TRACKED && last.is_none() {
                seen.retain(|_, t| now.duration_since(*t) < self.idle);
            }
            match last {
                Some(t) if now.duration_since(t) >= self.idle => {
                    seen.remove(&login.key);
                    true
                }
                _ => {
                    seen.insert(login.key, now);
                    false
                }
            }
        };
        if timed_out {
            let _ = self.sso.end_session(headers).await;
            tracing::info!(user = %login.user, "console: session ended after its idle time");
            return Err(html(StatusCode::UNAUTHORIZED, pages::sign_in()));
        }
        let roles = Roles::from_groups(&login.groups, &self.groups);
        let chrome = Chrome {
            user: login.user,
            roles,
            csrf: login.csrf,
        };
        if !roles.any() {
            return Err(html(
                StatusCode::FORBIDDEN,
                pages::message(
                    None,
                    "No console role",
                    "Your groups give you no role in the console. Ask a security administrator.",
                ),
            ));
        }
        if !roles.may(action) {
            return Err(html(
                StatusCode::FORBIDDEN,
                pages::message(
                    Some(&chrome),
                    "Not allowed",
                    "Your role does not allow this.",
                ),
            ));
        }
        Ok(chrome)
    }

    /// [`Console::gate`] for a form: the CSRF token must be the session's.
    async fn gate_post(
        &self,
        headers: &HeaderMap,
        action: Action,
        csrf: &str,
    ) -> Result<Chrome, Response> {
        let chrome = self.gate(headers, action).await?;
        if !bool::from(csrf.as_bytes().ct_eq(chrome.csrf.as_bytes())) {
            return Err(html(
                StatusCode::FORBIDDEN,
                pages::message(
                    Some(&chrome),
                    "Stale form",
                    "The form is stale or was not sent from this console; reload the page.",
                ),
            ));
        }
        Ok(chrome)
    }

    /// Runs an admin API route as `actor`: its status and JSON answer.
    async fn call(&self, actor: &str, method: Method, uri: &str) -> (StatusCode, Value) {
        self.call_with(actor, method, uri, None, None).await
    }

    /// [`Console::call`] with a JSON body and an `If-Match` version.
    async fn call_with(
        &self,
        actor: &str,
        method: Method,
        uri: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(v) = if_match {
            builder = builder.header(header::IF_MATCH, format!("\"{v}\""));
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let mut req = match builder.body(body) {
            Ok(r) => r,
            Err(e) => return (StatusCode::BAD_REQUEST, json_error(e)),
        };
        req.extensions_mut()
            .insert(Actor(format!("console:{actor}")));
        let response = match self.api.clone().oneshot(req).await {
            Ok(r) => r,
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, json_error(e)),
        };
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
            .await
            .unwrap_or_default();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

/// A field of a JSON answer (`null` when absent).
fn at<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key).unwrap_or(&Value::Null)
}

fn json_error(e: impl std::fmt::Display) -> Value {
    serde_json::json!({ "error": e.to_string() })
}

fn error_text(v: &Value) -> String {
    v.get("error")
        .and_then(Value::as_str)
        .unwrap_or("no answer")
        .to_string()
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

pub(crate) fn routes(console: Arc<Console>) -> Router {
    Router::new()
        .route("/console", get(overview))
        .route("/console/console.css", get(style))
        .route("/console/users", get(users))
        .route("/console/users/{name}", get(user))
        .route("/console/users/{name}/disable", post(disable))
        .route("/console/sessions/{id}/kill", post(kill))
        .route("/console/audit", get(audit))
        .route("/console/audit.csv", get(audit_csv))
        .route("/console/explain", get(explain))
        .route("/console/policies", get(policies))
        .route(
            "/console/policies/edit",
            get(policy_editor).post(policy_submit),
        )
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(console)
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        pages::STYLE,
    )
        .into_response()
}

async fn overview(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let chrome = match c.gate(&headers, Action::ReadOverview).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let (_, sessions) = c.call(&chrome.user, Method::GET, "/sessions").await;
    let (_, users) = c.call(&chrome.user, Method::GET, "/users").await;
    let (_, cluster) = c.call(&chrome.user, Method::GET, "/cluster").await;
    let users = users.as_array().cloned().unwrap_or_default();
    let o = pages::Overview {
        live_sessions: sessions.as_array().map_or(0, Vec::len),
        users: users.len(),
        disabled_users: users.iter().filter(|u| *at(u, "active") == false).count(),
        nodes: at(&cluster, "nodes")
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|n| {
                        (
                            at(n, "node_id").as_str().unwrap_or_default().to_string(),
                            at(n, "address").as_str().unwrap_or_default().to_string(),
                            at(n, "heartbeat_age_secs").as_i64().unwrap_or(-1),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    html(StatusCode::OK, pages::overview(&chrome, &o))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

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
struct Find {
    #[serde(default)]
    q: String,
}

async fn users(
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

async fn user(
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
    let page = UserPage {
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
struct DisableForm {
    csrf: String,
    #[serde(default)]
    confirm: Option<String>,
}

async fn disable(
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
struct KillForm {
    csrf: String,
    #[serde(default)]
    user: String,
}

async fn kill(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Form(f): Form<KillForm>,
) -> Response {
    let chrome = match c.gate_post(&headers, Action::KillSession, &f.csrf).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let (status, answer) = c
        .call(&chrome.user, Method::POST, &format!("/sessions/{id}/kill"))
        .await;
    if !status.is_success() {
        return html(
            status,
            pages::message(Some(&chrome), "Not ended", &error_text(&answer)),
        );
    }
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

/// The audit form's fields that are filled in, in the form's order.
fn audit_fields(raw: Vec<(String, String)>) -> Vec<(String, String)> {
    pages::AUDIT_FIELDS
        .iter()
        .filter_map(|(name, _)| {
            raw.iter()
                .find(|(k, v)| k == name && !v.trim().is_empty())
                .map(|(k, v)| (k.clone(), v.trim().to_string()))
        })
        .collect()
}

async fn search(
    c: &Console,
    chrome: &Chrome,
    fields: &[(String, String)],
    limit: u64,
) -> Result<(Vec<String>, Vec<Vec<Value>>), String> {
    let mut params = fields.to_vec();
    params.push(("limit".into(), limit.to_string()));
    let query = serde_urlencoded::to_string(&params).map_err(|e| e.to_string())?;
    let (status, answer) = c
        .call(&chrome.user, Method::GET, &format!("/audit/events?{query}"))
        .await;
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

async fn audit(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    raw: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let chrome = match c.gate(&headers, Action::ReadAudit).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let raw = raw.map(|Query(q)| q).unwrap_or_default();
    let fields = audit_fields(raw.clone());
    let submitted = !raw.is_empty();
    let result = if submitted {
        Some(search(&c, &chrome, &fields, PAGE_ROWS).await)
    } else {
        None
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
                next_until: None,
            },
        ),
    )
}

async fn audit_csv(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    raw: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let chrome = match c.gate(&headers, Action::ReadAudit).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let fields = audit_fields(raw.map(|Query(q)| q).unwrap_or_default());
    match search(&c, &chrome, &fields, CSV_ROWS).await {
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

#[derive(Deserialize, Default)]
struct ExplainQuery {
    #[serde(default)]
    user: String,
    #[serde(default)]
    dst: String,
    #[serde(default)]
    at: String,
    #[serde(default)]
    mfa: Option<String>,
    #[serde(default)]
    auth_age: String,
}

/// The question of the explain form, with the user's groups, tags and temporary grants
/// as the gateway holds them now; or why it cannot be asked.
async fn explain_question(
    c: &Console,
    chrome: &Chrome,
    q: &ExplainQuery,
) -> Result<
    (
        portcullis_policy::explain::Question,
        Vec<portcullis_access::AccessRequest>,
    ),
    String,
> {
    let dst = portcullis_policy::testing::parse_destination(q.dst.trim())
        .map_err(|e| format!("destination {:?}: {e}", q.dst))?;
    let when = match q.at.trim() {
        "" => chrono::Utc::now(),
        t => chrono::DateTime::parse_from_rfc3339(t)
            .map_err(|e| format!("at {t:?}: {e}"))?
            .to_utc(),
    };
    let auth_age = match q.auth_age.trim() {
        "" => None,
        t => Some(
            t.parse::<u32>()
                .map_err(|e| format!("seconds since sign-on {t:?}: {e}"))?,
        ),
    };
    let (_, users) = c.call(&chrome.user, Method::GET, "/users").await;
    let user = q.user.trim();
    let found = users
        .as_array()
        .and_then(|a| a.iter().find(|u| at(u, "name") == user))
        .ok_or_else(|| format!("no user {user:?}"))?;
    let query = serde_urlencoded::to_string([("user", user), ("state", "approved")])
        .map_err(|e| e.to_string())?;
    let (_, requests) = c
        .call(
            &chrome.user,
            Method::GET,
            &format!("/access-requests?{query}"),
        )
        .await;
    let granted: Vec<portcullis_access::AccessRequest> =
        serde_json::from_value(at(&requests, "requests").clone()).unwrap_or_default();
    let principal = portcullis_model::Principal {
        // As `portcullis policy explain` names it.
        email: format!("{user}@example.com"),
        name: user.to_string(),
        groups: strings(at(found, "groups")),
        tags: strings(at(found, "tags")),
    };
    Ok((
        portcullis_policy::explain::Question {
            principal,
            dst,
            at: when,
            mfa: q.mfa.as_deref() == Some("yes"),
            auth_age,
            grants: granted
                .iter()
                .filter_map(portcullis_access::AccessRequest::grant)
                .collect(),
        },
        granted,
    ))
}

async fn explain(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    q: Result<Query<ExplainQuery>, QueryRejection>,
) -> Response {
    let chrome = match c.gate(&headers, Action::Explain).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let form = pages::ExplainForm {
        user: q.user.clone(),
        dst: q.dst.clone(),
        at: q.at.clone(),
        mfa: q.mfa.as_deref() == Some("yes"),
        auth_age: q.auth_age.clone(),
    };
    if q.user.trim().is_empty() && q.dst.trim().is_empty() {
        return html(StatusCode::OK, pages::explain(&chrome, &form, None));
    }
    let answer = match explain_question(&c, &chrome, &q).await {
        Err(e) => Err(e),
        Ok((question, granted)) => {
            match portcullis_control::ask(&c.commands, portcullis_control::Command::Policy).await {
                Err(e) => Err(e.to_string()),
                Ok(bundle) => portcullis_policy::explain::explain(bundle, &question, &|id| {
                    granted.iter().find(|r| r.id == id).map(|r| {
                        serde_json::json!({
                            "id": id, "effect": "permit", "temporary_grant": true,
                            "approved_by": r.decided_by, "ends_at": r.ends_at, "reason": r.reason,
                        })
                    })
                })
                .map_err(|e| e.to_string()),
            }
        }
    };
    let status = if answer.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    html(
        status,
        pages::explain(&chrome, &form, Some(answer.as_ref().map_err(Clone::clone))),
    )
}

/// The policy set as `GET /policies` answers it: version, the files, the running set.
async fn policy_set(
    c: &Console,
    chrome: &Chrome,
) -> Result<
    (
        String,
        crate::policy_api::PolicyFiles,
        Vec<pages::RunningPolicy>,
    ),
    Response,
> {
    let (status, v) = c.call(&chrome.user, Method::GET, "/policies").await;
    if !status.is_success() {
        return Err(html(
            StatusCode::BAD_GATEWAY,
            pages::message(Some(chrome), "Policies", &error_text(&v)),
        ));
    }
    let files: crate::policy_api::PolicyFiles = serde_json::from_value(at(&v, "files").clone())
        .map_err(|e| {
            html(
                StatusCode::BAD_GATEWAY,
                pages::message(Some(chrome), "Policies", &e.to_string()),
            )
        })?;
    let running = at(&v, "running")
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| pages::RunningPolicy {
                    id: at(p, "id").as_str().unwrap_or_default().to_string(),
                    effect: at(p, "effect").as_str().unwrap_or_default().to_string(),
                    file: at(p, "file").as_str().unwrap_or_default().to_string(),
                    line: at(p, "line").as_u64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((
        at(&v, "version").as_str().unwrap_or_default().to_string(),
        files,
        running,
    ))
}

async fn policies(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let chrome = match c.gate(&headers, Action::ReadPolicies).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let (version, files, running) = match policy_set(&c, &chrome).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut shown: Vec<(String, String)> = files.policies.into_iter().collect();
    if let Some(n) = files.networks {
        shown.push((portcullis_policy::NETWORKS_FILE.to_string(), n));
    }
    html(
        StatusCode::OK,
        pages::policies(&chrome, &version, &shown, &running),
    )
}

#[derive(Deserialize, Default)]
struct EditQuery {
    #[serde(default)]
    file: String,
}

async fn policy_editor(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    q: Result<Query<EditQuery>, QueryRejection>,
) -> Response {
    let chrome = match c.gate(&headers, Action::EditPolicies).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let file = q.map(|Query(q)| q.file).unwrap_or_default();
    let (version, files, _) = match policy_set(&c, &chrome).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match files.policies.get(&file) {
        Some(text) => html(
            StatusCode::OK,
            pages::policy_edit(&chrome, &file, &version, text, None),
        ),
        None => html(
            StatusCode::NOT_FOUND,
            pages::message(
                Some(&chrome),
                "No such file",
                &format!("no policy file {file:?}"),
            ),
        ),
    }
}

#[derive(Deserialize)]
struct EditForm {
    csrf: String,
    file: String,
    version: String,
    text: String,
    step: String,
}

fn problems_of(v: &Value) -> Vec<pages::Problem> {
    at(v, "errors")
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| pages::Problem {
                    file: at(p, "file").as_str().unwrap_or_default().to_string(),
                    line: at(p, "line")
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .unwrap_or(0),
                    col: at(p, "col")
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .unwrap_or(0),
                    message: at(p, "message").as_str().unwrap_or_default().to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The policy tests (`[policy] dir`/tests) against the edited set.
async fn run_tests(
    c: &Console,
    files: &crate::policy_api::PolicyFiles,
) -> Vec<(String, Option<String>)> {
    let bundle = match crate::policy_api::build(&c.policy_dir, files, Vec::new()).await {
        Ok(Ok(b)) => Arc::new(b),
        _ => return Vec::new(),
    };
    let dir = c.policy_dir.clone();
    tokio::task::spawn_blocking(move || match portcullis_policy::testing::load_cases(&dir) {
        Ok(cases) => cases
            .iter()
            .map(|case| {
                let o = portcullis_policy::testing::run_case(&bundle, case, chrono::Utc::now());
                (case.name.clone(), o.failure)
            })
            .collect(),
        Err(errors) => errors
            .iter()
            .map(|e| ("the test files".to_string(), Some(e.to_string())))
            .collect(),
    })
    .await
    .unwrap_or_default()
}

async fn policy_submit(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<EditForm>,
) -> Response {
    let chrome = match c.gate_post(&headers, Action::EditPolicies, &f.csrf).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let (current_version, files, _) = match policy_set(&c, &chrome).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(running_text) = files.policies.get(&f.file).cloned() else {
        return html(
            StatusCode::NOT_FOUND,
            pages::message(
                Some(&chrome),
                "No such file",
                &format!("no policy file {:?}", f.file),
            ),
        );
    };
    // Browsers send a textarea's lines with CRLF.
    let text = f.text.replace("\r\n", "\n");
    let mut edited = files.clone();
    edited.policies.insert(f.file.clone(), text.clone());
    let body = match serde_json::to_value(&edited) {
        Ok(b) => b,
        Err(e) => {
            return html(
                StatusCode::INTERNAL_SERVER_ERROR,
                pages::message(Some(&chrome), "Policies", &e.to_string()),
            )
        }
    };
    let diff: Vec<(char, String)> = portcullis_console::diff::lines(&running_text, &text)
        .into_iter()
        .map(|l| match l {
            portcullis_console::diff::Line::Same(x) => (' ', x.to_string()),
            portcullis_console::diff::Line::Removed(x) => ('-', x.to_string()),
            portcullis_console::diff::Line::Added(x) => ('+', x.to_string()),
        })
        .collect();
    let mut checked = pages::Checked::default();
    let mut version = f.version.clone();
    let mut status = StatusCode::OK;
    if f.step == "apply" {
        let (s, v) = c
            .call_with(
                &chrome.user,
                Method::PUT,
                "/policies",
                Some(&body),
                Some(&f.version),
            )
            .await;
        if s.is_success() {
            version = at(&v, "version").as_str().unwrap_or_default().to_string();
            checked.note = Some((
                true,
                format!(
                    "Applied: version {version}; {} flows the new set denies were cut.",
                    at(&v, "flows_cut")
                ),
            ));
        } else {
            status = s;
            checked.problems = problems_of(&v);
            let why = if s == StatusCode::PRECONDITION_FAILED {
                format!(
                    "Not applied: the policies changed since you opened the editor (now version {current_version}). Reload, then apply your change again."
                )
            } else {
                format!("Not applied: {}", error_text(&v))
            };
            checked.note = Some((false, why));
            checked.diff = diff;
        }
    } else {
        let (s, v) = c
            .call_with(
                &chrome.user,
                Method::POST,
                "/policies/validate",
                Some(&body),
                None,
            )
            .await;
        if !s.is_success() {
            status = s;
            checked.note = Some((false, error_text(&v)));
        } else if *at(&v, "valid") == false {
            status = StatusCode::UNPROCESSABLE_ENTITY;
            checked.problems = problems_of(&v);
        } else {
            checked.tests = run_tests(&c, &edited).await;
            checked.diff = diff;
            if current_version != f.version {
                checked.note = Some((
                    false,
                    format!("The policies changed since you opened the editor (now version {current_version}): applying will be refused."),
                ));
            } else {
                checked.note = Some((true, "Valid.".to_string()));
            }
        }
    }
    html(
        status,
        pages::policy_edit(&chrome, &f.file, &version, &text, Some(&checked)),
    )
}
