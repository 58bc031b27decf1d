//! `portcullis-bench-revoke`: revocation latency under load, through real wireguard-go
//! tunnels. Per trial: alice has access to prod, an iperf3 stream and a ping every 2 ms
//! run through her tunnel, then her access is taken away:
//! - `scim`: `PATCH active: false` on the gateway's SCIM endpoint;
//! - `ldap`: `ldapmodify` deleting her from the sre group in a real slapd (pushed to the
//!   gateway by refreshAndPersist).
//!
//! Measured per trial, on the machine's one wall clock:
//! - end to end: from just before the request is sent (the HTTP request is written, or
//!   ldapmodify is started) to the last ping reply alice received, an upper bound on when
//!   the gateway forwarded her last packet (its resolution is the 2 ms ping interval);
//! - in the gateway: `latency_us` of its `user_revoked` / group-change audit (from the
//!   request's arrival to the applied cut).
//!
//! Run it through `scripts/bench-revocation.sh` (release build).

// Indexing a serde_json Value by key yields Null for a missing key; it never panics.
#![allow(clippy::indexing_slicing)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use portcullis_e2e::{quantile, wait_until, Lab, LabOptions};
use portcullis_testkit::{numeric_arg as arg, Slapd};

const SCIM_TOKEN: &str = "scim-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

struct Load {
    ping: Child,
    iperf: Child,
    ping_log: std::path::PathBuf,
}

/// iperf3 and a 2 ms ping from alice into prod.
fn start_load(lab: &Lab, trial: usize) -> Result<Load> {
    let ping_log = lab.dir.join(format!("ping-{trial}.log"));
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.alice.ns,
            "ping",
            "-D",
            "-n",
            "-i",
            "0.002",
            "10.8.0.2",
        ])
        .stdout(Stdio::from(std::fs::File::create(&ping_log)?))
        .stderr(Stdio::null())
        .spawn()
        .context("starting ping")?;
    let iperf = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.alice.ns,
            "iperf3",
            "-c",
            "10.8.0.2",
            "-p",
            "5201",
            "-t",
            "30",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3")?;
    // Let the load settle.
    std::thread::sleep(Duration::from_millis(700));
    Ok(Load {
        ping,
        iperf,
        ping_log,
    })
}

/// Stops the load; returns the wall time of the last ping reply.
fn stop_load(mut load: Load) -> Result<f64> {
    let _ = load.ping.kill();
    let _ = load.ping.wait();
    let _ = load.iperf.kill();
    let _ = load.iperf.wait();
    let text = std::fs::read_to_string(&load.ping_log)?;
    text.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse::<f64>().ok())
        .next_back()
        .ok_or_else(|| anyhow!("no ping reply at all in {}", load.ping_log.display()))
}

fn iperf_server(lab: &Lab) -> Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", &lab.ns_prod, "iperf3", "-s", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")
}

/// Waits until alice pings prod again (after re-granting), re-handshaking her tunnel:
/// the gateway dropped her keys with her sessions.
fn wait_for_access(lab: &Lab) -> Result<()> {
    lab.rehandshake(&lab.alice)?;
    wait_until(Duration::from_secs(30), || {
        Ok(lab.ping(&lab.alice, "10.8.0.2"))
    })
}

struct Trials {
    end_to_end_ms: Vec<f64>,
    in_gateway_ms: Vec<f64>,
}

fn report(name: &str, t: &Trials) {
    if t.in_gateway_ms.is_empty() {
        println!(
            "{name:<5} trials {:>2}  end to end (change sent -> last ping reply) p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms",
            t.end_to_end_ms.len(),
            quantile(&t.end_to_end_ms, 0.5),
            quantile(&t.end_to_end_ms, 0.99),
            quantile(&t.end_to_end_ms, 1.0),
        );
        return;
    }
    println!(
        "{name:<5} trials {:>2}  end to end (request sent -> last ping reply) p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms   in gateway p50 {:>6.2} ms  p99 {:>6.2} ms",
        t.end_to_end_ms.len(),
        quantile(&t.end_to_end_ms, 0.5),
        quantile(&t.end_to_end_ms, 0.99),
        quantile(&t.end_to_end_ms, 1.0),
        quantile(&t.in_gateway_ms, 0.5),
        quantile(&t.in_gateway_ms, 0.99),
    );
}

fn scim(trials: usize) -> Result<Trials> {
    let lab = Lab::start(LabOptions {
        alice_from_identity_source: true,
        gateway_log: "warn".into(),
        extra_config: "[http]\nlisten = \"127.0.0.1:18080\"\n[scim]\ntoken_file = \"scim.token\"\n[admin]\ntoken_file = \"admin.token\"\n".into(),
        files: vec![
            ("scim.token".into(), format!("{SCIM_TOKEN}\n")),
            ("admin.token".into(), format!("{ADMIN_TOKEN}\n")),
        ],
        ..LabOptions::default()
    })?;
    let mut server = iperf_server(&lab)?;
    let (status, user) = lab.http(
        "POST",
        "/scim/v2/Users",
        SCIM_TOKEN,
        r#"{"userName": "alice", "active": true}"#,
    )?;
    if status != 201 {
        bail!("creating alice: {status} {user}");
    }
    let id = user["id"].as_str().unwrap_or_default().to_string();
    let (status, g) = lab.http(
        "POST",
        "/scim/v2/Groups",
        SCIM_TOKEN,
        &format!(r#"{{"displayName": "sre", "members": [{{"value": "{id}"}}]}}"#),
    )?;
    if status != 201 {
        bail!("creating sre: {status} {g}");
    }
    let patch = |active: bool| {
        format!(
            r#"{{"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{{"op": "replace", "value": {{"active": {active}}}}}]}}"#
        )
    };
    let mut out = Trials {
        end_to_end_ms: Vec::new(),
        in_gateway_ms: Vec::new(),
    };
    for trial in 0..trials {
        wait_for_access(&lab)?;
        let load = start_load(&lab, trial)?;
        let sent = now_secs();
        let (status, _) = lab.http(
            "PATCH",
            &format!("/scim/v2/Users/{id}"),
            SCIM_TOKEN,
            &patch(false),
        )?;
        if status != 200 {
            bail!("deactivating: {status}");
        }
        std::thread::sleep(Duration::from_millis(300));
        let last = stop_load(load)?;
        out.end_to_end_ms.push(((last - sent) * 1000.0).max(0.0));
        let revoked = lab
            .events()
            .into_iter()
            .filter(|e| e["type"] == "user_revoked" && e["user"] == "alice")
            .nth(trial)
            .ok_or_else(|| anyhow!("no user_revoked for trial {trial}"))?;
        out.in_gateway_ms
            .push(revoked["latency_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        let (status, _) = lab.http(
            "PATCH",
            &format!("/scim/v2/Users/{id}"),
            SCIM_TOKEN,
            &patch(true),
        )?;
        if status != 200 {
            bail!("re-activating: {status}");
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    Ok(out)
}

fn ldap(trials: usize) -> Result<Trials> {
    let lab = Lab::start(LabOptions {
        alice_from_identity_source: true,
        slapd: true,
        gateway_log: "warn".into(),
        extra_config: format!(
            "[http]\nlisten = \"127.0.0.1:18080\"\n[admin]\ntoken_file = \"admin.token\"\n\
             [ldap]\nurl = \"{{ldap_url}}\"\nbind_dn = \"{}\"\npassword_file = \"ldap.pw\"\n\
             user_base = \"ou=people,dc=example,dc=org\"\ngroup_base = \"ou=groups,dc=example,dc=org\"\n",
            Slapd::ADMIN_DN
        ),
        files: vec![
            ("admin.token".into(), format!("{ADMIN_TOKEN}\n")),
            ("ldap.pw".into(), format!("{}\n", Slapd::ADMIN_PASSWORD)),
        ],
        ..LabOptions::default()
    })?;
    let mut server = iperf_server(&lab)?;
    let slapd = lab.slapd.as_ref().ok_or_else(|| anyhow!("no slapd"))?;
    slapd.modify(
        "dn: uid=alice,ou=people,dc=example,dc=org\nchangetype: add\nobjectClass: inetOrgPerson\nuid: alice\ncn: alice\nsn: a\n\n\
         dn: uid=erin,ou=people,dc=example,dc=org\nchangetype: add\nobjectClass: inetOrgPerson\nuid: erin\ncn: erin\nsn: e\n\n\
         dn: cn=sre,ou=groups,dc=example,dc=org\nchangetype: add\nobjectClass: groupOfNames\ncn: sre\nmember: uid=erin,ou=people,dc=example,dc=org\nmember: uid=alice,ou=people,dc=example,dc=org\n",
    )?;
    let member = |op: &str| {
        format!("dn: cn=sre,ou=groups,dc=example,dc=org\nchangetype: modify\n{op}: member\nmember: uid=alice,ou=people,dc=example,dc=org\n")
    };
    let mut out = Trials {
        end_to_end_ms: Vec::new(),
        in_gateway_ms: Vec::new(),
    };
    for trial in 0..trials {
        // Losing sre cuts flows but keeps the tunnel: no re-handshake needed.
        wait_until(Duration::from_secs(30), || {
            Ok(lab.ping(&lab.alice, "10.8.0.2"))
        })?;
        let load = start_load(&lab, trial)?;
        let sent = now_secs();
        slapd.modify(&member("delete"))?;
        std::thread::sleep(Duration::from_millis(500));
        let last = stop_load(load)?;
        out.end_to_end_ms.push(((last - sent) * 1000.0).max(0.0));
        slapd.modify(&member("add"))?;
    }
    // The gateway's own view: identity_changed events carry no latency; the flows' cut is
    // seen end to end only.
    let _ = server.kill();
    let _ = server.wait();
    Ok(out)
}

fn main() -> Result<()> {
    let trials = usize::try_from(arg("--trials", 20)).unwrap_or(20);
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a == "scim" || a == "ldap")
        .collect();
    let run = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if run("scim") {
        let t = scim(trials)?;
        report("scim", &t);
    }
    if run("ldap") {
        let t = ldap(trials)?;
        report("ldap", &t);
    }
    Ok(())
}
