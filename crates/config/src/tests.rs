use std::net::IpAddr;

use super::*;
use crate::secrets::sha256;

const KEY_A: &str = "hTj3BGuxdqxk2ZR0TlCsdi7Sbi4fKCDpg1AwH6PTSEs=";
const KEY_B: &str = "d6ec7PznHbb+vzrSc9U+MsyCI5gqTEN1Ws4PX+V/zns=";

fn sample(extra: &str) -> String {
    format!(
        r#"
[gateway]
listen = "0.0.0.0:51820"
private_key_file = "gw.key"
tun_name = "pc0"
tunnel_address = "100.64.0.1/24"
mtu = 1420

[policy]
dir = "policies"

[audit]
events_file = "events.jsonl"

[[user]]
name = "alice"
groups = ["sre"]
tags = ["oncall"]

[[peer]]
user = "alice"
public_key = "{KEY_A}"
address = "100.64.0.2"
{extra}"#
    )
}

fn check(src: &str) -> Result<Loaded, ConfigError> {
    parse(Path::new("/etc/portcullis.toml"), src)
}

#[test]
fn the_documented_example_parses() -> Result<(), ConfigError> {
    let l = check(&sample(""))?;
    assert_eq!(l.config.gateway.mtu, 1420);
    assert_eq!(l.config.peers[0].address, IpAddr::from([100, 64, 0, 2]));
    assert_eq!(l.config.flows, FlowsConfig::default());
    assert!(l.warnings.is_empty());
    Ok(())
}

#[test]
fn a_routed_peer_carries_its_subnets() -> Result<(), ConfigError> {
    let l = check(&sample("routes = [\"192.168.10.0/24\", \"fd10::/64\"]"))?;
    let routes: Vec<String> = l.config.peers[0]
        .routes
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(routes, ["192.168.10.0/24", "fd10::/64"]);
    assert!(check(&sample(""))?.config.peers[0].routes.is_empty());
    Ok(())
}

#[test]
fn devices_section_defaults_and_checks() -> Result<(), ConfigError> {
    let base = "[admin]\ntoken_file = \"t\"\n[http]\nlisten = \"127.0.0.1:8080\"\n[devices]\n";
    let l = check(&sample(&format!(
        "{base}pool = \"100.64.0.128/25\"\nendpoint = \"vpn.example.com:51820\"\n"
    )))?;
    let d = l
        .config
        .devices
        .ok_or_else(|| ConfigError::new(Path::new("-"), "devices", "missing"))?;
    assert_eq!(d.key_lifetime_secs, 12 * 3600);
    assert_eq!(d.rotation_grace_secs, 300);
    assert_eq!(d.persistent_keepalive, Some(25));
    for (body, key, reason) in [
        ("pool = \"10.0.0.0/24\"\nendpoint = \"h:1\"", "devices.pool", "not inside the tunnel network 100.64.0.0/24"),
        ("pool = \"100.64.0.0/25\"\nendpoint = \"h\"", "devices.endpoint", "not host:port"),
        ("pool = \"100.64.0.0/25\"\nendpoint = \"h:1\"\nkey_lifetime_secs = 0", "devices.key_lifetime_secs", "at least 1"),
        ("pool = \"100.64.0.0/25\"\nendpoint = \"h:1\"\nkey_lifetime_secs = 60\nrotation_grace_secs = 61", "devices.rotation_grace_secs", "longer than"),
        ("pool = \"100.64.0.0/25\"\nendpoint = \"h:1\"\nlifetime = 3", "devices", "unknown field `lifetime`"),
    ] {
        let e = check(&sample(&format!("{base}{body}\n"))).err();
        let e = e.ok_or_else(|| ConfigError::new(Path::new("-"), key, "accepted"))?;
        assert!(e.key.starts_with(key) && e.reason.contains(reason), "{e}");
    }
    Ok(())
}

/// `extra` is refused at `key` (or a key under it) for `reason`.
fn refused(extra: &str, key: &str, reason: &str) -> Result<(), ConfigError> {
    let e = check(&sample(extra)).err();
    let e = e.ok_or_else(|| ConfigError::new(Path::new("-"), key, "accepted"))?;
    assert!(
        e.key.starts_with(key) && e.reason.contains(reason),
        "{extra}: {e}"
    );
    Ok(())
}

#[test]
fn mfa_section_defaults_and_every_mistake_names_its_key() -> Result<(), ConfigError> {
    let base = "[http]\nlisten = \"127.0.0.1:8080\"\n\
                [devices]\npool = \"100.64.0.128/25\"\nendpoint = \"h:51820\"\n\
                [saml]\nidp_metadata = \"idp.xml\"\nbase_url = \"https://vpn.example.com/\"\n";
    let l = check(&sample(&format!(
        "{base}[mfa]\ntotp = true\nsecret_key_file = \"mfa.key\"\n"
    )))?;
    let m = l
        .config
        .mfa
        .ok_or_else(|| ConfigError::new(Path::new("-"), "mfa", "missing"))?;
    assert!(m.totp && !m.required);
    assert_eq!(m.issuer, "Portcullis");
    assert!(m
        .saml_authn_contexts
        .contains(&"https://refeds.org/profile/mfa".to_string()));
    assert_eq!(m.secret_key_file.as_deref(), Some(Path::new("mfa.key")));
    // The IdP's own second factor alone is enough for `required`.
    check(&sample(&format!("{base}[mfa]\nrequired = true\n")))?;
    for (extra, key, reason) in [
        ("[mfa]\ntotp = false\n".to_string(), "mfa", "needs [saml]"),
        (
            format!("{base}[mfa]\ntotp = true\n"),
            "mfa.secret_key_file",
            "needed with totp",
        ),
        (
            format!("{base}[mfa]\nissuer = \"a:b\"\n"),
            "mfa.issuer",
            "without ':'",
        ),
        (
            format!("{base}[mfa]\nissuer = \"\"\n"),
            "mfa.issuer",
            "1-64",
        ),
        (
            format!("{base}[mfa]\nrequired = true\nsaml_authn_contexts = []\n"),
            "mfa.required",
            "no second factor is possible",
        ),
        (
            format!("{base}[mfa]\nsaml_authn_contexts = [\"x\", \" \"]\n"),
            "mfa.saml_authn_contexts[1]",
            "empty",
        ),
        (
            format!("{base}[mfa]\nrequired = \"yes\"\n"),
            "mfa.required",
            "bool",
        ),
        (
            format!("{base}[mfa]\ntotp_window = 3\n"),
            "mfa",
            "unknown field `totp_window`",
        ),
    ] {
        refused(&extra, key, reason)?;
    }
    Ok(())
}

#[test]
fn console_section_defaults_and_every_mistake_names_its_key() -> Result<(), ConfigError> {
    let base = "[http]\nlisten = \"127.0.0.1:8080\"\n\
                [devices]\npool = \"100.64.0.128/25\"\nendpoint = \"h:51820\"\n\
                [saml]\nidp_metadata = \"idp.xml\"\nbase_url = \"https://vpn.example.com/\"\n";
    let l = check(&sample(&format!(
        "{base}[console]\nadmin_groups = [\"security\"]\nauditor_groups = [\"audit\"]\nhelpdesk_groups = [\"it\"]\n"
    )))?;
    let c = l
        .config
        .console
        .ok_or_else(|| ConfigError::new(Path::new("-"), "console", "missing"))?;
    assert_eq!(c.admin_groups, ["security"]);
    assert_eq!(c.auditor_groups, ["audit"]);
    assert_eq!(c.helpdesk_groups, ["it"]);
    assert_eq!(c.idle_timeout_secs, 1800);
    for (extra, key, reason) in [
        (
            "[console]\nadmin_groups = [\"security\"]\n".to_string(),
            "console",
            "needs [saml]",
        ),
        (
            format!("{base}[console]\n"),
            "console.admin_groups",
            "no group has any role",
        ),
        (
            format!("{base}[console]\nauditor_groups = [\"\"]\n"),
            "console.auditor_groups",
            "empty group name",
        ),
        (
            format!("{base}[console]\nadmin_groups = [\"s\"]\nidle_timeout_secs = 5\n"),
            "console.idle_timeout_secs",
            "out of range",
        ),
        (
            format!("{base}[console]\nadmin_groups = [\"s\"]\nadmins = []\n"),
            "console",
            "unknown field `admins`",
        ),
    ] {
        refused(&extra, key, reason)?;
    }
    Ok(())
}

#[test]
fn saml_section_defaults_and_checks() -> Result<(), ConfigError> {
    let base = "[http]\nlisten = \"127.0.0.1:8080\"\n\
                [devices]\npool = \"100.64.0.128/25\"\nendpoint = \"h:51820\"\n";
    let saml = "[saml]\nidp_metadata = \"idp.xml\"\nbase_url = \"https://vpn.example.com/\"\n";
    let l = check(&sample(&format!("{base}{saml}")))?;
    let s = l
        .config
        .saml
        .ok_or_else(|| ConfigError::new(Path::new("-"), "saml", "missing"))?;
    assert_eq!(s.entity_id(), "https://vpn.example.com/saml/metadata");
    assert_eq!(
        (s.groups_attribute.as_str(), s.login_max_secs),
        ("groups", 12 * 3600)
    );
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let url = "[saml]\nidp_metadata = \"https://idp.example.com/md\"\nbase_url = \"https://v\"\n";
    let l = check(&sample(&format!("{base}{url}")))?;
    assert_eq!(
        l.config.saml.map(|s| s.idp_metadata),
        Some("https://idp.example.com/md".to_string())
    );
    for (extra, key, reason) in [
        (saml.to_string(), "saml", "needs [http]"),
        (
            format!("[http]\nlisten = \"127.0.0.1:8080\"\n{saml}"),
            "saml",
            "needs [devices]",
        ),
        (
            format!("{base}[saml]\nidp_metadata = \"x\"\nbase_url = \"vpn.example.com\"\n"),
            "saml.base_url",
            "http(s)://",
        ),
        (
            format!("{base}{saml}max_clock_skew_secs = 0\n"),
            "saml.max_clock_skew_secs",
            "outside",
        ),
        (
            format!("{base}{saml}login_max_secs = 5\n"),
            "saml.login_max_secs",
            "at least 60",
        ),
        (
            format!("{base}{saml}acs = \"x\"\n"),
            "saml",
            "unknown field `acs`",
        ),
    ] {
        let e = check(&sample(&extra)).err();
        let e = e.ok_or_else(|| ConfigError::new(Path::new("-"), key, "accepted"))?;
        assert!(e.key.starts_with(key) && e.reason.contains(reason), "{e}");
    }
    Ok(())
}

#[test]
fn the_shipped_example_file_parses() -> Result<(), ConfigError> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../portcullis.example.toml");
    let src =
        std::fs::read_to_string(&path).map_err(|e| ConfigError::new(&path, "-", e.to_string()))?;
    check(&src)?;
    Ok(())
}

#[test]
fn the_readme_example_parses() -> Result<(), ConfigError> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let readme =
        std::fs::read_to_string(&path).map_err(|e| ConfigError::new(&path, "-", e.to_string()))?;
    let start = readme
        .find("```toml\n[gateway]")
        .ok_or_else(|| ConfigError::new(&path, "-", "no toml example"))?;
    let block = &readme[start + 8..];
    let end = block.find("```").unwrap_or(block.len());
    let l = check(&block[..end])?;
    assert_eq!(l.config.peers.len(), 1);
    Ok(())
}

#[test]
fn errors_name_file_key_and_reason() {
    let cases = [
        (sample("").replace("mtu = 1420", "mtu = 1420\nbogus = 1"), "gateway.bogus", "unknown field"),
        (sample("").replace("mtu = 1420", "mtu = \"big\""), "gateway.mtu", "invalid type"),
        (sample("").replace("mtu = 1420", "mtu = 100"), "gateway.mtu", "outside"),
        (sample("").replace(KEY_A, "no!pe"), "peer[0].public_key", "base64"),
        (sample("").replace(KEY_A, "AAAA"), "peer[0].public_key", "32"),
        (sample("").replace("100.64.0.2", "10.0.0.2"), "peer[0].address", "tunnel network"),
        (sample("").replace("100.64.0.2", "100.64.0.1"), "peer[0].address", "usable"),
        (
            sample(&format!("[[peer]]\nuser = \"alice\"\npublic_key = \"{KEY_B}\"\naddress = \"100.64.0.2\"\n")),
            "peer[1].address",
            "another peer",
        ),
        (
            sample(&format!("[[peer]]\nuser = \"alice\"\npublic_key = \"{KEY_A}\"\naddress = \"100.64.0.3\"\n")),
            "peer[1].public_key",
            "twice",
        ),
        (sample("").replace("\"pc0\"", "\"a-very-long-interface\""), "gateway.tun_name", "15"),
        (sample("address6 = \"fd00::2\""), "peer[0].address6", "tunnel_address6"),
        (sample("routes = [\"192.168.10.5/24\"]"), "peer[0].routes[0]", "192.168.10.0/24"),
        (sample("routes = [\"0.0.0.0/0\"]"), "peer[0].routes[0]", "default route"),
        (sample("routes = [\"100.64.0.0/16\"]"), "peer[0].routes[0]", "tunnel network"),
        (sample("routes = [\"nonsense\"]"), "peer.routes", "invalid IP address"),
        (
            sample(&format!("routes = [\"192.168.10.0/24\"]\n[[peer]]\nuser = \"alice\"\npublic_key = \"{KEY_B}\"\naddress = \"100.64.0.3\"\nroutes = [\"10.9.0.0/16\", \"192.168.10.128/25\"]\n")),
            "peer[1].routes[1]",
            "overlaps 192.168.10.0/24 (peer[0].routes[0] of \"alice\")",
        ),
        (sample("").replace("[audit]\nevents_file = \"events.jsonl\"\n", ""), "-", "missing field `audit`"),
        (sample("").replace("events_file = \"events.jsonl\"\n", ""), "audit.events_file", "go nowhere"),
        (
            sample("").replace("events_file = \"events.jsonl\"", "events_file = \"e\"\n[audit.clickhouse]\nurl = \"http://127.0.0.1:8123\""),
            "audit.spool_dir",
            "required",
        ),
        (
            sample("").replace("events_file = \"events.jsonl\"", "events_file = \"e\"\nspool_dir = \"s\"\n[audit.clickhouse]\nurl = \"127.0.0.1:8123\""),
            "audit.clickhouse.url",
            "http",
        ),
        (
            sample("").replace("events_file = \"events.jsonl\"", "events_file = \"e\"\nspool_dir = \"s\"\n[audit.clickhouse]\nurl = \"http://h:1\"\ndatabase = \"a;drop\""),
            "audit.clickhouse.database",
            "letters",
        ),
        (
            sample("").replace("events_file = \"events.jsonl\"", "events_file = \"e\"\nfsync = \"sometimes\""),
            "audit.fsync",
            "unknown variant",
        ),
        (
            sample("").replace("events_file = \"events.jsonl\"", "events_file = \"e\"\ncommit_interval_ms = 0"),
            "audit.commit_interval_ms",
            "between 1 and 1000",
        ),
    ];
    for (src, key, reason) in cases {
        match check(&src) {
            Ok(_) => panic!("accepted config expected to fail on {key}"),
            Err(e) => {
                assert_eq!(e.key, key, "{e}");
                assert!(e.reason.contains(reason), "{e}");
                assert!(e.to_string().starts_with("/etc/portcullis.toml"), "{e}");
            }
        }
    }
}

#[test]
fn unknown_user_is_a_warning() -> Result<(), ConfigError> {
    let l =
        check(&sample("").replace("user = \"alice\"\npublic_key", "user = \"zed\"\npublic_key"))?;
    assert_eq!(l.warnings.len(), 1);
    assert!(l.warnings[0].contains("zed"));
    Ok(())
}

#[test]
fn a_saml_metadata_file_is_relative_to_the_config_and_a_url_is_kept(
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("portcullis.toml");
    let base = "[http]\nlisten = \"127.0.0.1:8080\"\n[devices]\npool = \"100.64.0.128/25\"\nendpoint = \"h:1\"\n";
    for (given, want) in [
        ("idp.xml", dir.path().join("idp.xml").display().to_string()),
        (
            "https://idp.example.com/md",
            "https://idp.example.com/md".to_string(),
        ),
    ] {
        std::fs::write(
            &path,
            sample(&format!(
                "{base}[saml]\nidp_metadata = \"{given}\"\nbase_url = \"https://v.example\"\n"
            )),
        )?;
        let l = load_unkeyed(&path)?;
        assert_eq!(l.config.saml.map(|s| s.idp_metadata), Some(want));
    }
    Ok(())
}

#[test]
fn private_key_is_read_relative_and_never_printed() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("gw.key"), format!("{KEY_B}\n"))?;
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, sample(""))?;
    let l = load(&path)?;
    assert_eq!(l.config.policy.dir, dir.path().join("policies"));
    assert!(!format!("{l:?}").contains(KEY_B));
    std::fs::write(dir.path().join("gw.key"), "garbage")?;
    let e = load(&path).err().ok_or("accepted a bad key")?;
    assert_eq!(e.key, "gateway.private_key_file");
    assert!(!e.to_string().contains("garbage"), "{e}");
    Ok(())
}

#[test]
fn token_sets_hold_hashes_accept_either_token_and_name_bad_lines(
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("portcullis.toml");
    let f = dir.path().join("tokens");
    let new_hash = hex::encode(sha256(b"new-token-0123456789"));
    std::fs::write(
        &f,
        format!("# rotating\nold-token-0123456789\nsha256:{new_hash}\n"),
    )?;
    let t = TokenSet::load(&cfg, "scim.token_file", &f)?;
    assert!(t.verify("old-token-0123456789"));
    assert!(t.verify("new-token-0123456789"));
    assert!(!t.verify("old-token-012345678"));
    assert!(!t.verify(""));
    assert!(!format!("{t:?}").contains("old-token"));
    assert_eq!(
        TokenSet::first_token(&cfg, "admin.token_file", &f)?.0,
        "old-token-0123456789"
    );
    std::fs::write(&f, "short\n")?;
    let e = TokenSet::load(&cfg, "scim.token_file", &f)
        .err()
        .ok_or("accepted")?;
    assert_eq!(e.key, "scim.token_file");
    assert!(
        e.to_string().contains("line 1") && !e.to_string().contains("short"),
        "{e}"
    );
    std::fs::write(&f, "sha256:abcd\n")?;
    assert!(TokenSet::load(&cfg, "scim.token_file", &f).is_err());
    std::fs::write(&f, "# nothing\n")?;
    assert!(TokenSet::load(&cfg, "scim.token_file", &f).is_err());
    Ok(())
}

#[test]
fn scim_needs_the_http_listener() -> Result<(), ConfigError> {
    let e = check(&sample("[scim]\ntoken_file = \"t\"\n")).err();
    assert_eq!(e.map(|e| e.key), Some("scim".to_string()));
    let l = check(&sample(
        "[http]\nlisten = \"127.0.0.1:8080\"\n[scim]\ntoken_file = \"t\"\n",
    ))?;
    assert_eq!(l.config.http.map(|h| h.max_body_bytes), Some(1 << 20));
    assert_eq!(l.config.identity.database, PathBuf::from("identity.db"));
    Ok(())
}

#[test]
fn errors_name_the_right_table_and_never_echo_url_credentials() {
    // A missing field inside [saml] names saml, not the table above it.
    let src = sample("[http]\nlisten = \"127.0.0.1:8080\"\n[saml]\nidp_metadata = \"idp.xml\"\n");
    let e = check(&src).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("key `saml`") && e.contains("base_url"), "{e}");
    // An unknown top-level table is named.
    let e = check(&sample("[dashboard]\nlisten = 1\n"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("unknown field `dashboard`"), "{e}");
    // Credentials in the ClickHouse URL: refused, and not printed.
    let src = sample("").replace(
        "[audit]\nevents_file = \"events.jsonl\"\n",
        "[audit]\nspool_dir = \"spool\"\n[audit.clickhouse]\nurl = \"http://admin:hunter2@127.0.0.1:8123\"\n",
    );
    let e = check(&src).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        e.contains("audit.clickhouse.url") && e.contains("password_file"),
        "{e}"
    );
    assert!(!e.contains("hunter2") && !e.contains("admin:"), "{e}");
    assert_eq!(redact_url("https://u:p@h:1/x?y"), "https://***@h:1/x?y");
    assert!(!url_has_credentials("http://h:1/a@b"));
}

#[test]
fn durations_past_ten_years_are_refused_by_name() {
    for (table, key) in [
        ("gateway", "session_idle_timeout_secs"),
        ("flows", "udp_timeout_secs"),
    ] {
        let src = if table == "gateway" {
            sample("").replace(
                "mtu = 1420",
                &format!("mtu = 1420\n{key} = 9223372036854775807"),
            )
        } else {
            format!("{}\n[flows]\n{key} = 9223372036854775807\n", sample(""))
        };
        let e = check(&src).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains(&format!("{table}.{key}")) && e.contains("out of range"),
            "{e}"
        );
    }
}

#[test]
fn cluster_and_an_identity_database_do_not_go_together() {
    let cluster = "[cluster]\nnode_id = \"gw-a\"\ndatabase_url = \"postgres://portcullis@127.0.0.1:5432/portcullis\"\n";
    let l = check(&sample(cluster)).expect("a cluster node");
    assert_eq!(
        l.config.cluster.as_ref().map(|c| c.node_id.as_str()),
        Some("gw-a")
    );
    let e = check(&sample(&format!(
        "{cluster}[identity]\ndatabase = \"identity.db\"\n"
    )))
    .unwrap_err();
    assert_eq!(e.key, "identity.database");
    assert!(e.reason.contains("[cluster]"), "{e}");
    let e = check(&sample(
        "[cluster]\nnode_id = \"gw-a\"\ndatabase_url = \"postgres://u:pw@h/d\"\n",
    ))
    .unwrap_err();
    assert_eq!(e.key, "cluster.database_url");
    assert!(!e.to_string().contains("pw@"), "{e}");
}

#[test]
fn sites_name_this_nodes_site_and_every_mistake_names_its_key() {
    const KEY: &str = "eX9WXkqIw8jkpiUNCE6z+ZzRFxyZmwYvHpQ+P5oP/Uo=";
    let base = "[cluster]\nnode_id = \"gw-a1\"\ndatabase_url = \"postgres://portcullis@127.0.0.1:5432/portcullis\"\n";
    let site = |name: &str, endpoint: &str, key: &str| {
        format!("[[cluster.sites]]\nname = \"{name}\"\nendpoint = \"{endpoint}\"\npublic_key = \"{key}\"\n")
    };
    let two = format!(
        "{}{}",
        site("eu-1", "203.0.113.10:51820", KEY),
        site("us-1", "198.51.100.10:51820", KEY)
    );
    let l = check(&sample(&format!("{base}site = \"eu-1\"\n{two}"))).expect("two sites");
    let cl = l.config.cluster.as_ref().expect("cluster");
    assert_eq!(cl.site(), Some("eu-1"));
    assert_eq!(
        cl.own_site().map(|s| s.endpoint.as_str()),
        Some("203.0.113.10:51820")
    );
    assert_eq!(cl.sites.len(), 2);
    // No sites at all: a single-site cluster, as before.
    assert!(check(&sample(base))
        .expect("no sites")
        .config
        .cluster
        .is_some_and(|c| c.site().is_none()));
    for (extra, key, says) in [
        (format!("site = \"ap-1\"\n{two}"), "cluster.site", "is not one of"),
        (two.clone(), "cluster.site", "is missing"),
        ("site = \"eu-1\"\n".to_string(), "cluster.site", "no [[cluster.sites]]"),
        (
            format!("site = \"eu-1\"\n{}{}", site("eu-1", "203.0.113.10:51820", KEY), site("eu-1", "203.0.113.11:51820", KEY)),
            "cluster.sites[1].name",
            "listed twice",
        ),
        (
            format!("site = \"eu-1\"\n{}", site("eu-1", "203.0.113.10", KEY)),
            "cluster.sites[0].endpoint",
            "not host:port",
        ),
        (
            format!("site = \"eu-1\"\n{}", site("eu-1", "203.0.113.10:51820", "short")),
            "cluster.sites[0].public_key",
            "base64",
        ),
        (
            format!("site = \"eu 1\"\n{}", site("eu 1", "203.0.113.10:51820", KEY)),
            "cluster.sites[0].name",
            "letters",
        ),
        // The issue's spelling, `[[cluster.site]]` without `site = …`: pointed at the plural.
        (
            "[[cluster.site]]\nname = \"eu-1\"\nendpoint = \"203.0.113.10:51820\"\npublic_key = \"x\"\n".to_string(),
            "cluster.site",
            "[[cluster.sites]]",
        ),
    ] {
        let e = check(&sample(&format!("{base}{extra}"))).expect_err(&extra);
        assert_eq!(e.key, key, "{extra}: {e}");
        assert!(e.reason.contains(says), "{extra}: {e}");
    }
}
