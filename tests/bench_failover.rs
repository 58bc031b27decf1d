//! `portcullis-bench-failover` (scripts/bench-failover.sh): what a failover costs a stock
//! wireguard-go client, in the lab's `site_vip` topology (two nodes of one site on
//! PostgreSQL, keepalived with VRRPv3 0.5 s adverts and `/readyz` checked every second).
//!
//! Each trial: a 10 ms ping from the client to prod through the site's address; the
//! active node is killed (`kill -9` of the gateway, keepalived lives on) or goes dark
//! (its links cut); the trial's number is the longest gap between ping replies. The
//! node then comes back (restart, or links up) and takes the address back before the
//! next trial. The same with `[cluster] resume_sessions = false` shows what the
//! gateway-initiated handshake buys (the client then recovers on its own).
//!
//! Usage: portcullis-bench-failover [--trials N] [--baseline-trials N]

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use portcullis_e2e::cluster::{ClusterLab, ClusterOptions};
use portcullis_e2e::{wait_until, wg_genkey};

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Kill,
    Dark,
}

fn arg(name: &str, default: usize) -> Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .ok_or_else(|| anyhow!("{name} needs a number"))?
            .parse()
            .with_context(|| name.to_string()),
        None => Ok(default),
    }
}

/// Waits until the client's pings pass again (through whichever node holds the address).
fn flowing(ns: &str, within: Duration) -> Result<()> {
    wait_until(within, || {
        Ok(std::process::Command::new("ip")
            .args([
                "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "1", "10.8.0.2",
            ])
            .output()
            .is_ok_and(|o| o.status.success()))
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank: with 10 trials p99 is the worst one.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn run(scenario: Scenario, resume: bool, trials: usize) -> Result<Vec<Duration>> {
    let (key, public) = wg_genkey()?;
    let mut lab = ClusterLab::start(ClusterOptions {
        nodes: 2,
        sites: 1,
        // The first lines land in [cluster].
        extra_config: format!(
            "{}[[peer]]\nuser = \"alice\"\npublic_key = \"{public}\"\naddress = \"100.64.0.2\"\n",
            if resume {
                ""
            } else {
                "resume_sessions = false\n"
            }
        ),
        ..ClusterOptions::default()
    })?;
    let alice = lab.add_site_client("alice", &key, "100.64.0.2")?;
    lab.provision(1, "alice", "sre")?;
    flowing(&alice.ns, Duration::from_secs(30))?;
    // Without the gateway's help a stock client waits out its ~15 s (and more).
    let window = if resume {
        Duration::from_secs(6)
    } else {
        Duration::from_secs(40)
    };
    let mut gaps = Vec::new();
    for trial in 0..trials {
        wait_until(Duration::from_secs(60), || Ok(lab.vip_holder() == Some(0)))?;
        flowing(&alice.ns, Duration::from_secs(60))?;
        let started = Instant::now();
        let gap = match scenario {
            Scenario::Kill => {
                let lab_ref = &mut lab;
                ClusterLab::ping_gap(&alice.ns, window, || {
                    let _ = lab_ref.kill_node(0);
                })?
            }
            Scenario::Dark => {
                let lab_ref = &lab;
                ClusterLab::ping_gap(&alice.ns, window, || {
                    let _ = lab_ref.cut_links(0);
                })?
            }
        };
        eprintln!(
            "  trial {}: {:.2} s (in {:.0} s)",
            trial + 1,
            gap.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        gaps.push(gap);
        match scenario {
            Scenario::Kill => lab.start_node(0)?,
            Scenario::Dark => lab.restore_links(0)?,
        }
    }
    Ok(gaps)
}

fn main() -> Result<()> {
    let trials = arg("--trials", 10)?;
    let baseline = arg("--baseline-trials", 5)?;
    println!("failover: longest gap of a 10 ms ping, two nodes of a site behind keepalived (VRRPv3, advert_int 0.5, /readyz every 1 s)");
    for (label, scenario, resume, n) in [
        (
            "kill -9 of the active gateway",
            Scenario::Kill,
            true,
            trials,
        ),
        (
            "the active node dark (links cut)",
            Scenario::Dark,
            true,
            trials,
        ),
        (
            "kill -9, client recovery only (resume_sessions = false)",
            Scenario::Kill,
            false,
            baseline,
        ),
    ] {
        if n == 0 {
            continue;
        }
        eprintln!("{label}:");
        let mut gaps = run(scenario, resume, n)?;
        gaps.sort();
        println!(
            "{label}: trials {n}, p50 {:.2} s, p99 {:.2} s, min {:.2} s",
            percentile(&gaps, 50.0).as_secs_f64(),
            percentile(&gaps, 99.0).as_secs_f64(),
            gaps.first().copied().unwrap_or_default().as_secs_f64()
        );
    }
    Ok(())
}
