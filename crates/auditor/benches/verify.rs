//! `audit verify` over a large trail in a real local ClickHouse (Debian's server, started
//! here): N chained rows of one gateway with a signed checkpoint every 600,000 rows
//! (what a node writing 10,000 events/s signs per minute), then the streaming verifier
//! with the key. Reports the wall time, rows/s, and the peak resident memory of this
//! process during verification (VmHWM, reset before it starts) against the size of the
//! rows read, to show the rows are streamed rather than held.
//!
//! Run: `cargo bench -p portcullis-auditor --bench verify [-- --rows N]`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use portcullis_audit::checkpoint::{Checkpoint, Merkle, SigningKey};
use portcullis_audit::{AuditRow, Chain, NativeBlock, Store, StoreConfig};
use portcullis_auditor::{Sourced, VerifyOptions};
use portcullis_model::{CloseReason, Counters, Envelope, Event, FlowTuple, Protocol};
use portcullis_testkit::{numeric_arg as arg, ClickHouse};

fn flow_closed(i: u64) -> Event {
    Event::FlowClosed {
        flow_id: i,
        session_id: 1_795_000_000_000_000 + i % 50,
        user: format!("user{}", i % 500),
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

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let rows = arg("--rows", 10_000_000);
    let every = arg("--checkpoint-every", 600_000);
    let ch = ClickHouse::start().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg = StoreConfig {
        urls: vec![ch.url()],
        cluster: None,
        database: "bench".into(),
        user: "default".into(),
        password: None,
    };
    let store: Store = rt.block_on(async {
        let s = Store::connect(&cfg).await.unwrap();
        s.migrate().await.unwrap();
        s
    });
    let key = SigningKey::from_pem(&SigningKey::generate_pem().unwrap()).unwrap();
    let start = chrono::Utc::now() - chrono::Duration::seconds(rows as i64 / 10_000 + 60);
    let mut chain = Chain::default();
    let mut tree = Merkle::default();
    let mut from = 1;
    let mut checkpoints = Vec::new();
    let mut block = NativeBlock::default();
    let mut rec = Vec::new();
    let loading = Instant::now();
    let mut seq = 0u64;
    while seq < rows {
        seq += 1;
        let event = if seq % every == 0 {
            // Sign the head (the previous row), then this row is the checkpoint's event.
            let cp = key.sign(Checkpoint {
                node: "gw-bench".into(),
                seq: seq - 1,
                hash: chain.last_hash,
                time_us: 0,
                from_seq: from,
                root: tree.root(),
                uncovered: [0, 0],
            });
            tree = Merkle::default();
            from = seq;
            let e = cp.to_event();
            checkpoints.push(cp);
            e
        } else {
            flow_closed(seq)
        };
        let mut row = AuditRow::from_envelope(&Envelope {
            v: 1,
            id: uuid::Uuid::from_u64_pair(seq, seq),
            seq,
            time: start + chrono::Duration::microseconds(seq as i64 * 100),
            gateway: "gw-bench".into(),
            event,
        });
        chain.seal_record(&mut row, &mut rec);
        tree.push(&row.hash);
        block.push_record(&rec).unwrap();
        if block.rows() >= 200_000 || seq == rows {
            rt.block_on(store.insert_block(std::mem::take(&mut block)))
                .unwrap();
        }
    }
    println!(
        "loaded {rows} rows with {} signed checkpoints in {:.1} s",
        checkpoints.len(),
        loading.elapsed().as_secs_f64()
    );
    // Let the parts settle so verification reads what an idle trail has.
    std::thread::sleep(Duration::from_secs(5));
    let bytes: u64 = ch
        .count("SELECT sum(data_uncompressed_bytes) FROM system.parts WHERE database = 'bench' AND table = 'events' AND active")
        .unwrap_or(0);

    let outside: Vec<Sourced> = checkpoints
        .iter()
        .map(|c| Sourced {
            checkpoint: c.clone(),
            source: "file".into(),
        })
        .collect();
    let opts = VerifyOptions {
        keys: vec![key.public()],
        outside,
        ..VerifyOptions::default()
    };
    let mut times = Vec::new();
    let mut peaks = Vec::new();
    for _ in 0..3 {
        // Reset the peak resident set to now (Linux: clear_refs 5).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let before = vm_hwm_kib();
        let t = Instant::now();
        let report = rt
            .block_on(portcullis_auditor::verify_trail(&store, &opts))
            .unwrap();
        times.push(t.elapsed().as_secs_f64());
        let after = vm_hwm_kib();
        println!(
            "  run: {:.1} s, peak resident {} MiB (after the reset: {} MiB)",
            times.last().unwrap(),
            after / 1024,
            before / 1024
        );
        peaks.push(after.saturating_sub(before));
        assert!(
            report.ok(),
            "{:?}",
            &report.findings[..report.findings.len().min(5)]
        );
        assert_eq!(report.rows, rows);
        assert_eq!(report.checkpoints_verified as usize, 2 * checkpoints.len());
    }
    times.sort_by(f64::total_cmp);
    peaks.sort_unstable();
    let median = times[1];
    println!(
        "verify {rows} rows, {} checkpoints (trail + file): median {median:.1} s ({:.0} rows/s), runs {:?} s",
        2 * checkpoints.len(),
        rows as f64 / median,
        times.iter().map(|t| format!("{t:.1}")).collect::<Vec<_>>()
    );
    println!(
        "peak resident growth during verify: median {} MiB (runs {:?} MiB); the rows read are {} MiB uncompressed",
        peaks[1] / 1024,
        peaks.iter().map(|p| p / 1024).collect::<Vec<_>>(),
        bytes >> 20
    );
}
