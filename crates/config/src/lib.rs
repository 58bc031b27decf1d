//! The Portcullis configuration file.
//!
//! What it does: defines the TOML schema (`[gateway]`, `[policy]`, `[audit]`, `[flows]`,
//! `[[user]]`, `[[peer]]`), loads it with unknown keys rejected, resolves relative paths
//! against the file's directory, reads the gateway key, and checks everything that can be
//! checked without touching the network. Every error names the file, the key and the
//! reason ([`ConfigError`]). Secrets (the private key) never appear in errors or `Debug`.
//!
//! What it deliberately does not: no policy parsing (the policy crate owns the policy
//! directory), no environment handling (the binary's clap CLI maps env vars to flags and
//! overrides fields after loading).
//!
//! The keys are a contract that operators' automation relies on: add keys, never rename.
//!
//! Layout: the top-level schema and loading here; `section/` (one file per section: its
//! schema, defaults and the checks it makes of itself), `validate` (running them, and
//! the rules between sections), `secrets` (secret files, token sets, the gateway key,
//! redaction, file-mode warnings), `toml_error` (locating TOML errors).

use std::path::{Path, PathBuf};

use serde::Deserialize;

mod secrets;
mod section;
mod toml_error;
mod validate;

pub use secrets::{
    decode_key, exposed_secrets, read_secret, redact_url, url_has_credentials, PrivateKey, Secret,
    TokenSet,
};
pub use section::{
    AdminConfig, ApiConfig, AuditApiConfig, AuditConfig, ClickHouseConfig, ClusterConfig,
    ConsoleConfig, DevicesConfig, FlowsConfig, FsyncMode, GatewayConfig, HttpConfig,
    IdentityConfig, Invalid, LdapAttributes, LdapConfig, LdapDisabled, MfaConfig, OnFull,
    PeerConfig, PolicyConfig, SamlConfig, ScimConfig, SiteConfig, UserConfig,
    MAX_CONSOLE_IDLE_SECS,
};
pub use validate::parse;

/// A configuration problem: which file, which key, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{loc}: key `{key}`: {reason}", file = .file.display(), loc = .line.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub reason: String,
    pub line: Option<(usize, usize)>,
}

impl ConfigError {
    fn new(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
            line: None,
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub policy: PolicyConfig,
    pub audit: AuditConfig,
    #[serde(default)]
    pub flows: FlowsConfig,
    #[serde(default, rename = "user")]
    pub users: Vec<UserConfig>,
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
    /// The one HTTP listener (SCIM, admin API, later the SSO pages).
    #[serde(default)]
    pub http: Option<HttpConfig>,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub scim: Option<ScimConfig>,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub ldap: Option<LdapConfig>,
    /// The signed admin API under `/api/v1` (automation).
    #[serde(default)]
    pub api: Option<ApiConfig>,
    /// Devices registered at run time (admin API, enrollment), with expiring keys.
    #[serde(default)]
    pub devices: Option<DevicesConfig>,
    /// SAML single sign-on and the enrollment pages.
    #[serde(default)]
    pub saml: Option<SamlConfig>,
    /// The second factor at sign-on (TOTP, or the IdP's own).
    #[serde(default)]
    pub mfa: Option<MfaConfig>,
    /// The web console under `/console` (sign-in through `[saml]`).
    #[serde(default)]
    pub console: Option<ConsoleConfig>,
    /// A node of a cluster sharing PostgreSQL (opt-in).
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// The longest duration any setting or request may give (10 years): larger numbers are
/// refused rather than overflowing a time calculation.
pub const MAX_DURATION_SECS: u64 = 10 * 365 * 86_400;

/// A loaded and checked configuration.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub config: Config,
    pub private_key: PrivateKey,
    /// Decoded peer public keys, in `config.peers` order.
    pub peer_keys: Vec<[u8; 32]>,
    /// Findings that do not stop the gateway.
    pub warnings: Vec<String>,
}

/// Reads and checks a configuration file, without reading the gateway's private key:
/// what the auditor commands need (they may run where the key is not).
pub fn load_unkeyed(path: &Path) -> Result<Loaded, ConfigError> {
    let src = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, "-", format!("cannot read file: {e}")))?;
    let mut loaded = parse(path, &src)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    let c = &mut loaded.config;
    resolve(&mut c.gateway.private_key_file);
    resolve(&mut c.policy.dir);
    if let Some(f) = c.audit.events_file.as_mut() {
        resolve(f);
    }
    if let Some(d) = &mut c.audit.spool_dir {
        resolve(d);
    }
    if let Some(ch) = &mut c.audit.clickhouse {
        if let Some(f) = &mut ch.password_file {
            resolve(f);
        }
    }
    if let Some(api) = &mut c.audit.api {
        resolve(&mut api.token_file);
    }
    if let Some(f) = &mut c.audit.checkpoint_key_file {
        resolve(f);
    }
    resolve(&mut c.identity.database);
    if let Some(scim) = &mut c.scim {
        resolve(&mut scim.token_file);
    }
    if let Some(admin) = &mut c.admin {
        resolve(&mut admin.token_file);
    }
    if let Some(api) = &mut c.api {
        resolve(&mut api.tokens_file);
        resolve(&mut api.nonce_file);
    }
    if let Some(l) = c.ldap.as_mut() {
        for f in [l.password_file.as_mut(), l.ca_file.as_mut()]
            .into_iter()
            .flatten()
        {
            resolve(f);
        }
    }
    if let Some(saml) = c.saml.as_mut() {
        if !saml.idp_metadata_is_url() {
            let mut p = PathBuf::from(&saml.idp_metadata);
            resolve(&mut p);
            saml.idp_metadata = p.display().to_string();
        }
    }
    if let Some(f) = c.mfa.as_mut().and_then(|m| m.secret_key_file.as_mut()) {
        resolve(f);
    }
    if let Some(cl) = c.cluster.as_mut() {
        if let Some(f) = cl.password_file.as_mut() {
            resolve(f);
        }
        resolve(&mut cl.pending_file);
    }
    if let Some(h) = c.http.as_mut() {
        for f in [h.cert_file.as_mut(), h.key_file.as_mut()]
            .into_iter()
            .flatten()
        {
            resolve(f);
        }
    }
    Ok(loaded)
}

/// Reads and checks a configuration file, including the gateway's private key.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let mut loaded = load_unkeyed(path)?;
    let key_path = &loaded.config.gateway.private_key_file;
    let key_text = std::fs::read_to_string(key_path).map_err(|e| {
        ConfigError::new(
            path,
            "gateway.private_key_file",
            format!("cannot read {}: {e}", key_path.display()),
        )
    })?;
    // The decode error could quote key material: report only that it is not a key.
    loaded.private_key = PrivateKey(decode_key(&key_text).map_err(|_| {
        ConfigError::new(
            path,
            "gateway.private_key_file",
            format!(
                "{} does not hold a base64 32-byte WireGuard private key (as `wg genkey` writes it)",
                key_path.display()
            ),
        )
    })?);
    let exposed = exposed_secrets(&loaded.config);
    loaded.warnings.extend(exposed);
    Ok(loaded)
}

#[cfg(test)]
mod tests;
