//! The flow table: one entry per (protocol, client address and port, server address and
//! port), holding the decision, TCP state, counters and idle deadline.
//!
//! The key has no peer id: tunnel addresses are unique per peer and anti-spoofing runs
//! before any lookup, so the client address names the peer. One hash lookup serves both
//! directions (inbound packets swap source and destination to build the key).
//!
//! Eviction rule (documented in the README): when the table or a peer's share of it is
//! full, expired entries go first; otherwise the least recently active entry among a
//! sample of up to [`EVICTION_SAMPLE`] entries of the same peer (peer limit) or of the
//! whole table (global limit) is evicted, preferring entries that are not established
//! TCP connections. This is approximate LRU (as in Redis): O(sample), no per-packet list
//! maintenance. Each eviction is counted and reported as a `flow_closed` event with
//! reason `evicted`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_model::{Counters, Decision, Protocol};
use rustc_hash::FxHashMap;

/// Entries examined to pick an eviction victim.
pub const EVICTION_SAMPLE: usize = 64;

/// Index of a peer in the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u32);

/// The 5-tuple, client side first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub protocol: Protocol,
    pub client: IpAddr,
    pub client_port: u16,
    pub server: IpAddr,
    pub server_port: u16,
}

/// Where a flow is in its life; selects the idle timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    /// TCP: client SYN seen, no answer yet.
    TcpSynSent,
    TcpEstablished,
    /// TCP: FIN from one side.
    TcpHalfClosed,
    /// TCP: FIN from both sides, or RST.
    TcpClosing,
    Udp,
    Icmp,
    Other,
}

/// Idle timeouts by state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn: Duration,
    pub tcp_established: Duration,
    pub tcp_closing: Duration,
    pub udp: Duration,
    pub icmp: Duration,
    pub other: Duration,
    pub fragment: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn: Duration::from_secs(30),
            tcp_established: Duration::from_secs(3600),
            tcp_closing: Duration::from_secs(30),
            udp: Duration::from_secs(60),
            icmp: Duration::from_secs(30),
            other: Duration::from_secs(60),
            fragment: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    pub fn for_state(&self, state: FlowState) -> Duration {
        match state {
            FlowState::TcpSynSent => self.tcp_syn,
            FlowState::TcpEstablished | FlowState::TcpHalfClosed => self.tcp_established,
            FlowState::TcpClosing => self.tcp_closing,
            FlowState::Udp => self.udp,
            FlowState::Icmp => self.icmp,
            FlowState::Other => self.other,
        }
    }
}

/// One allowed flow.
#[derive(Clone, Debug)]
pub struct Flow {
    pub id: u64,
    pub peer: PeerId,
    pub session_id: u64,
    pub user: Arc<str>,
    /// The user's groups when the flow was decided (for the audit trail).
    pub groups: Arc<[String]>,
    pub device: Arc<str>,
    /// The device's sign-on the flow was decided with.
    pub sign_on: portcullis_model::SignOn,
    pub created: Instant,
    pub last_seen: Instant,
    pub state: FlowState,
    /// The decision that allowed the flow (network, deciding policies).
    pub decision: Arc<Decision>,
    pub epoch: u64,
    /// Client → network.
    pub outbound: Counters,
    /// Network → client.
    pub inbound: Counters,
    /// TCP: FIN seen from the client / from the server.
    pub fin_out: bool,
    pub fin_in: bool,
    /// TCP: the next sequence number each side will send (for injected resets).
    pub client_next_seq: u32,
    pub server_next_seq: u32,
    pub server_seq_known: bool,
}

impl Flow {
    pub fn expired(&self, now: Instant, timeouts: &Timeouts) -> bool {
        now.saturating_duration_since(self.last_seen) >= timeouts.for_state(self.state)
    }
}

/// Bounded map of flows.
#[derive(Debug)]
pub struct FlowTable {
    map: FxHashMap<FlowKey, Flow>,
    per_peer: FxHashMap<PeerId, usize>,
    pub max_flows: usize,
    pub max_per_peer: usize,
}

impl FlowTable {
    pub fn new(max_flows: usize, max_per_peer: usize) -> Self {
        FlowTable {
            map: FxHashMap::default(),
            per_peer: FxHashMap::default(),
            max_flows: max_flows.max(1),
            max_per_peer: max_per_peer.max(1),
        }
    }

    #[inline]
    pub fn get_mut(&mut self, key: &FlowKey) -> Option<&mut Flow> {
        self.map.get_mut(key)
    }

    pub fn get(&self, key: &FlowKey) -> Option<&Flow> {
        self.map.get(key)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn peer_len(&self, peer: PeerId) -> usize {
        self.per_peer.get(&peer).copied().unwrap_or(0)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &Flow)> {
        self.map.iter()
    }

    /// Picks the flows to evict so that `flow` fits; the caller reports them.
    pub fn make_room(&mut self, peer: PeerId, now: Instant, t: &Timeouts) -> Vec<(FlowKey, Flow)> {
        let mut evicted = Vec::new();
        if self.peer_len(peer) >= self.max_per_peer {
            if let Some(key) = self.victim(Some(peer), now, t) {
                evicted.extend(self.remove(&key).map(|f| (key, f)));
            }
        }
        if self.map.len() >= self.max_flows {
            if let Some(key) = self.victim(None, now, t) {
                evicted.extend(self.remove(&key).map(|f| (key, f)));
            }
        }
        evicted
    }

    /// Inserts a flow; call [`FlowTable::make_room`] first.
    pub fn insert(&mut self, key: FlowKey, flow: Flow) {
        let peer = flow.peer;
        if let Some(old) = self.map.insert(key, flow) {
            self.dec(old.peer);
        }
        *self.per_peer.entry(peer).or_insert(0) += 1;
    }

    pub fn remove(&mut self, key: &FlowKey) -> Option<Flow> {
        let flow = self.map.remove(key)?;
        self.dec(flow.peer);
        Some(flow)
    }

    fn dec(&mut self, peer: PeerId) {
        if let Some(n) = self.per_peer.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
        }
    }

    /// Removes and returns every flow matching `pred`.
    pub fn drain_where(
        &mut self,
        mut pred: impl FnMut(&FlowKey, &Flow) -> bool,
    ) -> Vec<(FlowKey, Flow)> {
        let keys: Vec<FlowKey> = self
            .map
            .iter()
            .filter(|(k, f)| pred(k, f))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.remove(&k).map(|f| (k, f)))
            .collect()
    }

    fn victim(&self, peer: Option<PeerId>, now: Instant, t: &Timeouts) -> Option<FlowKey> {
        // Rank: expired first, then not-established, then oldest last_seen.
        self.map
            .iter()
            .filter(|(_, f)| peer.is_none_or(|p| f.peer == p))
            .take(EVICTION_SAMPLE)
            .min_by_key(|(_, f)| {
                (
                    !f.expired(now, t),
                    matches!(f.state, FlowState::TcpEstablished),
                    f.last_seen,
                )
            })
            .map(|(k, _)| *k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u16, peer: u8) -> FlowKey {
        FlowKey {
            protocol: Protocol::UDP,
            client: IpAddr::from([100, 64, 0, peer]),
            client_port: n,
            server: IpAddr::from([10, 8, 0, 2]),
            server_port: 53,
        }
    }

    fn flow(peer: u8, at: Instant, state: FlowState) -> Flow {
        Flow {
            id: 0,
            peer: PeerId(u32::from(peer)),
            session_id: 0,
            user: "u".into(),
            groups: Arc::new([]),
            device: "d".into(),
            sign_on: Default::default(),
            created: at,
            last_seen: at,
            state,
            decision: Arc::new(Decision::deny_default("n")),
            epoch: 1,
            outbound: Counters::default(),
            inbound: Counters::default(),
            fin_out: false,
            fin_in: false,
            client_next_seq: 0,
            server_next_seq: 0,
            server_seq_known: false,
        }
    }

    #[test]
    fn global_limit_evicts_least_recently_active() {
        let t0 = Instant::now();
        let t = Timeouts::default();
        let mut table = FlowTable::new(3, 100);
        for i in 0..3u16 {
            table.insert(
                key(i, 2),
                flow(2, t0 + Duration::from_secs(u64::from(i)), FlowState::Udp),
            );
        }
        // Touch flow 0 so flow 1 becomes the least recently active.
        if let Some(f) = table.get_mut(&key(0, 2)) {
            f.last_seen = t0 + Duration::from_secs(10);
        }
        let evicted = table.make_room(PeerId(2), t0 + Duration::from_secs(11), &t);
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].0, key(1, 2));
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn peer_limit_evicts_only_that_peers_flows_and_spares_established_tcp() {
        let t0 = Instant::now();
        let t = Timeouts::default();
        let mut table = FlowTable::new(100, 2);
        table.insert(key(1, 2), flow(2, t0, FlowState::TcpEstablished));
        table.insert(
            key(2, 2),
            flow(2, t0 + Duration::from_secs(5), FlowState::Udp),
        );
        table.insert(key(3, 3), flow(3, t0, FlowState::Udp));
        let evicted = table.make_room(PeerId(2), t0 + Duration::from_secs(6), &t);
        assert_eq!(
            evicted.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![key(2, 2)]
        );
        assert_eq!(table.peer_len(PeerId(2)), 1);
        assert_eq!(table.peer_len(PeerId(3)), 1);
    }

    #[test]
    fn expired_entries_go_first() {
        let t0 = Instant::now();
        let t = Timeouts::default();
        let mut table = FlowTable::new(2, 100);
        table.insert(key(1, 2), flow(2, t0, FlowState::TcpEstablished));
        table.insert(
            key(2, 2),
            flow(2, t0 + Duration::from_secs(50), FlowState::Icmp),
        );
        // At t0+90 the ICMP flow (30 s timeout) is expired, the older TCP flow is not.
        let evicted = table.make_room(PeerId(2), t0 + Duration::from_secs(90), &t);
        assert_eq!(evicted[0].0, key(2, 2));
    }

    proptest! {
        #[test]
        fn never_exceeds_limits(ops in proptest::collection::vec((0u16..50, 2u8..6, any::<bool>()), 1..300)) {
            let t0 = Instant::now();
            let t = Timeouts::default();
            let mut table = FlowTable::new(20, 7);
            for (i, (port, peer, remove)) in ops.into_iter().enumerate() {
                let now = t0 + Duration::from_millis(i as u64);
                let k = key(port, peer);
                if remove {
                    table.remove(&k);
                } else if table.get(&k).is_none() {
                    table.make_room(PeerId(u32::from(peer)), now, &t);
                    table.insert(k, flow(peer, now, FlowState::Udp));
                }
                prop_assert!(table.len() <= 20);
                for p in 2..6u32 {
                    prop_assert!(table.peer_len(PeerId(p)) <= 7);
                }
                let sum: usize = (2..6u32).map(|p| table.peer_len(PeerId(p))).sum();
                prop_assert_eq!(sum, table.len());
            }
        }
    }
}
