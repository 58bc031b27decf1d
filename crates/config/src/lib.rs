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

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ipnet::IpNet;
use serde::Deserialize;

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
}

/// `[saml]`: users log in through the company IdP (SP-initiated, HTTP-Redirect then
/// HTTP-POST) and enroll devices on the pages under `/enroll`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamlConfig {
    /// The IdP's metadata: a file, or an `https://` (or `http://`) URL fetched at start
    /// and every `metadata_refresh_secs`.
    pub idp_metadata: String,
    /// How browsers reach `[http] listen`, e.g. `https://vpn.example.com`; the SP's
    /// URLs are `<base_url>/saml/metadata`, `/saml/acs`, `/saml/logout`.
    pub base_url: String,
    /// This SP's entity id; default `<base_url>/saml/metadata`.
    #[serde(default)]
    pub entity_id: Option<String>,
    /// The attribute holding the user name; absent: the NameID.
    #[serde(default)]
    pub user_attribute: Option<String>,
    /// The attribute holding the user's groups.
    #[serde(default = "default_groups_attribute")]
    pub groups_attribute: String,
    /// Tolerated clock difference with the IdP.
    #[serde(default = "default_saml_skew")]
    pub max_clock_skew_secs: u64,
    /// A login lasts until the IdP's SessionNotOnOrAfter, at most this long; devices
    /// enrolled or renewed by it expire then (also capped by `[devices]`).
    #[serde(default = "default_login_max")]
    pub login_max_secs: u64,
    #[serde(default = "default_metadata_refresh")]
    pub metadata_refresh_secs: u64,
    /// Accept logins the IdP starts (no InResponseTo). Off: only logins started here.
    #[serde(default)]
    pub allow_idp_initiated: bool,
}

fn default_groups_attribute() -> String {
    "groups".into()
}
fn default_saml_skew() -> u64 {
    60
}
fn default_login_max() -> u64 {
    12 * 3600
}
fn default_metadata_refresh() -> u64 {
    3600
}

impl SamlConfig {
    /// `base_url` without a trailing slash.
    pub fn base(&self) -> &str {
        self.base_url.trim_end_matches('/')
    }

    pub fn metadata_url(&self) -> String {
        format!("{}/saml/metadata", self.base())
    }

    pub fn entity_id(&self) -> String {
        self.entity_id
            .clone()
            .unwrap_or_else(|| self.metadata_url())
    }

    /// Whether `idp_metadata` is a URL (else a file).
    pub fn idp_metadata_is_url(&self) -> bool {
        self.idp_metadata.starts_with("https://") || self.idp_metadata.starts_with("http://")
    }
}

/// `[ldap]`: users and groups pushed from an LDAP directory (RFC 4533 refreshAndPersist,
/// as OpenLDAP's syncprov serves it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldap://host:port`, or `ldaps://host:port` (TLS, the server's certificate checked
    /// against `ca_file` or the system's CAs, and its name against the URL's host).
    pub url: String,
    /// PEM CA certificates to trust for ldaps:// instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Simple bind; anonymous when absent.
    #[serde(default)]
    pub bind_dn: Option<String>,
    /// Holds the bind password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    pub user_base: String,
    #[serde(default = "default_user_filter")]
    pub user_filter: String,
    pub group_base: String,
    #[serde(default = "default_group_filter")]
    pub group_filter: String,
    #[serde(default)]
    pub attributes: LdapAttributes,
    /// How a disabled account is recognised; without it every listed user is active.
    #[serde(default)]
    pub disabled: Option<LdapDisabled>,
    /// A full re-read of the directory, as a safety net under the push, every this many
    /// seconds.
    #[serde(default = "default_reconcile_secs")]
    pub reconcile_interval_secs: u64,
    /// A full pass that would take access from more than this share of the directory's
    /// users (0.0..=1.0) is refused until an administrator approves it
    /// (`portcullis ldap approve-removal`). A pass that would leave no user is always refused.
    #[serde(default = "default_max_removal_share")]
    pub max_removal_share: f64,
    /// Connect and bind timeout.
    #[serde(default = "default_ldap_timeout")]
    pub timeout_secs: u64,
}

fn default_user_filter() -> String {
    "(objectClass=inetOrgPerson)".into()
}
fn default_group_filter() -> String {
    "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))".into()
}
fn default_reconcile_secs() -> u64 {
    900
}
fn default_max_removal_share() -> f64 {
    0.2
}
fn default_ldap_timeout() -> u64 {
    10
}

/// `[ldap.attributes]`: which LDAP attribute holds what.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LdapAttributes {
    /// The login name policies see (`User::"<value>"`).
    pub user_name: String,
    pub email: String,
    pub display_name: String,
    /// Multi-valued attribute whose values become the user's tags.
    pub tags: Option<String>,
    pub group_name: String,
    /// The groups' member attribute (DNs of users).
    pub member: String,
}

impl Default for LdapAttributes {
    fn default() -> Self {
        LdapAttributes {
            user_name: "uid".into(),
            email: "mail".into(),
            display_name: "cn".into(),
            tags: None,
            group_name: "cn".into(),
            member: "member".into(),
        }
    }
}

/// `[ldap.disabled]`: a user is disabled when `attribute` is present and, if `values` is
/// given, holds one of them (case-insensitive), or, if `bitmask` is given, its integer
/// value has one of those bits (Active Directory: `userAccountControl`, bitmask 2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapDisabled {
    pub attribute: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub bitmask: Option<u64>,
}

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

/// `[devices]`: WireGuard keys registered at run time (the admin API, the SSO
/// enrollment), each with a tunnel address from `pool` and an expiry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesConfig {
    /// IPv4 addresses for devices, inside `gateway.tunnel_address`'s network; static
    /// `[[peer]]` addresses and the gateway's own are skipped.
    pub pool: ipnet::Ipv4Net,
    /// `host:port` the profiles tell clients to connect to.
    pub endpoint: String,
    /// How long a key is valid (the default and the most an administrator may give).
    #[serde(default = "default_key_lifetime")]
    pub key_lifetime_secs: u64,
    /// How long the old key keeps working after a rotation.
    #[serde(default = "default_rotation_grace")]
    pub rotation_grace_secs: u64,
    /// AllowedIPs in the profiles; empty: the tunnel network and every network in
    /// `networks.toml`.
    #[serde(default)]
    pub allowed_ips: Vec<IpNet>,
    /// DNS servers in the profiles.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    #[serde(default = "default_device_keepalive")]
    pub persistent_keepalive: Option<u16>,
}

fn default_key_lifetime() -> u64 {
    12 * 3600
}
fn default_rotation_grace() -> u64 {
    300
}
fn default_device_keepalive() -> Option<u16> {
    Some(25)
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

/// `[identity]`: the directory the identity sources keep.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The SQLite database (relative to the config file).
    #[serde(default = "default_identity_database")]
    pub database: PathBuf,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            database: default_identity_database(),
        }
    }
}

fn default_identity_database() -> PathBuf {
    PathBuf::from("identity.db")
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// This gateway's name in audit events.
    #[serde(default = "default_gateway_id")]
    pub id: String,
    pub listen: SocketAddr,
    pub private_key_file: PathBuf,
    pub tun_name: String,
    /// The gateway's IPv4 address on the tunnel, with the tunnel prefix.
    pub tunnel_address: IpNet,
    /// Optional IPv6 tunnel address and prefix.
    #[serde(default)]
    pub tunnel_address6: Option<IpNet>,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// TUN offloads (TSO/GRO through virtio-net headers) and UDP GSO/GRO batching.
    #[serde(default = "default_true")]
    pub offload: bool,
    /// UDP socket send and receive buffer size.
    #[serde(default = "default_socket_buffer")]
    pub socket_buffer_bytes: usize,
    /// A session ends after this long without an authenticated packet from the peer.
    #[serde(default = "default_session_idle")]
    pub session_idle_timeout_secs: u64,
}

fn default_gateway_id() -> String {
    "portcullis".into()
}
fn default_true() -> bool {
    true
}
fn default_mtu() -> u16 {
    1420
}
fn default_socket_buffer() -> usize {
    7 * 1024 * 1024
}
fn default_session_idle() -> u64 {
    180
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub dir: PathBuf,
}

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
    /// HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
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

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

/// Flow table limits and idle timeouts (seconds).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowsConfig {
    pub max_flows: usize,
    pub max_flows_per_peer: usize,
    pub tcp_syn_timeout_secs: u64,
    pub tcp_established_timeout_secs: u64,
    pub tcp_closing_timeout_secs: u64,
    pub udp_timeout_secs: u64,
    pub icmp_timeout_secs: u64,
    pub other_timeout_secs: u64,
    pub fragment_timeout_secs: u64,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        FlowsConfig {
            max_flows: 262_144,
            max_flows_per_peer: 8_192,
            tcp_syn_timeout_secs: 30,
            tcp_established_timeout_secs: 3_600,
            tcp_closing_timeout_secs: 30,
            udp_timeout_secs: 60,
            icmp_timeout_secs: 30,
            other_timeout_secs: 60,
            fragment_timeout_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub user: String,
    /// Base64 X25519 public key, as `wg pubkey` prints it.
    pub public_key: String,
    pub address: IpAddr,
    #[serde(default)]
    pub address6: Option<IpAddr>,
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
}

/// The gateway's X25519 private key. Never printed.
#[derive(Clone)]
pub struct PrivateKey(pub [u8; 32]);

/// The longest duration any setting or request may give (10 years): larger numbers are
/// refused rather than overflowing a time calculation.
pub const MAX_DURATION_SECS: u64 = 10 * 365 * 86_400;

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

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

/// Parses and checks configuration text (the private key is not read: zeros).
pub fn parse(path: &Path, src: &str) -> Result<Loaded, ConfigError> {
    let config: Config = toml::from_str(src).map_err(|e| toml_error(path, src, &e))?;
    let mut warnings = Vec::new();
    let g = &config.gateway;
    let err = |key: String, reason: String| ConfigError::new(path, key, reason);

    if g.tun_name.is_empty() || g.tun_name.len() > 15 {
        return Err(err(
            "gateway.tun_name".into(),
            format!(
                "{:?} must be 1 to 15 characters (a Linux interface name)",
                g.tun_name
            ),
        ));
    }
    if !g.tunnel_address.addr().is_ipv4() {
        return Err(err(
            "gateway.tunnel_address".into(),
            format!(
                "{} is not IPv4 (use tunnel_address6 for IPv6)",
                g.tunnel_address
            ),
        ));
    }
    if let Some(v6) = g.tunnel_address6 {
        if !v6.addr().is_ipv6() {
            return Err(err(
                "gateway.tunnel_address6".into(),
                format!("{v6} is not IPv6"),
            ));
        }
    }
    let min_mtu = if g.tunnel_address6.is_some() {
        1280
    } else {
        576
    };
    if !(min_mtu..=9000).contains(&g.mtu) {
        return Err(err(
            "gateway.mtu".into(),
            format!("{} is outside {min_mtu}..=9000", g.mtu),
        ));
    }
    let a = &config.audit;
    if a.events_file.is_none() && a.clickhouse.is_none() {
        return Err(err(
            "audit.events_file".into(),
            "required without [audit.clickhouse]: the events would go nowhere".into(),
        ));
    }
    if a.clickhouse.is_some() && a.spool_dir.is_none() {
        return Err(err(
            "audit.spool_dir".into(),
            "required with [audit.clickhouse]: events are spooled on disk before upload".into(),
        ));
    }
    if a.spool_dir.is_some() && a.clickhouse.is_none() {
        return Err(err(
            "audit.spool_dir".into(),
            "set without [audit.clickhouse]: nothing would drain the spool".into(),
        ));
    }
    if a.commit_interval_ms == 0 || a.commit_interval_ms > 1000 {
        return Err(err(
            "audit.commit_interval_ms".into(),
            format!(
                "{} ms: must be between 1 and 1000 (events wait this long for the disk)",
                a.commit_interval_ms
            ),
        ));
    }
    // Every duration: at most MAX_DURATION_SECS (an `Instant + Duration` past the end of
    // time panics), and the ones that must pass at least 1.
    let f = &config.flows;
    let mut durations: Vec<(String, u64)> = vec![
        (
            "gateway.session_idle_timeout_secs".into(),
            g.session_idle_timeout_secs,
        ),
        ("flows.tcp_syn_timeout_secs".into(), f.tcp_syn_timeout_secs),
        (
            "flows.tcp_established_timeout_secs".into(),
            f.tcp_established_timeout_secs,
        ),
        (
            "flows.tcp_closing_timeout_secs".into(),
            f.tcp_closing_timeout_secs,
        ),
        ("flows.udp_timeout_secs".into(), f.udp_timeout_secs),
        ("flows.icmp_timeout_secs".into(), f.icmp_timeout_secs),
        ("flows.other_timeout_secs".into(), f.other_timeout_secs),
        (
            "flows.fragment_timeout_secs".into(),
            f.fragment_timeout_secs,
        ),
    ];
    if let Some(ch) = &a.clickhouse {
        durations.push((
            "audit.clickhouse.batch_interval_ms".into(),
            ch.batch_interval_ms / 1000,
        ));
    }
    if let Some(s) = &config.saml {
        durations.push(("saml.login_max_secs".into(), s.login_max_secs));
        durations.push(("saml.metadata_refresh_secs".into(), s.metadata_refresh_secs));
    }
    if let Some(l) = &config.ldap {
        durations.push((
            "ldap.reconcile_interval_secs".into(),
            l.reconcile_interval_secs,
        ));
        durations.push(("ldap.timeout_secs".into(), l.timeout_secs));
    }
    if let Some(d) = &config.devices {
        durations.push(("devices.rotation_grace_secs".into(), d.rotation_grace_secs));
    }
    if let Some(h) = &config.http {
        for (key, v, max) in [
            ("http.header_timeout_secs", h.header_timeout_secs, 3600),
            ("http.idle_timeout_secs", h.idle_timeout_secs, 86_400),
            ("http.max_connections", h.max_connections as u64, 1 << 20),
            (
                "http.max_connections_per_address",
                h.max_connections_per_address as u64,
                1 << 20,
            ),
        ] {
            if v == 0 || v > max {
                return Err(err(key.into(), format!("{v} is outside 1..={max}")));
            }
        }
    }
    for (key, v) in durations {
        if v > MAX_DURATION_SECS {
            return Err(err(
                key,
                format!("{v} is out of range (at most {MAX_DURATION_SECS} seconds, 10 years)"),
            ));
        }
    }
    if a.segment_bytes < 4096 || a.spool_max_bytes < 2 * a.segment_bytes {
        return Err(err(
            "audit.spool_max_bytes".into(),
            format!(
                "{} must be at least twice segment_bytes ({}, itself at least 4096)",
                a.spool_max_bytes, a.segment_bytes
            ),
        ));
    }
    if let Some(ch) = &a.clickhouse {
        if url_has_credentials(&ch.url) {
            return Err(err(
                "audit.clickhouse.url".into(),
                format!(
                    "{} carries credentials: put the user in audit.clickhouse.user and the password in audit.clickhouse.password_file",
                    redact_url(&ch.url)
                ),
            ));
        }
        if !(ch.url.starts_with("http://") || ch.url.starts_with("https://")) {
            return Err(err(
                "audit.clickhouse.url".into(),
                format!(
                    "{:?} is not an http(s) URL of ClickHouse's HTTP interface",
                    redact_url(&ch.url)
                ),
            ));
        }
        let ident = |v: &str| {
            !v.is_empty()
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !v.starts_with(|c: char| c.is_ascii_digit())
        };
        if !ident(&ch.database) {
            return Err(err(
                "audit.clickhouse.database".into(),
                format!("{:?} must be letters, digits and _", ch.database),
            ));
        }
        if ch.batch_rows == 0 || ch.batch_interval_ms == 0 {
            return Err(err(
                "audit.clickhouse.batch_rows".into(),
                "batch_rows and batch_interval_ms must be at least 1".into(),
            ));
        }
    }
    let f = &config.flows;
    if f.max_flows == 0 || f.max_flows_per_peer == 0 {
        return Err(err(
            "flows.max_flows".into(),
            "limits must be at least 1".into(),
        ));
    }
    for (key, v) in [
        ("tcp_syn_timeout_secs", f.tcp_syn_timeout_secs),
        (
            "tcp_established_timeout_secs",
            f.tcp_established_timeout_secs,
        ),
        ("tcp_closing_timeout_secs", f.tcp_closing_timeout_secs),
        ("udp_timeout_secs", f.udp_timeout_secs),
        ("icmp_timeout_secs", f.icmp_timeout_secs),
        ("other_timeout_secs", f.other_timeout_secs),
        ("fragment_timeout_secs", f.fragment_timeout_secs),
    ] {
        if v == 0 {
            return Err(err(
                format!("flows.{key}"),
                "must be at least 1 second".into(),
            ));
        }
    }

    if (config.scim.is_some() || config.admin.is_some() || config.api.is_some())
        && config.http.is_none()
    {
        let key = if config.scim.is_some() {
            "scim"
        } else if config.admin.is_some() {
            "admin"
        } else {
            "api"
        };
        return Err(err(
            key.into(),
            "needs [http] listen: SCIM and the admin API are served there".into(),
        ));
    }
    if let Some(saml) = &config.saml {
        if config.http.is_none() {
            return Err(err(
                "saml".into(),
                "needs [http] listen: the login and enrollment pages are served there".into(),
            ));
        }
        if config.devices.is_none() {
            return Err(err(
                "saml".into(),
                "needs [devices]: a login enrolls devices".into(),
            ));
        }
        let base = saml.base();
        let scheme_ok = base.starts_with("https://") || base.starts_with("http://");
        if !scheme_ok || base.contains(['?', '#']) || base.len() <= "https://".len() {
            return Err(err(
                "saml.base_url".into(),
                format!("{base:?} must be an http(s):// URL without query or fragment"),
            ));
        }
        if saml.groups_attribute.trim().is_empty() {
            return Err(err(
                "saml.groups_attribute".into(),
                "must not be empty".into(),
            ));
        }
        if !(1..=3600).contains(&saml.max_clock_skew_secs) {
            return Err(err(
                "saml.max_clock_skew_secs".into(),
                format!("{} is outside 1..=3600", saml.max_clock_skew_secs),
            ));
        }
        if saml.login_max_secs < 60 || saml.metadata_refresh_secs < 60 {
            return Err(err(
                "saml.login_max_secs".into(),
                "login_max_secs and metadata_refresh_secs are at least 60".into(),
            ));
        }
    }
    if let Some(a) = &config.api {
        if !(10..=3600).contains(&a.window_secs) {
            return Err(err(
                "api.window_secs".into(),
                format!("{} is outside 10..=3600", a.window_secs),
            ));
        }
    }
    if let Some(h) = &config.http {
        if h.cert_file.is_some() != h.key_file.is_some() {
            return Err(err(
                "http.key_file".into(),
                "cert_file and key_file go together (neither: plain HTTP)".into(),
            ));
        }
        if h.max_body_bytes < 1024 {
            return Err(err(
                "http.max_body_bytes".into(),
                format!("{} is below 1024", h.max_body_bytes),
            ));
        }
    }

    if let Some(l) = &config.ldap {
        if !(l.url.starts_with("ldap://") || l.url.starts_with("ldaps://")) {
            return Err(err(
                "ldap.url".into(),
                format!("{:?} is not an ldap:// or ldaps:// URL", l.url),
            ));
        }
        if l.ca_file.is_some() && !l.url.starts_with("ldaps://") {
            return Err(err(
                "ldap.ca_file".into(),
                "only used with an ldaps:// url".into(),
            ));
        }
        if !(0.0..=1.0).contains(&l.max_removal_share) {
            return Err(err(
                "ldap.max_removal_share".into(),
                format!("{} is outside 0.0..=1.0", l.max_removal_share),
            ));
        }
        if l.bind_dn.is_some() != l.password_file.is_some() {
            return Err(err(
                "ldap.password_file".into(),
                "bind_dn and password_file go together (neither: anonymous bind)".into(),
            ));
        }
        if l.reconcile_interval_secs < 10 {
            return Err(err(
                "ldap.reconcile_interval_secs".into(),
                format!("{} is below 10", l.reconcile_interval_secs),
            ));
        }
        for (key, v) in [
            ("user_filter", &l.user_filter),
            ("group_filter", &l.group_filter),
        ] {
            if !(v.starts_with('(') && v.ends_with(')')) {
                return Err(err(
                    format!("ldap.{key}"),
                    format!("{v:?} is not an LDAP filter in parentheses (RFC 4515)"),
                ));
            }
        }
    }

    if let Some(d) = &config.devices {
        let net = match g.tunnel_address {
            IpNet::V4(n) => n.trunc(),
            IpNet::V6(_) => {
                return Err(err(
                    "gateway.tunnel_address".into(),
                    "must be IPv4 for [devices]".into(),
                ))
            }
        };
        if !net.contains(&d.pool) {
            return Err(err(
                "devices.pool".into(),
                format!("{} is not inside the tunnel network {net}", d.pool),
            ));
        }
        if d.key_lifetime_secs == 0 || d.key_lifetime_secs > MAX_DURATION_SECS {
            return Err(err(
                "devices.key_lifetime_secs".into(),
                format!(
                    "{} is out of range: must be at least 1 second and at most {MAX_DURATION_SECS} (10 years)",
                    d.key_lifetime_secs
                ),
            ));
        }
        if d.rotation_grace_secs > d.key_lifetime_secs {
            return Err(err(
                "devices.rotation_grace_secs".into(),
                format!(
                    "{} is longer than key_lifetime_secs ({})",
                    d.rotation_grace_secs, d.key_lifetime_secs
                ),
            ));
        }
        let endpoint_ok = d.endpoint.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !endpoint_ok {
            return Err(err(
                "devices.endpoint".into(),
                format!("{:?} is not host:port", d.endpoint),
            ));
        }
        if config.admin.is_none() && config.api.is_none() && config.saml.is_none() {
            warnings.push(format!(
                "{}: [devices] is set without [admin], [api] or [saml]: nothing can register a device yet",
                path.display()
            ));
        }
    }

    let mut user_names = HashSet::new();
    for (i, u) in config.users.iter().enumerate() {
        if u.name.is_empty() {
            return Err(err(format!("user[{i}].name"), "must not be empty".into()));
        }
        if !user_names.insert(u.name.as_str()) {
            return Err(err(
                format!("user[{i}].name"),
                format!("duplicate user {:?}", u.name),
            ));
        }
    }

    let mut peer_keys = Vec::new();
    let mut seen_keys = HashSet::new();
    let mut seen_addrs = HashSet::new();
    for (i, p) in config.peers.iter().enumerate() {
        let key = decode_key(&p.public_key).map_err(|r| err(format!("peer[{i}].public_key"), r))?;
        if !seen_keys.insert(key) {
            return Err(err(
                format!("peer[{i}].public_key"),
                "the same public key is configured twice".into(),
            ));
        }
        peer_keys.push(key);
        let nets: [(Option<IpAddr>, Option<IpNet>, &str); 2] = [
            (Some(p.address), Some(g.tunnel_address), "address"),
            (p.address6, g.tunnel_address6, "address6"),
        ];
        for (addr, net, key) in nets {
            let Some(addr) = addr else { continue };
            let Some(net) = net else {
                return Err(err(
                    format!("peer[{i}].{key}"),
                    "gateway.tunnel_address6 is not set".into(),
                ));
            };
            if !net.contains(&addr) || addr == net.addr() || addr == net.network() {
                return Err(err(
                    format!("peer[{i}].{key}"),
                    format!("{addr} is not a usable host address of the tunnel network {net}"),
                ));
            }
            if !seen_addrs.insert(addr) {
                return Err(err(
                    format!("peer[{i}].{key}"),
                    format!("{addr} is assigned to another peer"),
                ));
            }
        }
        if !user_names.contains(p.user.as_str()) {
            warnings.push(format!(
                "{}: peer[{i}] names user {:?}, which no [[user]] defines: it has no access until an identity source provides that user",
                path.display(),
                p.user
            ));
        }
    }
    Ok(Loaded {
        path: path.to_path_buf(),
        config,
        private_key: PrivateKey([0; 32]),
        peer_keys,
        warnings,
    })
}

/// Turns a toml error into file:line:col, the dotted key and the reason.
fn toml_error(path: &Path, src: &str, e: &toml::de::Error) -> ConfigError {
    let (line, col, key) = match e.span() {
        Some(span) => {
            let before = src.get(..span.start).unwrap_or_default();
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            let this_line = src.lines().nth(line - 1).unwrap_or_default().trim();
            let header = |l: &str| -> Option<String> {
                l.strip_prefix('[').map(|h| {
                    h.split(']')
                        .next()
                        .unwrap_or_default()
                        .trim_matches(|c| c == '[' || c == ']')
                        .trim()
                        .to_string()
                })
            };
            // An error on a table header (a missing field, an unknown table) is about
            // that table; otherwise about the key on the line, in the table above it.
            let key = match header(this_line) {
                Some(table) => table,
                None => {
                    let table = before.lines().rev().skip(1).map(str::trim).find_map(header);
                    let key_name = this_line.split_once('=').map(|(k, _)| k.trim().to_string());
                    match (table, key_name) {
                        (Some(t), Some(k)) => format!("{t}.{k}"),
                        (Some(t), None) => t,
                        (None, Some(k)) => k,
                        (None, None) => String::new(),
                    }
                }
            };
            (line, col, key)
        }
        None => (1, 1, String::new()),
    };
    // `unknown field `x`` at the top level or in a table: name the field itself.
    let unknown = e
        .message()
        .strip_prefix("unknown field `")
        .and_then(|m| m.split('`').next());
    let key = match unknown {
        Some(field) if !key.ends_with(field) && !key.is_empty() => format!("{key}.{field}"),
        Some(field) if key.is_empty() => field.to_string(),
        _ if key.is_empty() => "-".into(),
        _ => key,
    };
    ConfigError {
        file: path.to_path_buf(),
        key,
        reason: e.message().trim().to_string(),
        line: Some((line, col)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "hTj3BGuxdqxk2ZR0TlCsdi7Sbi4fKCDpg1AwH6PTSEs=";
    const KEY_B: &str = "d6ec7PznHbb+vzrSc9U+MsyCI5gqTEN1Ws4PX+V/zns=";

    fn sample(extra: &str) -> String {
        format!(
            r#"
[gateway]
listen = "0.0.0.0:51820"
private_key_file = "gw.key"
tun_name = "pc0"
tunnel_address = "100.64.0.1/24"
mtu = 1420

[policy]
dir = "policies"

[audit]
events_file = "events.jsonl"

[[user]]
name = "alice"
groups = ["sre"]
tags = ["oncall"]

[[peer]]
user = "alice"
public_key = "{KEY_A}"
address = "100.64.0.2"
{extra}"#
        )
    }

    fn check(src: &str) -> Result<Loaded, ConfigError> {
        parse(Path::new("/etc/portcullis.toml"), src)
    }

    #[test]
    fn the_documented_example_parses() -> Result<(), ConfigError> {
        let l = check(&sample(""))?;
        assert_eq!(l.config.gateway.mtu, 1420);
        assert_eq!(l.config.peers[0].address, IpAddr::from([100, 64, 0, 2]));
        assert_eq!(l.config.flows, FlowsConfig::default());
        assert!(l.warnings.is_empty());
        Ok(())
    }

    #[test]
    fn devices_section_defaults_and_checks() -> Result<(), ConfigError> {
        let base = "[admin]\ntoken_file = \"t\"\n[http]\nlisten = \"127.0.0.1:8080\"\n[devices]\n";
        let l = check(&sample(&format!(
            "{base}pool = \"100.64.0.128/25\"\nendpoint = \"vpn.example.com:51820\"\n"
        )))?;
        let d = l
            .config
            .devices
            .ok_or_else(|| ConfigError::new(Path::new("-"), "devices", "missing"))?;
        assert_eq!(d.key_lifetime_secs, 12 * 3600);
        assert_eq!(d.rotation_grace_secs, 300);
        assert_eq!(d.persistent_keepalive, Some(25));
        for (body, key, reason) in [
            ("pool = \"10.0.0.0/24\"\nendpoint = \"h:1\"", "devices.pool", "not inside the tunnel network 100.64.0.0/24"),
            ("pool = \"100.64.0.0/25\"\nendpoint = \"h\"", "devices.endpoint", "not host:port"),
            ("pool = \"100.64.0.0/25\"\nendpoint = \"h:1\"\nkey_lifetime_secs = 0", "devices.key_lifetime_secs", "at least 1"),
            ("pool = \"100.64.0.0/25\"\nendpoint = \"h:1\"\nkey_lifetime_secs = 60\nrotation_grace_secs = 61", "devices.rotation_grace_secs", "longer than"),
            ("pool = \"100.64.0.0/25\"\nendpoint = \"h:1\"\nlifetime = 3", "devices", "unknown field `lifetime`"),
        ] {
            let e = check(&sample(&format!("{base}{body}\n"))).err();
            let e = e.ok_or_else(|| ConfigError::new(Path::new("-"), key, "accepted"))?;
            assert!(e.key.starts_with(key) && e.reason.contains(reason), "{e}");
        }
        Ok(())
    }

    #[test]
    fn saml_section_defaults_and_checks() -> Result<(), ConfigError> {
        let base = "[http]\nlisten = \"127.0.0.1:8080\"\n\
                    [devices]\npool = \"100.64.0.128/25\"\nendpoint = \"h:51820\"\n";
        let saml = "[saml]\nidp_metadata = \"idp.xml\"\nbase_url = \"https://vpn.example.com/\"\n";
        let l = check(&sample(&format!("{base}{saml}")))?;
        let s = l
            .config
            .saml
            .ok_or_else(|| ConfigError::new(Path::new("-"), "saml", "missing"))?;
        assert_eq!(s.entity_id(), "https://vpn.example.com/saml/metadata");
        assert_eq!(
            (s.groups_attribute.as_str(), s.login_max_secs),
            ("groups", 12 * 3600)
        );
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let url =
            "[saml]\nidp_metadata = \"https://idp.example.com/md\"\nbase_url = \"https://v\"\n";
        let l = check(&sample(&format!("{base}{url}")))?;
        assert_eq!(
            l.config.saml.map(|s| s.idp_metadata),
            Some("https://idp.example.com/md".to_string())
        );
        for (extra, key, reason) in [
            (saml.to_string(), "saml", "needs [http]"),
            (
                format!("[http]\nlisten = \"127.0.0.1:8080\"\n{saml}"),
                "saml",
                "needs [devices]",
            ),
            (
                format!("{base}[saml]\nidp_metadata = \"x\"\nbase_url = \"vpn.example.com\"\n"),
                "saml.base_url",
                "http(s)://",
            ),
            (
                format!("{base}{saml}max_clock_skew_secs = 0\n"),
                "saml.max_clock_skew_secs",
                "outside",
            ),
            (
                format!("{base}{saml}login_max_secs = 5\n"),
                "saml.login_max_secs",
                "at least 60",
            ),
            (
                format!("{base}{saml}acs = \"x\"\n"),
                "saml",
                "unknown field `acs`",
            ),
        ] {
            let e = check(&sample(&extra)).err();
            let e = e.ok_or_else(|| ConfigError::new(Path::new("-"), key, "accepted"))?;
            assert!(e.key.starts_with(key) && e.reason.contains(reason), "{e}");
        }
        Ok(())
    }

    #[test]
    fn the_shipped_example_file_parses() -> Result<(), ConfigError> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../portcullis.example.toml");
        let src = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError::new(&path, "-", e.to_string()))?;
        check(&src)?;
        Ok(())
    }

    #[test]
    fn the_readme_example_parses() -> Result<(), ConfigError> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
        let readme = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError::new(&path, "-", e.to_string()))?;
        let start = readme
            .find("```toml\n[gateway]")
            .ok_or_else(|| ConfigError::new(&path, "-", "no toml example"))?;
        let block = &readme[start + 8..];
        let end = block.find("```").unwrap_or(block.len());
        let l = check(&block[..end])?;
        assert_eq!(l.config.peers.len(), 1);
        Ok(())
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let cases = [
            (sample("").replace("mtu = 1420", "mtu = 1420\nbogus = 1"), "gateway.bogus", "unknown field"),
            (sample("").replace("mtu = 1420", "mtu = \"big\""), "gateway.mtu", "invalid type"),
            (sample("").replace("mtu = 1420", "mtu = 100"), "gateway.mtu", "outside"),
            (sample("").replace(KEY_A, "no!pe"), "peer[0].public_key", "base64"),
            (sample("").replace(KEY_A, "AAAA"), "peer[0].public_key", "32"),
            (sample("").replace("100.64.0.2", "10.0.0.2"), "peer[0].address", "tunnel network"),
            (sample("").replace("100.64.0.2", "100.64.0.1"), "peer[0].address", "usable"),
            (
                sample(&format!("[[peer]]\nuser = \"alice\"\npublic_key = \"{KEY_B}\"\naddress = \"100.64.0.2\"\n")),
                "peer[1].address",
                "another peer",
            ),
            (
                sample(&format!("[[peer]]\nuser = \"alice\"\npublic_key = \"{KEY_A}\"\naddress = \"100.64.0.3\"\n")),
                "peer[1].public_key",
                "twice",
            ),
            (sample("").replace("\"pc0\"", "\"a-very-long-interface\""), "gateway.tun_name", "15"),
            (sample("address6 = \"fd00::2\""), "peer[0].address6", "tunnel_address6"),
            (sample("").replace("[audit]\nevents_file = \"events.jsonl\"\n", ""), "-", "missing field `audit`"),
            (sample("").replace("events_file = \"events.jsonl\"\n", ""), "audit.events_file", "go nowhere"),
            (
                sample("").replace("events_file = \"events.jsonl\"", "events_file = \"e\"\n[audit.clickhouse]\nurl = \"http://127.0.0.1:8123\""),
                "audit.spool_dir",
                "required",
            ),
            (
                sample("").replace("events_file = \"events.jsonl\"", "events_file = \"e\"\nspool_dir = \"s\"\n[audit.clickhouse]\nurl = \"127.0.0.1:8123\""),
                "audit.clickhouse.url",
                "http",
            ),
            (
                sample("").replace("events_file = \"events.jsonl\"", "events_file = \"e\"\nspool_dir = \"s\"\n[audit.clickhouse]\nurl = \"http://h:1\"\ndatabase = \"a;drop\""),
                "audit.clickhouse.database",
                "letters",
            ),
            (
                sample("").replace("events_file = \"events.jsonl\"", "events_file = \"e\"\nfsync = \"sometimes\""),
                "audit.fsync",
                "unknown variant",
            ),
            (
                sample("").replace("events_file = \"events.jsonl\"", "events_file = \"e\"\ncommit_interval_ms = 0"),
                "audit.commit_interval_ms",
                "between 1 and 1000",
            ),
        ];
        for (src, key, reason) in cases {
            match check(&src) {
                Ok(_) => panic!("accepted config expected to fail on {key}"),
                Err(e) => {
                    assert_eq!(e.key, key, "{e}");
                    assert!(e.reason.contains(reason), "{e}");
                    assert!(e.to_string().starts_with("/etc/portcullis.toml"), "{e}");
                }
            }
        }
    }

    #[test]
    fn unknown_user_is_a_warning() -> Result<(), ConfigError> {
        let l = check(
            &sample("").replace("user = \"alice\"\npublic_key", "user = \"zed\"\npublic_key"),
        )?;
        assert_eq!(l.warnings.len(), 1);
        assert!(l.warnings[0].contains("zed"));
        Ok(())
    }

    #[test]
    fn a_saml_metadata_file_is_relative_to_the_config_and_a_url_is_kept(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("portcullis.toml");
        let base = "[http]\nlisten = \"127.0.0.1:8080\"\n[devices]\npool = \"100.64.0.128/25\"\nendpoint = \"h:1\"\n";
        for (given, want) in [
            ("idp.xml", dir.path().join("idp.xml").display().to_string()),
            (
                "https://idp.example.com/md",
                "https://idp.example.com/md".to_string(),
            ),
        ] {
            std::fs::write(
                &path,
                sample(&format!(
                    "{base}[saml]\nidp_metadata = \"{given}\"\nbase_url = \"https://v.example\"\n"
                )),
            )?;
            let l = load_unkeyed(&path)?;
            assert_eq!(l.config.saml.map(|s| s.idp_metadata), Some(want));
        }
        Ok(())
    }

    #[test]
    fn private_key_is_read_relative_and_never_printed() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("gw.key"), format!("{KEY_B}\n"))?;
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, sample(""))?;
        let l = load(&path)?;
        assert_eq!(l.config.policy.dir, dir.path().join("policies"));
        assert!(!format!("{l:?}").contains(KEY_B));
        std::fs::write(dir.path().join("gw.key"), "garbage")?;
        let e = load(&path).err().ok_or("accepted a bad key")?;
        assert_eq!(e.key, "gateway.private_key_file");
        assert!(!e.to_string().contains("garbage"), "{e}");
        Ok(())
    }

    #[test]
    fn token_sets_hold_hashes_accept_either_token_and_name_bad_lines(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("portcullis.toml");
        let f = dir.path().join("tokens");
        let new_hash = hex::encode(sha256(b"new-token-0123456789"));
        std::fs::write(
            &f,
            format!("# rotating\nold-token-0123456789\nsha256:{new_hash}\n"),
        )?;
        let t = TokenSet::load(&cfg, "scim.token_file", &f)?;
        assert!(t.verify("old-token-0123456789"));
        assert!(t.verify("new-token-0123456789"));
        assert!(!t.verify("old-token-012345678"));
        assert!(!t.verify(""));
        assert!(!format!("{t:?}").contains("old-token"));
        assert_eq!(
            TokenSet::first_token(&cfg, "admin.token_file", &f)?.0,
            "old-token-0123456789"
        );
        std::fs::write(&f, "short\n")?;
        let e = TokenSet::load(&cfg, "scim.token_file", &f)
            .err()
            .ok_or("accepted")?;
        assert_eq!(e.key, "scim.token_file");
        assert!(
            e.to_string().contains("line 1") && !e.to_string().contains("short"),
            "{e}"
        );
        std::fs::write(&f, "sha256:abcd\n")?;
        assert!(TokenSet::load(&cfg, "scim.token_file", &f).is_err());
        std::fs::write(&f, "# nothing\n")?;
        assert!(TokenSet::load(&cfg, "scim.token_file", &f).is_err());
        Ok(())
    }

    #[test]
    fn scim_needs_the_http_listener() -> Result<(), ConfigError> {
        let e = check(&sample("[scim]\ntoken_file = \"t\"\n")).err();
        assert_eq!(e.map(|e| e.key), Some("scim".to_string()));
        let l = check(&sample(
            "[http]\nlisten = \"127.0.0.1:8080\"\n[scim]\ntoken_file = \"t\"\n",
        ))?;
        assert_eq!(l.config.http.map(|h| h.max_body_bytes), Some(1 << 20));
        assert_eq!(l.config.identity.database, PathBuf::from("identity.db"));
        Ok(())
    }

    #[test]
    fn errors_name_the_right_table_and_never_echo_url_credentials() {
        // A missing field inside [saml] names saml, not the table above it.
        let src =
            sample("[http]\nlisten = \"127.0.0.1:8080\"\n[saml]\nidp_metadata = \"idp.xml\"\n");
        let e = check(&src).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("key `saml`") && e.contains("base_url"), "{e}");
        // An unknown top-level table is named.
        let e = check(&sample("[console]\nlisten = 1\n"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("key `console`") && e.contains("unknown field"),
            "{e}"
        );
        // Credentials in the ClickHouse URL: refused, and not printed.
        let src = sample("").replace(
            "[audit]\nevents_file = \"events.jsonl\"\n",
            "[audit]\nspool_dir = \"spool\"\n[audit.clickhouse]\nurl = \"http://admin:hunter2@127.0.0.1:8123\"\n",
        );
        let e = check(&src).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains("audit.clickhouse.url") && e.contains("password_file"),
            "{e}"
        );
        assert!(!e.contains("hunter2") && !e.contains("admin:"), "{e}");
        assert_eq!(redact_url("https://u:p@h:1/x?y"), "https://***@h:1/x?y");
        assert!(!url_has_credentials("http://h:1/a@b"));
    }

    #[test]
    fn durations_past_ten_years_are_refused_by_name() {
        for (table, key) in [
            ("gateway", "session_idle_timeout_secs"),
            ("flows", "udp_timeout_secs"),
        ] {
            let src = if table == "gateway" {
                sample("").replace(
                    "mtu = 1420",
                    &format!("mtu = 1420\n{key} = 9223372036854775807"),
                )
            } else {
                format!("{}\n[flows]\n{key} = 9223372036854775807\n", sample(""))
            };
            let e = check(&src).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                e.contains(&format!("{table}.{key}")) && e.contains("out of range"),
                "{e}"
            );
        }
    }
}
