//! `portcullis-bench-control`: data-plane latency under control-plane load, through a
//! real wireguard-go tunnel.
//!
//! Alice pings prod every 10 ms through her tunnel for `--secs` seconds (default 20),
//! first with the gateway otherwise idle, then during a storm on the same `[http]`
//! listener (HTTPS): `--scim-rate` SCIM changes per second (default 200; `PATCH active`
//! toggles on 100 other users, over kept-alive TLS connections, each one an SQLite commit,
//! an identity change in the core and an audit event made durable before the answer) plus
//! `--tls-rate` new HTTPS connections per second (default 50; a full TLS handshake and a
//! `GET /healthz` each). Rounds alternate idle and storm (`--rounds`, default 2). The storm
//! runs as a child process at nice 19 inside the gateway's namespace
//! (`--scim-connections`, default 16), so that the load generator, which shares this
//! machine's two CPUs with the gateway, does not take the gateway's CPU.
//!
//! Reported per phase: ping round-trip p50, p99, max, lost pings, and the load achieved.
//! Run it through `scripts/bench-control.sh` (release build).

// Indexing a serde_json Value by key yields Null for a missing key; it never panics.
#![allow(clippy::indexing_slicing)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use portcullis_e2e::{in_ns, quantile, Lab, LabOptions};
use portcullis_testkit::numeric_arg as arg;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

const SCIM_TOKEN: &str = "scim-token-0123456789abcdef";
const STORM_USERS: usize = 100;

fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).context("reading the test ca")? {
        roots.add(c?)?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    ))
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_connect(config: &Arc<rustls::ClientConfig>) -> Result<Tls> {
    let tcp = TcpStream::connect("127.0.0.1:18080")?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let name = ServerName::try_from("127.0.0.1")?.to_owned();
    let conn = rustls::ClientConnection::new(config.clone(), name)?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// One request on a kept-alive connection; returns the status and the body.
fn request(s: &mut Tls, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {SCIM_TOKEN}\r\nContent-Type: application/scim+json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP answer: {line:?}"))?;
    let mut length = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Ping alice → prod every 10 ms for `secs`, per-packet: (round trips in ms, lost).
fn ping_samples(lab: &Lab, secs: u64) -> Result<(Vec<f64>, u64)> {
    let count = secs * 100;
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.alice.ns,
            "ping",
            "-n",
            "-i",
            "0.01",
            "-c",
            &count.to_string(),
            "-W",
            "1",
            "10.8.0.2",
        ])
        .stderr(Stdio::null())
        .output()
        .context("running ping")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    let lost = count.saturating_sub(rtts.len() as u64);
    Ok((rtts, lost))
}

/// The storm, as a child process run `nice -n 19` inside the gateway's namespace: on this
/// one machine the load generator shares the CPUs with the gateway, and a real IdP or
/// browser would not. Prints `scim_done scim_failed tls_done tls_failed secs scim_p50_ms
/// scim_p99_ms` when `secs` are over.
fn storm_child() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str| -> Result<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or_else(|| anyhow!("{name} missing"))
    };
    let secs: f64 = get("--secs")?.parse()?;
    let scim_rate: f64 = get("--scim-rate")?.parse()?;
    let tls_rate: f64 = get("--tls-rate")?.parse()?;
    let connections: usize = get("--scim-connections")?.parse()?;
    let config = client_config(Path::new(&get("--ca")?))?;
    let users: Vec<String> = std::fs::read_to_string(get("--users")?)?
        .lines()
        .map(str::to_string)
        .collect();
    let users = Arc::new(users);
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let started = Instant::now();
    let mut threads = Vec::new();
    for w in 0..connections {
        let (stop, counts, config, users, latencies) = (
            stop.clone(),
            counts.clone(),
            config.clone(),
            users.clone(),
            latencies.clone(),
        );
        threads.push(std::thread::spawn(move || -> Result<()> {
            let mut conn = tls_connect(&config)?;
            let mine: Vec<&String> = users.iter().skip(w).step_by(connections).collect();
            let n = mine.len().max(1) as u64;
            paced(scim_rate / connections as f64, &stop, |i| {
                let Some(id) = mine.get((i % n) as usize) else {
                    return Ok(());
                };
                // Each user goes inactive, then active again, in turn.
                let active = (i / n) % 2 == 1;
                let sent = Instant::now();
                match request(
                    &mut conn,
                    "PATCH",
                    &format!("/scim/v2/Users/{id}"),
                    &patch(active),
                ) {
                    Ok((200, _)) => {
                        counts[0].fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut l) = latencies.lock() {
                            l.push(sent.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                    Ok(_) | Err(_) => {
                        counts[1].fetch_add(1, Ordering::Relaxed);
                        conn = tls_connect(&config)?;
                    }
                }
                Ok(())
            })
        }));
    }
    {
        let (stop, counts, config) = (stop.clone(), counts.clone(), config.clone());
        threads.push(std::thread::spawn(move || -> Result<()> {
            paced(tls_rate, &stop, |_| {
                let ok = tls_connect(&config)
                    .and_then(|mut c| request(&mut c, "GET", "/healthz", ""))
                    .is_ok_and(|(s, _)| s == 200);
                counts[if ok { 2 } else { 3 }].fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().map_err(|_| anyhow!("a storm thread panicked"))??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    let r = Ordering::Relaxed;
    println!(
        "{} {} {} {} {elapsed:.3} {:.3} {:.3}",
        counts[0].load(r),
        counts[1].load(r),
        counts[2].load(r),
        counts[3].load(r),
        quantile(&l, 0.5),
        quantile(&l, 0.99),
    );
    Ok(())
}

fn patch(active: bool) -> String {
    format!(
        r#"{{"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{{"op": "replace", "value": {{"active": {active}}}}}]}}"#
    )
}

/// Paces `f` at `rate` per second until `stop`.
fn paced(rate: f64, stop: &AtomicBool, mut f: impl FnMut(u64) -> Result<()>) -> Result<()> {
    let start = Instant::now();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        f(i)?;
        i += 1;
    }
    Ok(())
}

/// The bound of the first cumulative bucket of histogram `name` holding quantile `q`.
fn bucket_quantile_ms(metrics: &str, name: &str, q: f64) -> String {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(String, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (le, rest) = l.split_once('"')?;
            Some((
                le.to_string(),
                rest.trim_start_matches('}').trim().parse().ok()?,
            ))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return "-".into();
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= total * q)
        .map(|(le, _)| match le.parse::<f64>() {
            Ok(v) => format!("{:.3}", v * 1000.0),
            Err(_) => le.clone(),
        })
        .unwrap_or_default()
}

fn report(phase: &str, rtts: &[f64], lost: u64, load: &str) {
    println!(
        "{phase:<6} pings {:>5}  lost {lost:>3}  rtt p50 {:>6.3} ms  p99 {:>6.3} ms  max {:>7.3} ms  {load}",
        rtts.len(),
        quantile(rtts, 0.5),
        quantile(rtts, 0.99),
        quantile(rtts, 1.0),
    );
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--storm-child") {
        return storm_child();
    }
    let secs = arg("--secs", 20);
    let rounds = arg("--rounds", 2);
    let scim_rate = arg("--scim-rate", 200);
    let tls_rate = arg("--tls-rate", 50);
    let connections = arg("--scim-connections", 16);
    let certs = tempfile::tempdir()?;
    let (ca, cert, key) = portcullis_testkit::test_certificate(certs.path(), "http", "127.0.0.1")?;
    let lab = Lab::start(LabOptions {
        gateway_log: "warn".into(),
        extra_config: "[http]\nlisten = \"127.0.0.1:18080\"\ncert_file = \"http.crt\"\nkey_file = \"http.key\"\n[scim]\ntoken_file = \"scim.token\"\n".into(),
        files: vec![
            ("scim.token".into(), format!("{SCIM_TOKEN}\n")),
            ("http.crt".into(), std::fs::read_to_string(&cert)?),
            ("http.key".into(), std::fs::read_to_string(&key)?),
        ],
        ..LabOptions::default()
    })?;
    let config = client_config(&ca)?;
    let users = in_ns(&lab.ns_gw, move || -> Result<Vec<String>> {
        let mut conn = tls_connect(&config)?;
        (0..STORM_USERS)
            .map(|i| {
                let (status, body) = request(
                    &mut conn,
                    "POST",
                    "/scim/v2/Users",
                    &format!(r#"{{"userName": "storm-{i}", "active": true}}"#),
                )?;
                if status != 201 {
                    bail!("creating storm-{i}: {status} {body}");
                }
                let v: serde_json::Value = serde_json::from_str(&body)?;
                Ok(v["id"].as_str().unwrap_or_default().to_string())
            })
            .collect()
    })??;
    let users_file = lab.dir.join("storm-users.txt");
    std::fs::write(&users_file, users.join("\n"))?;
    if !lab.ping(&lab.alice, "10.8.0.2") {
        bail!("alice does not reach prod");
    }
    println!(
        "ping every 10 ms for {secs} s per phase; storm (nice 19, in the gateway's namespace): {scim_rate} SCIM changes/s over {connections} kept-alive HTTPS connections + {tls_rate} new HTTPS connections/s"
    );
    let exe = std::env::current_exe()?;
    let (mut idle_p99, mut storm_p99, mut lost_total) = (Vec::new(), Vec::new(), 0);
    for round in 0..rounds {
        let (rtts, lost) = ping_samples(&lab, secs)?;
        report(&format!("idle{round}"), &rtts, lost, "");
        idle_p99.push(quantile(&rtts, 0.99));
        let child = Command::new("nice")
            .args(["-n", "19", "ip", "netns", "exec", &lab.ns_gw])
            .arg(&exe)
            .args(["--storm-child", "--secs"])
            .arg((secs + 1).to_string())
            .args(["--scim-rate", &scim_rate.to_string()])
            .args(["--tls-rate", &tls_rate.to_string()])
            .args(["--scim-connections", &connections.to_string()])
            .arg("--ca")
            .arg(&ca)
            .arg("--users")
            .arg(&users_file)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the storm")?;
        // Let the storm reach its rate before the pings count.
        std::thread::sleep(Duration::from_millis(500));
        let (rtts, lost) = ping_samples(&lab, secs)?;
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = text
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let [scim, scim_failed, tls, tls_failed, elapsed, p50, p99] = f[..] else {
            bail!("storm output: {text:?}");
        };
        report(
            &format!("storm{round}"),
            &rtts,
            lost,
            &format!(
                "scim {:.0}/s ({scim_failed} failed, answer p50 {p50:.1} ms p99 {p99:.1} ms)  https {:.0} conn/s ({tls_failed} failed)",
                scim / elapsed,
                tls / elapsed
            ),
        );
        storm_p99.push(quantile(&rtts, 0.99));
        lost_total += lost;
    }
    // The gateway's own histograms over the whole run.
    let config = client_config(&ca)?;
    let metrics = in_ns(&lab.ns_gw, move || -> Result<String> {
        let mut conn = tls_connect(&config)?;
        Ok(request(&mut conn, "GET", "/metrics", "")?.1)
    })??;
    for name in [
        "portcullis_decision_latency_seconds",
        "portcullis_audit_commit_latency_seconds",
        "portcullis_revocation_latency_seconds",
    ] {
        println!(
            "{name}: p50 <= {} ms, p99 <= {} ms (bucket bounds)",
            bucket_quantile_ms(&metrics, name, 0.5),
            bucket_quantile_ms(&metrics, name, 0.99)
        );
    }
    let (idle, storm) = (quantile(&idle_p99, 0.5), quantile(&storm_p99, 0.5));
    println!(
        "median p99: idle {idle:.3} ms, storm {storm:.3} ms, ratio {:.2}; pings lost during storms: {lost_total}",
        storm / idle
    );
    Ok(())
}
