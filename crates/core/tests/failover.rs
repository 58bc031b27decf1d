//! Failover in the core: a node that never saw a device's session (another node of the
//! site had it) takes it over by initiating the handshake itself, with real boringtun
//! clients and a virtual clock.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use boringtun::x25519::PublicKey;
use portcullis_core::{Gateway, MAX_PACKET};
use portcullis_model::Event;

mod common;
use common::*;

fn sealed(c: &mut Client, packet: &[u8]) -> Vec<u8> {
    match c.tunn.encapsulate(packet, &mut c.buf) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        other => panic!("encapsulate: {other:?}"),
    }
}

fn events(gw: &mut Gateway) -> Vec<Event> {
    std::iter::from_fn(|| gw.poll_event()).collect()
}

#[test]
fn a_node_that_never_saw_the_session_takes_it_over_with_one_handshake() {
    let t0 = Instant::now();
    // The two nodes added their peers in different orders: the index must not depend on it.
    let mut a = node(t0, &[(1, "alice", ALICE), (2, "bob", BOB)]);
    let mut b = node(t0, &[(2, "bob", BOB), (1, "alice", ALICE)]);
    let gw_pub = PublicKey::from(a.public_key());
    let mut alice = Client::new(1, &gw_pub);
    let mut out = vec![0u8; MAX_PACKET];

    // A TCP connection through A.
    let syn = tcp(ALICE, 40000, PROD, 22, "S", 1, b"");
    assert_eq!(alice.send(&mut a, t0, &syn), Some(syn));

    // A dies; the site's address moves to B. Alice's next packet is for A's session.
    let t1 = t0 + Duration::from_secs(2);
    let data = tcp(ALICE, 40000, PROD, 22, "A", 2, b"hello");
    let d = sealed(&mut alice, &data);
    assert!(b.handle_datagram(t1, alice.addr, &d, &mut out).is_none());
    let init = b.poll_transmit().expect("B initiates the handshake");
    assert_eq!(init.dst, alice.addr);
    assert!(b.poll_transmit().is_none());
    assert_eq!(b.stats.resume_handshakes, 1);
    // More of her old session's packets within the interval: no second initiation.
    let d = sealed(&mut alice, &data);
    assert!(b
        .handle_datagram(t1 + Duration::from_millis(10), alice.addr, &d, &mut out)
        .is_none());
    assert!(b.poll_transmit().is_none());
    assert_eq!(b.stats.resume_limited, 1);

    // A stock client answers an initiation (either side may start a handshake).
    let response = match alice.tunn.decapsulate(
        Some(IpAddr::from([192, 0, 2, 1])),
        &init.payload,
        &mut alice.buf,
    ) {
        TunnResult::WriteToNetwork(r) => r.to_vec(),
        other => panic!("alice did not answer: {other:?}"),
    };
    let t2 = t1 + Duration::from_millis(20);
    assert!(b
        .handle_datagram(t2, alice.addr, &response, &mut out)
        .is_none());
    // B confirms the new session with a keepalive; alice takes the session into use.
    let keepalive = b.poll_transmit().expect("keepalive after the response");
    assert_eq!(alice.receive(&keepalive.payload), None);

    // Her retransmission now goes through B, decided there as a resumed flow, and the
    // answer from prod reaches her through B.
    let d = sealed(&mut alice, &data);
    assert_eq!(
        b.handle_datagram(t2, alice.addr, &d, &mut out)
            .map(<[u8]>::to_vec),
        Some(data)
    );
    let reply = tcp(PROD, 22, ALICE, 40000, "A", 9, b"world");
    let (dst, datagram) = b.handle_tun_packet(t2, &reply, &mut out).expect("reply");
    assert_eq!(dst, alice.addr);
    let datagram = datagram.to_vec();
    assert_eq!(alice.receive(&datagram), Some(reply));

    let ev = events(&mut b);
    assert!(
        ev.iter().any(
            |e| matches!(e, Event::SessionStarted { user, resumed: true, .. } if user == "alice")
        ),
        "{ev:?}"
    );
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::FlowOpened { user, resumed: true, .. } if user == "alice")),
        "{ev:?}"
    );
    // A's own session started normally: not resumed.
    assert!(events(&mut a)
        .iter()
        .any(|e| matches!(e, Event::SessionStarted { resumed: false, .. })));
}

/// A transport message with `index` as receiver and junk as its ciphertext: what anyone
/// can forge without keys.
fn forged(index: u32, counter: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(48);
    p.extend_from_slice(&4u32.to_le_bytes());
    p.extend_from_slice(&(index << 8).to_le_bytes());
    p.extend_from_slice(&counter.to_le_bytes());
    p.extend_from_slice(&[0x5a; 32]);
    p
}

#[test]
fn forged_packets_cause_at_most_one_handshake_per_second_and_none_for_disabled_devices() {
    let t0 = Instant::now();
    let mut gw = node(
        t0,
        &[
            (1, "alice", ALICE),
            // A device whose user no identity source provides: disabled.
            (3, "mallory", [100, 64, 0, 9]),
        ],
    );
    let attacker = SocketAddr::from(([203, 0, 113, 7], 9999));
    let mut out = vec![0u8; MAX_PACKET];
    let alice_index = 0x40_00_02;
    let mut sent = 0;
    // 50 forged packets a second for 3 s: one initiation a second, each to the source.
    for i in 0..150u64 {
        let now = t0 + Duration::from_millis(i * 20);
        gw.handle_timeout(now);
        assert!(gw
            .handle_datagram(now, attacker, &forged(alice_index, i), &mut out)
            .is_none());
        while let Some(t) = gw.poll_transmit() {
            assert_eq!(t.dst, attacker);
            assert_eq!(t.payload.len(), 148, "a handshake initiation");
            sent += 1;
        }
    }
    assert_eq!(sent, 3);
    assert_eq!(gw.stats.resume_handshakes, 3);
    // For a disabled device: nothing at all.
    let now = t0 + Duration::from_secs(10);
    assert!(gw
        .handle_datagram(now, attacker, &forged(0x40_00_09, 1), &mut out)
        .is_none());
    assert!(gw.poll_transmit().is_none());
    // An index nobody has: nothing either.
    assert!(gw
        .handle_datagram(now, attacker, &forged(0x12_34_56, 1), &mut out)
        .is_none());
    assert!(gw.poll_transmit().is_none());
    assert_eq!(gw.stats.resume_handshakes, 3);
}

#[test]
fn a_node_forwards_only_to_networks_of_its_own_site_and_to_those_of_every_site() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let mut sources = portcullis_policy::Sources::read(&dir).unwrap();
    if let Some((_, text)) = sources.networks.as_mut() {
        *text = text.replace(
            "name = \"prod-db\"\n",
            "name = \"prod-db\"\nsite = \"us-1\"\n",
        );
    }
    let bundle =
        std::sync::Arc::new(portcullis_policy::PolicyBundle::from_sources(sources).unwrap());
    let t0 = Instant::now();
    let prod_db = [10, 8, 5, 4];
    let decided = |site: Option<&str>| {
        let mut gw = node(t0, &[(1, "alice", ALICE)]);
        gw.handle_policy_bundle(t0, bundle.clone()).unwrap();
        gw.set_site(site);
        let mut alice = Client::new(1, &PublicKey::from(gw.public_key()));
        let db = alice
            .send(&mut gw, t0, &tcp(ALICE, 40000, prod_db, 5432, "S", 1, b""))
            .is_some();
        let prod = alice
            .send(&mut gw, t0, &tcp(ALICE, 40001, PROD, 22, "S", 1, b""))
            .is_some();
        let reasons: Vec<Option<String>> = events(&mut gw)
            .into_iter()
            .filter_map(|e| match e {
                Event::FlowDenied { reason, .. } => Some(reason),
                _ => None,
            })
            .collect();
        (db, prod, reasons)
    };
    // A node of eu-1: prod-db is us-1's; prod (no site) is served everywhere.
    assert_eq!(
        decided(Some("eu-1")),
        (false, true, vec![Some("other_site".to_string())])
    );
    // A node of us-1 serves both; a cluster without sites, everything.
    assert_eq!(decided(Some("us-1")), (true, true, vec![]));
    assert_eq!(decided(None), (true, true, vec![]));
}

/// Takes `c` over on `gw` from another node's session: its next packet makes `gw`
/// initiate; the answer and the keepalive complete the new session.
fn take_over(gw: &mut Gateway, c: &mut Client, now: Instant, packet: &[u8]) {
    let mut out = vec![0u8; MAX_PACKET];
    let d = sealed(c, packet);
    assert!(gw.handle_datagram(now, c.addr, &d, &mut out).is_none());
    let init = gw.poll_transmit().expect("the node initiates");
    let response = match c.tunn.decapsulate(None, &init.payload, &mut c.buf) {
        TunnResult::WriteToNetwork(r) => r.to_vec(),
        other => panic!("no answer: {other:?}"),
    };
    assert!(gw
        .handle_datagram(now, c.addr, &response, &mut out)
        .is_none());
    let keepalive = gw.poll_transmit().expect("keepalive");
    assert_eq!(c.receive(&keepalive.payload), None);
}

#[test]
fn a_node_that_still_has_its_old_session_takes_the_device_back_after_a_failback() {
    let t0 = Instant::now();
    let mut a = node(t0, &[(1, "alice", ALICE)]);
    let mut b = node(t0, &[(1, "alice", ALICE)]);
    let mut alice = Client::new(1, &PublicKey::from(a.public_key()));
    let mut out = vec![0u8; MAX_PACKET];
    let data = |seq: u32| tcp(ALICE, 40000, PROD, 22, "A", seq, b"x");
    // A session with A, then A's address moves to B and B takes over.
    assert!(alice
        .send(&mut a, t0, &tcp(ALICE, 40000, PROD, 22, "S", 1, b""))
        .is_some());
    for i in 0..20 {
        let d = sealed(&mut alice, &data(2 + i));
        assert!(a.handle_datagram(t0, alice.addr, &d, &mut out).is_some());
    }
    let t1 = t0 + Duration::from_secs(2);
    take_over(&mut b, &mut alice, t1, &data(30));
    let d = sealed(&mut alice, &data(31));
    assert!(b.handle_datagram(t1, alice.addr, &d, &mut out).is_some());
    // Back to A, which still has its old session under (very likely) the same index:
    // B's packets fail there, and A takes the device back all the same.
    let t2 = t1 + Duration::from_secs(3);
    take_over(&mut a, &mut alice, t2, &data(40));
    let d = sealed(&mut alice, &data(41));
    assert_eq!(
        a.handle_datagram(t2, alice.addr, &d, &mut out)
            .map(<[u8]>::to_vec),
        Some(data(41))
    );
    // While A hears the device, a corrupted packet is noise: no handshake.
    let mut bad = sealed(&mut alice, &data(42));
    if let Some(last) = bad.last_mut() {
        *last ^= 1;
    }
    assert!(a.handle_datagram(t2, alice.addr, &bad, &mut out).is_none());
    assert!(a.poll_transmit().is_none());
}
