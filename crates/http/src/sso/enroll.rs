//! The signed-in user's devices: the list and the enrollment form, and the profile (text,
//! download, QR code) of a device just added.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use chrono::Utc;
use portcullis_identity::NewDevice;
use portcullis_model::Event;
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

use super::html::{esc, page, see_other, when};
use super::Sso;

pub(super) async fn enroll_page(State(sso): State<Arc<Sso>>, headers: HeaderMap) -> Response {
    let Some(s) = sso.session(&headers).await else {
        return see_other("/saml/login?return=/enroll");
    };
    let now = Utc::now();
    let rows: String = sso.identity.read_devices(|d| {
        d.iter()
            .filter(|d| d.user_name.eq_ignore_ascii_case(&s.user) && d.expires > now)
            .map(|d| {
                format!(
                    "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                    esc(&d.name),
                    d.address,
                    esc(&d.key_b64()),
                    when(d.expires)
                )
            })
            .collect()
    });
    let devices = if rows.is_empty() {
        "<p>No devices yet.</p>".to_string()
    } else {
        format!("<table><thead><tr><th>Name</th><th>Address</th><th>Public key</th><th>Expires</th></tr></thead><tbody>{rows}</tbody></table>")
    };
    page(
        StatusCode::OK,
        "Your devices",
        &format!(
            "<p>Signed in as <strong>{user}</strong> until {until}. <a href=\"/access\">Temporary access</a>{mfa} · <a href=\"/saml/logout\">Sign out</a></p>\
             <h2>Devices</h2>{devices}\
             <h2>Add a device</h2>\
             <form method=\"post\" action=\"/enroll\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label for=\"name\">Name (for you: “work laptop”)</label>\
             <input type=\"text\" id=\"name\" name=\"name\" maxlength=\"64\" required>\
             <label for=\"public_key\">The device's public key (from <code>wg genkey | wg pubkey</code> or the WireGuard app). \
             Leave it empty to have a key pair generated here: its private key is shown once.</label>\
             <input type=\"text\" id=\"public_key\" name=\"public_key\" maxlength=\"64\" autocomplete=\"off\" spellcheck=\"false\">\
             <p><button type=\"submit\">Add the device</button></p></form>\
             <p>A device works until your sign-in ends ({until}); signing in again renews your devices.</p>",
            user = esc(&s.user),
            until = when(s.until),
            csrf = esc(&s.csrf),
            mfa = if sso.mfa.totp { " · <a href=\"/mfa\">Authenticator</a>" } else { "" },
        ),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EnrollForm {
    csrf: String,
    name: String,
    #[serde(default)]
    public_key: String,
}

pub(super) async fn enroll(
    State(sso): State<Arc<Sso>>,
    headers: HeaderMap,
    form: Result<Form<EnrollForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Some(s) = sso.session(&headers).await else {
        return see_other("/saml/login?return=/enroll");
    };
    let bad = |msg: &str| {
        page(
            StatusCode::BAD_REQUEST,
            "Device not added",
            &format!(
                "<p class=\"error\">{}</p><p><a href=\"/enroll\">Back</a></p>",
                esc(msg)
            ),
        )
    };
    let f = match form {
        Ok(Form(f)) => f,
        Err(e) => return bad(&format!("the form: {}", e.body_text())),
    };
    if !bool::from(f.csrf.as_bytes().ct_eq(s.csrf.as_bytes())) {
        return bad("the form is stale or was not sent from this page; reload it and try again");
    }
    let given = f.public_key.trim();
    let (public, private) =
        match crate::devices::key_or_generate((!given.is_empty()).then_some(given)) {
            Ok(k) => k,
            Err(e) => return bad(&e.1),
        };
    let now = Utc::now();
    let lifetime = s.until - now;
    let device = match sso
        .identity
        .register_device(
            &s.user,
            public,
            &NewDevice {
                // Self-service never registers a router.
                routes: Vec::new(),
                name: f.name.trim().to_string(),
                lifetime: Some(lifetime),
                sign_on: s.sign_on,
            },
            Instant::now(),
            now,
        )
        .await
    {
        Ok(d) => d,
        Err(e) => return bad(&e.to_string()),
    };
    sso.report(Event::AdminAction {
        actor: format!("saml:{}", s.user),
        action: "POST /enroll".into(),
        target: device.id.to_string(),
        outcome: "ok".into(),
        version: None,
    })
    .await;
    let profile = sso
        .scope
        .profile(&sso.profile, &sso.commands, &device, private.as_deref())
        .await;
    let qr = crate::qr_svg(&profile, 240);
    let download = base64::engine::general_purpose::STANDARD.encode(profile.as_bytes());
    let file = format!("portcullis-{}.conf", device.address);
    let key_note = if private.is_some() {
        "<p><strong>The private key below is shown only now.</strong> Import the profile, then close this page.</p>"
    } else {
        "<p>Put your device's private key where the profile says.</p>"
    };
    // The QR code is our own SVG (no user text in it but the escaped profile data).
    page(
        StatusCode::CREATED,
        "Device added",
        &format!(
            "<p><strong>{name}</strong> has the address {addr} and works until {until}.</p>{key_note}\
             <p><a download=\"{file}\" href=\"data:text/plain;base64,{download}\">Download {file}</a></p>\
             <h2>Scan with the WireGuard app</h2><div>{qr}</div>\
             <h2>The profile</h2><pre id=\"profile\">{profile}</pre>\
             <p><a href=\"/enroll\">Back to your devices</a></p>",
            name = esc(&device.name),
            addr = device.address,
            until = when(device.expires),
            file = esc(&file),
            profile = esc(&profile),
        ),
    )
}
