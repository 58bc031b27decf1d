//! Every dashboard panel's SQL runs against a real ClickHouse with events in it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;

use portcullis_audit::{AuditRow, Chain, SCHEMA_VERSION};
use portcullis_model::{Envelope, Event};
use portcullis_testkit::ClickHouse;

fn substitute(sql: &str, from: i64, to: i64) -> String {
    let mut out = sql.replace("$__interval_s", "60");
    while let Some(start) = out.find("$__timeFilter(") {
        let rest = &out[start + "$__timeFilter(".len()..];
        let end = rest.find(')').expect("closing parenthesis");
        let col = rest[..end].to_string();
        out = format!(
            "{}{col} >= toDateTime({from}) AND {col} <= toDateTime({to}){}",
            &out[..start],
            &rest[end + 1..]
        );
    }
    assert!(!out.contains("$__"), "unknown macro left in {out}");
    out
}

#[test]
fn every_panel_query_runs_on_the_real_server() {
    let ch = ClickHouse::start().unwrap();
    let rt = common::runtime();
    let store = rt.block_on(common::store(&ch, SCHEMA_VERSION));
    let now = chrono::Utc::now();
    let mut chain = Chain::default();
    let events = vec![
        Event::UserRevoked {
            user: "carol".into(),
            source: "scim".into(),
            requested_at: now,
            applied_at: now,
            latency_us: 1800,
            sessions_cut: 1,
            flows_cut: 3,
        },
        Event::AuditDegraded {
            since: now,
            until: now,
            events_refused: 5,
            reason: "spool full".into(),
        },
        Event::PeerAdded {
            user: "alice".into(),
            device: "k".into(),
        },
    ];
    let rows: Vec<AuditRow> = events
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let mut r = AuditRow::from_envelope(&Envelope {
                v: 1,
                id: uuid::Uuid::new_v4(),
                seq: i as u64 + 1,
                time: now,
                gateway: "gw".into(),
                event,
            });
            chain.seal(&mut r);
            r
        })
        .collect();
    rt.block_on(store.insert(&rows)).unwrap();
    ch.query(
        "INSERT INTO portcullis.uploader_metrics VALUES ('gw', now(), 3, 120, 9, 900, 1, 4096, 0)",
    )
    .unwrap();

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dashboards/portcullis-audit.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (from, to) = (now.timestamp() - 86_400, now.timestamp() + 60);
    let mut ran = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let sql = substitute(target["rawSql"].as_str().unwrap(), from, to);
            ch.query(&sql)
                .unwrap_or_else(|e| panic!("panel {:?}: {e}", panel["title"]));
            ran += 1;
        }
    }
    assert!(ran >= 10, "only {ran} panel queries");
    let rev = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == "Revocations with latency")
        .unwrap();
    let out = ch
        .query(&substitute(
            rev["targets"][0]["rawSql"].as_str().unwrap(),
            from,
            to,
        ))
        .unwrap();
    assert!(out.contains("carol\tscim\t1.8\t1\t3"), "{out}");
}
