//! Signed checkpoints catch what a plain hash chain cannot. A real pipeline (spool,
//! uploader, checkpoints every second) writes a trail into a real ClickHouse; then copies
//! of it are tampered with as an attacker with write access to ClickHouse would: the last
//! 1,000 rows rewritten and consistently re-hashed, the newest rows deleted. The chain
//! alone verifies both; with the published key, both are found.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_audit::checkpoint::{SignedCheckpoint, SigningKey};
use portcullis_audit::{
    AuditRow, Chain, CheckpointSettings, Pipeline, PipelineConfig, SpoolSettings, Store,
    StoreConfig, UploadConfig, SCHEMA_VERSION,
};
use portcullis_auditor::{Finding, Sourced, VerifyOptions};
use portcullis_model::Event;
use portcullis_spool::{FsyncPolicy, SpoolConfig};
use portcullis_testkit::ClickHouse;

fn store_config(ch: &ClickHouse, db: &str) -> StoreConfig {
    StoreConfig {
        urls: vec![ch.url()],
        cluster: None,
        database: db.into(),
        user: "default".into(),
        password: None,
    }
}

fn store(ch: &ClickHouse, db: &str) -> Store {
    common::runtime().block_on(common::store_in(ch, db, SCHEMA_VERSION))
}

fn all_rows(store: &Store) -> Vec<AuditRow> {
    let cols = portcullis_audit::row::column_list();
    common::runtime()
        .block_on(
            store
                .client()
                .query(&format!(
                    "SELECT {cols} FROM {}.events FINAL ORDER BY seq",
                    store.database
                ))
                .fetch_all(),
        )
        .unwrap()
}

fn verify(
    store: &Store,
    key: Option<&SigningKey>,
    outside: &[SignedCheckpoint],
) -> portcullis_auditor::VerifyReport {
    let opts = VerifyOptions {
        keys: key.map(|k| vec![k.public()]).unwrap_or_default(),
        outside: outside
            .iter()
            .map(|c| Sourced {
                checkpoint: c.clone(),
                source: "checkpoints.jsonl".into(),
            })
            .collect(),
        ..VerifyOptions::default()
    };
    common::runtime()
        .block_on(portcullis_auditor::verify_trail(store, &opts))
        .unwrap()
}

#[test]
fn rewritten_and_cut_tails_fail_against_signed_checkpoints() {
    let ch = ClickHouse::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(SigningKey::from_pem(&SigningKey::generate_pem().unwrap()).unwrap());
    let original = store(&ch, "original");
    let file = dir.path().join("checkpoints.jsonl");
    let config = PipelineConfig {
        gateway: "gw-a".into(),
        events_file: None,
        spool: Some(SpoolSettings {
            dir: dir.path().join("spool"),
            spool: SpoolConfig {
                segment_bytes: 1 << 20,
                max_bytes: 1 << 28,
                fsync: FsyncPolicy::OnCommit,
            },
            upload: UploadConfig {
                store: store_config(&ch, "original"),
                batch_rows: 2000,
                batch_interval: Duration::from_millis(100),
                retention: None,
                retention_lease: None,
            },
        }),
        queue: 100_000,
        commit_interval: Duration::from_millis(10),
        checkpoints: Some(CheckpointSettings {
            key: key.clone(),
            interval: Duration::from_millis(300),
            file: file.clone(),
            sink: None,
        }),
    };
    let (p, _) = Pipeline::start(config.clone()).unwrap();
    for i in 0..6000u64 {
        assert!(p.submit(
            Event::PeerAdded {
                user: format!("u{}", i % 40),
                device: "d".into(),
            },
            chrono::Utc::now()
        ));
        if i % 1000 == 999 {
            std::thread::sleep(Duration::from_millis(350));
        }
    }
    p.shutdown(Duration::from_secs(20));
    // A restart signs nothing new until rows come (the head is signed already).
    let (p, _) = Pipeline::start(config).unwrap();
    p.shutdown(Duration::from_secs(20));

    let (outside, bad) = portcullis_audit::signer::read_checkpoints(&file).unwrap();
    assert_eq!(bad, 0);
    assert!(outside.len() >= 4, "{} checkpoints", outside.len());
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = all_rows(&original);
        if rows.len() as u64 == outside.last().unwrap().checkpoint.seq + 1 {
            break rows;
        }
        assert!(Instant::now() < deadline, "{} rows uploaded", rows.len());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        rows.iter().filter(|r| r.kind == "audit_checkpoint").count(),
        outside.len(),
        "every checkpoint is also in the trail"
    );

    // The untouched trail verifies, every checkpoint checked.
    let r = verify(&original, Some(&key), &outside);
    assert!(r.ok(), "{:?}", r.findings);
    assert_eq!(
        r.checkpoints_verified as usize,
        2 * outside.len(),
        "trail and file copies"
    );
    assert_eq!(
        r.unsigned_tail["gw-a"], 1,
        "only the last checkpoint's own event"
    );
    // A key that did not sign them: every checkpoint is a finding.
    let other = SigningKey::from_pem(&SigningKey::generate_pem().unwrap()).unwrap();
    let r = verify(&original, Some(&other), &outside);
    assert!(r
        .findings
        .iter()
        .all(|f| matches!(f, Finding::BadSignature { .. })));
    assert_eq!(r.findings.len(), 2 * outside.len());

    // 1. The last 1,000 rows rewritten and re-hashed along the chain.
    let rewritten = store(&ch, "rewritten");
    let cut = rows.len() - 1000;
    let mut chain = Chain {
        last_hash: rows[cut - 1].hash,
    };
    let forged: Vec<AuditRow> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.clone();
            if i >= cut {
                if r.kind != "audit_checkpoint" {
                    r.user = "mallory".into();
                }
                chain.seal(&mut r);
            }
            r
        })
        .collect();
    common::runtime()
        .block_on(rewritten.insert(&forged))
        .unwrap();
    let plain = verify(&rewritten, None, &[]);
    assert!(
        plain.ok(),
        "the chain alone cannot see it: {:?}",
        plain.findings
    );
    let signed = verify(&rewritten, Some(&key), &outside);
    assert!(!signed.ok());
    assert!(
        signed
            .findings
            .iter()
            .any(|f| matches!(f, Finding::CheckpointMismatch { source, .. } if source == "checkpoints.jsonl")),
        "{:?}",
        signed.findings
    );
    // Even with the trail's own checkpoint rows forged away, the outside copies catch it.
    let no_trail_cps = store(&ch, "rewritten_bare");
    let bare: Vec<AuditRow> = {
        let mut chain = Chain {
            last_hash: rows[cut - 1].hash,
        };
        let mut seq = rows[cut - 1].seq;
        forged[..cut]
            .iter()
            .cloned()
            .chain(
                forged[cut..]
                    .iter()
                    .filter(|r| r.kind != "audit_checkpoint")
                    .map(|r| {
                        let mut r = r.clone();
                        seq += 1;
                        r.seq = seq;
                        chain.seal(&mut r);
                        r
                    }),
            )
            .collect()
    };
    common::runtime()
        .block_on(no_trail_cps.insert(&bare))
        .unwrap();
    assert!(verify(&no_trail_cps, None, &[]).ok());
    let r = verify(&no_trail_cps, Some(&key), &outside);
    assert!(
        r.findings.iter().any(|f| matches!(
            f,
            Finding::CheckpointMismatch { .. } | Finding::Truncated { .. }
        )),
        "{:?}",
        r.findings
    );

    // 2. The newest 300 rows deleted (a cut tail, a dropped last part).
    let truncated = store(&ch, "truncated");
    common::runtime()
        .block_on(truncated.insert(&rows[..rows.len() - 300]))
        .unwrap();
    assert!(
        verify(&truncated, None, &[]).ok(),
        "the chain alone cannot see it"
    );
    let r = verify(&truncated, Some(&key), &outside);
    assert!(
        r.findings.iter().any(|f| matches!(
            f,
            Finding::Truncated { gateway, last_seq, .. } if gateway == "gw-a" && *last_seq == rows.len() as u64 - 300
        )),
        "{:?}",
        r.findings
    );
    // Only the very last row (the final checkpoint's own event) deleted.
    let last_gone = store(&ch, "last_gone");
    common::runtime()
        .block_on(last_gone.insert(&rows[..rows.len() - 1]))
        .unwrap();
    let r = verify(&last_gone, Some(&key), &outside);
    assert!(
        r.findings
            .iter()
            .any(|f| matches!(f, Finding::Truncated { .. })),
        "{:?}",
        r.findings
    );
}
