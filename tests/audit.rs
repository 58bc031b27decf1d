//! End to end: the audit trail from real tunnel traffic into a real ClickHouse (Debian's
//! 18.16, started per test), through crashes and outages, and back out through the
//! auditor CLI. Needs root (network namespaces).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use portcullis_e2e::{echo_round_trip, in_ns, wait_until, Lab, LabOptions};
use portcullis_testkit::ClickHouse;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn audit_lab(ch: &ClickHouse) -> Lab {
    Lab::start_audited(LabOptions::default(), ch).expect("lab starts")
}

/// Runs `portcullis audit …` with the lab's config; returns (success, stdout).
fn audit_cli(lab: &Lab, args: &[&str]) -> (bool, String) {
    let out = lab.audit(args).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        eprintln!("audit {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), stdout)
}

/// `N signed checkpoints verified; …` in `audit verify`'s output → N.
fn checkpoints_verified(out: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.split_once(" signed checkpoints verified")?.0.parse().ok())
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    wait_until(timeout, || Ok(f())).unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
}

fn count(ch: &ClickHouse, sql: &str) -> u64 {
    ch.count(sql).unwrap_or(0)
}

/// Event ids and sequence numbers the gateway acknowledged as written (its events file).
fn acknowledged(lab: &Lab) -> (HashSet<String>, u64) {
    let text = std::fs::read_to_string(lab.events_path()).unwrap_or_default();
    let mut ids = HashSet::new();
    let mut max_seq = 0;
    for line in text.lines() {
        // A line torn by SIGKILL is not an acknowledgement.
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            ids.insert(v["id"].as_str().unwrap().to_string());
            max_seq = max_seq.max(v["seq"].as_u64().unwrap());
        }
    }
    (ids, max_seq)
}

fn clickhouse_ids(ch: &ClickHouse) -> HashSet<String> {
    ch.query("SELECT DISTINCT toString(event_id) FROM portcullis.events")
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn traffic_lands_as_rows_and_auditors_can_query_and_verify_it() {
    let ch = ClickHouse::start().unwrap();
    let mut lab = audit_lab(&ch);
    let (ok, out) = audit_cli(&lab, &["migrate"]);
    assert!(ok, "{out}");
    // alice (sre) moves 4 MiB through prod; bob (developers) is denied prod.
    let data: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    // Segments each side retransmitted during the transfer: they crossed the gateway
    // and are counted, so they are measured rather than guessed.
    let retrans = |ns: &str| -> f64 {
        let out = portcullis_e2e::sh_in(ns, &["nstat", "-asz", "TcpRetransSegs"]).unwrap();
        out.lines()
            .find_map(|l| l.strip_prefix("TcpRetransSegs"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let before = (retrans(&lab.alice.ns), retrans(&lab.ns_prod));
    let mut s = lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(5))
        .unwrap();
    assert!(echo_round_trip(&mut s, &data).unwrap() == data);
    drop(s);
    let retransmitted = [
        retrans(&lab.alice.ns) - before.0,
        retrans(&lab.ns_prod) - before.1,
    ];
    assert!(lab
        .connect(&lab.bob, addr("10.8.0.2:8080"), Duration::from_secs(2))
        .is_err());
    // SIGTERM closes flows and sessions into the trail and drains the uploader.
    lab.stop_gateway().unwrap();
    wait(
        "alice's closed flow in clickhouse",
        Duration::from_secs(30),
        || {
            count(&ch, "SELECT count() FROM portcullis.events FINAL WHERE kind = 'flow_closed' AND user = 'alice' AND dst_port = 8080") == 1
        },
    );
    let row = ch
        .query("SELECT decision, arrayStringConcat(policy_ids, ','), network, has(groups, 'sre'), bytes_out, packets_out, bytes_in, packets_in FROM portcullis.events FINAL WHERE kind = 'flow_closed' AND user = 'alice' AND dst_port = 8080")
        .unwrap();
    let f: Vec<&str> = row.trim().split('\t').collect();
    assert_eq!(&f[..4], ["allow", "sre-prod", "prod", "1"]);
    // Counters are IP bytes: payload plus 52 bytes of IPv4 + TCP (with timestamps) per
    // packet, pure ACKs included. Take the headers off and compare with what was sent
    // (retransmitted segments included: they did cross the gateway).
    let sent = data.len() as f64;
    // Largest segment payload through the tunnel: MTU 1420 less IPv4 and TCP headers.
    const MSS: f64 = 1420.0 - 52.0;
    for ((bytes, packets), resent) in [(f[4], f[5]), (f[6], f[7])].into_iter().zip(retransmitted) {
        let (b, p): (f64, f64) = (bytes.parse().unwrap(), packets.parse().unwrap());
        let payload = b - 52.0 * p;
        // Header options beyond the 52 bytes (SACK blocks) stay within the 15%;
        // retransmitted segments come on top, at most a full segment each.
        assert!(
            payload >= sent && payload <= sent * 1.15 + resent * MSS,
            "counted {b} bytes in {p} packets ({payload} payload) for {sent} sent, {resent} segments retransmitted"
        );
    }
    wait("bob's denial", Duration::from_secs(10), || {
        count(&ch, "SELECT count() FROM portcullis.events FINAL WHERE kind = 'flow_denied' AND user = 'bob' AND dst_ip = '10.8.0.2' AND decision = 'deny' AND network = 'prod'") >= 1
    });
    assert_eq!(
        count(&ch, "SELECT count() FROM portcullis.events FINAL WHERE kind IN ('session_started', 'session_ended') AND user = 'alice'"),
        2
    );
    // The canned reports and filters, as an auditor runs them.
    let (ok, denied) = audit_cli(&lab, &["query", "--report", "denied", "--json"]);
    assert!(ok);
    let denied: serde_json::Value = serde_json::from_str(&denied).unwrap();
    assert!(
        denied["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r[0] == "bob" && r[2] == "10.8.0.2"),
        "{denied}"
    );
    let (ok, reached) = audit_cli(
        &lab,
        &[
            "query",
            "--report",
            "who-reached",
            "--dst",
            "10.8.0.0/16",
            "--since",
            "1h",
        ],
    );
    assert!(ok);
    assert!(
        reached.contains("alice") && !reached.contains("bob"),
        "{reached}"
    );
    let (ok, listing) = audit_cli(
        &lab,
        &[
            "query",
            "--group",
            "sre",
            "--port",
            "8080",
            "--decision",
            "allow",
        ],
    );
    assert!(ok);
    assert!(
        listing.contains("flow_opened") && listing.contains("flow_closed"),
        "{listing}"
    );
    assert!(!listing.contains("bob"), "{listing}");
    let (ok, talkers) = audit_cli(&lab, &["query", "--report", "top-talkers"]);
    assert!(
        ok && talkers.lines().nth(1).unwrap_or("").starts_with("alice"),
        "{talkers}"
    );
    let (ok, sessions) = audit_cli(&lab, &["query", "--report", "sessions", "--user", "alice"]);
    assert!(ok && sessions.contains("alice"), "{sessions}");

    // The chain verifies, then detects an edited and a deleted row.
    let (ok, out) = audit_cli(&lab, &["verify", "--since", "1h"]);
    assert!(ok, "intact trail must verify: {out}");
    // Bounds outside ClickHouse's DateTime are clamped, not wrapped: before 1970 means
    // from the beginning, after 2106 means to the end.
    let (ok, early) = audit_cli(
        &lab,
        &[
            "verify",
            "--since",
            "1969-12-31T23:59:59Z",
            "--until",
            "2200-01-01T00:00:00Z",
        ],
    );
    assert!(
        ok && early.contains(out.lines().last().unwrap_or("-")),
        "{early}
vs
{out}"
    );
    let (ok, rows) = audit_cli(
        &lab,
        &["query", "--since", "1969-12-31T23:59:59Z", "--json"],
    );
    assert!(ok && rows.contains("alice"), "{rows}");
    // A range with no rows verifies nothing, and says so with a failing exit.
    let (ok, none) = audit_cli(&lab, &["verify", "--since", "2200-01-01T00:00:00Z"]);
    assert!(!ok && none.contains("nothing was verified"), "{none}");
    ch.query("ALTER TABLE portcullis.events UPDATE bytes_in = 1 WHERE kind = 'flow_closed' AND user = 'alice'").unwrap();
    wait("edit applied", Duration::from_secs(10), || {
        count(
            &ch,
            "SELECT count() FROM portcullis.events WHERE bytes_in = 1",
        ) == 1
    });
    let (ok, out) = audit_cli(&lab, &["verify", "--json"]);
    assert!(!ok, "an edited row must fail verification");
    assert!(out.contains("\"altered\""), "{out}");
    ch.query("ALTER TABLE portcullis.events UPDATE bytes_in = bytes_out WHERE bytes_in = 1")
        .unwrap();
    let victim = count(&ch, "SELECT min(seq) + 2 FROM portcullis.events");
    ch.query(&format!(
        "ALTER TABLE portcullis.events DELETE WHERE seq = {victim}"
    ))
    .unwrap();
    wait("delete applied", Duration::from_secs(10), || {
        count(
            &ch,
            &format!("SELECT count() FROM portcullis.events WHERE seq = {victim}"),
        ) == 0
    });
    let (ok, out) = audit_cli(&lab, &["verify", "--json"]);
    assert!(!ok);
    assert!(
        out.contains("\"finding\": \"gap\"") && out.contains(&format!("\"next\": {}", victim + 1)),
        "{out}"
    );
}

/// Sends UDP from bob to prod from a fresh source port every few ms: every datagram is a
/// new tuple, so a new decision and a `flow_denied` event.
fn event_stream(lab: &Lab, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let ns = lab.bob.ns.clone();
    std::thread::spawn(move || {
        let _ = in_ns(&ns, move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = UdpSocket::bind("0.0.0.0:0") {
                    let _ = s.send_to(b"x", "10.8.0.2:9000");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
    })
}

#[test]
fn kill_9_ten_times_loses_nothing_and_doubles_nothing() {
    let ch = ClickHouse::start().unwrap();
    // The node signs its chain head every second: each restart continues the signed
    // interval the killed process left open.
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("audit-signing.key");
    let out = std::process::Command::new(portcullis_e2e::portcullis_bin().unwrap())
        .args(["audit", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pubkey = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(pubkey.starts_with("ed25519:"), "{pubkey}");
    let mut lab = Lab::start_audited(
        LabOptions {
            audit_config: format!(
                "checkpoint_key_file = \"{}\"\ncheckpoint_interval_secs = 1\n",
                key.display()
            ),
            ..LabOptions::default()
        },
        &ch,
    )
    .expect("lab starts");
    assert!(audit_cli(&lab, &["migrate"]).0);
    let stop = Arc::new(AtomicBool::new(false));
    let stream = event_stream(&lab, stop.clone());
    for i in 0..10u64 {
        std::thread::sleep(Duration::from_millis(500 + 61 * i));
        lab.kill_gateway().unwrap();
        lab.spawn_gateway().unwrap();
        lab.rehandshake(&lab.bob).unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    lab.stop_gateway().unwrap();
    // Drain whatever the last run left in the spool.
    lab.spawn_gateway().unwrap();
    let (ids, max_seq) = acknowledged(&lab);
    assert!(ids.len() > 1000, "only {} events in the stream", ids.len());
    wait("everything uploaded", Duration::from_secs(60), || {
        count(&ch, "SELECT count() FROM portcullis.events FINAL") >= max_seq
    });
    lab.stop_gateway().unwrap();
    let total = count(&ch, "SELECT count() FROM portcullis.events FINAL");
    let top = count(&ch, "SELECT max(seq) FROM portcullis.events");
    // No gap: every sequence number up to the highest exists once.
    assert_eq!(count(&ch, "SELECT min(seq) FROM portcullis.events"), 1);
    assert_eq!(total, top, "rows {total}, highest seq {top}");
    assert_eq!(
        count(&ch, "SELECT uniqExact(event_id) FROM portcullis.events"),
        total
    );
    assert_eq!(
        count(&ch, "SELECT uniqExact(seq) FROM portcullis.events"),
        total
    );
    // Every event acknowledged as written is there.
    let stored = clickhouse_ids(&ch);
    let missing: Vec<_> = ids.difference(&stored).take(5).collect();
    assert!(missing.is_empty(), "acknowledged but missing: {missing:?}");
    // Across ten crashes the chain still verifies, and so does every signed checkpoint
    // (the trail's and the file's), checked with the published key.
    let (ok, out) = audit_cli(&lab, &["verify", "--grace-secs", "0", "--pubkey", &pubkey]);
    assert!(ok, "{out}");
    let verified =
        checkpoints_verified(&out).unwrap_or_else(|| panic!("no checkpoint line: {out}"));
    assert!(verified >= 20, "{out}");
    assert!(!out.contains("under no signed root"), "{out}");
    // An auditor's export of the denied flows, checked offline with the published key.
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    let export_arg = export.display().to_string();
    let (ok, out) = audit_cli(
        &lab,
        &[
            "export",
            "--kind",
            "flow_denied",
            "--limit",
            "200",
            "--format",
            "csv",
            "--out",
            &export_arg,
        ],
    );
    assert!(ok && out.contains("exported 200 rows"), "{out}");
    let check = std::process::Command::new(portcullis_e2e::portcullis_bin().unwrap())
        .args(["audit", "verify-export", &export_arg, "--pubkey", &pubkey])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && said.contains("200 rows checked"),
        "{said}"
    );
    let log = lab.gateway_log();
    assert!(log.matches("gateway up").count() >= 12, "restarts: {log}");
}

#[test]
fn clickhouse_outage_under_load_loses_nothing_and_never_stops_forwarding() {
    let mut ch = ClickHouse::start().unwrap();
    let mut lab = audit_lab(&ch);
    assert!(audit_cli(&lab, &["migrate"]).0);
    ch.stop();
    let stop = Arc::new(AtomicBool::new(false));
    let stream = event_stream(&lab, stop.clone());
    // The data plane keeps forwarding while ClickHouse is down.
    let data = vec![0x5au8; 2 * 1024 * 1024];
    for _ in 0..3 {
        let mut s = lab
            .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(5))
            .expect("new flows are allowed while clickhouse is down");
        assert!(echo_round_trip(&mut s, &data).unwrap() == data);
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    let (ids, max_seq) = acknowledged(&lab);
    assert!(ids.len() > 300, "{} events", ids.len());
    ch.resume().unwrap();
    wait("backlog drained", Duration::from_secs(60), || {
        count(&ch, "SELECT count() FROM portcullis.events FINAL") >= max_seq
    });
    lab.stop_gateway().unwrap();
    let total = count(&ch, "SELECT count() FROM portcullis.events FINAL");
    assert_eq!(total, count(&ch, "SELECT max(seq) FROM portcullis.events"));
    assert_eq!(
        count(&ch, "SELECT uniqExact(event_id) FROM portcullis.events"),
        total
    );
    let stored = clickhouse_ids(&ch);
    assert!(ids.is_subset(&stored));
    // The uploader recorded its outage in its metrics once ClickHouse was back.
    assert!(count(&ch, "SELECT max(errors) FROM portcullis.uploader_metrics") > 0);
}

/// Legal holds through the gateway's admin API and the CLI: placed, listed, lifted, each
/// recorded in the chained trail as a `legal_hold` event (and the API's `admin_action`);
/// bad input is refused naming the field. (What retention keeps under a hold is tested
/// against ClickHouse in `portcullis-audit`.)
#[test]
fn legal_holds_are_placed_listed_lifted_and_audited() {
    let ch = ClickHouse::start().unwrap();
    let lab = Lab::start_audited(
        LabOptions {
            extra_config:
                "[http]\nlisten = \"127.0.0.1:18080\"\n[admin]\ntoken_file = \"admin.token\"\n"
                    .into(),
            files: vec![(
                "admin.token".into(),
                "admin-token-0123456789abcdef0123456789\n".into(),
            )],
            ..LabOptions::default()
        },
        &ch,
    )
    .expect("lab starts");
    assert!(audit_cli(&lab, &["migrate"]).0);
    let hold = |args: &[&str]| {
        let mut all = vec!["audit", "hold"];
        all.extend_from_slice(args);
        lab.cli(&all).unwrap()
    };
    let (ok, out, err) = hold(&[
        "add",
        "--user",
        "alice",
        "--since",
        "2020-01-01T00:00:00Z",
        "--until",
        "2020-12-31T00:00:00Z",
        "--reason",
        "case 2026-17",
    ]);
    assert!(ok, "{out}{err}");
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    assert!(id.starts_with("lh-"), "{out}");
    let (ok, out, _) = hold(&["list"]);
    assert!(ok && out.contains(&id) && out.contains("alice") && out.contains("case 2026-17"));
    assert!(out.contains("(1 active holds)"), "{out}");

    let (ok, _, err) = hold(&["add", "--since", "1d", "--reason", " "]);
    assert!(!ok && err.contains("reason"), "{err}");
    let (ok, _, err) = hold(&["add", "--since", "yesterday", "--reason", "x"]);
    assert!(!ok && err.contains("since"), "{err}");

    let (ok, out, err) = hold(&["remove", &id, "--reason", "case closed"]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = hold(&["list"]);
    assert!(ok && out.contains("(0 active holds)"), "{out}");
    let (ok, _, err) = hold(&["remove", &id, "--reason", "again"]);
    assert!(!ok && err.contains("no active hold"), "{err}");

    wait(
        "the hold events in the trail",
        Duration::from_secs(20),
        || {
            count(
                &ch,
                "SELECT count() FROM portcullis.events FINAL WHERE kind = 'legal_hold'",
            ) == 2
        },
    );
    let rows = ch
        .query(
            "SELECT visitParamExtractString(detail, 'action'), user, reason FROM portcullis.events FINAL \
             WHERE kind = 'legal_hold' ORDER BY seq",
        )
        .unwrap();
    assert_eq!(
        rows.trim(),
        "add\talice\tcase 2026-17\nremove\talice\tcase closed",
        "{rows}"
    );
    assert!(
        count(
            &ch,
            "SELECT count() FROM portcullis.events FINAL WHERE kind = 'admin_action' \
             AND detail LIKE '%/audit/holds%'"
        ) >= 2
    );
}
