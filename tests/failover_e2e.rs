//! Failover end to end: two nodes of one site on PostgreSQL, a stock wireguard-go client
//! with a live TCP connection through node A; A is killed (`kill -9`) and the site's
//! address moves to node B. B never saw the client's session: it starts the handshake
//! itself, the same TCP connection goes on through B, and B's trail says the session and
//! the flow resumed.
//!
//! The address moves the way VRRP moves it (the client's link now ends at B, same
//! addresses, the inside route follows), done by the test itself so the gap measured is
//! the gateway's; keepalived's own timing adds to it (see docs/benchmarks.md).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portcullis_e2e::cluster::SITE_VIP;
use portcullis_e2e::cluster::{ClusterLab, ClusterOptions};
use portcullis_e2e::{wait_until, wg_genkey};
use serde_json::Value;

/// Echoes `tick` every 10 ms over `s` for `run`; the longest time without an echo.
fn longest_silence(s: &mut std::net::TcpStream, run: Duration) -> Duration {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t0 = Instant::now();
    let mut last = Instant::now();
    let mut longest = Duration::ZERO;
    let mut buf = [0u8; 4];
    while t0.elapsed() < run {
        s.write_all(b"tick").unwrap();
        s.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("the connection broke after {:?}: {e}", t0.elapsed()));
        assert_eq!(&buf, b"tick");
        longest = longest.max(last.elapsed());
        last = Instant::now();
        std::thread::sleep(Duration::from_millis(10));
    }
    longest
}

/// Node `i`'s trail (its events file) as JSON objects.
fn trail(lab: &ClusterLab, i: usize) -> Vec<Value> {
    std::fs::read_to_string(lab.nodes[i].dir.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn a_killed_node_costs_a_stock_client_under_3_s_and_its_tcp_connection_survives() {
    let (alice_key, alice_pub) = wg_genkey().unwrap();
    let mut lab = ClusterLab::start(ClusterOptions {
        nodes: 2,
        extra_config: format!(
            "[[peer]]\nuser = \"alice\"\npublic_key = \"{alice_pub}\"\naddress = \"100.64.0.2\"\n"
        ),
        ..ClusterOptions::default()
    })
    .unwrap();
    let alice = lab
        .add_client("alice", &alice_key, "100.64.0.2", 0)
        .unwrap();
    lab.provision(0, "alice", "sre").unwrap();
    let prod: SocketAddr = "10.8.0.2:22".parse().unwrap();
    let mut s = lab.open_when_granted(&alice, prod).unwrap();
    assert!(longest_silence(&mut s, Duration::from_millis(500)) < Duration::from_secs(1));

    // A dies; the site's address moves to B at once. Stock wireguard-go alone would wait
    // ~15 s of unanswered traffic before a new handshake.
    lab.kill_node(0).unwrap();
    lab.move_site_address(&alice, 0, 1).unwrap();
    let silence = longest_silence(&mut s, Duration::from_secs(6));
    eprintln!("longest silence over the failover: {silence:?}");
    assert!(silence <= Duration::from_secs(3), "{silence:?}");

    // B started the session and re-decided the flow: both say they resumed.
    let mut b = Vec::new();
    wait_until(Duration::from_secs(5), || {
        b = trail(&lab, 1);
        Ok(b.iter().any(|e| e["type"] == "flow_opened"))
    })
    .unwrap();
    let resumed = |kind: &str| {
        b.iter()
            .any(|e| e["type"] == kind && e["user"] == "alice" && e["resumed"] == true)
    };
    assert!(resumed("session_started"), "{b:?}");
    assert!(resumed("flow_opened"), "{b:?}");
    drop(s);
    lab.stop_node(1);
}

#[test]
fn keepalived_moves_the_site_address_when_the_active_gateway_is_killed_and_tcp_survives() {
    let (alice_key, alice_pub) = wg_genkey().unwrap();
    let mut lab = ClusterLab::start(ClusterOptions {
        nodes: 2,
        site_vip: true,
        extra_config: format!(
            "[[peer]]\nuser = \"alice\"\npublic_key = \"{alice_pub}\"\naddress = \"100.64.0.2\"\n"
        ),
        ..ClusterOptions::default()
    })
    .unwrap();
    let active = lab.vip_holder().expect("a node holds the site address");
    assert_eq!(active, 0, "node 0 has the higher priority");
    let alice = lab
        .add_site_client("alice", &alice_key, "100.64.0.2")
        .unwrap();
    lab.provision(1, "alice", "sre").unwrap();
    let prod: SocketAddr = "10.8.0.2:22".parse().unwrap();
    let mut s = lab.open_when_granted(&alice, prod).unwrap();
    assert!(longest_silence(&mut s, Duration::from_millis(500)) < Duration::from_secs(1));

    // kill -9 of the gateway only: keepalived on that node lives on and must notice
    // through its /readyz check.
    lab.kill_node(active).unwrap();
    let silence = longest_silence(&mut s, Duration::from_secs(8));
    eprintln!("longest silence with keepalived moving {SITE_VIP}: {silence:?}");
    assert!(silence <= Duration::from_secs(3), "{silence:?}");
    assert_eq!(
        lab.vip_holder(),
        Some(1),
        "the site address moved to node 1"
    );
    let b = trail(&lab, 1);
    assert!(
        b.iter().any(|e| e["type"] == "session_started"
            && e["user"] == "alice"
            && e["resumed"] == true),
        "{b:?}"
    );
    drop(s);
}
