//! `audit query --report access-requests` against a real ClickHouse: one line per request
//! with its whole story (filed, decided by whom under which approval policy, its window,
//! how it ended) and what its grant was used for.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use chrono::{Duration, Utc};
use portcullis_audit::{AuditRow, Chain, SCHEMA_VERSION};
use portcullis_auditor::filter::{Filter, Report};
use portcullis_model::{CloseReason, Counters, Envelope, Event, FlowTuple, Protocol};
use portcullis_testkit::ClickHouse;

fn closed(policy: &str) -> Event {
    Event::FlowClosed {
        flow_id: 1,
        session_id: 7,
        user: "bob".into(),
        groups: vec!["developers".into()],
        device: "k".into(),
        tuple: FlowTuple {
            protocol: Protocol::TCP,
            src_ip: "100.64.0.3".parse().unwrap(),
            src_port: 40000,
            dst_ip: "10.8.5.10".parse().unwrap(),
            dst_port: 5432,
        },
        network: "prod-db".into(),
        policy_ids: vec![policy.into()],
        policy_epoch: 1,
        reason: CloseReason::PolicyRevoked,
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
}

#[test]
fn the_access_requests_report_tells_each_requests_story() {
    let ch = ClickHouse::start().unwrap();
    common::runtime().block_on(async {
        let store = common::store(&ch, SCHEMA_VERSION).await;
        let t0 = Utc::now() - Duration::minutes(5);
        let (start, end) = (t0 + Duration::seconds(10), t0 + Duration::seconds(130));
        let events = [
            Event::AccessRequested {
                request_id: "ar-1".into(),
                user: "bob".into(),
                network: "prod-db".into(),
                dst: Some("10.8.5.10/32".into()),
                port: Some("5432/tcp".into()),
                duration_secs: 120,
                reason: "INC-4711".into(),
                actor: "admin:cli".into(),
            },
            Event::AccessRequested {
                request_id: "ar-2".into(),
                user: "bob".into(),
                network: "prod".into(),
                dst: None,
                port: None,
                duration_secs: 3600,
                reason: "curious".into(),
                actor: "bob".into(),
            },
            Event::AccessApproved {
                request_id: "ar-1".into(),
                user: "bob".into(),
                approver: "dana".into(),
                network: "prod-db".into(),
                starts_at: start,
                ends_at: end,
                policy_ids: vec!["sre-leads-approve-prod".into()],
                reason: "INC-4711".into(),
            },
            Event::AccessDenied {
                request_id: "ar-2".into(),
                user: "bob".into(),
                approver: "dana".into(),
                network: "prod".into(),
                reason: "no".into(),
            },
            closed("ar-1"),
            closed("sre-prod"),
            Event::AccessExpired {
                request_id: "ar-1".into(),
                user: "bob".into(),
                network: "prod-db".into(),
                granted: true,
                ends_at: end,
            },
        ];
        let mut chain = Chain::default();
        let rows: Vec<AuditRow> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| {
                let mut r = AuditRow::from_envelope(&Envelope {
                    v: 1,
                    id: uuid::Uuid::new_v4(),
                    seq: i as u64 + 1,
                    time: t0 + Duration::seconds(i as i64),
                    gateway: "gw-1".into(),
                    event,
                });
                chain.seal(&mut r);
                r
            })
            .collect();
        store.insert(&rows).await.unwrap();
        let t = portcullis_auditor::run_query(
            &store,
            &Filter::default(),
            Some(Report::AccessRequests),
            Utc::now(),
        )
        .await
        .unwrap();
        let col = |name: &str| t.columns.iter().position(|c| c == name).unwrap();
        assert_eq!(t.rows.len(), 2, "{}", t.render());
        let row = |id: &str| {
            t.rows
                .iter()
                .find(|r| r[col("request_id")] == id)
                .unwrap_or_else(|| panic!("no {id}: {}", t.render()))
        };
        let one = row("ar-1");
        assert_eq!(one[col("requester")], "bob");
        assert_eq!(one[col("target_network")], "prod-db");
        assert_eq!(one[col("request_reason")], "INC-4711");
        assert_eq!(one[col("state")], "expired");
        assert_eq!(one[col("decided_by")], "dana");
        assert_eq!(one[col("approval_policies")], "sre-leads-approve-prod");
        assert_eq!(
            one[col("ends_at")],
            end.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        );
        assert_eq!(one[col("bytes")].to_string().trim_matches('"'), "500");
        let two = row("ar-2");
        assert_eq!(two[col("state")], "denied");
        assert_eq!(two[col("decision_reason")], "no");
        assert_eq!(two[col("bytes")].to_string().trim_matches('"'), "0");
    });
}
