//! `portcullis-bench-control`: data-plane latency under control-plane load, through a
//! real wireguard-go tunnel.
//!
//! Alice pings prod every 10 ms through her tunnel for `--secs` seconds (default 20),
//! first with the gateway otherwise idle, then during a storm on the same `[http]`
//! listener (HTTPS): `--scim-rate` SCIM changes per second (default 200; `PATCH active`
//! toggles on 100 other users, over kept-alive TLS connections, each one an SQLite commit,
//! an identity change in the core and an audit event made durable before the answer) plus
//! `--tls-rate` new HTTPS connections per second (default 50; a full TLS handshake and a
//! `GET /healthz` each). Rounds alternate idle and storm (`--rounds`, default 2).
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
use portcullis_e2e::{in_ns, Lab, LabOptions};
use portcullis_testkit::numeric_arg as arg;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

const SCIM_TOKEN: &str = "scim-token-0123456789abcdef";
const STORM_USERS: usize = 100;
const SCIM_WORKERS: usize = 8;

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

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

struct Storm {
    stop: Arc<AtomicBool>,
    scim_done: Arc<AtomicU64>,
    scim_failed: Arc<AtomicU64>,
    tls_done: Arc<AtomicU64>,
    tls_failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<Result<()>>>>,
    started: Instant,
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

fn start_storm(
    lab: &Lab,
    config: &Arc<rustls::ClientConfig>,
    users: &Arc<Vec<String>>,
    scim_rate: f64,
    tls_rate: f64,
) -> Storm {
    let stop = Arc::new(AtomicBool::new(false));
    let scim_done = Arc::new(AtomicU64::new(0));
    let scim_failed = Arc::new(AtomicU64::new(0));
    let tls_done = Arc::new(AtomicU64::new(0));
    let tls_failed = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for w in 0..SCIM_WORKERS {
        let (stop, done, failed, config, users) = (
            stop.clone(),
            scim_done.clone(),
            scim_failed.clone(),
            config.clone(),
            users.clone(),
        );
        let ns = lab.ns_gw.clone();
        threads.push(std::thread::spawn(move || {
            in_ns(&ns, move || -> Result<()> {
                let mut conn = tls_connect(&config)?;
                let mine: Vec<&String> = users.iter().skip(w).step_by(SCIM_WORKERS).collect();
                paced(scim_rate / SCIM_WORKERS as f64, &stop, |i| {
                    let Some(id) = mine.get(i as usize % mine.len().max(1)) else {
                        return Ok(());
                    };
                    // Each user goes inactive, then active again, in turn.
                    let active = (i / mine.len().max(1) as u64) % 2 == 1;
                    match request(
                        &mut conn,
                        "PATCH",
                        &format!("/scim/v2/Users/{id}"),
                        &patch(active),
                    ) {
                        Ok((200, _)) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) | Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            conn = tls_connect(&config)?;
                        }
                    }
                    Ok(())
                })
            })
        }));
    }
    {
        let (stop, done, failed, config) = (
            stop.clone(),
            tls_done.clone(),
            tls_failed.clone(),
            config.clone(),
        );
        let ns = lab.ns_gw.clone();
        threads.push(std::thread::spawn(move || {
            in_ns(&ns, move || -> Result<()> {
                paced(tls_rate, &stop, |_| {
                    let ok = tls_connect(&config)
                        .and_then(|mut c| request(&mut c, "GET", "/healthz", ""))
                        .is_ok_and(|(s, _)| s == 200);
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
        }));
    }
    Storm {
        stop,
        scim_done,
        scim_failed,
        tls_done,
        tls_failed,
        threads,
        started: Instant::now(),
    }
}

/// Stops the storm: (SCIM changes/s, failed, HTTPS connections/s, failed).
fn stop_storm(storm: Storm) -> Result<(f64, u64, f64, u64)> {
    let secs = storm.started.elapsed().as_secs_f64();
    storm.stop.store(true, Ordering::Relaxed);
    for t in storm.threads {
        t.join()
            .map_err(|_| anyhow!("a storm thread panicked"))???;
    }
    let r = Ordering::Relaxed;
    Ok((
        storm.scim_done.load(r) as f64 / secs,
        storm.scim_failed.load(r),
        storm.tls_done.load(r) as f64 / secs,
        storm.tls_failed.load(r),
    ))
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
    let secs = arg("--secs", 20);
    let rounds = arg("--rounds", 2);
    #[allow(clippy::cast_precision_loss)]
    let scim_rate = arg("--scim-rate", 200) as f64;
    #[allow(clippy::cast_precision_loss)]
    let tls_rate = arg("--tls-rate", 50) as f64;
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
    let setup = config.clone();
    let users = in_ns(&lab.ns_gw, move || -> Result<Vec<String>> {
        let mut conn = tls_connect(&setup)?;
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
    let users = Arc::new(users);
    if !lab.ping(&lab.alice, "10.8.0.2") {
        bail!("alice does not reach prod");
    }
    println!(
        "ping every 10 ms for {secs} s per phase; storm: {scim_rate} SCIM changes/s over {SCIM_WORKERS} kept-alive HTTPS connections + {tls_rate} new HTTPS connections/s"
    );
    let (mut idle_p99, mut storm_p99, mut lost_total) = (Vec::new(), Vec::new(), 0);
    for round in 0..rounds {
        let (rtts, lost) = ping_samples(&lab, secs)?;
        report(&format!("idle{round}"), &rtts, lost, "");
        idle_p99.push(quantile(&rtts, 0.99));
        let storm = start_storm(&lab, &config, &users, scim_rate, tls_rate);
        let (rtts, lost) = ping_samples(&lab, secs)?;
        let (scim, scim_failed, tls, tls_failed) = stop_storm(storm)?;
        report(
            &format!("storm{round}"),
            &rtts,
            lost,
            &format!("scim {scim:.0}/s ({scim_failed} failed)  https {tls:.0} conn/s ({tls_failed} failed)"),
        );
        storm_p99.push(quantile(&rtts, 0.99));
        lost_total += lost;
    }
    let (idle, storm) = (quantile(&idle_p99, 0.5), quantile(&storm_p99, 0.5));
    println!(
        "median p99: idle {idle:.3} ms, storm {storm:.3} ms, ratio {:.2}; pings lost during storms: {lost_total}",
        storm / idle
    );
    Ok(())
}
