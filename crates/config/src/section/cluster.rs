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
}

fn default_pending_file() -> PathBuf {
    PathBuf::from("cluster-pending.jsonl")
}

impl ClusterConfig {
    /// The node id's form, the URL's scheme, no password in the URL.
    pub(crate) fn check(&self) -> Result<(), Invalid> {
        let id = &self.node_id;
        let id_ok = !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !id_ok {
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
