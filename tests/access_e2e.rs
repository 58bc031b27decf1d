//! Just-in-time access end to end, driven through the `portcullis access` CLI against the
//! real binary, with bob's real wireguard-go tunnel: a request, refused approvals (his
//! own; alice, whom the approval policy does not name), a denied request that grants
//! nothing, an approval by dana (sre-leads) that lets bob reach prod-db, the grant's end
//! resetting his open connection within a second, a grant surviving a restart and a
//! revocation cutting at once; every step in the audit trail.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portcullis_e2e::*;
use serde_json::Value;

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const PROD_DB: &str = "10.8.5.10:5432";

fn access_lab() -> Lab {
    Lab::start(LabOptions {
        // dana approves (sre-leads); she has no device: approving needs none.
        extra_config:
            "[[user]]\nname = \"dana\"\nemail = \"dana@example.com\"\ngroups = [\"sre-leads\"]\n\
            [http]\nlisten = \"127.0.0.1:18080\"\n[admin]\ntoken_file = \"admin.token\"\n"
                .into(),
        files: vec![("admin.token".into(), format!("{ADMIN_TOKEN}\n"))],
        ..LabOptions::default()
    })
    .unwrap()
}

/// Files a request for bob and returns its id.
fn request(lab: &Lab, duration: &str, reason: &str) -> String {
    lab.request_db_access("bob", duration, reason).unwrap().1
}

fn show(lab: &Lab, id: &str) -> Value {
    let (ok, out, err) = lab.cli(&["access", "show", id]).unwrap();
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn bob_reaches_db(lab: &Lab) -> bool {
    lab.connect(&lab.bob, PROD_DB.parse().unwrap(), Duration::from_secs(2))
        .and_then(|mut s| echo_round_trip(&mut s, b"select 1"))
        .is_ok()
}

fn kind(e: &Value, k: &str, id: &str) -> bool {
    e["type"] == k && e["request_id"] == id
}

#[test]
fn a_request_approved_by_an_allowed_approver_grants_its_window_and_its_end_resets_the_connection() {
    let mut lab = access_lab();
    let db: SocketAddr = PROD_DB.parse().unwrap();
    assert!(!bob_reaches_db(&lab), "bob (developers) has no prod access");

    // A denied request grants nothing.
    let denied = request(&lab, "10m", "look at the slow query log");
    let (ok, _, err) = lab
        .cli(&[
            "access",
            "deny",
            &denied,
            "--as",
            "dana",
            "--reason",
            "use the replica",
        ])
        .unwrap();
    assert!(ok, "{err}");
    assert_eq!(show(&lab, &denied)["state"], "denied");
    assert!(!bob_reaches_db(&lab), "a denied request grants nothing");

    let id = request(&lab, "20s", "INC-4711 replica lag");
    assert_eq!(show(&lab, &id)["state"], "requested");
    assert!(!bob_reaches_db(&lab), "a pending request grants nothing");
    // Bob cannot approve his own request; alice (sre, not sre-leads) is not an approver.
    let (ok, _, err) = lab.cli(&["access", "approve", &id, "--as", "bob"]).unwrap();
    assert!(!ok);
    assert!(
        err.contains("403") && err.contains("own access request"),
        "{err}"
    );
    let (ok, _, err) = lab
        .cli(&["access", "approve", &id, "--as", "alice"])
        .unwrap();
    assert!(!ok);
    assert!(
        err.contains("403") && err.contains("no approve_access policy permits it"),
        "{err}"
    );
    assert_eq!(show(&lab, &id)["state"], "requested");

    let (ok, out, err) = lab
        .cli(&["access", "approve", &id, "--as", "dana"])
        .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("sre-leads-approve-prod"), "{out}");
    let r = show(&lab, &id);
    assert_eq!(r["state"], "approved");
    let ends_at: chrono::DateTime<chrono::Utc> = r["ends_at"].as_str().unwrap().parse().unwrap();

    // The grant is live when the approval returns: bob reaches prod-db, port 5432 only.
    let mut conn = lab.connect(&lab.bob, db, Duration::from_secs(5)).unwrap();
    assert_eq!(
        echo_round_trip(&mut conn, b"select 1").unwrap(),
        b"select 1"
    );
    assert!(lab
        .connect(
            &lab.bob,
            "10.8.5.10:22".parse().unwrap(),
            Duration::from_secs(1)
        )
        .is_err());
    let opened = lab
        .wait_event(Duration::from_secs(5), |e| {
            e["type"] == "flow_opened" && e["user"] == "bob" && e["dst_port"] == 5432
        })
        .unwrap();
    assert_eq!(opened["policy_ids"], serde_json::json!([id]), "{opened}");

    // `policy explain` with the gateway's grants names the grant and its approver.
    let policies = lab.dir.join("policies");
    let (ok, out, err) = lab
        .cli(&[
            "policy",
            "explain",
            "--dir",
            policies.to_str().unwrap(),
            "--user",
            "bob",
            "--groups",
            "developers",
            "--dst",
            "10.8.5.10:5432/tcp",
        ])
        .unwrap();
    assert!(ok, "{err}");
    assert!(out.starts_with("ALLOW"), "{out}");
    assert!(
        out.contains(&id) && out.contains("approved by dana"),
        "{out}"
    );
    assert!(out.contains("depends:  on a temporary grant"), "{out}");

    // The end of the grant resets the open connection within a second.
    let until_end = (ends_at - chrono::Utc::now()).to_std().unwrap_or_default();
    let t0 = Instant::now();
    expect_reset(&mut conn, until_end + Duration::from_secs(3)).unwrap();
    let late = chrono::Utc::now() - ends_at;
    println!(
        "grant ended: connection reset {} ms after its end (waited {:?})",
        late.num_milliseconds(),
        t0.elapsed()
    );
    assert!(
        (0..1000).contains(&late.num_milliseconds()),
        "reset {} ms after the grant's end (the grant must hold its whole window)",
        late.num_milliseconds()
    );
    assert!(!bob_reaches_db(&lab), "the grant is over");
    lab.wait_event(Duration::from_secs(5), |e| kind(e, "access_expired", &id))
        .unwrap();
    assert_eq!(show(&lab, &id)["state"], "expired");

    // A grant survives a restart; a revocation cuts at once.
    let long = request(&lab, "1h", "INC-4712 failover drill");
    let (ok, _, err) = lab
        .cli(&["access", "approve", &long, "--as", "dana"])
        .unwrap();
    assert!(ok, "{err}");
    lab.stop_gateway().unwrap();
    lab.spawn_gateway().unwrap();
    let mut conn = None;
    portcullis_e2e::wait_until(Duration::from_secs(20), || {
        conn = lab.connect(&lab.bob, db, Duration::from_secs(1)).ok();
        Ok(conn.is_some())
    })
    .expect("the grant holds after a restart");
    let mut conn = conn.unwrap();
    assert_eq!(echo_round_trip(&mut conn, b"again").unwrap(), b"again");
    let (ok, _, err) = lab
        .cli(&["access", "revoke", &long, "--reason", "drill over"])
        .unwrap();
    assert!(ok, "{err}");
    // The revocation answered after the cut: the reset is already there.
    expect_reset(&mut conn, Duration::from_millis(500)).unwrap();
    assert_eq!(show(&lab, &long)["state"], "revoked");

    // Every step is in the trail, with who and why.
    let events = lab.events();
    let find = |k: &str, id: &str| {
        events
            .iter()
            .find(|e| kind(e, k, id))
            .unwrap_or_else(|| panic!("no {k} for {id}"))
            .clone()
    };
    let asked = find("access_requested", &id);
    assert_eq!(asked["user"], "bob");
    assert_eq!(asked["network"], "prod-db");
    assert_eq!(asked["port"], "5432/tcp");
    assert_eq!(asked["duration_secs"], 20);
    assert_eq!(asked["reason"], "INC-4711 replica lag");
    let approved = find("access_approved", &id);
    assert_eq!(approved["approver"], "dana");
    assert_eq!(
        approved["policy_ids"],
        serde_json::json!(["sre-leads-approve-prod"])
    );
    let no = find("access_denied", &denied);
    assert_eq!(
        (no["approver"].as_str(), no["reason"].as_str()),
        (Some("dana"), Some("use the replica"))
    );
    let revoked = find("access_revoked", &long);
    assert_eq!(revoked["reason"], "drill over");
    assert!(events.iter().any(|e| e["type"] == "flow_closed"
        && e["user"] == "bob"
        && e["reason"] == "policy_revoked"
        && e["policy_ids"] == serde_json::json!([id])));
    // The refused approvals are recorded as the admin calls they were.
    assert!(events.iter().any(|e| e["type"] == "admin_action"
        && e["action"] == "POST /access-requests/{id}/approve"
        && e["outcome"].as_str().is_some_and(|o| o.contains("403"))));

    // Bad input: clear errors, nothing filed.
    for (args, want) in [
        (vec!["--network", "nowhere"], "not declared"),
        (
            vec!["--network", "prod-db", "--dst", "10.9.0.2"],
            "not inside network prod-db",
        ),
        (vec!["--network", "prod-db", "--port", "5432"], "5432/tcp"),
    ] {
        let mut all = vec![
            "access", "request", "--user", "bob", "--for", "1h", "--reason", "x",
        ];
        all.extend(args);
        let (ok, _, err) = lab.cli(&all).unwrap();
        assert!(!ok && err.contains(want), "{all:?}: {err}");
    }
    let (ok, _, err) = lab
        .cli(&[
            "access",
            "request",
            "--user",
            "bob",
            "--network",
            "prod-db",
            "--for",
            "2 weeks",
            "--reason",
            "x",
        ])
        .unwrap();
    assert!(!ok && err.contains("duration"), "{err}");
}

/// `user` signs in at the real SimpleSAMLphp IdP and acts on `/access`
/// (`tests/clients/saml_access.py`).
fn on_pages(lab: &Lab, user: &str, args: &[&str]) -> Value {
    lab.sign_on_client("saml_access.py", user, args).unwrap()
}

/// The same through the sign-on pages: alice (signed in at the IdP) asks for prod-db;
/// her page lists it as requested and offers her no decision on it; deciding it herself
/// is refused by the server; carol (whom a policy lets approve prod) sees it waiting and
/// approves it; the grant is in force; a forged CSRF token changes nothing.
#[test]
fn the_sign_on_pages_file_and_decide_requests() {
    let lab = Lab::start(LabOptions {
        extra_config: format!("{SIGN_ON_CONFIG}[admin]\ntoken_file = \"admin.token\"\n"),
        files: vec![
            ("admin.token".into(), format!("{ADMIN_TOKEN}\n")),
            (
                "policies/carol-approves.cedar".into(),
                "@id(\"carol-approves-prod\")\npermit (principal == User::\"carol\", action == Action::\"approve_access\", resource in Network::\"prod\");\n".into(),
            ),
        ],
        alice_from_identity_source: true,
        saml_idp: true,
        ..LabOptions::default()
    })
    .unwrap();
    let asked = on_pages(
        &lab,
        "alice",
        &["request", "prod-db", "5432/tcp", "30m", "INC-9 vacuum"],
    );
    assert_eq!(asked["status"], 303, "{}", asked["answer"]);
    let page = asked["page"].as_str().unwrap();
    assert!(
        page.contains("INC-9 vacuum") && page.contains("requested"),
        "{page}"
    );
    assert!(!page.contains("Waiting for your decision"), "{page}");
    let list: Value = {
        let (ok, out, err) = lab.cli(&["access", "list", "--json"]).unwrap();
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(list[0]["user"], "alice");
    assert_eq!(list[0]["filed_by"], "alice");

    let own = on_pages(&lab, "alice", &["approve", &id]);
    assert_eq!(own["status"], 403, "{}", own["answer"]);
    assert!(own["answer"]
        .as_str()
        .unwrap()
        .contains("own access request"));
    let forged = on_pages(&lab, "carol", &["forged", &id]);
    assert_eq!(forged["status"], 400);
    assert_eq!(show(&lab, &id)["state"], "requested");

    let seen = on_pages(&lab, "carol", &["show"]);
    let page = seen["page"].as_str().unwrap();
    assert!(
        page.contains("Waiting for your decision") && page.contains(&id),
        "{page}"
    );
    let approved = on_pages(&lab, "carol", &["approve", &id]);
    assert_eq!(approved["status"], 303, "{}", approved["answer"]);
    let r = show(&lab, &id);
    assert_eq!(r["state"], "approved");
    assert_eq!(r["decided_by"], "carol");
    assert_eq!(
        r["approval_policies"],
        serde_json::json!(["carol-approves-prod"])
    );
    let e = lab
        .wait_event(Duration::from_secs(5), |e| kind(e, "access_approved", &id))
        .unwrap();
    assert_eq!(e["approver"], "carol");
}
