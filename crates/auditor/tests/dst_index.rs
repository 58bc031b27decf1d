//! Schema 5 replaced the 24-column `flows_by_dst` copy with the narrow `flows_by_dst_idx`
//! joined back to `events`. The same rows, asked the same destination questions before
//! (schema 4, the old SQL kept here as it was) and after `audit migrate`, give the same
//! answers; flows inserted after the migration are found through the new index.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use portcullis_audit::{AuditRow, Chain};
use portcullis_auditor::{Filter, Report, Table};
use portcullis_model::{CloseReason, Counters, Envelope, Event, FlowTuple, Protocol};
use portcullis_testkit::ClickHouse;

fn flow(i: u64) -> Event {
    let users = ["alice", "bob", "carol", "o'brien"];
    let user = users[(i % 4) as usize].to_string();
    let tuple = FlowTuple {
        protocol: if i % 5 == 0 {
            Protocol::UDP
        } else {
            Protocol::TCP
        },
        src_ip: "100.64.0.2".parse().unwrap(),
        src_port: 40000 + (i % 1000) as u16,
        dst_ip: if i % 7 == 0 {
            format!("fd00::{:x}", i % 9).parse().unwrap()
        } else {
            format!("10.8.{}.{}", (i / 3) % 3, (i / 2) % 11)
                .parse()
                .unwrap()
        },
        dst_port: [443, 5432, 22][(i % 3) as usize],
    };
    match i % 3 {
        0 => Event::FlowDenied {
            session_id: i % 13,
            user,
            groups: vec!["developers".into()],
            device: "k2".into(),
            tuple,
            network: "prod".into(),
            policy_ids: vec![format!("p{}", i % 2)],
            policy_epoch: 1,
            suppressed: 0,
            reason: None,
        },
        1 => Event::FlowOpened {
            flow_id: i,
            session_id: i % 13,
            user,
            groups: vec!["sre".into()],
            device: "k".into(),
            tuple,
            network: "prod".into(),
            policy_ids: vec!["sre-prod".into()],
            policy_epoch: 1,
            resumed: false,
        },
        _ => Event::FlowClosed {
            flow_id: i,
            session_id: i % 13,
            user,
            groups: vec!["sre".into()],
            device: "k".into(),
            tuple,
            network: "prod".into(),
            policy_ids: vec!["sre-prod".into()],
            policy_epoch: 1,
            reason: CloseReason::TcpClosed,
            duration_ms: 10,
            outbound: Counters {
                packets: 3,
                bytes: 100 + i,
            },
            inbound: Counters {
                packets: 2,
                bytes: 7 * i,
            },
        },
    }
}

/// The schema-4 SQL for a destination question, as `filter::sql` wrote it then.
fn old_sql(
    db: &str,
    f: &Filter,
    report: Option<Report>,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let w = f.where_clause(now).unwrap();
    let limit = "0, 1000000";
    let t = format!("{db}.flows_by_dst");
    match report {
        None => format!(
            "SELECT toString(time) AS at, kind, user, device, protocol, src_ip, src_port, dst_ip, dst_port, \
             network, decision, policy_ids, reason, bytes_out, bytes_in, session_id \
             FROM {t} FINAL WHERE {w} ORDER BY time, gateway, seq LIMIT {limit}"
        ),
        Some(Report::WhoReached) => format!(
            "SELECT user, countIf(kind = 'flow_opened') AS flows, \
             toString(min(time)) AS first_seen, toString(max(time)) AS last_seen, \
             arraySort(groupUniqArray(dst_ip)) AS destinations, \
             sumIf(bytes_out + bytes_in, kind = 'flow_closed') AS bytes \
             FROM {t} FINAL WHERE {w} AND decision = 'allow' \
             GROUP BY user ORDER BY flows DESC, user LIMIT {limit}"
        ),
        Some(Report::Denied) => format!(
            "SELECT user, network, dst_ip, dst_port, protocol, count() AS attempts, \
             toString(max(time)) AS last_attempt, arraySort(groupUniqArray(arrayStringConcat(policy_ids, ','))) AS policies \
             FROM {t} FINAL WHERE {w} AND kind = 'flow_denied' \
             GROUP BY user, network, dst_ip, dst_port, protocol ORDER BY attempts DESC, user, dst_ip, dst_port, protocol LIMIT {limit}"
        ),
        Some(Report::TopTalkers) => format!(
            "SELECT user, sum(bytes_out + bytes_in) AS bytes, sum(bytes_out) AS uploaded, \
             sum(bytes_in) AS downloaded, count() AS flows \
             FROM {t} FINAL WHERE {w} AND kind = 'flow_closed' \
             GROUP BY user ORDER BY bytes DESC, user LIMIT {limit}"
        ),
        Some(_) => unreachable!(),
    }
}

/// Group arrays and ties come back in no fixed order: sort what the comparison may see
/// in another order.
fn normalised(mut t: Table, report: Option<Report>) -> Table {
    for row in &mut t.rows {
        for cell in row.iter_mut() {
            if let serde_json::Value::Array(a) = cell {
                a.sort_by_key(|v| v.to_string());
            }
        }
    }
    if report.is_some() {
        t.rows.sort_by_key(|r| serde_json::to_string(r).unwrap());
    }
    // The new listing also names gateway and seq; the old one did not.
    if report.is_none() {
        for row in &mut t.rows {
            row.truncate(16);
        }
        t.columns.truncate(16);
    }
    // Schema 4's denied report also had `deny_reason`, any() of equal values: dropped.
    if report == Some(Report::Denied) {
        if let Some(i) = t.columns.iter().position(|c| c == "deny_reason") {
            t.columns.remove(i);
            for row in &mut t.rows {
                row.remove(i);
            }
        }
    }
    t
}

#[test]
fn destination_questions_answer_the_same_from_the_narrow_index() {
    let ch = ClickHouse::start().unwrap();
    let rt = common::runtime();
    let store = rt.block_on(common::store(&ch, 4));
    let now = chrono::Utc::now();
    let mut chain = Chain::default();
    let rows: Vec<AuditRow> = (1..=3000u64)
        .map(|seq| {
            let mut r = AuditRow::from_envelope(&Envelope {
                v: 1,
                id: uuid::Uuid::new_v4(),
                seq,
                time: now - chrono::Duration::seconds(3000 - seq as i64),
                gateway: if seq % 2 == 0 { "gw-a" } else { "gw-b" }.into(),
                event: flow(seq),
            });
            chain.seal(&mut r);
            r
        })
        .collect();
    rt.block_on(store.insert(&rows[..2000])).unwrap();
    // A retried batch: collapses after FINAL in both schemas.
    rt.block_on(store.insert(&rows[1500..2000])).unwrap();

    let questions: Vec<(Filter, Option<Report>)> = {
        let mut q = Vec::new();
        for dst in [
            "10.8.1.0/24",
            "10.8.0.5",
            "10.8.0.0/16",
            "fd00::/64",
            "192.0.2.0/24",
        ] {
            for report in [
                None,
                Some(Report::WhoReached),
                Some(Report::Denied),
                Some(Report::TopTalkers),
            ] {
                q.push((
                    Filter {
                        dst: Some(dst.into()),
                        limit: Some(1_000_000),
                        ..Filter::default()
                    },
                    report,
                ));
            }
        }
        q.push((
            Filter {
                dst: Some("10.8.2.0/24".into()),
                user: Some("o'brien".into()),
                port: Some(5432),
                since: Some("40m".into()),
                limit: Some(1_000_000),
                ..Filter::default()
            },
            None,
        ));
        q.push((
            Filter {
                dst: Some("10.8.0.0/16".into()),
                decision: Some("deny".into()),
                until: Some("20m".into()),
                limit: Some(1_000_000),
                ..Filter::default()
            },
            Some(Report::Denied),
        ));
        q
    };
    let ask_old: Vec<Table> = questions
        .iter()
        .map(|(f, r)| {
            let sql = old_sql("portcullis", f, *r, now);
            normalised(
                rt.block_on(portcullis_auditor::select_table(&store, &sql))
                    .unwrap(),
                *r,
            )
        })
        .collect();
    let answered: Vec<usize> = ask_old.iter().map(|t| t.rows.len()).collect();
    assert!(
        answered.iter().filter(|n| **n > 0).count() >= 15,
        "{answered:?}"
    );

    assert_eq!(rt.block_on(store.migrate()).unwrap(), vec![5, 6]);
    assert_eq!(
        ch.count("SELECT count() FROM system.tables WHERE database = 'portcullis' AND name LIKE 'flows_by_dst%' AND name NOT LIKE 'flows_by_dst_idx%'")
            .unwrap(),
        0,
        "the wide copy and its view are gone"
    );
    for ((f, r), old) in questions.iter().zip(&ask_old) {
        let new = rt
            .block_on(portcullis_auditor::run_query(&store, f, *r, now))
            .unwrap();
        assert_eq!(&normalised(new, *r), old, "{:?} {:?}", f.dst, r);
    }

    // New flows reach the index through its view.
    rt.block_on(store.insert(&rows[2000..])).unwrap();
    let f = Filter {
        dst: Some("10.8.0.0/16".into()),
        limit: Some(1_000_000),
        ..Filter::default()
    };
    let listed = rt
        .block_on(portcullis_auditor::run_query(&store, &f, None, now))
        .unwrap();
    let expected = rows
        .iter()
        .filter(|r| r.dst_ip.starts_with("10.8."))
        .count();
    assert_eq!(listed.rows.len(), expected);
}
