//! `portcullis-bench-cluster`: three gateway nodes on one PostgreSQL 15, through real
//! wireguard-go tunnels (`tests/cluster.rs` has the topology).
//! - `revoke`: alice's device talks to node C; an iperf3 stream and a ping every 2 ms run
//!   through her tunnel; her SCIM deactivation is sent to node A. Per trial, on the
//!   machine's one wall clock: from just before the request is written to the last ping
//!   reply alice received (an upper bound on C's last forwarded packet; resolution 2 ms).
//! - `changes`: SCIM creations sent to the three nodes by parallel clients: sustained
//!   changes per second (each answered after its commit and its local apply), and the
//!   time until every node has applied the last one;
//! - catch-up: node C loses its network to the database while 10,000 changes are made
//!   elsewhere; from the moment it is reachable again to its applied change number being
//!   the cluster's last.
//!
//! Run it through `scripts/bench-cluster.sh` (release build).

#![allow(clippy::indexing_slicing)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use portcullis_e2e::cluster::{ClusterLab, ClusterOptions, ADMIN_TOKEN, SCIM_TOKEN};
use portcullis_e2e::{quantile, sh, wait_until, wg_genkey};
use portcullis_testkit::numeric_arg as arg;

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn patch(active: bool) -> String {
    format!(
        r#"{{"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{{"op": "replace", "path": "active", "value": {active}}}]}}"#
    )
}

fn quiet() -> ClusterOptions {
    std::env::set_var(
        "PORTCULLIS_LAB_LOG",
        std::env::var("PORTCULLIS_LAB_LOG").unwrap_or_else(|_| "warn".into()),
    );
    ClusterOptions::default()
}

fn revoke(trials: usize) -> Result<()> {
    let (key, public) = wg_genkey()?;
    let mut lab = ClusterLab::start(ClusterOptions {
        extra_config: format!(
            "[[peer]]\nuser = \"alice\"\npublic_key = \"{public}\"\naddress = \"100.64.0.2\"\n"
        ),
        ..quiet()
    })?;
    let alice = lab.add_client("alice", &key, "100.64.0.2", 2)?;
    let mut server = Command::new("ip")
        .args(["netns", "exec", &lab.ns_lan, "iperf3", "-s", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let (status, user) = lab.http(
        0,
        "POST",
        "/scim/v2/Users",
        SCIM_TOKEN,
        r#"{"userName": "alice", "active": true}"#,
    )?;
    if status != 201 {
        bail!("creating alice: {status} {user}");
    }
    let id = user["id"].as_str().unwrap_or_default().to_string();
    let (status, g) = lab.http(
        0,
        "POST",
        "/scim/v2/Groups",
        SCIM_TOKEN,
        &format!(r#"{{"displayName": "sre", "members": [{{"value": "{id}"}}]}}"#),
    )?;
    if status != 201 {
        bail!("creating sre: {status} {g}");
    }
    let mut ms = Vec::new();
    for trial in 0..trials {
        // The cut dropped her session on C: a fresh handshake brings it back.
        lab.rehandshake(&alice)?;
        wait_until(Duration::from_secs(30), || {
            Ok(sh(&[
                "ip", "netns", "exec", &alice.ns, "ping", "-c", "1", "-W", "1", "10.8.0.2",
            ])
            .is_ok())
        })?;
        let ping_log = lab.dir.join(format!("ping-{trial}.log"));
        let mut ping = Command::new("ip")
            .args([
                "netns", "exec", &alice.ns, "ping", "-D", "-n", "-i", "0.002", "10.8.0.2",
            ])
            .stdout(Stdio::from(std::fs::File::create(&ping_log)?))
            .stderr(Stdio::null())
            .spawn()?;
        let mut iperf = Command::new("ip")
            .args([
                "netns", "exec", &alice.ns, "iperf3", "-c", "10.8.0.2", "-p", "5201", "-t", "30",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(700));
        let sent = now_secs();
        let (status, _) = lab.http(
            0,
            "PATCH",
            &format!("/scim/v2/Users/{id}"),
            SCIM_TOKEN,
            &patch(false),
        )?;
        if status != 200 {
            bail!("deactivating: {status}");
        }
        std::thread::sleep(Duration::from_millis(400));
        stop(&mut ping);
        stop(&mut iperf);
        let last = std::fs::read_to_string(&ping_log)?
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse::<f64>().ok())
            .next_back()
            .ok_or_else(|| anyhow!("no ping reply in {}", ping_log.display()))?;
        ms.push(((last - sent) * 1000.0).max(0.0));
        let (status, _) = lab.http(
            0,
            "PATCH",
            &format!("/scim/v2/Users/{id}"),
            SCIM_TOKEN,
            &patch(true),
        )?;
        if status != 200 {
            bail!("re-activating: {status}");
        }
    }
    stop(&mut server);
    println!(
        "revoke  trials {:>2}  SCIM to node A -> last ping reply through node C: p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms",
        ms.len(),
        quantile(&ms, 0.5),
        quantile(&ms, 0.99),
        quantile(&ms, 1.0)
    );
    Ok(())
}

fn stop(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// The cluster's last change and each node's applied one, as node `asked` reports.
fn applied(lab: &ClusterLab, asked: usize) -> Result<(i64, Vec<i64>)> {
    let (status, c) = lab.http(asked, "GET", "/admin/v1/cluster", ADMIN_TOKEN, "")?;
    if status != 200 {
        bail!("GET /cluster: {status} {c}");
    }
    let nodes = c["nodes"].as_array().cloned().unwrap_or_default();
    Ok((
        c["last_change"].as_i64().unwrap_or(-1),
        nodes
            .iter()
            .map(|n| n["applied_change"].as_i64().unwrap_or(-1))
            .collect(),
    ))
}

fn create_users(
    lab: &Arc<ClusterLab>,
    prefix: &str,
    n: usize,
    clients: usize,
    nodes: &[usize],
) -> Result<f64> {
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|w| {
            let lab = lab.clone();
            let prefix = prefix.to_string();
            let nodes = nodes.to_vec();
            std::thread::spawn(move || -> Result<()> {
                for i in (w..n).step_by(clients) {
                    let node = nodes[i % nodes.len()];
                    let (status, u) = lab.http(
                        node,
                        "POST",
                        "/scim/v2/Users",
                        SCIM_TOKEN,
                        &format!(r#"{{"userName": "{prefix}{i}", "active": true}}"#),
                    )?;
                    if status != 201 {
                        bail!("creating {prefix}{i} on node {node}: {status} {u}");
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| anyhow!("a client panicked"))??;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn changes(n: usize, catch_up: usize) -> Result<()> {
    let lab = Arc::new(ClusterLab::start(quiet())?);
    let clients = 6;
    let secs = create_users(&lab, "u", n, clients, &[0, 1, 2])?;
    let done = Instant::now();
    wait_until(Duration::from_secs(60), || {
        let (last, nodes) = applied(&lab, 0)?;
        Ok(nodes.iter().all(|a| *a == last))
    })?;
    println!(
        "changes {n} SCIM creations, {clients} clients over 3 nodes: {:.0} changes/s sustained; every node applied the last {:.0} ms after it was answered (heartbeat resolution 1 s)",
        n as f64 / secs,
        done.elapsed().as_secs_f64() * 1000.0
    );

    // Node C loses the database; 10,000 changes elsewhere; then it is reachable again.
    let c_ns = lab.nodes[2].ns.clone();
    sh(&["ip", "-n", &c_ns, "link", "set", "lan", "down"])?;
    let secs = create_users(&lab, "v", catch_up, clients, &[0, 1])?;
    let (last, _) = applied(&lab, 0)?;
    let back = Instant::now();
    sh(&["ip", "-n", &c_ns, "link", "set", "lan", "up"])?;
    wait_until(Duration::from_secs(120), || {
        let (_, nodes) = applied(&lab, 2)?;
        Ok(nodes.get(2).is_some_and(|a| *a >= last))
    })?;
    println!(
        "catch-up {catch_up} changes made while node C was cut off ({:.0} changes/s over 2 nodes): C applied them all {:.0} ms after its network came back",
        catch_up as f64 / secs,
        back.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

fn main() -> Result<()> {
    let trials = usize::try_from(arg("--trials", 20)).unwrap_or(20);
    let n = usize::try_from(arg("--changes", 3000)).unwrap_or(3000);
    let catch_up = usize::try_from(arg("--catch-up", 10_000)).unwrap_or(10_000);
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a == "revoke" || a == "changes")
        .collect();
    let run = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if run("revoke") {
        revoke(trials)?;
    }
    if run("changes") {
        changes(n, catch_up)?;
    }
    Ok(())
}
