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

    exports_verify_offline_and_any_change_fails(&original, &key);

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

/// An export of one user's rows (scattered over every checkpoint interval) verifies
/// offline with the key; an edited, re-hashed, reordered, removed or added row, or an
/// edited manifest, does not.
fn exports_verify_offline_and_any_change_fails(store: &Store, key: &SigningKey) {
    use portcullis_auditor::evidence::{verify_export, ExportFinding, Format};
    let dir = tempfile::tempdir().unwrap();
    let keys = [key.public()];
    for format in [Format::Jsonl, Format::Csv] {
        let out = dir.path().join(format.name());
        let filter = portcullis_auditor::Filter {
            user: Some("u7".into()),
            ..Default::default()
        };
        let summary = common::runtime()
            .block_on(portcullis_auditor::export::export(
                store,
                &filter,
                format,
                &out,
                key,
                chrono::Utc::now(),
            ))
            .unwrap();
        assert_eq!(summary.rows, 150, "6000 rows over 40 users");
        assert!(summary.checkpoints >= 6, "{summary:?}");
        let r = verify_export(&out, &keys).unwrap();
        assert!(r.ok, "{format:?}: {:?}", r.findings);
        assert_eq!(r.rows, 150);
        // The wrong key proves nothing.
        let other = SigningKey::from_pem(&SigningKey::generate_pem().unwrap()).unwrap();
        assert!(!verify_export(&out, &[other.public()]).unwrap().ok);

        let file = out.join(format.file());
        let original = std::fs::read_to_string(&file).unwrap();
        let header = usize::from(format == Format::Csv);
        let lines: Vec<&str> = original.lines().collect();
        let rewrite = |lines: &[String]| {
            let mut t = lines.join(if format == Format::Csv { "\r\n" } else { "\n" });
            t.push_str(if format == Format::Csv { "\r\n" } else { "\n" });
            std::fs::write(&file, t).unwrap();
        };
        let owned: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        let check = |what: &str, expect: &dyn Fn(&ExportFinding) -> bool| {
            let r = verify_export(&out, &keys).unwrap();
            assert!(!r.ok, "{what} passed");
            assert!(r.findings.iter().any(expect), "{what}: {:?}", r.findings);
        };

        // One row edited.
        let mut edited = owned.clone();
        edited[header + 3] = edited[header + 3].replace("u7", "u8");
        rewrite(&edited);
        check("edited row", &|f| {
            matches!(f, ExportFinding::Altered { .. })
        });
        // Two rows swapped.
        let mut swapped = owned.clone();
        swapped.swap(header + 1, header + 2);
        rewrite(&swapped);
        check("reordered rows", &|f| {
            matches!(f, ExportFinding::Order { .. })
        });
        // A row removed.
        let mut removed = owned.clone();
        removed.remove(header + 5);
        rewrite(&removed);
        check("removed row", &|f| {
            matches!(f, ExportFinding::FileDigest { .. })
        });
        // The digest brought up to date by someone without the key.
        let manifest_path = out.join("manifest.json");
        let manifest = std::fs::read_to_string(&manifest_path).unwrap();
        let mut m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        m["files"][format.file()] =
            portcullis_auditor::evidence::sha256_hex(&std::fs::read(&file).unwrap()).into();
        m["rows"] = 149.into();
        std::fs::write(&manifest_path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        check("re-digested manifest", &|f| {
            matches!(f, ExportFinding::ManifestSignature)
        });
        std::fs::write(&manifest_path, &manifest).unwrap();
        rewrite(&owned);
        assert!(verify_export(&out, &keys).unwrap().ok, "restored");
    }

    // An edited row re-hashed by the forger: its hash is in no signed interval.
    let out = dir.path().join(Format::Jsonl.name());
    let file = out.join(Format::Jsonl.file());
    let text = std::fs::read_to_string(&file).unwrap();
    let mut rows: Vec<portcullis_auditor::evidence::ExportRow> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut row = AuditRow::try_from(rows[4].clone()).unwrap();
    row.device = "forged".into();
    row.hash = row.expected_hash();
    rows[4] = (&row).into();
    let forged: String = rows
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(&file, forged).unwrap();
    let r = verify_export(&out, &keys).unwrap();
    assert!(
        r.findings
            .iter()
            .any(|f| matches!(f, ExportFinding::Unproven { line: 5, .. })),
        "{:?}",
        r.findings
    );
}
