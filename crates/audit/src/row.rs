//! One audit event as one ClickHouse row, its canonical encoding and its hash chain.
//!
//! The row is flat: columns for what auditors filter and sum on (user, groups, device,
//! 5-tuple, network, decision, policy ids, counters, latency), the rest of the event in
//! `detail` (a JSON object). Every row carries `prev_hash` (the `hash` of the gateway's
//! previous event) and `hash` = SHA-256(lowercase hex of `prev_hash` ‖ canonical encoding
//! of every other column); both are 32 raw bytes (`FixedString(32)`).
//!
//! Canonical encoding (little endian), the hash input, fixed forever: a version byte (1),
//! then the columns in declaration order: integers fixed width; strings as `u32` length +
//! UTF-8 bytes; string arrays as `u32` count + strings; the UUID (RFC 4122 byte order) and
//! the 16-byte address raw.
//!
//! Spool record: the canonical encoding with the version byte set to 2, followed by
//! `prev_hash` and `hash` raw (32 bytes each). Version 1 records (written before schema 4:
//! the two hashes as `u32` length + 64 hex characters) still decode.

use std::net::IpAddr;

use portcullis_model::{Envelope, Event, FlowTuple};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A SHA-256 link of the chain.
pub type Hash = [u8; 32];

/// `prev_hash` of a gateway's first event.
pub const GENESIS: Hash = [0; 32];

/// First byte of the canonical encoding (the hash input).
const CANONICAL_VERSION: u8 = 1;
/// First byte of a spool record with raw hashes.
const RECORD_VERSION: u8 = 2;

/// A row of the `events` table. Field order is the column order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct AuditRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: uuid::Uuid,
    pub gateway: String,
    pub seq: u64,
    /// Seconds since the epoch (`DateTime`, the partition and order key).
    pub time: u32,
    /// Microseconds since the epoch (18.16 has no `DateTime64`).
    pub time_us: u64,
    pub v: u32,
    pub kind: String,
    pub user: String,
    pub groups: Vec<String>,
    pub device: String,
    pub session_id: u64,
    pub flow_id: u64,
    pub protocol: String,
    pub src_ip: String,
    pub src_port: u16,
    pub dst_ip: String,
    /// The destination as 16 bytes (IPv4 mapped into IPv6), for CIDR range scans.
    pub dst_addr: [u8; 16],
    pub dst_port: u16,
    pub network: String,
    /// `allow`, `deny`, or empty for events that are not flow decisions.
    pub decision: String,
    pub policy_ids: Vec<String>,
    pub policy_epoch: u64,
    pub reason: String,
    pub duration_ms: u64,
    /// Client → network (for sessions: received from the client).
    pub bytes_out: u64,
    pub packets_out: u64,
    /// Network → client.
    pub bytes_in: u64,
    pub packets_in: u64,
    pub latency_us: u64,
    /// The event's other fields, as a JSON object with sorted keys.
    pub detail: String,
    pub prev_hash: Hash,
    pub hash: Hash,
}

/// Columns of `events` in order, with their ClickHouse types (the insert names them,
/// the uploader checks them against the server at connect).
pub const COLUMNS: &[(&str, &str)] = &[
    ("event_id", "UUID"),
    ("gateway", "String"),
    ("seq", "UInt64"),
    ("time", "DateTime"),
    ("time_us", "UInt64"),
    ("v", "UInt32"),
    ("kind", "String"),
    ("user", "String"),
    ("groups", "Array(String)"),
    ("device", "String"),
    ("session_id", "UInt64"),
    ("flow_id", "UInt64"),
    ("protocol", "String"),
    ("src_ip", "String"),
    ("src_port", "UInt16"),
    ("dst_ip", "String"),
    ("dst_addr", "FixedString(16)"),
    ("dst_port", "UInt16"),
    ("network", "String"),
    ("decision", "String"),
    ("policy_ids", "Array(String)"),
    ("policy_epoch", "UInt64"),
    ("reason", "String"),
    ("duration_ms", "UInt64"),
    ("bytes_out", "UInt64"),
    ("packets_out", "UInt64"),
    ("bytes_in", "UInt64"),
    ("packets_in", "UInt64"),
    ("latency_us", "UInt64"),
    ("detail", "String"),
    ("prev_hash", "FixedString(32)"),
    ("hash", "FixedString(32)"),
];

/// The column names, comma separated (for `SELECT` lists).
pub fn column_list() -> String {
    COLUMNS
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A spool record that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("undecodable audit record: {0}")]
pub struct DecodeError(pub(crate) &'static str);

/// The 16-byte form of an address (IPv4 mapped).
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl AuditRow {
    /// Maps an event to a row (hashes empty: see [`Chain::seal`]).
    pub fn from_envelope(env: &Envelope) -> AuditRow {
        let mut row = AuditRow::base(env);
        // Flow events are nearly every event: mapped field by field (~20x cheaper than the
        // JSON route of the other kinds, with the same result; a property test holds them equal).
        match &env.event {
            Event::FlowOpened {
                flow_id,
                session_id,
                user,
                groups,
                device,
                tuple,
                network,
                policy_ids,
                policy_epoch,
                resumed,
            } => {
                row.flow_id = *flow_id;
                if *resumed {
                    // What the JSON route leaves in `detail`.
                    row.detail = r#"{"resumed":true}"#.into();
                }
                row.set_flow(
                    *session_id,
                    user,
                    groups,
                    device,
                    tuple,
                    network,
                    policy_ids,
                    *policy_epoch,
                );
                return row;
            }
            Event::FlowDenied {
                session_id,
                user,
                groups,
                device,
                tuple,
                network,
                policy_ids,
                policy_epoch,
                suppressed,
                reason,
            } => {
                row.set_flow(
                    *session_id,
                    user,
                    groups,
                    device,
                    tuple,
                    network,
                    policy_ids,
                    *policy_epoch,
                );
                row.reason = reason.clone().unwrap_or_default();
                row.detail = format!("{{\"suppressed\":{suppressed}}}");
                return row;
            }
            Event::FlowClosed {
                flow_id,
                session_id,
                user,
                groups,
                device,
                tuple,
                network,
                policy_ids,
                policy_epoch,
                reason,
                duration_ms,
                outbound,
                inbound,
            } => {
                row.flow_id = *flow_id;
                row.set_flow(
                    *session_id,
                    user,
                    groups,
                    device,
                    tuple,
                    network,
                    policy_ids,
                    *policy_epoch,
                );
                row.reason = reason.as_str().into();
                row.duration_ms = *duration_ms;
                (row.bytes_out, row.packets_out) = (outbound.bytes, outbound.packets);
                (row.bytes_in, row.packets_in) = (inbound.bytes, inbound.packets);
                return row;
            }
            _ => {}
        }
        row.map_json(&env.event);
        row
    }

    /// The columns every event has; the rest empty.
    fn base(env: &Envelope) -> AuditRow {
        let micros = env.time.timestamp_micros().max(0) as u64;
        AuditRow {
            event_id: env.id,
            gateway: env.gateway.clone(),
            seq: env.seq,
            time: (micros / 1_000_000).min(u64::from(u32::MAX)) as u32,
            time_us: micros,
            v: env.v,
            kind: env.event.kind().to_string(),
            user: String::new(),
            groups: Vec::new(),
            device: String::new(),
            session_id: 0,
            flow_id: 0,
            protocol: String::new(),
            src_ip: String::new(),
            src_port: 0,
            dst_ip: String::new(),
            dst_addr: [0; 16],
            dst_port: 0,
            network: String::new(),
            decision: match env.event {
                Event::FlowOpened { .. } | Event::FlowClosed { .. } => "allow".into(),
                Event::FlowDenied { .. } => "deny".into(),
                _ => String::new(),
            },
            policy_ids: Vec::new(),
            policy_epoch: 0,
            reason: String::new(),
            duration_ms: 0,
            bytes_out: 0,
            packets_out: 0,
            bytes_in: 0,
            packets_in: 0,
            latency_us: 0,
            detail: String::new(),
            prev_hash: GENESIS,
            hash: GENESIS,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn set_flow(
        &mut self,
        session_id: u64,
        user: &str,
        groups: &[String],
        device: &str,
        tuple: &FlowTuple,
        network: &str,
        policy_ids: &[String],
        policy_epoch: u64,
    ) {
        self.session_id = session_id;
        self.user = user.into();
        self.groups = groups.to_vec();
        self.device = device.into();
        self.protocol = tuple.protocol.name().into_owned();
        self.src_ip = tuple.src_ip.to_string();
        self.src_port = tuple.src_port;
        self.dst_ip = tuple.dst_ip.to_string();
        self.dst_addr = addr16(tuple.dst_ip);
        self.dst_port = tuple.dst_port;
        self.network = network.into();
        self.policy_ids = policy_ids.to_vec();
        self.policy_epoch = policy_epoch;
    }

    /// Generic mapping through the event's JSON: every field lands in a column or in
    /// `detail`, so new event kinds need no change here.
    fn map_json(&mut self, event: &Event) {
        let row = self;
        let serde_json::Value::Object(mut fields) = serde_json::to_value(event).unwrap_or_default()
        else {
            return;
        };
        fields.remove("type");
        let mut take = |k: &str| fields.remove(k);
        let text = |v: Option<serde_json::Value>| match v {
            Some(serde_json::Value::String(s)) => s,
            Some(serde_json::Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        let num = |v: Option<serde_json::Value>| v.and_then(|v| v.as_u64()).unwrap_or(0);
        let list = |v: Option<serde_json::Value>| -> Vec<String> {
            match v {
                Some(serde_json::Value::Array(a)) => a
                    .into_iter()
                    .map(|x| match x {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    })
                    .collect(),
                _ => Vec::new(),
            }
        };
        let counters = |v: Option<serde_json::Value>| {
            let c = v.unwrap_or_default();
            (
                c.get("bytes").and_then(|b| b.as_u64()).unwrap_or(0),
                c.get("packets").and_then(|b| b.as_u64()).unwrap_or(0),
            )
        };
        row.user = text(take("user"));
        row.groups = list(take("groups"));
        row.device = text(take("device"));
        row.session_id = num(take("session_id"));
        row.flow_id = num(take("flow_id"));
        row.protocol = text(take("protocol"));
        row.src_ip = text(take("src_ip"));
        row.src_port = num(take("src_port")).min(65535) as u16;
        row.dst_ip = text(take("dst_ip"));
        row.dst_addr = row.dst_ip.parse().map(addr16).unwrap_or([0; 16]);
        row.dst_port = num(take("dst_port")).min(65535) as u16;
        row.network = text(take("network"));
        row.policy_ids = list(take("policy_ids"));
        row.policy_epoch = num(take("policy_epoch"));
        row.reason = text(take("reason"));
        row.duration_ms = num(take("duration_ms"));
        row.latency_us = num(take("latency_us"));
        let (out_b, out_p) = counters(take("outbound").or_else(|| take("rx")));
        let (in_b, in_p) = counters(take("inbound").or_else(|| take("tx")));
        (row.bytes_out, row.packets_out, row.bytes_in, row.packets_in) = (out_b, out_p, in_b, in_p);
        row.detail = if fields.is_empty() {
            String::new()
        } else {
            serde_json::Value::Object(fields).to_string()
        };
    }

    /// The canonical encoding (see the module docs): the hash input.
    pub fn encode_canonical(&self, out: &mut Vec<u8>) {
        out.push(CANONICAL_VERSION);
        out.extend_from_slice(self.event_id.as_bytes());
        put_str(out, &self.gateway);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.time.to_le_bytes());
        out.extend_from_slice(&self.time_us.to_le_bytes());
        out.extend_from_slice(&self.v.to_le_bytes());
        put_str(out, &self.kind);
        put_str(out, &self.user);
        put_list(out, &self.groups);
        put_str(out, &self.device);
        out.extend_from_slice(&self.session_id.to_le_bytes());
        out.extend_from_slice(&self.flow_id.to_le_bytes());
        put_str(out, &self.protocol);
        put_str(out, &self.src_ip);
        out.extend_from_slice(&self.src_port.to_le_bytes());
        put_str(out, &self.dst_ip);
        out.extend_from_slice(&self.dst_addr);
        out.extend_from_slice(&self.dst_port.to_le_bytes());
        put_str(out, &self.network);
        put_str(out, &self.decision);
        put_list(out, &self.policy_ids);
        out.extend_from_slice(&self.policy_epoch.to_le_bytes());
        put_str(out, &self.reason);
        for n in [
            self.duration_ms,
            self.bytes_out,
            self.packets_out,
            self.bytes_in,
            self.packets_in,
            self.latency_us,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        put_str(out, &self.detail);
    }

    /// The spool record (see the module docs), appended to `out`.
    pub fn encode_record(&self, out: &mut Vec<u8>) {
        let start = out.len();
        self.encode_canonical(out);
        finish_record(out, start, &self.prev_hash, &self.hash);
    }

    /// Decodes a spool record (version 2, or version 1 from before schema 4).
    pub fn decode(bytes: &[u8]) -> Result<AuditRow, DecodeError> {
        let mut r = Reader(bytes);
        let version = r.version()?;
        let mut row = AuditRow {
            event_id: uuid::Uuid::from_bytes(r.array()?),
            gateway: r.string()?,
            seq: r.u64()?,
            time: u32::from_le_bytes(r.array()?),
            time_us: r.u64()?,
            v: u32::from_le_bytes(r.array()?),
            kind: r.string()?,
            user: r.string()?,
            groups: r.list()?,
            device: r.string()?,
            session_id: r.u64()?,
            flow_id: r.u64()?,
            protocol: r.string()?,
            src_ip: r.string()?,
            src_port: u16::from_le_bytes(r.array()?),
            dst_ip: r.string()?,
            dst_addr: r.array()?,
            dst_port: u16::from_le_bytes(r.array()?),
            network: r.string()?,
            decision: r.string()?,
            policy_ids: r.list()?,
            policy_epoch: r.u64()?,
            reason: r.string()?,
            duration_ms: r.u64()?,
            bytes_out: r.u64()?,
            packets_out: r.u64()?,
            bytes_in: r.u64()?,
            packets_in: r.u64()?,
            latency_us: r.u64()?,
            detail: r.string()?,
            prev_hash: GENESIS,
            hash: GENESIS,
        };
        row.prev_hash = r.hash(version)?;
        row.hash = r.hash(version)?;
        r.end()?;
        Ok(row)
    }

    /// The hash this row must carry given its `prev_hash` and other columns.
    pub fn expected_hash(&self) -> Hash {
        let mut buf = Vec::with_capacity(512);
        self.encode_canonical(&mut buf);
        link(&self.prev_hash, &buf)
    }
}

/// SHA-256(hex(prev) ‖ canonical encoding).
fn link(prev: &Hash, canonical: &[u8]) -> Hash {
    let mut hex_prev = [0u8; 64];
    // Cannot fail: the buffer is exactly twice the hash.
    let _ = hex::encode_to_slice(prev, &mut hex_prev);
    let mut h = Sha256::new();
    h.update(hex_prev);
    h.update(canonical);
    h.finalize().into()
}

/// Turns the canonical encoding at `out[start..]` into a spool record.
fn finish_record(out: &mut Vec<u8>, start: usize, prev: &Hash, hash: &Hash) {
    if let Some(version) = out.get_mut(start) {
        *version = RECORD_VERSION;
    }
    out.extend_from_slice(prev);
    out.extend_from_slice(hash);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_list(out: &mut Vec<u8>, l: &[String]) {
    out.extend_from_slice(&(l.len() as u32).to_le_bytes());
    for s in l {
        put_str(out, s);
    }
}

/// Reads the fields of a record (canonical encoding or spool record) in order; shared by
/// [`AuditRow::decode`] and the uploader's Native transcoder.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?
            .try_into()
            .map_err(|_| DecodeError("truncated"))
    }
    /// The version byte: canonical (1) or spool record (2), anything else refused.
    pub(crate) fn version(&mut self) -> Result<u8, DecodeError> {
        match self.array::<1>()? {
            [v @ (CANONICAL_VERSION | RECORD_VERSION)] => Ok(v),
            _ => Err(DecodeError("unknown encoding version")),
        }
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A `u32` length and that many bytes.
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = u32::from_le_bytes(self.array()?) as usize;
        self.take(len)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| DecodeError("invalid utf-8"))
    }
    /// The two hashes ending a spool record of `version`: raw (2), or as `u32` length 64 +
    /// lowercase hex (1).
    pub(crate) fn hash(&mut self, version: u8) -> Result<Hash, DecodeError> {
        if version == RECORD_VERSION {
            return self.array();
        }
        let mut hash = GENESIS;
        hex::decode_to_slice(self.bytes()?, &mut hash)
            .map_err(|_| DecodeError("hash is not 64 hex characters"))?;
        Ok(hash)
    }
    /// A list's element count, refused when the rest of the record cannot hold it.
    pub(crate) fn count(&mut self) -> Result<usize, DecodeError> {
        let n = u32::from_le_bytes(self.array()?) as usize;
        if n > self.0.len() / 4 {
            return Err(DecodeError("list longer than the record"));
        }
        Ok(n)
    }
    fn list(&mut self) -> Result<Vec<String>, DecodeError> {
        let n = self.count()?;
        (0..n).map(|_| self.string()).collect()
    }
    /// Nothing may follow the last field.
    pub(crate) fn end(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError("trailing bytes"))
        }
    }
}

/// A gateway's hash chain: the hash of its last event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub last_hash: Hash,
}

impl Default for Chain {
    fn default() -> Self {
        Chain { last_hash: GENESIS }
    }
}

impl Chain {
    /// Links the row into the chain: sets `prev_hash` and `hash`.
    pub fn seal(&mut self, row: &mut AuditRow) {
        self.seal_record(row, &mut Vec::with_capacity(512));
    }

    /// Links the row into the chain and writes its spool record into `out` (cleared
    /// first), encoding the row once for both.
    pub fn seal_record(&mut self, row: &mut AuditRow, out: &mut Vec<u8>) {
        out.clear();
        row.encode_canonical(out);
        row.prev_hash = self.last_hash;
        row.hash = link(&row.prev_hash, out);
        self.last_hash = row.hash;
        finish_record(out, 0, &row.prev_hash, &row.hash);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use portcullis_model::{Counters, FlowTuple, Protocol, EVENT_VERSION};
    use proptest::prelude::*;

    pub(crate) fn closed(seq: u64, user: &str, bytes: u64) -> Envelope {
        Envelope {
            v: EVENT_VERSION,
            id: uuid::Uuid::new_v4(),
            seq,
            time: chrono::Utc::now(),
            gateway: "gw-1".into(),
            event: Event::FlowClosed {
                flow_id: 9,
                session_id: 4,
                user: user.into(),
                groups: vec!["sre".into()],
                device: "key".into(),
                tuple: FlowTuple {
                    protocol: Protocol::TCP,
                    src_ip: "100.64.0.2".parse().unwrap(),
                    src_port: 40000,
                    dst_ip: "10.8.0.2".parse().unwrap(),
                    dst_port: 22,
                },
                network: "prod".into(),
                policy_ids: vec!["sre-prod".into()],
                policy_epoch: 3,
                reason: portcullis_model::CloseReason::TcpClosed,
                duration_ms: 1500,
                outbound: Counters { packets: 10, bytes },
                inbound: Counters {
                    packets: 20,
                    bytes: 2 * bytes,
                },
            },
        }
    }

    #[test]
    fn flow_closed_maps_to_columns_and_nothing_is_lost() {
        let row = AuditRow::from_envelope(&closed(5, "alice", 1000));
        assert_eq!(row.kind, "flow_closed");
        assert_eq!(row.decision, "allow");
        assert_eq!(row.user, "alice");
        assert_eq!(row.groups, vec!["sre"]);
        assert_eq!(row.protocol, "tcp");
        assert_eq!((row.src_ip.as_str(), row.src_port), ("100.64.0.2", 40000));
        assert_eq!((row.dst_ip.as_str(), row.dst_port), ("10.8.0.2", 22));
        assert_eq!(row.dst_addr[10..], [0xff, 0xff, 10, 8, 0, 2]);
        assert_eq!(row.reason, "tcp_closed");
        assert_eq!((row.bytes_out, row.packets_out), (1000, 10));
        assert_eq!((row.bytes_in, row.packets_in), (2000, 20));
        assert_eq!(row.policy_ids, vec!["sre-prod"]);
        assert_eq!(row.detail, "", "every flow_closed field has a column");
    }

    #[test]
    fn other_fields_go_to_detail() {
        let env = Envelope {
            event: Event::PolicyRejected {
                errors: vec!["a.cedar:1:2: bad".into()],
            },
            ..closed(1, "x", 0)
        };
        let row = AuditRow::from_envelope(&env);
        assert_eq!(row.kind, "policy_rejected");
        assert_eq!(row.decision, "");
        assert_eq!(row.detail, r#"{"errors":["a.cedar:1:2: bad"]}"#);
    }

    #[test]
    fn chain_links_and_detects_any_change() {
        let mut chain = Chain::default();
        let mut a = AuditRow::from_envelope(&closed(1, "alice", 10));
        let mut b = AuditRow::from_envelope(&closed(2, "bob", 20));
        chain.seal(&mut a);
        chain.seal(&mut b);
        assert_eq!(a.prev_hash, GENESIS);
        assert_eq!(b.prev_hash, a.hash);
        assert_eq!(b.expected_hash(), b.hash);
        let mut edited = b.clone();
        edited.bytes_in += 1;
        assert_ne!(edited.expected_hash(), b.hash);
        let mut edited = b.clone();
        edited.policy_ids.push("x".into());
        assert_ne!(edited.expected_hash(), b.hash);
    }

    /// A record as builds before schema 4 wrote it (hashes as hex strings).
    fn record_v1(row: &AuditRow) -> Vec<u8> {
        let mut out = Vec::new();
        row.encode_canonical(&mut out);
        put_str(&mut out, &hex::encode(row.prev_hash));
        put_str(&mut out, &hex::encode(row.hash));
        out
    }

    #[test]
    fn version_1_records_decode_to_the_same_row() {
        let mut chain = Chain::default();
        for seq in 1..4 {
            let mut row = AuditRow::from_envelope(&closed(seq, "alice", seq * 10));
            chain.seal(&mut row);
            assert_eq!(AuditRow::decode(&record_v1(&row)).unwrap(), row);
        }
        let mut bad = record_v1(&AuditRow::from_envelope(&closed(1, "a", 1)));
        let at = bad.len() - 3;
        bad[at] = b'g';
        assert!(AuditRow::decode(&bad).is_err(), "a non-hex hash is refused");
    }

    #[test]
    fn seal_record_equals_seal_then_encode() {
        let (mut a, mut b) = (Chain::default(), Chain::default());
        let mut buf = Vec::new();
        for seq in 1..4 {
            let env = closed(seq, "bob", seq);
            let mut sealed = AuditRow::from_envelope(&env);
            a.seal(&mut sealed);
            let mut recorded = AuditRow::from_envelope(&env);
            b.seal_record(&mut recorded, &mut buf);
            assert_eq!(sealed, recorded);
            let mut expected = Vec::new();
            sealed.encode_record(&mut expected);
            assert_eq!(buf, expected);
        }
        assert_eq!(a, b);
    }

    /// The chain formula is part of the audit trail's format: rows written by any earlier
    /// build must keep verifying. This pins it on a fixed row.
    #[test]
    fn the_hash_formula_does_not_change() {
        let mut env = closed(42, "alice", 1000);
        env.id = uuid::Uuid::from_u64_pair(1, 2);
        env.time = chrono::DateTime::from_timestamp(1_800_000_000, 5_000).unwrap();
        let mut row = AuditRow::from_envelope(&env);
        row.prev_hash = [7; 32];
        assert_eq!(
            hex::encode(row.expected_hash()),
            "c1df6f1c11d46525ec84b1e70801dd97382314c3457b44f271790b6ffb53463c"
        );
    }

    /// The JSON route every event kind can take (what the flow fast path must equal).
    fn via_json(env: &Envelope) -> AuditRow {
        let mut row = AuditRow::base(env);
        row.map_json(&env.event);
        row
    }

    fn arb_tuple() -> impl Strategy<Value = FlowTuple> {
        (
            any::<u8>(),
            any::<std::net::IpAddr>(),
            any::<u16>(),
            any::<std::net::IpAddr>(),
            any::<u16>(),
        )
            .prop_map(|(p, src_ip, src_port, dst_ip, dst_port)| FlowTuple {
                protocol: Protocol(p),
                src_ip,
                src_port,
                dst_ip,
                dst_port,
            })
    }

    fn arb_flow_event() -> impl Strategy<Value = Event> {
        let common = (
            any::<u64>(),
            ".{0,8}",
            proptest::collection::vec(".{0,6}", 0..3),
            arb_tuple(),
            proptest::collection::vec(".{0,6}", 0..3),
            any::<u64>(),
        );
        (
            common,
            any::<u64>(),
            0u8..3,
            proptest::option::of(".{0,8}"),
            0usize..6,
        )
            .prop_map(
                |(
                    (session_id, user, groups, tuple, policy_ids, policy_epoch),
                    n,
                    kind,
                    reason,
                    close,
                )| {
                    let (device, network) = ("dev".to_string(), "prod".to_string());
                    match kind {
                        0 => Event::FlowOpened {
                            flow_id: n,
                            session_id,
                            user,
                            groups,
                            device,
                            tuple,
                            network,
                            policy_ids,
                            policy_epoch,
                            resumed: n % 2 == 1,
                        },
                        1 => Event::FlowDenied {
                            session_id,
                            user,
                            groups,
                            device,
                            tuple,
                            network,
                            policy_ids,
                            policy_epoch,
                            suppressed: n,
                            reason,
                        },
                        _ => Event::FlowClosed {
                            flow_id: n,
                            session_id,
                            user,
                            groups,
                            device,
                            tuple,
                            network,
                            policy_ids,
                            policy_epoch,
                            reason: [
                                portcullis_model::CloseReason::IdleTimeout,
                                portcullis_model::CloseReason::TcpClosed,
                                portcullis_model::CloseReason::PolicyRevoked,
                                portcullis_model::CloseReason::PeerRemoved,
                                portcullis_model::CloseReason::Evicted,
                                portcullis_model::CloseReason::Shutdown,
                            ][close],
                            duration_ms: n / 3,
                            outbound: Counters {
                                packets: n / 5,
                                bytes: n / 2,
                            },
                            inbound: Counters {
                                packets: n / 7,
                                bytes: n / 11,
                            },
                        },
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn flow_fast_path_equals_the_json_mapping(event in arb_flow_event()) {
            let mut env = closed(7, "x", 1);
            env.event = event;
            prop_assert_eq!(AuditRow::from_envelope(&env), via_json(&env));
        }

        #[test]
        fn encoding_round_trips(user in ".{0,20}", bytes in 0..u64::MAX / 2, detail in ".{0,40}") {
            let mut row = AuditRow::from_envelope(&closed(3, &user, bytes));
            row.detail = detail;
            Chain::default().seal(&mut row);
            let mut buf = Vec::new();
            row.encode_record(&mut buf);
            prop_assert_eq!(AuditRow::decode(&buf).unwrap(), row);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = AuditRow::decode(&data);
        }

        #[test]
        fn truncations_are_errors(cut in 0usize..300) {
            let mut row = AuditRow::from_envelope(&closed(3, "alice", 5));
            Chain::default().seal(&mut row);
            let mut buf = Vec::new();
            row.encode_record(&mut buf);
            let cut = cut.min(buf.len() - 1);
            prop_assert!(AuditRow::decode(&buf[..cut]).is_err());
        }
    }
}
