//! The writer's cost per event before the spool: mapping to a row, chaining (SHA-256),
//! encoding, the events-file JSON line; and the spool append of that encoded record with
//! one commit per writer batch (`cargo bench -p portcullis-spool --bench append` has the
//! spool alone with a 560-byte JSON payload).
//!
//! Run: `cargo bench -p portcullis-audit --bench audit`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use portcullis_audit::{AuditRow, Chain};
use portcullis_model::{CloseReason, Counters, Envelope, Event, FlowTuple, Protocol};

fn event(seq: u64) -> Envelope {
    Envelope {
        v: 1,
        id: uuid::Uuid::new_v4(),
        seq,
        time: chrono::Utc::now(),
        gateway: "gw-1".into(),
        event: Event::FlowClosed {
            flow_id: seq,
            session_id: 1_795_000_000_000_000,
            user: "alice".into(),
            groups: vec!["sre".into(), "oncall".into()],
            device: "hTj3BGuxdqxk2ZR0TlCsdi7Sbi4fKCDpg1AwH6PTSEs=".into(),
            tuple: FlowTuple {
                protocol: Protocol::TCP,
                src_ip: "100.64.0.2".parse().unwrap(),
                src_port: 43284,
                dst_ip: "10.8.0.2".parse().unwrap(),
                dst_port: 8080,
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
        },
    }
}

fn writer(c: &mut Criterion) {
    let mut g = c.benchmark_group("audit_writer");
    g.throughput(Throughput::Elements(1));
    let env = event(1);
    g.bench_function("row_map", |b| b.iter(|| AuditRow::from_envelope(&env)));
    let row = AuditRow::from_envelope(&env);
    let mut chain = Chain::default();
    let mut buf = Vec::new();
    // What the writer does per event after the mapping: encode once, hash, frame the record.
    let mut r = row.clone();
    g.bench_function("chain_seal_record", |b| {
        b.iter(|| {
            chain.seal_record(&mut r, &mut buf);
            buf.len()
        })
    });
    g.bench_function("encode_record", |b| {
        b.iter(|| {
            buf.clear();
            r.encode_record(&mut buf);
            buf.len()
        })
    });
    // What the uploader does per event: the spool record into the Native block.
    let mut record = Vec::new();
    r.encode_record(&mut record);
    let fresh = || portcullis_audit::NativeBlock::with_capacity(100_000, &record);
    let mut block = fresh();
    g.bench_function("native_transcode", |b| {
        b.iter(|| {
            if block.rows() >= 100_000 {
                block = fresh();
            }
            block.push_record(&record).unwrap();
        })
    });
    let mut line = Vec::new();
    g.bench_function("events_file_line", |b| {
        b.iter(|| {
            line.clear();
            serde_json::to_writer(&mut line, &env).unwrap();
            line.len()
        })
    });
    g.finish();
}

/// The spool append of the record the writer really appends (the encoded, sealed row of
/// a `flow_closed`), committed once per writer batch (8,192), fsync on commit; the
/// uploader's acknowledgements every 65,536 keep the disk footprint bounded.
fn spool_real_record(c: &mut Criterion) {
    let mut row = AuditRow::from_envelope(&event(1));
    Chain::default().seal(&mut row);
    let mut record = Vec::new();
    row.encode_record(&mut record);
    eprintln!("spool record: {} bytes", record.len());
    let mut g = c.benchmark_group("audit_spool");
    g.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = portcullis_spool::Spool::open(
        dir.path(),
        portcullis_spool::SpoolConfig {
            segment_bytes: 64 << 20,
            max_bytes: 1 << 40,
            fsync: portcullis_spool::FsyncPolicy::OnCommit,
        },
    )
    .unwrap();
    let mut n = 0u64;
    g.bench_function("append_real_record_commit8192", |b| {
        b.iter(|| {
            let seq = spool.append(&record).unwrap();
            n += 1;
            if n % 8192 == 0 {
                spool.commit().unwrap();
            }
            if n % 65_536 == 0 {
                spool.ack(seq).unwrap();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, writer, spool_real_record);
criterion_main!(benches);
