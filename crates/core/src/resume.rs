//! Taking over a session another node of the site had (failover), without waiting for
//! the client.
//!
//! When a site's address moves to another node, a stock client keeps sending transport
//! packets for a session whose keys only the dead node had; it starts a new handshake
//! only after ~15 s of unanswered traffic. Either side of WireGuard may initiate, so the
//! node that receives such a packet initiates the handshake itself, to the packet's source:
//! the client answers (it knows the site's key), the session is new, and its traffic flows
//! again after one round trip.
//!
//! For that the packet must say which device it belongs to on every node: the receiver
//! index we hand out ([`wire_index`]) is derived from the device's tunnel address,
//! unique in the cluster (the database refuses two devices on one address), not from
//! the order in which this node added its peers. The low 8 bits are boringtun's
//! per-handshake counter, so two nodes' sessions often carry the same whole index: a
//! packet of another node's session may meet an old session of ours and fail its
//! counter or tag instead of finding no session. That counts as foreign too once this
//! node has heard nothing valid from the device for [`RESUME_QUIET`] (a failback to a
//! node that still has its old session).
//!
//! Security: no session key leaves a node; the new session is a full handshake with the
//! device's static key. A forged packet (any 32+ bytes with a known index) can at most
//! make the node send one handshake initiation (148 bytes) to the forged source: at most
//! one per device per [`RESUME_INTERVAL`] and [`RESUME_PER_SECOND`] over the gateway, and
//! never for a disabled (revoked or unknown) device. The initiation reveals nothing the
//! device's public key does not, and an answer to it needs the device's private key.

use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Handshakes a node initiates for one device at most this often.
pub const RESUME_INTERVAL: Duration = Duration::from_secs(1);
/// Handshakes a node initiates per second at most, over all devices.
pub const RESUME_PER_SECOND: u32 = 50;
/// A transport packet that fails its counter or tag under an index of ours means
/// another node's session once this node has heard nothing valid from the device for
/// this long.
pub const RESUME_QUIET: Duration = Duration::from_secs(1);

/// The upper 24 bits of the receiver index for a device with these tunnel addresses:
/// the low 24 bits of its first IPv4 address (unique while every tunnel address lies in
/// one /8, as any pool does), else of its first IPv6 address. `None` without addresses.
pub fn wire_index(addresses: &[IpAddr]) -> Option<u32> {
    let v4 = addresses.iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(u32::from(*v4)),
        IpAddr::V6(_) => None,
    });
    let v6 = || {
        addresses.iter().find_map(|a| match a {
            IpAddr::V6(v6) => {
                let o = v6.octets();
                Some(u32::from_be_bytes([0, o[13], o[14], o[15]]))
            }
            IpAddr::V4(_) => None,
        })
    };
    v4.map(|v| v & 0x00ff_ffff).or_else(v6)
}

/// The gateway-wide budget of initiated handshakes.
#[derive(Debug)]
pub struct ResumeLimiter {
    used: u32,
    /// Off: never (recovery is left to the client).
    enabled: bool,
}

/// Why a takeover handshake was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// This device had one less than [`RESUME_INTERVAL`] ago.
    TooSoon,
    /// The gateway sent [`RESUME_PER_SECOND`] this second.
    Budget,
}

impl ResumeLimiter {
    pub fn new() -> ResumeLimiter {
        ResumeLimiter {
            used: 0,
            enabled: true,
        }
    }

    /// Turns takeover handshakes on or off (`[cluster] resume_sessions`).
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// A new second: the budget is full again.
    pub fn handle_second(&mut self) {
        self.used = 0;
    }

    /// Whether a handshake may be initiated now for a device that had its last one at
    /// `last` (updated when allowed).
    pub fn allow(&mut self, last: &mut Option<Instant>, now: Instant) -> Result<(), Refused> {
        if last.is_some_and(|t| now.saturating_duration_since(t) < RESUME_INTERVAL) {
            return Err(Refused::TooSoon);
        }
        if !self.enabled || self.used >= RESUME_PER_SECOND {
            return Err(Refused::Budget);
        }
        self.used += 1;
        *last = Some(now);
        Ok(())
    }
}

impl Default for ResumeLimiter {
    fn default() -> Self {
        ResumeLimiter::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_index_comes_from_the_tunnel_address_not_the_order_of_adding() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(wire_index(&[a("100.64.0.2")]), Some(0x40_00_02));
        assert_eq!(
            wire_index(&[a("fd00:64::2"), a("100.64.1.7")]),
            Some(0x40_01_07),
            "IPv4 first"
        );
        assert_eq!(wire_index(&[a("fd00:64::1:0203")]), Some(0x01_02_03));
        assert_eq!(wire_index(&[]), None);
    }

    #[test]
    fn one_handshake_per_device_per_interval_and_a_budget_per_second() {
        let t0 = Instant::now();
        let mut l = ResumeLimiter::new();
        let mut last = None;
        assert_eq!(l.allow(&mut last, t0), Ok(()));
        assert_eq!(
            l.allow(&mut last, t0 + Duration::from_millis(999)),
            Err(Refused::TooSoon)
        );
        assert_eq!(l.allow(&mut last, t0 + RESUME_INTERVAL), Ok(()));
        let mut others: Vec<Option<Instant>> = vec![None; RESUME_PER_SECOND as usize];
        let refused = others
            .iter_mut()
            .map(|o| l.allow(o, t0))
            .filter(Result::is_err)
            .count();
        assert_eq!(refused, 2, "two of the budget went to the first device");
        l.handle_second();
        assert_eq!(l.allow(&mut None, t0), Ok(()));
        // `resume_sessions = false`: never.
        l.set_enabled(false);
        l.handle_second();
        assert_eq!(l.allow(&mut None, t0), Err(Refused::Budget));
    }

    proptest! {
        /// Addresses of one /8 never share an index.
        #[test]
        fn addresses_of_one_slash_8_have_distinct_indexes(a in 0u32..(1 << 24), b in 0u32..(1 << 24)) {
            let ip = |low: u32| IpAddr::from(std::net::Ipv4Addr::from(0x6400_0000 | low));
            prop_assert_eq!(wire_index(&[ip(a)]) == wire_index(&[ip(b)]), a == b);
        }
    }
}
