//! End-to-end audit ingest into a real local ClickHouse (Debian's server, started here on
//! free loopback ports), server included, through the same [`Pipeline`] the gateway runs
//! (queue → writer: chain + spool with fsync per commit → uploader → ClickHouse).
//!
//! 1. Sustained: as many flow events as the pipeline accepts (the producer never lets the
//!    queue overflow, so nothing is refused); the rate is events per second from the first
//!    submit until `count()` in ClickHouse reaches the total.
//! 2. Event-to-queryable latency: a steady rate (half the given one, then the given one); a poller asks ClickHouse for `count()`
//!    every 10 ms; an event counts as queryable at the first poll whose count covers it
//!    (uploads are in sequence order); the poll itself is a `count()` over HTTP. p50/p99 over sampled events, poll resolution included.
//!
//! 3. Checkpoint cost: the default configuration again with signed checkpoints every
//!    second (`checkpoint_interval_secs = 1`, 60× the default), sustained and latency.
//!
//! Run: `cargo bench -p portcullis-audit --bench ingest [-- --events N --rate R --seconds S
//! --batch-rows B]`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_audit::checkpoint::SigningKey;
use portcullis_audit::{
    CheckpointSettings, Pipeline, PipelineConfig, SpoolSettings, Store, StoreConfig, UploadConfig,
};
use portcullis_model::{CloseReason, Counters, Event, FlowTuple, Protocol};
use portcullis_spool::{FsyncPolicy, SpoolConfig};
use portcullis_testkit::{cpu_seconds, numeric_arg as arg, ClickHouse};

fn flow_closed(i: u64) -> Event {
    Event::FlowClosed {
        flow_id: i,
        session_id: 1_795_000_000_000_000 + i % 50,
        user: format!("user{}", i % 50),
        groups: vec!["sre".into(), "oncall".into()],
        device: "hTj3BGuxdqxk2ZR0TlCsdi7Sbi4fKCDpg1AwH6PTSEs=".into(),
        tuple: FlowTuple {
            protocol: Protocol::TCP,
            src_ip: "100.64.0.2".parse().unwrap(),
            src_port: (i % 60000) as u16,
            dst_ip: std::net::Ipv4Addr::from(0x0a08_0000 | (i % 4096) as u32).into(),
            dst_port: 443,
        },
        network: "prod".into(),
        policy_ids: vec!["sre-prod".into()],
        policy_epoch: 1,
        reason: CloseReason::TcpClosed,
        duration_ms: 1200,
        outbound: Counters {
            packets: 6,
            bytes: 344,
        },
        inbound: Counters {
            packets: 4,
            bytes: 240,
        },
    }
}

fn start(
    ch: &ClickHouse,
    db: &str,
    dir: &std::path::Path,
    batch_rows: usize,
    events_file: bool,
    checkpoints: bool,
) -> Pipeline {
    let store = StoreConfig {
        urls: vec![ch.url()],
        cluster: None,
        database: db.into(),
        user: "default".into(),
        password: None,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let s = Store::connect(&store).await.unwrap();
            s.migrate().await.unwrap();
        });
    let (p, _) = Pipeline::start(PipelineConfig {
        gateway: "gw-bench".into(),
        events_file: events_file.then(|| dir.join("events.jsonl")),
        spool: Some(SpoolSettings {
            dir: dir.join("spool"),
            spool: SpoolConfig {
                fsync: FsyncPolicy::OnCommit,
                ..SpoolConfig::default()
            },
            upload: UploadConfig {
                store,
                batch_rows,
                // The product's defaults: `batch_interval_ms` 1000, `commit_interval_ms` 50.
                batch_interval: Duration::from_millis(1000),
                retention: None,
                retention_lease: None,
            },
        }),
        queue: 65_536,
        commit_interval: Duration::from_millis(50),
        checkpoints: checkpoints.then(|| CheckpointSettings {
            key: Arc::new(SigningKey::from_pem(&SigningKey::generate_pem().unwrap()).unwrap()),
            interval: Duration::from_secs(1),
            file: dir.join("checkpoints.jsonl"),
            sink: None,
        }),
    })
    .unwrap();
    p
}

fn count(ch: &ClickHouse, db: &str) -> u64 {
    ch.count(&format!("SELECT count() FROM {db}.events"))
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// CPU seconds per thread of this process, by thread name, plus the server's total.
fn cpu_snapshot(server: u32) -> Vec<(String, f64)> {
    let mut out = vec![(
        "clickhouse-server".to_string(),
        cpu_seconds(&format!("/proc/{server}/stat")),
    )];
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let name = match name.trim() {
            n @ ("audit-writer" | "audit-uploader") => n.to_string(),
            _ => "producer + bench".to_string(),
        };
        let cpu = cpu_seconds(&dir.join("stat").to_string_lossy());
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += cpu,
            None => out.push((name, cpu)),
        }
    }
    out
}

struct Sustained {
    writer_rate: f64,
    rate: f64,
    /// CPU microseconds per event, by thread (or server).
    cpu_us: Vec<(String, f64)>,
}

fn sustained(
    ch: &ClickHouse,
    events: u64,
    batch_rows: usize,
    events_file: bool,
    checkpoints: bool,
) -> Sustained {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("bench_sustained_{batch_rows}_{events_file}_{checkpoints}");
    let p = start(ch, &db, dir.path(), batch_rows, events_file, checkpoints);
    let server = ch.pid().unwrap_or(0);
    let cpu_before = cpu_snapshot(server);
    let t0 = Instant::now();
    let mut writer_done = None;
    for i in 0..events {
        // Never overflow the queue: a refused event would be counted and alarmed.
        while i - p.stats().written.load(Ordering::Relaxed) >= 60_000 {
            std::thread::sleep(Duration::from_micros(200));
        }
        assert!(p.submit(flow_closed(i), chrono::Utc::now()));
    }
    while count(ch, &db) < events {
        if writer_done.is_none() && p.stats().written.load(Ordering::Relaxed) >= events {
            writer_done = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let total = t0.elapsed();
    let cpu_us = cpu_snapshot(server)
        .into_iter()
        .map(|(name, after)| {
            let before = cpu_before
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0.0, |x| x.1);
            (name, (after - before) * 1e6 / events as f64)
        })
        .collect();
    let result = Sustained {
        writer_rate: events as f64 / writer_done.unwrap_or(total).as_secs_f64(),
        rate: events as f64 / total.as_secs_f64(),
        cpu_us,
    };
    assert_eq!(p.stats().refused.load(Ordering::Relaxed), 0);
    p.shutdown(Duration::from_secs(5));
    result
}

fn latency(ch: &ClickHouse, rate: u64, seconds: u64, checkpoints: bool) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let db = &format!("bench_latency_{rate}_{checkpoints}");
    let p = start(ch, db, dir.path(), 100_000, true, checkpoints);
    let total = rate * seconds;
    // Submit instants of every 100th event; the poller's (instant, count) observations.
    let sample = 100;
    let mut submitted: Vec<Instant> = Vec::with_capacity((total / sample + 1) as usize);
    let polls: Mutex<Vec<(Instant, u64)>> = Mutex::default();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let n = count(ch, db);
                polls.lock().unwrap().push((Instant::now(), n));
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let t0 = Instant::now();
        for i in 0..total {
            let due = t0 + Duration::from_nanos(i * 1_000_000_000 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            assert!(p.submit(flow_closed(i), chrono::Utc::now()));
            if i % sample == 0 {
                submitted.push(Instant::now());
            }
        }
        while count(ch, db) < total {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(30));
        stop.store(true, Ordering::Relaxed);
    });
    p.shutdown(Duration::from_secs(5));
    let polls = polls.lock().unwrap();
    let mut lat: Vec<f64> = submitted
        .iter()
        .enumerate()
        .filter_map(|(k, at)| {
            let index = k as u64 * sample;
            polls
                .iter()
                .find(|(t, n)| *n > index && t >= at)
                .map(|(t, _)| (*t - *at).as_secs_f64() * 1e3)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    lat
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let events = arg("--events", 2_000_000);
    let rate = arg("--rate", 80_000);
    let seconds = arg("--seconds", 20);
    let ch = ClickHouse::start().expect("clickhouse-server (scripts/install-deps.sh)");
    let version = ch.query("SELECT version()").unwrap();
    println!("clickhouse {}", version.trim());
    // The product's default `batch_rows` unless given.
    let batch = arg("--batch-rows", 100_000) as usize;
    for (batch_rows, events_file, checkpoints) in [
        (20_000, true, false),
        (batch, true, false),
        (batch, false, false),
        (batch, true, true),
    ] {
        let r = sustained(&ch, events, batch_rows, events_file, checkpoints);
        let trail = if events_file { "with" } else { "without" };
        let signed = if checkpoints {
            ", checkpoints every 1 s"
        } else {
            ""
        };
        println!(
            "sustained, {events} flow events, batch_rows {batch_rows}, {trail} the events file{signed}: into clickhouse {:.0} events/s (spooled {:.0}/s); CPU µs per event: {}",
            r.rate,
            r.writer_rate,
            r.cpu_us
                .iter()
                .map(|(n, us)| format!("{n} {us:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (rate, checkpoints) in [(rate / 2, false), (rate, false), (rate, true)] {
        let lat = latency(&ch, rate, seconds, checkpoints);
        let signed = if checkpoints {
            ", checkpoints every 1 s"
        } else {
            ""
        };
        println!(
        "event-to-queryable at {rate} events/s for {seconds} s{signed} ({} samples, 10 ms polls): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    }
}
