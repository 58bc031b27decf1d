//! `[cluster]`: this node's place in a cluster of equal nodes sharing PostgreSQL.
//! The schema, its defaults, and the checks the section makes of itself.

use std::path::PathBuf;

use serde::Deserialize;

use super::Invalid;

/// `[cluster]`: opt-in; without it the gateway is one node on its own SQLite store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Unique in the cluster; also this node's gateway id in the audit trail.
    pub node_id: String,
    /// `postgres://user@host:port/database` (the password, if any, in `password_file`).
    pub database_url: String,
    /// The database password (first line); never logged.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Revocations accepted while the database was unreachable, kept here (fsynced
    /// before the answer) until they are committed to the cluster.
    #[serde(default = "default_pending_file")]
    pub pending_file: PathBuf,
    /// This node's site, one of `sites`; absent in a single-site cluster. Read as a
    /// TOML value so that a `[[cluster.site]]` list gets a clear error (see `check`).
    #[serde(default, rename = "site")]
    site_value: Option<toml::Value>,
    /// The cluster's sites (`[[cluster.sites]]`): each a set of nodes sharing one
    /// WireGuard key and one address clients connect to, serving that site's networks.
    #[serde(default)]
    pub sites: Vec<SiteConfig>,
    /// A node initiates the handshake for a session another node of the site had
    /// (failover in about a round trip); false leaves recovery to the client (~15 s).
    #[serde(default = "default_true")]
    pub resume_sessions: bool,
}

fn default_true() -> bool {
    true
}

/// One `[[cluster.sites]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub name: String,
    /// What clients connect to: a virtual IP moved between the site's nodes, or a UDP
    /// load balancer (`host:port`).
    pub endpoint: String,
    /// The site's WireGuard public key; every node of the site has its private key.
    pub public_key: String,
}

/// A node id's or site name's form.
fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn default_pending_file() -> PathBuf {
    PathBuf::from("cluster-pending.jsonl")
}

impl ClusterConfig {
    /// This node's site, when sites are configured.
    pub fn site(&self) -> Option<&str> {
        self.site_value.as_ref().and_then(toml::Value::as_str)
    }

    /// This node's site's entry.
    pub fn own_site(&self) -> Option<&SiteConfig> {
        let name = self.site()?;
        self.sites.iter().find(|s| s.name == name)
    }

    /// The sites: names unique and well-formed, endpoints `host:port`, keys WireGuard
    /// keys, and this node's site among them.
    fn check_sites(&self) -> Result<(), Invalid> {
        match &self.site_value {
            None | Some(toml::Value::String(_)) => {}
            Some(toml::Value::Array(_)) => {
                return Err(Invalid::new(
                    "cluster.site",
                    "is this node's site (a name); list the sites as [[cluster.sites]] (TOML cannot hold `site = \"…\"` and `[[cluster.site]]` in one table)",
                ))
            }
            Some(other) => {
                return Err(Invalid::new(
                    "cluster.site",
                    format!("{other} is not a site name"),
                ))
            }
        }
        for (i, site) in self.sites.iter().enumerate() {
            let key = |k: &str| format!("cluster.sites[{i}].{k}");
            if !name_ok(&site.name) {
                return Err(Invalid::new(
                    key("name"),
                    format!(
                        "{:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
                        site.name
                    ),
                ));
            }
            if self.sites.iter().take(i).any(|s| s.name == site.name) {
                return Err(Invalid::new(
                    key("name"),
                    format!("{:?} is listed twice", site.name),
                ));
            }
            let endpoint_ok = site.endpoint.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !endpoint_ok {
                return Err(Invalid::new(
                    key("endpoint"),
                    format!("{:?} is not host:port", site.endpoint),
                ));
            }
            crate::decode_key(&site.public_key).map_err(|r| Invalid::new(key("public_key"), r))?;
        }
        match (self.site(), self.sites.is_empty()) {
            (None, true) => Ok(()),
            (None, false) => Err(Invalid::new(
                "cluster.site",
                "is missing: with [[cluster.sites]] every node names its own site",
            )),
            (Some(s), true) => Err(Invalid::new(
                "cluster.site",
                format!("{s:?}: no [[cluster.sites]] are listed"),
            )),
            (Some(s), false) if self.own_site().is_none() => Err(Invalid::new(
                "cluster.site",
                format!(
                    "{s:?} is not one of [[cluster.sites]] ({})",
                    self.sites
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The node id's form, the URL's scheme, no password in the URL, the sites.
    pub(crate) fn check(&self) -> Result<(), Invalid> {
        self.check_sites()?;
        let id = &self.node_id;
        if !name_ok(id) {
            return Err(Invalid::new(
                "cluster.node_id",
                format!("{id:?} must be 1 to 64 letters, digits, '-', '_' or '.'"),
            ));
        }
        let url = &self.database_url;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(Invalid::new(
                "cluster.database_url",
                format!("{:?} is not a postgres:// URL", crate::redact_url(url)),
            ));
        }
        let authority = url
            .split_once("://")
            .map_or("", |(_, r)| r)
            .split(['/', '?', '#'])
            .next()
            .unwrap_or("");
        let has_password = authority
            .rsplit_once('@')
            .is_some_and(|(user_info, _)| user_info.contains(':'));
        if has_password || url.contains("password=") {
            return Err(Invalid::new(
                "cluster.database_url",
                format!(
                    "{} carries a password: put it in cluster.password_file",
                    crate::redact_url(url)
                ),
            ));
        }
        Ok(())
    }
}
