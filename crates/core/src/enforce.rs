//! Per-packet enforcement on plaintext IP packets: anti-spoofing, the flow table,
//! per-flow policy decisions, return traffic, fragments, timeouts, re-decision after a
//! policy or identity change, and the TCP resets that cut a flow.
//!
//! Sans-IO: every input takes `now`; outputs are polled ([`Enforcer::poll_event`],
//! [`Enforcer::poll_injected`]).
//!
//! Fragments: we track fragment ids instead of reassembling. A first fragment (offset 0)
//! carries the transport header and is decided like any packet; when it passes, its
//! (source, destination, protocol, id) is remembered for `fragment_timeout`. A later
//! fragment passes only if that record exists. A later fragment that arrives before its
//! first fragment is dropped (the sender's retransmission recovers; PMTU discovery keeps
//! TCP unfragmented), and a first fragment too short to hold the ports is malformed.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use portcullis_model::{CloseReason, Event, FlowRequest, FlowTuple, Protocol};
use portcullis_packet::{tcp_flags, Fragment, PacketMeta, Transport};
use portcullis_policy::Engine;
use rustc_hash::FxHashMap;

use crate::flow::{Flow, FlowKey, FlowState, FlowTable, PeerId, Timeouts};

/// How often a still-denied tuple or a spoofing peer is reported again.
const REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Bound on remembered denied tuples and fragment ids.
const MAX_DENY_MEMORY: usize = 65_536;
const MAX_FRAGMENTS: usize = 65_536;

/// The sending peer, as the gateway knows it.
#[derive(Clone, Copy, Debug)]
pub struct PeerCtx<'a> {
    pub id: PeerId,
    pub user: &'a Arc<str>,
    pub device: &'a Arc<str>,
    pub addresses: &'a [IpAddr],
    /// Subnets behind the peer: further inner sources it may use.
    pub routes: &'a [ipnet::IpNet],
    pub session_id: u64,
    pub sign_on: portcullis_model::SignOn,
}

/// Why a packet was not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    Malformed,
    Spoofed,
    Denied,
    /// A non-first fragment whose first fragment did not pass.
    Fragment,
    /// Inbound (from the private network) without an allowed flow.
    NoFlow,
}

/// A packet the enforcer wants sent (TCP resets when it cuts a flow).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Injected {
    /// To be encrypted and sent to the peer.
    ToPeer(PeerId, Vec<u8>),
    /// To be written to the TUN device (towards the private network).
    ToTun(Vec<u8>),
}

/// Counters, monotonically increasing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnforceStats {
    /// Decisions in which a policy errored (logged; a forbid that errors denies).
    pub policy_errors: u64,
    pub forwarded_out: u64,
    pub forwarded_in: u64,
    pub malformed: u64,
    pub spoofed: u64,
    pub denied: u64,
    pub fragments_dropped: u64,
    pub inbound_no_flow: u64,
    /// Multicast from the private side (e.g. the kernel's own MLD reports on the TUN device).
    pub inbound_multicast: u64,
    pub flows_opened: u64,
    pub flows_closed: u64,
    pub flows_evicted: u64,
    pub flows_revoked: u64,
    pub decisions: u64,
    /// First-packet decisions, timed with the clock io lends ([`Enforcer::set_decision_clock`]).
    pub decision_latency: portcullis_model::latency::Latency,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FragKey {
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    id: u32,
}

#[derive(Clone, Copy, Debug)]
struct FragEntry {
    flow: FlowKey,
    expires: Instant,
}

#[derive(Clone, Copy, Debug)]
struct DenyEntry {
    epoch: u64,
    reported: Instant,
    suppressed: u64,
}

#[derive(Clone, Copy, Debug)]
struct SpoofEntry {
    reported: Instant,
    suppressed: u64,
}

/// Flow limits and timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowLimits {
    pub max_flows: usize,
    pub max_flows_per_peer: usize,
    pub timeouts: Timeouts,
}

impl Default for FlowLimits {
    fn default() -> Self {
        FlowLimits {
            max_flows: 262_144,
            max_flows_per_peer: 8_192,
            timeouts: Timeouts::default(),
        }
    }
}

/// The enforcement state machine.
pub struct Enforcer {
    engine: Engine,
    flows: FlowTable,
    timeouts: Timeouts,
    fragments: FxHashMap<FragKey, FragEntry>,
    denied: FxHashMap<FlowKey, DenyEntry>,
    spoof: FxHashMap<PeerId, SpoofEntry>,
    events: VecDeque<Event>,
    injected: VecDeque<Injected>,
    next_flow_id: u64,
    /// Set while the audit trail cannot take events: new flows are denied (fail closed).
    audit_blocked: bool,
    /// In a cluster with sites: this node's site. Flows to another site's networks are
    /// denied here (reason `other_site`): that site's nodes serve them.
    site: Option<Arc<str>>,
    mono_anchor: Instant,
    wall_anchor: DateTime<Utc>,
    /// Reads the time only to measure decisions; no decision depends on it.
    decision_clock: Option<fn() -> Instant>,
    /// The earliest end (Unix milliseconds) of a temporary grant still in force: when the
    /// wall clock passes it, that grant's user's flows are decided again (and cut).
    next_grant_end: Option<i64>,
    pub stats: EnforceStats,
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer")
            .field("flows", &self.flows.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Enforcer {
    pub fn new(engine: Engine, limits: FlowLimits, now: Instant, wall: DateTime<Utc>) -> Self {
        Enforcer {
            engine,
            flows: FlowTable::new(limits.max_flows, limits.max_flows_per_peer),
            timeouts: limits.timeouts,
            fragments: FxHashMap::default(),
            denied: FxHashMap::default(),
            spoof: FxHashMap::default(),
            events: VecDeque::new(),
            injected: VecDeque::new(),
            next_flow_id: 1,
            audit_blocked: false,
            site: None,
            mono_anchor: now,
            wall_anchor: wall,
            decision_clock: None,
            next_grant_end: None,
            stats: EnforceStats::default(),
        }
    }

    /// Times each new flow's decision with `clock` into
    /// [`EnforceStats::decision_latency`]. The one clock the core reads itself: a
    /// duration needs two readings inside the call, and none of it reaches a decision.
    pub fn set_decision_clock(&mut self, clock: fn() -> Instant) {
        self.decision_clock = Some(clock);
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Fail closed while the audit trail cannot take events: new flows are denied (with
    /// reason `audit_unavailable`); established flows continue.
    pub fn handle_audit_blocked(&mut self, blocked: bool) {
        self.audit_blocked = blocked;
    }

    /// This node's site (see the `site` field); `None`: every network is served here.
    pub fn set_site(&mut self, site: Option<&str>) {
        self.site = site.map(Arc::from);
    }

    pub fn audit_blocked(&self) -> bool {
        self.audit_blocked
    }

    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// Re-anchors wall-clock time (policies read `context.now`).
    pub fn handle_wall_clock(&mut self, now: Instant, wall: DateTime<Utc>) {
        self.mono_anchor = now;
        self.wall_anchor = wall;
    }

    /// Wall-clock time at `now`.
    pub fn wall(&self, now: Instant) -> DateTime<Utc> {
        // Instants before the anchor (a session start, say) map backwards.
        match now.checked_duration_since(self.mono_anchor) {
            Some(after) => self.wall_anchor + chrono::Duration::from_std(after).unwrap_or_default(),
            None => {
                let before = self.mono_anchor.saturating_duration_since(now);
                self.wall_anchor - chrono::Duration::from_std(before).unwrap_or_default()
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_injected(&mut self) -> Option<Injected> {
        self.injected.pop_front()
    }

    /// A packet from a peer, towards the private network.
    pub fn handle_outbound(
        &mut self,
        now: Instant,
        peer: &PeerCtx<'_>,
        packet: &[u8],
    ) -> Result<(), Drop> {
        let meta = match portcullis_packet::parse(packet) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed += 1;
                return Err(Drop::Malformed);
            }
        };
        if !peer.addresses.contains(&meta.src) && !peer.routes.iter().any(|r| r.contains(&meta.src))
        {
            self.stats.spoofed += 1;
            self.report_spoof(now, peer, meta.src);
            return Err(Drop::Spoofed);
        }
        match meta.transport {
            Transport::Fragment => {
                return self.outbound_later_fragment(now, &meta, packet.len());
            }
            Transport::IcmpError { quoted } => {
                // The client reports an error about a server packet: quoted is server → client.
                let key = FlowKey {
                    protocol: quoted.protocol,
                    client: quoted.dst,
                    client_port: quoted.dst_port,
                    server: quoted.src,
                    server_port: quoted.src_port,
                };
                return self.outbound_related(now, &key, packet.len());
            }
            _ => {}
        }
        let (src_port, dst_port) = meta.ports();
        let key = FlowKey {
            protocol: meta.protocol,
            client: meta.src,
            client_port: src_port,
            server: meta.dst,
            server_port: dst_port,
        };
        let epoch = self.engine.epoch();
        let timeouts = self.timeouts;
        let live = match self.flows.get_mut(&key) {
            // Decided under an older policy or identity epoch: decided again below.
            Some(flow) if flow.peer == peer.id && !flow.expired(now, &timeouts) => {
                flow.epoch == epoch
            }
            Some(_) => {
                self.close(key, now, CloseReason::IdleTimeout);
                false
            }
            None => false,
        };
        if !live {
            if self.flows.get(&key).is_some() {
                // Stale epoch: re-decide; a deny closes it (with resets).
                if !self.redecide(&key, now) {
                    self.stats.denied += 1;
                    return Err(Drop::Denied);
                }
            } else {
                self.open(now, peer, key, &meta)?;
            }
        }
        let Some(flow) = self.flows.get_mut(&key) else {
            return Err(Drop::Denied);
        };
        flow.last_seen = now;
        flow.outbound.add(packet.len());
        if let Transport::Tcp {
            flags,
            seq,
            seq_len,
            ..
        } = meta.transport
        {
            flow.client_next_seq = seq.wrapping_add(seq_len);
            tcp_transition(flow, flags, true);
        }
        if let Fragment::First { id } = meta.fragment {
            self.remember_fragment(now, &meta, id, key);
        }
        self.stats.forwarded_out += 1;
        Ok(())
    }

    /// A packet from the private network. Returns the peer it belongs to.
    pub fn handle_inbound(&mut self, now: Instant, packet: &[u8]) -> Result<PeerId, Drop> {
        let meta = match portcullis_packet::parse(packet) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed += 1;
                return Err(Drop::Malformed);
            }
        };
        if meta.dst.is_multicast() {
            // Never a reply to a client flow; counted apart so `inbound_no_flow` stays meaningful.
            self.stats.inbound_multicast += 1;
            return Err(Drop::NoFlow);
        }
        match meta.transport {
            Transport::Fragment => {
                let key = self.later_fragment_key(now, &meta);
                return match key {
                    Some(k) => self.inbound_hit(now, &k, None, packet.len()),
                    None => {
                        self.stats.fragments_dropped += 1;
                        Err(Drop::Fragment)
                    }
                };
            }
            Transport::IcmpError { quoted } => {
                // Quoted is the client's packet: client → server.
                let key = FlowKey {
                    protocol: quoted.protocol,
                    client: quoted.src,
                    client_port: quoted.src_port,
                    server: quoted.dst,
                    server_port: quoted.dst_port,
                };
                if key.client != meta.dst {
                    self.stats.inbound_no_flow += 1;
                    return Err(Drop::NoFlow);
                }
                return self.inbound_related(now, &key, packet.len());
            }
            _ => {}
        }
        let (src_port, dst_port) = meta.ports();
        let key = FlowKey {
            protocol: meta.protocol,
            client: meta.dst,
            client_port: dst_port,
            server: meta.src,
            server_port: src_port,
        };
        let peer = self.inbound_hit(now, &key, Some(&meta), packet.len())?;
        if let Fragment::First { id } = meta.fragment {
            self.remember_fragment(now, &meta, id, key);
        }
        Ok(peer)
    }

    fn inbound_hit(
        &mut self,
        now: Instant,
        key: &FlowKey,
        meta: Option<&PacketMeta>,
        len: usize,
    ) -> Result<PeerId, Drop> {
        let epoch = self.engine.epoch();
        let timeouts = self.timeouts;
        let stale = match self.flows.get(key) {
            None => {
                self.stats.inbound_no_flow += 1;
                return Err(Drop::NoFlow);
            }
            Some(f) if f.expired(now, &timeouts) => {
                self.close(*key, now, CloseReason::IdleTimeout);
                self.stats.inbound_no_flow += 1;
                return Err(Drop::NoFlow);
            }
            Some(f) => f.epoch != epoch,
        };
        if stale && !self.redecide(key, now) {
            self.stats.inbound_no_flow += 1;
            return Err(Drop::NoFlow);
        }
        let Some(flow) = self.flows.get_mut(key) else {
            self.stats.inbound_no_flow += 1;
            return Err(Drop::NoFlow);
        };
        // An ICMP echo request from the server side is not a reply: only replies return.
        if let Some(PacketMeta {
            transport: Transport::IcmpEcho { request: true, .. },
            ..
        }) = meta
        {
            self.stats.inbound_no_flow += 1;
            return Err(Drop::NoFlow);
        }
        flow.last_seen = now;
        flow.inbound.add(len);
        if let Some(PacketMeta {
            transport:
                Transport::Tcp {
                    flags,
                    seq,
                    seq_len,
                    ..
                },
            ..
        }) = meta
        {
            flow.server_next_seq = seq.wrapping_add(*seq_len);
            flow.server_seq_known = true;
            tcp_transition(flow, *flags, false);
        }
        self.stats.forwarded_in += 1;
        Ok(flow.peer)
    }

    fn inbound_related(&mut self, now: Instant, key: &FlowKey, len: usize) -> Result<PeerId, Drop> {
        let timeouts = self.timeouts;
        match self.flows.get_mut(key) {
            Some(f) if !f.expired(now, &timeouts) && f.epoch == self.engine.epoch() => {
                f.inbound.add(len);
                self.stats.forwarded_in += 1;
                Ok(f.peer)
            }
            _ => {
                self.stats.inbound_no_flow += 1;
                Err(Drop::NoFlow)
            }
        }
    }

    /// An outbound ICMP error about a flow's packet: passes when the flow is live.
    fn outbound_related(&mut self, now: Instant, key: &FlowKey, len: usize) -> Result<(), Drop> {
        let timeouts = self.timeouts;
        match self.flows.get_mut(key) {
            Some(f) if !f.expired(now, &timeouts) && f.epoch == self.engine.epoch() => {
                f.outbound.add(len);
                self.stats.forwarded_out += 1;
                Ok(())
            }
            _ => {
                self.stats.denied += 1;
                Err(Drop::Denied)
            }
        }
    }

    fn open(
        &mut self,
        now: Instant,
        peer: &PeerCtx<'_>,
        key: FlowKey,
        meta: &PacketMeta,
    ) -> Result<(), Drop> {
        let epoch = self.engine.epoch();
        // A tuple denied under this epoch is not decided again until the report interval.
        if let Some(d) = self.denied.get_mut(&key) {
            if d.epoch == epoch && now.saturating_duration_since(d.reported) < REPORT_INTERVAL {
                d.suppressed += 1;
                self.stats.denied += 1;
                return Err(Drop::Denied);
            }
        }
        let dst_port = match meta.transport {
            Transport::Tcp { dst_port, .. } | Transport::Udp { dst_port, .. } => dst_port,
            _ => 0,
        };
        let request = FlowRequest {
            src_ip: key.client,
            dst_ip: key.server,
            dst_port,
            protocol: key.protocol,
            device: peer.device.to_string(),
            mfa: peer.sign_on.mfa,
            authenticated_at: peer.sign_on.at,
        };
        self.stats.decisions += 1;
        let started = self.decision_clock.map(|clock| (clock, clock()));
        let groups: Arc<[String]> = self
            .engine
            .user(peer.user)
            .map(|p| Arc::from(p.groups.as_slice()))
            .unwrap_or_else(|| Arc::from(Vec::new()));
        let networks = self.engine.bundle().networks();
        let other_site = self
            .site
            .as_deref()
            .is_some_and(|ours| networks.site_for(key.server).is_some_and(|s| s != ours));
        let (decision, reason) = if self.audit_blocked || other_site {
            let network = networks.resolve(key.server).to_string();
            (
                Arc::new(portcullis_model::Decision::deny_default(network)),
                Some(
                    if self.audit_blocked {
                        "audit_unavailable"
                    } else {
                        "other_site"
                    }
                    .to_string(),
                ),
            )
        } else {
            (
                self.engine.decide(peer.user, &request, self.wall(now)),
                None,
            )
        };
        if let Some((clock, t0)) = started {
            self.stats
                .decision_latency
                .observe(clock().saturating_duration_since(t0));
        }
        let tuple = tuple_of(&key);
        if !decision.errors.is_empty() {
            self.stats.policy_errors += 1;
            tracing::warn!(user = %peer.user, network = %decision.network, errors = ?decision.errors, allowed = decision.allowed, "policy evaluation error (a forbid that errors denies)");
        }
        if !decision.allowed {
            let decision = Arc::unwrap_or_clone(decision);
            let reason = reason.or_else(|| policy_error_reason(&decision.errors));
            let suppressed = self.denied.remove(&key).map(|d| d.suppressed).unwrap_or(0);
            if self.denied.len() >= MAX_DENY_MEMORY {
                self.denied.clear();
            }
            self.denied.insert(
                key,
                DenyEntry {
                    epoch,
                    reported: now,
                    suppressed: 0,
                },
            );
            self.events.push_back(Event::FlowDenied {
                session_id: peer.session_id,
                user: peer.user.to_string(),
                groups: groups.to_vec(),
                device: peer.device.to_string(),
                tuple,
                network: decision.network,
                policy_ids: decision.policy_ids,
                policy_epoch: epoch,
                suppressed,
                reason,
            });
            self.stats.denied += 1;
            return Err(Drop::Denied);
        }
        for (k, f) in self.flows.make_room(peer.id, now, &self.timeouts) {
            self.stats.flows_evicted += 1;
            self.report_closed(&k, f, now, CloseReason::Evicted);
        }
        let id = self.next_flow_id;
        self.next_flow_id += 1;
        let state = match meta.transport {
            Transport::Tcp { flags, .. } if flags & tcp_flags::SYN != 0 => FlowState::TcpSynSent,
            Transport::Tcp { .. } => FlowState::TcpEstablished,
            Transport::Udp { .. } => FlowState::Udp,
            Transport::IcmpEcho { .. } | Transport::IcmpOther { .. } => FlowState::Icmp,
            _ => FlowState::Other,
        };
        self.events.push_back(Event::FlowOpened {
            flow_id: id,
            session_id: peer.session_id,
            user: peer.user.to_string(),
            groups: groups.to_vec(),
            device: peer.device.to_string(),
            tuple,
            network: decision.network.clone(),
            policy_ids: decision.policy_ids.clone(),
            policy_epoch: epoch,
            resumed: state == FlowState::TcpEstablished,
        });
        self.flows.insert(
            key,
            Flow {
                id,
                peer: peer.id,
                session_id: peer.session_id,
                user: peer.user.clone(),
                groups,
                device: peer.device.clone(),
                sign_on: peer.sign_on,
                created: now,
                last_seen: now,
                state,
                decision,
                epoch,
                outbound: Default::default(),
                inbound: Default::default(),
                fin_out: false,
                fin_in: false,
                client_next_seq: 0,
                server_next_seq: 0,
                server_seq_known: false,
            },
        );
        self.stats.flows_opened += 1;
        Ok(())
    }

    /// Decides an existing flow again under the current epoch. Returns whether it stays.
    fn redecide(&mut self, key: &FlowKey, now: Instant) -> bool {
        let epoch = self.engine.epoch();
        let wall = self.wall(now);
        let Some(flow) = self.flows.get(key) else {
            return false;
        };
        let dst_port = if matches!(key.protocol, Protocol::TCP | Protocol::UDP) {
            key.server_port
        } else {
            0
        };
        let request = FlowRequest {
            src_ip: key.client,
            dst_ip: key.server,
            dst_port,
            protocol: key.protocol,
            device: flow.device.to_string(),
            mfa: flow.sign_on.mfa,
            authenticated_at: flow.sign_on.at,
        };
        self.stats.decisions += 1;
        let decision = self.engine.decide(&flow.user, &request, wall);
        if decision.allowed {
            if let Some(flow) = self.flows.get_mut(key) {
                flow.epoch = epoch;
                flow.decision = decision;
            }
            true
        } else {
            self.stats.flows_revoked += 1;
            self.cut(*key, now, CloseReason::PolicyRevoked);
            false
        }
    }

    /// Re-decides every flow now (after a policy or identity change), cutting the denied
    /// ones. Returns how many were cut.
    pub fn redecide_all(&mut self, now: Instant) -> usize {
        let epoch = self.engine.epoch();
        let keys: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, f)| f.epoch != epoch)
            .map(|(k, _)| *k)
            .collect();
        keys.iter().filter(|k| !self.redecide(k, now)).count()
    }

    /// Applies a new policy bundle and re-decides all flows. Returns flows cut.
    pub fn handle_policy_bundle(
        &mut self,
        now: Instant,
        bundle: Arc<portcullis_policy::PolicyBundle>,
    ) -> Result<usize, portcullis_policy::EntitiesError> {
        let policies = bundle.policies().len();
        let networks = bundle.networks().len();
        self.engine.set_bundle(bundle)?;
        self.denied.clear();
        let cut = self.redecide_all(now);
        self.events.push_back(Event::PolicyLoaded {
            policy_epoch: self.engine.epoch(),
            policies,
            networks,
            flows_cut: cut,
        });
        Ok(cut)
    }

    /// Adds or changes a user (groups, tags) and re-decides its flows at once.
    pub fn handle_user_upsert(
        &mut self,
        now: Instant,
        user: portcullis_model::Principal,
    ) -> Result<usize, portcullis_policy::EntitiesError> {
        self.engine.upsert_user(user)?;
        self.denied.clear();
        Ok(self.redecide_all(now))
    }

    /// Removes a user from the policy entities and cuts all its flows.
    pub fn handle_user_removed(
        &mut self,
        now: Instant,
        name: &str,
    ) -> Result<usize, portcullis_policy::EntitiesError> {
        self.engine.remove_user(name)?;
        self.denied.clear();
        Ok(self.redecide_all(now))
    }

    fn flows_of(&self, peer: PeerId) -> Vec<FlowKey> {
        self.flows
            .iter()
            .filter(|(_, f)| f.peer == peer)
            .map(|(k, _)| *k)
            .collect()
    }

    /// A new sign-on for `peer`'s device: its flows are decided again with it at once
    /// (a sign-on without the second factor a policy asks for cuts them). Returns how
    /// many were cut.
    pub fn handle_sign_on(
        &mut self,
        now: Instant,
        peer: PeerId,
        sign_on: portcullis_model::SignOn,
    ) -> usize {
        let keys = self.flows_of(peer);
        for k in &keys {
            if let Some(f) = self.flows.get_mut(k) {
                f.sign_on = sign_on;
            }
        }
        self.denied.clear();
        keys.iter().filter(|k| !self.redecide(k, now)).count()
    }

    /// Replaces the temporary grants (approved access requests). The flows of every user
    /// whose grants changed are decided again at once: a revoked grant cuts what only it
    /// allowed. Returns how many flows were cut.
    pub fn handle_grants(&mut self, now: Instant, grants: Vec<portcullis_model::Grant>) -> usize {
        let wall = self.wall(now).timestamp_millis();
        let before: Vec<portcullis_model::Grant> = self.engine.grants().iter().cloned().collect();
        let mut changed: rustc_hash::FxHashSet<String> = rustc_hash::FxHashSet::default();
        for g in before.iter().filter(|g| !grants.contains(g)) {
            changed.insert(g.user.clone());
        }
        for g in grants.iter().filter(|g| !before.contains(g)) {
            changed.insert(g.user.clone());
        }
        self.next_grant_end = grants.iter().map(|g| g.end_ms).filter(|e| *e > wall).min();
        self.engine
            .set_grants(portcullis_policy::grants::Grants::new(grants));
        self.denied.clear();
        self.redecide_users(now, |u| changed.contains(u))
    }

    /// When the next grant ends (Unix milliseconds), if one is in force.
    pub fn poll_grant_end(&self) -> Option<i64> {
        self.next_grant_end
    }

    /// Ends the grants whose time is up: their users' flows are decided again now (the
    /// engine's window check no longer matches) and the ones only a grant allowed are cut,
    /// with resets. Cheap when no grant is due. Returns how many flows were cut.
    pub fn handle_grant_timer(&mut self, now: Instant) -> usize {
        let wall = self.wall(now).timestamp_millis();
        // Every grant ending since the last firing ends at or after `due`.
        let due = match self.next_grant_end {
            Some(end) if end <= wall => end,
            _ => return 0,
        };
        let ended: rustc_hash::FxHashSet<String> = self
            .engine
            .grants()
            .iter()
            .filter(|g| g.end_ms >= due && g.end_ms <= wall)
            .map(|g| g.user.clone())
            .collect();
        self.next_grant_end = self
            .engine
            .grants()
            .iter()
            .map(|g| g.end_ms)
            .filter(|e| *e > wall)
            .min();
        self.denied.clear();
        self.redecide_users(now, |u| ended.contains(u))
    }

    fn redecide_users(&mut self, now: Instant, affected: impl Fn(&str) -> bool) -> usize {
        let keys: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, f)| affected(f.user.as_ref()))
            .map(|(k, _)| *k)
            .collect();
        keys.iter().filter(|k| !self.redecide(k, now)).count()
    }

    /// Cuts every flow of a peer (it is being removed). Resets are injected first.
    pub fn handle_peer_removed(&mut self, now: Instant, peer: PeerId) -> usize {
        let keys = self.flows_of(peer);
        for k in &keys {
            self.cut(*k, now, CloseReason::PeerRemoved);
        }
        self.spoof.remove(&peer);
        keys.len()
    }

    /// Expires idle flows and fragment records.
    pub fn handle_timeout(&mut self, now: Instant) {
        let t = self.timeouts;
        let expired = self.flows.drain_where(|_, f| f.expired(now, &t));
        for (k, f) in expired {
            let reason = if f.state == FlowState::TcpClosing {
                CloseReason::TcpClosed
            } else {
                CloseReason::IdleTimeout
            };
            self.report_closed(&k, f, now, reason);
        }
        self.fragments.retain(|_, e| e.expires > now);
        self.denied
            .retain(|_, d| now.saturating_duration_since(d.reported) < REPORT_INTERVAL * 6);
    }

    /// Closes every flow (shutdown), reporting each.
    pub fn close_all(&mut self, now: Instant, reason: CloseReason) {
        for (k, f) in self.flows.drain_where(|_, _| true) {
            self.report_closed(&k, f, now, reason);
        }
    }

    fn close(&mut self, key: FlowKey, now: Instant, reason: CloseReason) {
        if let Some(f) = self.flows.remove(&key) {
            self.report_closed(&key, f, now, reason);
        }
    }

    /// Closes a flow and, for TCP, injects resets both ways so both ends stop at once.
    fn cut(&mut self, key: FlowKey, now: Instant, reason: CloseReason) {
        let Some(f) = self.flows.remove(&key) else {
            return;
        };
        if key.protocol == Protocol::TCP && f.state != FlowState::TcpClosing {
            if f.server_seq_known {
                if let Some(rst) = portcullis_packet::build_tcp_rst(
                    key.server,
                    key.server_port,
                    key.client,
                    key.client_port,
                    f.server_next_seq,
                ) {
                    self.injected.push_back(Injected::ToPeer(f.peer, rst));
                }
            }
            if let Some(rst) = portcullis_packet::build_tcp_rst(
                key.client,
                key.client_port,
                key.server,
                key.server_port,
                f.client_next_seq,
            ) {
                self.injected.push_back(Injected::ToTun(rst));
            }
        }
        self.report_closed(&key, f, now, reason);
    }

    fn report_closed(&mut self, key: &FlowKey, f: Flow, now: Instant, reason: CloseReason) {
        self.stats.flows_closed += 1;
        self.events.push_back(Event::FlowClosed {
            flow_id: f.id,
            session_id: f.session_id,
            user: f.user.to_string(),
            groups: f.groups.to_vec(),
            device: f.device.to_string(),
            tuple: tuple_of(key),
            network: f.decision.network.clone(),
            policy_ids: f.decision.policy_ids.clone(),
            policy_epoch: f.epoch,
            reason,
            duration_ms: now.saturating_duration_since(f.created).as_millis() as u64,
            outbound: f.outbound,
            inbound: f.inbound,
        });
    }

    fn report_spoof(&mut self, now: Instant, peer: &PeerCtx<'_>, claimed: IpAddr) {
        let entry = self.spoof.entry(peer.id).or_insert(SpoofEntry {
            reported: now.checked_sub(REPORT_INTERVAL).unwrap_or(now),
            suppressed: 0,
        });
        let first = entry.suppressed == 0 && entry.reported + REPORT_INTERVAL <= now;
        if first || now.saturating_duration_since(entry.reported) >= REPORT_INTERVAL {
            let suppressed = entry.suppressed;
            entry.reported = now;
            entry.suppressed = 0;
            self.events.push_back(Event::SpoofDropped {
                user: peer.user.to_string(),
                device: peer.device.to_string(),
                claimed_src: claimed,
                assigned: peer.addresses.to_vec(),
                suppressed,
            });
        } else {
            entry.suppressed += 1;
        }
    }

    fn remember_fragment(&mut self, now: Instant, meta: &PacketMeta, id: u32, flow: FlowKey) {
        if self.fragments.len() >= MAX_FRAGMENTS {
            self.fragments.retain(|_, e| e.expires > now);
            if self.fragments.len() >= MAX_FRAGMENTS {
                return; // later fragments of this packet will be dropped: fail closed
            }
        }
        self.fragments.insert(
            FragKey {
                src: meta.src,
                dst: meta.dst,
                protocol: meta.protocol,
                id,
            },
            FragEntry {
                flow,
                expires: now + self.timeouts.fragment,
            },
        );
    }

    fn later_fragment_key(&self, now: Instant, meta: &PacketMeta) -> Option<FlowKey> {
        let Fragment::Later { id } = meta.fragment else {
            return None;
        };
        self.fragments
            .get(&FragKey {
                src: meta.src,
                dst: meta.dst,
                protocol: meta.protocol,
                id,
            })
            .filter(|e| e.expires > now)
            .map(|e| e.flow)
    }

    fn outbound_later_fragment(
        &mut self,
        now: Instant,
        meta: &PacketMeta,
        len: usize,
    ) -> Result<(), Drop> {
        let live = self.later_fragment_key(now, meta).and_then(|key| {
            let epoch = self.engine.epoch();
            self.flows.get_mut(&key).filter(|f| f.epoch == epoch)
        });
        match live {
            Some(f) => {
                f.last_seen = now;
                f.outbound.add(len);
                self.stats.forwarded_out += 1;
                Ok(())
            }
            None => {
                self.stats.fragments_dropped += 1;
                Err(Drop::Fragment)
            }
        }
    }
}

fn tcp_transition(flow: &mut Flow, flags: u8, from_client: bool) {
    if flags & tcp_flags::RST != 0 {
        flow.state = FlowState::TcpClosing;
        return;
    }
    if flags & tcp_flags::FIN != 0 {
        if from_client {
            flow.fin_out = true;
        } else {
            flow.fin_in = true;
        }
    }
    flow.state = match flow.state {
        FlowState::TcpSynSent if !from_client && flags & tcp_flags::ACK != 0 => {
            FlowState::TcpEstablished
        }
        FlowState::TcpSynSent => FlowState::TcpSynSent,
        FlowState::TcpEstablished | FlowState::TcpHalfClosed if flow.fin_out && flow.fin_in => {
            FlowState::TcpClosing
        }
        FlowState::TcpEstablished if flow.fin_out || flow.fin_in => FlowState::TcpHalfClosed,
        other => other,
    };
}

fn tuple_of(key: &FlowKey) -> FlowTuple {
    FlowTuple {
        protocol: key.protocol,
        src_ip: key.client,
        src_port: key.client_port,
        dst_ip: key.server,
        dst_port: key.server_port,
    }
}

/// The `reason` of a deny that a policy error took part in: `policy_error: <first error>`
/// (cut to 300 characters; the log has them all).
fn policy_error_reason(errors: &[String]) -> Option<String> {
    let first = errors.first()?;
    let mut reason = format!("policy_error: {first}");
    if reason.len() > 300 {
        let cut = (0..=300)
            .rev()
            .find(|i| reason.is_char_boundary(*i))
            .unwrap_or(0);
        reason.truncate(cut);
    }
    Some(reason)
}
