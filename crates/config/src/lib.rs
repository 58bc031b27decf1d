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
//! Layout: the schema and loading here; `validate` (every range and cross-section rule),
//! `secrets` (secret files, token sets, the gateway key, redaction, file-mode warnings),
//! `toml_error` (locating TOML errors).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

mod secrets;
mod toml_error;
mod validate;

pub use secrets::{
    decode_key, exposed_secrets, read_secret, redact_url, url_has_credentials, PrivateKey, Secret,
    TokenSet,
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

#[cfg(test)]
mod tests;
