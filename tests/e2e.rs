//! End to end: the `portcullis` binary in a network namespace, Debian's wireguard-go and
//! wg as clients in theirs, real TCP/UDP/ICMP traffic to private networks.
//! Needs root; see `tests/lib.rs` for the topology.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portcullis_e2e::{echo_round_trip, Lab, LabOptions, SIGN_ON_CONFIG};
use serde_json::Value;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn lab() -> Lab {
    Lab::start(LabOptions::default()).expect("lab starts")
}

fn is(e: &Value, kind: &str) -> bool {
    e["type"] == kind
}

#[test]
fn sre_reaches_prod_developer_is_denied_prod_and_allowed_dev() {
    let lab = lab();
    // alice (sre): TCP and ping into prod.
    let mut s = lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(5))
        .expect("alice reaches prod");
    assert_eq!(
        echo_round_trip(&mut s, b"hello prod").unwrap(),
        b"hello prod"
    );
    assert!(lab.ping(&lab.alice, "10.8.0.2"), "alice pings prod");

    // bob (developers): prod is denied, the attempt is audited with user and destination.
    let denied = lab.connect(&lab.bob, addr("10.8.0.2:8080"), Duration::from_secs(2));
    assert!(denied.is_err(), "bob must not reach prod");
    assert!(!lab.ping(&lab.bob, "10.8.0.2"), "bob must not ping prod");
    let e = lab
        .wait_event(Duration::from_secs(5), |e| {
            is(e, "flow_denied")
                && e["user"] == "bob"
                && e["dst_ip"] == "10.8.0.2"
                && e["dst_port"] == 8080
        })
        .unwrap();
    assert_eq!(e["network"], "prod");
    assert_eq!(e["protocol"], "tcp");
    assert_eq!(e["src_ip"], "100.64.0.3");

    // bob reaches dev on 443 (developers-dev-staging) but not dev on 8080.
    let mut s = lab
        .connect(&lab.bob, addr("10.9.0.2:443"), Duration::from_secs(5))
        .expect("bob reaches dev:443");
    assert_eq!(echo_round_trip(&mut s, b"hello dev").unwrap(), b"hello dev");
    assert!(lab
        .connect(&lab.bob, addr("10.9.0.2:8080"), Duration::from_secs(2))
        .is_err());

    // The allowed flows are audited with the deciding policy.
    let opened = lab
        .wait_event(Duration::from_secs(5), |e| {
            is(e, "flow_opened") && e["user"] == "alice" && e["dst_port"] == 8080
        })
        .unwrap();
    assert_eq!(opened["policy_ids"], serde_json::json!(["sre-prod"]));
    lab.wait_event(Duration::from_secs(5), |e| {
        is(e, "flow_opened")
            && e["user"] == "bob"
            && e["dst_ip"] == "10.9.0.2"
            && e["policy_ids"][0] == "developers-dev-staging"
    })
    .unwrap();
    lab.wait_event(Duration::from_secs(5), |e| {
        is(e, "session_started") && e["user"] == "alice"
    })
    .unwrap();
}

#[test]
fn sixteen_megabyte_transfer_arrives_intact_is_counted_and_loses_no_batch() {
    let mut lab = lab();
    let data: Vec<u8> = (0..16 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut s = lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(5))
        .unwrap();
    let back = echo_round_trip(&mut s, &data).unwrap();
    assert!(back == data, "echoed bytes differ");
    drop(s);
    // Shutting the gateway down closes the flow with its counters.
    lab.stop_gateway().unwrap();
    let closed = lab
        .wait_event(Duration::from_secs(5), |e| {
            is(e, "flow_closed") && e["user"] == "alice" && e["dst_port"] == 8080
        })
        .unwrap();
    assert!(
        closed["outbound"]["bytes"].as_u64().unwrap() > 16 * 1024 * 1024,
        "{closed}"
    );
    assert!(
        closed["inbound"]["bytes"].as_u64().unwrap() > 16 * 1024 * 1024,
        "{closed}"
    );
    lab.wait_event(Duration::from_secs(5), |e| {
        is(e, "session_ended") && e["user"] == "alice"
    })
    .unwrap();
    // No batch was lost on the way (a failed GSO send drops up to 64 datagrams at once;
    // TCP would hide it behind retransmissions).
    let log = lab.gateway_log();
    let counters = log
        .lines()
        .rev()
        .find(|l| l.contains(" counters "))
        .unwrap_or_default();
    assert!(
        counters.contains("send_errors=0"),
        "gateway counters: {counters}"
    );
    assert!(
        !counters.contains("udp_datagrams=0 "),
        "gateway counters: {counters}"
    );
}

#[test]
fn spoofed_inner_source_is_dropped_and_reported() {
    let lab = lab();
    // alice's device claims bob's tunnel address; wireguard-go sends whatever the kernel routes.
    sh(&[
        "ip",
        "-n",
        &lab.alice.ns,
        "addr",
        "add",
        "100.64.0.3/32",
        "dev",
        &lab.alice.ifname,
    ]);
    let sink = lab.udp_listen(&lab.ns_prod, addr("0.0.0.0:5353")).unwrap();
    lab.udp_send(
        &lab.alice,
        Some(addr("100.64.0.3:4000")),
        addr("10.8.0.2:5353"),
        b"spoofed",
    )
    .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        sink.recv_from(&mut buf).is_err(),
        "a spoofed packet reached prod"
    );
    let e = lab
        .wait_event(Duration::from_secs(5), |e| is(e, "spoof_dropped"))
        .unwrap();
    assert_eq!(e["user"], "alice");
    assert_eq!(e["claimed_src"], "100.64.0.3");
    // The genuine source still works.
    lab.udp_send(
        &lab.alice,
        Some(addr("100.64.0.2:4001")),
        addr("10.8.0.2:5353"),
        b"genuine",
    )
    .unwrap();
    let (n, from) = sink.recv_from(&mut buf).expect("genuine packet arrives");
    assert_eq!(&buf[..n], b"genuine");
    assert_eq!(from, addr("100.64.0.2:4001"));
}

fn sh(args: &[&str]) {
    portcullis_e2e::sh(args).unwrap();
}

#[test]
fn reload_that_removes_access_cuts_an_established_connection_within_a_second() {
    let lab = lab();
    let mut s = lab
        .connect(&lab.alice, addr("10.8.0.2:22"), Duration::from_secs(5))
        .unwrap();
    assert_eq!(echo_round_trip(&mut s, b"before").unwrap(), b"before");
    let access = lab.policy_dir().join("access.cedar");
    let text = std::fs::read_to_string(&access).unwrap();
    std::fs::write(
        &access,
        text.replace("Group::\"sre\"", "Group::\"sre-frozen\""),
    )
    .unwrap();
    let t0 = Instant::now();
    lab.reload().unwrap();
    // The gateway resets both ends: alice's blocked read fails with a reset.
    expect_reset(&mut s, Duration::from_secs(3));
    let elapsed = t0.elapsed();
    assert!(elapsed < Duration::from_secs(1), "cut took {elapsed:?}");
    let e = lab
        .wait_event(Duration::from_secs(2), |e| {
            is(e, "flow_closed") && e["reason"] == "policy_revoked"
        })
        .unwrap();
    assert_eq!(e["user"], "alice");
    lab.wait_event(Duration::from_secs(2), |e| {
        is(e, "policy_loaded") && e["flows_cut"] == 1
    })
    .unwrap();
    // And a new connection is denied.
    assert!(lab
        .connect(&lab.alice, addr("10.8.0.2:22"), Duration::from_secs(2))
        .is_err());
}

#[test]
fn invalid_policy_reload_is_rejected_and_the_old_policy_stays() {
    let lab = lab();
    std::fs::write(
        lab.policy_dir().join("broken.cedar"),
        "permit(principal, action resource);\n",
    )
    .unwrap();
    lab.reload().unwrap();
    let e = lab
        .wait_event(Duration::from_secs(5), |e| is(e, "policy_rejected"))
        .unwrap();
    let errors = e["errors"].to_string();
    assert!(errors.contains("broken.cedar:1:"), "{errors}");
    // alice still reaches prod, bob still does not.
    let mut s = lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(5))
        .expect("old policy in force");
    assert_eq!(echo_round_trip(&mut s, b"still").unwrap(), b"still");
    assert!(lab
        .connect(&lab.bob, addr("10.8.0.2:8080"), Duration::from_secs(2))
        .is_err());
    assert!(!lab.events().iter().any(|e| is(e, "policy_loaded")));
}

#[test]
fn ipv6_flows_are_decided_and_forwarded_like_ipv4() {
    let lab = lab();
    let mut s = lab
        .connect(&lab.alice, addr("[fd00:8::2]:8080"), Duration::from_secs(5))
        .expect("alice reaches prod over v6");
    assert_eq!(echo_round_trip(&mut s, b"six").unwrap(), b"six");
    let mut w = s.try_clone().unwrap();
    w.write_all(b"!").unwrap();
    assert!(lab
        .connect(&lab.bob, addr("[fd00:8::2]:8080"), Duration::from_secs(2))
        .is_err());
    lab.wait_event(Duration::from_secs(5), |e| {
        is(e, "flow_opened") && e["dst_ip"] == "fd00:8::2" && e["user"] == "alice"
    })
    .unwrap();
    lab.wait_event(Duration::from_secs(5), |e| {
        is(e, "flow_denied") && e["dst_ip"] == "fd00:8::2" && e["user"] == "bob"
    })
    .unwrap();
}

/// Reads from `s` until the gateway's reset arrives (or `within` passes: a failure).
fn expect_reset(s: &mut std::net::TcpStream, within: Duration) {
    let t0 = Instant::now();
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!(
            "expected a connection reset, got {other:?} after {:?}",
            t0.elapsed()
        ),
    }
}

/// Waits until alice pings prod (wireguard-go retries its handshake every 5 s).
fn wait_alice_reaches_prod(lab: &Lab, timeout: Duration) {
    portcullis_e2e::wait_until(timeout, || Ok(lab.ping(&lab.alice, "10.8.0.2"))).unwrap();
}

const SCIM_TOKEN: &str = "scim-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

/// One HTTP request to the gateway's listener, made from inside its namespace.
fn http(lab: &Lab, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
    lab.http(method, path, token, body).unwrap()
}

fn identity_lab() -> Lab {
    Lab::start(LabOptions {
        alice_from_identity_source: true,
        extra_config: "[http]\nlisten = \"127.0.0.1:18080\"\nmax_body_bytes = 4096\n[scim]\ntoken_file = \"scim.token\"\n[admin]\ntoken_file = \"admin.token\"\n".into(),
        files: vec![
            ("scim.token".into(), format!("{SCIM_TOKEN}\n")),
            ("admin.token".into(), format!("{ADMIN_TOKEN}\n")),
        ],
        ..LabOptions::default()
    })
    .unwrap()
}

/// What Okta and Entra ID do, end to end through a real wireguard-go tunnel: create a user,
/// add it to sre (reaches prod), deactivate it (the established connection dies, the
/// tunnel carries nothing more), delete it, re-create the same userName (no access).
#[test]
fn scim_grants_and_deactivation_cuts_a_live_connection() {
    let lab = identity_lab();
    // No user yet: the device gets no handshake answer.
    assert!(!lab.ping(&lab.alice, "10.8.0.2"));
    let (status, _) = http(&lab, "GET", "/scim/v2/Users", "wrong-token-0123456789", "");
    assert_eq!(status, 401);
    let (status, e) = http(
        &lab,
        "POST",
        "/scim/v2/Users",
        SCIM_TOKEN,
        "{\"userName\": ",
    );
    assert_eq!(
        (status, e["scimType"].as_str()),
        (400, Some("invalidSyntax"))
    );
    let (status, e) = http(
        &lab,
        "POST",
        "/scim/v2/Users",
        SCIM_TOKEN,
        r#"{"userName": "x", "colour": 1}"#,
    );
    assert_eq!(status, 400);
    assert!(e["detail"].as_str().unwrap().contains("colour"));
    // A body over [http] max_body_bytes is refused whole, and the listener keeps serving.
    let huge = format!(
        r#"{{"userName": "big", "displayName": "{}"}}"#,
        "x".repeat(8192)
    );
    let (status, _) = http(&lab, "POST", "/scim/v2/Users", SCIM_TOKEN, &huge);
    assert_eq!(status, 413);

    let (status, user) = http(
        &lab,
        "POST",
        "/scim/v2/Users",
        SCIM_TOKEN,
        r#"{"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "alice", "externalId": "00u1",
            "name": {"givenName": "Alice"}, "emails": [{"value": "alice@example.com", "primary": true}], "active": true}"#,
    );
    assert_eq!(status, 201, "{user}");
    let id = user["id"].as_str().unwrap().to_string();
    let (status, found) = http(
        &lab,
        "GET",
        "/scim/v2/Users?filter=userName%20eq%20%22ALICE%22",
        SCIM_TOKEN,
        "",
    );
    assert_eq!((status, found["totalResults"].as_u64()), (200, Some(1)));
    let (status, group) = http(
        &lab,
        "POST",
        "/scim/v2/Groups",
        SCIM_TOKEN,
        &format!(r#"{{"displayName": "sre", "members": [{{"value": "{id}"}}]}}"#),
    );
    assert_eq!(status, 201, "{group}");
    let group_id = group["id"].as_str().unwrap().to_string();

    wait_alice_reaches_prod(&lab, Duration::from_secs(20));
    let mut s = lab
        .connect(&lab.alice, addr("10.8.0.2:22"), Duration::from_secs(5))
        .unwrap();
    assert_eq!(echo_round_trip(&mut s, b"granted").unwrap(), b"granted");

    // Entra ID deactivates with a string boolean and no path.
    let (status, off) = http(
        &lab,
        "PATCH",
        &format!("/scim/v2/Users/{id}"),
        SCIM_TOKEN,
        r#"{"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{"op": "Replace", "value": {"active": "False"}}]}"#,
    );
    assert_eq!(
        (status, off["active"].as_bool()),
        (200, Some(false)),
        "{off}"
    );
    // Applied before the answer: the reset is already on its way.
    expect_reset(&mut s, Duration::from_secs(2));
    assert!(!lab.ping(&lab.alice, "10.8.0.2"));
    let revoked = lab
        .wait_event(Duration::from_secs(2), |e| is(e, "user_revoked"))
        .unwrap();
    assert_eq!(
        (revoked["user"].as_str(), revoked["source"].as_str()),
        (Some("alice"), Some("scim"))
    );
    assert_eq!(revoked["sessions_cut"], 1);
    assert!(revoked["latency_us"].as_u64().unwrap() < 1_000_000);

    // The admin CLI sees her as inactive.
    let out = lab.cli_in_gateway_ns(&["users", "list", "--json"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let users: Value = serde_json::from_slice(&out.stdout).unwrap();
    let alice = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "alice")
        .unwrap();
    assert_eq!(alice["active"], false);

    // Deleted, then created again under the same name: a new user without the old grants.
    let (status, _) = http(
        &lab,
        "DELETE",
        &format!("/scim/v2/Users/{id}"),
        SCIM_TOKEN,
        "",
    );
    assert_eq!(status, 204);
    let (status, again) = http(
        &lab,
        "POST",
        "/scim/v2/Users",
        SCIM_TOKEN,
        r#"{"userName": "alice"}"#,
    );
    assert_eq!(status, 201);
    assert_ne!(again["id"].as_str().unwrap(), id);
    let (_, group) = http(
        &lab,
        "GET",
        &format!("/scim/v2/Groups/{group_id}"),
        SCIM_TOKEN,
        "",
    );
    assert_eq!(group["members"], serde_json::json!([]));
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        !lab.ping(&lab.alice, "10.8.0.2"),
        "re-created alice reached prod"
    );
}

/// `portcullis users disable` revokes a user of the configuration file at once;
/// `sessions list` and `sessions kill` see and end live sessions.
#[test]
fn admin_cli_disables_a_user_and_kills_a_session() {
    let lab = identity_lab();
    let cli = |args: &[&str]| {
        let out = lab.cli_in_gateway_ns(args).unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let mut first = lab
        .connect(&lab.bob, addr("10.9.0.2:443"), Duration::from_secs(5))
        .unwrap();
    assert_eq!(echo_round_trip(&mut first, b"one").unwrap(), b"one");
    let (ok, out, err) = cli(&["sessions", "list", "--json"]);
    assert!(ok, "{err}");
    let sessions: Value = serde_json::from_str(&out).unwrap();
    let bob = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["user"] == "bob")
        .unwrap();
    let (ok, _, err) = cli(&["sessions", "kill", &bob["id"].to_string()]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["sessions", "kill", "12345"]);
    assert!(!ok && err.contains("no live session 12345"), "{err}");
    first
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert!(matches!(first.read(&mut buf), Err(e) if e.kind() == ErrorKind::ConnectionReset));
    // The device may come back: its keys were dropped, so it handshakes anew.
    lab.rehandshake(&lab.bob).unwrap();
    let mut s = lab
        .connect(&lab.bob, addr("10.9.0.2:443"), Duration::from_secs(10))
        .unwrap();
    assert_eq!(echo_round_trip(&mut s, b"bob").unwrap(), b"bob");
    let (ok, _, err) = cli(&["users", "disable", "bob"]);
    assert!(ok, "{err}");
    assert!(err.contains("configuration file"), "{err}");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 8];
    assert!(matches!(s.read(&mut buf), Err(e) if e.kind() == ErrorKind::ConnectionReset));
    let e = lab
        .wait_event(Duration::from_secs(2), |e| is(e, "user_revoked"))
        .unwrap();
    assert_eq!(e["source"], "admin:cli");
    let (ok, _, err) = cli(&["users", "disable", "nobody"]);
    assert!(!ok && err.contains("no user"), "{err}");
}

fn ldap_lab() -> Lab {
    Lab::start(LabOptions {
        alice_from_identity_source: true,
        slapd: true,
        extra_config: format!(
            "[http]\nlisten = \"127.0.0.1:18080\"\n[admin]\ntoken_file = \"admin.token\"\n\
             [ldap]\nurl = \"{{ldap_url}}\"\nbind_dn = \"{dn}\"\npassword_file = \"ldap.pw\"\n\
             user_base = \"ou=people,dc=example,dc=org\"\ngroup_base = \"ou=groups,dc=example,dc=org\"\n\
             max_removal_share = 0.7\n\
             [ldap.attributes]\ntags = \"businessCategory\"\n\
             [ldap.disabled]\nattribute = \"employeeType\"\nvalues = [\"disabled\"]\n",
            dn = portcullis_testkit::Slapd::ADMIN_DN
        ),
        files: vec![
            ("admin.token".into(), format!("{ADMIN_TOKEN}\n")),
            (
                "ldap.pw".into(),
                format!("{}\n", portcullis_testkit::Slapd::ADMIN_PASSWORD),
            ),
        ],
        ..LabOptions::default()
    })
    .unwrap()
}

fn person(uid: &str) -> String {
    format!(
        "dn: uid={uid},ou=people,dc=example,dc=org\nchangetype: add\nobjectClass: inetOrgPerson\n\
         uid: {uid}\ncn: {uid}\nsn: {uid}\nmail: {uid}@example.org\nbusinessCategory: staff\n\n"
    )
}

fn ldap_status(lab: &Lab) -> Value {
    let out = lab
        .cli_in_gateway_ns(&["ldap", "status", "--json"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sre_member(lab: &Lab, op: &str, uid: &str) {
    lab.slapd
        .as_ref()
        .unwrap()
        .modify(&format!(
            "dn: cn=sre,ou=groups,dc=example,dc=org\nchangetype: modify\n{op}: member\nmember: uid={uid},ou=people,dc=example,dc=org\n"
        ))
        .unwrap();
}

/// LDAP sync with a real slapd (syncprov, memberof): a group change pushed by the
/// directory grants and cuts live connections; a directory outage deprovisions nobody;
/// changes made while the gateway could not reach it apply on reconnect; a pass that
/// would remove everyone is refused until an administrator approves it; lookups escape
/// the name.
#[test]
fn ldap_push_grants_cuts_and_survives_outages() {
    let mut lab = ldap_lab();
    let slapd = lab.slapd.as_ref().unwrap();
    slapd
        .modify(&format!(
            "{}{}{}dn: cn=sre,ou=groups,dc=example,dc=org\nchangetype: add\nobjectClass: groupOfNames\ncn: sre\nmember: uid=erin,ou=people,dc=example,dc=org\n",
            person("alice"),
            person("erin"),
            person("frank")
        ))
        .unwrap();
    portcullis_e2e::wait_until(Duration::from_secs(15), || {
        let s = ldap_status(&lab);
        Ok(s["live"] == true && s["users"] == 3 && s["groups"] == 1)
    })
    .unwrap();
    // alice exists but is in no group: her tunnel comes up, prod stays closed.
    portcullis_e2e::wait_until(Duration::from_secs(10), || {
        Ok(lab
            .events()
            .iter()
            .any(|e| is(e, "identity_changed") && e["user"] == "alice" && e["source"] == "ldap"))
    })
    .unwrap();
    assert!(!lab.ping(&lab.alice, "10.8.0.2"));

    // Added to sre in the directory: pushed, she reaches prod.
    sre_member(&lab, "add", "alice");
    wait_alice_reaches_prod(&lab, Duration::from_secs(20));
    let mut s = lab
        .connect(&lab.alice, addr("10.8.0.2:22"), Duration::from_secs(5))
        .unwrap();
    assert_eq!(echo_round_trip(&mut s, b"via ldap").unwrap(), b"via ldap");

    // Removed from sre: the established connection is cut at once, not at its next packet.
    let removed = Instant::now();
    sre_member(&lab, "delete", "alice");
    expect_reset(&mut s, Duration::from_secs(3));
    let cut_after = removed.elapsed();
    assert!(
        cut_after < Duration::from_secs(2),
        "cut after {cut_after:?}"
    );
    assert!(!lab.ping(&lab.alice, "10.8.0.2"));

    // Lookups go to the directory with the name escaped.
    let lookup = |name: &str| lab.cli_in_gateway_ns(&["ldap", "lookup", name]).unwrap();
    let out = lookup("erin");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("uid=erin,ou=people"));
    for hostile in [
        "*",
        "erin)(uid=*",
        "*)(|(uid=*",
        "e\\2a",
        "(uid=erin)",
        "erin\\",
    ] {
        let out = lookup(hostile);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{hostile:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("no user named"));
    }

    // Back in sre, then the directory goes away: nobody loses access.
    sre_member(&lab, "add", "alice");
    wait_alice_reaches_prod(&lab, Duration::from_secs(10));
    lab.slapd.as_mut().unwrap().stop();
    portcullis_e2e::wait_until(Duration::from_secs(10), || {
        Ok(ldap_status(&lab)["connected"] == false)
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        lab.ping(&lab.alice, "10.8.0.2"),
        "an outage deprovisioned alice"
    );
    assert!(!lab.events().iter().any(|e| is(e, "user_revoked")));

    // Changed while the gateway cannot reach the directory: alice disabled, frank deleted.
    let slapd = lab.slapd.as_mut().unwrap();
    slapd.resume_unreachable().unwrap();
    slapd
        .modify(
            "dn: uid=alice,ou=people,dc=example,dc=org\nchangetype: modify\nadd: employeeType\nemployeeType: disabled\n\n\
             dn: uid=frank,ou=people,dc=example,dc=org\nchangetype: delete\n",
        )
        .unwrap();
    slapd.stop();
    slapd.resume().unwrap();
    let revoked = lab
        .wait_event(Duration::from_secs(40), |e| {
            is(e, "user_revoked") && e["user"] == "alice"
        })
        .unwrap();
    assert_eq!(revoked["source"], "ldap");
    assert_eq!(revoked["sessions_cut"], 1);
    let frank = lab
        .wait_event(Duration::from_secs(2), |e| {
            is(e, "user_revoked") && e["user"] == "frank"
        })
        .unwrap();
    assert_eq!(
        (frank["source"].as_str(), frank["sessions_cut"].as_u64()),
        (Some("ldap"), Some(0))
    );
    assert!(!lab.ping(&lab.alice, "10.8.0.2"));
    let users = |lab: &Lab| {
        let out = lab.cli_in_gateway_ns(&["users", "list", "--json"]).unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    portcullis_e2e::wait_until(Duration::from_secs(5), || {
        Ok(!users(&lab).contains(&"frank".to_string()))
    })
    .unwrap();
    assert!(users(&lab).contains(&"erin".to_string()));

    // An answer without people (wiped while unreachable) is refused, not applied.
    let slapd = lab.slapd.as_mut().unwrap();
    slapd.stop();
    slapd.resume_unreachable().unwrap();
    slapd
        .modify(
            "dn: cn=sre,ou=groups,dc=example,dc=org\nchangetype: delete\n\n\
             dn: uid=alice,ou=people,dc=example,dc=org\nchangetype: delete\n\n\
             dn: uid=erin,ou=people,dc=example,dc=org\nchangetype: delete\n",
        )
        .unwrap();
    slapd.stop();
    slapd.resume().unwrap();
    let refused = lab
        .wait_event(Duration::from_secs(40), |e| is(e, "sync_refused"))
        .unwrap();
    assert_eq!(
        (refused["known"].as_u64(), refused["would_remove"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(ldap_status(&lab)["refused"]
        .as_str()
        .unwrap()
        .contains("no users"));
    assert!(
        users(&lab).contains(&"erin".to_string()),
        "a refused pass removed erin"
    );
    let out = lab.cli_in_gateway_ns(&["ldap", "approve-removal"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!users(&lab).contains(&"erin".to_string()));
    assert_eq!(ldap_status(&lab)["refused"], Value::Null);
}

fn devices_lab() -> Lab {
    Lab::start(LabOptions {
        extra_config:
            "[http]\nlisten = \"127.0.0.1:18080\"\n[admin]\ntoken_file = \"admin.token\"\n\
            [devices]\npool = \"100.64.0.128/26\"\nendpoint = \"192.168.77.1:51820\"\n"
                .into(),
        files: vec![("admin.token".into(), format!("{ADMIN_TOKEN}\n"))],
        ..LabOptions::default()
    })
    .unwrap()
}

fn reaches_prod(lab: &Lab, c: &portcullis_e2e::Client, timeout: Duration) -> bool {
    portcullis_e2e::wait_until(timeout, || Ok(lab.ping(c, "10.8.0.2"))).is_ok()
}

fn device_list(lab: &Lab) -> Vec<Value> {
    let (ok, out, err) = lab.cli(&["devices", "list", "--json"]).unwrap();
    assert!(ok, "{err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// A device's life through the admin CLI with real wireguard-go clients: registered with
/// a gateway-made key (the profile works as is), rotated (both keys work during the
/// grace, then the old one's connection is cut), kept across a restart, expired (also
/// while the gateway was down), removed; bad requests get clear errors.
#[test]
fn devices_register_rotate_expire_and_survive_a_restart() {
    let mut lab = devices_lab();
    let profile1 = lab.dir.join("laptop1.conf");
    let (ok, _, err) = lab
        .cli(&[
            "devices",
            "add",
            "alice",
            "--name",
            "laptop",
            "--profile",
            profile1.to_str().unwrap(),
        ])
        .unwrap();
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&profile1).unwrap();
    assert!(
        text.contains("PrivateKey = ") && text.contains("Address = 100.64.0.129/32"),
        "{text}"
    );
    // AllowedIPs follow alice's permits (sre: prod, the resolver), not every network.
    let allowed = text.lines().find(|l| l.starts_with("AllowedIPs")).unwrap();
    assert!(
        allowed.contains("10.8.0.0/16") && !allowed.contains("10.9.0.0/16"),
        "{allowed}"
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&profile1).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let listed = device_list(&lab);
    assert_eq!(listed.len(), 1);
    let id1 = listed[0]["id"].as_str().unwrap().to_string();
    let key1 = listed[0]["public_key"].as_str().unwrap().to_string();
    let e = lab
        .wait_event(Duration::from_secs(2), |e| is(e, "key_rotated"))
        .unwrap();
    assert_eq!(
        (e["device"].as_str(), e["previous"].as_str()),
        (Some(key1.as_str()), None)
    );

    // alice's namespace now runs the profile exactly as handed out.
    lab.use_profile(&lab.alice, &text, None, None).unwrap();
    assert!(reaches_prod(&lab, &lab.alice, Duration::from_secs(10)));
    let mut old_conn = lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(5))
        .unwrap();
    assert_eq!(echo_round_trip(&mut old_conn, b"old").unwrap(), b"old");

    // Rotation: the new key (in bob's namespace, acting as alice's new laptop) works at
    // once; the old one keeps working for the 4 s grace, then its connection is reset.
    let profile2 = lab.dir.join("laptop2.conf");
    let (ok, _, err) = lab
        .cli(&[
            "devices",
            "rotate",
            &id1,
            "--grace-secs",
            "4",
            "--profile",
            profile2.to_str().unwrap(),
        ])
        .unwrap();
    assert!(ok, "{err}");
    let rotated_at = Instant::now();
    let text2 = std::fs::read_to_string(&profile2).unwrap();
    assert!(text2.contains("Address = 100.64.0.130/32"), "{text2}");
    lab.use_profile(&lab.bob, &text2, None, Some(&lab.bob.endpoint))
        .unwrap();
    assert!(
        reaches_prod(&lab, &lab.bob, Duration::from_secs(10)),
        "the new key reaches what alice may"
    );
    assert!(
        rotated_at.elapsed() < Duration::from_secs(4),
        "setup too slow to test the grace"
    );
    assert_eq!(echo_round_trip(&mut old_conn, b"grace").unwrap(), b"grace");
    let (ok, _, err) = lab.cli(&["devices", "rotate", &id1]).unwrap();
    assert!(!ok && err.contains("already rotated"), "{err}");
    expect_reset(&mut old_conn, Duration::from_secs(8));
    let cut_after = rotated_at.elapsed();
    assert!(
        cut_after >= Duration::from_millis(3900),
        "cut before the grace ended: {cut_after:?}"
    );
    let e = lab
        .wait_event(Duration::from_secs(2), |e| {
            is(e, "peer_removed") && e["device"] == key1
        })
        .unwrap();
    assert_eq!(e["reason"], "rotated");
    let rotated = lab
        .events()
        .into_iter()
        .filter(|e| is(e, "key_rotated"))
        .nth(1)
        .unwrap();
    assert_eq!(rotated["previous"].as_str(), Some(key1.as_str()));
    lab.rehandshake(&lab.alice).unwrap();
    assert!(!lab.ping(&lab.alice, "10.8.0.2"), "the old key is dead");
    let listed = device_list(&lab);
    assert_eq!(listed.len(), 1);
    let id2 = listed[0]["id"].as_str().unwrap().to_string();
    let key2 = listed[0]["public_key"].as_str().unwrap().to_string();
    assert_eq!(listed[0]["replaces"].as_str(), Some(id1.as_str()));

    // A key the device made itself: the profile has no private key; 3 s lifetime.
    let (own_private, own_public) = portcullis_e2e::wg_genkey().unwrap();
    let (ok, text3, err) = lab
        .cli(&[
            "devices",
            "add",
            "alice",
            "--public-key",
            &own_public,
            "--lifetime-secs",
            "3",
        ])
        .unwrap();
    assert!(ok, "{err}");
    assert!(
        !text3.lines().any(|l| l.starts_with("PrivateKey")),
        "{text3}"
    );
    let added_at = Instant::now();
    lab.use_profile(&lab.alice, &text3, Some(&own_private), None)
        .unwrap();
    assert!(reaches_prod(&lab, &lab.alice, Duration::from_secs(2)));
    let e = lab
        .wait_event(Duration::from_secs(6), |e| {
            is(e, "peer_removed") && e["device"] == own_public
        })
        .unwrap();
    assert_eq!(e["reason"], "expired");
    let expired_after = added_at.elapsed();
    assert!(
        (Duration::from_millis(2500)..Duration::from_millis(4500)).contains(&expired_after),
        "expired after {expired_after:?}"
    );
    lab.rehandshake(&lab.alice).unwrap();
    assert!(!lab.ping(&lab.alice, "10.8.0.2"), "the expired key is dead");

    // Bad requests.
    for (args, expect) in [
        (
            vec!["devices", "add", "mallory"],
            "no active user \"mallory\"",
        ),
        (
            vec!["devices", "add", "alice", "--public-key", "not-a-key"],
            "public_key: not valid base64",
        ),
        (
            vec!["devices", "add", "alice", "--public-key", &key2],
            "already registered",
        ),
        (
            vec![
                "devices",
                "add",
                "alice",
                "--public-key",
                &lab.bob.public_key,
            ],
            "already registered",
        ),
        (vec!["devices", "rotate", "nope"], "not a UUID"),
        (
            vec!["devices", "remove", "00000000-0000-0000-0000-000000000000"],
            "no device",
        ),
    ] {
        let (ok, _, err) = lab.cli(&args).unwrap();
        assert!(!ok && err.contains(expect), "{args:?}: {err}");
    }

    // A device that expires while the gateway is down is removed (and recorded) at start,
    // before any handshake could use it; the rotated device survives the restart.
    let (ok, _, err) = lab
        .cli(&["devices", "add", "bob", "--lifetime-secs", "1"])
        .unwrap();
    assert!(ok, "{err}");
    let short = device_list(&lab)
        .into_iter()
        .find(|d| d["user"] == "bob")
        .unwrap();
    lab.stop_gateway().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    lab.spawn_gateway().unwrap();
    let e = lab
        .wait_event(Duration::from_secs(5), |e| {
            is(e, "peer_removed") && e["device"] == short["public_key"]
        })
        .unwrap();
    assert_eq!(e["reason"], "expired");
    lab.rehandshake(&lab.bob).unwrap();
    assert!(
        reaches_prod(&lab, &lab.bob, Duration::from_secs(10)),
        "the stored device works after a restart"
    );
    let listed = device_list(&lab);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"].as_str(), Some(id2.as_str()));

    // Removal cuts the live connection before the command returns.
    let mut conn = lab
        .connect(&lab.bob, addr("10.8.0.2:8080"), Duration::from_secs(5))
        .unwrap();
    assert_eq!(echo_round_trip(&mut conn, b"new").unwrap(), b"new");
    let (ok, _, err) = lab.cli(&["devices", "remove", &id2]).unwrap();
    assert!(ok, "{err}");
    expect_reset(&mut conn, Duration::from_secs(1));
    lab.wait_event(Duration::from_secs(2), |e| {
        is(e, "admin_action")
            && e["action"] == "DELETE /devices/{id}"
            && e["outcome"] == "ok"
            && e["actor"] == "admin:cli"
    })
    .unwrap();
    let refused = lab
        .events()
        .into_iter()
        .find(|e| is(e, "admin_action") && e["action"] == "POST /devices" && e["outcome"] != "ok")
        .unwrap();
    assert_eq!(refused["outcome"], "404: no active user \"mallory\"");
}

/// `curl` from inside the gateway's namespace: (success, body or error).
fn curl(lab: &Lab, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns_gw,
            "curl",
            "-sS",
            "--max-time",
            "5",
        ])
        .args(args)
        .output()
        .unwrap();
    let text = if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    };
    (
        out.status.success(),
        String::from_utf8_lossy(text).to_string(),
    )
}

/// TLS on both sides: the HTTP listener serves the admin API over HTTPS (curl checks the
/// certificate; the CLI trusts exactly the configured one; SIGHUP swaps in a renewed
/// certificate), and the LDAP sync runs over ldaps:// against slapd with its CA.
#[test]
fn https_listener_and_ldaps_sync() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) =
        portcullis_testkit::test_certificate(certs.path(), "http", "127.0.0.1").unwrap();
    let (other_ca, other_cert, other_key) =
        portcullis_testkit::test_certificate(certs.path(), "other", "127.0.0.1").unwrap();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let mut lab = Lab::start(LabOptions {
        alice_from_identity_source: true,
        slapd: true,
        slapd_tls: true,
        extra_config: format!(
            "[http]\nlisten = \"127.0.0.1:18080\"\ncert_file = \"http.crt\"\nkey_file = \"http.key\"\n\
             [admin]\ntoken_file = \"admin.token\"\n\
             [ldap]\nurl = \"{{ldaps_url}}\"\nca_file = \"{{ldap_ca_file}}\"\nbind_dn = \"{dn}\"\npassword_file = \"ldap.pw\"\n\
             user_base = \"ou=people,dc=example,dc=org\"\ngroup_base = \"ou=groups,dc=example,dc=org\"\n",
            dn = portcullis_testkit::Slapd::ADMIN_DN
        ),
        files: vec![
            ("admin.token".into(), format!("{ADMIN_TOKEN}\n")),
            ("http.crt".into(), read(&cert)),
            ("http.key".into(), read(&key)),
            (
                "ldap.pw".into(),
                format!("{}\n", portcullis_testkit::Slapd::ADMIN_PASSWORD),
            ),
        ],
        ..LabOptions::default()
    })
    .unwrap();
    // The sync over ldaps:// provisions alice into sre: she reaches prod.
    lab.slapd
        .as_ref()
        .unwrap()
        .modify(&format!(
            "{}dn: cn=sre,ou=groups,dc=example,dc=org\nchangetype: add\nobjectClass: groupOfNames\ncn: sre\nmember: uid=alice,ou=people,dc=example,dc=org\n",
            person("alice")
        ))
        .unwrap();
    wait_alice_reaches_prod(&lab, Duration::from_secs(20));
    assert!(ldap_status(&lab)["url"]
        .as_str()
        .unwrap()
        .starts_with("ldaps://"));

    let auth = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let url = "https://127.0.0.1:18080/admin/v1/users";
    let (ok, body) = curl(&lab, &["--cacert", ca.to_str().unwrap(), "-H", &auth, url]);
    assert!(ok, "{body}");
    let users: Value = serde_json::from_str(&body).unwrap();
    assert!(users
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["name"] == "alice"));
    // Plain HTTP gets no answer; a client trusting another certificate refuses.
    let (ok, _) = curl(
        &lab,
        &["-H", &auth, "http://127.0.0.1:18080/admin/v1/users"],
    );
    assert!(!ok, "plain http must not be served");
    let (ok, err) = curl(&lab, &["--cacert", other_ca.to_str().unwrap(), url]);
    assert!(!ok && err.contains("certificate"), "{err}");
    // The CLI pins the configured certificate.
    let (ok, out, err) = lab.cli(&["users", "list"]).unwrap();
    assert!(ok && out.contains("alice"), "{err}");

    // Renewal: new files, SIGHUP; new connections get the new certificate.
    std::fs::write(lab.dir.join("http.crt"), read(&other_cert)).unwrap();
    std::fs::write(lab.dir.join("http.key"), read(&other_key)).unwrap();
    lab.reload().unwrap();
    portcullis_e2e::wait_until(Duration::from_secs(5), || {
        Ok(curl(
            &lab,
            &["--cacert", other_ca.to_str().unwrap(), "-H", &auth, url],
        )
        .0)
    })
    .unwrap();
    let (ok, _) = curl(&lab, &["--cacert", ca.to_str().unwrap(), url]);
    assert!(!ok, "the old certificate is no longer served");
    let (ok, _, err) = lab.cli(&["users", "list"]).unwrap();
    assert!(ok, "the CLI reads the renewed certificate: {err}");
    // A CLI configured with a certificate the gateway does not present refuses to talk.
    std::fs::write(lab.dir.join("http.crt"), read(&cert)).unwrap();
    let (ok, _, err) = lab.cli(&["users", "list"]).unwrap();
    assert!(!ok && err.contains("certificate other than"), "{err}");
    lab.stop_gateway().unwrap();
}

const API_SECRET: &str = "ops-secret-0123456789abcdef0123456789";
const AUDIT_SECRET: &str = "audit-secret-0123456789abcdef01234567";

/// The API tokens: `ops` (admin), `audit` (auditor), `old` (admin, expired).
fn api_options() -> LabOptions {
    let tokens = format!(
        "[[token]]\nid = \"ops\"\nsecret = \"{API_SECRET}\"\nscope = \"admin\"\n\n\
         [[token]]\nid = \"audit\"\nsecret = \"{AUDIT_SECRET}\"\nscope = \"auditor\"\n\n\
         [[token]]\nid = \"old\"\nsecret = \"{API_SECRET}\"\nscope = \"admin\"\nexpires = \"2026-01-01T00:00:00Z\"\n"
    );
    LabOptions {
        extra_config: "[http]\nlisten = \"127.0.0.1:18080\"\n[api]\ntokens_file = \"api.tokens\"\n"
            .into(),
        files: vec![("api.tokens".into(), tokens)],
        ..LabOptions::default()
    }
}

fn api_lab() -> Lab {
    Lab::start(api_options()).unwrap()
}

/// A signed request as the recipe says, then altered by `tamper` before sending.
fn signed(
    lab: &Lab,
    token: &str,
    secret: &str,
    method: &str,
    path_and_query: &str,
    body: &str,
    tamper: impl FnOnce(&mut [String; 5]),
) -> (u16, Value) {
    signed_with(
        lab,
        token,
        secret,
        method,
        path_and_query,
        body,
        &[],
        tamper,
    )
}

/// [`signed`] with extra headers (not signed, as the recipe says).
#[allow(clippy::too_many_arguments)]
fn signed_with(
    lab: &Lab,
    token: &str,
    secret: &str,
    method: &str,
    path_and_query: &str,
    body: &str,
    extra: &[(&str, &str)],
    tamper: impl FnOnce(&mut [String; 5]),
) -> (u16, Value) {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let ts = chrono::Utc::now().timestamp().to_string();
    let nonce = format!("{:032x}", rand_nonce());
    let t =
        portcullis_apiauth::ApiToken::new(token, secret, portcullis_apiauth::Scope::Admin, None);
    let sig = t.sign(&portcullis_apiauth::Parts {
        token,
        timestamp: &ts,
        nonce: &nonce,
        method,
        path,
        query,
        body: body.as_bytes(),
    });
    // What is sent: token, timestamp, nonce, signature, the request target and body.
    let mut sent = [
        token.to_string(),
        ts,
        nonce,
        sig,
        path_and_query.to_string(),
    ];
    let mut body = body.to_string();
    tamper(&mut sent);
    if sent[4] == "tamper-body" {
        sent[4] = path_and_query.to_string();
        body.push(' ');
    }
    let mut headers = vec![
        ("Auth-Token", sent[0].as_str()),
        ("Auth-Timestamp", &sent[1]),
        ("Auth-Nonce", &sent[2]),
        ("Auth-Signature", &sent[3]),
        ("Content-Type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    lab.http_with(method, &sent[4], &headers, &body).unwrap()
}

fn rand_nonce() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    (u128::from(h.finish()) << 64) | u128::from(std::process::id())
}

/// The signed admin API: a Python `requests` client following the README's recipe is
/// accepted; replays, stale timestamps, tampered body, query or path, wrong or expired
/// tokens are refused with 401, an auditor token's write with 403; every write is audited
/// with the token as actor.
#[test]
fn signed_api_accepts_the_recipe_and_refuses_tampering() {
    let lab = api_lab();
    let python = |method: &str, path: &str, body: Option<&str>| -> (u16, String) {
        let script = portcullis_e2e::repo_root().join("tests/clients/signed_api.py");
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &lab.ns_gw, "python3"])
            .arg(script)
            .args(["http://127.0.0.1:18080", "ops", API_SECRET, method, path]);
        if let Some(b) = body {
            cmd.arg(b);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (status, body) = text.split_once('\n').unwrap();
        (status.trim().parse().unwrap(), body.to_string())
    };
    let (status, body) = python("GET", "/api/v1/users?b=2&a=x%20y&%7Bk=1&z=%2B", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"alice\""), "{body}");

    // Rust client, same recipe.
    let ok = |lab: &Lab| {
        signed(
            lab,
            "ops",
            API_SECRET,
            "GET",
            "/api/v1/sessions?x=1",
            "",
            |_| {},
        )
    };
    assert_eq!(ok(&lab).0, 200);
    // Replay: a correctly signed request sent twice (same nonce).
    fn fixed_nonce(s: &mut [String; 5]) {
        s[2] = "replayed-nonce-0000000000000001".into();
        s[3] = portcullis_apiauth::sign(
            API_SECRET.as_bytes(),
            &portcullis_apiauth::string_to_sign(&portcullis_apiauth::Parts {
                token: "ops",
                timestamp: &s[1],
                nonce: &s[2],
                method: "GET",
                path: "/api/v1/sessions",
                query: None,
                body: b"",
            }),
        );
    }
    let send_fixed = || {
        signed(
            &lab,
            "ops",
            API_SECRET,
            "GET",
            "/api/v1/sessions",
            "",
            fixed_nonce,
        )
    };
    let (status, e) = send_fixed();
    assert_eq!(status, 200, "{e}");
    let (status, e) = send_fixed();
    assert_eq!(
        (status, e["error"].as_str()),
        (401, Some("nonce already used"))
    );
    for (what, tamper) in [
        (
            "stale",
            Box::new(|s: &mut [String; 5]| {
                s[1] = (chrono::Utc::now().timestamp() - 600).to_string()
            }) as Box<dyn Fn(&mut [String; 5])>,
        ),
        (
            "query",
            Box::new(|s: &mut [String; 5]| s[4] = "/api/v1/sessions?x=2".into()),
        ),
        (
            "path",
            Box::new(|s: &mut [String; 5]| s[4] = "/api/v1/users?x=1".into()),
        ),
        (
            "body",
            Box::new(|s: &mut [String; 5]| s[4] = "tamper-body".into()),
        ),
        (
            "signature",
            Box::new(|s: &mut [String; 5]| s[3] = base64_of_zeros()),
        ),
    ] {
        let (status, e) = signed(
            &lab,
            "ops",
            API_SECRET,
            "GET",
            "/api/v1/sessions?x=1",
            "",
            |s| tamper(s),
        );
        assert_eq!(status, 401, "{what}: {e}");
    }
    let (status, e) = signed(
        &lab,
        "ops",
        "not-the-secret-0123456789abcdefghij",
        "GET",
        "/api/v1/users",
        "",
        |_| {},
    );
    assert_eq!(
        (status, e["error"].as_str()),
        (401, Some("signature does not match the request"))
    );
    let (status, e) = signed(&lab, "old", API_SECRET, "GET", "/api/v1/users", "", |_| {});
    assert_eq!(
        (status, e["error"].as_str()),
        (401, Some("unknown or expired token"))
    );
    let (status, _) = signed(
        &lab,
        "audit",
        AUDIT_SECRET,
        "GET",
        "/api/v1/users",
        "",
        |_| {},
    );
    assert_eq!(status, 200);
    let (status, e) = signed(
        &lab,
        "audit",
        AUDIT_SECRET,
        "POST",
        "/api/v1/users/bob/disable",
        "",
        |_| {},
    );
    assert_eq!(status, 403, "{e}");
    let (status, e) = lab.http_with("GET", "/api/v1/users", &[], "").unwrap();
    assert_eq!(
        (status, e["error"].as_str()),
        (401, Some("missing Auth-Token header"))
    );
    // Without [admin] there is no bearer API at all.
    let (status, _) = lab
        .http("GET", "/admin/v1/users", "anything-0123456789", "")
        .unwrap();
    assert_eq!(status, 404);

    // A write through the Python client: bob is revoked, the audit names the token.
    let (status, body) = python("POST", "/api/v1/users/bob/disable", None);
    assert_eq!(status, 200, "{body}");
    let e = lab
        .wait_event(Duration::from_secs(2), |e| {
            is(e, "user_revoked") && e["user"] == "bob"
        })
        .unwrap();
    assert_eq!(e["source"], "api:ops");
    let e = lab
        .wait_event(Duration::from_secs(2), |e| {
            is(e, "admin_action") && e["outcome"] == "ok"
        })
        .unwrap();
    assert_eq!(
        (
            e["actor"].as_str(),
            e["action"].as_str(),
            e["target"].as_str()
        ),
        (
            Some("api:ops"),
            Some("POST /users/{name}/disable"),
            Some("/api/v1/users/bob/disable")
        )
    );
    let refused = lab
        .events()
        .into_iter()
        .find(|e| is(e, "admin_action") && e["actor"] == "api:audit");
    assert!(
        refused.is_none(),
        "a refused authentication is not an admin action"
    );
}

fn base64_of_zeros() -> String {
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()
}

/// The element of a JSON array whose `name` is `name`.
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no {name:?} in {list}"))
}

/// The policy set managed through the signed API: read (auditor), validate, a refused
/// set changes nothing, a stale `If-Match` is refused, a replacement applies at once and
/// cuts the flows it no longer allows, and is on disk; networks and groups read back;
/// the audit queries answer from ClickHouse under the same signatures.
#[test]
fn api_manages_policies_and_answers_audit_queries() {
    let ch = portcullis_testkit::ClickHouse::start().unwrap();
    let lab = Lab::start_audited(api_options(), &ch).unwrap();
    let out = lab.audit(&["migrate"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ops = |method: &str, pq: &str, body: &str, extra: &[(&str, &str)]| {
        signed_with(&lab, "ops", API_SECRET, method, pq, body, extra, |_| {})
    };
    let auditor = |method: &str, pq: &str, body: &str| {
        signed(&lab, "audit", AUDIT_SECRET, method, pq, body, |_| {})
    };
    let mut conn = lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(5))
        .unwrap();
    assert_eq!(echo_round_trip(&mut conn, b"before").unwrap(), b"before");

    // Read: the files, their version, and the running set with locations.
    let (status, p) = auditor("GET", "/api/v1/policies", "");
    assert_eq!(status, 200, "{p}");
    let version = p["version"].as_str().unwrap().to_string();
    let access = p["files"]["policies"]["access.cedar"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(access.contains("@id(\"sre-prod\")"));
    let sre = p["running"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "sre-prod")
        .unwrap();
    assert_eq!(
        (sre["file"].as_str(), sre["effect"].as_str()),
        (Some("access.cedar"), Some("permit"))
    );
    let (status, nets) = auditor("GET", "/api/v1/networks", "");
    assert_eq!(status, 200);
    let prod = named(&nets, "prod");
    assert_eq!(prod["cidrs"][0], "10.8.0.0/16");
    let (status, groups) = auditor("GET", "/api/v1/groups", "");
    assert_eq!(status, 200);
    let sre = named(&groups, "sre");
    assert_eq!(sre["members"], serde_json::json!(["alice"]));
    assert_eq!(sre["in_policies"], true);

    // A set with an error on line 3 of access.cedar: located, and nothing changes.
    let mut files = p["files"].clone();
    let broken = access.replacen("permit", "permt", 1);
    let broken_line = broken.lines().position(|l| l.contains("permt")).unwrap() + 1;
    files["policies"]["access.cedar"] = Value::String(broken);
    let (status, v) = ops("POST", "/api/v1/policies/validate", &files.to_string(), &[]);
    assert_eq!((status, &v["valid"]), (200, &Value::Bool(false)), "{v}");
    assert_eq!(v["errors"][0]["file"], "access.cedar", "{v}");
    assert_eq!(v["errors"][0]["line"], broken_line, "{v}");
    let (status, v) = ops("PUT", "/api/v1/policies", &files.to_string(), &[]);
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["errors"][0]["line"], broken_line, "{v}");
    let (_, now) = auditor("GET", "/api/v1/policies", "");
    assert_eq!(
        now["version"],
        version.as_str(),
        "a refused set changed the directory"
    );
    // Unknown fields and path-like names are refused at the edge.
    let (status, v) = ops(
        "PUT",
        "/api/v1/policies",
        r#"{"schema":"","policies":{},"extra":1}"#,
        &[],
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("unknown field"),
        "{v}"
    );
    let mut sneaky = p["files"].clone();
    sneaky["policies"]["../escape.cedar"] = Value::String(String::new());
    let (status, v) = ops("PUT", "/api/v1/policies", &sneaky.to_string(), &[]);
    assert_eq!(status, 400, "{v}");
    assert!(!lab.policy_dir().join("../escape.cedar").exists());

    // Without sre-prod: a stale If-Match is refused, the right one applies at once.
    let without: String = access
        .split("\n\n")
        .filter(|stmt| !stmt.contains("@id(\"sre-prod\")"))
        .collect::<Vec<_>>()
        .join("\n\n");
    let mut files = p["files"].clone();
    files["policies"]["access.cedar"] = Value::String(without.clone());
    let (status, v) = ops(
        "PUT",
        "/api/v1/policies",
        &files.to_string(),
        &[("If-Match", "\"0000\"")],
    );
    assert_eq!(status, 412, "{v}");
    let (status, v) = auditor("PUT", "/api/v1/policies", &files.to_string());
    assert_eq!(status, 403, "{v}");
    let quoted = format!("\"{version}\"");
    let (status, v) = ops(
        "PUT",
        "/api/v1/policies",
        &files.to_string(),
        &[("If-Match", &quoted)],
    );
    assert_eq!(status, 200, "{v}");
    assert!(v["flows_cut"].as_u64().unwrap() >= 1, "{v}");
    expect_reset(&mut conn, Duration::from_secs(1));
    assert!(lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(2))
        .is_err());
    assert_eq!(
        std::fs::read_to_string(lab.policy_dir().join("access.cedar")).unwrap(),
        without
    );
    lab.wait_event(Duration::from_secs(2), |e| {
        is(e, "admin_action")
            && e["action"] == "PUT /policies"
            && e["actor"] == "api:ops"
            && e["outcome"] == "ok"
    })
    .unwrap();
    let (_, after) = auditor("GET", "/api/v1/policies", "");
    assert_eq!(after["version"], v["version"]);
    assert!(after["running"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["id"] != "sre-prod"));

    // Audit queries through the same signatures: alice's allowed flow and her denied one.
    let mut rows = Value::Null;
    portcullis_e2e::wait_until(Duration::from_secs(20), || {
        let (status, t) = auditor(
            "GET",
            "/api/v1/audit/events?user=alice&dst=10.8.0.0/16&decision=deny",
            "",
        );
        rows = t;
        Ok(status == 200 && rows["rows"].as_array().is_some_and(|r| !r.is_empty()))
    })
    .unwrap_or_else(|e| panic!("{e}: {rows}"));
    let (status, t) = auditor(
        "GET",
        "/api/v1/audit/reports/who-reached?dst=10.8.0.0/16",
        "",
    );
    assert_eq!(status, 200, "{t}");
    assert!(t.to_string().contains("alice"), "{t}");
    let (status, t) = auditor("GET", "/api/v1/audit/events?port=notaport", "");
    assert_eq!(status, 400, "{t}");
}

/// The browser's side of a login and an enrollment (`tests/clients/saml_enroll.py`).
fn saml_enroll(lab: &Lab, user: &str, name: &str, public_key: &str, tamper: bool) -> Value {
    let mut args = vec![name, public_key];
    if tamper {
        args.push("--tamper");
    }
    lab.sign_on_client("saml_enroll.py", user, &args).unwrap()
}

/// SAML sign-on against a real SimpleSAMLphp IdP (metadata fetched from its URL), driven
/// without a browser: a tampered
/// response is refused and audited; alice (unknown to the gateway until she signs in,
/// group sre from the IdP) enrolls her device's own key; the profile she gets works with
/// wireguard-go and reaches exactly what her groups allow; the device expires with her
/// sign-in. Her password-only sign-on keeps her out of prod-admin (MFA within 12 h), where
/// carol's, which states a second factor, lets her device in.
#[test]
fn saml_login_enrolls_a_device_that_reaches_what_the_groups_allow() {
    let lab = Lab::start(LabOptions {
        extra_config: SIGN_ON_CONFIG.into(),
        alice_from_identity_source: true,
        saml_idp: true,
        ..LabOptions::default()
    })
    .unwrap();
    // The SP's metadata names its ACS.
    let (status, _) = lab.http("GET", "/saml/metadata", "", "").unwrap();
    assert_eq!(status, 200);

    // A tampered response (her group changed after signing): refused, audited, no session.
    let v = saml_enroll(&lab, "alice", "x", "", true);
    assert_eq!(v["acs_status"], 403, "{}", v["page"]);
    assert!(v["page"].as_str().unwrap().contains("Sign-in refused"));
    assert!(v.get("enroll_status").is_none());
    let e = lab
        .wait_event(Duration::from_secs(2), |e| is(e, "login_failed"))
        .unwrap();
    assert_eq!(e["method"], "saml");

    // alice signs in and enrolls the key her device made.
    let (private, public) = portcullis_e2e::wg_genkey().unwrap();
    let v = saml_enroll(&lab, "alice", "laptop", &public, false);
    assert_eq!(v["acs_status"], 303, "{}", v["page"]);
    assert_eq!(v["enroll_status"], 201, "{}", v["enroll_page"]);
    assert_eq!(v["forged_csrf_status"], 400);
    let profile = v["profile"].as_str().unwrap();
    assert!(profile.contains("Address = 100.64.0.129/32"), "{profile}");
    assert!(profile.contains(&lab.gateway_public_key), "{profile}");
    assert!(!profile.contains(&private));
    // AllowedIPs: the tunnel and what sre may reach (prod, the resolver), not dev.
    let allowed = profile
        .lines()
        .find(|l| l.starts_with("AllowedIPs"))
        .unwrap();
    assert!(
        allowed.contains("10.8.0.0/16") && allowed.contains("10.53.0.53/32"),
        "{allowed}"
    );
    assert!(!allowed.contains("10.9.0.0/16"), "{allowed}");
    let enroll_page = v["enroll_page"].as_str().unwrap();
    assert!(enroll_page.contains("<svg"), "no QR code");
    assert!(v["devices_page"].as_str().unwrap().contains(&public));
    let e = lab
        .wait_event(Duration::from_secs(2), |e| is(e, "login_succeeded"))
        .unwrap();
    assert_eq!(
        (e["user"].as_str(), e["method"].as_str()),
        (Some("alice"), Some("saml"))
    );
    // The device lasts as long as the sign-in (login_max_secs = 1 h here), not 12 h.
    let d = lab
        .wait_event(Duration::from_secs(2), |e| {
            is(e, "key_rotated") && e["device"] == public.as_str()
        })
        .unwrap();
    let expires: chrono::DateTime<chrono::Utc> = d["expires_at"].as_str().unwrap().parse().unwrap();
    let left = expires - chrono::Utc::now();
    assert!(
        left <= chrono::TimeDelta::hours(1) && left > chrono::TimeDelta::minutes(55),
        "expires in {left}"
    );

    // The profile as handed out, with her private key: prod (sre) yes, dev no.
    lab.use_profile(&lab.alice, profile, Some(&private), None)
        .unwrap();
    assert!(reaches_prod(&lab, &lab.alice, Duration::from_secs(10)));
    let mut conn = lab
        .connect(&lab.alice, addr("10.8.0.2:8080"), Duration::from_secs(5))
        .unwrap();
    assert_eq!(echo_round_trip(&mut conn, b"via sso").unwrap(), b"via sso");
    assert!(lab
        .connect(&lab.alice, addr("10.9.0.2:443"), Duration::from_secs(2))
        .is_err());
    // SimpleSAMLphp signed her on with a password only (no second factor in its
    // AuthnContextClassRef): prod-admin, which needs MFA from the last 12 h, is denied,
    // and the trail names that policy.
    assert!(lab
        .connect(&lab.alice, addr("10.8.100.5:22"), Duration::from_secs(1))
        .is_err());
    let denied = lab
        .wait_event(Duration::from_secs(3), |e| {
            is(e, "flow_denied") && e["dst_ip"] == "10.8.100.5"
        })
        .unwrap();
    assert_eq!(
        denied["policy_ids"],
        serde_json::json!(["prod-admin-needs-recent-mfa"]),
        "{denied}"
    );

    // carol's IdP sign-on states REFEDS MFA: her device, in bob's namespace with the
    // profile she got, is let into prod-admin by the same policies.
    let (carol_private, carol_public) = portcullis_e2e::wg_genkey().unwrap();
    let v = saml_enroll(&lab, "carol", "laptop", &carol_public, false);
    assert_eq!(v["enroll_status"], 201, "{}", v["enroll_page"]);
    lab.use_profile(
        &lab.bob,
        v["profile"].as_str().unwrap(),
        Some(&carol_private),
        Some(&lab.bob.endpoint),
    )
    .unwrap();
    assert!(reaches_prod(&lab, &lab.bob, Duration::from_secs(10)));
    let _ = lab.connect(&lab.bob, addr("10.8.100.5:22"), Duration::from_secs(1));
    let opened = lab
        .wait_event(Duration::from_secs(3), |e| {
            is(e, "flow_opened") && e["dst_ip"] == "10.8.100.5" && e["user"] == "carol"
        })
        .unwrap();
    assert_eq!(
        opened["policy_ids"],
        serde_json::json!(["sre-prod"]),
        "{opened}"
    );
}

/// An IdP whose metadata URL does not answer at start: the gateway starts and forwards as
/// usual; only sign-on answers 503 until the IdP is back.
#[test]
fn an_unreachable_idp_at_start_keeps_the_gateway_up() {
    let closed = portcullis_testkit::free_port().unwrap();
    let lab = Lab::start(LabOptions {
        extra_config: format!(
            "[http]\nlisten = \"127.0.0.1:18080\"\n\
            [devices]\npool = \"100.64.0.128/26\"\nendpoint = \"192.168.77.1:51820\"\n\
            [saml]\nidp_metadata = \"http://127.0.0.1:{closed}/metadata\"\n\
            base_url = \"http://127.0.0.1:18080\"\n"
        ),
        ..LabOptions::default()
    })
    .unwrap();
    assert!(reaches_prod(&lab, &lab.alice, Duration::from_secs(10)));
    let (status, _) = lab.http("GET", "/saml/login", "", "").unwrap();
    assert_eq!(status, 503);
    let (status, _) = lab.http("GET", "/enroll", "", "").unwrap();
    assert_eq!(status, 303, "no session: sent to sign in");
}

mod fuzz;
mod hardening;
