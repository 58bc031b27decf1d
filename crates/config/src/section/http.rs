//! `[http]` (the one listener) and what is served on it: `[scim]`, `[admin]`, `[api]`.
//! The schema, its defaults, and the checks the section makes of itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::Invalid;

/// `[api]`: the admin API for automation under `/api/v1`, authenticated by HMAC-SHA256
/// request signing (Pritunl's header names; the recipe is in the README).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// TOML with `[[token]] id, secret, scope ("admin" | "auditor"), expires`; re-read on
    /// SIGHUP.
    pub tokens_file: PathBuf,
    /// Requests are accepted within ± this many seconds of their timestamp; nonces are
    /// remembered twice as long.
    #[serde(default = "default_api_window")]
    pub window_secs: u64,
    /// Where used nonces are kept for the replay window, so a request captured before a
    /// restart cannot be replayed after it (created 0600).
    #[serde(default = "default_nonce_file")]
    pub nonce_file: PathBuf,
}

fn default_api_window() -> u64 {
    300
}

fn default_nonce_file() -> PathBuf {
    PathBuf::from("api-nonces.bin")
}

/// `[http]`: where SCIM (`/scim/v2`) and the admin API (`/admin/v1`) listen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted (bytes); larger ones get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// HTTPS: the PEM certificate chain (leaf first) and its private key. Re-read on
    /// SIGHUP. Without them the listener speaks plain HTTP (keep it on loopback).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Open connections at most (also kept below the descriptor limit); more are closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections from one client address at most.
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// A request's head must arrive within this (also the idle time of a kept-alive
    /// connection between requests).
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
    /// A connection on which no byte moved for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
}

fn default_max_body_bytes() -> usize {
    1 << 20
}

fn default_max_connections() -> usize {
    4096
}

fn default_max_connections_per_address() -> usize {
    256
}

fn default_header_timeout() -> u64 {
    10
}

fn default_idle_timeout() -> u64 {
    60
}

/// `[scim]`: the SCIM 2.0 service provider for the IdP (Okta, Entra ID, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScimConfig {
    /// Bearer tokens the IdP may present, one per line: the token itself or
    /// `sha256:<hex>` of it. Two lines during a rotation; re-read on SIGHUP.
    pub token_file: PathBuf,
}

/// `[admin]`: the admin API the `portcullis users|sessions` commands use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer tokens, as for `[scim] token_file`. The CLI presents the first line (so it
    /// must hold a token, not a hash, where the CLI runs).
    pub token_file: PathBuf,
}

impl HttpConfig {
    /// Timeouts, connection caps, the body cap, the certificate pair.
    pub(crate) fn check(&self) -> Result<(), Invalid> {
        super::one_to("http.header_timeout_secs", self.header_timeout_secs, 3600)?;
        super::one_to("http.idle_timeout_secs", self.idle_timeout_secs, 86_400)?;
        super::one_to("http.max_connections", self.max_connections as u64, 1 << 20)?;
        super::one_to(
            "http.max_connections_per_address",
            self.max_connections_per_address as u64,
            1 << 20,
        )?;
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(Invalid::new(
                "http.key_file",
                "cert_file and key_file go together (neither: plain HTTP)",
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(Invalid::new(
                "http.max_body_bytes",
                format!("{} is below 1024", self.max_body_bytes),
            ));
        }
        Ok(())
    }
}

impl ApiConfig {
    /// The signature window.
    pub(crate) fn check(&self) -> Result<(), Invalid> {
        if !(10..=3600).contains(&self.window_secs) {
            return Err(Invalid::new(
                "api.window_secs",
                format!("{} is outside 10..=3600", self.window_secs),
            ));
        }
        Ok(())
    }
}
