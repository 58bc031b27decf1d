//! The audit trail on current ClickHouse. No current server package is available here,
//! so chdb-core (PyPI; ClickHouse 26.x embedded in Python) runs the same work: the
//! schema's DDL, the Native block the uploader encodes (the same bytes, from spool
//! records), then every auditor listing and report, verify's, export's and the holds'
//! queries, and every dashboard panel. The same rows go into Debian's 18.16 server, the
//! same SQL runs there, and the answers must be equal.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::Command;

use portcullis_audit::checkpoint::{Checkpoint, SigningKey};
use portcullis_audit::{AuditRow, Chain, NativeBlock, SCHEMA_VERSION};
use portcullis_auditor::{Filter, Report, VerifyOptions};
use portcullis_model::{CloseReason, Counters, Envelope, Event, FlowTuple, Protocol};
use portcullis_testkit::ClickHouse;
use serde_json::Value;

const DB: &str = "portcullis";

fn tuple(i: u64) -> FlowTuple {
    FlowTuple {
        protocol: if i % 4 == 0 {
            Protocol::UDP
        } else {
            Protocol::TCP
        },
        // A device's tunnel address, or hosts behind routed peers (a site's LAN).
        src_ip: match i % 3 {
            0 => "100.64.0.2".parse().unwrap(),
            1 => format!("192.168.10.{}", i % 40).parse().unwrap(),
            _ => format!("fd10::{i:x}").parse().unwrap(),
        },
        src_port: 40000 + i as u16,
        dst_ip: if i % 5 == 0 {
            "fd00::7".parse().unwrap()
        } else {
            format!("10.8.{}.{}", i % 3, i % 7).parse().unwrap()
        },
        dst_port: [443, 5432, 22][(i % 3) as usize],
    }
}

fn events(now: chrono::DateTime<chrono::Utc>) -> Vec<Event> {
    let users = ["alice", "bob", "o'brien"];
    let mut out = Vec::new();
    for i in 0..60u64 {
        let user = users[(i % 3) as usize].to_string();
        out.push(match i % 4 {
            0 => Event::FlowDenied {
                session_id: 7,
                user,
                groups: vec!["developers".into()],
                device: "k2".into(),
                tuple: tuple(i),
                network: "prod".into(),
                policy_ids: vec!["no-dev-prod".into()],
                policy_epoch: 1,
                suppressed: 0,
                reason: None,
            },
            1 => Event::FlowOpened {
                flow_id: i,
                session_id: 7,
                user,
                groups: vec!["sre".into(), "oncall".into()],
                device: "k".into(),
                tuple: tuple(i),
                network: "prod".into(),
                policy_ids: vec!["sre-prod".into(), "ar-42".into()],
                policy_epoch: 1,
                resumed: false,
            },
            2 => Event::FlowClosed {
                flow_id: i,
                session_id: 7,
                user,
                groups: vec!["sre".into()],
                device: "k".into(),
                tuple: tuple(i),
                network: "prod".into(),
                policy_ids: vec!["sre-prod".into()],
                policy_epoch: 1,
                reason: CloseReason::TcpClosed,
                duration_ms: 10 + i,
                outbound: Counters {
                    packets: 3,
                    bytes: 100 * i,
                },
                inbound: Counters {
                    packets: 2,
                    bytes: 7 * i,
                },
            },
            _ => Event::SessionStarted {
                session_id: 7 + i,
                user,
                device: "k".into(),
                endpoint: "192.0.2.1:51820".parse().unwrap(),
                resumed: false,
            },
        });
    }
    out.extend([
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
        Event::AdminAction {
            actor: "console:sam".into(),
            action: "PUT /policies".into(),
            target: "/policies".into(),
            outcome: "ok".into(),
            version: Some("v-123".into()),
        },
        Event::LegalHold {
            hold_id: "lh-1".into(),
            action: "add".into(),
            user: "alice".into(),
            since: now,
            until: now,
            reason: "case 17".into(),
            actor: "admin:cli".into(),
        },
    ]);
    out
}

/// Cells as text and arrays sorted: the two servers may order group arrays (and rows
/// of equal sort keys) differently, and quote 64-bit numbers or not.
fn normalised(rows: &[Value]) -> Vec<String> {
    fn cell(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Array(a) => {
                let mut items: Vec<String> = a.iter().map(cell).collect();
                items.sort();
                format!("[{}]", items.join(","))
            }
            Value::Number(n) => {
                // Floats print differently; six significant digits are the same answer.
                n.as_f64()
                    .filter(|_| !n.is_u64() && !n.is_i64())
                    .map_or_else(|| n.to_string(), |f| format!("{f:.6e}"))
            }
            other => other.to_string(),
        }
    }
    let mut out: Vec<String> = rows
        .iter()
        .map(|r| match r {
            Value::Array(cells) => cells.iter().map(cell).collect::<Vec<_>>().join("|"),
            other => cell(other),
        })
        .collect();
    out.sort();
    out
}

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
    out
}

#[test]
fn schema_native_blocks_queries_and_dashboards_run_on_current_clickhouse_with_the_same_answers() {
    let python_has_chdb = Command::new("python3")
        .args(["-c", "import chdb"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        python_has_chdb,
        "python3 cannot import chdb: run scripts/install-deps.sh (pip install chdb-core)"
    );
    let ch = ClickHouse::start().unwrap();
    let rt = common::runtime();
    let store = rt.block_on(common::store(&ch, SCHEMA_VERSION));
    let now = chrono::Utc::now();
    let mut chain = Chain::default();
    let mut rows: Vec<AuditRow> = events(now)
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let mut r = AuditRow::from_envelope(&Envelope {
                v: 1,
                id: uuid::Uuid::new_v4(),
                seq: i as u64 + 1,
                time: now - chrono::Duration::seconds(600 - i as i64),
                gateway: "gw-a".into(),
                event,
            });
            chain.seal(&mut r);
            r
        })
        .collect();
    // A signed checkpoint of the chain so far, as the writer appends it.
    let key = SigningKey::from_pem(&SigningKey::generate_pem().unwrap()).unwrap();
    let head = rows.last().unwrap().clone();
    let mut tree = portcullis_audit::checkpoint::Merkle::default();
    for r in &rows {
        tree.push(&r.hash);
    }
    let signed = key.sign(Checkpoint {
        node: "gw-a".into(),
        seq: head.seq,
        hash: head.hash,
        time_us: head.time_us,
        from_seq: 1,
        root: tree.root(),
        uncovered: [0, 0],
    });
    let mut cp_row = AuditRow::from_envelope(&Envelope {
        v: 1,
        id: uuid::Uuid::new_v4(),
        seq: head.seq + 1,
        time: now,
        gateway: "gw-a".into(),
        event: signed.to_event(),
    });
    chain.seal(&mut cp_row);
    rows.push(cp_row);

    // The uploader's Native block, from the rows' spool records: once to 18.16, once to a file.
    let block = || {
        let mut b = NativeBlock::default();
        let mut rec = Vec::new();
        for r in &rows {
            rec.clear();
            r.encode_record(&mut rec);
            b.push_record(&rec).unwrap();
        }
        b
    };
    rt.block_on(store.insert_block(block())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let native = dir.path().join("events.native");
    std::fs::write(&native, block().finish()).unwrap();
    let extra_sql = [
        "INSERT INTO portcullis.uploader_metrics VALUES ('gw-a', now(), 3, 120, 9, 900, 1, 4096, 0)",
        "INSERT INTO portcullis.legal_holds VALUES ('lh-1', 'add', 'alice', toDateTime(0), toDateTime(2000000000), 'case 17', 'admin:cli', toDateTime(1796000000))",
        "INSERT INTO portcullis.legal_holds VALUES ('lh-2', 'add', '', toDateTime(0), toDateTime(1), 'gone', 'admin:cli', toDateTime(1796000000))",
        "INSERT INTO portcullis.legal_holds VALUES ('lh-2', 'remove', '', toDateTime(0), toDateTime(1), 'closed', 'admin:cli', toDateTime(1796000001))",
    ];
    for sql in extra_sql {
        ch.query(sql).unwrap();
    }

    // Every query: listings and reports under each filter, verify, export, holds,
    // retention, the schema check, and the dashboards.
    let mut queries: Vec<(String, String)> = Vec::new();
    let filters = [
        ("all", Filter::default()),
        (
            "user",
            Filter {
                user: Some("o'brien".into()),
                ..Filter::default()
            },
        ),
        (
            "group",
            Filter {
                group: Some("sre".into()),
                ..Filter::default()
            },
        ),
        (
            "dst",
            Filter {
                dst: Some("10.8.1.0/24".into()),
                ..Filter::default()
            },
        ),
        (
            "dst6",
            Filter {
                dst: Some("fd00::/64".into()),
                port: Some(5432),
                ..Filter::default()
            },
        ),
        (
            "deny",
            Filter {
                decision: Some("deny".into()),
                since: Some("1h".into()),
                ..Filter::default()
            },
        ),
        (
            "until",
            Filter {
                until: Some("5m".into()),
                kind: Some("flow_closed".into()),
                ..Filter::default()
            },
        ),
        (
            "session",
            Filter {
                session: Some(7),
                order: Some("desc".into()),
                offset: Some(3),
                limit: Some(10),
                ..Filter::default()
            },
        ),
    ];
    let reports = [
        None,
        Some(Report::Sessions),
        Some(Report::WhoReached),
        Some(Report::Denied),
        Some(Report::TopTalkers),
        Some(Report::AccessRequests),
        Some(Report::Revocations),
        Some(Report::PolicyChanges),
    ];
    for (name, f) in &filters {
        for r in reports {
            queries.push((
                format!("{name} {r:?}"),
                portcullis_auditor::filter::sql(DB, f, r, now).unwrap(),
            ));
        }
        queries.push((
            format!("export {name}"),
            portcullis_auditor::export::export_sql(DB, f, now).unwrap(),
        ));
    }
    for prefix in [24, 28] {
        for r in [Report::WhoReached, Report::TopTalkers] {
            let f = Filter {
                source_prefix: Some(prefix),
                ..Filter::default()
            };
            queries.push((
                format!("by /{prefix} {r:?}"),
                portcullis_auditor::filter::sql(DB, &f, Some(r), now).unwrap(),
            ));
        }
    }
    queries.push((
        "verify".into(),
        portcullis_auditor::verify_sql(DB, &VerifyOptions::default()),
    ));
    queries.push((
        "checkpoints".into(),
        portcullis_auditor::checkpoints_sql(DB, Some("gw-a")),
    ));
    queries.push((
        "interval".into(),
        portcullis_auditor::export::interval_sql(DB, &signed.checkpoint),
    ));
    queries.push(("holds".into(), portcullis_audit::store::holds_sql(DB)));
    queries.push((
        "held months".into(),
        portcullis_audit::store::held_months_sql(DB, "alice", 0, 2_000_000_000),
    ));
    queries.push((
        "retention".into(),
        portcullis_audit::store::retention_parts_sql(
            DB,
            "'events', 'flows_by_dst_idx', 'uploader_metrics'",
            i64::from(u32::MAX),
        ),
    ));
    queries.push((
        "columns".into(),
        "SELECT name, type FROM system.columns WHERE database = 'portcullis' AND table = 'events'"
            .into(),
    ));
    let (from, to) = (now.timestamp() - 86_400, now.timestamp() + 60);
    for file in ["portcullis-audit.json", "portcullis-gateway-metrics.json"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../dashboards")
            .join(file);
        let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in dash["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(sql) = target["rawSql"].as_str() {
                    queries.push((
                        format!("panel {}", panel["title"]),
                        substitute(sql, from, to),
                    ));
                }
            }
        }
    }
    assert!(queries.len() > 80, "{} queries", queries.len());

    // Current ClickHouse, embedded.
    let insert = NativeBlock::insert_sql("portcullis.events");
    let insert = insert.trim_end_matches(" FORMAT Native").to_string();
    let mut ddl = portcullis_audit::store::current_schema(DB);
    ddl.extend(extra_sql.iter().map(|s| s.to_string()));
    // The client library reads `??` as a literal `?`; chdb gets the SQL as the server does.
    let unbind = |sql: &str| sql.replace("??", "?");
    let job = serde_json::json!({
        "path": dir.path().join("chdb").display().to_string(),
        "ddl": ddl,
        "inserts": [[insert, native.display().to_string()]],
        "queries": queries.iter().map(|(n, q)| [n.clone(), unbind(q)]).collect::<Vec<_>>(),
    });
    let job_path = dir.path().join("job.json");
    let out_path = dir.path().join("out.json");
    std::fs::write(&job_path, job.to_string()).unwrap();
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chdb/run.py");
    let out = Command::new("python3")
        .arg(&runner)
        .arg(&job_path)
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let current: Value =
        serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let version = current["version"].as_str().unwrap();
    assert!(version.starts_with("26."), "chdb runs ClickHouse {version}");
    assert_eq!(
        current["ddl_errors"],
        serde_json::json!([]),
        "the schema on {version}"
    );
    assert_eq!(
        current["insert_errors"],
        serde_json::json!([]),
        "the Native block on {version}"
    );

    let mut failures = Vec::new();
    let mut answered = 0;
    for (name, sql) in &queries {
        let old = rt.block_on(portcullis_auditor::select_table(&store, sql));
        let new = &current["answers"][name];
        match (old, new.get("data")) {
            (Ok(t), Some(Value::Array(rows))) => {
                let (a, b) = (
                    normalised(
                        &t.rows
                            .iter()
                            .map(|r| Value::Array(r.clone()))
                            .collect::<Vec<_>>(),
                    ),
                    normalised(rows),
                );
                if a != b {
                    failures.push(format!("{name}: 18.16 {a:?}\n   {version} {b:?}"));
                } else if !a.is_empty() {
                    answered += 1;
                }
            }
            (Err(e), _) => failures.push(format!("{name}: 18.16: {e}")),
            (_, _) => failures.push(format!("{name}: {version}: {}", new["error"])),
        }
    }
    assert!(
        failures.is_empty(),
        "{} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(answered > 50, "only {answered} queries had rows");
    // By source subnet: each LAN is one row per user, its hosts folded into the subnet.
    let subnets: std::collections::BTreeSet<String> = current["answers"]["by /28 TopTalkers"]
        ["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        subnets.into_iter().collect::<Vec<_>>(),
        [
            "100.64.0.0/28",
            "192.168.10.0/28",
            "192.168.10.16/28",
            "192.168.10.32/28",
            "fd10::/64"
        ],
        "top talkers by source subnet"
    );
    // The rows in chdb verify like the 18.16 ones: the same hashes came through.
    let rows_back = &current["answers"]["verify"]["data"];
    assert_eq!(rows_back.as_array().unwrap().len(), rows.len());
}
