//! End to end: the `portcullis` binary in a network namespace, Debian's wireguard-go and
//! wg as clients in theirs, real TCP/UDP/ICMP traffic to private networks.
//! Needs root; see `tests/lib.rs` for the topology.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portcullis_e2e::{echo_round_trip, Lab, LabOptions};
use serde_json::Value;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn lab() -> Lab {
    Lab::start(LabOptions::default()).expect("lab starts")
}

fn is(e: &Value, kind: &str) -> bool {
    e["type"] == kind
}

#[test]
fn sre_reaches_prod_developer_is_denied_prod_and_allowed_dev() {
    let lab = lab();
    // alice (sre): TCP and ping into prod.
    let mut s = lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(5))
        .expect("alice reaches prod");
    assert_eq!(
        echo_round_trip(&mut s, b"hello prod").unwrap(),
        b"hello prod"
    );
    assert!(lab.ping(&lab.alice, "10.8.0.2"), "alice pings prod");

    // bob (developers): prod is denied, the attempt is audited with user and destination.
    let denied = lab.connect(&lab.bob, addr("10.8.0.2:8080"), Duration::from_secs(2));
    assert!(denied.is_err(), "bob must not reach prod");
    assert!(!lab.ping(&lab.bob, "10.8.0.2"), "bob must not ping prod");
    let e = lab
        .wait_event(Duration::from_secs(5), |e| {
            is(e, "flow_denied")
                && e["user"] == "bob"
                && e["dst_ip"] == "10.8.0.2"
                && e["dst_port"] == 8080
        })
        .unwrap();
    assert_eq!(e["network"], "prod");
    assert_eq!(e["protocol"], "tcp");
    assert_eq!(e["src_ip"], "100.64.0.3");

    // bob reaches dev on 443 (developers-dev-staging) but not dev on 8080.
    let mut s = lab
        .connect(&lab.bob, addr("10.9.0.2:443"), Duration::from_secs(5))
        .expect("bob reaches dev:443");
    assert_eq!(echo_round_trip(&mut s, b"hello dev").unwrap(), b"hello dev");
    assert!(lab
        .connect(&lab.bob, addr("10.9.0.2:8080"), Duration::from_secs(2))
        .is_err());

    // The allowed flows are audited with the deciding policy.
    let opened = lab
        .wait_event(Duration::from_secs(5), |e| {
            is(e, "flow_opened") && e["user"] == "alice" && e["dst_port"] == 8080
        })
        .unwrap();
    assert_eq!(opened["policy_ids"], serde_json::json!(["sre-prod"]));
    lab.wait_event(Duration::from_secs(5), |e| {
        is(e, "flow_opened")
            && e["user"] == "bob"
            && e["dst_ip"] == "10.9.0.2"
            && e["policy_ids"][0] == "developers-dev-staging"
    })
    .unwrap();
    lab.wait_event(Duration::from_secs(5), |e| {
        is(e, "session_started") && e["user"] == "alice"
    })
    .unwrap();
}

#[test]
fn sixteen_megabyte_transfer_arrives_intact_is_counted_and_loses_no_batch() {
    let mut lab = lab();
    let data: Vec<u8> = (0..16 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut s = lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(5))
        .unwrap();
    let back = echo_round_trip(&mut s, &data).unwrap();
    assert!(back == data, "echoed bytes differ");
    drop(s);
    // Shutting the gateway down closes the flow with its counters.
    lab.stop_gateway().unwrap();
    let closed = lab
        .wait_event(Duration::from_secs(5), |e| {
            is(e, "flow_closed") && e["user"] == "alice" && e["dst_port"] == 8080
        })
        .unwrap();
    assert!(
        closed["outbound"]["bytes"].as_u64().unwrap() > 16 * 1024 * 1024,
        "{closed}"
    );
    assert!(
        closed["inbound"]["bytes"].as_u64().unwrap() > 16 * 1024 * 1024,
        "{closed}"
    );
    lab.wait_event(Duration::from_secs(5), |e| {
        is(e, "session_ended") && e["user"] == "alice"
    })
    .unwrap();
    // No batch was lost on the way (a failed GSO send drops up to 64 datagrams at once;
    // TCP would hide it behind retransmissions).
    let log = lab.gateway_log();
    let counters = log
        .lines()
        .rev()
        .find(|l| l.contains(" counters "))
        .unwrap_or_default();
    assert!(
        counters.contains("send_errors=0"),
        "gateway counters: {counters}"
    );
    assert!(
        !counters.contains("udp_datagrams=0 "),
        "gateway counters: {counters}"
    );
}

#[test]
fn spoofed_inner_source_is_dropped_and_reported() {
    let lab = lab();
    // alice's device claims bob's tunnel address; wireguard-go sends whatever the kernel routes.
    sh(&[
        "ip",
        "-n",
        &lab.alice.ns,
        "addr",
        "add",
        "100.64.0.3/32",
        "dev",
        &lab.alice.ifname,
    ]);
    let sink = lab.udp_listen(&lab.ns_prod, addr("0.0.0.0:5353")).unwrap();
    lab.udp_send(
        &lab.alice,
        Some(addr("100.64.0.3:4000")),
        addr("10.8.0.2:5353"),
        b"spoofed",
    )
    .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        sink.recv_from(&mut buf).is_err(),
        "a spoofed packet reached prod"
    );
    let e = lab
        .wait_event(Duration::from_secs(5), |e| is(e, "spoof_dropped"))
        .unwrap();
    assert_eq!(e["user"], "alice");
    assert_eq!(e["claimed_src"], "100.64.0.3");
    // The genuine source still works.
    lab.udp_send(
        &lab.alice,
        Some(addr("100.64.0.2:4001")),
        addr("10.8.0.2:5353"),
        b"genuine",
    )
    .unwrap();
    let (n, from) = sink.recv_from(&mut buf).expect("genuine packet arrives");
    assert_eq!(&buf[..n], b"genuine");
    assert_eq!(from, addr("100.64.0.2:4001"));
}

fn sh(args: &[&str]) {
    portcullis_e2e::sh(args).unwrap();
}

#[test]
fn reload_that_removes_access_cuts_an_established_connection_within_a_second() {
    let lab = lab();
    let mut s = lab
        .connect(&lab.alice, addr("10.8.0.2:22"), Duration::from_secs(5))
        .unwrap();
    assert_eq!(echo_round_trip(&mut s, b"before").unwrap(), b"before");
    let access = lab.policy_dir().join("access.cedar");
    let text = std::fs::read_to_string(&access).unwrap();
    std::fs::write(
        &access,
        text.replace("Group::\"sre\"", "Group::\"sre-frozen\""),
    )
    .unwrap();
    let t0 = Instant::now();
    lab.reload().unwrap();
    // The gateway resets both ends: alice's blocked read fails with a reset.
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf);
    let elapsed = t0.elapsed();
    match r {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected a connection reset, got {other:?} after {elapsed:?}"),
    }
    assert!(elapsed < Duration::from_secs(1), "cut took {elapsed:?}");
    let e = lab
        .wait_event(Duration::from_secs(2), |e| {
            is(e, "flow_closed") && e["reason"] == "policy_revoked"
        })
        .unwrap();
    assert_eq!(e["user"], "alice");
    lab.wait_event(Duration::from_secs(2), |e| {
        is(e, "policy_loaded") && e["flows_cut"] == 1
    })
    .unwrap();
    // And a new connection is denied.
    assert!(lab
        .connect(&lab.alice, addr("10.8.0.2:22"), Duration::from_secs(2))
        .is_err());
}

#[test]
fn invalid_policy_reload_is_rejected_and_the_old_policy_stays() {
    let lab = lab();
    std::fs::write(
        lab.policy_dir().join("broken.cedar"),
        "permit(principal, action resource);\n",
    )
    .unwrap();
    lab.reload().unwrap();
    let e = lab
        .wait_event(Duration::from_secs(5), |e| is(e, "policy_rejected"))
        .unwrap();
    let errors = e["errors"].to_string();
    assert!(errors.contains("broken.cedar:1:"), "{errors}");
    // alice still reaches prod, bob still does not.
    let mut s = lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(5))
        .expect("old policy in force");
    assert_eq!(echo_round_trip(&mut s, b"still").unwrap(), b"still");
    assert!(lab
        .connect(&lab.bob, addr("10.8.0.2:8080"), Duration::from_secs(2))
        .is_err());
    assert!(!lab.events().iter().any(|e| is(e, "policy_loaded")));
}

#[test]
fn ipv6_flows_are_decided_and_forwarded_like_ipv4() {
    let lab = lab();
    let mut s = lab
        .connect(&lab.alice, addr("[fd00:8::2]:8080"), Duration::from_secs(5))
        .expect("alice reaches prod over v6");
    assert_eq!(echo_round_trip(&mut s, b"six").unwrap(), b"six");
    let mut w = s.try_clone().unwrap();
    w.write_all(b"!").unwrap();
    assert!(lab
        .connect(&lab.bob, addr("[fd00:8::2]:8080"), Duration::from_secs(2))
        .is_err());
    lab.wait_event(Duration::from_secs(5), |e| {
        is(e, "flow_opened") && e["dst_ip"] == "fd00:8::2" && e["user"] == "alice"
    })
    .unwrap();
    lab.wait_event(Duration::from_secs(5), |e| {
        is(e, "flow_denied") && e["dst_ip"] == "fd00:8::2" && e["user"] == "bob"
    })
    .unwrap();
}
