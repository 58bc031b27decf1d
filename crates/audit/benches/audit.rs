//! The writer's cost per event before the spool: mapping to a row, chaining (SHA-256),
//! encoding, the events-file JSON line. The spool append itself, with one commit per writer batch, is
//! `cargo bench -p portcullis-spool --bench append`.
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
    g.bench_function("chain_seal", |b| {
        b.iter(|| {
            let mut r = row.clone();
            chain.seal(&mut r);
            r
        })
    });
    let mut buf = Vec::new();
    g.bench_function("encode", |b| {
        b.iter(|| {
            buf.clear();
            row.encode(&mut buf, true);
            buf.len()
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

criterion_group!(benches, writer);
criterion_main!(benches);
