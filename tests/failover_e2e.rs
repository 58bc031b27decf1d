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

/// What a failover cost: the longest gap between replies of a 10 ms ping, and the
/// longest silence of the TCP echo (which also must not break: that is the test).
#[derive(Debug)]
struct Gaps {
    ping: Duration,
    tcp: Duration,
}

/// Runs a 10 ms ping from `client_ns` to prod and the TCP echo over `s` for `run`,
/// with `event` 300 ms in.
fn gaps_around(
    client_ns: &str,
    s: &mut std::net::TcpStream,
    run: Duration,
    event: impl FnOnce() + Send,
) -> Gaps {
    std::thread::scope(|scope| {
        let echo = scope.spawn(|| longest_silence(s, run));
        let ping = ClusterLab::ping_gap(client_ns, run, event).unwrap();
        Gaps {
            ping,
            tcp: echo.join().unwrap_or_else(|e| std::panic::resume_unwind(e)),
        }
    })
}

#[test]
fn keepalived_moves_the_site_address_on_a_kill_a_failback_a_stuck_loop_and_a_dark_node() {
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
    assert_eq!(lab.vip_holder(), Some(0), "node 0 has the higher priority");
    let alice = lab
        .add_site_client("alice", &alice_key, "100.64.0.2")
        .unwrap();
    lab.provision(1, "alice", "sre").unwrap();
    let prod: SocketAddr = "10.8.0.2:22".parse().unwrap();
    let mut s = lab.open_when_granted(&alice, prod).unwrap();
    let ns = alice.ns.clone();
    let report = |what: &str, g: &Gaps| {
        eprintln!("{what}: ping gap {:?}, TCP silence {:?}", g.ping, g.tcp);
        assert!(g.ping <= Duration::from_secs(3), "{what}: {g:?}");
    };

    // kill -9 of the gateway only: keepalived on that node lives on and must notice
    // through its /readyz check.
    let lab_ref = &mut lab;
    let g = gaps_around(&ns, &mut s, Duration::from_secs(6), || {
        lab_ref.kill_node(0).unwrap();
    });
    report("kill -9 of the active gateway", &g);
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

    // Failback: node 0 comes back and takes the address again (higher priority); the
    // connection goes on through it, and keeps going well after.
    let lab_ref = &mut lab;
    let g = gaps_around(&ns, &mut s, Duration::from_secs(12), || {
        lab_ref.start_node(0).unwrap();
    });
    report("failback to the restarted node", &g);
    assert_eq!(lab.vip_holder(), Some(0), "node 0 took the address back");

    // A stuck packet loop (the process lives): /readyz fails and the address moves,
    // then back once the loop recovers (3 s); the connection survives both moves.
    let lab_ref = &lab;
    let mut moved = false;
    let g = gaps_around(&ns, &mut s, Duration::from_secs(8), || {
        lab_ref.stall_node(0).unwrap();
        moved = wait_until(Duration::from_secs(3), || {
            Ok(lab_ref.vip_holder() == Some(1))
        })
        .is_ok();
    });
    assert!(moved, "the stuck node kept the site address");
    eprintln!(
        "a stuck packet loop on the active node: ping gap {:?}, TCP silence {:?}",
        g.ping, g.tcp
    );

    // The active node goes dark (its links cut): the other stops hearing its adverts.
    wait_until(Duration::from_secs(10), || Ok(lab.vip_holder() == Some(0))).unwrap();
    let lab_ref = &lab;
    let g = gaps_around(&ns, &mut s, Duration::from_secs(8), || {
        lab_ref.cut_links(0).unwrap();
    });
    report("the active node dark", &g);
    assert!(
        sh_addr_on(&lab, 1),
        "node 1 holds the site address after node 0 went dark"
    );
    drop(s);
}

/// Node `i` has the site address on its outer link (node 0, dark, may still list it).
fn sh_addr_on(lab: &ClusterLab, i: usize) -> bool {
    std::process::Command::new("ip")
        .args(["-n", &lab.nodes[i].ns, "-4", "addr", "show", "dev", "wan"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("{SITE_VIP}/")))
}
