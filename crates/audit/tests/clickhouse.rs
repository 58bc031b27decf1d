//! The audit pipeline against a real ClickHouse server (Debian's 18.16, started here).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::time::{Duration, Instant};

use portcullis_audit::row::COLUMNS;
use portcullis_audit::{
    AuditRow, Chain, Pipeline, PipelineConfig, SpoolSettings, Store, StoreConfig, UploadConfig,
    SCHEMA_VERSION,
};
use portcullis_model::{CloseReason, Counters, Envelope, Event, FlowTuple, Protocol};
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

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn migrated(ch: &ClickHouse, db: &str) -> Store {
    rt().block_on(async {
        let store = Store::connect(&store_config(ch, db)).await.unwrap();
        store.migrate().await.unwrap();
        store
    })
}

fn flow_closed(i: u64, user: &str) -> Event {
    Event::FlowClosed {
        flow_id: i,
        session_id: 7,
        user: user.into(),
        groups: vec!["sre".into()],
        device: "dev".into(),
        tuple: FlowTuple {
            protocol: Protocol::TCP,
            src_ip: "100.64.0.2".parse().unwrap(),
            src_port: (i % 60000) as u16,
            dst_ip: "10.8.0.2".parse().unwrap(),
            dst_port: 22,
        },
        network: "prod".into(),
        policy_ids: vec!["sre-prod".into()],
        policy_epoch: 1,
        reason: CloseReason::TcpClosed,
        duration_ms: 5,
        outbound: Counters {
            packets: 1,
            bytes: 100,
        },
        inbound: Counters {
            packets: 2,
            bytes: 200,
        },
    }
}

fn pipeline_config(dir: &Path, ch: &ClickHouse, db: &str, max_bytes: u64) -> PipelineConfig {
    PipelineConfig {
        gateway: "gw-test".into(),
        events_file: Some(dir.join("events.jsonl")),
        spool: Some(SpoolSettings {
            dir: dir.join("spool"),
            spool: SpoolConfig {
                segment_bytes: 1 << 20,
                max_bytes,
                fsync: FsyncPolicy::OnCommit,
            },
            upload: UploadConfig {
                store: store_config(ch, db),
                batch_rows: 5000,
                batch_interval: Duration::from_millis(100),
                retention: None,
                retention_lease: None,
            },
        }),
        queue: 100_000,
        commit_interval: Duration::from_millis(10),
        checkpoints: None,
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn final_count(ch: &ClickHouse, db: &str) -> u64 {
    ch.count(&format!("SELECT count() FROM {db}.events FINAL"))
        .unwrap_or(0)
}

#[test]
fn migrate_is_idempotent_and_matches_the_row_type() {
    let ch = ClickHouse::start().unwrap();
    let store = migrated(&ch, "pc");
    let again = rt().block_on(store.migrate()).unwrap();
    assert!(again.is_empty(), "second migrate applied {again:?}");
    assert_eq!(
        rt().block_on(store.schema_version()).unwrap(),
        SCHEMA_VERSION
    );
    let cols = ch
        .query("SELECT name, type FROM system.columns WHERE database = 'pc' AND table = 'events'")
        .unwrap();
    let cols: Vec<(&str, &str)> = cols.lines().filter_map(|l| l.split_once('\t')).collect();
    assert_eq!(cols, COLUMNS);
    rt().block_on(store.check_schema()).unwrap();
    // A column of another type is named, with the remedy.
    ch.query("ALTER TABLE pc.events MODIFY COLUMN reason FixedString(40)")
        .unwrap();
    let err = rt().block_on(store.check_schema()).unwrap_err().to_string();
    assert!(
        err.contains("pc.events.reason is FixedString(40)") && err.contains("writes String"),
        "{err}"
    );
    assert_eq!(store.version.0, 18, "the test server is Debian's 18.16");
}

/// A database `db` at schema 3 holding `n` chained flow rows as a schema-3 gateway wrote
/// them (hashes as hex text): staged in a schema-4 database `<db>_staging`, copied as hex.
fn schema_3_with_rows(ch: &ClickHouse, db: &str, n: u64) -> (Store, Vec<AuditRow>, Chain) {
    let store = rt()
        .block_on(Store::connect(&store_config(ch, db)))
        .unwrap();
    assert_eq!(rt().block_on(store.migrate_to(3)).unwrap(), vec![1, 2, 3]);
    let mut chain = Chain::default();
    let rows: Vec<AuditRow> = (1..=n)
        .map(|seq| {
            let mut row = AuditRow::from_envelope(&Envelope {
                v: 1,
                id: uuid::Uuid::new_v4(),
                seq,
                time: chrono::Utc::now(),
                gateway: "gw-old".into(),
                event: flow_closed(seq, if seq % 2 == 0 { "alice" } else { "bob" }),
            });
            chain.seal(&mut row);
            row
        })
        .collect();
    let staging = migrated(ch, &format!("{db}_staging"));
    rt().block_on(staging.insert(&rows)).unwrap();
    copy_as_hex(ch, &format!("{db}_staging.events"), &format!("{db}.events"));
    assert_eq!(
        ch.query(&format!("SELECT length(any(hash)) FROM {db}.events"))
            .unwrap()
            .trim(),
        "64"
    );
    (store, rows, chain)
}

/// Copies schema-4 rows into a schema-3 table, the hashes as schema 3 held them.
fn copy_as_hex(ch: &ClickHouse, from: &str, to: &str) {
    let cols = portcullis_audit::row::column_list();
    let hex_cols = cols
        .replace("prev_hash", "lower(hex(prev_hash))")
        .replace(", hash", ", lower(hex(hash))");
    ch.query(&format!(
        "INSERT INTO {to} ({cols}) SELECT {hex_cols} FROM {from}"
    ))
    .unwrap();
}

/// The rebuild left no old table behind and is recorded: migrating again does nothing.
fn assert_rebuild_finished(ch: &ClickHouse, store: &Store, db: &str) {
    assert_eq!(
        ch.count(&format!(
            "SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'events_v3'"
        ))
        .unwrap(),
        0
    );
    assert!(rt().block_on(store.migrate()).unwrap().is_empty());
}

fn rows_back(store: &Store, db: &str) -> Vec<AuditRow> {
    let cols = portcullis_audit::row::column_list();
    rt().block_on(
        store
            .client()
            .query(&format!(
                "SELECT {cols} FROM {db}.events FINAL ORDER BY seq"
            ))
            .fetch_all(),
    )
    .unwrap()
}

/// Schema 3 kept the chain hashes as hex text; schema 4 rebuilds `events` with raw ones.
#[test]
fn schema_4_rebuilds_events_with_raw_hashes_keeping_every_row_and_the_view() {
    let ch = ClickHouse::start().unwrap();
    let (store, rows, mut chain) = schema_3_with_rows(&ch, "pc", 40);
    let err = rt().block_on(store.check_schema()).unwrap_err().to_string();
    assert!(err.contains("schema version 3"), "{err}");

    assert_eq!(rt().block_on(store.migrate()).unwrap(), vec![4, 5, 6]);
    rt().block_on(store.check_schema()).unwrap();
    assert_rebuild_finished(&ch, &store, "pc");
    let back = rows_back(&store, "pc");
    assert_eq!(back, rows, "every row, hashes now raw and equal");
    assert!(back.iter().all(|r| r.expected_hash() == r.hash));
    // Schema 5's index holds the 40 flows (backfilled) and its view feeds it.
    let next = {
        let mut row = AuditRow::from_envelope(&Envelope {
            v: 1,
            id: uuid::Uuid::new_v4(),
            seq: 41,
            time: chrono::Utc::now(),
            gateway: "gw-old".into(),
            event: flow_closed(41, "carol"),
        });
        chain.seal(&mut row);
        row
    };
    rt().block_on(store.insert(&[next])).unwrap();
    assert_eq!(
        ch.count("SELECT count() FROM pc.flows_by_dst_idx FINAL")
            .unwrap(),
        41
    );
    assert_eq!(
        ch.count("SELECT count() FROM pc.flows_by_dst_idx FINAL WHERE user = 'carol'")
            .unwrap(),
        1
    );
    assert!(rt().block_on(store.migrate()).unwrap().is_empty());
}

/// `audit migrate` interrupted during the rebuild picks up where it stopped.
#[test]
fn the_schema_4_rebuild_resumes_after_an_interruption() {
    let ch = ClickHouse::start().unwrap();
    // Stopped right after moving the old table aside: no `events`, no view.
    let (store, rows, _) = schema_3_with_rows(&ch, "pc", 30);
    ch.query("DROP TABLE pc.flows_by_dst_mv").unwrap();
    ch.query("RENAME TABLE pc.events TO pc.events_v3").unwrap();
    assert_eq!(rt().block_on(store.migrate()).unwrap(), vec![4, 5, 6]);
    assert_eq!(rows_back(&store, "pc"), rows);

    // Stopped after the copy, before the old table was dropped and the version recorded:
    // the old table still holds the same rows in hex; the copy runs again and its rows
    // collapse onto the first copy's.
    schema_3_with_rows(&ch, "old", 1);
    ch.query("CREATE TABLE pc.events_v3 AS old.events").unwrap();
    copy_as_hex(&ch, "pc.events", "pc.events_v3");
    ch.query("DROP TABLE pc.schema_migrations").unwrap();
    ch.query(
        "CREATE TABLE pc.schema_migrations (version UInt32, name String, applied DateTime) \
         ENGINE = TinyLog",
    )
    .unwrap();
    ch.query(
        "INSERT INTO pc.schema_migrations VALUES \
         (1, 'events', now()), (2, 'flows_by_dst', now()), (3, 'uploader_metrics', now())",
    )
    .unwrap();
    assert_eq!(rt().block_on(store.migrate()).unwrap(), vec![4, 5, 6]);
    assert_eq!(rows_back(&store, "pc"), rows, "each row once after FINAL");
    assert_eq!(
        ch.count("SELECT count() FROM pc.flows_by_dst_idx FINAL")
            .unwrap(),
        30
    );
    assert_rebuild_finished(&ch, &store, "pc");
}

#[test]
fn events_land_once_each_with_a_contiguous_chain() {
    let ch = ClickHouse::start().unwrap();
    migrated(&ch, "pc");
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = Pipeline::start(pipeline_config(dir.path(), &ch, "pc", 1 << 30)).unwrap();
    let n = 20_000u64;
    for i in 0..n {
        assert!(p.submit(
            flow_closed(i, if i % 2 == 0 { "alice" } else { "bob" }),
            chrono::Utc::now()
        ));
    }
    wait_for("all rows in clickhouse", Duration::from_secs(60), || {
        final_count(&ch, "pc") == n
    });
    assert_eq!(
        ch.count("SELECT uniqExact(event_id) FROM pc.events")
            .unwrap(),
        n
    );
    assert_eq!(ch.count("SELECT min(seq) FROM pc.events").unwrap(), 1);
    assert_eq!(ch.count("SELECT max(seq) FROM pc.events").unwrap(), n);
    assert_eq!(
        ch.count("SELECT sum(bytes_in) FROM pc.events WHERE user = 'bob'")
            .unwrap(),
        200 * n / 2
    );
    // flows_by_dst_idx got the same flows (the view is fed block by block after the
    // table, so it may trail the events table by a moment).
    wait_for("flows_by_dst_idx filled", Duration::from_secs(10), || {
        ch.count("SELECT count() FROM pc.flows_by_dst_idx FINAL")
            .unwrap_or(0)
            == n
    });
    assert_eq!(
        ch.count("SELECT uniqExact(seq) FROM pc.flows_by_dst_idx")
            .unwrap(),
        n
    );
    wait_for("spool trimmed", Duration::from_secs(10), || {
        p.stats().backlog.load(std::sync::atomic::Ordering::Relaxed) == 0
    });
    p.shutdown(Duration::from_secs(5));
    let lines = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    assert_eq!(
        lines.lines().count() as u64,
        n,
        "every written event has its line"
    );
}

/// Without the events file (optional with a spool) events still land, and no file is
/// made; without either the pipeline refuses to start.
#[test]
fn the_events_file_is_optional_with_a_spool_and_required_without() {
    let ch = ClickHouse::start().unwrap();
    migrated(&ch, "nofile");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = pipeline_config(dir.path(), &ch, "nofile", 1 << 30);
    cfg.events_file = None;
    let (p, _) = Pipeline::start(cfg.clone()).unwrap();
    for i in 0..500 {
        assert!(p.submit(flow_closed(i, "alice"), chrono::Utc::now()));
    }
    wait_for("rows in clickhouse", Duration::from_secs(30), || {
        final_count(&ch, "nofile") == 500
    });
    p.shutdown(Duration::from_secs(5));
    assert!(!dir.path().join("events.jsonl").exists());
    cfg.spool = None;
    assert!(matches!(
        Pipeline::start(cfg).err(),
        Some(portcullis_audit::pipeline::AuditError::Nowhere)
    ));
}

#[test]
fn a_retried_batch_never_doubles_rows() {
    let ch = ClickHouse::start().unwrap();
    let store = migrated(&ch, "pc");
    let mut chain = Chain::default();
    let rows: Vec<AuditRow> = (1..=1000)
        .map(|i| {
            let mut r = AuditRow::from_envelope(&Envelope {
                v: 1,
                id: uuid::Uuid::new_v4(),
                seq: i,
                time: chrono::Utc::now(),
                gateway: "gw".into(),
                event: flow_closed(i, "alice"),
            });
            chain.seal(&mut r);
            r
        })
        .collect();
    rt().block_on(async {
        store.insert(&rows).await.unwrap();
        store.insert(&rows).await.unwrap();
        store.insert(&rows[..500]).await.unwrap();
    });
    assert_eq!(final_count(&ch, "pc"), 1000);
    assert_eq!(
        ch.count("SELECT uniqExact(event_id) FROM pc.events")
            .unwrap(),
        1000
    );
    // What a later merge does, FINAL already shows; after OPTIMIZE the plain count agrees.
    ch.query("OPTIMIZE TABLE pc.events FINAL").unwrap();
    assert_eq!(ch.count("SELECT count() FROM pc.events").unwrap(), 1000);
}

#[test]
fn clickhouse_outage_loses_nothing_and_the_backlog_drains() {
    let mut ch = ClickHouse::start().unwrap();
    migrated(&ch, "pc");
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = Pipeline::start(pipeline_config(dir.path(), &ch, "pc", 1 << 30)).unwrap();
    for i in 0..1000 {
        assert!(p.submit(flow_closed(i, "alice"), chrono::Utc::now()));
    }
    wait_for("first rows", Duration::from_secs(30), || {
        final_count(&ch, "pc") == 1000
    });
    // Rows can be visible before the uploader has read the answer and acknowledged.
    wait_for("first rows acknowledged", Duration::from_secs(30), || {
        p.stats().backlog.load(std::sync::atomic::Ordering::Relaxed) == 0
    });
    ch.stop();
    for i in 1000..6000 {
        assert!(p.submit(flow_closed(i, "alice"), chrono::Utc::now()));
        if i % 1000 == 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let st = p.stats();
    use std::sync::atomic::Ordering::Relaxed;
    wait_for("events spooled", Duration::from_secs(10), || {
        st.written.load(Relaxed) == 6000
    });
    assert!(
        !p.blocked(),
        "an outage of clickhouse must not block the gateway"
    );
    assert_eq!(st.backlog.load(Relaxed), 5000);
    assert!(st.upload_errors.load(Relaxed) > 0);
    ch.resume().unwrap();
    wait_for("backlog drained", Duration::from_secs(60), || {
        final_count(&ch, "pc") == 6000
    });
    assert_eq!(
        ch.count("SELECT uniqExact(seq) FROM pc.events").unwrap(),
        6000
    );
    p.shutdown(Duration::from_secs(5));
}

#[test]
fn a_crash_before_the_ack_re_uploads_without_doubles_and_the_chain_resumes() {
    let ch = ClickHouse::start().unwrap();
    migrated(&ch, "pc");
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = Pipeline::start(pipeline_config(dir.path(), &ch, "pc", 1 << 30)).unwrap();
    for i in 0..3000 {
        p.submit(flow_closed(i, "alice"), chrono::Utc::now());
    }
    wait_for("uploaded", Duration::from_secs(30), || {
        final_count(&ch, "pc") == 3000
    });
    p.shutdown(Duration::from_secs(5));
    // As if the gateway died after ClickHouse answered but before the ack was saved.
    std::fs::write(dir.path().join("spool/acked"), "0").unwrap();
    let (p, _) = Pipeline::start(pipeline_config(dir.path(), &ch, "pc", 1 << 30)).unwrap();
    for i in 3000..4000 {
        p.submit(flow_closed(i, "bob"), chrono::Utc::now());
    }
    wait_for("all uploaded", Duration::from_secs(30), || {
        p.stats()
            .acked_seq
            .load(std::sync::atomic::Ordering::Relaxed)
            == 4000
    });
    p.shutdown(Duration::from_secs(5));
    assert_eq!(final_count(&ch, "pc"), 4000);
    assert!(ch.count("SELECT count() FROM pc.events").unwrap() >= 4000);
    // The chain continues across the restart: event 3001's prev_hash is event 3000's hash.
    let link = ch
        .query("SELECT (SELECT any(hash) FROM pc.events WHERE seq = 3000) = (SELECT any(prev_hash) FROM pc.events WHERE seq = 3001)")
        .unwrap();
    assert_eq!(link.trim(), "1");
}

#[test]
fn a_full_spool_blocks_then_raises_an_alarm_with_the_count() {
    let mut ch = ClickHouse::start().unwrap();
    migrated(&ch, "pc");
    ch.stop();
    let dir = tempfile::tempdir().unwrap();
    // 64 KiB cap: a few hundred events.
    let mut cfg = pipeline_config(dir.path(), &ch, "pc", 64 << 10);
    if let Some(s) = &mut cfg.spool {
        s.spool.segment_bytes = 8 << 10;
    }
    let (p, _) = Pipeline::start(cfg).unwrap();
    for i in 0..2000 {
        p.submit(flow_closed(i, "alice"), chrono::Utc::now());
    }
    wait_for("blocked", Duration::from_secs(10), || p.blocked());
    let st = p.stats();
    use std::sync::atomic::Ordering::Relaxed;
    wait_for("all events accounted", Duration::from_secs(10), || {
        st.written.load(Relaxed) + st.refused.load(Relaxed) == 2000
    });
    let written = st.written.load(Relaxed);
    assert!(written > 0 && written < 2000, "written {written}");
    ch.resume().unwrap();
    wait_for("unblocked", Duration::from_secs(60), || !p.blocked());
    wait_for("alarm uploaded", Duration::from_secs(30), || {
        ch.count("SELECT count() FROM pc.events WHERE kind = 'audit_degraded'")
            .unwrap_or(0)
            == 1
    });
    let detail = ch
        .query("SELECT detail FROM pc.events WHERE kind = 'audit_degraded'")
        .unwrap();
    assert!(
        detail.contains(&format!("\"events_refused\":{}", 2000 - written)),
        "{detail}"
    );
    let reason = ch
        .query("SELECT reason FROM pc.events WHERE kind = 'audit_degraded'")
        .unwrap();
    assert!(reason.contains("is full"), "{reason}");
    p.shutdown(Duration::from_secs(5));
}

/// Retention drops old months, except those a legal hold keeps: a hold on a time range
/// keeps every month it overlaps; a hold on a user keeps the months with that user's rows
/// in its range. A lifted hold keeps nothing.
#[test]
fn retention_drops_old_partitions_except_those_under_legal_hold() {
    use portcullis_audit::store::HoldRecord;
    let ch = ClickHouse::start().unwrap();
    let store = migrated(&ch, "pc");
    let at = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap().to_utc();
    let mut chain = Chain::default();
    // Alice in March and May 2020, bob in April 2020, June 2020 and July 2020, and now.
    let rows: Vec<AuditRow> = [
        (1, "2020-03-15T10:00:00Z", "alice"),
        (2, "2020-04-15T10:00:00Z", "bob"),
        (3, "2020-05-15T10:00:00Z", "alice"),
        (4, "2020-06-15T10:00:00Z", "bob"),
        (5, "2020-07-15T10:00:00Z", "bob"),
    ]
    .into_iter()
    .map(|(seq, t, user)| (seq, at(t), user))
    .chain([(6, chrono::Utc::now(), "carol")])
    .map(|(seq, time, user)| {
        let mut r = AuditRow::from_envelope(&Envelope {
            v: 1,
            id: uuid::Uuid::new_v4(),
            seq,
            time,
            gateway: "gw".into(),
            event: flow_closed(seq, user),
        });
        chain.seal(&mut r);
        r
    })
    .collect();
    let hold = |id: &str, action: &str, user: &str, since: &str, until: &str| HoldRecord {
        id: id.into(),
        action: action.into(),
        user: user.into(),
        since_secs: at(since).timestamp() as u32,
        until_secs: at(until).timestamp() as u32,
        reason: "case 2026-17".into(),
        actor: "admin:cli".into(),
    };
    let retention = rt().block_on(async {
        store.insert(&rows).await.unwrap();
        // Alice's rows from March to May: months 202003 and 202005 (not bob's April).
        store
            .record_hold(&hold(
                "lh-1",
                "add",
                "alice",
                "2020-01-01T00:00:00Z",
                "2020-05-31T00:00:00Z",
            ))
            .await
            .unwrap();
        // Everyone's in June.
        store
            .record_hold(&hold(
                "lh-2",
                "add",
                "",
                "2020-06-01T00:00:00Z",
                "2020-06-30T00:00:00Z",
            ))
            .await
            .unwrap();
        // Placed on July and lifted again.
        store
            .record_hold(&hold(
                "lh-3",
                "add",
                "",
                "2020-07-01T00:00:00Z",
                "2020-07-30T00:00:00Z",
            ))
            .await
            .unwrap();
        store
            .record_hold(&hold(
                "lh-3",
                "remove",
                "",
                "2020-07-01T00:00:00Z",
                "2020-07-30T00:00:00Z",
            ))
            .await
            .unwrap();
        let holds = store.holds().await.unwrap();
        assert_eq!(
            holds.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
            ["lh-1", "lh-2"]
        );
        store
            .apply_retention(Duration::from_secs(400 * 86_400))
            .await
            .unwrap()
    });
    let months = |list: &[String], table: &str| -> Vec<String> {
        let mut m: Vec<String> = list
            .iter()
            .filter_map(|p| p.strip_prefix(&format!("{table}/")).map(str::to_string))
            .collect();
        m.sort();
        m
    };
    assert_eq!(months(&retention.dropped, "events"), ["202004", "202007"]);
    assert_eq!(
        months(&retention.held, "events"),
        ["202003", "202005", "202006"]
    );
    assert_eq!(
        months(&retention.dropped, "flows_by_dst_idx"),
        ["202004", "202007"]
    );
    let mut left: Vec<u64> = ch
        .query("SELECT seq FROM pc.events ORDER BY seq")
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, [1, 3, 4, 6]);
}

/// `submit_durable` answers once the event is in the events file (no spool) or committed
/// to the spool: a control-plane request can wait for it before answering.
#[test]
fn a_durable_submit_answers_after_the_event_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = PipelineConfig {
        gateway: "gw-test".into(),
        events_file: Some(dir.path().join("events.jsonl")),
        spool: None,
        queue: 1000,
        commit_interval: Duration::from_millis(50),
        checkpoints: None,
    };
    let (p, _) = Pipeline::start(cfg).unwrap();
    let rt = rt();
    for i in 0..20 {
        let before = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap_or_default();
        let rx = p.submit_durable(flow_closed(i, "alice"), chrono::Utc::now());
        let durable = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), rx).await });
        assert!(matches!(durable, Ok(Ok(true))), "{durable:?}");
        let after = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
        assert_eq!(
            after.lines().count(),
            before.lines().count() + 1,
            "the line is there when the answer comes"
        );
    }
    p.shutdown(Duration::from_secs(1));
}

/// A request waiting for its event does not wait for the writer's interval: the
/// durable submit wakes the writer (here the interval is 30 s).
#[test]
fn a_durable_submit_wakes_the_writer_instead_of_waiting_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = PipelineConfig {
        gateway: "gw-test".into(),
        events_file: Some(dir.path().join("events.jsonl")),
        spool: None,
        queue: 1000,
        commit_interval: Duration::from_secs(30),
        checkpoints: None,
    };
    let (p, _) = Pipeline::start(cfg).unwrap();
    let rt = rt();
    // The writer has drained its first (empty) queue and sleeps.
    std::thread::sleep(Duration::from_millis(200));
    p.submit(flow_closed(0, "bob"), chrono::Utc::now());
    for i in 1..4 {
        let rx = p.submit_durable(flow_closed(i, "alice"), chrono::Utc::now());
        let durable = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), rx).await });
        assert!(matches!(durable, Ok(Ok(true))), "{durable:?}");
    }
    // The plain event before them went in the same commit, in order.
    let lines = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4);
    assert!(lines.lines().next().unwrap().contains("\"bob\""));
    p.shutdown(Duration::from_secs(1));
}

/// `store::current_schema` (what the current-ClickHouse tests create) is what the
/// migrations leave on a fresh database: the same tables with the same definitions.
#[test]
fn the_current_schema_is_what_the_migrations_build() {
    let ch = ClickHouse::start().unwrap();
    migrated(&ch, "migrated");
    for stmt in portcullis_audit::store::current_schema("direct") {
        ch.query(&stmt).unwrap();
    }
    let tables = |db: &str| -> Vec<(String, String)> {
        ch.query(&format!(
            "SELECT name, engine_full FROM system.tables WHERE database = '{db}' ORDER BY name"
        ))
        .unwrap()
        .lines()
        .map(|l| {
            let (n, e) = l.split_once('\t').unwrap();
            (n.to_string(), e.replace(db, "DB"))
        })
        .collect()
    };
    let columns = |db: &str| {
        ch.query(&format!(
            "SELECT table, name, type FROM system.columns WHERE database = '{db}' ORDER BY table, name"
        ))
        .unwrap()
    };
    assert_eq!(tables("direct"), tables("migrated"));
    assert_eq!(columns("direct"), columns("migrated"));
}
