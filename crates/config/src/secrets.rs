//! Secrets in the configuration: files read but never printed, bearer token sets kept
//! as hashes, the gateway key, and the checks that keep secrets out of messages and away
//! from other local users.

use std::fmt;
use std::path::Path;

use base64::Engine as _;

use crate::{Config, ConfigError};

/// A secret read from a file. Never printed.
#[derive(Clone, Default)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Reads a secret file (surrounding whitespace trimmed); errors name the key, never the
/// content.
pub fn read_secret(config: &Path, key: &str, file: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        ConfigError::new(config, key, format!("cannot read {}: {e}", file.display()))
    })?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        return Err(ConfigError::new(
            config,
            key,
            format!("{} is empty", file.display()),
        ));
    }
    Ok(Secret(secret))
}

/// Bearer tokens a service accepts, kept only as SHA-256 hashes and compared in constant
/// time. A file holds one per line: the token, or `sha256:<64 hex digits>` of it; blank
/// lines and `#` comments are skipped. Two lines let a token rotate without downtime.
#[derive(Clone)]
pub struct TokenSet {
    hashes: Vec<[u8; 32]>,
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenSet({} tokens)", self.hashes.len())
    }
}

impl TokenSet {
    /// Reads a token file; errors name the config key and line, never a token.
    pub fn load(config: &Path, key: &str, file: &Path) -> Result<TokenSet, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            ConfigError::new(config, key, format!("cannot read {}: {e}", file.display()))
        })?;
        let mut hashes = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let hash = match line.strip_prefix("sha256:") {
                Some(h) => {
                    let bytes = hex::decode(h)
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok());
                    bytes.ok_or_else(|| {
                        ConfigError::new(
                            config,
                            key,
                            format!(
                                "{} line {}: sha256: must be followed by 64 hex digits",
                                file.display(),
                                i + 1
                            ),
                        )
                    })?
                }
                None if line.len() < 16 => {
                    return Err(ConfigError::new(
                        config,
                        key,
                        format!(
                            "{} line {}: a token must be at least 16 characters",
                            file.display(),
                            i + 1
                        ),
                    ))
                }
                None => sha256(line.as_bytes()),
            };
            hashes.push(hash);
        }
        if hashes.is_empty() {
            return Err(ConfigError::new(
                config,
                key,
                format!("{} holds no token", file.display()),
            ));
        }
        Ok(TokenSet { hashes })
    }

    /// Whether `presented` is one of the tokens. Hashing first makes the comparison
    /// independent of the token's length; every stored hash is compared.
    pub fn verify(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        let h = sha256(presented.as_bytes());
        self.hashes
            .iter()
            .fold(subtle::Choice::from(0), |ok, stored| ok | stored.ct_eq(&h))
            .into()
    }

    /// The first token in a file, as a client presents it (not a hash).
    pub fn first_token(config: &Path, key: &str, file: &Path) -> Result<Secret, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            ConfigError::new(config, key, format!("cannot read {}: {e}", file.display()))
        })?;
        text.lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("sha256:"))
            .map(|l| Secret(l.to_string()))
            .ok_or_else(|| {
                ConfigError::new(
                    config,
                    key,
                    format!(
                        "{} holds no plain token a client could present",
                        file.display()
                    ),
                )
            })
    }
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

/// The gateway's X25519 private key. Never printed.
#[derive(Clone)]
pub struct PrivateKey(pub [u8; 32]);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// `scheme://user:password@host…`: the authority has a user-info part.
pub fn url_has_credentials(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains('@')
}

/// The URL with any user-info replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let host = match authority.rfind('@') {
        Some(i) => format!("***@{}", authority.get(i + 1..).unwrap_or("")),
        None => authority.to_string(),
    };
    if scheme.is_empty() {
        format!("{host}{path}")
    } else {
        format!("{scheme}://{host}{path}")
    }
}

/// Decodes a base64 WireGuard key (32 bytes).
pub fn decode_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("not valid base64: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("decodes to {} bytes, a WireGuard key is 32", bytes.len()))
}

/// The secret files (keys, tokens, passwords) that group or others may read, as
/// warnings naming the key and the file (`chmod 600` them).
pub fn exposed_secrets(c: &Config) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut files: Vec<(&str, &Path)> =
        vec![("gateway.private_key_file", &c.gateway.private_key_file)];
    if let Some(s) = &c.scim {
        files.push(("scim.token_file", &s.token_file));
    }
    if let Some(a) = &c.admin {
        files.push(("admin.token_file", &a.token_file));
    }
    if let Some(a) = &c.api {
        files.push(("api.tokens_file", &a.tokens_file));
    }
    if let Some(f) = c
        .audit
        .clickhouse
        .as_ref()
        .and_then(|ch| ch.password_file.as_ref())
    {
        files.push(("audit.clickhouse.password_file", f));
    }
    if let Some(a) = &c.audit.api {
        files.push(("audit.api.token_file", &a.token_file));
    }
    if let Some(f) = c.cluster.as_ref().and_then(|l| l.password_file.as_ref()) {
        files.push(("cluster.password_file", f));
    }
    if let Some(f) = c.mfa.as_ref().and_then(|m| m.secret_key_file.as_ref()) {
        files.push(("mfa.secret_key_file", f));
    }
    if let Some(f) = c.ldap.as_ref().and_then(|l| l.password_file.as_ref()) {
        files.push(("ldap.password_file", f));
    }
    if let Some(f) = c.http.as_ref().and_then(|h| h.key_file.as_ref()) {
        files.push(("http.key_file", f));
    }
    files
        .into_iter()
        .filter_map(|(key, f)| {
            let mode = std::fs::metadata(f).ok()?.permissions().mode();
            (mode & 0o077 != 0).then(|| {
                format!(
                    "key `{key}`: {} is readable by group or others (mode {:o}); chmod 600 it",
                    f.display(),
                    mode & 0o777
                )
            })
        })
        .collect()
}
