//! Checking a parsed configuration: each section checks itself (`section::*::check`);
//! here are the rules that span sections. Each error names the file, the key and the
//! reason.

use std::path::Path;

use crate::section::{peers, Invalid};
use crate::toml_error::toml_error;
use crate::*;

/// Parses and checks configuration text (the private key is not read: zeros).
pub fn parse(path: &Path, src: &str) -> Result<Loaded, ConfigError> {
    let mut config: Config = toml::from_str(src).map_err(|e| toml_error(path, src, &e))?;
    if config.cluster.is_some() && identity_database_given(src) {
        return Err(ConfigError::new(
            path,
            "identity.database",
            "not used with [cluster]: the directory is shared in PostgreSQL (remove one)",
        ));
    }
    if let Some(cl) = &config.cluster {
        // A node's events are chained under its node id: one name, not two.
        if gateway_id_given(src) && config.gateway.id != cl.node_id {
            return Err(ConfigError::new(
                path,
                "gateway.id",
                "with [cluster] the gateway id is cluster.node_id (remove gateway.id or make them equal)",
            ));
        }
        config.gateway.id = cl.node_id.clone();
    }
    let at_file = |e: Invalid| ConfigError::new(path, e.key, e.reason);
    let checked = check(&config).map_err(at_file)?;
    let mut warnings: Vec<String> = checked
        .warnings
        .into_iter()
        .map(|w| format!("{}: {w}", path.display()))
        .collect();
    if config.devices.is_some()
        && config.admin.is_none()
        && config.api.is_none()
        && config.saml.is_none()
    {
        warnings.push(format!(
            "{}: [devices] is set without [admin], [api] or [saml]: nothing can register a device yet",
            path.display()
        ));
    }
    Ok(Loaded {
        path: path.to_path_buf(),
        config,
        private_key: PrivateKey([0; 32]),
        peer_keys: checked.keys,
        warnings,
    })
}

/// Whether the text sets `[gateway] id` itself (it has a default).
fn gateway_id_given(src: &str) -> bool {
    toml::from_str::<toml::Table>(src)
        .ok()
        .and_then(|t| t.get("gateway")?.as_table()?.get("id").cloned())
        .is_some()
}

/// Whether the text sets `[identity] database` itself (it has a default).
fn identity_database_given(src: &str) -> bool {
    toml::from_str::<toml::Table>(src)
        .ok()
        .and_then(|t| t.get("identity")?.as_table()?.get("database").cloned())
        .is_some()
}

/// Every section's own checks, then the rules between sections.
fn check(c: &Config) -> Result<peers::CheckedPeers, Invalid> {
    c.gateway.check()?;
    c.audit.check()?;
    c.flows.check()?;
    if let Some(h) = &c.http {
        h.check()?;
    }
    if let Some(s) = &c.saml {
        s.check()?;
    }
    if let Some(m) = &c.mfa {
        m.check()?;
        if c.saml.is_none() {
            return Err(Invalid::new(
                "mfa",
                "needs [saml]: the second factor is part of the sign-on",
            ));
        }
    }
    if let Some(co) = &c.console {
        co.check()?;
        if c.saml.is_none() {
            return Err(Invalid::new(
                "console",
                "needs [saml]: console users sign in through the IdP",
            ));
        }
    }
    if let Some(a) = &c.api {
        a.check()?;
    }
    if let Some(l) = &c.ldap {
        l.check()?;
    }
    if let Some(d) = &c.devices {
        d.check(&c.gateway.tunnel_address)?;
    }
    if let Some(cl) = &c.cluster {
        cl.check()?;
    }
    if (c.scim.is_some() || c.admin.is_some() || c.api.is_some()) && c.http.is_none() {
        let key = if c.scim.is_some() {
            "scim"
        } else if c.admin.is_some() {
            "admin"
        } else {
            "api"
        };
        return Err(Invalid::new(
            key,
            "needs [http] listen: SCIM and the admin API are served there",
        ));
    }
    if c.saml.is_some() {
        if c.http.is_none() {
            return Err(Invalid::new(
                "saml",
                "needs [http] listen: the login and enrollment pages are served there",
            ));
        }
        if c.devices.is_none() {
            return Err(Invalid::new(
                "saml",
                "needs [devices]: a login enrolls devices",
            ));
        }
    }
    peers::check(&c.users, &c.peers, &c.gateway)
}
