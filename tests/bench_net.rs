//! `portcullis-bench-net`: side-by-side throughput on the same namespace path, in one run:
//! portcullis as the gateway vs wireguard-go as the gateway (kernel forwarding), iperf3 TCP
//! with 1 and 4 streams in both directions, from a wireguard-go client. Reports median
//! throughput and the gateway process's CPU-seconds per GB. Run it through
//! `scripts/bench-throughput.sh` (release build).
//!
//! With `--audit`: portcullis without the audit pipeline vs portcullis with the spool and
//! uploads to a local ClickHouse (started here), the same iperf3 runs while a churn of
//! new UDP flows (`--flows-per-sec`, default 2,000; each one a flow_opened and, 2 s
//! later, a flow_closed event) runs through the same tunnel, so the pipeline is busy.
//! With `--audit --checkpoints`: the audited gateway also signs its chain head every
//! second (`checkpoint_interval_secs = 1`, sixty times the default).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use portcullis_e2e::{GatewayKind, Lab, LabOptions};
use portcullis_testkit::numeric_arg as arg;
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

fn main() -> Result<()> {
    let seconds = arg("--seconds", 5);
    let reps = arg("--reps", 3);
    let audit = std::env::args().any(|a| a == "--audit");
    let flows_per_sec = arg("--flows-per-sec", 2_000);
    let checkpoints = std::env::args().any(|a| a == "--checkpoints");
    let keys = tempfile::tempdir()?;
    let key = keys.path().join("audit-signing.key");
    if checkpoints {
        let made = Command::new(portcullis_e2e::portcullis_bin()?)
            .args(["audit", "keygen", "--out"])
            .arg(&key)
            .output()?;
        anyhow::ensure!(made.status.success(), "audit keygen: {made:?}");
    }
    let (base, other) = if audit {
        ("audit off", "audit on")
    } else {
        ("wireguard-go", "portcullis")
    };
    let clickhouse = if audit {
        Some(portcullis_testkit::ClickHouse::start()?)
    } else {
        None
    };
    // Short UDP flows and room for them: the churn's flows close (and are audited) after 2 s.
    let flows =
        "[flows]\nudp_timeout_secs = 2\nmax_flows = 1000000\nmax_flows_per_peer = 1000000\n";
    // Both gateways run side by side; the runs alternate between them so that drift in
    // the machine's load hits both alike.
    let mut labs = Vec::new();
    for name in [base, other] {
        let opts = LabOptions {
            gateway: if name == "wireguard-go" {
                GatewayKind::WireguardGo
            } else {
                GatewayKind::Portcullis
            },
            extra_config: if audit { flows.into() } else { String::new() },
            audit_config: if checkpoints && name == "audit on" {
                format!(
                    "checkpoint_key_file = \"{}\"\ncheckpoint_interval_secs = 1\n",
                    key.display()
                )
            } else {
                String::new()
            },
            // What an operator gets: the uploader's default batch interval.
            upload_interval_ms: None,
            ..LabOptions::default()
        };
        let lab = match (&clickhouse, name) {
            (Some(ch), "audit on") => {
                let lab = Lab::start_audited(opts, ch)?;
                let out = lab.audit(&["migrate"])?;
                anyhow::ensure!(
                    out.status.success(),
                    "audit migrate: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                lab
            }
            _ => Lab::start(opts)?,
        };
        let server = IperfServer::start(&lab.ns_prod)?;
        labs.push((name, lab, server, 0u64));
    }
    std::thread::sleep(Duration::from_millis(300));
    if audit {
        // Where the audit's CPU goes with the churn alone (no iperf3): each gateway's
        // threads and, for the audited one, the ClickHouse server, over the same interval.
        let idle = arg("--churn-seconds", 10);
        for (name, lab, _, churned) in labs.iter_mut() {
            let pid = lab.gateway_pid().ok_or_else(|| anyhow!("no gateway"))?;
            let ch_pid = clickhouse.as_ref().and_then(|c| c.pid());
            let ch_cpu = || {
                ch_pid.map_or(0.0, |p| {
                    portcullis_testkit::cpu_seconds(&format!("/proc/{p}/stat"))
                })
            };
            let (threads0, ch0) = (portcullis_testkit::thread_cpu_seconds(pid), ch_cpu());
            let churn = Churn::start(&lab.alice.ns, flows_per_sec)?;
            std::thread::sleep(Duration::from_secs(idle));
            *churned += churn.stop();
            // The last flows close (and are uploaded) after the churn stops.
            std::thread::sleep(Duration::from_secs(3));
            let (threads1, ch1) = (portcullis_testkit::thread_cpu_seconds(pid), ch_cpu());
            let per_sec = |v: f64| v / idle as f64 * 100.0;
            let mut parts: Vec<String> = threads1
                .iter()
                .map(|(t, v)| (t, v - threads0.get(t).copied().unwrap_or(0.0)))
                .filter(|(_, v)| *v > 0.0)
                .map(|(t, v)| format!("{t} {:.1}%", per_sec(v)))
                .collect();
            parts.push(format!("clickhouse-server {:.1}%", per_sec(ch1 - ch0)));
            eprintln!(
                "{name:>12}: churn alone ({flows_per_sec} new flows/s for {idle} s), CPU of one core: {}",
                parts.join(", ")
            );
        }
    }
    let mut rows = Vec::new();
    for (streams, reverse) in [(1, false), (4, false), (1, true), (4, true)] {
        let mut pair: Vec<Row> = labs
            .iter()
            .map(|(name, _, _, _)| Row {
                kind: name,
                streams,
                reverse,
                gbps: vec![],
                cpu_per_gb: vec![],
            })
            .collect();
        for _ in 0..reps {
            for (i, (_, lab, _, churned)) in labs.iter_mut().enumerate() {
                let churn = audit
                    .then(|| Churn::start(&lab.alice.ns, flows_per_sec))
                    .transpose()?;
                let cpu0 = lab.gateway_cpu_seconds()?;
                let (bytes, bps) = iperf(&lab.alice.ns, streams, reverse, seconds)?;
                let cpu = lab.gateway_cpu_seconds()? - cpu0;
                if let Some(churn) = churn {
                    *churned += churn.stop();
                }
                if let Some(row) = pair.get_mut(i) {
                    row.gbps.push(bps / 1e9);
                    row.cpu_per_gb.push(cpu / (bytes / 1e9));
                }
            }
        }
        for row in &pair {
            eprintln!(
                "{:>12} P{streams} {}: {:.3} Gbit/s, {:.2} CPU-s/GB",
                row.kind,
                if reverse { "download" } else { "upload  " },
                median(&row.gbps),
                median(&row.cpu_per_gb)
            );
        }
        rows.extend(pair);
    }
    for (name, _, server, churned) in labs.iter_mut() {
        server.stop();
        if audit {
            eprintln!("{name:>12}: churn sent {churned} new flows");
        }
    }
    if let Some(ch) = &clickhouse {
        let rows = ch
            .count("SELECT count() FROM portcullis.events")
            .unwrap_or(0);
        eprintln!("    audit on: {rows} audit rows in clickhouse at the end");
    }
    println!("| direction | streams | {base} Gbit/s | {other} Gbit/s | ratio | {base} CPU-s/GB | {other} CPU-s/GB | ratio |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (streams, reverse) in [(1, false), (4, false), (1, true), (4, true)] {
        let find = |k: &str| {
            rows.iter()
                .find(|r| r.kind == k && r.streams == streams && r.reverse == reverse)
        };
        let (Some(w), Some(p)) = (find(base), find(other)) else {
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

/// New UDP flows at a steady rate from the client's namespace: one socket, the
/// destination port cycling over 1024..65535 on the iperf3 server's address.
struct Churn {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Churn {
    fn start(ns: &str, per_sec: u64) -> Result<Churn> {
        let socket = portcullis_e2e::in_ns(ns, || std::net::UdpSocket::bind("0.0.0.0:0"))??;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let mut sent = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let due = t0 + Duration::from_nanos(sent * 1_000_000_000 / per_sec.max(1));
                let now = std::time::Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let port = 1024 + (sent % 64_000) as u16;
                let _ = socket.send_to(b"churn", ("10.8.0.2", port));
                sent += 1;
            }
            sent
        });
        Ok(Churn { stop, thread })
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
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
