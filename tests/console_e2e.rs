//! End to end: the web console in a real browser (Debian's Chromium driven by
//! playwright-core), signed in through the real SimpleSAMLphp IdP, on a gateway with
//! real wireguard-go tunnels and a real ClickHouse.
//!
//! The roles hold on the server: an auditor searches and exports but a forged POST to
//! an admin action (with her real CSRF token) is refused; a security admin edits a
//! policy (errors in place, tests, diff, apply; a stale editor refused); the help desk
//! disables a user whose tunnel is live; every change is audited with the console user
//! as the actor.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use portcullis_e2e::*;
use serde_json::Value;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn auditors_search_admins_edit_policies_it_disables_users_and_roles_hold_on_the_server() {
    let ch = portcullis_testkit::ClickHouse::start().unwrap();
    let lab = Lab::start_audited(
        LabOptions {
            extra_config: format!("{SIGN_ON_CONFIG}\
                [admin]\ntoken_file = \"admin.token\"\n[scim]\ntoken_file = \"scim.token\"\n\
                [console]\nadmin_groups = [\"security\"]\nauditor_groups = [\"audit\"]\nhelpdesk_groups = [\"it\"]\n"),
            files: vec![
                ("admin.token".into(), "console-test-admin-token-0123456789\n".into()),
                ("scim.token".into(), "console-test-scim-token-0123456789\n".into()),
            ],
            saml_idp: true,
            upload_interval_ms: Some(200),
            ..LabOptions::default()
        },
        &ch,
    )
    .unwrap();
    let out = lab.audit(&["migrate"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // bob: denied prod, and a live connection to dev.
    assert!(lab
        .connect(&lab.bob, addr("10.8.0.2:8080"), Duration::from_secs(2))
        .is_err());
    let mut live = lab
        .connect(&lab.bob, addr("10.9.0.2:443"), Duration::from_secs(5))
        .unwrap();
    assert_eq!(echo_round_trip(&mut live, b"before").unwrap(), b"before");
    let cli_json = || -> Value {
        let out = lab
            .audit(&["query", "--user", "bob", "--decision", "deny", "--json"])
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    wait_until(Duration::from_secs(10), || {
        Ok(cli_json()["rows"].as_array().is_some_and(|r| !r.is_empty()))
    })
    .unwrap();
    let expected = cli_json();

    // The auditor.
    let at = "2026-12-01T10:00:00Z";
    let a = lab
        .browser("console.mjs", "audrey", &["auditor", at])
        .unwrap();
    assert_eq!(a["unsigned_status"], 401, "{a}");
    assert_eq!(
        a["focused"], "sign-in",
        "keyboard: the second Tab is the sign-in link"
    );
    assert!(
        a["whoami"].as_str().unwrap().contains("audrey (auditor)"),
        "{a}"
    );
    assert!(
        a["live"]["sessions"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1,
        "bob's tunnel: {a}"
    );
    assert!(a["live"]["audit_backlog"].is_string(), "{a}");
    assert_eq!(
        a["console_errors"],
        serde_json::json!([]),
        "nothing blocked by the CSP: {a}"
    );
    let rows = expected["rows"].as_array().unwrap();
    assert_eq!(a["rows"].as_u64().unwrap() as usize, rows.len(), "{a}");
    let columns: Vec<String> = serde_json::from_value(expected["columns"].clone()).unwrap();
    let rows: Vec<Vec<Value>> = serde_json::from_value(expected["rows"].clone()).unwrap();
    assert_eq!(
        a["csv"].as_str().unwrap(),
        portcullis_console::csv::write(&columns, &rows),
        "the CSV is the CLI's answer"
    );
    assert!(a["csv"].as_str().unwrap().contains("10.8.0.2"));
    assert_eq!(a["post_forms"], 0, "no edit control for an auditor: {a}");
    assert!(
        a["report_columns"][0] == "user" && a["report_columns"][5] == "attempts",
        "{a}"
    );
    assert!(a["report_rows"].as_u64().unwrap() >= 1, "{a}");
    assert!(
        a["verdict"]
            .as_str()
            .unwrap()
            .ends_with("rows checked, 0 findings"),
        "{a}"
    );
    assert_eq!(
        a["nav"],
        serde_json::json!(["Overview", "Audit", "Policies", "Explain"]),
        "{a}"
    );
    assert_eq!(a["users_status"], 403, "{a}");
    assert!(
        a["policy_files"].as_u64().unwrap() >= 3,
        "auditors read the policies: {a}"
    );
    assert_eq!(a["policy_edit_links"], 0, "{a}");
    assert_eq!(a["editor_status"], 403, "{a}");
    assert_eq!(a["forged_status"], 403, "the role check refuses: {a}");
    assert_eq!(a["stale_status"], 403, "{a}");
    let csp = a["csp"].as_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    // Explain answers as `portcullis policy explain` does for the same inputs.
    // (Without --config: the same inputs, no admin API to read grants from.)
    let out = std::process::Command::new(portcullis_bin().unwrap())
        .args(["policy", "explain", "--dir"])
        .arg(lab.policy_dir())
        .args([
            "--user",
            "alice",
            "--groups",
            "sre",
            "--tags",
            "oncall",
            "--dst",
            "10.8.100.5:22/tcp",
            "--at",
            at,
            "--auth-age",
            "60",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &a["explain"];
    assert_eq!(e["decision"], cli["decision"], "{e} vs {cli}");
    assert_eq!(e["reason"], cli["reason"]);
    assert!(e["network"]
        .as_str()
        .unwrap()
        .starts_with(cli["network"].as_str().unwrap()));
    assert_eq!(
        e["depends_on"].as_str().unwrap(),
        cli["depends_on"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cli_policies = cli["policies"].as_array().unwrap();
    assert!(!cli_policies.is_empty());
    assert_eq!(e["policies"].as_array().unwrap().len(), cli_policies.len());
    for (shown, p) in e["policies"].as_array().unwrap().iter().zip(cli_policies) {
        let file = std::path::Path::new(p["file"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let shown = shown.as_str().unwrap();
        assert!(
            shown.starts_with(p["id"].as_str().unwrap())
                && shown.contains(&format!("{file}:{}", p["line"])),
            "{shown} vs {p}"
        );
    }
    assert_eq!(
        echo_round_trip(&mut live, b"still").unwrap(),
        b"still",
        "bob is untouched by the forged POST"
    );

    // A security admin edits a policy: an error shows at its line, the fixed set runs
    // the policy tests and shows its diff, applying it cuts bob's live flow it denies,
    // and a second editor holding the old version is refused.
    // The policy repository's tests come with the set, as in a deployment.
    let tests_dir = lab.policy_dir().join("tests");
    std::fs::create_dir_all(&tests_dir).unwrap();
    for f in std::fs::read_dir(repo_root().join("policies/tests")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), tests_dir.join(f.file_name())).unwrap();
    }
    let path = lab.policy_dir().join("access.cedar");
    let original = std::fs::read_to_string(&path).unwrap();
    let good = original.replace("[22, 443, 5432]", "[5432]");
    assert_ne!(good, original);
    // One mistake, in the first policy that compares the protocol.
    let bad = good.replacen(
        "context.protocol == \"tcp\" &&",
        "context.protocol == == \"tcp\" &&",
        1,
    );
    let bad_line = bad.lines().position(|l| l.contains("== ==")).unwrap() + 1;
    let p = lab
        .browser(
            "console.mjs",
            "sam",
            &["policy", "access.cedar", &bad, &good],
        )
        .unwrap();
    assert!(p["running"].as_u64().unwrap() > 0, "{p}");
    let problems = p["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|x| x
            .as_str()
            .unwrap()
            .contains(&format!("access.cedar:{bad_line}:"))),
        "the error at its line: {p}"
    );
    assert_eq!(
        p["bad_lines"],
        serde_json::json!([format!("access.cedar-L{bad_line}")]),
        "marked in place: {p}"
    );
    assert_eq!(p["check_note"], "Valid.", "{p}");
    assert_eq!(p["diff_removed"].as_array().unwrap().len(), 1, "{p}");
    assert!(p["diff_removed"][0]
        .as_str()
        .unwrap()
        .contains("[22, 443, 5432]"));
    assert!(p["diff_added"][0].as_str().unwrap().contains("[5432]"));
    let tests: Vec<&str> = p["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(tests.iter().any(|t| t.ends_with(": pass")), "{tests:?}");
    assert!(
        tests.iter().any(|t| t.contains("FAIL")),
        "the repository's tests ran against the edited set (one expects developers on ssh): {tests:?}"
    );
    assert!(
        p["apply_note"]
            .as_str()
            .unwrap()
            .starts_with("Applied: version"),
        "{p}"
    );
    assert!(
        p["stale_note"]
            .as_str()
            .unwrap()
            .contains("changed since you opened the editor"),
        "{p}"
    );
    let history = p["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{p}");
    assert_eq!(
        history[0][1], "console:sam",
        "newest first: the refused one: {p}"
    );
    assert!(history[0][2].as_str().unwrap().starts_with("412"), "{p}");
    assert_eq!(history[1][2], "ok", "{p}");
    let applied = p["apply_note"]
        .as_str()
        .unwrap()
        .trim_start_matches("Applied: version ")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        history[1][3], applied,
        "the applied version is in the history: {p}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        good,
        "the first editor's set is on disk"
    );
    assert!(
        echo_round_trip(&mut live, b"cut").is_err(),
        "bob's live flow to dev:443 is cut by the new set"
    );

    // The help desk disables alice while her tunnel is live.
    let mut alice_live = lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(5))
        .unwrap();
    assert_eq!(echo_round_trip(&mut alice_live, b"up").unwrap(), b"up");
    // An identity source's call, for the overview's health line.
    let (status, _) = lab
        .http(
            "GET",
            "/scim/v2/Users",
            "console-test-scim-token-0123456789",
            "",
        )
        .unwrap();
    assert_eq!(status, 200);
    // A registered device for IT to rotate and remove.
    let (ok, _, err) = lab.cli(&["devices", "add", "bob"]).unwrap();
    assert!(ok, "{err}");
    let it = lab
        .browser("console.mjs", "ivan", &["disable", "alice"])
        .unwrap();
    assert!(it["sessions_listed"].as_u64().unwrap() >= 1, "{it}");
    assert_eq!(it["devices_listed"], 1, "{it}");
    assert!(it["rotated"].as_str().unwrap().contains("bob"), "{it}");
    assert!(
        it["profile"].as_str().unwrap().contains("[Interface]"),
        "{it}"
    );
    assert!(
        it["profile"].as_str().unwrap().contains("PrivateKey"),
        "{it}"
    );
    assert_eq!(it["qr"], 1, "{it}");
    assert_eq!(
        it["devices_after_rotate"], 2,
        "the old key lives through its grace: {it}"
    );
    assert!(
        it["removed"].as_str().unwrap().contains("is removed"),
        "{it}"
    );
    assert_eq!(it["state_before"], "active", "{it}");
    assert!(
        it["tabs_to_confirm"].as_i64().unwrap() > 0,
        "keyboard reaches the confirmation: {it}"
    );
    assert!(it["tabs_to_disable"].as_i64().unwrap() > 0, "{it}");
    assert!(it["sessions_before"].as_u64().unwrap() >= 1, "{it}");
    let result = it["result"].as_str().unwrap();
    assert!(
        result.starts_with("alice is disabled: every tunnel was cut in"),
        "{it}"
    );
    assert_eq!(it["state_after"], "disabled", "{it}");
    let recent = it["recent"].as_array().unwrap();
    assert!(
        recent.iter().any(|r| r[2] == "10.8.0.2"),
        "alice's page shows her recent flows: {it}"
    );
    assert!(
        it["revocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r[1] == "alice" && r[2].as_str().unwrap().ends_with(" ms")),
        "the overview lists the revocation with its latency: {it}"
    );
    assert_eq!(it["console_errors"], serde_json::json!([]), "{it}");
    for run in [&a, &p, &it] {
        assert_eq!(
            run["unlabeled"],
            serde_json::json!([]),
            "every control has a label: {run}"
        );
    }
    assert!(
        it["sources"].as_str().unwrap().contains("SCIM")
            && it["sources"]
                .as_str()
                .unwrap()
                .contains("last successful call"),
        "{it}"
    );
    assert!(
        echo_round_trip(&mut alice_live, b"after").is_err(),
        "the live connection is cut"
    );
    assert!(lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(2))
        .is_err());
    // Break-glass: a one-time link, issued with the admin token (audited), signs sam in
    // without the IdP, once.
    let (ok, url, err) = lab.cli(&["console", "login-link", "--as", "sam"]).unwrap();
    assert!(ok, "{err}");
    let url = url.trim();
    assert!(
        url.starts_with("http://127.0.0.1:18080/console/login-link?t="),
        "{url}"
    );
    let l = lab.browser("console.mjs", "sam", &["link", url]).unwrap();
    assert!(l["whoami"].as_str().unwrap().contains("sam (admin)"), "{l}");
    assert_eq!(l["again_status"], 403, "used once: {l}");
    let (ok, _, err) = lab
        .cli(&["console", "login-link", "--as", "nobody"])
        .unwrap();
    assert!(!ok && err.contains("no active user"), "{err}");

    let events = lab.events();
    assert!(events.iter().any(|e| e["type"] == "login_succeeded"
        && e["user"] == "sam"
        && e["method"] == "console-link"));
    let by = |actor: &str, action: &str| {
        events.iter().any(|e| {
            e["type"] == "admin_action"
                && e["actor"] == actor
                && e["action"] == action
                && e["outcome"] == "ok"
        })
    };
    assert!(by("console:ivan", "POST /users/{name}/disable"));
    assert!(by("console:ivan", "POST /devices/{id}/rotate"));
    assert!(by("console:ivan", "DELETE /devices/{id}"));
    assert!(by("console:sam", "PUT /policies"));
    assert!(
        events.iter().any(|e| e["type"] == "admin_action"
            && e["action"] == "POST /console/login-links"
            && e["outcome"] == "ok"),
        "issuing the link is audited"
    );
    assert!(
        events.iter().any(|e| e["type"] == "admin_action"
            && e["actor"] == "console:sam"
            && e["outcome"].as_str().unwrap_or("").starts_with("412")),
        "the stale apply is recorded as refused"
    );
    assert!(events
        .iter()
        .any(|e| e["type"] == "user_revoked" && e["user"] == "alice"));
    assert!(
        !events
            .iter()
            .any(|e| e["type"] == "admin_action" && e["actor"] == "console:audrey"),
        "the auditor's forged POST changed nothing"
    );
}
