//! `portcullis-lab --cluster`: three gateway nodes on one PostgreSQL 15 and one
//! ClickHouse, alice's stock wireguard-go client on node C. Shows a change made on node A
//! deciding traffic on node C, a revocation on A cutting C's live connection, a node
//! killed and its client moving to another node, the cluster's status, and every node's
//! audit chain verified. Then two sites of two nodes behind keepalived: a device's
//! profile with one `[Peer]` per site, `kill -9` of eu-1's active gateway under a 10 ms
//! ping (the address moves, the new node starts the handshake, the trail says the
//! session resumed), and eu-1 entirely down while us-1 goes on.

use std::io::BufRead as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use portcullis_e2e::cluster::{ClusterLab, ClusterOptions, SCIM_TOKEN};
use portcullis_e2e::{echo_round_trip, wait_until, wg_genkey};

fn cli(lab: &ClusterLab, node: usize, args: &[&str]) -> Result<String> {
    let out = lab.cli(node, args)?;
    if !out.status.success() {
        bail!(
            "portcullis {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn scim(
    lab: &ClusterLab,
    node: usize,
    method: &str,
    path: &str,
    body: &str,
) -> Result<serde_json::Value> {
    let (status, v) = lab.http(node, method, path, SCIM_TOKEN, body)?;
    if !(200..300).contains(&status) {
        bail!("{method} {path} on node {node}: {status} {v}");
    }
    Ok(v)
}

pub fn run(hold: bool) -> Result<()> {
    println!(
        "Portcullis cluster lab: three nodes on PostgreSQL 15, ClickHouse, a wireguard-go client…"
    );
    let clickhouse = portcullis_testkit::ClickHouse::start()?;
    let (key, public) = wg_genkey()?;
    let mut lab = ClusterLab::start_audited(
        ClusterOptions {
            extra_config: format!(
                "[[peer]]\nuser = \"alice\"\npublic_key = \"{public}\"\naddress = \"100.64.0.2\"\n"
            ),
            ..ClusterOptions::default()
        },
        &clickhouse,
    )?;
    cli(&lab, 0, &["audit", "migrate"])?;
    let alice = lab.add_client("alice", &key, "100.64.0.2", 2)?;
    println!(
        "  nodes gw-a, gw-b, gw-c (ns {}, {}, {}); PostgreSQL {}; ClickHouse {}",
        lab.nodes[0].ns,
        lab.nodes[1].ns,
        lab.nodes[2].ns,
        lab.postgres.url(),
        clickhouse.url()
    );
    println!("  alice's device dials node C ({})", alice.endpoint);
    println!();
    println!("`portcullis cluster status`:");
    print!("{}", indent(&cli(&lab, 0, &["cluster", "status"])?));

    println!();
    println!("The IdP provisions alice (group sre) through node A, over SCIM:");
    let user = scim(
        &lab,
        0,
        "POST",
        "/scim/v2/Users",
        r#"{"userName": "alice", "active": true}"#,
    )?;
    let id = user["id"].as_str().unwrap_or_default().to_string();
    scim(
        &lab,
        0,
        "POST",
        "/scim/v2/Groups",
        &format!(r#"{{"displayName": "sre", "members": [{{"value": "{id}"}}]}}"#),
    )?;
    let prod: std::net::SocketAddr = "10.8.0.2:22".parse()?;
    let mut conn = None;
    wait_until(Duration::from_secs(20), || {
        conn = lab.connect(&alice, prod, Duration::from_millis(900)).ok();
        Ok(conn.is_some())
    })?;
    let mut conn = conn.ok_or_else(|| anyhow!("alice never reached prod"))?;
    echo_round_trip(&mut conn, b"hello")?;
    println!("  ALLOWED  alice → prod 10.8.0.2:22/tcp through node C (sre-prod, decided on C)");

    println!();
    println!("Offboarding on node A cuts her live connection on node C:");
    let sent = Instant::now();
    scim(
        &lab,
        0,
        "PATCH",
        &format!("/scim/v2/Users/{id}"),
        r#"{"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{"op": "replace", "path": "active", "value": false}]}"#,
    )?;
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = [0u8; 8];
    let cut = matches!(std::io::Read::read(&mut conn, &mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
    println!(
        "  {}  SCIM deactivate sent to node A → reset on node C {:.1} ms later",
        if cut { "CUT    " } else { "NOT CUT" },
        sent.elapsed().as_secs_f64() * 1000.0
    );
    if !cut {
        bail!(
            "node C did not cut alice's connection: {}",
            lab.nodes[2].log()
        );
    }

    println!();
    println!(
        "Node C is killed (kill -9); alice's device is pointed at node B (what a VIP or DNS does):"
    );
    scim(
        &lab,
        1,
        "PATCH",
        &format!("/scim/v2/Users/{id}"),
        r#"{"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{"op": "replace", "path": "active", "value": true}]}"#,
    )?;
    // Past the audit commit interval (50 ms): what C did is in its spool when it dies.
    std::thread::sleep(Duration::from_millis(200));
    lab.kill_node(2)?;
    let killed = Instant::now();
    let alice = lab.move_client(&alice, 1)?;
    wait_until(Duration::from_secs(30), || {
        Ok(lab
            .connect(&alice, prod, Duration::from_millis(500))
            .and_then(|mut s| echo_round_trip(&mut s, b"again"))
            .is_ok())
    })?;
    println!(
        "  ALLOWED  alice → prod through node B, {:.1} s after node C died (same key, same directory)",
        killed.elapsed().as_secs_f64()
    );
    wait_until(Duration::from_secs(10), || {
        Ok(cli(&lab, 0, &["cluster", "status"])?.contains(" down "))
    })?;
    println!("`portcullis cluster status`:");
    print!("{}", indent(&cli(&lab, 0, &["cluster", "status"])?));
    // The node-repair lease's holder records C's death once, so the sessions C had open
    // end in the trail although C never said so.
    let downs = || {
        clickhouse
            .query("SELECT gateway, reason FROM portcullis.events FINAL WHERE kind = 'node_down'")
            .unwrap_or_default()
    };
    wait_until(Duration::from_secs(30), || Ok(!downs().is_empty()))?;
    let recorded = downs();
    let by = recorded.split('\t').next().unwrap_or("?");
    println!(
        "  REPAIRED node C's death recorded by {by} {:.1} s after the kill (node_down, reason {}): its open sessions end in the trail",
        killed.elapsed().as_secs_f64(),
        recorded.trim().split('\t').nth(1).unwrap_or("?")
    );

    if hold {
        println!();
        println!(
            "Cluster lab is up. Try: ip netns exec {} ping 10.8.0.2 — press Enter to tear down.",
            alice.ns
        );
        let _ = std::io::stdin().lock().lines().next();
    }

    lab.stop_node(0);
    lab.stop_node(1);
    // C's spool still holds what it did not upload before it was killed: a restart
    // drains it (nothing is lost by kill -9).
    lab.start_node(2)?;
    wait_until(Duration::from_secs(30), || {
        Ok(clickhouse
            .query("SELECT count() FROM portcullis.events WHERE gateway = 'gw-c' AND kind = 'user_revoked'")
            .is_ok_and(|n| n.trim() != "0"))
    })?;
    lab.stop_node(2);
    wait_until(Duration::from_secs(30), || {
        Ok(clickhouse
            .query("SELECT DISTINCT gateway FROM portcullis.events")
            .map(|t| t.lines().count() == 3)
            .unwrap_or(false))
    })?;
    println!();
    println!("`portcullis audit verify` (one hash chain per node):");
    print!("{}", indent(&cli(&lab, 0, &["audit", "verify"])?));
    println!();
    println!("`portcullis audit query --report sessions --user alice` (her sessions on every node, and how each ended):");
    print!(
        "{}",
        indent(&cli(
            &lab,
            0,
            &["audit", "query", "--report", "sessions", "--user", "alice"]
        )?)
    );
    drop(lab);
    sites()?;
    println!();
    println!("Every node applied the change made on another; the cluster labs are torn down.");
    Ok(())
}

/// The sites part: two sites of two nodes, keepalived, a profile as handed out.
fn sites() -> Result<()> {
    println!();
    println!("Two sites, eu-1 (gw-a, gw-b) and us-1 (gw-c, gw-d), each behind a virtual address keepalived moves (VRRPv3, 0.5 s adverts, /readyz checked):");
    let mut lab = ClusterLab::start(ClusterOptions {
        nodes: 4,
        sites: 2,
        extra_config:
            "[devices]\npool = \"100.64.0.128/26\"\nendpoint = \"192.168.90.100:51820\"\n".into(),
        ..ClusterOptions::default()
    })?;
    lab.provision(0, "alice", "sre")?;
    let profile = lab.device_profile(0, "alice")?;
    println!(
        "alice's device profile, as POST /admin/v1/devices hands it out (one [Peer] per site):"
    );
    for line in profile.lines() {
        let shown = if line.starts_with("PrivateKey") {
            "PrivateKey = (hidden)"
        } else {
            line
        };
        println!("  {shown}");
    }
    let alice = lab.add_profile_client("alice", &profile)?;
    let mut eu = lab.open_when_granted(&alice, "10.8.0.2:22".parse()?)?;
    echo_round_trip(&mut eu, b"eu")?;
    let mut us = lab.open_when_granted(&alice, "10.20.0.2:22".parse()?)?;
    echo_round_trip(&mut us, b"us")?;
    println!(
        "  ALLOWED  alice → eu-1 prod 10.8.0.2 through gw-a, → us-1 prod-us 10.20.0.2 through gw-c"
    );

    println!();
    println!("kill -9 of gw-a (eu-1's active gateway) under a 10 ms ping:");
    let gap = ClusterLab::ping_gap(&alice.ns, Duration::from_secs(5), || {
        let _ = lab.kill_node(0);
    })?;
    echo_round_trip(&mut eu, b"still")?;
    println!(
        "  FAILOVER ping stopped for {:.2} s; eu-1's address is on {}; the same TCP connection goes on",
        gap.as_secs_f64(),
        lab.vip_holder_of(0)
            .map_or("no node".to_string(), |i| lab.nodes[i].node_id.clone())
    );
    // The trail is committed every 50 ms: wait for the flow's continuation.
    let resumed = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(lab.nodes[1].dir.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["resumed"] == true)
            .collect()
    };
    wait_until(Duration::from_secs(5), || {
        Ok(resumed().iter().any(|e| e["type"] == "flow_opened"))
    })?;
    for e in resumed() {
        println!(
            "  gw-b's trail: {:<15} user {} {}resumed=true",
            e["type"].as_str().unwrap_or("?"),
            e["user"].as_str().unwrap_or("?"),
            match (e["dst_ip"].as_str(), e["dst_port"].as_u64()) {
                (Some(ip), Some(port)) => format!("→ {ip}:{port} "),
                _ => String::new(),
            }
        );
    }

    println!();
    println!("gw-b killed too: eu-1 is down, us-1 goes on through the same profile:");
    let gap = ClusterLab::ping_gap_to(&alice.ns, "10.20.0.2", Duration::from_secs(3), || {
        let _ = lab.kill_node(1);
    })?;
    echo_round_trip(&mut us, b"us-1")?;
    let eu_replies =
        ClusterLab::ping_replies(&alice.ns, "10.8.0.2", Duration::from_secs(2), || {})?;
    println!(
        "  us-1: longest ping gap {:.0} ms, TCP connection fine; eu-1: {} replies",
        gap.as_secs_f64() * 1000.0,
        eu_replies.len()
    );
    if !eu_replies.is_empty() {
        bail!("eu-1 answered with both its nodes down");
    }
    Ok(())
}
