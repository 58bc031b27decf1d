//! Two ClickHouse 18.16 replicas and one ZooKeeper on loopback (Debian's packages):
//! `audit migrate` with a cluster turns an existing single-server trail into replicated
//! tables under a `Distributed` one; the uploader streams into them, fails over when one
//! replica is killed (`kill -9`), nothing is lost or doubled after FINAL, queries are
//! answered by the other, and the killed replica catches up when it comes back.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use portcullis_audit::{
    AuditRow, Chain, Pipeline, PipelineConfig, SpoolSettings, Store, StoreConfig, UploadConfig,
    SCHEMA_VERSION,
};
use portcullis_model::{Envelope, Event};
use portcullis_spool::{FsyncPolicy, SpoolConfig};
use portcullis_testkit::{ClickHouse, ZooKeeper};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn config(urls: Vec<String>, cluster: Option<&str>) -> StoreConfig {
    StoreConfig {
        urls,
        cluster: cluster.map(str::to_string),
        database: "pc".into(),
        user: "default".into(),
        password: None,
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn event(i: u64) -> Event {
    Event::PeerAdded {
        user: format!("u{}", i % 17),
        device: format!("d{i}"),
    }
}

#[test]
fn a_killed_replica_loses_nothing_doubles_nothing_and_catches_up() {
    let zk = ZooKeeper::start().unwrap();
    let mut replicas = ClickHouse::start_replicas(2, &zk, "audit").unwrap();
    let urls: Vec<String> = replicas.iter().map(ClickHouse::url).collect();

    // A single-server trail on the first replica, from before the cluster.
    let single = rt()
        .block_on(Store::connect(&config(vec![urls[0].clone()], None)))
        .unwrap();
    rt().block_on(single.migrate()).unwrap();
    let mut chain = Chain::default();
    let old: Vec<AuditRow> = (1..=300u64)
        .map(|seq| {
            let mut r = AuditRow::from_envelope(&Envelope {
                v: 1,
                id: uuid::Uuid::new_v4(),
                seq,
                time: chrono::Utc::now(),
                gateway: "gw-old".into(),
                event: event(seq),
            });
            chain.seal(&mut r);
            r
        })
        .collect();
    rt().block_on(single.insert(&old)).unwrap();

    // Migrated onto the cluster: replicated on both, the old rows kept (and replicated).
    let clustered = config(urls.clone(), Some("audit"));
    let store = rt().block_on(Store::connect(&clustered)).unwrap();
    let recorded = rt().block_on(store.migrate()).unwrap();
    assert_eq!(recorded.last(), Some(&SCHEMA_VERSION));
    assert!(
        rt().block_on(store.migrate()).unwrap().is_empty(),
        "a second run changes nothing"
    );
    rt().block_on(store.check_schema()).unwrap();
    for ch in &replicas {
        assert_eq!(
            ch.query("SELECT engine FROM system.tables WHERE database = 'pc' AND name = 'events'")
                .unwrap()
                .trim(),
            "Distributed"
        );
        wait_for(
            "the old trail on every replica",
            Duration::from_secs(30),
            || {
                ch.count("SELECT count() FROM pc.events_local FINAL")
                    .unwrap_or(0)
                    == 300
            },
        );
    }

    // A steady stream through the uploader, which knows both replicas.
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = Pipeline::start(PipelineConfig {
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
                store: clustered.clone(),
                batch_rows: 500,
                batch_interval: Duration::from_millis(100),
                retention: None,
                retention_lease: None,
            },
        }),
        queue: 100_000,
        commit_interval: Duration::from_millis(10),
        checkpoints: None,
    })
    .unwrap();
    let mut submitted = 0u64;
    stream(&p, &mut submitted, Duration::from_secs(2));
    // kill -9 the replica the uploader talks to first.
    replicas[0].stop();
    stream(&p, &mut submitted, Duration::from_secs(4));
    let total = submitted;
    let second = &replicas[1];
    // Its own replicated table first (the Distributed one may first try the dead
    // replica on a loaded machine); the Distributed answer is checked below.
    let count_local = |ch: &ClickHouse| {
        ch.count("SELECT count() FROM pc.events_local FINAL WHERE gateway = 'gw-a'")
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while count_local(second) != total {
        let st = p.stats();
        assert!(
            Instant::now() < deadline,
            "every event on the surviving replica: {} of {total} there, acknowledged up to {}, backlog {}",
            count_local(second),
            st.acked_seq.load(std::sync::atomic::Ordering::Relaxed),
            st.backlog.load(std::sync::atomic::Ordering::Relaxed),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let count_on = |ch: &ClickHouse| {
        ch.count("SELECT count() FROM pc.events FINAL WHERE gateway = 'gw-a'")
            .unwrap_or(0)
    };
    wait_for(
        "every event through the Distributed table",
        Duration::from_secs(60),
        || count_on(second) == total,
    );
    // Queries keep answering from the other replica, through the same urls.
    let auditor = rt().block_on(Store::connect(&clustered)).unwrap();
    assert_eq!(auditor.url(), urls[1]);
    let table = rt().block_on(distributed_count(&auditor)).unwrap();
    assert_eq!(table, total);

    // The killed replica comes back and catches up.
    replicas[0].resume().unwrap();
    stream(&p, &mut submitted, Duration::from_secs(1));
    let total = submitted;
    p.shutdown(Duration::from_secs(20));
    for ch in &replicas {
        wait_for(
            "every replica has every event",
            Duration::from_secs(60),
            || {
                ch.count("SELECT count() FROM pc.events_local FINAL WHERE gateway = 'gw-a'")
                    .unwrap_or(0)
                    == total
            },
        );
        // Nothing doubled: one row per sequence number, 1..=total.
        assert_eq!(
            ch.count("SELECT uniqExact(seq) FROM pc.events_local WHERE gateway = 'gw-a'")
                .unwrap(),
            total
        );
        assert_eq!(
            ch.count("SELECT max(seq) FROM pc.events_local WHERE gateway = 'gw-a'")
                .unwrap(),
            total
        );
    }
    // Flows' index and the metrics are replicated tables too; retention reads the local ones.
    let r = rt()
        .block_on(auditor.apply_retention(Duration::from_secs(3650 * 86_400)))
        .unwrap();
    assert!(r.dropped.is_empty());
}

/// ~2,000 events a second for `for_how_long`.
fn stream(p: &Pipeline, submitted: &mut u64, for_how_long: Duration) {
    let until = Instant::now() + for_how_long;
    while Instant::now() < until {
        for _ in 0..20 {
            *submitted += 1;
            assert!(p.submit(event(*submitted), chrono::Utc::now()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A count through the `Distributed` table with FINAL, as the auditor queries read it.
async fn distributed_count(store: &Store) -> Result<u64, portcullis_audit::StoreError> {
    store
        .client()
        .query("SELECT count() FROM pc.events FINAL WHERE gateway = 'gw-a'")
        .fetch_one::<u64>()
        .await
        .map_err(|e| portcullis_audit::StoreError::Encode(e.to_string()))
}
