//! Just-in-time access on the sign-on pages, for the signed-in user:
//! - `GET /access`: their requests with their state and window, the request form (the
//!   declared networks), and, for someone the `approve_access` policies allow, the pending
//!   requests of others they may decide;
//! - `POST /access/request`: files a request for themselves;
//! - `POST /access/decide`: approves or denies one (as themselves, with their sign-on:
//!   a policy may ask approvers for a recent second factor);
//! - `POST /access/revoke`: withdraws their own request or ends their own grant early.
//!
//! Every form carries the session's CSRF token (compared in constant time); every check
//! is the server's (the same `AccessService` as the admin API): the page only offers.

use std::sync::Arc;

use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use portcullis_access::{
    parse_dst, parse_duration, AccessRequest, NewRequest, PortSpec, State as Stage,
};
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

use super::html::{esc, page, see_other, when};
use super::{Sso, WebSession};

fn not_enabled() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Access requests",
        "<p>Access requests are not enabled on this gateway.</p>",
    )
}

fn refused(title: &str, msg: &str) -> Response {
    page(
        StatusCode::BAD_REQUEST,
        title,
        &format!(
            "<p class=\"error\">{}</p><p><a href=\"/access\">Back</a></p>",
            esc(msg)
        ),
    )
}

fn csrf_ok(s: &WebSession, sent: &str) -> bool {
    bool::from(sent.as_bytes().ct_eq(s.csrf.as_bytes()))
}

/// A form with the session's CSRF token.
trait Posted {
    fn csrf(&self) -> &str;
}

/// What every POST here checks first: a login session, the service, a readable form with
/// the session's CSRF token. `Err` is the page to answer instead.
async fn gate<'a, F: Posted>(
    sso: &'a Sso,
    headers: &HeaderMap,
    form: Result<Form<F>, axum::extract::rejection::FormRejection>,
    title: &str,
) -> Result<(WebSession, &'a Arc<crate::access::AccessService>, F), Box<Response>> {
    let Some(s) = sso.session(headers).await else {
        return Err(Box::new(see_other("/saml/login?return=/access")));
    };
    let Some(access) = sso.access.as_ref() else {
        return Err(Box::new(not_enabled()));
    };
    let f = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            return Err(Box::new(refused(
                title,
                &format!("the form: {}", e.body_text()),
            )))
        }
    };
    if !csrf_ok(&s, f.csrf()) {
        return Err(Box::new(refused(
            title,
            "the form is stale or was not sent from this page; reload it and try again",
        )));
    }
    Ok((s, access, f))
}

fn what(r: &AccessRequest) -> String {
    let mut t = esc(&r.network);
    if let Some(d) = r.dst {
        t.push_str(&format!(" {d}"));
    }
    if let Some(p) = r.port {
        t.push_str(&format!(" {p}"));
    }
    t
}

fn window(r: &AccessRequest) -> String {
    match (r.starts_at, r.ends_at) {
        (Some(s), Some(e)) => format!("{} → {}", when(s), when(e)),
        _ => format!("{} min once approved", r.duration_secs.div_ceil(60)),
    }
}

pub(super) async fn access_page(State(sso): State<Arc<Sso>>, headers: HeaderMap) -> Response {
    let Some(s) = sso.session(&headers).await else {
        return see_other("/saml/login?return=/access");
    };
    let Some(access) = sso.access.as_ref() else {
        return not_enabled();
    };
    let csrf = esc(&s.csrf);
    let mine: String = access
        .list(Some(&s.user))
        .iter()
        .map(|r| {
            let withdraw = if r.state.is_final() {
                String::new()
            } else {
                format!(
                    "<form method=\"post\" action=\"/access/revoke\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                     <input type=\"hidden\" name=\"id\" value=\"{id}\"><button type=\"submit\">{label}</button></form>",
                    id = esc(&r.id),
                    label = if r.state == Stage::Approved { "End now" } else { "Withdraw" },
                )
            };
            format!(
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{withdraw}</td></tr>",
                esc(&r.id),
                what(r),
                r.state,
                window(r),
                esc(r.decided_by.as_deref().unwrap_or("")),
                esc(&r.reason),
            )
        })
        .collect();
    let mine = if mine.is_empty() {
        "<p>No requests yet.</p>".to_string()
    } else {
        format!("<table><thead><tr><th>Id</th><th>For</th><th>State</th><th>Window</th><th>Decided by</th><th>Reason</th><th></th></tr></thead><tbody>{mine}</tbody></table>")
    };
    let networks: String =
        match portcullis_control::ask(&sso.commands, portcullis_control::Command::Policy).await {
            Ok(bundle) => bundle
                .networks()
                .iter()
                .map(|n| format!("<option value=\"{0}\">{0}</option>", esc(&n.name)))
                .collect(),
            Err(_) => String::new(),
        };
    let pending: String = access
        .decidable_by(&s.user, s.sign_on)
        .await
        .iter()
        .map(|r| {
            format!(
                "<tr><td><code>{id}</code></td><td>{user}</td><td>{what}</td><td>{window}</td><td>{reason}</td><td>\
                 <form method=\"post\" action=\"/access/decide\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <input type=\"hidden\" name=\"id\" value=\"{id}\">\
                 <input type=\"text\" name=\"reason\" placeholder=\"reason (to deny)\" maxlength=\"500\">\
                 <button type=\"submit\" name=\"decision\" value=\"approve\">Approve</button>\
                 <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form></td></tr>",
                id = esc(&r.id),
                user = esc(&r.user),
                what = what(r),
                window = window(r),
                reason = esc(&r.reason),
            )
        })
        .collect();
    let pending = if pending.is_empty() {
        String::new()
    } else {
        format!("<h2>Waiting for your decision</h2><table><thead><tr><th>Id</th><th>Who</th><th>For</th><th>How long</th><th>Reason</th><th></th></tr></thead><tbody>{pending}</tbody></table>")
    };
    page(
        StatusCode::OK,
        "Temporary access",
        &format!(
            "<p>Signed in as <strong>{user}</strong>. <a href=\"/enroll\">Your devices</a> · <a href=\"/saml/logout\">Sign out</a></p>\
             {pending}<h2>Your requests</h2>{mine}\
             <h2>Ask for access</h2>\
             <form method=\"post\" action=\"/access/request\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label for=\"network\">Network</label><select id=\"network\" name=\"network\" required>{networks}</select>\
             <label for=\"dst\">Only this address or range (optional)</label><input type=\"text\" id=\"dst\" name=\"dst\" maxlength=\"64\">\
             <label for=\"port\">Only this port (optional, e.g. 5432/tcp)</label><input type=\"text\" id=\"port\" name=\"port\" maxlength=\"16\">\
             <label for=\"duration\">For how long (e.g. 2h, 90m)</label><input type=\"text\" id=\"duration\" name=\"duration\" maxlength=\"16\" required>\
             <label for=\"reason\">Why (the approver and the audit trail see it)</label><input type=\"text\" id=\"reason\" name=\"reason\" maxlength=\"500\" required>\
             <p><button type=\"submit\">Ask</button></p></form>\
             <p>An approved request is a grant with a fixed end: your connections it allows are cut when it ends.</p>",
            user = esc(&s.user),
        ),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RequestForm {
    csrf: String,
    network: String,
    #[serde(default)]
    dst: String,
    #[serde(default)]
    port: String,
    duration: String,
    reason: String,
}

pub(super) async fn request(
    State(sso): State<Arc<Sso>>,
    headers: HeaderMap,
    form: Result<Form<RequestForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let title = "Request not filed";
    let (s, access, f) = match gate(&sso, &headers, form, title).await {
        Ok(g) => g,
        Err(answer) => return *answer,
    };
    let optional = |v: &str| (!v.trim().is_empty()).then(|| v.trim().to_string());
    let parsed = (|| -> Result<NewRequest, portcullis_access::AccessError> {
        Ok(NewRequest {
            user: s.user.clone(),
            network: f.network.trim().to_string(),
            dst: optional(&f.dst).as_deref().map(parse_dst).transpose()?,
            port: optional(&f.port)
                .as_deref()
                .map(str::parse::<PortSpec>)
                .transpose()?,
            duration_secs: parse_duration(f.duration.trim())?,
            reason: f.reason.trim().to_string(),
            filed_by: s.user.clone(),
        })
    })();
    let new = match parsed {
        Ok(n) => n,
        Err(e) => return refused(title, &e.to_string()),
    };
    match access.request(new).await {
        Ok(_) => see_other("/access"),
        Err(e) => refused(title, &e.1),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DecideForm {
    csrf: String,
    id: String,
    decision: String,
    #[serde(default)]
    reason: String,
}

pub(super) async fn decide(
    State(sso): State<Arc<Sso>>,
    headers: HeaderMap,
    form: Result<Form<DecideForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let title = "Not decided";
    let (s, access, f) = match gate(&sso, &headers, form, title).await {
        Ok(g) => g,
        Err(answer) => return *answer,
    };
    let r = match f.decision.as_str() {
        "approve" => access.approve(&f.id, &s.user, s.sign_on).await,
        "deny" if f.reason.trim().is_empty() => return refused(title, "a denial needs a reason"),
        "deny" => {
            access
                .deny(&f.id, &s.user, f.reason.trim(), s.sign_on)
                .await
        }
        _ => return refused(title, "the decision is approve or deny"),
    };
    match r {
        Ok(_) => see_other("/access"),
        Err(e) => page(
            e.0,
            title,
            &format!(
                "<p class=\"error\">{}</p><p><a href=\"/access\">Back</a></p>",
                esc(&e.1)
            ),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeForm {
    csrf: String,
    id: String,
}

pub(super) async fn revoke(
    State(sso): State<Arc<Sso>>,
    headers: HeaderMap,
    form: Result<Form<RevokeForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let title = "Not withdrawn";
    let (s, access, f) = match gate(&sso, &headers, form, title).await {
        Ok(g) => g,
        Err(answer) => return *answer,
    };
    // Only one's own: others' grants are ended by an administrator.
    if access.get(&f.id).is_none_or(|r| r.user != s.user) {
        return refused(title, &format!("you have no access request {}", f.id));
    }
    match access
        .revoke(&f.id, &s.user, "withdrawn by the requester")
        .await
    {
        Ok(_) => see_other("/access"),
        Err(e) => refused(title, &e.1),
    }
}

impl Posted for RequestForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

impl Posted for DecideForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

impl Posted for RevokeForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}
