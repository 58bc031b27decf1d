//! Signing in and out: the SP metadata, the SP-initiated login, the IdP's answer at the
//! ACS (which renews the user's devices with the sign-on), and logout.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Form, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{TimeDelta, Utc};
use portcullis_identity::SignOn;
use portcullis_model::Event;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::html::{esc, local_path, page, remote, see_other, too_many, unavailable};
use super::{PendingLogin, Sso, COOKIE};
use crate::serve::Peer;

pub(super) async fn metadata(State(sso): State<Arc<Sso>>) -> Response {
    let xml = match sso.sp.lock().as_deref() {
        Ok(Some(sp)) => sp.metadata_xml(),
        _ => return unavailable(),
    };
    match xml {
        Ok(x) => ([(header::CONTENT_TYPE, "application/samlmetadata+xml")], x).into_response(),
        Err(e) => page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Metadata unavailable",
            &esc(&e.to_string()),
        ),
    }
}

#[derive(Deserialize)]
pub(super) struct LoginQuery {
    #[serde(rename = "return")]
    return_to: Option<String>,
}

pub(super) async fn login(
    State(sso): State<Arc<Sso>>,
    ci: ConnectInfo<Peer>,
    Query(q): Query<LoginQuery>,
) -> Response {
    if !sso.allowed(remote(ci)) {
        return too_many();
    }
    let back = q
        .return_to
        .and_then(|r| local_path(&r).map(str::to_string))
        .unwrap_or_else(|| "/enroll".into());
    let mut random = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut random);
    let now = Utc::now();
    let (url, lifetime) = match sso.sp.lock().as_deref_mut() {
        Ok(Some(sp)) => (
            sp.handle_login_start(&back, random, now),
            sp.config().request_lifetime,
        ),
        _ => return unavailable(),
    };
    if let (Ok(_), Some(shared)) = (&url, &sso.shared) {
        // Any node may receive the IdP's answer.
        let id = portcullis_saml::request_id(&random);
        if let Err(e) = shared
            .offer("saml-request", &id, &back, now + lifetime)
            .await
        {
            tracing::error!("saml: login not recorded in the cluster: {e}");
            return unavailable();
        }
    }
    match url {
        Ok(u) => see_other(&u),
        Err(e) => page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Sign-in unavailable",
            &esc(&e.to_string()),
        ),
    }
}

#[derive(Deserialize)]
pub(super) struct AcsForm {
    #[serde(rename = "SAMLResponse")]
    saml_response: String,
    #[serde(rename = "RelayState", default)]
    _relay_state: Option<String>,
}

/// A refused sign-on: logged, recorded (durable before the page goes out), answered 403.
pub(super) async fn refused_login(sso: &Sso, ip: IpAddr, user: String, reason: String) -> Response {
    tracing::warn!(%ip, user = %user, "saml login refused: {reason}");
    sso.report(Event::LoginFailed {
        user,
        method: "saml".into(),
        reason: reason.clone(),
        remote: Some(ip.to_string()),
    })
    .await;
    page(
        StatusCode::FORBIDDEN,
        "Sign-in refused",
        &format!(
            "<p class=\"error\">{}</p><p><a href=\"/saml/login\">Sign in again</a></p>",
            esc(&reason)
        ),
    )
}
pub(super) async fn acs(
    State(sso): State<Arc<Sso>>,
    ci: ConnectInfo<Peer>,
    form: Result<Form<AcsForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let ip = remote(ci);
    if !sso.allowed(ip) {
        return too_many();
    }
    let refusing = sso.clone();
    let refuse = move |user: &str, reason: String| {
        let user = user.to_string();
        let sso = refusing.clone();
        async move { refused_login(&sso, ip, user, reason).await }
    };
    let form = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            return refuse(
                "",
                format!("the form is not a SAML POST: {}", e.body_text()),
            )
            .await
        }
    };
    let now = Utc::now();
    if let Err(r) = sso.import_pending().await {
        return r;
    }
    let verdict = match sso.sp.lock().as_deref_mut() {
        Ok(Some(sp)) => sp.handle_acs(&form.saml_response, now),
        _ => return unavailable(),
    };
    let login = match verdict {
        Ok(l) => l,
        Err(e) => return refuse("", e.to_string()).await,
    };
    if let Err(reason) = sso.use_up(&login).await {
        return refuse(&login.user, reason).await;
    }
    let cap = now + TimeDelta::seconds(i64::try_from(sso.config.login_max_secs).unwrap_or(43_200));
    let until = login.session_not_on_or_after.map_or(cap, |t| t.min(cap));
    if until <= now {
        return refuse(&login.user, "the IdP's session has already ended".into()).await;
    }
    // The sign-on the policies see: when the IdP authenticated the user (a reused IdP
    // session is as old as it is), and whether it said a second factor was used.
    let sign_on = SignOn {
        at: login.authn_instant.unwrap_or(now).timestamp(),
        mfa: sso
            .mfa
            .idp_asserted(&login.authn_context_class_refs, &login.mfa_attribute_values),
    };
    let back = login
        .relay_state
        .as_deref()
        .and_then(local_path)
        .unwrap_or("/enroll")
        .to_string();
    if !sign_on.mfa && sso.mfa.totp {
        match sso.totp_enrolled(&login.user).await {
            // Fail closed: whether the user has a second factor must be known.
            Err(reason) => return refuse(&login.user, reason).await,
            Ok(enrolled) if enrolled || sso.mfa.required => {
                // Nothing is renewed yet: the code first (or, when one is required, the
                // enrollment of an authenticator), on a short pending session.
                let pending_until = (now + TimeDelta::minutes(10)).min(until);
                let Some(token) = sso
                    .open_session(
                        &login.user,
                        pending_until,
                        sign_on,
                        &login.groups,
                        Some(PendingLogin { until, back }),
                    )
                    .await
                else {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                };
                return with_cookie(&sso, see_other("/mfa"), &token, pending_until - now);
            }
            Ok(_) => {}
        }
    }
    if sso.mfa.required && !sign_on.mfa {
        // Fail closed: nothing is renewed or enrolled by a sign-on without one.
        return refuse(
            &login.user,
            "this gateway requires a second factor, and the IdP's sign-on did not use one".into(),
        )
        .await;
    }
    finish_login(
        &sso,
        ip,
        &login.user,
        &login.groups,
        until,
        sign_on,
        &back,
        "saml",
    )
    .await
}

/// Sets the session cookie on `r`.
pub(super) fn with_cookie(sso: &Sso, mut r: Response, token: &str, max_age: TimeDelta) -> Response {
    let secure = if sso.secure_cookie { "; Secure" } else { "" };
    let max_age = max_age.num_seconds().max(1);
    if let Ok(v) =
        format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}")
            .parse()
    {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// Completes a sign-on: the user's devices renewed with `sign_on` (open flows re-decided
/// with it), a login session until `until`, `login_succeeded`, and the browser sent
/// `back`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn finish_login(
    sso: &Arc<Sso>,
    ip: IpAddr,
    user: &str,
    groups: &[String],
    until: chrono::DateTime<Utc>,
    sign_on: SignOn,
    back: &str,
    method: &str,
) -> Response {
    let now = Utc::now();
    let owner = match sso
        .identity
        .login("saml", user, groups, until, sign_on, Instant::now(), now)
        .await
    {
        Ok(o) => o,
        Err(e) => return refused_login(sso, ip, user.to_string(), e.to_string()).await,
    };
    let Some(token) = sso
        .open_session(&owner.user_name, until, sign_on, groups, None)
        .await
    else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    sso.report(Event::LoginSucceeded {
        user: owner.user_name.clone(),
        method: method.into(),
        remote: Some(ip.to_string()),
    })
    .await;
    tracing::info!(user = %owner.user_name, %ip, until = %until, mfa = sign_on.mfa, method, "saml login");
    with_cookie(sso, see_other(back), &token, until - now)
}

/// Sessions are kept under the SHA-256 of their cookie, never the cookie itself.
pub(super) fn session_key(cookie_value: &str) -> [u8; 32] {
    Sha256::digest(cookie_value.as_bytes()).into()
}

pub(super) async fn logout(State(sso): State<Arc<Sso>>, headers: HeaderMap) -> Response {
    if let Err(answer) = sso.end_session(&headers).await {
        return answer;
    }
    let mut r = page(
        StatusCode::OK,
        "Signed out",
        "<p>You are signed out of this gateway. Your devices keep working until they expire.</p><p><a href=\"/saml/login\">Sign in</a></p>",
    );
    if let Ok(v) = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0").parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}
