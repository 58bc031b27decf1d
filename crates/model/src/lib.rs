//! Shared value types of Portcullis: the flow key, the policy decision, the principal,
//! and the audit [`Event`] the core emits.
//!
//! What it does: defines plain data that crosses crate boundaries, and the JSON shape of
//! an event (one JSON object per line in `[audit] events_file`; the audit pipeline reuses
//! the same serde representation).
//!
//! What it deliberately does not: no IO, no parsing of packets, no policy logic.
//!
//! [`latency`]: the latency histograms (one bucket layout) the core, the audit pipeline
//! and the loop fill and `/metrics` encodes.
//!
//! Wire format owned here: the event JSON. Every event is an object with `"type"` (snake
//! case variant name), `"v"` (schema version, currently 1), `"id"` (UUID v4), `"seq"`
//! (per-gateway monotonic sequence number), `"time"` (RFC 3339 UTC), `"gateway"` and the
//! variant's fields. Fields are only ever added within a version.

pub mod latency;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Event schema version written into every event.
pub const EVENT_VERSION: u32 = 1;

/// IP protocol of a flow, as policies see it (`context.protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Protocol(pub u8);

impl Protocol {
    pub const ICMP: Protocol = Protocol(1);
    pub const TCP: Protocol = Protocol(6);
    pub const UDP: Protocol = Protocol(17);
    pub const ICMPV6: Protocol = Protocol(58);

    /// The name policies compare against: "tcp", "udp", "icmp", "icmpv6", or the number.
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Protocol::TCP => "tcp".into(),
            Protocol::UDP => "udp".into(),
            Protocol::ICMP => "icmp".into(),
            Protocol::ICMPV6 => "icmpv6".into(),
            Protocol(n) => n.to_string().into(),
        }
    }

    /// Parses a protocol name as written in policies, tests and CLIs.
    pub fn from_name(name: &str) -> Option<Protocol> {
        match name.to_ascii_lowercase().as_str() {
            "tcp" => Some(Protocol::TCP),
            "udp" => Some(Protocol::UDP),
            "icmp" => Some(Protocol::ICMP),
            "icmpv6" => Some(Protocol::ICMPV6),
            other => other.parse().ok().map(Protocol),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Protocol::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown protocol {name:?}")))
    }
}

/// Who is asking: a user with the groups and tags the identity sources gave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub name: String,
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A change an identity source (SCIM, LDAP, an administrator) made to one user, as the
/// core applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityChange {
    /// `scim`, `ldap`, `admin:<actor>`, `expiry`.
    pub source: String,
    pub user: String,
    pub kind: ChangeKind,
    /// The user as policies see it after the change; `None` when the user has no access
    /// any more (deactivated, deleted, disabled): every device, session and flow is cut.
    pub principal: Option<Principal>,
}

impl IdentityChange {
    /// Takes all access from `user` (a disable, or fail-closed handling of a refused change).
    pub fn revoked(source: impl Into<String>, user: impl Into<String>) -> IdentityChange {
        IdentityChange {
            source: source.into(),
            user: user.into(),
            kind: ChangeKind::Deactivated,
            principal: None,
        }
    }
}

/// A device (a WireGuard key of a user) registered, rotated or removed, as the core
/// applies it: a peer added or removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceChange {
    Added {
        user: String,
        public_key: [u8; 32],
        addresses: Vec<IpAddr>,
        /// Subnets behind the device (a site's router): inner sources it may use besides
        /// its addresses. Empty for a user's own device.
        routes: Vec<ipnet::IpNet>,
        persistent_keepalive: Option<u16>,
        expires_at: DateTime<Utc>,
        /// The key this one replaces (a rotation); it stays valid for the grace period.
        previous: Option<[u8; 32]>,
        sign_on: SignOn,
    },
    /// A new sign-on renewed the device: its flows are decided again with it.
    SignedOn {
        public_key: [u8; 32],
        sign_on: SignOn,
    },
    Removed {
        public_key: [u8; 32],
        /// `expired`, `rotated` (the grace period of a replaced key ended), `removed`,
        /// `user deleted`.
        reason: String,
    },
}

/// What kind of change an [`IdentityChange`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Created,
    Updated,
    Deactivated,
    Deleted,
}

impl ChangeKind {
    /// The name written into `identity_changed` events.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Created => "created",
            ChangeKind::Updated => "updated",
            ChangeKind::Deactivated => "deactivated",
            ChangeKind::Deleted => "deleted",
        }
    }
}

/// The sign-on behind a device, as the policies see it (`context.mfa`,
/// `context.auth_age_secs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SignOn {
    /// When (Unix seconds); 0: never (static peers, devices an administrator registered).
    #[serde(default)]
    pub at: i64,
    /// It used a second factor (the IdP's or ours).
    #[serde(default)]
    pub mfa: bool,
}

/// What a new flow asks the policy engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRequest {
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    /// Destination port; 0 for protocols without ports.
    pub dst_port: u16,
    pub protocol: Protocol,
    /// The device (peer public key, base64) the flow comes from.
    pub device: String,
    /// Whether the device's current sign-on used a second factor (static peers: false).
    pub mfa: bool,
    /// When (Unix seconds) the sign-on that last renewed the device happened; 0: never
    /// (static peers, devices an administrator registered). `context.auth_age_secs` is
    /// the time since then at the decision, so 0 reads as older than any limit.
    pub authenticated_at: i64,
}

/// The verdict of the policy engine. A deny is a value, not an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    /// Ids of the policies that determined the decision (the permits for an allow, the
    /// forbids for a deny; empty when nothing matched and the default deny applied).
    pub policy_ids: Vec<String>,
    /// The most specific network the destination resolved to.
    pub network: String,
    /// Evaluation errors (a policy that errored is skipped, as Cedar does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Decision {
    pub fn deny_default(network: impl Into<String>) -> Self {
        Decision {
            allowed: false,
            policy_ids: Vec::new(),
            network: network.into(),
            errors: Vec::new(),
        }
    }
}

/// A temporary grant from an approved access request: `user` may `connect` to
/// `network` (and its sub-networks), narrowed to `dst` and `port`/`protocol` when set,
/// from `start_ms` until `end_ms` (Unix milliseconds, end exclusive: Cedar's `now`
/// resolution). The engine evaluates it as a
/// permit named `id` (see `portcullis_policy::grants`); forbids still apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The access request's id; deciding flows carry it among their policy ids.
    pub id: String,
    pub user: String,
    pub network: String,
    /// An address range inside the network, or the whole network.
    pub dst: Option<(IpAddr, u8)>,
    /// One destination port (with `protocol`), or any.
    pub port: Option<u16>,
    pub protocol: Option<Protocol>,
    pub start_ms: i64,
    pub end_ms: i64,
}

/// Why a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// No packet within the protocol's idle timeout.
    IdleTimeout,
    /// TCP FIN from both sides (or RST) and the closing timeout passed.
    TcpClosed,
    /// Re-decided after a policy or identity change and now denied.
    PolicyRevoked,
    /// The user or its device was revoked / removed.
    PeerRemoved,
    /// Evicted because the flow table was full.
    Evicted,
    /// The gateway is shutting down.
    Shutdown,
}

impl CloseReason {
    /// The serialized name.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::TcpClosed => "tcp_closed",
            CloseReason::PolicyRevoked => "policy_revoked",
            CloseReason::PeerRemoved => "peer_removed",
            CloseReason::Evicted => "evicted",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// Which side a packet came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the WireGuard peer towards the private network.
    Outbound,
    /// From the private network (TUN) towards the peer.
    Inbound,
}

/// The 5-tuple of a flow as the audit trail shows it; `src` is always the client side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTuple {
    pub protocol: Protocol,
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

impl Counters {
    #[inline]
    pub fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }
}

/// What happened, as the core reports it. The io layer stamps identity ([`Envelope`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    SessionStarted {
        session_id: u64,
        user: String,
        device: String,
        endpoint: SocketAddr,
        /// Set when this node took over a session another node had (cluster failover):
        /// it started the handshake itself on the device's first packet here.
        #[serde(default, skip_serializing_if = "is_false")]
        resumed: bool,
    },
    SessionEnded {
        session_id: u64,
        user: String,
        device: String,
        endpoint: Option<SocketAddr>,
        duration_ms: u64,
        rx: Counters,
        tx: Counters,
        reason: String,
    },
    FlowOpened {
        flow_id: u64,
        session_id: u64,
        user: String,
        /// The user's groups when the flow was decided.
        #[serde(default)]
        groups: Vec<String>,
        device: String,
        #[serde(flatten)]
        tuple: FlowTuple,
        network: String,
        policy_ids: Vec<String>,
        policy_epoch: u64,
        /// Set for a TCP flow first seen mid-stream (no SYN): a connection that went on
        /// through this node after another one (failover, a flow table that forgot it).
        #[serde(default, skip_serializing_if = "is_false")]
        resumed: bool,
    },
    FlowDenied {
        session_id: u64,
        user: String,
        #[serde(default)]
        groups: Vec<String>,
        device: String,
        #[serde(flatten)]
        tuple: FlowTuple,
        network: String,
        /// The forbids that fired; empty when no permit matched.
        policy_ids: Vec<String>,
        policy_epoch: u64,
        /// Packets of this denied tuple suppressed since the last report.
        suppressed: u64,
        /// Set when the deny did not come from the policies (e.g. `audit_unavailable`:
        /// the audit spool could not take events and the gateway fails closed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    FlowClosed {
        flow_id: u64,
        session_id: u64,
        user: String,
        #[serde(default)]
        groups: Vec<String>,
        device: String,
        #[serde(flatten)]
        tuple: FlowTuple,
        network: String,
        policy_ids: Vec<String>,
        policy_epoch: u64,
        reason: CloseReason,
        duration_ms: u64,
        /// Client → network.
        outbound: Counters,
        /// Network → client.
        inbound: Counters,
    },
    SpoofDropped {
        user: String,
        device: String,
        claimed_src: IpAddr,
        assigned: Vec<IpAddr>,
        /// Further spoofed packets from this peer dropped since the last report.
        suppressed: u64,
    },
    PolicyLoaded {
        policy_epoch: u64,
        policies: usize,
        networks: usize,
        /// Established flows cut because the new set denies them.
        flows_cut: usize,
    },
    PolicyRejected {
        errors: Vec<String>,
    },
    PeerAdded {
        user: String,
        device: String,
    },
    PeerRemoved {
        user: String,
        device: String,
        reason: String,
    },
    /// A user's access was cut (offboarding, deactivation, manual revocation).
    UserRevoked {
        user: String,
        /// Who asked: `scim`, `ldap`, `admin:<name>`, ….
        source: String,
        /// When the source asked (as it reported it, or when the request arrived).
        requested_at: DateTime<Utc>,
        /// When the core had removed every session and flow of the user.
        applied_at: DateTime<Utc>,
        latency_us: u64,
        sessions_cut: u64,
        flows_cut: u64,
    },
    /// An identity source created, changed or removed a user.
    IdentityChanged {
        source: String,
        user: String,
        /// `created`, `updated`, `deactivated`, `deleted`.
        change: String,
        groups: Vec<String>,
    },
    /// A sync source's pass was not applied because it would take access from too many
    /// users at once (an empty or partial directory answer looks like mass offboarding).
    /// Nothing was removed; an administrator may approve the pass.
    SyncRefused {
        source: String,
        /// Users the source owned before the pass.
        known: u64,
        /// Users who would have lost access (removed, deactivated, dropped from a group).
        would_remove: u64,
        /// Up to 20 of them, for the operator.
        sample: Vec<String>,
        reason: String,
    },
    /// An administrator changed something through the admin API.
    AdminAction {
        actor: String,
        action: String,
        target: String,
        outcome: String,
        /// The version the change produced, when the answer names one (a policy set's
        /// `ETag`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    LoginSucceeded {
        user: String,
        method: String,
        remote: Option<String>,
    },
    LoginFailed {
        /// The name the login claimed (may not exist).
        user: String,
        method: String,
        reason: String,
        remote: Option<String>,
    },
    /// A device key was registered, rotated or expired.
    KeyRotated {
        user: String,
        device: String,
        previous: Option<String>,
        expires_at: Option<DateTime<Utc>>,
    },
    /// The audit pipeline could not write events for a while (spool full or the writer
    /// behind); with the default policy new flows were denied meanwhile. Raised once
    /// writing works again, with how many events could not be written.
    AuditDegraded {
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        events_refused: u64,
        reason: String,
    },
    /// A node signed its chain head (Ed25519, `[audit] checkpoint_key_file`): the event
    /// at `head_seq` has `head_hash`, and the rows `from_seq..=head_seq` have the Merkle
    /// root `root`.
    /// The same signed checkpoint is kept outside ClickHouse (see `portcullis-audit`'s
    /// `checkpoint` module for the format and what verification checks).
    AuditCheckpoint {
        node: String,
        /// The signed head (named apart from the envelope's own `seq`).
        head_seq: u64,
        head_hash: String,
        time_us: u64,
        from_seq: u64,
        root: String,
        /// Rows since the previous checkpoint that no signed root covers (their records
        /// were gone when the node restarted); `[0, 0]` when none.
        uncovered: [u64; 2],
        key_id: String,
        signature: String,
    },
    /// Legal hold placed or lifted: retention keeps every partition holding rows of
    /// `user` (any user when empty) between `since` and `until`.
    LegalHold {
        /// The hold's id (named apart from the envelope's event `id`).
        hold_id: String,
        action: String,
        user: String,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        reason: String,
        actor: String,
    },
    /// A user enrolled a second factor (a TOTP authenticator, confirmed with a code).
    MfaEnrolled {
        user: String,
        method: String,
        remote: Option<String>,
    },
    /// A second-factor code was refused (`malformed`, `wrong`, `replayed`,
    /// `rate_limited`, `recovery_code_unknown`): the sign-on did not complete.
    MfaFailed {
        user: String,
        method: String,
        reason: String,
        remote: Option<String>,
    },
    /// A user asked for temporary access to a network (`portcullis access request`,
    /// the admin API or the enrollment pages).
    AccessRequested {
        request_id: String,
        /// The requester.
        user: String,
        network: String,
        /// The narrower destination asked for, if any (a CIDR inside the network).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dst: Option<String>,
        /// `5432/tcp`, if the request names one port.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<String>,
        duration_secs: u64,
        reason: String,
        /// Who filed it (the requester, or `admin:<name>` on their behalf).
        actor: String,
    },
    /// An approver allowed by the `approve_access` policies approved a request: the
    /// grant exists from `starts_at` to `ends_at`.
    AccessApproved {
        request_id: String,
        user: String,
        approver: String,
        network: String,
        starts_at: DateTime<Utc>,
        ends_at: DateTime<Utc>,
        /// The `approve_access` permits that allowed the approver.
        policy_ids: Vec<String>,
        reason: String,
    },
    /// An approver turned a request down; it grants nothing.
    AccessDenied {
        request_id: String,
        user: String,
        approver: String,
        network: String,
        reason: String,
    },
    /// A grant reached its end (or a request was never decided in time); the user's
    /// flows it allowed were cut at that moment by every node.
    AccessExpired {
        request_id: String,
        user: String,
        network: String,
        /// Whether a grant ended (`true`) or a pending request lapsed undecided.
        granted: bool,
        ends_at: DateTime<Utc>,
    },
    /// A grant (or a pending request) was withdrawn before its end.
    AccessRevoked {
        request_id: String,
        user: String,
        actor: String,
        network: String,
        reason: String,
    },
    /// A cluster node's run ended without a clean exit (killed, its host lost): the
    /// sessions it had open ended with it, though its own trail never says so. Recorded
    /// once per death, by the node holding the repair lease (`no_heartbeat`) or by the
    /// node itself when it restarts first (`restarted`).
    NodeDown {
        node: String,
        /// When that run started and when it last heartbeated.
        started: DateTime<Utc>,
        last_heartbeat: DateTime<Utc>,
        /// Sessions and flows it reported at its last heartbeat.
        sessions: u64,
        flows: u64,
        reason: String,
    },
}

impl Event {
    /// The variant name as written in `"type"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::SessionStarted { .. } => "session_started",
            Event::SessionEnded { .. } => "session_ended",
            Event::FlowOpened { .. } => "flow_opened",
            Event::FlowDenied { .. } => "flow_denied",
            Event::FlowClosed { .. } => "flow_closed",
            Event::SpoofDropped { .. } => "spoof_dropped",
            Event::PolicyLoaded { .. } => "policy_loaded",
            Event::PolicyRejected { .. } => "policy_rejected",
            Event::PeerAdded { .. } => "peer_added",
            Event::PeerRemoved { .. } => "peer_removed",
            Event::UserRevoked { .. } => "user_revoked",
            Event::IdentityChanged { .. } => "identity_changed",
            Event::SyncRefused { .. } => "sync_refused",
            Event::AdminAction { .. } => "admin_action",
            Event::LoginSucceeded { .. } => "login_succeeded",
            Event::LoginFailed { .. } => "login_failed",
            Event::KeyRotated { .. } => "key_rotated",
            Event::AuditDegraded { .. } => "audit_degraded",
            Event::AuditCheckpoint { .. } => "audit_checkpoint",
            Event::LegalHold { .. } => "legal_hold",
            Event::NodeDown { .. } => "node_down",
            Event::MfaEnrolled { .. } => "mfa_enrolled",
            Event::MfaFailed { .. } => "mfa_failed",
            Event::AccessRequested { .. } => "access_requested",
            Event::AccessApproved { .. } => "access_approved",
            Event::AccessDenied { .. } => "access_denied",
            Event::AccessExpired { .. } => "access_expired",
            Event::AccessRevoked { .. } => "access_revoked",
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// An event with its identity: what is written to the events file, one per line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    pub id: uuid::Uuid,
    pub seq: u64,
    pub time: DateTime<Utc>,
    pub gateway: String,
    #[serde(flatten)]
    pub event: Event,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reason_names_are_the_serialized_ones() {
        use CloseReason::*;
        for r in [
            IdleTimeout,
            TcpClosed,
            PolicyRevoked,
            PeerRemoved,
            Evicted,
            Shutdown,
        ] {
            assert_eq!(
                serde_json::to_value(r).ok(),
                Some(serde_json::json!(r.as_str()))
            );
        }
    }

    #[test]
    fn protocol_names_round_trip() {
        for p in [1u8, 6, 17, 58, 47, 132] {
            let proto = Protocol(p);
            assert_eq!(Protocol::from_name(&proto.name()), Some(proto));
        }
        assert_eq!(Protocol::from_name("TCP"), Some(Protocol::TCP));
        assert_eq!(Protocol::from_name("sctp"), None);
        assert_eq!(Protocol::from_name("300"), None);
    }

    #[test]
    fn envelope_json_is_flat_and_tagged() -> Result<(), serde_json::Error> {
        let env = Envelope {
            v: EVENT_VERSION,
            id: uuid::Uuid::nil(),
            seq: 7,
            time: DateTime::<Utc>::UNIX_EPOCH,
            gateway: "gw1".into(),
            event: Event::FlowDenied {
                session_id: 1,
                user: "bob".into(),
                groups: vec!["developers".into()],
                device: "k".into(),
                tuple: FlowTuple {
                    protocol: Protocol::TCP,
                    src_ip: "100.64.0.3".parse().map_err(serde::de::Error::custom)?,
                    src_port: 40000,
                    dst_ip: "10.8.0.2".parse().map_err(serde::de::Error::custom)?,
                    dst_port: 22,
                },
                network: "prod".into(),
                policy_ids: vec![],
                policy_epoch: 1,
                suppressed: 0,
                reason: None,
            },
        };
        let json = serde_json::to_value(&env)?;
        assert_eq!(json["type"], "flow_denied");
        assert_eq!(json["protocol"], "tcp");
        assert_eq!(json["dst_ip"], "10.8.0.2");
        assert_eq!(json["seq"], 7);
        let back: Envelope = serde_json::from_value(json)?;
        assert_eq!(back, env);
        Ok(())
    }
}
