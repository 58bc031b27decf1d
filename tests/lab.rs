//! `portcullis-lab`: brings up the lab (gateway, real wireguard-go clients for alice and
//! bob, private prod and dev networks, all in network namespaces), shows the policies
//! deciding real traffic, and prints the audit trail. Tears everything down on exit.
//!
//! `--hold` keeps the lab up until Enter is pressed, to explore it with `ip netns exec`.
//! `--cluster` runs the cluster lab instead (three nodes on PostgreSQL; `lab_cluster.rs`).

// serde_json::Value indexing returns Null for missing keys; it never panics.
#![allow(clippy::indexing_slicing)]

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use portcullis_e2e::{echo_round_trip, expect_reset, Lab, LabOptions};
use serde_json::Value;

#[path = "lab_cluster.rs"]
mod lab_cluster;

fn main() {
    let result = if std::env::args().any(|a| a == "--cluster") {
        lab_cluster::run(std::env::args().any(|a| a == "--hold"))
    } else {
        run()
    };
    if let Err(e) = result {
        eprintln!("lab failed: {e:#}");
        std::process::exit(1);
    }
}

fn step(ok: bool, expect_ok: bool, what: &str) -> bool {
    let verdict = if ok { "ALLOWED" } else { "DENIED " };
    let mark = if ok == expect_ok {
        "as the policies say"
    } else {
        "UNEXPECTED"
    };
    println!("  {verdict}  {what:<58} {mark}");
    ok == expect_ok
}

fn tcp(lab: &Lab, who: &portcullis_e2e::Client, dst: &str) -> bool {
    let Ok(dst) = dst.parse::<SocketAddr>() else {
        return false;
    };
    match lab.connect(who, dst, Duration::from_secs(2)) {
        Ok(mut s) => echo_round_trip(&mut s, b"hello through portcullis").is_ok(),
        Err(_) => false,
    }
}

fn run() -> Result<()> {
    let hold = std::env::args().any(|a| a == "--hold");
    println!("Portcullis lab: starting gateway, wireguard-go clients and private networks in network namespaces…");
    // The audit store: a ClickHouse of the lab's own on a free loopback port.
    let clickhouse = portcullis_testkit::ClickHouse::start()?;
    // The node signs its chain head every 2 s with a key made for this lab.
    let keys = tempfile::tempdir()?;
    let key = keys.path().join("audit-signing.key");
    let made = std::process::Command::new(portcullis_e2e::portcullis_bin()?)
        .args(["audit", "keygen", "--out"])
        .arg(&key)
        .output()?;
    anyhow::ensure!(made.status.success(), "audit keygen: {made:?}");
    let pubkey = String::from_utf8_lossy(&made.stdout).trim().to_string();
    let opts = LabOptions {
        audit_config: format!(
            "checkpoint_key_file = \"{}\"\ncheckpoint_interval_secs = 2\n",
            key.display()
        ),
        gateway_log: std::env::var("PORTCULLIS_LOG").unwrap_or_else(|_| "info".into()),
        // dana approves access requests (sre-leads); the admin API serves the CLI.
        extra_config:
            "[[user]]\nname = \"dana\"\nemail = \"dana@example.com\"\ngroups = [\"sre-leads\"]\n\
            [http]\nlisten = \"127.0.0.1:18080\"\n[admin]\ntoken_file = \"admin.token\"\n"
                .into(),
        files: vec![(
            "admin.token".into(),
            "lab-admin-token-0123456789abcdef\n".into(),
        )],
        ..LabOptions::default()
    };
    let mut lab = Lab::start_audited(opts, &clickhouse)?;
    audit_cli(&lab, &["migrate"])?;
    println!(
        "  audit: ClickHouse {} (pid {:?}), spool in the lab dir",
        clickhouse.url(),
        clickhouse.pid()
    );
    println!();
    println!(
        "  alice  (groups: sre, tags: oncall)   tunnel 100.64.0.2 / fd00:64::2   ns {}",
        lab.alice.ns
    );
    println!(
        "  bob    (groups: developers)          tunnel 100.64.0.3 / fd00:64::3   ns {}",
        lab.bob.ns
    );
    println!(
        "  prod   10.8.0.0/16, fd00:8::/32 (server 10.8.0.2)                     ns {}",
        lab.ns_prod
    );
    println!(
        "  dev    10.9.0.0/16, fd00:9::/32 (server 10.9.0.2)                     ns {}",
        lab.ns_dev
    );
    println!(
        "  gateway: portcullis in ns {}, policies in {}",
        lab.ns_gw,
        lab.policy_dir().display()
    );
    println!();
    println!("Real traffic from stock WireGuard clients, decided per flow by Cedar policies:");
    let mut all = true;
    all &= step(
        tcp(&lab, &lab.alice, "10.8.0.2:8080"),
        true,
        "alice → prod 10.8.0.2:8080/tcp (sre-prod)",
    );
    all &= step(
        lab.ping(&lab.alice, "10.8.0.2"),
        true,
        "alice → prod 10.8.0.2 ping",
    );
    all &= step(
        tcp(&lab, &lab.alice, "[fd00:8::2]:8080"),
        true,
        "alice → prod [fd00:8::2]:8080/tcp over IPv6",
    );
    all &= step(
        tcp(&lab, &lab.alice, "10.8.0.2:23"),
        false,
        "alice → prod 10.8.0.2:23/tcp (no-telnet forbid)",
    );
    all &= step(
        tcp(&lab, &lab.bob, "10.8.0.2:8080"),
        false,
        "bob → prod 10.8.0.2:8080/tcp (no permit)",
    );
    all &= step(
        lab.ping(&lab.bob, "10.8.0.2"),
        false,
        "bob → prod 10.8.0.2 ping",
    );
    all &= step(
        tcp(&lab, &lab.bob, "10.9.0.2:443"),
        true,
        "bob → dev 10.9.0.2:443/tcp (developers-dev-staging)",
    );
    all &= step(
        tcp(&lab, &lab.bob, "10.9.0.2:8080"),
        false,
        "bob → dev 10.9.0.2:8080/tcp (port not granted)",
    );

    println!();
    println!("Just-in-time access: bob asks for prod-db for 15 s, dana (sre-leads) approves:");
    all &= jit(&lab)?;

    if hold {
        println!();
        println!(
            "Lab is up. Try: ip netns exec {} ping 10.8.0.2 — press Enter to tear down.",
            lab.alice.ns
        );
        let _ = std::io::stdin().lock().lines().next();
    }

    // Stopping the gateway closes every flow and session, so the trail is complete.
    lab.stop_gateway()?;
    println!();
    println!("Audit trail ({}):", lab.events_path().display());
    println!("  seq event            user   flow                                         policies                 detail");
    for e in lab.events() {
        println!("  {}", describe(&e));
    }
    // The same trail, queried back from ClickHouse as an auditor would.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut drained = false;
    while std::time::Instant::now() < deadline {
        let written = lab.events().len() as u64;
        let stored = clickhouse
            .count("SELECT count() FROM portcullis.events FINAL")
            .unwrap_or(0);
        if stored >= written && written > 0 {
            drained = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !drained {
        // The gateway stopped with a backlog: start it again to drain the spool.
        lab.spawn_gateway()?;
        std::thread::sleep(Duration::from_secs(3));
        lab.stop_gateway()?;
    }
    println!();
    println!("Queried back from ClickHouse — `portcullis audit query --report denied`:");
    print!(
        "{}",
        indent(&audit_cli(&lab, &["query", "--report", "denied"])?)
    );
    println!("`portcullis audit query --report who-reached --dst 10.8.0.0/16`:");
    print!(
        "{}",
        indent(&audit_cli(
            &lab,
            &["query", "--report", "who-reached", "--dst", "10.8.0.0/16"]
        )?)
    );
    println!("`portcullis audit query --report sessions`:");
    print!(
        "{}",
        indent(&audit_cli(&lab, &["query", "--report", "sessions"])?)
    );
    println!("`portcullis audit query --report access-requests`:");
    print!(
        "{}",
        indent(&audit_cli(&lab, &["query", "--report", "access-requests"])?)
    );
    println!("`portcullis audit verify` (hash chain and signed checkpoints):");
    print!(
        "{}",
        indent(&audit_cli(&lab, &["verify", "--grace-secs", "5"])?)
    );
    // An auditor's export of the denials, checked offline with the published key. The
    // newest rows are signed at the next checkpoint: retried until they are.
    let export_dir = keys.path().join("denied-export");
    let export_arg = export_dir.display().to_string();
    let mut exported = Err(anyhow::anyhow!("not tried"));
    for _ in 0..20 {
        let _ = std::fs::remove_dir_all(&export_dir);
        exported = audit_cli(
            &lab,
            &[
                "export",
                "--kind",
                "flow_denied",
                "--format",
                "csv",
                "--out",
                &export_arg,
            ],
        );
        if exported.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("`portcullis audit export --kind flow_denied --format csv --out DIR`:");
    print!("{}", indent(&exported?));
    let checked = std::process::Command::new(portcullis_e2e::portcullis_bin()?)
        .args(["audit", "verify-export", &export_arg, "--pubkey", &pubkey])
        .output()?;
    println!("`portcullis audit verify-export DIR --pubkey {pubkey}` (offline):");
    print!("{}", indent(&String::from_utf8_lossy(&checked.stdout)));
    anyhow::ensure!(checked.status.success(), "the lab's export did not verify");
    println!();
    if all {
        println!("Every decision matched the policies. Lab torn down.");
        Ok(())
    } else {
        anyhow::bail!(
            "some decisions did not match the policies; gateway log:\n{}",
            lab.gateway_log()
        )
    }
}

/// Runs `portcullis audit …` against the lab's config and returns its output.
fn cli(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = lab.cli_in_gateway_ns(args)?;
    if !out.status.success() {
        anyhow::bail!(
            "portcullis {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A request, a refused self-approval, dana's approval, bob's connection through the
/// grant, and its end resetting that connection.
fn jit(lab: &Lab) -> Result<bool> {
    let db = "10.8.5.10:5432";
    let mut all = step(
        tcp(lab, &lab.bob, db),
        false,
        "bob → prod-db 10.8.5.10:5432/tcp (no grant yet)",
    );
    let (filed, id) = lab.request_db_access("bob", "15s", "INC-4711 replica lag")?;
    println!(
        "  $ portcullis access request --user bob --network prod-db --port 5432/tcp --for 15s …"
    );
    println!("    {filed}");
    match cli(lab, &["access", "approve", &id, "--as", "bob"]) {
        Ok(_) => {
            println!("  UNEXPECTED: bob approved his own request");
            all = false;
        }
        Err(e) => println!(
            "  $ portcullis access approve {id} --as bob\n    refused: {}",
            e.to_string().rsplit(": ").next().unwrap_or_default()
        ),
    }
    println!("  $ portcullis access approve {id} --as dana");
    println!(
        "    {}",
        cli(lab, &["access", "approve", &id, "--as", "dana"])?
    );
    let started = std::time::Instant::now();
    all &= step(
        tcp(lab, &lab.bob, db),
        true,
        "bob → prod-db 10.8.5.10:5432/tcp (the grant)",
    );
    let mut conn = lab.connect(&lab.bob, db.parse()?, Duration::from_secs(2))?;
    echo_round_trip(&mut conn, b"select 1")?;
    let left = Duration::from_secs(15).saturating_sub(started.elapsed());
    match expect_reset(&mut conn, left + Duration::from_secs(3)) {
        Ok(_) => println!(
            "  the grant ended {:.1} s after the approval: bob's open connection was reset",
            started.elapsed().as_secs_f64()
        ),
        Err(e) => {
            println!("  UNEXPECTED: {e}");
            all = false;
        }
    }
    all &= step(
        tcp(lab, &lab.bob, db),
        false,
        "bob → prod-db 10.8.5.10:5432/tcp (grant over)",
    );
    Ok(all)
}

fn audit_cli(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = lab.audit(args)?;
    if !out.status.success() {
        anyhow::bail!(
            "portcullis audit {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn describe(e: &Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
    let kind = s("type");
    let flow = if e.get("dst_ip").is_some() {
        let ip = |k: &str| {
            let v = s(k);
            if v.contains(':') {
                format!("[{v}]")
            } else {
                v
            }
        };
        format!(
            "{}:{} → {}:{}/{}",
            ip("src_ip"),
            e["src_port"],
            ip("dst_ip"),
            e["dst_port"],
            s("protocol")
        )
    } else {
        String::new()
    };
    let policies = e["policy_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let detail = match kind.as_str() {
        "flow_closed" => format!(
            "{} out {}B/{}p in {}B/{}p {}ms",
            s("reason"),
            e["outbound"]["bytes"],
            e["outbound"]["packets"],
            e["inbound"]["bytes"],
            e["inbound"]["packets"],
            e["duration_ms"]
        ),
        "flow_denied" if policies.is_empty() => "no permit matched".into(),
        "flow_denied" => "forbidden".into(),
        "session_started" => format!("endpoint {}", s("endpoint")),
        "session_ended" => format!("{} after {}ms", s("reason"), e["duration_ms"]),
        "policy_loaded" => format!("{} policies, {} flows cut", e["policies"], e["flows_cut"]),
        "access_requested" => format!(
            "{} {} {} for {} s: {}",
            s("request_id"),
            s("network"),
            s("port"),
            e["duration_secs"],
            s("reason")
        ),
        "access_approved" => format!(
            "{} by {} until {}",
            s("request_id"),
            s("approver"),
            s("ends_at")
        ),
        "access_expired" | "access_revoked" | "access_denied" => s("request_id"),
        "admin_action" => format!("{} {} {}", s("actor"), s("action"), s("outcome")),
        _ => String::new(),
    };
    format!(
        "{:<3} {:<16} {:<6} {:<44} {:<24} {}",
        e["seq"],
        kind,
        s("user"),
        flow,
        policies,
        detail
    )
}
