//! Spool append cost per event (target ≤ 1 µs amortized): commits (write + fsync) every
//! 64 appends (one gateway loop iteration's worth), or without fsync; acknowledgements per
//! 65,536 (an uploader batch) keep the disk footprint bounded.
//!
//! Run: `cargo bench -p portcullis-spool --bench append`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use portcullis_spool::{FsyncPolicy, Spool, SpoolConfig};

fn append(c: &mut Criterion) {
    let event = br#"{"v":1,"id":"6f0c2a8e-3b1d-4c55-9a1e-6d4f0b7f2c11","seq":9,"time":"2026-11-22T02:39:12.3Z","gateway":"gw-1","type":"flow_closed","flow_id":7,"session_id":2,"user":"alice","device":"hTj3BGuxdqxk2ZR0TlCsdi7Sbi4fKCDpg1AwH6PTSEs=","protocol":"tcp","src_ip":"100.64.0.2","src_port":43284,"dst_ip":"10.8.0.2","dst_port":8080,"network":"prod","policy_ids":["sre-prod"],"policy_epoch":1,"reason":"tcp_closed","duration_ms":1200,"outbound":{"packets":6,"bytes":344},"inbound":{"packets":4,"bytes":240}}"#;
    let mut g = c.benchmark_group("spool");
    g.throughput(Throughput::Elements(1));
    // 64: one gateway loop iteration's worth; 1,024 and 8,192: the audit writer commits
    // once per batch it takes from its queue (up to 8,192 events).
    for (name, fsync, commit_every) in [
        ("append_commit64_fsync", FsyncPolicy::OnCommit, 64u64),
        ("append_commit1024_fsync", FsyncPolicy::OnCommit, 1024),
        ("append_commit8192_fsync", FsyncPolicy::OnCommit, 8192),
        ("append_no_fsync", FsyncPolicy::Never, 64),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(
            dir.path(),
            SpoolConfig {
                segment_bytes: 64 << 20,
                max_bytes: 1 << 40,
                fsync,
            },
        )
        .unwrap();
        let mut n = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                let seq = spool.append(event).unwrap();
                n += 1;
                if n % commit_every == 0 {
                    spool.commit().unwrap();
                }
                if n % 65_536 == 0 {
                    spool.ack(seq).unwrap();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
