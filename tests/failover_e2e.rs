//! Failover end to end: two nodes of one site on PostgreSQL, a stock wireguard-go client
//! with a live TCP connection through node A; A is killed (`kill -9`) and the site's
//! address moves to node B. B never saw the client's session: it starts the handshake
//! itself, the same TCP connection goes on through B, and B's trail says the session and
//! the flow resumed.
//!
//! The first test moves the address the way VRRP moves it (the client's link now ends at
//! B, same addresses, the inside route follows), done by the test itself so the gap
//! measured is the gateway's. The others run two sites of two nodes each behind
//! keepalived (see `tests/cluster/sites.rs`), with a wireguard-go client running its
//! device's profile exactly as the gateway handed it out (one `[Peer]` per site).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portcullis_e2e::cluster::{ClusterLab, ClusterOptions, ADMIN_TOKEN};
use portcullis_e2e::{echo_round_trip, expect_reset, wait_until, wg_genkey, Client};
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

/// Runs a 10 ms ping from `client_ns` to `dst` and the TCP echo over `s` for `run`,
/// with `event` 300 ms in.
fn gaps_around(
    client_ns: &str,
    dst: &str,
    s: &mut std::net::TcpStream,
    run: Duration,
    event: impl FnOnce() + Send,
) -> Gaps {
    std::thread::scope(|scope| {
        let echo = scope.spawn(|| longest_silence(s, run));
        let ping = ClusterLab::ping_gap_to(client_ns, dst, run, event).unwrap();
        Gaps {
            ping,
            tcp: echo.join().unwrap_or_else(|e| std::panic::resume_unwind(e)),
        }
    })
}

const EU_PROD: &str = "10.8.0.2";
const US_PROD: &str = "10.20.0.2";

fn ssh(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), 22)
}

/// Two sites (eu-1: nodes 0 and 1; us-1: nodes 2 and 3) behind keepalived, devices
/// enabled; the first node of each site holds its address.
fn two_sites() -> ClusterLab {
    let lab = ClusterLab::start(ClusterOptions {
        nodes: 4,
        sites: 2,
        extra_config:
            "[devices]\npool = \"100.64.0.128/26\"\nendpoint = \"192.168.90.100:51820\"\n".into(),
        ..ClusterOptions::default()
    })
    .unwrap();
    assert_eq!(
        lab.vip_holder_of(0),
        Some(0),
        "eu-1's first node is preferred"
    );
    assert_eq!(
        lab.vip_holder_of(1),
        Some(2),
        "us-1's first node is preferred"
    );
    lab
}

/// alice (group sre) with a device registered through node `via`, running its profile
/// as handed out: one `[Peer]` per site, each with only that site's networks.
fn alice_with_profile(lab: &mut ClusterLab, via: usize) -> (String, Client) {
    let id = lab.provision(1, "alice", "sre").unwrap();
    let profile = lab.device_profile(via, "alice").unwrap();
    let peers: Vec<&str> = profile.split("[Peer]").skip(1).collect();
    assert_eq!(peers.len(), 2, "{profile}");
    let eu = &lab.sites[0];
    let us = &lab.sites[1];
    assert!(profile.contains("# site eu-1\n[Peer]"), "{profile}");
    assert!(
        peers[0].contains(&format!("PublicKey = {}", eu.public_key)),
        "{profile}"
    );
    assert!(
        peers[0].contains("Endpoint = 192.168.90.100:51820"),
        "{profile}"
    );
    assert!(
        peers[0].contains("10.8.0.0/16") && !peers[0].contains("10.20."),
        "{profile}"
    );
    assert!(
        peers[1].contains(&format!("PublicKey = {}", us.public_key)),
        "{profile}"
    );
    assert!(
        peers[1].contains("Endpoint = 192.168.91.100:51820"),
        "{profile}"
    );
    assert!(
        peers[1].contains("AllowedIPs = 10.20.0.0/16\n"),
        "{profile}"
    );
    let alice = lab.add_profile_client("alice", &profile).unwrap();
    (id, alice)
}

/// An `iperf3 -t 30` from `c` to `dst`, started now.
fn iperf3(c: &Client, dst: &str) -> std::process::Child {
    std::process::Command::new("ip")
        .args([
            "netns", "exec", &c.ns, "iperf3", "-c", dst, "-t", "30", "-b", "10M", "-J",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn keepalived_moves_a_sites_address_on_a_kill_a_failback_a_stuck_loop_and_a_dark_node_and_the_other_site_lives_on(
) {
    let mut lab = two_sites();
    let (_, alice) = alice_with_profile(&mut lab, 3);
    let mut s = lab.open_when_granted(&alice, ssh(EU_PROD)).unwrap();
    let mut us = lab.open_when_granted(&alice, ssh(US_PROD)).unwrap();
    assert_eq!(echo_round_trip(&mut us, b"us-1").unwrap(), b"us-1");
    let ns = alice.ns.clone();
    let report = |what: &str, g: &Gaps| {
        eprintln!("{what}: ping gap {:?}, TCP silence {:?}", g.ping, g.tcp);
        assert!(g.ping <= Duration::from_secs(3), "{what}: {g:?}");
    };
    lab.iperf3_server(EU_PROD).unwrap();
    let bulk = iperf3(&alice, EU_PROD);
    std::thread::sleep(Duration::from_secs(2));

    // kill -9 of the gateway only, during the iperf3 run: keepalived on that node lives
    // on and must notice through its /readyz check.
    let lab_ref = &mut lab;
    let g = gaps_around(&ns, EU_PROD, &mut s, Duration::from_secs(6), || {
        lab_ref.kill_node(0).unwrap();
    });
    report("kill -9 of the active gateway", &g);
    assert_eq!(
        lab.vip_holder_of(0),
        Some(1),
        "the site address moved to node 1"
    );
    let b = trail(&lab, 1);
    for kind in ["session_started", "flow_opened"] {
        assert!(
            b.iter()
                .any(|e| e["type"] == kind && e["user"] == "alice" && e["resumed"] == true),
            "{kind} resumed on node 1: {b:?}"
        );
    }

    // Failback: node 0 comes back and takes the address again (higher priority); the
    // connection goes on through it, and keeps going well after.
    let lab_ref = &mut lab;
    let g = gaps_around(&ns, EU_PROD, &mut s, Duration::from_secs(12), || {
        lab_ref.start_node(0).unwrap();
    });
    report("failback to the restarted node", &g);
    assert_eq!(
        lab.vip_holder_of(0),
        Some(0),
        "node 0 took the address back"
    );

    // The minutes after the failback: the session node 0 started itself lives through
    // the 120 s rekey and past the 180 s a key may be used at most, without a stall.
    let g = gaps_around(&ns, EU_PROD, &mut s, Duration::from_secs(190), || {});
    eprintln!(
        "190 s after the failback: ping gap {:?}, TCP silence {:?}",
        g.ping, g.tcp
    );
    assert!(
        g.ping <= Duration::from_secs(1) && g.tcp <= Duration::from_secs(1),
        "a stall after the failback: {g:?}"
    );

    // A stuck packet loop (the process lives): /readyz fails and the address moves,
    // then back once the loop recovers (3 s); the connection survives both moves.
    let lab_ref = &lab;
    let mut moved = false;
    let g = gaps_around(&ns, EU_PROD, &mut s, Duration::from_secs(8), || {
        lab_ref.stall_node(0).unwrap();
        moved = wait_until(Duration::from_secs(3), || {
            Ok(lab_ref.vip_holder_of(0) == Some(1))
        })
        .is_ok();
    });
    assert!(moved, "the stuck node kept the site address");
    eprintln!(
        "a stuck packet loop on the active node: ping gap {:?}, TCP silence {:?}",
        g.ping, g.tcp
    );

    // The iperf3 run spanned the kill and the failback: it completed without a reset.
    let out = bulk.wait_with_output().unwrap();
    let result: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success() && result.get("error").is_none(),
        "iperf3: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let received = result["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    eprintln!("iperf3 -t 30 across two address moves: {received} bytes received");
    assert!(received > 10_000_000, "{result}");

    // The active node goes dark (its links cut): the other stops hearing its adverts.
    wait_until(Duration::from_secs(10), || {
        Ok(lab.vip_holder_of(0) == Some(0))
    })
    .unwrap();
    let lab_ref = &lab;
    let g = gaps_around(&ns, EU_PROD, &mut s, Duration::from_secs(8), || {
        lab_ref.cut_links(0).unwrap();
    });
    report("the active node dark", &g);
    assert!(
        lab.holds_vip(1),
        "node 1 holds the site address after node 0 went dark"
    );

    // Both nodes of eu-1 down (0 dark, 1 killed): us-1's networks stay reachable through
    // the same profile, without a gap; eu-1's are gone.
    let lab_ref = &mut lab;
    let g = gaps_around(&ns, US_PROD, &mut us, Duration::from_secs(5), || {
        lab_ref.kill_node(1).unwrap();
    });
    eprintln!(
        "eu-1 down: us-1 ping gap {:?}, TCP silence {:?}",
        g.ping, g.tcp
    );
    assert!(g.ping < Duration::from_secs(1), "{g:?}");
    let eu = ClusterLab::ping_replies(&ns, EU_PROD, Duration::from_secs(2), || {}).unwrap();
    assert!(eu.is_empty(), "eu-1 is down, yet {} replies", eu.len());
    assert_eq!(echo_round_trip(&mut us, b"still").unwrap(), b"still");
    assert_eq!(lab.vip_holder_of(1), Some(2));
}

/// Whether node `i` lists a live session of `user`.
fn has_session(lab: &ClusterLab, i: usize, user: &str) -> bool {
    let (status, list) = lab
        .http(i, "GET", "/admin/v1/sessions", ADMIN_TOKEN, "")
        .unwrap();
    assert_eq!(status, 200, "{list}");
    list.as_array().unwrap().iter().any(|s| s["user"] == user)
}

#[test]
fn a_revocation_during_a_failover_cuts_the_user_on_every_node() {
    let mut lab = two_sites();
    let (id, alice) = alice_with_profile(&mut lab, 0);
    let mut eu = lab.open_when_granted(&alice, ssh(EU_PROD)).unwrap();
    let mut us = lab.open_when_granted(&alice, ssh(US_PROD)).unwrap();
    assert_eq!(echo_round_trip(&mut eu, b"eu").unwrap(), b"eu");
    assert!(has_session(&lab, 0, "alice") && has_session(&lab, 2, "alice"));

    // eu-1's active node dies and, before its address has moved, HR offboards alice
    // through a node of the other site.
    lab.kill_node(0).unwrap();
    let (status, off) = lab.set_active(3, &id, false).unwrap();
    assert_eq!(
        (status, off["active"].as_bool()),
        (200, Some(false)),
        "{off}"
    );
    // us-1's node cuts her live connection at once.
    let cut = expect_reset(&mut us, Duration::from_secs(2)).unwrap();
    eprintln!("us-1 cut her connection {cut:?} after the revocation was answered");
    // eu-1's address moves to node 1, which now receives her packets for the session
    // the dead node had: it must not take her over.
    wait_until(Duration::from_secs(5), || {
        Ok(lab.vip_holder_of(0) == Some(1))
    })
    .unwrap();
    let _ = eu.write_all(b"knock");
    for dst in [EU_PROD, US_PROD] {
        let replies =
            ClusterLab::ping_replies(&alice.ns, dst, Duration::from_secs(3), || {}).unwrap();
        assert!(replies.is_empty(), "{dst} answered {} times", replies.len());
        assert!(lab
            .connect(&alice, ssh(dst), Duration::from_millis(900))
            .is_err());
    }
    for i in 1..4 {
        assert!(
            !has_session(&lab, i, "alice"),
            "node {i} has a session of alice"
        );
    }
    let b = trail(&lab, 1);
    assert!(
        !b.iter()
            .any(|e| e["type"] == "session_started" && e["user"] == "alice"),
        "node 1 let her in: {b:?}"
    );
    assert!(
        trail(&lab, 2)
            .iter()
            .any(|e| e["type"] == "user_revoked" && e["user"] == "alice"),
        "node 2 recorded the revocation"
    );

    // Re-enabled, she is back through the node that took eu-1 over (resumed, no new
    // login): what kept her out was the revocation, not a failed failover.
    let (status, on) = lab.set_active(3, &id, true).unwrap();
    assert_eq!(status, 200, "{on}");
    let mut back = lab.open_when_granted(&alice, ssh(EU_PROD)).unwrap();
    assert_eq!(echo_round_trip(&mut back, b"back").unwrap(), b"back");
    assert!(has_session(&lab, 1, "alice"));

    // A policy author's typo in a site would leave a network served by no node: the
    // replacement is refused at the typo's line and column, nothing changes.
    let (_, current) = lab
        .http(2, "GET", "/admin/v1/policies", ADMIN_TOKEN, "")
        .unwrap();
    let mut files = current["files"].clone();
    let networks = files["networks"].as_str().unwrap().to_string();
    assert!(networks.contains("site = \"us-1\""), "{networks}");
    files["networks"] = Value::String(networks.replace("site = \"us-1\"", "site = \"us1\""));
    let version = current["version"].as_str().unwrap();
    let (status, refused) = lab
        .http_with(
            2,
            "PUT",
            "/admin/v1/policies",
            &[("If-Match", &format!("\"{version}\""))],
            &files.to_string(),
        )
        .unwrap();
    assert_eq!(status, 422, "{refused}");
    let e = &refused["errors"][0];
    assert_eq!(e["file"], "networks.toml", "{refused}");
    let line = networks
        .lines()
        .position(|l| l == "site = \"us-1\"")
        .unwrap()
        + 1;
    assert_eq!(
        (e["line"].as_u64(), e["col"].as_u64()),
        (Some(line as u64), Some(8)),
        "{refused}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("site \"us1\" is not one of [[cluster.sites]] (eu-1, us-1)"),
        "{refused}"
    );
    let (_, after) = lab
        .http(2, "GET", "/admin/v1/policies", ADMIN_TOKEN, "")
        .unwrap();
    assert_eq!(after["version"], current["version"]);
}
