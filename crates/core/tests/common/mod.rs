//! What the core's integration tests share: the repository's policies, two users,
//! packet builders, and a gateway with real boringtun clients.

#![allow(dead_code, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use etherparse::PacketBuilder;
use portcullis_core::{FlowLimits, Gateway, GatewayConfig, PeerSpec};
use portcullis_model::Principal;
use portcullis_policy::PolicyBundle;

pub const ALICE: [u8; 4] = [100, 64, 0, 2];
pub const BOB: [u8; 4] = [100, 64, 0, 3];
pub const PROD: [u8; 4] = [10, 8, 0, 2];
pub const DEV: [u8; 4] = [10, 9, 0, 2];

pub fn policies() -> Arc<PolicyBundle> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    Arc::new(PolicyBundle::load(&dir).expect("example policies load"))
}

pub fn users() -> Vec<Principal> {
    vec![
        Principal {
            name: "alice".into(),
            email: String::new(),
            groups: vec!["sre".into()],
            tags: vec!["oncall".into()],
        },
        Principal {
            name: "bob".into(),
            email: String::new(),
            groups: vec!["developers".into()],
            tags: vec![],
        },
    ]
}

pub fn wall() -> chrono::DateTime<chrono::Utc> {
    "2026-11-22T10:00:00Z".parse().expect("time")
}

pub fn tcp(
    src: [u8; 4],
    sp: u16,
    dst: [u8; 4],
    dp: u16,
    flags: &str,
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sp, dp, seq, 64000);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('A') {
        b = b.ack(1);
    }
    if flags.contains('F') {
        b = b.fin();
    }
    if flags.contains('R') {
        b = b.rst();
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build");
    out
}

pub const GW_KEY: [u8; 32] = [7; 32];

pub fn client_key(n: u8) -> StaticSecret {
    StaticSecret::from([n; 32])
}

/// A gateway with the site's key and these devices (n, user, address), added in order.
pub fn node(t0: Instant, devices: &[(u8, &str, [u8; 4])]) -> Gateway {
    let mut gw = Gateway::new(
        GatewayConfig {
            private_key: GW_KEY,
            limits: FlowLimits::default(),
            session_idle_timeout: Duration::from_secs(180),
        },
        policies(),
        users(),
        t0,
        wall(),
    )
    .expect("gateway");
    for (n, user, addr) in devices {
        gw.handle_peer_add(PeerSpec {
            user: (*user).into(),
            public_key: PublicKey::from(&client_key(*n)).to_bytes(),
            addresses: vec![IpAddr::from(*addr)],
            routes: Vec::new(),
            persistent_keepalive: None,
            sign_on: Default::default(),
        })
        .expect("peer");
    }
    gw
}

/// [`node`] with alice and bob.
pub fn gateway(t0: Instant) -> (Gateway, PublicKey) {
    let gw = node(t0, &[(1, "alice", ALICE), (2, "bob", BOB)]);
    let public = PublicKey::from(gw.public_key());
    (gw, public)
}

pub struct Client {
    pub tunn: Tunn,
    pub addr: SocketAddr,
    pub buf: Vec<u8>,
}

impl Client {
    pub fn new(n: u8, gw: &PublicKey) -> Client {
        Client {
            tunn: Tunn::new(client_key(n), *gw, None, None, u32::from(n), None),
            addr: SocketAddr::from(([192, 168, 1, n], 40000 + u16::from(n))),
            buf: vec![0; 4096],
        }
    }

    /// Sends `packet` through the tunnel, completing the handshake if needed. Returns
    /// what the gateway wrote to its TUN device.
    pub fn send(&mut self, gw: &mut Gateway, now: Instant, packet: &[u8]) -> Option<Vec<u8>> {
        let mut out = vec![0u8; portcullis_core::MAX_PACKET];
        let first = match self.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("encapsulate: {other:?}"),
        };
        let mut to_tun = gw
            .handle_datagram(now, self.addr, &first, &mut out)
            .map(<[u8]>::to_vec);
        // Handshake: deliver the gateway's answers, and our queued packet after them.
        while let Some(t) = gw.poll_transmit() {
            assert_eq!(t.dst, self.addr);
            let mut pending = vec![];
            match self.tunn.decapsulate(
                Some(IpAddr::from([10, 0, 0, 1])),
                &t.payload,
                &mut self.buf,
            ) {
                TunnResult::WriteToNetwork(d) => pending.push(d.to_vec()),
                TunnResult::WriteToTunnelV4(p, _) => panic!("unexpected data {p:?}"),
                _ => {}
            }
            while let TunnResult::WriteToNetwork(d) =
                self.tunn.decapsulate(None, &[], &mut self.buf)
            {
                pending.push(d.to_vec());
            }
            for d in pending {
                if let Some(p) = gw.handle_datagram(now, self.addr, &d, &mut out) {
                    to_tun = Some(p.to_vec());
                }
            }
        }
        to_tun
    }

    pub fn receive(&mut self, datagram: &[u8]) -> Option<Vec<u8>> {
        match self.tunn.decapsulate(None, datagram, &mut self.buf) {
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                Some(p.to_vec())
            }
            _ => None,
        }
    }
}
