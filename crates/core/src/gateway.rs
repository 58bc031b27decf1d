//! The gateway state machine: WireGuard peers (one boringtun `noise::Tunn` each), sessions,
//! and the [`Enforcer`] between the tunnel and the private network.
//!
//! Inputs: [`Gateway::handle_datagram`] (UDP from a client), [`Gateway::handle_tun_packet`]
//! (IP from the private network), [`Gateway::handle_timeout`], and the control inputs
//! (policy bundle, user upsert/revoke, peer add/remove). Outputs: the return values of the
//! two packet inputs (the hot path, no allocation), then [`Gateway::poll_transmit`] (UDP
//! datagrams: handshakes, cookies, keepalives, injected resets), [`Gateway::poll_tun_packet`]
//! and [`Gateway::poll_event`].
//!
//! The control inputs (policy, identity, devices, kills) are in `gateway/control.rs`.
//!
//! Time: our own timers (flows, sessions) use the `now` passed in. boringtun's `Tunn`
//! keeps its own monotonic clock for the WireGuard protocol timers (rekey, keepalive,
//! handshake expiry); we drive it through `update_timers` from `handle_timeout`.
//!
//! Peer lookup: a handshake initiation is opened with `parse_handshake_anon` to learn the
//! sender's static key; every other message carries our receiver index, whose upper 24
//! bits identify the device on every node of a cluster ([`crate::resume::wire_index`];
//! boringtun shifts the index we give it left by 8). A transport packet for a session this
//! node does not have (another node's, before a failover) makes it initiate a handshake
//! to the device, rate-limited ([`crate::resume`]). All
//! messages first pass the gateway-wide rate limiter, which answers with cookie replies
//! when handshakes exceed the limit; its counter is reset every second.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use chrono::{DateTime, Utc};
use ipnet::IpNet;
use portcullis_model::{CloseReason, Counters, Event, Principal};
use portcullis_policy::{Engine, PolicyBundle};
use rustc_hash::FxHashMap;

use crate::enforce::{Enforcer, FlowLimits, Injected, PeerCtx};
use crate::flow::PeerId;
use crate::resume::{wire_index, ResumeLimiter};

mod control;

/// Handshake initiations per second, gateway-wide, before cookie replies are required.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// How often boringtun's timers are driven.
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// Largest buffer a datagram or packet needs: MTU 9000 plus WireGuard overhead.
pub const MAX_PACKET: usize = 9000 + 32 + 16;

/// A device allowed to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub user: String,
    pub public_key: [u8; 32],
    /// Tunnel addresses assigned to the device (IPv4 and optionally IPv6).
    pub addresses: Vec<IpAddr>,
    /// Subnets behind the peer (a site's router; AllowedIPs on our side): the inner
    /// sources it may use besides its addresses. No two peers' routes overlap.
    pub routes: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// The device's sign-on (static peers: never, no second factor).
    pub sign_on: portcullis_model::SignOn,
}

/// Gateway settings.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub private_key: [u8; 32],
    pub limits: FlowLimits,
    pub session_idle_timeout: Duration,
}

/// A UDP datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// Counters of the WireGuard layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WgStats {
    pub datagrams: u64,
    pub malformed_datagrams: u64,
    pub unknown_peer: u64,
    pub wg_errors: u64,
    pub cookie_replies: u64,
    pub handshakes: u64,
    pub tun_no_peer: u64,
    pub no_endpoint: u64,
    /// Datagrams from a configured device whose user is unknown or revoked.
    pub inactive_peer: u64,
    /// Handshakes this node initiated to take over another node's session.
    pub resume_handshakes: u64,
    /// Takeover handshakes not sent (the per-device interval or the gateway's budget).
    pub resume_limited: u64,
}

/// A live session, as `sessions list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: u64,
    pub user: String,
    pub device: String,
    pub endpoint: SocketAddr,
    pub started: DateTime<Utc>,
    pub rx: Counters,
    pub tx: Counters,
}

/// What applying an identity change cut.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityOutcome {
    pub sessions_cut: u64,
    pub flows_cut: u64,
    /// From the request arriving to every session and flow of the user being gone.
    pub latency: Duration,
    /// Set when the policy entities refused the user's new data: the user was revoked
    /// instead (fail closed), and this says why.
    pub refused: Option<String>,
}

#[derive(Debug)]
struct Session {
    id: u64,
    started: Instant,
    last_rx: Instant,
    endpoint: SocketAddr,
    rx: Counters,
    tx: Counters,
}

struct Peer {
    spec: PeerSpec,
    /// The upper 24 bits of our receiver index for this device.
    index: u32,
    /// When this node last initiated a takeover handshake to the device.
    resume_sent: Option<Instant>,
    /// The next session starts from such a handshake.
    resuming: bool,
    user: Arc<str>,
    device: Arc<str>,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    session: Option<Session>,
    /// Whether the device's user is known and active. A disabled peer gets no handshake
    /// answer (a configured device waiting for its user, or a revoked one).
    enabled: bool,
}

/// The sans-IO gateway.
pub struct Gateway {
    secret: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    peers: Vec<Option<Peer>>,
    by_key: FxHashMap<[u8; 32], PeerId>,
    by_addr: FxHashMap<IpAddr, PeerId>,
    /// Every peer's routes, for the overlap check (few: one entry per routed subnet).
    routes: Vec<(IpNet, PeerId)>,
    /// Receiver index (upper 24 bits) → peer.
    by_index: FxHashMap<u32, PeerId>,
    resume: ResumeLimiter,
    enforcer: Enforcer,
    session_idle_timeout: Duration,
    next_session_id: u64,
    next_tick: Instant,
    next_second: Instant,
    transmits: VecDeque<Transmit>,
    tun_out: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    scratch: Vec<u8>,
    pub stats: WgStats,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("peers", &self.by_key.len())
            .field("enforcer", &self.enforcer)
            .field("stats", &self.stats)
            .finish()
    }
}

/// Errors of control inputs.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("peer {0} is already configured")]
    DuplicatePeer(String),
    #[error("tunnel address {0} is already assigned to another peer")]
    DuplicateAddress(IpAddr),
    #[error("too many peers")]
    TooManyPeers,
    /// A route of a new peer overlaps a route or an address of another.
    #[error("route {route} of {user} overlaps {other} of {other_user}")]
    RouteOverlap {
        user: String,
        route: IpNet,
        other_user: String,
        /// The other peer's route, or its address as a host prefix.
        other: IpNet,
    },
    #[error(transparent)]
    Entities(#[from] portcullis_policy::EntitiesError),
}

impl Gateway {
    pub fn new(
        config: GatewayConfig,
        bundle: Arc<PolicyBundle>,
        users: Vec<Principal>,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Result<Gateway, ControlError> {
        let secret = StaticSecret::from(config.private_key);
        let public = PublicKey::from(&secret);
        let engine = Engine::new(bundle, users)?;
        Ok(Gateway {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            peers: Vec::new(),
            by_key: FxHashMap::default(),
            by_addr: FxHashMap::default(),
            routes: Vec::new(),
            by_index: FxHashMap::default(),
            resume: ResumeLimiter::new(),
            enforcer: Enforcer::new(engine, config.limits, now, wall),
            session_idle_timeout: config.session_idle_timeout,
            // Session ids stay unique across restarts of this gateway (the audit trail
            // keys sessions on them): they start at the start time in microseconds.
            next_session_id: wall.timestamp_micros().max(1) as u64,
            next_tick: now,
            next_second: now,
            transmits: VecDeque::new(),
            tun_out: VecDeque::new(),
            events: VecDeque::new(),
            scratch: vec![0; MAX_PACKET],
            stats: WgStats::default(),
        })
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    pub fn enforcer(&self) -> &Enforcer {
        &self.enforcer
    }

    /// Whether this node takes over other nodes' sessions itself ([`crate::resume`]).
    pub fn set_resume_sessions(&mut self, enabled: bool) {
        self.resume.set_enabled(enabled);
    }

    /// See [`Enforcer::set_site`].
    pub fn set_site(&mut self, site: Option<&str>) {
        self.enforcer.set_site(site);
    }

    /// See [`Enforcer::set_decision_clock`].
    pub fn set_decision_clock(&mut self, clock: fn() -> Instant) {
        self.enforcer.set_decision_clock(clock);
    }

    /// Re-anchors wall-clock time; call about once a second.
    /// See [`Enforcer::handle_audit_blocked`].
    pub fn handle_audit_blocked(&mut self, blocked: bool) {
        self.enforcer.handle_audit_blocked(blocked);
    }

    pub fn handle_wall_clock(&mut self, now: Instant, wall: DateTime<Utc>) {
        self.enforcer.handle_wall_clock(now, wall);
    }

    /// Adds a device. It can connect at once.
    pub fn handle_peer_add(&mut self, spec: PeerSpec) -> Result<PeerId, ControlError> {
        if self.by_key.contains_key(&spec.public_key) {
            return Err(ControlError::DuplicatePeer(b64(&spec.public_key)));
        }
        if let Some(a) = spec.addresses.iter().find(|a| self.by_addr.contains_key(a)) {
            return Err(ControlError::DuplicateAddress(*a));
        }
        self.check_routes(&spec)?;
        let slot = match self.peers.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.peers.push(None);
                self.peers.len() - 1
            }
        };
        let id = PeerId(
            u32::try_from(slot)
                .ok()
                .filter(|i| *i < (1 << 24))
                .ok_or(ControlError::TooManyPeers)?,
        );
        // boringtun keeps 8 bits of the index for itself; we own the upper 24: the same
        // on every node for a device (from its address), else a free one from the top
        // (such a device's sessions cannot be taken over by another node).
        let index = wire_index(&spec.addresses)
            .filter(|i| !self.by_index.contains_key(i))
            .or_else(|| {
                (0..1u32 << 24)
                    .rev()
                    .find(|i| !self.by_index.contains_key(i))
            })
            .ok_or(ControlError::TooManyPeers)?;
        let tunn = self.new_tunn(&spec, index);
        for a in &spec.addresses {
            self.by_addr.insert(*a, id);
        }
        self.routes.extend(spec.routes.iter().map(|r| (*r, id)));
        self.by_index.insert(index, id);
        self.by_key.insert(spec.public_key, id);
        let device: Arc<str> = b64(&spec.public_key).into();
        self.events.push_back(Event::PeerAdded {
            user: spec.user.clone(),
            device: device.to_string(),
        });
        let peer = Peer {
            index,
            resume_sent: None,
            resuming: false,
            user: spec.user.as_str().into(),
            device,
            enabled: self.enforcer.engine().user(&spec.user).is_some(),
            spec,
            tunn,
            endpoint: None,
            session: None,
        };
        if let Some(s) = self.peers.get_mut(slot) {
            *s = Some(peer);
        }
        Ok(id)
    }

    /// Removes a device: its flows are cut (with resets), its session ends.
    pub fn handle_peer_remove(
        &mut self,
        now: Instant,
        public_key: &[u8; 32],
        reason: &str,
    ) -> bool {
        let Some(id) = self.by_key.get(public_key).copied() else {
            return false;
        };
        self.enforcer.handle_peer_removed(now, id);
        self.flush_injected();
        self.end_session(id, now, reason);
        let Some(peer) = self.peers.get_mut(id.0 as usize).and_then(Option::take) else {
            return false;
        };
        self.by_key.remove(public_key);
        self.by_index.remove(&peer.index);
        for a in &peer.spec.addresses {
            self.by_addr.remove(a);
        }
        self.routes.retain(|(_, owner)| *owner != id);
        self.events.push_back(Event::PeerRemoved {
            user: peer.spec.user,
            device: peer.device.to_string(),
            reason: reason.into(),
        });
        true
    }

    /// A new peer's routes overlap no other peer's route or address, and its addresses
    /// lie in no other peer's route: every inner source has one owner.
    fn check_routes(&self, spec: &PeerSpec) -> Result<(), ControlError> {
        let user_of = |id: PeerId| {
            self.peers
                .get(id.0 as usize)
                .and_then(Option::as_ref)
                .map_or_else(String::new, |p| p.spec.user.clone())
        };
        let overlap = |a: &IpNet, b: &IpNet| a.contains(&b.network()) || b.contains(&a.network());
        for route in &spec.routes {
            if let Some((other, owner)) = self.routes.iter().find(|(o, _)| overlap(route, o)) {
                return Err(ControlError::RouteOverlap {
                    user: spec.user.clone(),
                    route: *route,
                    other_user: user_of(*owner),
                    other: *other,
                });
            }
            if let Some((addr, owner)) = self.by_addr.iter().find(|(a, _)| route.contains(*a)) {
                return Err(ControlError::RouteOverlap {
                    user: spec.user.clone(),
                    route: *route,
                    other_user: user_of(*owner),
                    other: IpNet::from(*addr),
                });
            }
        }
        for addr in &spec.addresses {
            if let Some((other, owner)) = self.routes.iter().find(|(o, _)| o.contains(addr)) {
                return Err(ControlError::RouteOverlap {
                    user: spec.user.clone(),
                    route: IpNet::from(*addr),
                    other_user: user_of(*owner),
                    other: *other,
                });
            }
        }
        Ok(())
    }

    fn new_tunn(&self, spec: &PeerSpec, index: u32) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            PublicKey::from(spec.public_key),
            None,
            spec.persistent_keepalive,
            index,
            None,
        )
    }

    /// A UDP datagram from `from`. Returns a decrypted packet to write to the TUN device.
    pub fn handle_datagram<'b>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &'b mut [u8],
    ) -> Option<&'b [u8]> {
        self.stats.datagrams += 1;
        let mut transport = false;
        let id = match self
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, &mut self.scratch)
        {
            Ok(Packet::HandshakeInit(init)) => {
                match parse_handshake_anon(&self.secret, &self.public, &init) {
                    Ok(half) => self.by_key.get(&half.peer_static_public).copied(),
                    Err(_) => None,
                }
            }
            Ok(Packet::HandshakeResponse(p)) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Ok(Packet::PacketCookieReply(p)) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Ok(Packet::PacketData(p)) => {
                transport = true;
                self.by_index.get(&(p.receiver_idx >> 8)).copied()
            }
            Err(TunnResult::WriteToNetwork(cookie)) => {
                self.stats.cookie_replies += 1;
                self.transmits.push_back(Transmit {
                    dst: from,
                    payload: cookie.to_vec(),
                });
                return None;
            }
            Err(_) => {
                self.stats.malformed_datagrams += 1;
                return None;
            }
        };
        let Some(id) = id else {
            self.stats.unknown_peer += 1;
            return None;
        };
        let Some(peer) = self.peers.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            self.stats.unknown_peer += 1;
            return None;
        };
        if !peer.enabled {
            self.stats.inactive_peer += 1;
            return None;
        }
        let result = peer.tunn.decapsulate(Some(from.ip()), datagram, out);
        if !matches!(result, TunnResult::Err(_)) {
            // Authenticated: endpoint roaming, session start, counters.
            peer.touch(
                now,
                from,
                datagram.len(),
                &mut self.next_session_id,
                &mut self.events,
            );
        }
        match result {
            TunnResult::Done => None,
            TunnResult::Err(e) => {
                self.stats.wg_errors += 1;
                if matches!(e, WireGuardError::UnderLoad) {
                    self.stats.cookie_replies += 1;
                }
                // A session this node never had (another node's, before a failover):
                // take it over now rather than after the client's ~15 s. Nodes hand out
                // the same receiver indexes, so another node's session may also land on
                // an old one of ours and fail its counter or tag: that counts too when
                // this node has not heard from the device for a while (while it has, a
                // failing packet is a duplicate or noise).
                let foreign = match e {
                    WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => true,
                    WireGuardError::InvalidAeadTag
                    | WireGuardError::InvalidCounter
                    | WireGuardError::DuplicateCounter => peer.session.as_ref().is_none_or(|s| {
                        now.saturating_duration_since(s.last_rx) >= crate::resume::RESUME_QUIET
                    }),
                    _ => false,
                };
                if transport && foreign {
                    match self.resume.allow(&mut peer.resume_sent, now) {
                        Ok(()) => {
                            if let TunnResult::WriteToNetwork(init) = peer
                                .tunn
                                .format_handshake_initiation(&mut self.scratch, true)
                            {
                                self.stats.resume_handshakes += 1;
                                peer.resuming = true;
                                self.transmits.push_back(Transmit {
                                    dst: from,
                                    payload: init.to_vec(),
                                });
                            }
                        }
                        Err(_) => self.stats.resume_limited += 1,
                    }
                }
                None
            }
            TunnResult::WriteToNetwork(reply) => {
                // A handshake answer; afterwards flush packets queued during the handshake.
                self.stats.handshakes += 1;
                self.transmits.push_back(Transmit {
                    dst: from,
                    payload: reply.to_vec(),
                });
                while let TunnResult::WriteToNetwork(p) =
                    peer.tunn.decapsulate(None, &[], &mut self.scratch)
                {
                    self.transmits.push_back(Transmit {
                        dst: from,
                        payload: p.to_vec(),
                    });
                }
                None
            }
            TunnResult::WriteToTunnelV4(packet, _) | TunnResult::WriteToTunnelV6(packet, _) => {
                let ctx = PeerCtx {
                    id,
                    user: &peer.user,
                    device: &peer.device,
                    addresses: &peer.spec.addresses,
                    routes: &peer.spec.routes,
                    session_id: peer.session.as_ref().map(|s| s.id).unwrap_or(0),
                    sign_on: peer.spec.sign_on,
                };
                let verdict = self.enforcer.handle_outbound(now, &ctx, packet);
                if let Err(reason) = verdict {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        tracing::debug!(user = %peer.spec.user, ?reason, packet = ?portcullis_packet::parse(packet), "outbound packet dropped");
                    }
                }
                self.flush_injected();
                self.drain_enforcer_events();
                match verdict {
                    Ok(()) => Some(&*packet),
                    Err(_) => None,
                }
            }
        }
    }

    /// An IP packet read from the TUN device. Returns the datagram to send.
    pub fn handle_tun_packet<'b>(
        &mut self,
        now: Instant,
        packet: &[u8],
        out: &'b mut [u8],
    ) -> Option<(SocketAddr, &'b [u8])> {
        let id = match self.enforcer.handle_inbound(now, packet) {
            Ok(id) => id,
            Err(reason) => {
                if tracing::enabled!(tracing::Level::DEBUG) {
                    tracing::debug!(?reason, packet = ?portcullis_packet::parse(packet), "inbound packet dropped");
                }
                self.flush_injected();
                self.drain_enforcer_events();
                return None;
            }
        };
        self.drain_enforcer_events();
        let Some(peer) = self.peers.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            self.stats.tun_no_peer += 1;
            return None;
        };
        let Some(endpoint) = peer.endpoint else {
            self.stats.no_endpoint += 1;
            return None;
        };
        match peer.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(datagram) => {
                if let Some(s) = peer.session.as_mut() {
                    s.tx.add(datagram.len());
                }
                Some((endpoint, &*datagram))
            }
            _ => None,
        }
    }

    /// Drives timers: WireGuard (every [`TIMER_TICK`]), rate limiter reset, flow and
    /// session expiry (every second).
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TIMER_TICK;
        let mut expired = Vec::new();
        for (slot, peer) in self.peers.iter_mut().enumerate() {
            let Some(peer) = peer else { continue };
            match peer.tunn.update_timers(&mut self.scratch) {
                TunnResult::WriteToNetwork(p) => {
                    if let Some(dst) = peer.endpoint {
                        self.transmits.push_back(Transmit {
                            dst,
                            payload: p.to_vec(),
                        });
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    expired.push(PeerId(slot as u32));
                }
                _ => {}
            }
            if let Some(s) = &peer.session {
                if now.saturating_duration_since(s.last_rx) >= self.session_idle_timeout {
                    expired.push(PeerId(slot as u32));
                }
            }
        }
        for id in expired {
            self.end_session(id, now, "idle");
        }
        // Checked every tick, not every second: a grant's end cuts within a tick.
        if self.enforcer.handle_grant_timer(now) > 0 {
            self.flush_injected();
        }
        if now >= self.next_second {
            self.next_second = now + Duration::from_secs(1);
            self.rate_limiter.reset_count();
            self.resume.handle_second();
            self.enforcer.handle_timeout(now);
        }
    }

    /// When [`Gateway::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_tun_packet(&mut self) -> Option<Vec<u8>> {
        self.tun_out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.drain_enforcer_events();
        self.events.pop_front()
    }

    /// Ends every session and closes every flow (shutdown).
    pub fn handle_shutdown(&mut self, now: Instant) {
        self.enforcer.close_all(now, CloseReason::Shutdown);
        self.drain_enforcer_events();
        for slot in 0..self.peers.len() {
            self.end_session(PeerId(slot as u32), now, "shutdown");
        }
    }

    /// Sessions currently up.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.peers
            .iter()
            .flatten()
            .filter_map(|p| {
                p.session.as_ref().map(|s| SessionInfo {
                    id: s.id,
                    user: p.spec.user.clone(),
                    device: p.device.to_string(),
                    endpoint: s.endpoint,
                    started: self.enforcer.wall(s.started),
                    rx: s.rx,
                    tx: s.tx,
                })
            })
            .collect()
    }

    /// Configured devices: (user, device, enabled).
    /// Live sessions, counted without building [`SessionInfo`]s.
    pub fn session_count(&self) -> usize {
        self.peers
            .iter()
            .flatten()
            .filter(|p| p.session.is_some())
            .count()
    }

    pub fn peers(&self) -> impl Iterator<Item = (&str, &str, bool)> {
        self.peers
            .iter()
            .flatten()
            .map(|p| (p.spec.user.as_str(), &*p.device, p.enabled))
    }

    /// Moves the enforcer's injected packets to the transmit and TUN queues, keeping
    /// event order (enforcer events stay in its own queue, drained after ours).
    fn flush_injected(&mut self) {
        while let Some(inj) = self.enforcer.poll_injected() {
            match inj {
                Injected::ToTun(p) => self.tun_out.push_back(p),
                Injected::ToPeer(id, p) => {
                    let Some(peer) = self.peers.get_mut(id.0 as usize).and_then(Option::as_mut)
                    else {
                        continue;
                    };
                    let Some(dst) = peer.endpoint else { continue };
                    let mut buf = vec![0u8; p.len() + 32 + 148];
                    if let TunnResult::WriteToNetwork(d) = peer.tunn.encapsulate(&p, &mut buf) {
                        self.transmits.push_back(Transmit {
                            dst,
                            payload: d.to_vec(),
                        });
                    }
                }
            }
        }
    }

    fn drain_enforcer_events(&mut self) {
        while let Some(e) = self.enforcer.poll_event() {
            self.events.push_back(e);
        }
    }

    fn end_session(&mut self, id: PeerId, now: Instant, reason: &str) {
        // Flow events that happened before belong before the session end.
        self.drain_enforcer_events();
        let Some(peer) = self.peers.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return;
        };
        if let Some(s) = peer.session.take() {
            self.events.push_back(Event::SessionEnded {
                session_id: s.id,
                user: peer.spec.user.clone(),
                device: peer.device.to_string(),
                endpoint: Some(s.endpoint),
                duration_ms: now.saturating_duration_since(s.started).as_millis() as u64,
                rx: s.rx,
                tx: s.tx,
                reason: reason.into(),
            });
        }
    }
}

impl Peer {
    /// Records an authenticated datagram: endpoint roaming, session start, counters.
    fn touch(
        &mut self,
        now: Instant,
        from: SocketAddr,
        len: usize,
        next_session_id: &mut u64,
        events: &mut VecDeque<Event>,
    ) {
        self.endpoint = Some(from);
        match &mut self.session {
            Some(s) => {
                s.last_rx = now;
                s.endpoint = from;
                s.rx.add(len);
            }
            None => {
                let id = *next_session_id;
                *next_session_id += 1;
                let mut rx = Counters::default();
                rx.add(len);
                self.session = Some(Session {
                    id,
                    started: now,
                    last_rx: now,
                    endpoint: from,
                    rx,
                    tx: Counters::default(),
                });
                events.push_back(Event::SessionStarted {
                    session_id: id,
                    user: self.spec.user.clone(),
                    device: self.device.to_string(),
                    endpoint: from,
                    resumed: std::mem::take(&mut self.resuming),
                });
            }
        }
    }
}

/// Base64 of a key, as WireGuard tools print it.
pub fn b64(key: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(key)
}
