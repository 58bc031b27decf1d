//! `portcullis-bench-console`: the console's audit search on a large trail, through the
//! console's own route, signed in through the real IdP.
//!
//! Starts ClickHouse and a gateway with `[console]`, generates `--rows` events (default
//! 10,000,000: 5,000 users, one in ten flows denied, a week of time) inside ClickHouse
//! with `INSERT … SELECT FROM numbers()`, then an auditor signs in (SimpleSAMLphp) and
//! asks the first page of one user's denied flows (user40: 2,000 of them), then of one
//! destination /24's, `--queries` times each (default 20), one after another. Reported: p50 and p99 of the page's wall time, the rows shown, and
//! the insert time. Run it through `scripts/bench-console.sh` (release build).

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use portcullis_e2e::{quantile, repo_root, Lab, LabOptions, SIGN_ON_CONFIG};
use portcullis_testkit::numeric_arg as arg;

fn main() -> Result<()> {
    let rows = arg("--rows", 10_000_000);
    let queries = arg("--queries", 20);
    let ch = portcullis_testkit::ClickHouse::start()?;
    let lab = Lab::start_audited(
        LabOptions {
            extra_config: format!("{SIGN_ON_CONFIG}[console]\nauditor_groups = [\"audit\"]\n"),
            saml_idp: true,
            gateway_log: "warn".into(),
            ..LabOptions::default()
        },
        &ch,
    )?;
    let out = lab.audit(&["migrate"])?;
    if !out.status.success() {
        bail!("migrate: {}", String::from_utf8_lossy(&out.stderr));
    }
    let started = Instant::now();
    ch.query(&format!(
        "INSERT INTO portcullis.events \
         (event_id, gateway, seq, time, time_us, v, kind, user, device, session_id, protocol, \
          src_ip, src_port, dst_ip, dst_addr, dst_port, network, decision) \
         SELECT generateUUIDv4(), 'bench-gw', number + 1, \
                toDateTime(toUInt32(now()) - 604800 + intDiv(number * 604800, {rows})), \
                (toUInt64(toUInt32(now()) - 604800) * 1000000) + intDiv(number * 604800000000, {rows}), \
                1, if(number % 10 = 0, 'flow_denied', 'flow_opened'), \
                concat('user', toString(number % 5000)), 'laptop', 1 + number % 50000, 'tcp', \
                '100.64.0.9', toUInt16(1024 + number % 60000), \
                concat('10.8.', toString(number % 250), '.', toString(number % 200)), \
                IPv4ToIPv6(IPv4StringToNum(concat('10.8.', toString(number % 250), '.', toString(number % 200)))), \
                443, 'prod', \
                if(number % 10 = 0, 'deny', 'allow') \
         FROM numbers({rows})"
    ))
    .context("generating the rows")?;
    let insert = started.elapsed();
    let stored = ch.count("SELECT count() FROM portcullis.events")?;
    println!(
        "rows: {stored} (generated in {:.1} s)",
        insert.as_secs_f64()
    );
    // One user's denies (the events table is ordered by user), and a destination's
    // (the destination index table).
    for path in [
        "/console/audit?user=user40&decision=deny",
        "/console/audit?dst=10.8.40.0/24&decision=deny",
    ] {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.ns_gw, "python3"])
            .arg(repo_root().join("tests/clients/console_bench.py"))
            .args([
                "http://127.0.0.1:18080",
                "audrey",
                "audrey-password",
                path,
                &queries.to_string(),
            ])
            .output()
            .context("running console_bench.py")?;
        if !out.status.success() {
            bail!("console_bench.py: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let ms: Vec<f64> = v
            .get("ms")
            .and_then(|m| m.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        println!(
            "console audit search, first page of {path} over {stored} rows: {} queries, p50 {:.0} ms, p99 {:.0} ms, first {:.0} ms; rows shown {}",
            ms.len(),
            quantile(&ms, 0.5),
            quantile(&ms, 0.99),
            ms.first().copied().unwrap_or(0.0),
            v.get("rows").cloned().unwrap_or_default(),
        );
    }
    Ok(())
}
