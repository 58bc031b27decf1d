//! The policy files and their editor, and explain.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use portcullis_console::pages::{self, Chrome};
use portcullis_console::Action;
use serde::Deserialize;
use serde_json::Value;

use super::{at, error_text, html, pick, strings, Console};

#[derive(Deserialize, Default)]
pub(super) struct ExplainQuery {
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

pub(super) async fn explain(
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

pub(super) async fn policies(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
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
    // Who replaced the set, newest first (the audit trail's policy-changes report).
    let (_, changes) = c
        .call(
            &chrome.user,
            Method::GET,
            "/audit/reports/policy-changes?limit=20",
        )
        .await;
    let history: Vec<(String, String, String, String)> =
        pick(&changes, &["at", "changed_by", "outcome", "version"])
            .into_iter()
            .map(|r| match r.as_slice() {
                [when, by, outcome, version] => {
                    (when.clone(), by.clone(), outcome.clone(), version.clone())
                }
                _ => Default::default(),
            })
            .collect();
    html(
        StatusCode::OK,
        pages::policies(&chrome, &version, &shown, &running, &history),
    )
}

#[derive(Deserialize, Default)]
pub(super) struct EditQuery {
    #[serde(default)]
    file: String,
}

pub(super) async fn policy_editor(
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
pub(super) struct EditForm {
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
    bundle: portcullis_policy::PolicyBundle,
) -> Vec<(String, Option<String>)> {
    let bundle = Arc::new(bundle);
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

pub(super) async fn policy_submit(
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
        // Validated as `POST /policies/validate` does (the cluster's sites included),
        // once: the same bundle runs the tests.
        match crate::policy_api::build(&c.policy_dir, &edited, c.sites.clone()).await {
            Err(e) => {
                status = e.0;
                checked.note = Some((false, e.1));
            }
            Ok(Err(problems)) => {
                status = StatusCode::UNPROCESSABLE_ENTITY;
                checked.problems = problems
                    .into_iter()
                    .map(|p| pages::Problem {
                        file: p.file,
                        line: p.line,
                        col: p.col,
                        message: p.message,
                    })
                    .collect();
            }
            Ok(Ok(bundle)) => {
                checked.tests = run_tests(&c, bundle).await;
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
    }
    html(
        status,
        pages::policy_edit(&chrome, &f.file, &version, &text, Some(&checked)),
    )
}
