//! The TOTP second factor end to end through a real SimpleSAMLphp sign-on and the real
//! binary, with `[mfa] totp = true, required = true`: alice (password only at the IdP)
//! must set up an authenticator before anything is renewed; a code is accepted once (a
//! replay is refused); recovery codes work once each; wrong codes are rate-limited;
//! an administrator's reset makes her set one up again; every step is audited.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use portcullis_e2e::*;
use serde_json::Value;

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

/// `user` signs in at the IdP and answers `/mfa` (`tests/clients/saml_totp.py`).
fn totp(lab: &Lab, user: &str, args: &[&str]) -> Value {
    lab.sign_on_client("saml_totp.py", user, args).unwrap()
}

/// Waits into the next 30-second TOTP step (a code of the step just used is a replay).
fn next_step() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into = now.as_secs_f64() % 30.0;
    std::thread::sleep(Duration::from_secs_f64(30.0 - into + 0.5));
}

#[test]
fn totp_is_set_up_at_first_sign_on_used_once_per_code_rate_limited_and_reset_by_an_admin() {
    let mut lab = Lab::start(LabOptions {
        extra_config: format!(
            "{SIGN_ON_CONFIG}[admin]\ntoken_file = \"admin.token\"\n\
            [mfa]\ntotp = true\nrequired = true\nsecret_key_file = \"mfa.key\"\n"
        ),
        files: vec![
            ("admin.token".into(), format!("{ADMIN_TOKEN}\n")),
            // 32 bytes, base64.
            (
                "mfa.key".into(),
                "q5mZsS1yYJk0w1Yb1b3sX2m6uJ0b2bqz8S7p8Z1pQ2Y=\n".into(),
            ),
        ],
        alice_from_identity_source: true,
        saml_idp: true,
        ..LabOptions::default()
    })
    .unwrap();
    // First sign-on: the setup page, not a login.
    let first = totp(&lab, "alice", &["setup"]);
    assert_eq!(first["kind"], "setup", "{first}");
    let secret = first["secret"].as_str().unwrap().to_string();
    assert_eq!(first["status"], 200, "{}", first["answer"]);
    assert!(first["signed_in"].as_bool().unwrap());
    let recovery: Vec<String> = serde_json::from_value(first["recovery"].clone()).unwrap();
    assert_eq!(recovery.len(), 10, "{}", first["answer"]);
    // The secret is not stored in the clear.
    let db = std::fs::read(lab.dir.join("identity.db")).unwrap_or_default();
    let wal = std::fs::read(lab.dir.join("identity.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&secret),
            "secret stored in the clear"
        );
    }

    // The same code again (same step) is a replay.
    let replay = totp(&lab, "alice", &["send", first["code"].as_str().unwrap()]);
    assert_eq!(replay["kind"], "code");
    assert_eq!(replay["status"], 401, "{}", replay["answer"]);
    assert!(!replay["signed_in"].as_bool().unwrap());
    // A fresh code of the next step signs in.
    next_step();
    let ok = totp(&lab, "alice", &["code", &secret]);
    assert_eq!(ok["status"], 303, "{}", ok["answer"]);
    assert!(ok["signed_in"].as_bool().unwrap());
    // A recovery code works once.
    let rc = totp(&lab, "alice", &["send", &recovery[0]]);
    assert_eq!(rc["status"], 303, "{}", rc["answer"]);
    let rc_again = totp(&lab, "alice", &["send", &recovery[0]]);
    assert_eq!(rc_again["status"], 401, "{}", rc_again["answer"]);
    // Wrong codes: refused, then rate-limited (5 failures in 15 minutes; a success
    // clears the count, so one so far: the reused recovery code).
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            totp(&lab, "alice", &["send", "000000"])["status"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(statuses, [401, 401, 401, 401], "{statuses:?}");
    let limited = totp(&lab, "alice", &["code", &secret]);
    assert_eq!(
        limited["status"], 429,
        "even a right code waits: {}",
        limited["answer"]
    );
    // The failures are stored with the authenticator: a restart (or another node)
    // does not forget them.
    lab.stop_gateway().unwrap();
    lab.spawn_gateway().unwrap();
    wait_until(Duration::from_secs(10), || {
        Ok(lab
            .http("GET", "/saml/login", "", "")
            .is_ok_and(|(s, _)| s == 303))
    })
    .unwrap();
    let after_restart = totp(&lab, "alice", &["code", &secret]);
    assert_eq!(
        after_restart["status"], 429,
        "still limited after a restart: {}",
        after_restart["answer"]
    );

    // The administrator's reset (audited): the next sign-on sets one up again.
    let out = lab
        .cli_in_gateway_ns(&["users", "reset-mfa", "alice"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = totp(&lab, "alice", &["show-only"]);
    assert_eq!(again["kind"], "setup", "{again}");

    let events = lab.events();
    let count = |kind: &str, reason: Option<&str>| {
        events
            .iter()
            .filter(|e| e["type"] == kind && reason.is_none_or(|r| e["reason"] == r))
            .count()
    };
    assert_eq!(count("mfa_enrolled", None), 1);
    assert!(count("mfa_failed", Some("replayed")) >= 1);
    assert!(count("mfa_failed", Some("recovery_code_unknown")) >= 1);
    assert!(count("mfa_failed", Some("wrong")) >= 3);
    assert!(count("mfa_failed", Some("rate_limited")) >= 1);
    assert!(events
        .iter()
        .any(|e| e["type"] == "login_succeeded" && e["method"] == "saml+totp"));
    assert!(events.iter().any(|e| e["type"] == "admin_action"
        && e["action"] == "POST /users/{name}/reset-mfa"
        && e["outcome"] == "ok"));
}
