//! The control plane's HTTP surfaces, and the thread the control plane runs on.
//!
//! What it does: serves the one `[http]` listener ([`serve`], [`tls`]) with SCIM
//! (`portcullis-scim`), the admin and signed API ([`admin`], [`devices`], the policy
//! API), single sign-on and enrollment ([`sso`]), the web console (`console`, pages
//! from `portcullis-console`), `/healthz` and `/readyz` ([`health`])
//! and `/metrics`; and [`start`]s the control plane: a thread with a runtime of its own
//! running that listener, the LDAP driver (`portcullis-ldap-sync`), the device expiry
//! timer, token and certificate reloads on SIGHUP, and the reader of the packet loop's
//! statuses. Identity changes commit here (the identity store's SQLite), never on the
//! packet thread.
//!
//! It reaches the packet loop only through `portcullis-control`'s two bounded channels:
//! commands in, statuses out.
//!
//! Just-in-time access requests ([`access`], routes in `access_api`) are kept here:
//! checked, stored, audited, and handed to the loop as grants.
//!
//! What it deliberately does not: no packets, no flow decisions (the only policy
//! question asked here is who may approve an access request), no audit writing (events
//! go to the loop as `Command::Report`).
//!
//! Format owned here: the `[api] nonce_file` ([`nonces`]).

pub mod access;
mod access_api;
pub mod admin;
mod api;
mod cluster_work;
mod console;
pub mod devices;
pub mod health;
mod holds;
mod metrics;
pub mod nonces;
mod plane;
mod policy_api;
mod policy_cluster;
pub mod serve;
pub mod sso;
pub mod tls;

pub use plane::{
    adopt_cluster_policy, check, cluster_target, leave_cluster, load_api_tokens, open_identity,
    start,
};

/// `data` as an SVG QR code at least `min_px` square (a WireGuard profile, an
/// `otpauth://` URI), for the enrollment, second-factor and console pages; empty when
/// `data` does not fit in a QR code.
pub(crate) fn qr_svg(data: &str, min_px: u32) -> String {
    qrcode::QrCode::new(data.as_bytes())
        .map(|code| {
            code.render::<qrcode::render::svg::Color<'_>>()
                .min_dimensions(min_px, min_px)
                .build()
        })
        .unwrap_or_default()
}
