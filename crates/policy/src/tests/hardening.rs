//! Hostile or careless policy directories: refused with located errors, never a crash,
//! never a forbid that silently stops applying.

use super::*;
use std::time::{Duration, Instant};

fn sources(schema: &str, policy: &str, networks: Option<&str>) -> Sources {
    Sources {
        dir: PathBuf::from("d"),
        schema: (PathBuf::from("schema.cedarschema"), schema.to_string()),
        networks: networks.map(|n| (PathBuf::from("networks.toml"), n.to_string())),
        policies: vec![(PathBuf::from("p.cedar"), policy.to_string())],
    }
}

fn schema() -> String {
    std::fs::read_to_string(example_dir().join(SCHEMA_FILE)).unwrap_or_default()
}

fn networks() -> String {
    std::fs::read_to_string(example_dir().join(NETWORKS_FILE)).unwrap_or_default()
}

/// Builds on a 2 MiB thread (what tokio's blocking pool gives) and times it.
fn build_small_stack(s: Sources) -> (Result<PolicyBundle, LoadError>, Duration) {
    let t = Instant::now();
    let r = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || PolicyBundle::from_sources(s))
        .map(|h| h.join());
    match r {
        Ok(Ok(r)) => (r, t.elapsed()),
        _ => (
            Err(LoadError {
                errors: vec![SourceError::file(Path::new("?"), "thread failed".into())],
            }),
            t.elapsed(),
        ),
    }
}

fn refused_with(s: Sources, what: &str) {
    let (r, took) = build_small_stack(s);
    match r {
        Ok(_) => panic!("accepted (wanted {what})"),
        Err(e) => {
            assert!(e.to_string().contains(what), "{what}: {e}");
            assert!(e.errors.iter().all(|e| e.line > 0), "unlocated: {e}");
        }
    }
    assert!(took < Duration::from_secs(5), "{what}: took {took:?}");
}

const HEAD: &str = "@id(\"x\")\nforbid(principal, action, resource) when {";

#[test]
fn deep_nesting_is_a_located_error_not_a_stack_overflow() {
    let s = schema();
    for n in [145, 1_000, 100_000] {
        let p = format!("{HEAD} {}true{} }};", "(".repeat(n), ")".repeat(n));
        refused_with(sources(&s, &p, None), "nesting deeper than");
    }
    for (n, term) in [
        (3_305, "context.dst_port == 1 || "),
        (100_000, "true||"),
        (100_000, "1 + "),
        (50_000, "principal.tags."),
    ] {
        let p = format!("{HEAD} {}true }};", term.repeat(n));
        refused_with(sources(&s, &p, None), "chained operators");
    }
    let deep_schema = format!(
        "{s}\nentity Deep {{ x: {}Long{} }};",
        "Set<".repeat(2_000),
        ">".repeat(2_000)
    );
    refused_with(sources(&deep_schema, "", None), "nesting deeper than");
}

#[test]
fn a_chain_too_deep_to_evaluate_is_refused_at_validation() {
    // ~1,930 terms errored on every evaluation ("recursion limit reached"), and Cedar
    // skipped the forbid. Under the lexical cap but over the depth cap: refused.
    let blocklist: Vec<String> = (0..300)
        .map(|i| {
            format!(
                "context.dst_ip.isInRange(ip(\"10.8.{}.{}/32\"))",
                i / 250,
                i % 250
            )
        })
        .collect();
    let p = format!(
        "@id(\"big-forbid\")\nforbid(principal, action, resource) when {{ {} }};",
        blocklist.join(" || ")
    );
    refused_with(sources(&schema(), &p, None), "\"big-forbid\" nests");
}

#[test]
fn the_deepest_accepted_policy_evaluates_on_a_small_stack() -> Result<(), Box<dyn std::error::Error>>
{
    // The longest `||` chain that passes validation must evaluate without Cedar's
    // recursion error, in a debug build, on a 2 MiB stack.
    let mut terms = 1;
    let mut last_ok = None;
    while terms < 400 {
        let chain = vec!["context.dst_port == 9999"; terms].join(" || ");
        let p = format!("@id(\"deep\")\nforbid(principal, action, resource) when {{ {chain} || context.dst_port == 23 }};\npermit(principal, action, resource);");
        match PolicyBundle::from_sources(sources(&schema(), &p, None)) {
            Ok(b) => last_ok = Some(b),
            Err(_) => break,
        }
        terms += 7;
    }
    let bundle = Arc::new(last_ok.ok_or("nothing validated")?);
    assert!(
        terms > 50,
        "the cap refuses ordinary policies ({terms} terms)"
    );
    let decision = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || -> Result<portcullis_model::Decision, String> {
            let mut e = Engine::new(bundle, vec![user("alice", &["sre"], &[])])
                .map_err(|e| e.to_string())?;
            let d = e.decide(
                "alice",
                &req("10.8.0.2", 23, Protocol::TCP),
                at("2026-11-22T10:00:00Z"),
            );
            Ok((*d).clone())
        })?
        .join()
        .map_err(|_| "evaluation thread died")??;
    assert!(!decision.allowed, "{decision:?}");
    assert!(decision.errors.is_empty(), "{decision:?}");
    assert_eq!(decision.policy_ids, vec!["deep".to_string()]);
    Ok(())
}

#[test]
fn a_forbid_that_errors_denies_where_plain_cedar_would_allow(
) -> Result<(), Box<dyn std::error::Error>> {
    // Overflow: validates, errors at run time for any port above 1.
    let p = "@id(\"open\")\npermit(principal, action, resource);\n@id(\"overflow-forbid\")\nforbid(principal, action, resource) when { context.dst_port * 4611686018427387904 < 0 };";
    let bundle = Arc::new(PolicyBundle::from_sources(sources(
        &schema(),
        p,
        Some(&networks()),
    ))?);
    // What Cedar itself answers: Allow (the erroring forbid is skipped).
    let raw = cedar_policy::Authorizer::new().is_authorized(
        &cedar_policy::Request::new(
            uid("User", "alice"),
            uid("Action", "connect"),
            uid("Network", "prod"),
            cedar_policy::Context::from_pairs([
                ("dst_port".to_string(), RestrictedExpression::new_long(443)),
                (
                    "dst_ip".to_string(),
                    RestrictedExpression::new_ip("10.8.0.2"),
                ),
                (
                    "src_ip".to_string(),
                    RestrictedExpression::new_ip("100.64.0.2"),
                ),
                (
                    "protocol".to_string(),
                    RestrictedExpression::new_string("tcp".into()),
                ),
                (
                    "device".to_string(),
                    RestrictedExpression::new_string("d".into()),
                ),
                (
                    "now".to_string(),
                    RestrictedExpression::new_datetime("2026-11-22T10:00:00Z"),
                ),
            ])?,
            None,
        )?,
        bundle.policy_set(),
        &cedar_policy::Entities::empty(),
    );
    assert_eq!(raw.decision(), cedar_policy::Decision::Allow);
    assert_eq!(raw.diagnostics().errors().count(), 1);
    let mut e = Engine::new(bundle, vec![user("alice", &["sre"], &[])])?;
    let now = at("2026-11-22T10:00:00Z");
    let r = req("10.8.0.2", 443, Protocol::TCP);
    let fast = e.decide("alice", &r, now);
    let plain = e.decide_plain("alice", &r, now);
    assert_eq!(*fast, plain);
    assert!(!fast.allowed);
    assert_eq!(fast.policy_ids, vec!["overflow-forbid".to_string()]);
    assert!(
        fast.errors.iter().any(|e| e.contains("overflow-forbid")),
        "{fast:?}"
    );
    assert_eq!(e.stats.policy_errors, 1);
    // Port 1 does not overflow: the forbid is simply not satisfied.
    let ok = e.decide("alice", &req("10.8.0.2", 1, Protocol::TCP), now);
    assert!(ok.allowed && ok.errors.is_empty(), "{ok:?}");
    Ok(())
}

#[test]
fn ipv4_mapped_destinations_decide_as_their_ipv4_address() -> Result<(), Box<dyn std::error::Error>>
{
    let mut e = engine()?;
    let now = at("2026-11-22T10:00:00Z");
    let mapped = req("::ffff:10.8.200.9", 443, Protocol::TCP);
    let v4 = req("10.8.200.9", 443, Protocol::TCP);
    assert_eq!(e.bundle().networks().resolve(mapped.dst_ip), "pci");
    for u in ["alice", "carol", "bob"] {
        let fast = e.decide(u, &mapped, now);
        let plain = e.decide_plain(u, &mapped, now);
        assert_eq!(*fast, plain, "{u}");
        assert_eq!(plain, e.decide_plain(u, &v4, now), "{u}");
        assert!(plain.errors.is_empty(), "{u}: {plain:?}");
        assert_eq!(plain.network, "pci");
    }
    Ok(())
}

#[test]
fn large_networks_files_check_in_near_linear_time() {
    let file = Path::new("networks.toml");
    // A 4,000-network parent chain took 19 s: now refused at once for its depth.
    let mut chain = String::new();
    for i in 0..4_000 {
        let parent = if i == 0 {
            String::new()
        } else {
            format!("parent = \"n{}\"\n", i - 1)
        };
        chain.push_str(&format!(
            "[[network]]\nname = \"n{i}\"\n{parent}cidrs = [\"10.{}.{}.0/24\"]\n",
            i / 250,
            i % 250
        ));
    }
    let t = Instant::now();
    let r = Networks::parse(file, &chain);
    assert!(r
        .as_ref()
        .err()
        .is_some_and(|e| e.iter().any(|e| e.message.contains("deeper than 32"))));
    assert!(
        r.as_ref().err().is_some_and(|e| e.len() <= 101),
        "errors are capped"
    );
    println!("4,000-network parent chain: refused in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // 60,000 CIDRs in one network took 16.6 s.
    let cidrs: Vec<String> = (0..60_000)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
        .collect();
    let wide = format!(
        "[[network]]\nname = \"wide\"\ncidrs = [{}]\n",
        cidrs.join(", ")
    );
    let t = Instant::now();
    let n = Networks::parse(file, &wide);
    assert!(
        n.is_ok(),
        "{:?}",
        n.err().map(|e| e.first().map(|e| e.to_string()))
    );
    println!("60,000 CIDRs in one network: checked in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // And 10,000 flat networks with a nested child each.
    let mut many = String::new();
    for i in 0..5_000 {
        many.push_str(&format!("[[network]]\nname = \"a{i}\"\ncidrs = [\"10.{}.{}.0/24\"]\n[[network]]\nname = \"b{i}\"\nparent = \"a{i}\"\ncidrs = [\"10.{}.{}.128/25\"]\n", i / 256, i % 256, i / 256, i % 256));
    }
    let t = Instant::now();
    assert!(Networks::parse(file, &many).is_ok());
    println!(
        "10,000 networks, 5,000 of them nested: checked in {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn an_overlap_points_at_the_network_declared_later() {
    let src = "[[network]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n\n[[network]]\nname = \"b\"\ncidrs = [\"10.1.0.0/16\"]\n";
    let e = Networks::parse(Path::new("networks.toml"), src)
        .err()
        .unwrap_or_default();
    assert_eq!(e.first().map(|e| e.line), Some(7), "{e:?}");
    assert!(
        e.first()
            .is_some_and(|e| e.message.starts_with("cidr 10.1.0.0/16 of network \"b\"")),
        "{e:?}"
    );
    // The larger prefix declared later: still the later one.
    let src = "[[network]]\nname = \"b\"\ncidrs = [\"10.1.0.0/16\"]\n\n[[network]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n";
    let e = Networks::parse(Path::new("networks.toml"), src)
        .err()
        .unwrap_or_default();
    assert_eq!(e.first().map(|e| e.line), Some(7), "{e:?}");
    // Siblings under one parent, nested in each other: still an overlap.
    let src = "[[network]]\nname = \"p\"\ncidrs = [\"10.0.0.0/8\"]\n[[network]]\nname = \"x\"\nparent = \"p\"\ncidrs = [\"10.1.0.0/16\"]\n[[network]]\nname = \"y\"\nparent = \"p\"\ncidrs = [\"10.1.2.0/24\"]\n";
    assert!(Networks::parse(Path::new("networks.toml"), src).is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Policy text from a grammar-shaped alphabet: an error or a bundle, never a crash,
    /// never slow.
    #[test]
    fn policy_text_never_crashes(parts in proptest::collection::vec(proptest::sample::select(vec![
        "(", ")", "[", "]", "{", "}", "||", "&&", "!", "-", "+", "*", ".", "contains(", "true", "1", "\"s\"",
        "context.dst_port", "principal", "resource", "==", "<", "if ", " then ", " else ", "permit(principal, action, resource) when {", "};", ";", " ",
        "ip(\"10.0.0.0/8\")", ".isInRange(", "has", "like", "is", "in", "@id(\"a\")", "forbid(principal, action, resource) unless {",
    ]), 0..400), repeat in 1usize..300) {
        let body: String = parts.concat();
        let text = body.repeat(repeat.min(40_000 / (body.len() + 1) + 1));
        let (_, took) = build_small_stack(sources(&schema(), &text, None));
        proptest::prop_assert!(took < Duration::from_secs(5), "took {:?}", took);
    }

    #[test]
    fn schema_text_never_crashes(parts in proptest::collection::vec(proptest::sample::select(vec![
        "entity ", "A", "B", " in ", "[", "]", "{", "}", "Set<", ">", "Long", "String", ":", ",", ";", "action ", "\"a\"",
        " appliesTo ", "principal", "resource", "context", "namespace ", "type ", "=", "?", " ",
    ]), 0..400), repeat in 1usize..200) {
        let body: String = parts.concat();
        let text = body.repeat(repeat);
        let (_, took) = build_small_stack(sources(&text, "", None));
        proptest::prop_assert!(took < Duration::from_secs(5), "took {:?}", took);
    }

    #[test]
    fn networks_text_never_crashes(entries in proptest::collection::vec((0u8..40, proptest::option::of(0u8..40), proptest::collection::vec((0u8..4, 0u8..255, 8u8..33), 0..6)), 0..300)) {
        let mut text = String::new();
        for (name, parent, cidrs) in &entries {
            text.push_str(&format!("[[network]]\nname = \"n{name}\"\n"));
            if let Some(p) = parent {
                text.push_str(&format!("parent = \"n{p}\"\n"));
            }
            let c: Vec<String> = cidrs.iter().map(|(a, b, len)| format!("\"10.{a}.{b}.0/{len}\"")).collect();
            text.push_str(&format!("cidrs = [{}]\n", c.join(", ")));
        }
        let t = Instant::now();
        let r = Networks::parse(Path::new("networks.toml"), &text);
        proptest::prop_assert!(t.elapsed() < Duration::from_secs(2));
        if let Ok(n) = r {
            // Whatever was accepted resolves each declared network's own addresses to it
            // or to a descendant.
            for (i, net) in n.iter().enumerate().take(20) {
                for c in &net.cidrs {
                    let got = n.resolve_index(c.addr());
                    proptest::prop_assert!(got.is_some_and(|g| g == i || n.ancestor_indices(g).contains(&i)));
                }
            }
        }
    }
}

#[test]
fn deeply_nested_toml_is_an_error_not_a_crash() {
    for n in [1_000usize, 100_000] {
        let src = format!(
            "[[network]]\nname = \"a\"\ncidrs = {}{}\n",
            "[".repeat(n),
            "]".repeat(n)
        );
        let r = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || Networks::parse(Path::new("networks.toml"), &src).is_err())
            .map(|h| h.join());
        assert!(matches!(r, Ok(Ok(true))), "{n} nested arrays");
    }
}
