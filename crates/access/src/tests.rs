#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::*;
use proptest::prelude::*;

fn t(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
}

fn ask(user: &str) -> NewRequest {
    NewRequest {
        user: user.into(),
        network: "prod-db".into(),
        dst: Some("10.8.5.0/24".parse().unwrap()),
        port: Some("5432/tcp".parse().unwrap()),
        duration_secs: 7200,
        reason: "INC-123 replica lag".into(),
        filed_by: user.into(),
    }
}

#[test]
fn durations_parse_as_written_and_refuse_the_rest() {
    assert_eq!(parse_duration("2h"), Ok(7200));
    assert_eq!(parse_duration("90m"), Ok(5400));
    assert_eq!(parse_duration("1h30m"), Ok(5400));
    assert_eq!(parse_duration("1d2h"), Ok(93_600));
    assert_eq!(parse_duration("45s"), Ok(45));
    for bad in [
        "",
        "2",
        "h",
        "2x",
        "30m1h",
        "1h1h",
        "5s",
        "31d",
        "-1h",
        "1 h",
        "9999999999h",
    ] {
        let e = parse_duration(bad).unwrap_err().to_string();
        assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
    }
}

#[test]
fn ports_are_port_slash_protocol() {
    let p: PortSpec = "5432/tcp".parse().unwrap();
    assert_eq!((p.port, p.protocol), (5432, Protocol::TCP));
    assert_eq!(p.to_string(), "5432/tcp");
    assert_eq!("53/UDP".parse::<PortSpec>().unwrap().to_string(), "53/udp");
    for bad in ["5432", "0/tcp", "65536/tcp", "22/icmp", "/tcp", "x/tcp"] {
        assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
    }
}

#[test]
fn a_request_is_approved_by_someone_else_and_grants_its_window_only() {
    let mut book = Book::default();
    let r = book.plan_request(ask("bob"), "ar-1".into(), t(0)).unwrap();
    assert!(r.grant().is_none());
    book.apply(r);
    assert_eq!(
        book.plan_approve("ar-1", "bob", vec![], t(5)).unwrap_err(),
        AccessError::OwnRequest {
            id: "ar-1".into(),
            user: "bob".into(),
            action: "approve"
        }
    );
    assert!(book.plan_deny("ar-1", "bob", "no", t(5)).is_err());
    let approved = book
        .plan_approve(
            "ar-1",
            "carol",
            vec!["sre-leads-approve-prod".into()],
            t(10),
        )
        .unwrap();
    assert!(book.apply(approved.clone()), "the grants changed");
    let g = &book.grants(t(11))[0];
    assert_eq!(
        (g.start_ms, g.end_ms),
        (t(10).timestamp_millis(), t(7210).timestamp_millis())
    );
    assert_eq!(g.dst, Some(("10.8.5.0".parse().unwrap(), 24)));
    assert_eq!((g.port, g.protocol), (Some(5432), Some(Protocol::TCP)));
    assert!(book.grants(t(7210)).is_empty(), "the end is exclusive");
    // A second decision of the same request is refused.
    assert!(matches!(
        book.plan_deny("ar-1", "carol", "changed my mind", t(12)),
        Err(AccessError::WrongState {
            state: State::Approved,
            ..
        })
    ));
    // Applying the same revision again (read back from the log) changes nothing.
    assert!(!book.apply(approved));
    let expired = book.plan_expiry(t(7210));
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].state, State::Expired);
    assert!(matches!(
        expired[0].event(),
        Event::AccessExpired { granted: true, .. }
    ));
    book.apply(expired[0].clone());
    assert!(book.plan_expiry(t(9000)).is_empty());
    assert!(book.plan_revoke("ar-1", "carol", "done", t(9000)).is_err());
}

#[test]
fn denied_and_revoked_requests_grant_nothing_and_undecided_ones_lapse() {
    let mut book = Book::default();
    for id in ["ar-1", "ar-2", "ar-3"] {
        let r = book.plan_request(ask("bob"), id.into(), t(0)).unwrap();
        book.apply(r);
    }
    let denied = book
        .plan_deny("ar-1", "carol", "use the replica", t(1))
        .unwrap();
    book.apply(denied);
    let approved = book.plan_approve("ar-2", "carol", vec![], t(1)).unwrap();
    book.apply(approved);
    let revoked = book
        .plan_revoke("ar-2", "admin:ops", "incident over", t(2))
        .unwrap();
    assert!(book.apply(revoked), "a revoked grant changes the grants");
    assert!(book.grants(t(3)).is_empty());
    assert_eq!(book.next_expiry(), Some(t(PENDING_TTL_SECS)));
    let lapsed = book.plan_expiry(t(PENDING_TTL_SECS));
    assert_eq!(lapsed.len(), 1);
    assert_eq!(lapsed[0].id, "ar-3");
    assert!(matches!(
        lapsed[0].event(),
        Event::AccessExpired { granted: false, .. }
    ));
}

#[test]
fn bad_requests_are_refused_with_reasons() {
    let book = Book::default();
    let mut a = ask("bob");
    a.reason = " ".into();
    assert!(book
        .plan_request(a, "x".into(), t(0))
        .unwrap_err()
        .to_string()
        .contains("reason is empty"));
    let mut a = ask("bob");
    a.reason = "x".repeat(MAX_REASON_CHARS + 1);
    assert!(book.plan_request(a, "x".into(), t(0)).is_err());
    let mut a = ask("bob");
    a.reason = "line\nbreak".into();
    assert!(book.plan_request(a, "x".into(), t(0)).is_err());
    let mut a = ask("bob");
    a.duration_secs = MAX_DURATION_SECS + 1;
    assert!(book.plan_request(a, "x".into(), t(0)).is_err());
    let mut book = Book::default();
    for i in 0..MAX_OPEN_PER_USER {
        let r = book
            .plan_request(ask("bob"), format!("ar-{i}"), t(0))
            .unwrap();
        book.apply(r);
    }
    assert_eq!(
        book.plan_request(ask("bob"), "ar-x".into(), t(0))
            .unwrap_err(),
        AccessError::TooMany("bob".into())
    );
}

#[test]
fn records_round_trip_and_unknown_fields_are_refused() {
    let book = Book::default();
    let r = book.plan_request(ask("bob"), "ar-1".into(), t(0)).unwrap();
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["port"], "5432/tcp");
    assert_eq!(json["dst"], "10.8.5.0/24");
    assert_eq!(
        serde_json::from_value::<AccessRequest>(json.clone()).unwrap(),
        r
    );
    let mut extra = json;
    extra["surprise"] = serde_json::json!(1);
    assert!(serde_json::from_value::<AccessRequest>(extra).is_err());
}

#[test]
fn destinations_narrow_never_widen() {
    let cidrs: Vec<IpNet> = vec!["10.8.5.0/24".parse().unwrap()];
    assert!(dst_within(&parse_dst("10.8.5.9").unwrap(), &cidrs));
    assert!(dst_within(&parse_dst("10.8.5.0/25").unwrap(), &cidrs));
    assert!(!dst_within(&parse_dst("10.8.0.0/16").unwrap(), &cidrs));
    assert!(parse_dst("prod").is_err());
}

#[derive(Clone, Debug)]
enum Op {
    Request(u8),
    Approve(u8, u8),
    Deny(u8, u8),
    Revoke(u8),
    Wait(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3).prop_map(Op::Request),
        (0u8..6, 0u8..3).prop_map(|(r, u)| Op::Approve(r, u)),
        (0u8..6, 0u8..3).prop_map(|(r, u)| Op::Deny(r, u)),
        (0u8..6).prop_map(Op::Revoke),
        (0u32..100_000).prop_map(Op::Wait),
    ]
}

proptest! {
    #[test]
    fn parse_duration_never_panics(s in "\\PC{0,20}") {
        let _ = parse_duration(&s);
        let _ = s.parse::<PortSpec>();
        let _ = parse_dst(&s);
    }

    #[test]
    fn durations_round_trip(d in 0u64..30, h in 0u64..24, m in 0u64..60, sec in 0u64..60) {
        let text = format!("{d}d{h}h{m}m{sec}s");
        let total = d * 86_400 + h * 3_600 + m * 60 + sec;
        match parse_duration(&text) {
            Ok(n) => prop_assert_eq!(n, total),
            Err(_) => prop_assert!(!(MIN_DURATION_SECS..=MAX_DURATION_SECS).contains(&total)),
        }
    }

    /// Whatever happens, a grant exists only for an approved request, only inside its
    /// window, never approved by its requester; final states never change.
    #[test]
    fn the_state_machine_keeps_its_promises(ops in proptest::collection::vec(op(), 1..60)) {
        let users = ["alice", "bob", "carol"];
        let mut book = Book::default();
        let mut now = t(0);
        let mut ids: Vec<String> = Vec::new();
        for o in ops {
            let before = book.clone();
            let next = match o {
                Op::Request(u) => {
                    let id = format!("ar-{}", ids.len());
                    ids.push(id.clone());
                    book.plan_request(ask(users[usize::from(u)]), id, now).ok()
                }
                Op::Approve(r, u) => ids.get(usize::from(r)).and_then(|id| {
                    book.plan_approve(id, users[usize::from(u)], vec![], now).ok()
                }),
                Op::Deny(r, u) => ids.get(usize::from(r)).and_then(|id| {
                    book.plan_deny(id, users[usize::from(u)], "no", now).ok()
                }),
                Op::Revoke(r) => ids.get(usize::from(r)).and_then(|id| {
                    book.plan_revoke(id, "admin", "stop", now).ok()
                }),
                Op::Wait(s) => {
                    now += TimeDelta::seconds(i64::from(s));
                    for e in book.plan_expiry(now) {
                        book.apply(e);
                    }
                    None
                }
            };
            if let Some(r) = next {
                if let Some(old) = before.get(&r.id) {
                    prop_assert!(!old.state.is_final(), "{old:?} changed");
                    prop_assert_eq!(r.revision, old.revision + 1);
                }
                if r.state == State::Approved {
                    prop_assert_ne!(r.decided_by.as_deref(), Some(r.user.as_str()));
                }
                book.apply(r);
            }
            for g in book.grants(now) {
                let r = book.get(&g.id).unwrap();
                prop_assert_eq!(r.state, State::Approved);
                prop_assert!(g.start_ms <= now.timestamp_millis() && now.timestamp_millis() < g.end_ms);
            }
        }
    }
}
