//! Routed peers (a site's router with subnets behind it): anti-spoofing accepts sources
//! inside the peer's routes, return traffic finds the router, and no two peers own the
//! same source.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::IpAddr;
use std::time::Instant;

use boringtun::x25519::PublicKey;
use ipnet::IpNet;
use portcullis_core::{ControlError, PeerSpec};
use portcullis_model::{DeviceChange, Event};

mod common;
use common::*;

const LAN_HOST: [u8; 4] = [192, 168, 10, 7];
const OUTSIDE: [u8; 4] = [192, 168, 11, 7];

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn router(n: u8, user: &str, addr: [u8; 4], routes: &[&str]) -> PeerSpec {
    PeerSpec {
        user: user.into(),
        public_key: PublicKey::from(&client_key(n)).to_bytes(),
        addresses: vec![IpAddr::from(addr)],
        routes: routes.iter().map(|r| net(r)).collect(),
        persistent_keepalive: None,
        sign_on: Default::default(),
    }
}

fn events(gw: &mut portcullis_core::Gateway) -> Vec<Event> {
    std::iter::from_fn(|| gw.poll_event()).collect()
}

#[test]
fn a_router_carries_its_subnets_and_nothing_else() {
    let t0 = Instant::now();
    // alice is in "sre": prod is hers. Her device here is a router for 192.168.10.0/24.
    let mut gw = node(t0, &[]);
    gw.handle_peer_add(router(1, "alice", ALICE, &["192.168.10.0/24"]))
        .expect("router");
    let gw_pub = PublicKey::from(gw.public_key());
    let mut client = Client::new(1, &gw_pub);

    // A LAN host behind the router reaches prod; the flow names its real address.
    let syn = tcp(LAN_HOST, 40000, PROD, 22, "S", 100, b"");
    assert_eq!(client.send(&mut gw, t0, &syn).as_deref(), Some(&syn[..]));
    let opened: Vec<_> = events(&mut gw)
        .into_iter()
        .filter_map(|e| match e {
            Event::FlowOpened { user, tuple, .. } => Some((user, tuple.src_ip)),
            _ => None,
        })
        .collect();
    assert_eq!(opened, [("alice".to_string(), IpAddr::from(LAN_HOST))]);

    // The answer goes back through the router's tunnel.
    let mut out = vec![0u8; portcullis_core::MAX_PACKET];
    let answer = tcp(PROD, 22, LAN_HOST, 40000, "SA", 900, b"");
    let datagram = gw
        .handle_tun_packet(t0, &answer, &mut out)
        .map(|(_, d)| d.to_vec())
        .expect("return traffic to the router");
    assert_eq!(client.receive(&datagram).as_deref(), Some(&answer[..]));

    // The router's own tunnel address still works.
    let own = tcp(ALICE, 40001, PROD, 22, "S", 100, b"");
    assert!(client.send(&mut gw, t0, &own).is_some());

    // A source in no route of the router's is spoofed: dropped, counted, reported.
    let before = gw.enforcer().stats.spoofed;
    assert!(client
        .send(&mut gw, t0, &tcp(OUTSIDE, 40000, PROD, 22, "S", 100, b""))
        .is_none());
    assert_eq!(gw.enforcer().stats.spoofed, before + 1);
    assert!(events(&mut gw).iter().any(|e| matches!(
        e,
        Event::SpoofDropped { claimed_src, user, .. }
            if *claimed_src == IpAddr::from(OUTSIDE) && user == "alice"
    )));
}

#[test]
fn overlapping_routes_are_refused_naming_both_peers() {
    let t0 = Instant::now();
    let mut gw = node(t0, &[(2, "bob", BOB)]);
    gw.handle_peer_add(router(1, "alice", ALICE, &["192.168.10.0/24", "fd10::/64"]))
        .expect("router");
    let cases = [
        (
            router(3, "carol", [100, 64, 0, 4], &["192.168.10.128/25"]),
            "192.168.10.0/24",
        ),
        (
            router(3, "carol", [100, 64, 0, 4], &["192.168.0.0/16"]),
            "192.168.10.0/24",
        ),
        (
            router(3, "carol", [100, 64, 0, 4], &["fd10::1:0/112"]),
            "fd10::/64",
        ),
        // A route over another peer's tunnel address.
        (
            router(3, "carol", [100, 64, 0, 4], &["100.64.0.0/30"]),
            "/32",
        ),
    ];
    for (spec, other) in cases {
        let err = gw.handle_peer_add(spec).expect_err("overlap");
        let said = err.to_string();
        assert!(matches!(err, ControlError::RouteOverlap { .. }), "{said}");
        assert!(said.contains("carol") && said.contains(other), "{said}");
    }
    // Disjoint subnets are fine; removing a router frees its subnets.
    gw.handle_peer_add(router(3, "carol", [100, 64, 0, 4], &["192.168.11.0/24"]))
        .expect("a disjoint subnet");
    let alice = PublicKey::from(&client_key(1)).to_bytes();
    assert!(gw.handle_peer_remove(t0, &alice, "removed"));
    gw.handle_peer_add(router(4, "dave", [100, 64, 0, 5], &["192.168.10.0/25"]))
        .expect("the subnet is free again");
}

#[test]
fn a_rotated_router_key_takes_the_subnets_with_it() {
    let t0 = Instant::now();
    let mut gw = node(t0, &[]);
    gw.handle_peer_add(router(1, "alice", ALICE, &["192.168.10.0/24"]))
        .expect("router");
    let old = PublicKey::from(&client_key(1)).to_bytes();
    let new = PublicKey::from(&client_key(5)).to_bytes();
    gw.handle_device_change(
        t0,
        DeviceChange::Added {
            user: "alice".into(),
            public_key: new,
            addresses: vec![IpAddr::from([100, 64, 0, 9])],
            routes: vec![net("192.168.10.0/24")],
            persistent_keepalive: None,
            expires_at: wall() + chrono::TimeDelta::hours(1),
            previous: Some(old),
            sign_on: Default::default(),
        },
    )
    .expect("the new key owns the subnet");
    let gw_pub = PublicKey::from(gw.public_key());
    // The old key, in its grace period, carries its own address but no longer the LAN.
    let mut old_client = Client::new(1, &gw_pub);
    assert!(old_client
        .send(&mut gw, t0, &tcp(LAN_HOST, 40000, PROD, 22, "S", 100, b""))
        .is_none());
    assert!(old_client
        .send(&mut gw, t0, &tcp(ALICE, 40000, PROD, 22, "S", 100, b""))
        .is_some());
    let mut new_client = Client::new(5, &gw_pub);
    assert!(new_client
        .send(&mut gw, t0, &tcp(LAN_HOST, 40002, PROD, 22, "S", 100, b""))
        .is_some());
}
