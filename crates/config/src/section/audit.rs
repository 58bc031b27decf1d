//! `[audit]`, `[audit.clickhouse]`, `[audit.api]`.
//! The schema, its defaults, and the checks the section makes of itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{at_most_max, Invalid};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Events as JSON lines, appended once they are durable in the spool (or, without a
    /// spool, once handed to the OS): a local trail for `tail -f` and tests. Required
    /// without `[audit.clickhouse]`; with it, optional (it costs ~1 µs of CPU per event).
    #[serde(default)]
    pub events_file: Option<PathBuf>,
    /// The durable spool (required with `[audit.clickhouse]`).
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// When spooled events reach the disk: `always`, `on_commit` (default: one fsync per
    /// batch the writer takes, before the batch counts as written), `never` (the OS decides).
    #[serde(default)]
    pub fsync: FsyncMode,
    /// Group commit: the writer takes what the queue holds this often (or at once when
    /// 8,192 events wait) and commits it together. Events reach the disk at most this
    /// long after they happen; a trickle costs at most 1000 / this commits (fsyncs) a second.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// What happens when events cannot be written: `deny_new_flows` (default, fail
    /// closed) or `keep_forwarding` (flows continue; the refused events are counted and
    /// reported in an `audit_degraded` event).
    #[serde(default)]
    pub on_full: OnFull,
    #[serde(default)]
    pub clickhouse: Option<ClickHouseConfig>,
    #[serde(default)]
    pub api: Option<AuditApiConfig>,
    /// Ed25519 private key (PKCS#8 PEM) this node signs its chain head with; no signed
    /// checkpoints without it. `portcullis audit keygen` writes one, `portcullis audit
    /// pubkey` prints the public key auditors verify with.
    #[serde(default)]
    pub checkpoint_key_file: Option<PathBuf>,
    /// How often the chain head is signed (and at shutdown).
    #[serde(default = "default_checkpoint_interval_secs")]
    pub checkpoint_interval_secs: u64,
}

fn default_checkpoint_interval_secs() -> u64 {
    60
}

fn default_commit_interval_ms() -> u64 {
    50
}

fn default_spool_max_bytes() -> u64 {
    4 << 30
}

fn default_segment_bytes() -> u64 {
    64 << 20
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncMode {
    Always,
    #[default]
    OnCommit,
    Never,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    #[default]
    DenyNewFlows,
    KeepForwarding,
}

/// Where the uploader sends events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP interface, e.g. `http://127.0.0.1:8123` (one server; or `urls`).
    #[serde(default)]
    pub url: Option<String>,
    /// Replicas of one trail, tried in order: the uploader and the auditor commands
    /// fail over between them.
    #[serde(default)]
    pub urls: Vec<String>,
    /// The ClickHouse cluster (`remote_servers`) the replicas form: `audit migrate`
    /// creates replicated tables on every replica (`ON CLUSTER`) and a `Distributed`
    /// table for queries.
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default = "default_database")]
    pub database: String,
    #[serde(default = "default_ch_user")]
    pub user: String,
    /// File holding the password (trailing newline ignored); no password when absent.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The uploader sends a batch when it has this many events…
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// …or when the oldest unsent event is this old.
    #[serde(default = "default_batch_interval_ms")]
    pub batch_interval_ms: u64,
    /// Drop monthly partitions whose newest event is older than this (0: keep forever).
    #[serde(default)]
    pub retention_days: u32,
}

fn default_database() -> String {
    "portcullis".into()
}

fn default_ch_user() -> String {
    "default".into()
}

fn default_batch_rows() -> usize {
    100_000
}

fn default_batch_interval_ms() -> u64 {
    1000
}

/// The read-only auditor HTTP API (`portcullis audit serve`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditApiConfig {
    pub listen: SocketAddr,
    /// File holding the bearer token auditors present.
    pub token_file: PathBuf,
}

impl AuditConfig {
    /// Where events go, the commit interval, the spool's sizes, `[audit.clickhouse]`.
    pub(crate) fn check(&self) -> Result<(), Invalid> {
        if self.events_file.is_none() && self.clickhouse.is_none() {
            return Err(Invalid::new(
                "audit.events_file",
                "required without [audit.clickhouse]: the events would go nowhere",
            ));
        }
        if self.clickhouse.is_some() && self.spool_dir.is_none() {
            return Err(Invalid::new(
                "audit.spool_dir",
                "required with [audit.clickhouse]: events are spooled on disk before upload",
            ));
        }
        if self.spool_dir.is_some() && self.clickhouse.is_none() {
            return Err(Invalid::new(
                "audit.spool_dir",
                "set without [audit.clickhouse]: nothing would drain the spool",
            ));
        }
        if self.commit_interval_ms == 0 || self.commit_interval_ms > 1000 {
            return Err(Invalid::new(
                "audit.commit_interval_ms",
                format!(
                    "{} ms: must be between 1 and 1000 (events wait this long for the disk)",
                    self.commit_interval_ms
                ),
            ));
        }
        if let Some(ch) = &self.clickhouse {
            ch.check()?;
        }
        if !(1..=86_400).contains(&self.checkpoint_interval_secs) {
            return Err(Invalid::new(
                "audit.checkpoint_interval_secs",
                format!(
                    "{}: must be between 1 and 86400",
                    self.checkpoint_interval_secs
                ),
            ));
        }
        if self.checkpoint_key_file.is_some() && self.clickhouse.is_none() {
            return Err(Invalid::new(
                "audit.checkpoint_key_file",
                "set without [audit.clickhouse]: checkpoints sign the spooled chain",
            ));
        }
        if self.segment_bytes < 4096 || self.spool_max_bytes < 2 * self.segment_bytes {
            return Err(Invalid::new(
                "audit.spool_max_bytes",
                format!(
                    "{} must be at least twice segment_bytes ({}, itself at least 4096)",
                    self.spool_max_bytes, self.segment_bytes
                ),
            ));
        }
        Ok(())
    }
}

impl ClickHouseConfig {
    /// `url` or `urls`, in the order tried.
    pub fn all_urls(&self) -> Vec<String> {
        self.url.iter().chain(&self.urls).cloned().collect()
    }

    fn check(&self) -> Result<(), Invalid> {
        at_most_max(
            "audit.clickhouse.batch_interval_ms",
            self.batch_interval_ms / 1000,
        )?;
        let urls = self.all_urls();
        if urls.is_empty() {
            return Err(Invalid::new(
                "audit.clickhouse.url",
                "missing: set url (one server) or urls (replicas)",
            ));
        }
        if self.url.is_some() && !self.urls.is_empty() {
            return Err(Invalid::new(
                "audit.clickhouse.urls",
                "set together with url: list every replica in urls",
            ));
        }
        let key = if self.urls.is_empty() {
            "audit.clickhouse.url"
        } else {
            "audit.clickhouse.urls"
        };
        for url in &urls {
            if crate::url_has_credentials(url) {
                return Err(Invalid::new(
                    key,
                    format!(
                        "{} carries credentials: put the user in audit.clickhouse.user and the password in audit.clickhouse.password_file",
                        crate::redact_url(url)
                    ),
                ));
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Invalid::new(
                    key,
                    format!(
                        "{:?} is not an http(s) URL of ClickHouse's HTTP interface",
                        crate::redact_url(url)
                    ),
                ));
            }
        }
        let ident = |v: &str| {
            !v.is_empty()
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !v.starts_with(|c: char| c.is_ascii_digit())
        };
        if let Some(c) = &self.cluster {
            if !ident(c) {
                return Err(Invalid::new(
                    "audit.clickhouse.cluster",
                    format!("{c:?} must be letters, digits and _"),
                ));
            }
        }
        if !ident(&self.database) {
            return Err(Invalid::new(
                "audit.clickhouse.database",
                format!("{:?} must be letters, digits and _", self.database),
            ));
        }
        if self.batch_rows == 0 || self.batch_interval_ms == 0 {
            return Err(Invalid::new(
                "audit.clickhouse.batch_rows",
                "batch_rows and batch_interval_ms must be at least 1",
            ));
        }
        Ok(())
    }
}
