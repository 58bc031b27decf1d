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
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use portcullis_console::pages::{self, Chrome};
use portcullis_console::{Action, RoleGroups, Roles};
use serde_json::Value;
use subtle::ConstantTimeEq as _;
use tower::ServiceExt as _;

use crate::api::Actor;
use crate::sso::Sso;

mod audit;
mod links;
mod policies;
mod users;

pub(crate) use links::mint as mint_link;
pub use links::Links;

use audit::{audit, audit_csv, verify};
use policies::{explain, policies, policy_editor, policy_submit};
use users::{disable, kill, remove_device, rotate_device, sessions_devices, user, users};

/// Rows on one page of an audit search.
const PAGE_ROWS: u64 = 100;
/// Rows in one CSV export at most.
const CSV_ROWS: u64 = 100_000;
/// Console sessions remembered for their idle time at most (the oldest go first).
const MAX_TRACKED: usize = 10_000;

const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub(crate) struct Console {
    sso: Arc<Sso>,
    /// The admin API's routes without their authentication.
    api: Router,
    groups: RoleGroups,
    /// `[[cluster.sites]]`, for validating an edited set.
    sites: Vec<String>,
    /// `[policy] dir`: the policy tests the editor runs.
    policy_dir: std::path::PathBuf,
    /// Break-glass sign-in links.
    links: Arc<Links>,
    /// With `[scim]`: when SCIM last answered a call successfully (Unix seconds, 0: never).
    scim_last_call: Option<Arc<std::sync::atomic::AtomicI64>>,
    /// The packet loop's latest numbers (the overview).
    metrics: Arc<crate::metrics::Metrics>,
    /// To the packet loop: the running policy set (explain).
    commands: tokio::sync::mpsc::Sender<portcullis_control::Command>,
    idle: Duration,
    /// Session key → last request.
    seen: Mutex<HashMap<[u8; 32], Instant>>,
}

/// What the console is made of, from the control plane.
pub(crate) struct Parts {
    pub sso: Arc<Sso>,
    /// The admin API's routes without their authentication.
    pub api: Router,
    pub commands: tokio::sync::mpsc::Sender<portcullis_control::Command>,
    pub policy_dir: std::path::PathBuf,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub links: Arc<Links>,
    pub scim_last_call: Option<Arc<std::sync::atomic::AtomicI64>>,
    /// `[[cluster.sites]]`: a policy set naming another site does not validate.
    pub sites: Vec<String>,
}

impl Console {
    pub(crate) fn new(c: &portcullis_config::ConsoleConfig, p: Parts) -> Arc<Console> {
        Arc::new(Console {
            links: p.links,
            scim_last_call: p.scim_last_call,
            sites: p.sites,
            policy_dir: p.policy_dir,
            metrics: p.metrics,
            sso: p.sso,
            api: p.api,
            commands: p.commands,
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

    /// A form's action: the checks of [`Console::gate_post`], then the admin API route;
    /// the user and the API's answer, or the page to show (`failed` titles a refusal).
    async fn act(
        &self,
        headers: &HeaderMap,
        action: Action,
        csrf: &str,
        (method, uri, body): (Method, &str, Option<&Value>),
        failed: &str,
    ) -> Result<(Chrome, Value), Response> {
        let chrome = self.gate_post(headers, action, csrf).await?;
        let (status, answer) = self.call_with(&chrome.user, method, uri, body, None).await;
        if !status.is_success() {
            return Err(html(
                status,
                pages::message(Some(&chrome), failed, &error_text(&answer)),
            ));
        }
        Ok((chrome, answer))
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

/// The named columns of a query's answer (`{"columns", "rows"}`), as text, row by row;
/// nothing when a column is missing.
fn pick(table: &Value, names: &[&str]) -> Vec<Vec<String>> {
    let columns = strings(at(table, "columns"));
    let Some(index): Option<Vec<usize>> = names
        .iter()
        .map(|n| columns.iter().position(|c| c == n))
        .collect()
    else {
        return Vec::new();
    };
    at(table, "rows")
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    index
                        .iter()
                        .map(|i| {
                            r.get(*i)
                                .map(portcullis_console::csv::cell_text)
                                .unwrap_or_default()
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default()
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
        .route("/console/console.js", get(script))
        .route("/console/overview.json", get(overview_json))
        .route("/console/login-link", get(link_page).post(link_sign_in))
        .route("/console/users", get(users))
        .route("/console/users/{name}", get(user))
        .route("/console/users/{name}/disable", post(disable))
        .route("/console/sessions/{id}/kill", post(kill))
        .route("/console/devices", get(sessions_devices))
        .route("/console/devices/{id}/rotate", post(rotate_device))
        .route("/console/devices/{id}/remove", post(remove_device))
        .route("/console/audit", get(audit))
        .route("/console/audit.csv", get(audit_csv))
        .route("/console/audit/verify", get(verify))
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

/// The overview's live numbers, by key (the page's `data-live` elements).
fn live_numbers(c: &Console) -> Vec<(&'static str, &'static str, String)> {
    let s = c.metrics.latest();
    let r = c.metrics.rates();
    let ms = |q: f64| {
        s.revocation_latency
            .quantile_bound_secs(q)
            .map_or_else(|| "-".to_string(), |v| format!("≤ {:.1} ms", v * 1e3))
    };
    vec![
        ("sessions", "Live sessions", s.sessions.to_string()),
        ("flows", "Open flows", s.flows.to_string()),
        (
            "flows_per_sec",
            "New flows per second",
            format!("{:.1}", r.flows_per_sec),
        ),
        (
            "denies_per_min",
            "Denied packets per minute",
            format!("{:.1}", r.denies_per_min),
        ),
        (
            "revocations",
            "Revocations since start",
            s.revocation_latency.count().to_string(),
        ),
        ("revocation_p99", "Revocation latency p99", ms(0.99)),
        (
            "audit_backlog",
            "Audit events not yet in ClickHouse",
            s.audit_backlog.to_string(),
        ),
        ("audit_lag_ms", "Audit lag (ms)", s.audit_lag_ms.to_string()),
        (
            "audit_refused",
            "Audit events refused (spool full)",
            s.audit_refused.to_string(),
        ),
    ]
}

async fn overview(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let chrome = match c.gate(&headers, Action::ReadOverview).await {
        Ok(ch) => ch,
        Err(r) => return r,
    };
    let (_, users) = c.call(&chrome.user, Method::GET, "/users").await;
    let (_, cluster) = c.call(&chrome.user, Method::GET, "/cluster").await;
    let (ldap_status, ldap) = c.call(&chrome.user, Method::GET, "/ldap").await;
    let (_, revoked) = c
        .call(
            &chrome.user,
            Method::GET,
            "/audit/reports/revocations?since=24h&limit=5",
        )
        .await;
    let users = users.as_array().cloned().unwrap_or_default();
    let mut sources = Vec::new();
    if let Some(last) = &c.scim_last_call {
        let at = last.load(std::sync::atomic::Ordering::Relaxed);
        let text = match chrono::DateTime::from_timestamp(at, 0).filter(|_| at > 0) {
            Some(t) => format!(
                "last successful call {} ({} s ago)",
                t.to_rfc3339(),
                (chrono::Utc::now() - t).num_seconds().max(0)
            ),
            None => "no call since the gateway started".to_string(),
        };
        sources.push(("SCIM".to_string(), text));
    }
    if ldap_status.is_success() {
        let state = match (
            at(&ldap, "connected").as_bool(),
            at(&ldap, "live").as_bool(),
        ) {
            (Some(true), Some(true)) => "connected, live",
            (Some(true), _) => "connected, refreshing",
            _ => "not connected",
        };
        let mut text = format!(
            "{state}; {} users, {} groups; last pass {}",
            at(&ldap, "users"),
            at(&ldap, "groups"),
            at(&ldap, "last_pass_at").as_str().unwrap_or("never")
        );
        if let Some(e) = at(&ldap, "last_error").as_str() {
            text.push_str(&format!("; last error: {e}"));
        }
        if let Some(r) = at(&ldap, "refused").as_str() {
            text.push_str(&format!("; a refused mass removal waits for approval: {r}"));
        }
        sources.push(("LDAP".to_string(), text));
    }
    // Newest first.
    let revocations = pick(&revoked, &["at", "user", "cut_latency_us"])
        .into_iter()
        .map(|r| match r.as_slice() {
            [when, user, us] => (
                when.clone(),
                user.clone(),
                us.parse::<u64>()
                    .map_or_else(|_| String::new(), |us| format!("{:.1} ms", us as f64 / 1e3)),
            ),
            _ => Default::default(),
        })
        .collect();
    let o = pages::Overview {
        users: users.len(),
        disabled_users: users.iter().filter(|u| *at(u, "active") == false).count(),
        live: live_numbers(&c),
        revocations,
        sources,
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

/// The overview's live numbers as JSON, for the page's script.
async fn overview_json(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Err(r) = c.gate(&headers, Action::ReadOverview).await {
        return r;
    }
    let map: serde_json::Map<String, Value> = live_numbers(&c)
        .into_iter()
        .map(|(k, _, v)| (k.to_string(), Value::String(v)))
        .collect();
    axum::Json(Value::Object(map)).into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        pages::SCRIPT,
    )
        .into_response()
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

#[derive(serde::Deserialize, Default)]
struct LinkParams {
    #[serde(default)]
    t: String,
    #[serde(default, rename = "as")]
    name: String,
}

/// A break-glass link opened: a button, so that a link scanner fetching the URL does not
/// use it up.
async fn link_page(
    q: Result<axum::extract::Query<LinkParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = q.map(|axum::extract::Query(q)| q).unwrap_or_default();
    html(StatusCode::OK, pages::link_sign_in(&q.t, &q.name))
}

async fn link_sign_in(
    State(c): State<Arc<Console>>,
    ci: axum::extract::ConnectInfo<crate::serve::Peer>,
    axum::extract::Form(f): axum::extract::Form<LinkParams>,
) -> Response {
    let ip = ci.0 .0.ip();
    let refused = |why: &str| {
        html(
            StatusCode::FORBIDDEN,
            pages::message(None, "Sign-in link", why),
        )
    };
    match c.links.redeem(&f.t, &f.name).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(user = %f.name, %ip, "console: an unknown, used or expired sign-in link");
            return refused("This sign-in link is unknown, used or expired. Ask for a new one.");
        }
        Err(e) => {
            return html(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::message(None, "Sign-in link", &e),
            )
        }
    }
    // The user's groups as the gateway holds them now (the IdP may be down).
    let (_, users) = c.call("break-glass", Method::GET, "/users").await;
    let Some(found) = users.as_array().and_then(|a| {
        a.iter()
            .find(|u| at(u, "name") == f.name.as_str() && *at(u, "active") == true)
    }) else {
        return refused("The user of this link is not an active user.");
    };
    let groups = strings(at(found, "groups"));
    let mut answer = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str("/console") {
        answer.headers_mut().insert(header::LOCATION, v);
    }
    match c
        .sso
        .open_link_session(&f.name, &groups, ip, answer, links::LINK_SESSION)
        .await
    {
        Some(r) => {
            tracing::warn!(user = %f.name, %ip, "console: signed in with a break-glass link");
            r
        }
        None => html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::message(
                None,
                "Sign-in link",
                "the session could not be stored; try again",
            ),
        ),
    }
}
