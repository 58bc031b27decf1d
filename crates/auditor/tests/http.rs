//! The auditors' HTTP API over a real socket, against a real ClickHouse with a trail in it:
//! the token gates everything, filters and reports answer JSON, bad input is a JSON 400,
//! and verify reports the chain.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use portcullis_audit::{AuditRow, Chain, SCHEMA_VERSION};
use portcullis_model::{CloseReason, Counters, Envelope, Event, FlowTuple, Protocol};
use portcullis_testkit::ClickHouse;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "auditor-token-0123456789abcdef";

fn flow(user: &str, allowed: bool, dst: &str, port: u16) -> Event {
    let tuple = FlowTuple {
        protocol: Protocol::TCP,
        src_ip: "100.64.0.2".parse().unwrap(),
        src_port: 40000,
        dst_ip: dst.parse().unwrap(),
        dst_port: port,
    };
    if allowed {
        Event::FlowClosed {
            flow_id: 1,
            session_id: 7,
            user: user.into(),
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
                bytes: 300,
            },
            inbound: Counters {
                packets: 2,
                bytes: 200,
            },
        }
    } else {
        Event::FlowDenied {
            session_id: 8,
            user: user.into(),
            groups: vec!["developers".into()],
            device: "k2".into(),
            tuple,
            network: "prod".into(),
            policy_ids: vec![],
            policy_epoch: 1,
            suppressed: 0,
            reason: None,
        }
    }
}

/// One request, `Connection: close`; returns (status, body as JSON).
async fn get(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn column(table: &Value, name: &str) -> Vec<Value> {
    let cols = table["columns"].as_array().unwrap();
    let i = cols.iter().position(|c| c == name).unwrap();
    table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[i].clone())
        .collect()
}

#[test]
fn the_api_answers_only_with_the_token_and_serves_queries_reports_and_verify() {
    let ch = ClickHouse::start().unwrap();
    let rt = common::runtime();
    rt.block_on(async {
        let store = common::store(&ch, SCHEMA_VERSION).await;
        let events = [
            flow("alice", true, "10.8.0.2", 22),
            flow("alice", true, "10.8.0.3", 443),
            flow("bob", false, "10.8.0.2", 22),
            flow("bob", false, "10.9.0.1", 5432),
        ];
        let mut chain = Chain::default();
        let now = chrono::Utc::now();
        let rows: Vec<AuditRow> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| {
                let mut r = AuditRow::from_envelope(&Envelope {
                    v: 1,
                    id: uuid::Uuid::new_v4(),
                    seq: i as u64 + 1,
                    time: now,
                    gateway: "gw-1".into(),
                    event,
                });
                chain.seal(&mut r);
                r
            })
            .collect();
        store.insert(&rows).await.unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            axum::serve(
                listener,
                portcullis_auditor::http::router(store, TOKEN.into()),
            )
            .await
        });

        // No token, a wrong one of the same length, a prefix: 401, and bad parameters
        // are not even looked at.
        let wrong = "x".repeat(TOKEN.len());
        for (token, path) in [
            (None, "/v1/events"),
            (Some(wrong.as_str()), "/v1/events"),
            (Some(&TOKEN[..10]), "/v1/events"),
            (None, "/v1/events?port=notaport"),
            (None, "/v1/verify"),
            (None, "/v1/reports/denied"),
        ] {
            let (status, body) = get(port, "GET", path, token).await;
            assert_eq!(status, 401, "{path} with {token:?}");
            assert!(body["error"].as_str().unwrap().contains("token"), "{body}");
        }

        // Filters: alice's flows only; bob's denies to 10.8.0.0/16.
        let (status, t) = get(port, "GET", "/v1/events?user=alice", Some(TOKEN)).await;
        assert_eq!(status, 200, "{t}");
        let users = column(&t, "user");
        assert_eq!(users.len(), 2, "{t}");
        assert!(users.iter().all(|u| u == "alice"));
        let (status, t) = get(
            port,
            "GET",
            "/v1/events?decision=deny&dst=10.8.0.0/16&since=1h",
            Some(TOKEN),
        )
        .await;
        assert_eq!(status, 200, "{t}");
        assert_eq!(column(&t, "dst_ip"), vec![Value::from("10.8.0.2")], "{t}");

        // Pages: the fixed order, `limit` rows after `offset`.
        let mut paged = Vec::new();
        for offset in [0, 3] {
            let (status, t) = get(
                port,
                "GET",
                &format!("/v1/events?limit=3&offset={offset}"),
                Some(TOKEN),
            )
            .await;
            assert_eq!(status, 200, "{t}");
            paged.extend(column(&t, "seq"));
        }
        let (_, all) = get(port, "GET", "/v1/events", Some(TOKEN)).await;
        assert_eq!(
            paged,
            column(&all, "seq"),
            "two pages are the whole listing"
        );
        assert_eq!(paged.len(), 4);

        // A canned report.
        let (status, t) = get(port, "GET", "/v1/reports/denied", Some(TOKEN)).await;
        assert_eq!(status, 200, "{t}");
        assert_eq!(t["rows"].as_array().unwrap().len(), 2, "{t}");

        // Bad input: JSON errors that name what was wrong.
        for (path, expect_status, names) in [
            ("/v1/events?decision=maybe", 400, "maybe"),
            ("/v1/events?port=notaport", 400, "port"),
            ("/v1/events?since=yesterday", 400, "yesterday"),
            ("/v1/events?dst=10.0.0.0/99", 400, "10.0.0.0/99"),
            ("/v1/events?colour=red", 400, "colour"),
            ("/v1/reports/everything", 404, "everything"),
        ] {
            let (status, body) = get(port, "GET", path, Some(TOKEN)).await;
            assert_eq!(status, expect_status, "{path}: {body}");
            let msg = body["error"].as_str().unwrap_or_default();
            assert!(msg.contains(names), "{path}: {body}");
        }

        // Read-only: no method but GET.
        let (status, _) = get(port, "POST", "/v1/events", Some(TOKEN)).await;
        assert_eq!(status, 405);

        // Verify: the chain of four is intact.
        let (status, v) = get(port, "GET", "/v1/verify?gateway=gw-1", Some(TOKEN)).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["rows"], 4, "{v}");
        assert_eq!(v["gateways"]["gw-1"], serde_json::json!([1, 4]), "{v}");
        assert!(
            v["findings"].as_array().is_some_and(|p| p.is_empty()),
            "{v}"
        );
    });
}

/// A trail still at schema 3 (hex hashes) is not misread: verify names the migration.
#[test]
fn verify_on_an_older_schema_asks_for_the_migration() {
    let ch = ClickHouse::start().unwrap();
    let rt = common::runtime();
    rt.block_on(async {
        let store = common::store(&ch, 3).await;
        let err =
            portcullis_auditor::verify_trail(&store, &portcullis_auditor::VerifyOptions::default())
                .await
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("schema version 3") && err.contains("portcullis audit migrate"),
            "{err}"
        );
        store.migrate().await.unwrap();
        let report =
            portcullis_auditor::verify_trail(&store, &portcullis_auditor::VerifyOptions::default())
                .await
                .unwrap();
        // An empty trail has no findings, but nothing was verified: not a pass.
        assert!(
            !report.ok() && report.rows == 0 && report.findings.is_empty(),
            "{report:?}"
        );
    });
}
