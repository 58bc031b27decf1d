//! The `portcullis` CLI as a policy author's CI runs it: exit codes and output.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
}

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .env_remove("PORTCULLIS_POLICY_DIR")
        .output()
        .expect("runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn copy_policies() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(policies()).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
    }
    std::fs::create_dir(dir.path().join("tests")).unwrap();
    for e in std::fs::read_dir(policies().join("tests")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join("tests").join(e.file_name())).unwrap();
    }
    dir
}

#[test]
fn validate_accepts_the_examples_and_locates_errors() {
    let dir = policies();
    let o = run(&["policy", "validate", "--dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("10 policies, 7 networks: ok"));

    let bad = copy_policies();
    std::fs::write(bad.path().join("z.cedar"), "\n@id(\"typo\")\npermit(principal in Group::\"sre\", action, resource) when { context.dst_prot == 22 };\n").unwrap();
    std::fs::write(
        bad.path().join("networks.toml"),
        "[[network]]\nname = \"prod\"\ncidrs = [\"10.8.0.0/33\"]\n",
    )
    .unwrap();
    let o = run(&["policy", "validate", "--dir", bad.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("z.cedar:3:"), "{t}");
    assert!(t.contains("typo"), "errors name the policy id: {t}");
    assert!(t.contains("networks.toml:3:"), "{t}");
    assert!(t.contains('^'), "caret excerpt: {t}");
}

#[test]
fn policy_test_passes_the_examples_and_fails_a_wrong_case() {
    let o = run(&["policy", "test", "--dir", policies().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("28 passed, 0 failed"), "{}", text(&o));

    let dir = copy_policies();
    std::fs::write(
        dir.path().join("tests/wrong.toml"),
        "[[case]]\nname = \"bob reaches prod\"\nuser = \"bob\"\ngroups = [\"developers\"]\ndst = \"10.8.0.2:22/tcp\"\nexpect = \"allow\"\n",
    )
    .unwrap();
    let o = run(&["policy", "test", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(t.contains("FAIL  bob reaches prod"), "{t}");
    assert!(t.contains("wrong.toml:1"), "{t}");
    assert!(t.contains("expected allow, got deny"), "{t}");
}

#[test]
fn explain_names_network_ancestors_and_deciding_policy_with_location() {
    let o = run(&[
        "policy",
        "explain",
        "--dir",
        policies().to_str().unwrap(),
        "--user",
        "alice",
        "--groups",
        "sre",
        "--tags",
        "oncall",
        "--dst",
        "10.8.200.9:443/tcp",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["network"], "pci");
    assert_eq!(v["ancestors"], serde_json::json!(["prod"]));
    assert_eq!(v["reason"], "forbidden");
    assert_eq!(v["policies"][0]["id"], "pci-oncall-admins-only");
    assert!(v["policies"][0]["file"]
        .as_str()
        .unwrap()
        .ends_with("guardrails.cedar"));
    assert_eq!(v["policies"][0]["line"], 4);
    assert_eq!(
        v["depends_on"],
        serde_json::json!([]),
        "pci does not ask for MFA"
    );

    // prod-admin needs a second factor from the last 12 hours: explain says the answer
    // depends on it, and on its age.
    let explain_admin = |extra: &[&str]| {
        let dir = policies();
        let mut args = vec![
            "policy",
            "explain",
            "--dir",
            dir.to_str().unwrap(),
            "--user",
            "alice",
            "--groups",
            "sre",
            "--dst",
            "10.8.100.5:22/tcp",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let v = explain_admin(&["--mfa", "--auth-age", "3600"]);
    assert_eq!(
        (v["decision"].as_str(), v["network"].as_str()),
        (Some("allow"), Some("prod-admin")),
        "{v}"
    );
    assert_eq!(
        v["depends_on"],
        serde_json::json!(["mfa", "auth_age_secs"]),
        "{v}"
    );
    let v = explain_admin(&["--mfa", "--auth-age", "50000"]);
    assert_eq!(v["decision"], "deny", "{v}");
    assert_eq!(v["policies"][0]["id"], "prod-admin-needs-recent-mfa", "{v}");
    let v = explain_admin(&[]);
    assert_eq!(v["decision"], "deny", "a static peer: {v}");
    assert_eq!(
        v["depends_on"],
        serde_json::json!(["mfa", "auth_age_secs"]),
        "{v}"
    );
    let o = run(&[
        "policy",
        "explain",
        "--dir",
        policies().to_str().unwrap(),
        "--user",
        "alice",
        "--dst",
        "10.8.100.5:22/tcp",
        "--auth-age",
        "-5",
    ]);
    assert!(
        !o.status.success(),
        "a negative age is refused: {}",
        text(&o)
    );

    let o = run(&[
        "policy",
        "explain",
        "--dir",
        policies().to_str().unwrap(),
        "--user",
        "bob",
        "--dst",
        "10.8.0.2:22/tcp",
    ]);
    assert!(text(&o).contains("no permit matched"), "{}", text(&o));

    let o = run(&[
        "policy",
        "explain",
        "--dir",
        policies().to_str().unwrap(),
        "--user",
        "bob",
        "--dst",
        "10.8.0.2:22",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("expected ip:port/protocol"),
        "{}",
        text(&o)
    );
}

#[test]
fn bench_prints_one_json_line_with_both_paths() {
    let o = run(&[
        "policy",
        "bench",
        "--policies",
        "20",
        "--users",
        "50",
        "--groups",
        "10",
        "--networks",
        "6",
        "--requests",
        "300",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in [
        "fast_cold_p50_ns",
        "fast_cold_p99_ns",
        "fast_warm_p50_ns",
        "fast_warm_p99_ns",
        "plain_p50_ns",
        "plain_p99_ns",
    ] {
        assert!(v[k].as_u64().unwrap() > 0, "{k} in {v}");
    }
    assert!(v["warm_cache_hit_ratio"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn config_errors_name_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, "[gateway]\nlisten = \"0.0.0.0:51820\"\nprivate_key_file = \"k\"\ntun_name = \"pc0\"\ntunnel_address = \"100.64.0.1/24\"\nmtu = \"big\"\n[policy]\ndir = \"p\"\n[audit]\nevents_file = \"e\"\n").unwrap();
    let o = run(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("p.toml:6:") && t.contains("gateway.mtu"), "{t}");
}

/// `check-config` loads what the gateway loads: a missing or empty token file, a missing
/// password file or a broken `api.tokens` is an error naming the key, and a secret file
/// others may read is warned about.
#[test]
fn check_config_loads_every_file_the_gateway_needs() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("k"),
        "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n",
    )
    .unwrap();
    std::fs::set_permissions(d.join("k"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let base = format!(
        "[gateway]\nlisten = \"0.0.0.0:51820\"\nprivate_key_file = \"k\"\ntun_name = \"pc0\"\ntunnel_address = \"100.64.0.1/24\"\n[policy]\ndir = \"{}\"\n[audit]\nevents_file = \"e\"\n[http]\nlisten = \"127.0.0.1:18080\"\n",
        policies().display()
    );
    let check_text = |full: String| {
        let cfg = d.join("p.toml");
        std::fs::write(&cfg, full).unwrap();
        let o = run(&["check-config", "--config", cfg.to_str().unwrap()]);
        (o.status.success(), text(&o))
    };
    let check = |extra: &str| check_text(format!("{base}{extra}"));
    let (ok, t) = check("");
    assert!(ok && t.contains(": ok"), "{t}");
    let (ok, t) = check("[scim]\ntoken_file = \"missing.token\"\n");
    assert!(!ok && t.contains("scim.token_file"), "{t}");
    std::fs::write(d.join("empty.token"), "\n").unwrap();
    let (ok, t) = check("[scim]\ntoken_file = \"empty.token\"\n");
    assert!(!ok && t.contains("holds no token"), "{t}");
    std::fs::write(
        d.join("api.tokens"),
        "[[token]]\nid = \"x\"\nsecret = 12345678901234567890\n",
    )
    .unwrap();
    let (ok, t) = check("[api]\ntokens_file = \"api.tokens\"\n");
    assert!(
        !ok && t.contains("api.tokens") && !t.contains("12345678901234567890"),
        "{t}"
    );
    let (ok, t) = check_text(base.replace(
        "[audit]\nevents_file = \"e\"\n",
        "[audit]\nevents_file = \"e\"\nspool_dir = \"spool\"\n[audit.clickhouse]\nurl = \"http://127.0.0.1:8123\"\npassword_file = \"nope\"\n",
    ));
    assert!(!ok && t.contains("audit.clickhouse.password_file"), "{t}");
    std::fs::write(d.join("scim.token"), "a-token-of-enough-length-0123\n").unwrap();
    std::fs::set_permissions(d.join("scim.token"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, t) = check("[scim]\ntoken_file = \"scim.token\"\n");
    assert!(
        ok && t.contains("scim.token_file") && t.contains("chmod 600"),
        "{t}"
    );
    // With sites, the node's private key must be its site's.
    let sites = |key: &str| {
        format!(
            "[cluster]\nnode_id = \"gw-a1\"\ndatabase_url = \"postgres://portcullis@127.0.0.1:1/portcullis\"\nsite = \"eu-1\"\n\
             [[cluster.sites]]\nname = \"us-1\"\nendpoint = \"198.51.100.10:51820\"\npublic_key = \"wYSkGWj9vbiYb/iUTxVSGQSbh2hfNGuevs1yZooYtgc=\"\n\
             [[cluster.sites]]\nname = \"eu-1\"\nendpoint = \"203.0.113.10:51820\"\npublic_key = \"{key}\"\n"
        )
    };
    let (ok, t) = check(&sites("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="));
    assert!(ok, "{t}");
    let (ok, t) = check(&sites("wYSkGWj9vbiYb/iUTxVSGQSbh2hfNGuevs1yZooYtgc="));
    assert!(
        !ok && t.contains("cluster.sites[1].public_key") && t.contains("\"eu-1\""),
        "{t}"
    );
    // [mfa]: the sealing key is read and checked; a short one names the key and the file.
    std::fs::write(d.join("short.key"), "c2hvcnQ=\n").unwrap();
    std::fs::set_permissions(d.join("short.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let mfa = |key: &str| {
        format!(
            "[devices]\npool = \"100.64.0.128/25\"\nendpoint = \"h:51820\"\n\
             [saml]\nidp_metadata = \"missing-idp.xml\"\nbase_url = \"https://vpn.example.com\"\n\
             [mfa]\ntotp = true\nsecret_key_file = \"{key}\"\n"
        )
    };
    let (ok, t) = check(&mfa("short.key"));
    assert!(
        !ok && t.contains("mfa.secret_key_file") && t.contains("5 bytes, 32 needed"),
        "{t}"
    );
    std::fs::write(
        d.join("mfa.key"),
        "3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
    )
    .unwrap();
    let (ok, t) = check(&mfa("mfa.key"));
    assert!(!ok && !t.contains("mfa.secret_key_file: "), "{t}");
    assert!(
        t.contains("mfa.secret_key_file") && t.contains("chmod 600"),
        "readable by others: {t}"
    );
    assert!(t.contains("missing-idp.xml"), "the next check ran: {t}");
    // A network naming a site the cluster does not have: served by no node. An error at
    // its line and column, from check-config and from policy validate --config.
    let typo = copy_policies();
    let networks = std::fs::read_to_string(typo.path().join("networks.toml")).unwrap();
    std::fs::write(
        typo.path().join("networks.toml"),
        networks.replacen("name = \"prod\"\n", "name = \"prod\"\nsite = \"eu1\"\n", 1),
    )
    .unwrap();
    let line = networks
        .lines()
        .position(|l| l == "name = \"prod\"")
        .unwrap()
        + 2;
    let with_sites = format!(
        "{}{}",
        base.replace(
            &policies().display().to_string(),
            &typo.path().display().to_string()
        ),
        sites("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=")
    );
    let (ok, t) = check_text(with_sites.clone());
    let at = format!("networks.toml:{line}:8");
    assert!(
        !ok && t.contains(&at) && t.contains("site \"eu1\" is not one of"),
        "{t}"
    );
    std::fs::write(d.join("p.toml"), &with_sites).unwrap();
    let o = run(&[
        "policy",
        "validate",
        "--dir",
        typo.path().to_str().unwrap(),
        "--config",
        d.join("p.toml").to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains(&at), "{t}");
    // Without --config there are no sites to check against: the key is accepted.
    let o = run(&["policy", "validate", "--dir", typo.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn cluster_migrate_and_status_against_a_real_postgresql() {
    let pg = portcullis_testkit::Postgres::start(None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pg.pass"), "unused-by-trust\n").unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:51820\"\nprivate_key_file = \"gw.key\"\ntun_name = \"pc-cli\"\ntunnel_address = \"100.64.0.1/24\"\n\
             [policy]\ndir = \"{}\"\n[audit]\nevents_file = \"events.jsonl\"\n\
             [cluster]\nnode_id = \"gw-a\"\ndatabase_url = \"{}\"\npassword_file = \"pg.pass\"\n",
            policies().display(),
            pg.url()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    // Before the schema exists, status says what to run.
    let o = run(&["cluster", "status", "--config", cfg]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("run `portcullis cluster migrate`"),
        "{}",
        text(&o)
    );
    let o = run(&["cluster", "migrate", "--config", cfg]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("cluster schema version 4 (was 0)"),
        "{}",
        text(&o)
    );
    let o = run(&["cluster", "migrate", "--config", cfg]);
    assert!(text(&o).contains("already current"), "{}", text(&o));
    pg.psql(
        "portcullis",
        "INSERT INTO nodes (node_id, address, version, started, heartbeat) VALUES ('gw-b', '10.0.0.2:51820', '0.1.0', now(), now() - interval '1 minute')",
    )
    .unwrap();
    let o = run(&["cluster", "status", "--config", cfg, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let overview: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let nodes = &overview["nodes"];
    assert_eq!(nodes[0]["node_id"], "gw-b");
    assert_eq!(nodes[0]["state"], "down");
    assert_eq!(overview["last_change"], 0);
    let o = run(&["cluster", "status", "--config", cfg]);
    assert!(
        text(&o).contains("gw-b") && text(&o).contains("down"),
        "{}",
        text(&o)
    );
    // A single node's directory moves in, ids kept; a second import is refused.
    let sqlite = dir.path().join("identity.db");
    let alice_id = {
        use portcullis_identity::{Directory, Group, SqliteStore, User};
        let (mut store, _, _) = SqliteStore::open(&sqlite).unwrap();
        let now = chrono::Utc::now();
        let user = User {
            id: uuid::Uuid::nil(),
            user_name: "alice".into(),
            external_id: None,
            display_name: None,
            email: "alice@example.com".into(),
            active: true,
            tags: vec![],
            source: "scim".into(),
            created: now,
            modified: now,
            version: 0,
        };
        let mut d = Directory::default();
        let m = d.plan_create_user(user, now).unwrap();
        store.commit_with_devices(&m, &Default::default()).unwrap();
        let id = m.users[0].id;
        d.apply(m, "scim");
        let g = Group {
            id: uuid::Uuid::nil(),
            display_name: "sre".into(),
            external_id: None,
            members: [id].into_iter().collect(),
            source: "scim".into(),
            created: now,
            modified: now,
            version: 0,
        };
        let m = d.plan_create_group(g, now).unwrap();
        store.commit_with_devices(&m, &Default::default()).unwrap();
        id
    };
    let s = sqlite.to_str().unwrap();
    let o = run(&["cluster", "import", "--config", cfg, "--from-sqlite", s]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("imported 1 users, 1 groups, 0 devices"),
        "{}",
        text(&o)
    );
    assert_eq!(
        pg.psql(
            "portcullis",
            "SELECT id FROM users WHERE user_name = 'alice'"
        )
        .unwrap(),
        alice_id.to_string()
    );
    assert_eq!(
        pg.psql(
            "portcullis",
            "SELECT kind FROM changes ORDER BY number DESC LIMIT 1"
        )
        .unwrap(),
        "import"
    );
    let o = run(&["cluster", "import", "--config", cfg, "--from-sqlite", s]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("import only into an empty cluster"),
        "{}",
        text(&o)
    );
    let o = run(&[
        "cluster",
        "import",
        "--config",
        cfg,
        "--from-sqlite",
        "/nonexistent/identity.db",
    ]);
    assert!(text(&o).contains("no such file"), "{}", text(&o));
    // The database unreachable: a clear error naming the URL without secrets.
    let mut pg = pg;
    pg.stop();
    let o = run(&["cluster", "status", "--config", cfg]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("cluster.database_url postgres://***@127.0.0.1"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("unused-by-trust"));
}
