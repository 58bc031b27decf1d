//! `portcullis-bench-net`: side-by-side throughput on the same namespace path, in one run:
//! portcullis as the gateway vs wireguard-go as the gateway (kernel forwarding), iperf3 TCP
//! with 1 and 4 streams in both directions, from a wireguard-go client. Reports median
//! throughput and the gateway process's CPU-seconds per GB. Run it through
//! `scripts/bench-throughput.sh` (release build).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use portcullis_e2e::{GatewayKind, Lab, LabOptions};
use serde_json::Value;

struct Row {
    kind: &'static str,
    streams: u32,
    reverse: bool,
    gbps: Vec<f64>,
    cpu_per_gb: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let seconds = arg("--seconds", 5);
    let reps = arg("--reps", 3);
    let mut rows = Vec::new();
    for (kind, name) in [
        (GatewayKind::WireguardGo, "wireguard-go"),
        (GatewayKind::Portcullis, "portcullis"),
    ] {
        let lab = Lab::start(LabOptions {
            gateway: kind,
            ..LabOptions::default()
        })?;
        let mut server = IperfServer::start(&lab.ns_prod)?;
        std::thread::sleep(Duration::from_millis(300));
        for (streams, reverse) in [(1, false), (4, false), (1, true), (4, true)] {
            let mut row = Row {
                kind: name,
                streams,
                reverse,
                gbps: vec![],
                cpu_per_gb: vec![],
            };
            for _ in 0..reps {
                let cpu0 = lab.gateway_cpu_seconds()?;
                let (bytes, bps) = iperf(&lab.alice.ns, streams, reverse, seconds)?;
                let cpu = lab.gateway_cpu_seconds()? - cpu0;
                row.gbps.push(bps / 1e9);
                row.cpu_per_gb.push(cpu / (bytes / 1e9));
            }
            eprintln!(
                "{name:>12} P{streams} {}: {:.3} Gbit/s, {:.2} CPU-s/GB",
                if reverse { "download" } else { "upload  " },
                median(&row.gbps),
                median(&row.cpu_per_gb)
            );
            rows.push(row);
        }
        server.stop();
    }
    println!("| direction | streams | wireguard-go Gbit/s | portcullis Gbit/s | ratio | wireguard-go CPU-s/GB | portcullis CPU-s/GB | ratio |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (streams, reverse) in [(1, false), (4, false), (1, true), (4, true)] {
        let find = |k: &str| {
            rows.iter()
                .find(|r| r.kind == k && r.streams == streams && r.reverse == reverse)
        };
        let (Some(w), Some(p)) = (find("wireguard-go"), find("portcullis")) else {
            continue;
        };
        let (wt, pt, wc, pc) = (
            median(&w.gbps),
            median(&p.gbps),
            median(&w.cpu_per_gb),
            median(&p.cpu_per_gb),
        );
        println!(
            "| {} | {streams} | {wt:.3} | {pt:.3} | {:.2}× | {wc:.2} | {pc:.2} | {:.2}× |",
            if reverse {
                "download (server → client)"
            } else {
                "upload (client → server)"
            },
            pt / wt,
            pc / wc
        );
    }
    Ok(())
}

struct IperfServer(Child);

impl IperfServer {
    fn start(ns: &str) -> Result<IperfServer> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "iperf3", "-s", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        Ok(IperfServer(child))
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.stop();
        }
    }
}

/// Runs one iperf3 client; returns (bytes received, bits per second at the receiver).
fn iperf(ns: &str, streams: u32, reverse: bool, seconds: u64) -> Result<(f64, f64)> {
    let mut args = vec![
        "netns".to_string(),
        "exec".into(),
        ns.into(),
        "iperf3".into(),
        "-c".into(),
        "10.8.0.2".into(),
        "-p".into(),
        "5201".into(),
        "-t".into(),
        seconds.to_string(),
        "-P".into(),
        streams.to_string(),
        "-J".into(),
    ];
    if reverse {
        args.push("-R".into());
    }
    let out = Command::new("ip").args(&args).output()?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 json")?;
    let sum = v
        .get("end")
        .and_then(|e| e.get("sum_received"))
        .ok_or_else(|| anyhow!("iperf3 failed: {v}"))?;
    let bytes = sum.get("bytes").and_then(Value::as_f64).unwrap_or(0.0);
    let bps = sum
        .get("bits_per_second")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    Ok((bytes, bps))
}
