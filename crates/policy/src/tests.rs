use super::*;
use chrono::{DateTime, Utc};
use portcullis_model::Protocol;
use portcullis_model::{FlowRequest, Principal};
use std::net::IpAddr;
use std::sync::Arc;

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn user(name: &str, groups: &[&str], tags: &[&str]) -> Principal {
    Principal {
        name: name.into(),
        email: format!("{name}@example.com"),
        groups: groups.iter().map(|s| s.to_string()).collect(),
        tags: tags.iter().map(|s| s.to_string()).collect(),
    }
}

fn req(dst: &str, port: u16, proto: Protocol) -> FlowRequest {
    FlowRequest {
        src_ip: IpAddr::from([100, 64, 0, 2]),
        dst_ip: dst.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        dst_port: port,
        protocol: proto,
        device: "dev-key".into(),
        mfa: false,
        authenticated_at: 0,
    }
}

fn engine() -> Result<Engine, Box<dyn std::error::Error>> {
    let bundle = Arc::new(PolicyBundle::load(&example_dir())?);
    Ok(Engine::new(
        bundle,
        vec![
            user("alice", &["sre"], &["oncall"]),
            user("bob", &["developers"], &[]),
            user("carol", &["sre", "pci-admins"], &["oncall"]),
            user("dave", &["sre", "pci-admins"], &[]),
            user("erin", &["contractors"], &[]),
        ],
    )?)
}

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap_or_default()
}

#[allow(clippy::type_complexity)]
#[test]
fn example_policies_decide_as_documented() -> Result<(), Box<dyn std::error::Error>> {
    let mut e = engine()?;
    let now = at("2026-11-22T10:00:00Z");
    let cases: &[(&str, &str, u16, Protocol, bool, &[&str], &str)] = &[
        (
            "alice",
            "10.8.0.2",
            8080,
            Protocol::TCP,
            true,
            &["sre-prod"],
            "prod",
        ),
        (
            "alice",
            "10.8.5.4",
            5432,
            Protocol::TCP,
            true,
            &["sre-prod"],
            "prod-db",
        ),
        (
            "alice",
            "fd00:8::2",
            8080,
            Protocol::TCP,
            true,
            &["sre-prod"],
            "prod",
        ),
        (
            "alice",
            "10.8.0.2",
            0,
            Protocol::ICMP,
            true,
            &["sre-prod"],
            "prod",
        ),
        ("bob", "10.8.0.2", 8080, Protocol::TCP, false, &[], "prod"),
        (
            "bob",
            "10.9.0.2",
            443,
            Protocol::TCP,
            true,
            &["developers-dev-staging"],
            "dev",
        ),
        ("bob", "10.9.0.2", 8080, Protocol::TCP, false, &[], "dev"),
        (
            "bob",
            "10.10.1.1",
            22,
            Protocol::TCP,
            true,
            &["developers-dev-staging"],
            "staging",
        ),
        (
            "bob",
            "10.53.0.53",
            53,
            Protocol::UDP,
            true,
            &["everyone-dns"],
            "resolver",
        ),
        (
            "bob",
            "10.53.0.53",
            53,
            Protocol::TCP,
            false,
            &[],
            "resolver",
        ),
        (
            "bob",
            "192.0.2.1",
            443,
            Protocol::TCP,
            false,
            &[],
            "internet",
        ),
        // pci: alice is sre+oncall but not pci-admin; carol is both; dave not oncall.
        (
            "alice",
            "10.8.200.9",
            443,
            Protocol::TCP,
            false,
            &["pci-oncall-admins-only"],
            "pci",
        ),
        (
            "carol",
            "10.8.200.9",
            443,
            Protocol::TCP,
            true,
            &["sre-prod"],
            "pci",
        ),
        (
            "dave",
            "10.8.200.9",
            443,
            Protocol::TCP,
            false,
            &["pci-oncall-admins-only"],
            "pci",
        ),
        // An explicit deny beats the permit.
        (
            "alice",
            "10.8.0.2",
            23,
            Protocol::TCP,
            false,
            &["no-telnet"],
            "prod",
        ),
        (
            "erin",
            "10.10.0.5",
            8443,
            Protocol::TCP,
            true,
            &["contractors-staging-2026"],
            "staging",
        ),
        ("nobody", "10.8.0.2", 22, Protocol::TCP, false, &[], "prod"),
    ];
    for (u, dst, port, proto, allowed, ids, network) in cases {
        let d = e.decide(u, &req(dst, *port, *proto), now);
        assert_eq!(d.allowed, *allowed, "{u} → {dst}:{port}/{proto}: {d:?}");
        assert_eq!(d.policy_ids, *ids, "{u} → {dst}:{port}/{proto}");
        assert_eq!(d.network, *network, "{u} → {dst}");
    }
    Ok(())
}

#[test]
fn expiring_grant_expires() -> Result<(), Box<dyn std::error::Error>> {
    let mut e = engine()?;
    let r = req("10.10.0.5", 8443, Protocol::TCP);
    assert!(e.decide("erin", &r, at("2026-12-30T23:59:59Z")).allowed);
    assert!(!e.decide("erin", &r, at("2026-12-31T00:00:00Z")).allowed);
    Ok(())
}

#[test]
fn identity_changes_bump_epoch_and_change_decisions() -> Result<(), Box<dyn std::error::Error>> {
    let mut e = engine()?;
    let now = at("2026-11-22T10:00:00Z");
    let r = req("10.8.0.2", 22, Protocol::TCP);
    let before = e.epoch();
    assert!(!e.decide("bob", &r, now).allowed);
    e.upsert_user(user("bob", &["developers", "sre"], &[]))?;
    assert!(e.epoch() > before);
    assert!(e.decide("bob", &r, now).allowed);
    e.remove_user("bob")?;
    assert!(!e.decide("bob", &r, now).allowed);
    Ok(())
}

fn write_dir(files: &[(&str, &str)]) -> Result<tempfile::TempDir, std::io::Error> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        example_dir().join(SCHEMA_FILE),
        dir.path().join(SCHEMA_FILE),
    )?;
    for (name, src) in files {
        std::fs::write(dir.path().join(name), src)?;
    }
    Ok(dir)
}

#[test]
fn syntax_errors_are_located() -> Result<(), Box<dyn std::error::Error>> {
    let dir = write_dir(&[(
        "bad.cedar",
        "// ok\npermit(principal, action, resource);\npermit(principal, action resource);\n",
    )])?;
    let err = PolicyBundle::load(dir.path())
        .err()
        .ok_or("accepted a syntax error")?;
    let first = &err.errors[0];
    assert!(first.file.ends_with("bad.cedar"));
    assert_eq!(first.line, 3, "{first}");
    assert!(first.col > 1, "{first}");
    assert!(err.to_string().contains("bad.cedar:3:"), "{err}");
    Ok(())
}

#[test]
fn schema_violations_are_rejected() -> Result<(), Box<dyn std::error::Error>> {
    for (src, line) in [
        ("\n\npermit(principal in Team::\"x\", action, resource);", 3),
        (
            "permit(principal, action, resource)\nwhen { principal.department == \"x\" };",
            2,
        ),
        (
            "permit(principal, action, resource) when { context.port == 1 };",
            1,
        ),
    ] {
        let dir = write_dir(&[("p.cedar", src)])?;
        let err = PolicyBundle::load(dir.path())
            .err()
            .ok_or(format!("accepted {src}"))?;
        assert_eq!(err.errors[0].line, line, "{}", err);
    }
    Ok(())
}

#[test]
fn duplicate_ids_and_templates_are_rejected() -> Result<(), Box<dyn std::error::Error>> {
    let dir = write_dir(&[
        (
            "a.cedar",
            "@id(\"x\")\npermit(principal, action, resource);",
        ),
        (
            "b.cedar",
            "\n@id(\"x\")\nforbid(principal, action, resource);",
        ),
    ])?;
    let err = PolicyBundle::load(dir.path())
        .err()
        .ok_or("accepted duplicate ids")?;
    assert!(
        err.to_string().contains("duplicate policy id \"x\""),
        "{err}"
    );
    assert_eq!(err.errors[0].line, 2);

    let dir = write_dir(&[(
        "t.cedar",
        "permit(principal == ?principal, action, resource);",
    )])?;
    let err = PolicyBundle::load(dir.path())
        .err()
        .ok_or("accepted a template")?;
    assert!(err.to_string().contains("templates"), "{err}");
    Ok(())
}

#[test]
fn unnamed_policies_get_file_index_ids_and_locations() -> Result<(), Box<dyn std::error::Error>> {
    let dir = write_dir(&[(
        "p.cedar",
        "// \"quoted; comment\"\npermit(principal, action, resource)\n  when { context.protocol == \"a;b\" };\n\n  forbid(principal, action, resource) when { context.dst_port == 1 };\n",
    )])?;
    let b = PolicyBundle::load(dir.path())?;
    let p0 = b.policy("p.cedar#0").ok_or("p.cedar#0 missing")?;
    assert_eq!((p0.line, p0.col, p0.effect.as_str()), (2, 1, "permit"));
    let p1 = b.policy("p.cedar#1").ok_or("p.cedar#1 missing")?;
    assert_eq!((p1.line, p1.col, p1.effect.as_str()), (5, 3, "forbid"));
    Ok(())
}

#[test]
fn oversized_and_missing_files_are_errors() -> Result<(), Box<dyn std::error::Error>> {
    let big = "// x\n".repeat((MAX_FILE_BYTES as usize / 5) + 10);
    let dir = write_dir(&[("big.cedar", &big)])?;
    let err = PolicyBundle::load(dir.path())
        .err()
        .ok_or("accepted an oversized file")?;
    assert!(err.to_string().contains("limit"), "{err}");

    let empty = tempfile::tempdir()?;
    let err = PolicyBundle::load(empty.path())
        .err()
        .ok_or("accepted a dir without schema")?;
    assert!(err.to_string().contains(SCHEMA_FILE), "{err}");
    Ok(())
}

#[test]
fn reachable_networks_cover_what_the_permits_could_allow() -> Result<(), Box<dyn std::error::Error>>
{
    let bundle = PolicyBundle::load(&example_dir())?;
    let names = |user: &str, groups: &[&str]| -> Vec<String> {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let mut n: Vec<String> = bundle
            .reachable_networks(user, &groups)
            .into_iter()
            .map(|n| n.name.clone())
            .collect();
        n.sort();
        n
    };
    // sre: prod and everything nested in it; everyone: the resolver.
    assert_eq!(
        names("alice", &["sre"]),
        ["pci", "prod", "prod-admin", "prod-db", "resolver"]
    );
    // developers: their permit names dev and staging in a condition, not in its scope;
    // conditions are not evaluated, so every network is covered.
    assert_eq!(
        names("bob", &["developers"]),
        [
            "dev",
            "pci",
            "prod",
            "prod-admin",
            "prod-db",
            "resolver",
            "staging"
        ]
    );
    assert_eq!(names("nobody", &[]), ["resolver"]);
    Ok(())
}

mod hardening;

/// "prod-admin needs a second factor from the last 12 hours": decided per device and per
/// second, on both paths, never from a cached answer that has gone stale.
#[test]
fn a_second_factor_and_its_age_decide_and_the_cache_never_serves_a_stale_age(
) -> Result<(), Box<dyn std::error::Error>> {
    let mut e = engine()?;
    let now = at("2026-11-22T10:00:00Z");
    let signed_on = now.timestamp() - 3600;
    let with = |mfa: bool, authenticated_at: i64| FlowRequest {
        mfa,
        authenticated_at,
        ..req("10.8.100.5", 22, Protocol::TCP)
    };
    let check = |e: &mut Engine, r: &FlowRequest, at: DateTime<Utc>| {
        let fast = e.decide("alice", r, at);
        assert_eq!(*fast, e.decide_plain("alice", r, at), "{r:?} at {at}");
        fast
    };
    let d = check(&mut e, &with(true, signed_on), now);
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.policy_ids, ["sre-prod"]);
    assert_eq!(d.network, "prod-admin");
    // The same user, network and port, another device without a second factor.
    let d = check(&mut e, &with(false, signed_on), now);
    assert!(!d.allowed);
    assert_eq!(d.policy_ids, ["prod-admin-needs-recent-mfa"]);
    // The first device again, 11 h later: the sign-on is 12 h old, one second short.
    let later = now + chrono::TimeDelta::seconds(11 * 3600 - 1);
    assert!(check(&mut e, &with(true, signed_on), later).allowed);
    let too_late = later + chrono::TimeDelta::seconds(1);
    let d = check(&mut e, &with(true, signed_on), too_late);
    assert!(!d.allowed, "a stale auth age: {d:?}");
    // Never signed on (static peers) and a sign-on "in the future" (clock skew: age 0).
    assert!(!check(&mut e, &with(true, 0), now).allowed);
    assert!(check(&mut e, &with(true, now.timestamp() + 30), now).allowed);
    assert_eq!(e.stats.cache_hits, 0, "{:?}", e.stats);
    Ok(())
}

#[test]
fn a_permit_for_every_action_is_warned_about_and_approves_too(
) -> Result<(), Box<dyn std::error::Error>> {
    let schema = std::fs::read_to_string(example_dir().join("schema.cedarschema"))?;
    let dir = write_dir(&[
        ("schema.cedarschema", &schema),
        (
            "p.cedar",
            "@id(\"ops-all\")\npermit (principal in Group::\"ops\", action, resource);\n\
             @id(\"no-telnet\")\nforbid (principal, action, resource) when { context.dst_port == 23 };\n",
        ),
    ])?;
    let bundle = PolicyBundle::load(dir.path())?;
    assert!(
        bundle
            .warnings
            .iter()
            .any(|w| w.message.contains("ops-all permits every action")),
        "{:?}",
        bundle.warnings
    );
    let approver = user("olga", &["ops"], &[]);
    let requester = user("bob", &["developers"], &[]);
    let ask = |port| crate::approval::Ask {
        requester: &requester,
        network: "internet",
        dst: None,
        port,
        duration_secs: 60,
        sign_on: portcullis_model::SignOn::default(),
    };
    let now = at("2026-11-22T10:00:00Z");
    let d = crate::approval::may_approve(&bundle, &approver, &ask(None), now);
    assert!(d.allowed && d.policy_ids == ["ops-all"], "{d:?}");
    // A forbid for every action sees the grant asked for in connect's terms.
    let d = crate::approval::may_approve(&bundle, &approver, &ask(Some((23, Protocol::TCP))), now);
    assert!(!d.allowed && d.policy_ids == ["no-telnet"], "{d:?}");
    // Never for oneself, even as the approver's permit would allow: that is the
    // caller's rule (portcullis-access), so here the policies alone answer.
    let d = crate::approval::may_approve(&bundle, &requester, &ask(None), now);
    assert!(!d.allowed, "{d:?}");
    Ok(())
}
