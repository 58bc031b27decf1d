//! The second factor on the sign-on pages (`[mfa] totp`):
//! - `GET /mfa`: after the IdP's answer, for a user with an authenticator: the code form;
//!   for one without (when `[mfa] required`, or a signed-in user setting one up): a new
//!   secret as a QR code (`otpauth://`) and as text, and the code that confirms it;
//! - `POST /mfa`: checks the code (RFC 6238, ±1 step, each step accepted once, 5 failures
//!   per 15 minutes, counted in the stored record so on every node) or a recovery code
//!   (each once); on success the sign-on completes
//!   with `mfa = true` as of now (the user's devices renewed with it), and a first
//!   confirmation shows the ten recovery codes once.
//!
//! Stored per user in the identity store (records of kind [`KIND`], id the lower-case
//! user name, cluster-wide): `{"user", "sealed" (the secret sealed with `[mfa]
//! secret_key_file`, bound to the user), "confirmed", "last_step", "recovery" (hashes),
//! "updated_at", "failures" (Unix seconds)}`, replaced only over the body a check read
//! (a compare-and-swap, so a code is accepted once even on two nodes at once); an administrator's reset (`POST /admin/v1/users/{name}/reset-mfa`)
//! writes `{"user", "reset": true}`. Every refused code is `mfa_failed`, a confirmation
//! `mfa_enrolled`.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::Utc;
use portcullis_identity::{Expect, SignOn};
use portcullis_mfa::{verify_totp, Failures, MfaError, RecoveryCodes, TotpSecret};
use portcullis_model::Event;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use super::html::{esc, page, remote, see_other};
use super::login::finish_login;
use super::{Sso, WebSession};
use crate::serve::Peer;

/// The record kind in the identity store.
pub const KIND: &str = "totp";

/// A user's authenticator, as stored.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TotpRecord {
    pub user: String,
    #[serde(default)]
    pub sealed: String,
    #[serde(default)]
    pub confirmed: bool,
    #[serde(default)]
    pub last_step: Option<u64>,
    #[serde(default)]
    pub recovery: Vec<String>,
    #[serde(default)]
    pub updated_at: Option<chrono::DateTime<Utc>>,
    /// Failed codes (Unix seconds, the newest few): the limit holds cluster-wide.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<u64>,
    /// Reset by an administrator: as if there were none.
    #[serde(default)]
    pub reset: bool,
}

/// The record id of `user`.
pub fn record_id(user: &str) -> String {
    user.to_lowercase()
}

/// How often a failure is re-noted when another writer changed the record meanwhile.
const NOTE_TRIES: usize = 3;

impl Sso {
    async fn totp_record(&self, user: &str) -> Result<Option<TotpRecord>, String> {
        Ok(self.totp_stored(user).await?.map(|(r, _)| r))
    }

    /// The user's authenticator and the stored body it was read from (what a
    /// conditional write expects to replace); a reset one is none.
    async fn totp_stored(
        &self,
        user: &str,
    ) -> Result<Option<(TotpRecord, serde_json::Value)>, String> {
        let found = self
            .identity
            .record(KIND, &record_id(user))
            .await
            .map_err(|e| format!("the second factor cannot be checked now: {e}"))?;
        match found {
            None => Ok(None),
            Some(v) => serde_json::from_value::<TotpRecord>(v.clone())
                .map(|r| (!r.reset).then_some((r, v)))
                .map_err(|e| format!("the stored second factor is unreadable: {e}")),
        }
    }

    /// Stores `r` only if the stored body is still `read` (`false`: another sign-on,
    /// on any node, changed it first).
    async fn replace_totp(&self, r: &TotpRecord, read: &serde_json::Value) -> Result<bool, String> {
        let body = serde_json::to_value(r).map_err(|e| e.to_string())?;
        self.identity
            .replace_record(KIND, &record_id(&r.user), &body, Expect::Body(read))
            .await
            .map_err(|e| format!("the second factor could not be stored: {e}"))
    }

    /// Adds a failure at `now` to the user's stored ones (re-read when another writer
    /// came first). Not stored (the store is down): logged; no code is accepted then
    /// either, as a success must be stored too.
    async fn note_failure(&self, user: &str, now: u64) {
        for _ in 0..NOTE_TRIES {
            let (mut r, read) = match self.totp_stored(user).await {
                Ok(Some(found)) => found,
                Ok(None) => return,
                Err(e) => {
                    tracing::error!(%user, "a failed second factor not counted: {e}");
                    return;
                }
            };
            let mut failures = Failures::from_times(std::mem::take(&mut r.failures));
            failures.handle_failure(now);
            r.failures = failures.times().to_vec();
            match self.replace_totp(&r, &read).await {
                Ok(true) => return,
                Ok(false) => continue,
                Err(e) => {
                    tracing::error!(%user, "a failed second factor not counted: {e}");
                    return;
                }
            }
        }
        tracing::error!(%user, "a failed second factor not counted: the record kept changing");
    }

    async fn save_totp(&self, r: &TotpRecord) -> Result<(), String> {
        let body = serde_json::to_value(r).map_err(|e| e.to_string())?;
        self.identity
            .save_record(KIND, &record_id(&r.user), &body)
            .await
            .map_err(|e| format!("the second factor could not be stored: {e}"))
    }

    /// Whether `user` has a confirmed authenticator; an error when that cannot be known
    /// (the sign-on is then refused: fail closed).
    pub(super) async fn totp_enrolled(&self, user: &str) -> Result<bool, String> {
        Ok(self.totp_record(user).await?.is_some_and(|r| r.confirmed))
    }

    async fn failed(&self, user: &str, reason: &str, ip: IpAddr) {
        tracing::warn!(%user, %ip, reason, "second factor refused");
        self.report(Event::MfaFailed {
            user: user.to_string(),
            method: "totp".into(),
            reason: reason.to_string(),
            remote: Some(ip.to_string()),
        })
        .await;
    }
}

fn code_form(s: &WebSession, note: &str, error: &str) -> String {
    let error = if error.is_empty() {
        String::new()
    } else {
        format!("<p class=\"error\">{}</p>", esc(error))
    };
    format!(
        "{error}<p>{note}</p>\
         <form method=\"post\" action=\"/mfa\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label for=\"code\">Code</label>\
         <input type=\"text\" id=\"code\" name=\"code\" maxlength=\"32\" autocomplete=\"one-time-code\" inputmode=\"numeric\" required>\
         <p><button type=\"submit\">Continue</button></p></form>",
        csrf = esc(&s.csrf),
    )
}

fn disabled() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Second factor",
        "<p>Authenticator apps are not enabled on this gateway.</p>",
    )
}

pub(super) async fn mfa_page(State(sso): State<Arc<Sso>>, headers: HeaderMap) -> Response {
    if !sso.mfa.totp {
        return disabled();
    }
    let Some(s) = sso.any_session(&headers).await else {
        return see_other("/saml/login?return=/mfa");
    };
    let Some(key) = sso.sealing.as_ref() else {
        return disabled();
    };
    let record = match sso.totp_record(&s.user).await {
        Ok(r) => r,
        Err(e) => {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Second factor",
                &format!("<p class=\"error\">{}</p>", esc(&e)),
            )
        }
    };
    if let Some(r) = record.as_ref().filter(|r| r.confirmed) {
        if s.pending.is_none() {
            return page(
                StatusCode::OK,
                "Second factor",
                &format!(
                    "<p>Your authenticator is set up (since {}). An administrator can reset it if you lose it.</p><p><a href=\"/enroll\">Your devices</a></p>",
                    esc(&r.updated_at.map(|t| t.to_rfc3339()).unwrap_or_default())
                ),
            );
        }
        return page(
            StatusCode::OK,
            "Second factor",
            &code_form(&s, "Enter the 6-digit code from your authenticator app, or one of your recovery codes.", ""),
        );
    }
    // Setting one up: a new secret (kept unconfirmed, sealed) unless one is waiting.
    let secret = match record.as_ref().filter(|r| !r.sealed.is_empty()) {
        Some(r) => match key.open(&s.user, &r.sealed) {
            Ok(secret) => secret,
            Err(_) => TotpSecret::generate(),
        },
        None => TotpSecret::generate(),
    };
    let fresh = TotpRecord {
        user: s.user.clone(),
        sealed: key.seal(&s.user, &secret),
        confirmed: false,
        last_step: None,
        recovery: Vec::new(),
        updated_at: Some(Utc::now()),
        // A new secret does not wipe the failures against the last one.
        failures: record.map(|r| r.failures).unwrap_or_default(),
        reset: false,
    };
    if let Err(e) = sso.save_totp(&fresh).await {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Second factor",
            &format!("<p class=\"error\">{}</p>", esc(&e)),
        );
    }
    let uri = secret.otpauth_uri(&sso.mfa.issuer, &s.user);
    let qr = crate::qr_svg(&uri, 200);
    page(
        StatusCode::OK,
        "Set up your authenticator",
        &format!(
            "<p>Scan this with an authenticator app (or type the key), then enter the code it shows.</p>\
             <div>{qr}</div><p>Key: <code id=\"secret\">{key}</code></p>{form}",
            key = esc(&secret.base32()),
            form = code_form(&s, "The code confirms the app has the key.", ""),
        ),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CodeForm {
    csrf: String,
    code: String,
}

pub(super) async fn mfa_submit(
    State(sso): State<Arc<Sso>>,
    ci: ConnectInfo<Peer>,
    headers: HeaderMap,
    form: Result<Form<CodeForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if !sso.mfa.totp {
        return disabled();
    }
    let ip = remote(ci);
    let Some(s) = sso.any_session(&headers).await else {
        return see_other("/saml/login?return=/mfa");
    };
    let Some(key) = sso.sealing.as_ref() else {
        return disabled();
    };
    let again = |status: StatusCode, error: &str| {
        page(
            status,
            "Second factor",
            &code_form(
                &s,
                "Enter the 6-digit code from your authenticator app, or a recovery code.",
                error,
            ),
        )
    };
    let f = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            return again(
                StatusCode::BAD_REQUEST,
                &format!("the form: {}", e.body_text()),
            )
        }
    };
    if !bool::from(f.csrf.as_bytes().ct_eq(s.csrf.as_bytes())) {
        return again(
            StatusCode::BAD_REQUEST,
            "the form is stale or was not sent from this page; reload it and try again",
        );
    }
    let now = Utc::now();
    let now_secs = u64::try_from(now.timestamp()).unwrap_or(0);
    let (mut record, read) = match sso.totp_stored(&s.user).await {
        Ok(Some((r, read))) if !r.sealed.is_empty() => (r, read),
        Ok(_) => return see_other("/mfa"),
        Err(e) => return again(StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    let mut failures = Failures::from_times(std::mem::take(&mut record.failures));
    if let Err(e) = failures.check(now_secs) {
        sso.failed(&s.user, "rate_limited", ip).await;
        return again(StatusCode::TOO_MANY_REQUESTS, &e.to_string());
    }
    let secret = match key.open(&s.user, &record.sealed) {
        Ok(secret) => secret,
        Err(e) => {
            tracing::error!(user = %s.user, "the stored TOTP secret cannot be opened: {e}");
            return again(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the stored second factor cannot be read; ask an administrator to reset it",
            );
        }
    };
    let code = f.code.trim();
    let is_totp = code.len() == portcullis_mfa::DIGITS && code.bytes().all(|b| b.is_ascii_digit());
    let outcome = if is_totp || !record.confirmed {
        verify_totp(&secret, code, now_secs, record.last_step).map(|step| {
            record.last_step = Some(step);
        })
    } else {
        let mut codes = RecoveryCodes {
            hashes: record.recovery.clone(),
        };
        if codes.redeem(&s.user, code) {
            record.recovery = codes.hashes;
            Ok(())
        } else {
            Err(MfaError::Wrong)
        }
    };
    if let Err(e) = outcome {
        sso.note_failure(&s.user, now_secs).await;
        let reason = match (&e, is_totp) {
            (MfaError::Malformed, _) => "malformed",
            (MfaError::Replayed, _) => "replayed",
            (_, false) => "recovery_code_unknown",
            _ => "wrong",
        };
        sso.failed(&s.user, reason, ip).await;
        return again(StatusCode::UNAUTHORIZED, &e.to_string());
    }
    failures.handle_success();
    record.failures = failures.times().to_vec();
    let first = !record.confirmed;
    let recovery = if first {
        let codes = portcullis_mfa::new_recovery_codes();
        record.recovery = RecoveryCodes::new(&s.user, &codes).hashes;
        record.confirmed = true;
        codes
    } else {
        Vec::new()
    };
    record.updated_at = Some(now);
    // The step (or the used recovery code) is stored before the sign-on completes, and
    // only over the record the check read: of two sign-ons using one code at once, on
    // one node or two, one wins and the other is refused as a replay.
    match sso.replace_totp(&record, &read).await {
        Ok(true) => {}
        Ok(false) => {
            sso.failed(&s.user, "replayed", ip).await;
            return again(StatusCode::UNAUTHORIZED, &MfaError::Replayed.to_string());
        }
        Err(e) => return again(StatusCode::SERVICE_UNAVAILABLE, &e),
    }
    if first {
        sso.report(Event::MfaEnrolled {
            user: s.user.clone(),
            method: "totp".into(),
            remote: Some(ip.to_string()),
        })
        .await;
    }
    let (until, back) = match &s.pending {
        Some(p) => (p.until, p.back.clone()),
        None => (s.until, "/enroll".to_string()),
    };
    let sign_on = SignOn {
        at: now.timestamp(),
        mfa: true,
    };
    let done = finish_login(
        &sso,
        ip,
        &s.user,
        &s.groups,
        until,
        sign_on,
        &back,
        "saml+totp",
    )
    .await;
    if done.status().is_redirection() {
        // The session that waited for the second factor has served; the new one's
        // cookie replaces it (an error here is logged and it expires on its own).
        let _ = sso.end_session(&headers).await;
    }
    if !first || !done.status().is_redirection() {
        return done;
    }
    // The recovery codes, once, on the page that also sets the new login's cookie.
    let list: String = recovery
        .iter()
        .map(|c| format!("<li><code>{}</code></li>", esc(c)))
        .collect();
    let mut shown = page(
        StatusCode::OK,
        "Authenticator set up",
        &format!(
            "<p><strong>Keep these recovery codes somewhere safe; they are shown only now.</strong> \
             Each signs you in once without the app.</p><ul id=\"recovery\">{list}</ul>\
             <p><a href=\"{back}\">Continue</a></p>",
            back = esc(&back)
        ),
    );
    if let Some(c) = done.headers().get(axum::http::header::SET_COOKIE) {
        shown
            .headers_mut()
            .insert(axum::http::header::SET_COOKIE, c.clone());
    }
    shown
}
