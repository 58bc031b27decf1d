//! Just-in-time access in a cluster of three nodes on one PostgreSQL 15 (see
//! `tests/cluster.rs`): a request filed through node A and approved through node B lets
//! bob in through node C, whose own clock ends the grant and resets his connection; a
//! grant revoked through A is cut on C at once. Needs root.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::time::Duration;

use portcullis_e2e::cluster::{ClusterLab, ClusterOptions};
use portcullis_e2e::{echo_round_trip, expect_reset, wait_until, wg_genkey};
use serde_json::Value;

fn prod_ssh() -> SocketAddr {
    "10.8.0.2:22".parse().unwrap()
}

fn cli(lab: &ClusterLab, node: usize, args: &[&str]) -> String {
    let out = lab.cli(node, args).unwrap();
    assert!(
        out.status.success(),
        "{args:?} on node {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Files bob's request for prod's ssh through `node`; its id.
fn request(lab: &ClusterLab, node: usize, duration: &str) -> String {
    let out = cli(
        lab,
        node,
        &[
            "access",
            "request",
            "--user",
            "bob",
            "--network",
            "prod",
            "--port",
            "22/tcp",
            "--for",
            duration,
            "--reason",
            "INC-77 on-call help",
        ],
    );
    out.split_whitespace().nth(2).unwrap().to_string()
}

#[test]
fn a_grant_approved_on_one_node_holds_on_another_and_ends_there_on_time() {
    let (bob_key, bob_pub) = wg_genkey().unwrap();
    let mut lab = ClusterLab::start(ClusterOptions {
        extra_config: format!(
            "[[peer]]\nuser = \"bob\"\npublic_key = \"{bob_pub}\"\naddress = \"100.64.0.3\"\n"
        ),
        ..ClusterOptions::default()
    })
    .unwrap();
    lab.provision(0, "bob", "developers").unwrap();
    lab.provision(0, "dana", "sre-leads").unwrap();
    // bob's device talks to node C only.
    let bob = lab.add_client("bob", &bob_key, "100.64.0.3", 2).unwrap();
    assert!(lab
        .connect(&bob, prod_ssh(), Duration::from_millis(900))
        .is_err());

    let id = request(&lab, 0, "25s");
    // Node B knows the request (the change log), and dana approves it there.
    wait_until(Duration::from_secs(5), || {
        Ok(lab
            .cli(1, &["access", "show", &id])
            .unwrap()
            .status
            .success())
    })
    .unwrap();
    cli(&lab, 1, &["access", "approve", &id, "--as", "dana"]);
    let mut conn = lab
        .open_when_granted(&bob, prod_ssh())
        .unwrap_or_else(|e| panic!("{e}: {}", lab.nodes[2].log()));
    assert_eq!(echo_round_trip(&mut conn, b"via C").unwrap(), b"via C");
    let r: Value = serde_json::from_str(&cli(&lab, 2, &["access", "show", &id])).unwrap();
    assert_eq!(r["state"], "approved");
    let ends_at: chrono::DateTime<chrono::Utc> = r["ends_at"].as_str().unwrap().parse().unwrap();

    // C's own clock ends it.
    let until_end = (ends_at - chrono::Utc::now()).to_std().unwrap_or_default();
    expect_reset(&mut conn, until_end + Duration::from_secs(3)).unwrap();
    let late = chrono::Utc::now() - ends_at;
    eprintln!(
        "grant ended on node C: reset {} ms after its end",
        late.num_milliseconds()
    );
    assert!((0..1000).contains(&late.num_milliseconds()), "{late}");
    // Recorded once, by the lease holder; every node's book says expired.
    wait_until(Duration::from_secs(10), || {
        Ok((0..3).all(|n| {
            serde_json::from_str::<Value>(&cli(&lab, n, &["access", "show", &id]))
                .is_ok_and(|r| r["state"] == "expired")
        }))
    })
    .unwrap();
    let expired: usize = (0..3)
        .map(|n| {
            std::fs::read_to_string(lab.nodes[n].dir.join("events.jsonl"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("\"access_expired\"") && l.contains(&id))
                .count()
        })
        .sum();
    assert_eq!(expired, 1, "access_expired recorded once in the cluster");

    // A grant revoked through A is cut on C at once.
    let long = request(&lab, 0, "1h");
    wait_until(Duration::from_secs(5), || {
        Ok(lab
            .cli(1, &["access", "show", &long])
            .unwrap()
            .status
            .success())
    })
    .unwrap();
    cli(&lab, 1, &["access", "approve", &long, "--as", "dana"]);
    let mut conn = lab.open_when_granted(&bob, prod_ssh()).unwrap();
    assert_eq!(echo_round_trip(&mut conn, b"again").unwrap(), b"again");
    cli(&lab, 0, &["access", "revoke", &long, "--reason", "done"]);
    let after = expect_reset(&mut conn, Duration::from_secs(2)).unwrap();
    eprintln!("revoked on node A: cut on node C {after:?} after A answered");
}
