//! End to end, three gateway nodes on one PostgreSQL 15 (see `tests/cluster.rs` for the
//! topology): a change made on one node takes effect on every node. Needs root.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portcullis_e2e::cluster::{
    ClusterLab, ClusterOptions, ADMIN_TOKEN, IDP_METADATA_URL, SCIM_TOKEN,
};
use portcullis_e2e::{echo_round_trip, expect_reset, wait_until, wg_genkey};
use serde_json::Value;

fn prod_ssh() -> SocketAddr {
    "10.8.0.2:22".parse().unwrap()
}

/// The users every node's SCIM lists (all pages), as (id, userName, active), sorted.
fn scim_users(lab: &ClusterLab, node: usize) -> Vec<(String, String, bool)> {
    let mut users = Vec::new();
    loop {
        let (status, list) = lab
            .http(
                node,
                "GET",
                &format!("/scim/v2/Users?startIndex={}&count=500", users.len() + 1),
                SCIM_TOKEN,
                "",
            )
            .unwrap();
        assert_eq!(status, 200, "{list}");
        let page = list["Resources"].as_array().cloned().unwrap_or_default();
        users.extend(page.iter().map(|u| {
            (
                u["id"].as_str().unwrap().to_string(),
                u["userName"].as_str().unwrap().to_string(),
                u["active"].as_bool().unwrap(),
            )
        }));
        let total = list["totalResults"].as_u64().unwrap() as usize;
        if page.is_empty() || users.len() >= total {
            break;
        }
    }
    users.sort();
    users
}

fn same_users_everywhere(lab: &ClusterLab) -> Vec<(String, String, bool)> {
    let mut last = Vec::new();
    wait_until(Duration::from_secs(5), || {
        let all: Vec<_> = (0..lab.nodes.len()).map(|i| scim_users(lab, i)).collect();
        last = all[0].clone();
        Ok(all.iter().all(|u| *u == all[0]))
    })
    .expect("every node lists the same users");
    last
}

#[test]
fn scim_on_one_node_grants_and_cuts_a_connection_held_through_another() {
    let (alice_key, alice_pub) = wg_genkey().unwrap();
    let mut lab = ClusterLab::start(ClusterOptions {
        extra_config: format!(
            "[[peer]]\nuser = \"alice\"\npublic_key = \"{alice_pub}\"\naddress = \"100.64.0.2\"\n"
        ),
        ..ClusterOptions::default()
    })
    .unwrap();
    // alice's device talks to node C only.
    let alice = lab
        .add_client("alice", &alice_key, "100.64.0.2", 2)
        .unwrap();

    // The IdP provisions her through node A.
    let (status, user) = lab
        .http(
            0,
            "POST",
            "/scim/v2/Users",
            SCIM_TOKEN,
            r#"{"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "alice", "externalId": "00u1", "active": true}"#,
        )
        .unwrap();
    assert_eq!(status, 201, "{user}");
    let id = user["id"].as_str().unwrap().to_string();
    let (status, group) = lab
        .http(
            0,
            "POST",
            "/scim/v2/Groups",
            SCIM_TOKEN,
            &format!(r#"{{"displayName": "sre", "members": [{{"value": "{id}"}}]}}"#),
        )
        .unwrap();
    assert_eq!(status, 201, "{group}");
    // Node B sees her with the same stable id, and so does C.
    let users = same_users_everywhere(&lab);
    assert_eq!(users, vec![(id.clone(), "alice".to_string(), true)]);

    // Through C she reaches prod (wireguard-go retries its handshake every 5 s).
    let mut s = None;
    wait_until(Duration::from_secs(20), || {
        s = lab
            .connect(&alice, prod_ssh(), Duration::from_millis(900))
            .ok();
        Ok(s.is_some())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", lab.nodes[2].log()));
    let mut s = s.unwrap();
    assert_eq!(echo_round_trip(&mut s, b"granted").unwrap(), b"granted");

    // Deactivated through node A: C cuts her live connection.
    let (status, off) = lab
        .http(
            0,
            "PATCH",
            &format!("/scim/v2/Users/{id}"),
            SCIM_TOKEN,
            r#"{"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{"op": "replace", "path": "active", "value": false}]}"#,
        )
        .unwrap();
    assert_eq!(
        (status, off["active"].as_bool()),
        (200, Some(false)),
        "{off}"
    );
    let after = expect_reset(&mut s, Duration::from_secs(2)).unwrap();
    eprintln!("cut on node C {after:?} after node A answered");
    assert!(lab
        .connect(&alice, prod_ssh(), Duration::from_millis(900))
        .is_err());
    // C's audit trail says who and where from.
    let events = std::fs::read_to_string(lab.nodes[2].dir.join("events.jsonl")).unwrap();
    let revoked: Value = events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["type"] == "user_revoked")
        .expect("node C recorded the revocation");
    assert_eq!(revoked["user"], "alice");
    assert_eq!(revoked["gateway"], "gw-c", "{revoked}");
    assert_eq!(
        same_users_everywhere(&lab),
        vec![(id, "alice".to_string(), false)]
    );

    // Every node is up in GET /cluster (asked of B) with nothing left to apply.
    wait_until(Duration::from_secs(5), || {
        let (status, c) = lab
            .http(1, "GET", "/admin/v1/cluster", ADMIN_TOKEN, "")
            .unwrap();
        assert_eq!(status, 200, "{c}");
        let nodes = c["nodes"].as_array().unwrap();
        Ok(nodes.len() == 3 && nodes.iter().all(|n| n["state"] == "up" && n["lag"] == 0))
    })
    .unwrap();

    // A node killed and restarted reads the shared directory again.
    lab.kill_node(1).unwrap();
    wait_until(Duration::from_secs(10), || {
        let (_, c) = lab
            .http(0, "GET", "/admin/v1/cluster", ADMIN_TOKEN, "")
            .unwrap();
        Ok(c["nodes"][1]["state"] == "down")
    })
    .unwrap();
    lab.start_node(1).unwrap();
    assert_eq!(scim_users(&lab, 1), scim_users(&lab, 0));
    let out = lab.cli(1, &["cluster", "status"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for n in ["gw-a", "gw-b", "gw-c"] {
        assert!(text.contains(n), "{text}");
    }
}

/// SCIM-provisions `name` into `group` through `node`; returns the user's id.
fn provision(lab: &ClusterLab, node: usize, name: &str, group: &str) -> String {
    lab.provision(node, name, group).unwrap()
}

fn open_when_granted(
    lab: &ClusterLab,
    c: &portcullis_e2e::Client,
    node: usize,
) -> std::net::TcpStream {
    let mut s = lab
        .open_when_granted(c, prod_ssh())
        .unwrap_or_else(|e| panic!("{e}: {}", lab.nodes[node].log()));
    assert_eq!(echo_round_trip(&mut s, b"granted").unwrap(), b"granted");
    s
}

#[test]
fn a_policy_replacement_through_one_node_re_decides_flows_on_the_others() {
    let (laptop_key, laptop_pub) = wg_genkey().unwrap();
    let (phone_key, phone_pub) = wg_genkey().unwrap();
    let mut lab = ClusterLab::start(ClusterOptions {
        extra_config: format!(
            "[[peer]]\nuser = \"alice\"\npublic_key = \"{laptop_pub}\"\naddress = \"100.64.0.2\"\n\
             [[peer]]\nuser = \"alice\"\npublic_key = \"{phone_pub}\"\naddress = \"100.64.0.4\"\n"
        ),
        ..ClusterOptions::default()
    })
    .unwrap();
    let laptop = lab
        .add_client("alice", &laptop_key, "100.64.0.2", 2)
        .unwrap();
    let phone = lab
        .add_client("alice", &phone_key, "100.64.0.4", 0)
        .unwrap();
    provision(&lab, 1, "alice", "sre");
    let mut on_c = open_when_granted(&lab, &laptop, 2);
    let mut on_a = open_when_granted(&lab, &phone, 0);

    // Every node runs the set the first node seeded, under one version.
    let versions: Vec<String> = (0..3)
        .map(|i| {
            let (status, p) = lab
                .http(i, "GET", "/admin/v1/policies", ADMIN_TOKEN, "")
                .unwrap();
            assert_eq!(status, 200, "{p}");
            p["version"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(versions.iter().all(|v| *v == versions[0]), "{versions:?}");
    let (_, current) = lab
        .http(1, "GET", "/admin/v1/policies", ADMIN_TOKEN, "")
        .unwrap();
    let mut files = current["files"].clone();
    let access = files["policies"]["access.cedar"]
        .as_str()
        .unwrap()
        .to_string();
    files["policies"]["access.cedar"] = Value::String(access.replace(
        "permit (principal in Group::\"sre\", action == Action::\"connect\", resource in Network::\"prod\");",
        "permit (principal in Group::\"sre\", action == Action::\"connect\", resource in Network::\"staging\");",
    ));
    // A stale If-Match is refused by the cluster, whichever node is asked.
    let (status, e) = lab
        .http_with(
            1,
            "PUT",
            "/admin/v1/policies",
            &[("If-Match", "\"0000\"")],
            &files.to_string(),
        )
        .unwrap();
    assert_eq!(status, 412, "{e}");
    let (status, put) = lab
        .http_with(
            1,
            "PUT",
            "/admin/v1/policies",
            &[("If-Match", &format!("\"{}\"", versions[0]))],
            &files.to_string(),
        )
        .unwrap();
    assert_eq!(status, 200, "{put}");
    // The flows through A and C are cut without anything asked of them.
    expect_reset(&mut on_c, Duration::from_secs(3)).unwrap();
    expect_reset(&mut on_a, Duration::from_secs(3)).unwrap();
    let new_version = put["version"].as_str().unwrap().to_string();
    wait_until(Duration::from_secs(5), || {
        Ok((0..3).all(|i| {
            let (_, p) = lab
                .http(i, "GET", "/admin/v1/policies", ADMIN_TOKEN, "")
                .unwrap();
            p["version"] == new_version.as_str()
        }))
    })
    .unwrap();
    // Node A's directory holds the new files too (its local copy), and a node that
    // starts later adopts the cluster's set over its own directory.
    let on_disk = std::fs::read_to_string(lab.nodes[0].dir.join("policies/access.cedar")).unwrap();
    assert!(on_disk.contains("Network::\"staging\");"), "{on_disk}");
    lab.stop_node(2);
    std::fs::copy(
        portcullis_e2e::repo_root().join("policies/access.cedar"),
        lab.nodes[2].dir.join("policies/access.cedar"),
    )
    .unwrap();
    lab.start_node(2).unwrap();
    let (_, p) = lab
        .http(2, "GET", "/admin/v1/policies", ADMIN_TOKEN, "")
        .unwrap();
    assert_eq!(p["version"], new_version.as_str());
}

const API_SECRET: &str = "api-secret-0123456789abcdef0123456789";

/// A request signed as the README's recipe says, sent as is to node `node`.
fn signed_to(
    lab: &ClusterLab,
    node: usize,
    headers: &[(String, String)],
    method: &str,
    path: &str,
) -> (u16, Value) {
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    portcullis_e2e::http_in(&lab.nodes[node].ns, method, path, &h, "").unwrap()
}

fn sign(method: &str, path: &str, nonce: &str) -> Vec<(String, String)> {
    let ts = chrono::Utc::now().timestamp().to_string();
    let t = portcullis_apiauth::ApiToken::new(
        "ops",
        API_SECRET,
        portcullis_apiauth::Scope::Admin,
        None,
    );
    let sig = t.sign(&portcullis_apiauth::Parts {
        token: "ops",
        timestamp: &ts,
        nonce,
        method,
        path,
        query: None,
        body: b"",
    });
    vec![
        ("Auth-Token".into(), "ops".into()),
        ("Auth-Timestamp".into(), ts),
        ("Auth-Nonce".into(), nonce.to_string()),
        ("Auth-Signature".into(), sig),
    ]
}

#[test]
fn a_signed_request_replayed_against_another_node_is_refused_and_a_login_crosses_nodes() {
    let mut lab = ClusterLab::start(ClusterOptions {
        extra_config: format!(
            "[api]\ntokens_file = \"api.tokens\"\n\
            [devices]\npool = \"100.64.0.128/26\"\nendpoint = \"192.168.71.1:51820\"\n\
            [saml]\nidp_metadata = \"{IDP_METADATA_URL}\"\nbase_url = \"http://127.0.0.1:18080\"\n\
            user_attribute = \"uid\"\nlogin_max_secs = 3600\n"
        ),
        files: vec![(
            "api.tokens".into(),
            format!("[[token]]\nid = \"ops\"\nsecret = \"{API_SECRET}\"\nscope = \"admin\"\n"),
        )],
        saml_idp: true,
        ..ClusterOptions::default()
    })
    .unwrap();

    // The IdP metadata URL was fetched once, by the first node; the others started
    // from the copy it shared.
    let fetches = || lab.metadata_fetches.lock().unwrap().clone();
    assert_eq!(fetches().len(), 1, "{:?}", fetches());
    // The refresh is the lease holder's alone: with the shared copy made stale, one
    // fetch follows, from the holder, and no other node fetches.
    let mut fetcher = None;
    wait_until(Duration::from_secs(15), || {
        fetcher = holder(&lab, 1, "saml-metadata");
        Ok(fetcher.is_some())
    })
    .unwrap();
    let fetcher = fetcher.unwrap();
    lab.postgres
        .psql(
            "portcullis",
            "UPDATE meta SET value = jsonb_set(value::jsonb, '{fetched_at}', '\"2000-01-01T00:00:00Z\"')::text WHERE key = 'saml.idp_metadata'",
        )
        .unwrap();
    wait_until(Duration::from_secs(15), || Ok(fetches().len() == 2)).unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let f = fetches();
    assert_eq!(f.len(), 2, "{f:?}");
    assert_eq!(
        f[1].to_string(),
        format!("172.31.0.1{}", fetcher + 1),
        "fetched by the holder, node {fetcher}"
    );

    // One signed request: accepted by A, refused by B and C (and by A again).
    let request = sign("GET", "/api/v1/cluster", "0123456789abcdef0123456789abcdef");
    let (status, body) = signed_to(&lab, 0, &request, "GET", "/api/v1/cluster");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["nodes"].as_array().unwrap().len(), 3, "{body}");
    for node in [1, 2, 0] {
        let (status, body) = signed_to(&lab, node, &request, "GET", "/api/v1/cluster");
        assert_eq!(status, 401, "node {node}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("nonce already used"),
            "{body}"
        );
    }
    // A fresh nonce is accepted by B.
    let fresh = sign("GET", "/api/v1/cluster", "fedcba9876543210fedcba9876543210");
    assert_eq!(signed_to(&lab, 1, &fresh, "GET", "/api/v1/cluster").0, 200);

    // A login started on A (the browser is sent to the IdP), answered to B (a load
    // balancer sent the POST there): B accepts it and its cookie works on C.
    let script = portcullis_e2e::repo_root().join("tests/clients/saml_login.py");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.nodes[0].ns, "python3"])
        .arg(script)
        .args([
            "http://127.0.0.1:18080/saml/login?return=/enroll",
            "alice",
            "alice-password",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let form = format!(
        "SAMLResponse={}&RelayState={}",
        urlencode(answer["SAMLResponse"].as_str().unwrap()),
        urlencode(answer["RelayState"].as_str().unwrap_or(""))
    );
    let post = |node: usize| {
        raw_in(
            &lab.nodes[node].ns,
            &format!(
                "POST /saml/acs HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
                form.len()
            ),
        )
    };
    let on_b = post(1);
    assert!(on_b.starts_with("HTTP/1.1 303"), "{on_b}");
    let cookie = on_b
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_string();
    // The same answer posted again, to C: its request and assertion are used up.
    let again = post(2);
    assert!(again.starts_with("HTTP/1.1 403"), "{again}");
    // B's session cookie on C: the enrollment page, signed in as alice.
    let page = raw_in(
        &lab.nodes[2].ns,
        &format!(
            "GET /enroll HTTP/1.1\r\nHost: gw\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("alice"), "{page}");
    // Signed out on A: the cookie no longer works anywhere.
    raw_in(
        &lab.nodes[0].ns,
        &format!("GET /saml/logout HTTP/1.1\r\nHost: gw\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"),
    );
    let page = raw_in(
        &lab.nodes[1].ns,
        &format!(
            "GET /enroll HTTP/1.1\r\nHost: gw\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(page.starts_with("HTTP/1.1 303"), "{page}");

    // Without the database a node accepts no signed request (fail closed).
    lab.postgres.stop();
    let (status, body) = signed_to(
        &lab,
        2,
        &sign("GET", "/api/v1/users", "00000000000000000000000000000042"),
        "GET",
        "/api/v1/users",
    );
    assert_eq!(status, 503, "{body}");
    lab.postgres.resume().unwrap();
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One raw HTTP/1.1 exchange with 127.0.0.1:18080 inside `ns`: the whole answer.
fn raw_in(ns: &str, request: &str) -> String {
    let request = request.to_string();
    portcullis_e2e::in_ns(ns, move || {
        use std::io::Write as _;
        let mut s = std::net::TcpStream::connect("127.0.0.1:18080").unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .unwrap()
}

fn person(uid: &str) -> String {
    format!(
        "dn: uid={uid},ou=people,dc=example,dc=org\nchangetype: add\nobjectClass: inetOrgPerson\n\
         uid: {uid}\ncn: {uid}\nsn: {uid}\nmail: {uid}@example.org\n\n"
    )
}

/// The node holding lease `name`, as node `asked` sees the cluster.
fn holder(lab: &ClusterLab, asked: usize, name: &str) -> Option<usize> {
    let (status, c) = lab
        .http(asked, "GET", "/admin/v1/cluster", ADMIN_TOKEN, "")
        .ok()?;
    if status != 200 {
        return None;
    }
    let lease = c["leases"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == name && l["held"] == true)?;
    let id = lease["holder"].as_str()?;
    lab.nodes.iter().position(|n| n.node_id == id)
}

#[test]
fn the_ldap_consumer_moves_to_another_node_when_its_holder_is_killed() {
    let (alice_key, alice_pub) = wg_genkey().unwrap();
    let mut lab = ClusterLab::start(ClusterOptions {
        extra_config: format!(
            "[ldap]\nurl = \"{{ldap_url}}\"\nbind_dn = \"{dn}\"\npassword_file = \"ldap.pw\"\n\
             user_base = \"ou=people,dc=example,dc=org\"\ngroup_base = \"ou=groups,dc=example,dc=org\"\n\
             [[peer]]\nuser = \"alice\"\npublic_key = \"{alice_pub}\"\naddress = \"100.64.0.2\"\n",
            dn = portcullis_testkit::Slapd::ADMIN_DN
        ),
        slapd: true,
        ..ClusterOptions::default()
    })
    .unwrap();
    let slapd = lab.slapd.as_ref().unwrap();
    slapd
        .modify(&format!(
            "{}{}dn: cn=sre,ou=groups,dc=example,dc=org\nchangetype: add\nobjectClass: groupOfNames\ncn: sre\nmember: uid=alice,ou=people,dc=example,dc=org\nmember: uid=erin,ou=people,dc=example,dc=org\n",
            person("alice"),
            person("erin"),
        ))
        .unwrap();
    // Exactly one node consumes the directory.
    let mut first = None;
    wait_until(Duration::from_secs(15), || {
        first = holder(&lab, 0, "ldap-sync");
        Ok(first.is_some())
    })
    .unwrap();
    let first = first.unwrap();
    // alice's device talks to another node, which learns of her through the database.
    let via = (first + 1) % 3;
    let alice = lab
        .add_client("alice", &alice_key, "100.64.0.2", via)
        .unwrap();
    let mut s = open_when_granted(&lab, &alice, via);

    // The consumer dies; while nobody consumes, alice leaves sre in the directory.
    lab.kill_node(first).unwrap();
    let killed = Instant::now();
    lab.slapd
        .as_ref()
        .unwrap()
        .modify("dn: cn=sre,ou=groups,dc=example,dc=org\nchangetype: modify\ndelete: member\nmember: uid=alice,ou=people,dc=example,dc=org\n")
        .unwrap();
    let survivor = (first + 2) % 3;
    let mut next = None;
    wait_until(Duration::from_secs(12), || {
        next = holder(&lab, survivor, "ldap-sync").filter(|h| *h != first);
        Ok(next.is_some())
    })
    .unwrap();
    let took = killed.elapsed();
    eprintln!("ldap consumer taken over after {took:?}");
    assert!(took <= Duration::from_secs(10), "{took:?}");
    // It resumed from the mirror the dead consumer saved (its cookies), not from an
    // empty one: alice, erin and sre restored.
    let next = next.unwrap();
    let mut ldap = Value::Null;
    wait_until(Duration::from_secs(10), || {
        ldap = lab.http(next, "GET", "/admin/v1/ldap", ADMIN_TOKEN, "")?.1;
        Ok(ldap["resumed"] == true)
    })
    .unwrap_or_else(|e| panic!("{e}: {ldap}"));
    assert!(ldap["restored_entries"].as_u64().unwrap() >= 3, "{ldap}");
    // The change made while nobody consumed is not missed: her connection is cut.
    expect_reset(&mut s, Duration::from_secs(15)).unwrap();
    let users = scim_users_via_admin(&lab, via);
    assert!(users.contains(&"erin".to_string()), "{users:?}");
}

/// User names as node `node`'s admin API lists them.
fn scim_users_via_admin(lab: &ClusterLab, node: usize) -> Vec<String> {
    let (status, list) = lab
        .http(node, "GET", "/admin/v1/users", ADMIN_TOKEN, "")
        .unwrap();
    assert_eq!(status, 200, "{list}");
    list.as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["name"].as_str().map(str::to_string))
        .collect()
}

fn still_echoes(s: &mut std::net::TcpStream, what: &str) {
    assert_eq!(
        echo_round_trip(s, what.as_bytes()).unwrap_or_else(|e| panic!("{what}: {e}")),
        what.as_bytes()
    );
}

#[test]
fn postgresql_stopped_for_a_minute_deprovisions_nobody_and_a_revocation_reaches_every_node() {
    let keys: Vec<(String, String)> = (0..3).map(|_| wg_genkey().unwrap()).collect();
    let mut lab = ClusterLab::start(ClusterOptions {
        extra_config: format!(
            "[[peer]]\nuser = \"alice\"\npublic_key = \"{}\"\naddress = \"100.64.0.2\"\n\
             [[peer]]\nuser = \"bob\"\npublic_key = \"{}\"\naddress = \"100.64.0.3\"\n\
             [[peer]]\nuser = \"bob\"\npublic_key = \"{}\"\naddress = \"100.64.0.4\"\n",
            keys[0].1, keys[1].1, keys[2].1
        ),
        ..ClusterOptions::default()
    })
    .unwrap();
    let alice = lab
        .add_client("alice", &keys[0].0, "100.64.0.2", 1)
        .unwrap();
    let bob_a = lab.add_client("bob", &keys[1].0, "100.64.0.3", 0).unwrap();
    let bob_c = lab.add_client("bob", &keys[2].0, "100.64.0.4", 2).unwrap();
    let alice_id = provision(&lab, 0, "alice", "sre");
    let (status, bob) = lab
        .http(
            0,
            "POST",
            "/scim/v2/Users",
            SCIM_TOKEN,
            r#"{"userName": "bob", "active": true}"#,
        )
        .unwrap();
    assert_eq!(status, 201, "{bob}");
    let bob_id = bob["id"].as_str().unwrap().to_string();
    let (_, groups) = lab
        .http(0, "GET", "/scim/v2/Groups", SCIM_TOKEN, "")
        .unwrap();
    let sre = groups["Resources"][0]["id"].as_str().unwrap().to_string();
    let (status, g) = lab
        .http(
            0,
            "PATCH",
            &format!("/scim/v2/Groups/{sre}"),
            SCIM_TOKEN,
            &format!(r#"{{"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{{"op": "add", "path": "members", "value": [{{"value": "{bob_id}"}}]}}]}}"#),
        )
        .unwrap();
    assert_eq!(status, 200, "{g}");
    let mut via_b = open_when_granted(&lab, &alice, 1);
    let mut bob_on_a = open_when_granted(&lab, &bob_a, 0);
    let mut bob_on_c = open_when_granted(&lab, &bob_c, 2);

    lab.postgres.stop();
    let outage = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    still_echoes(&mut via_b, "during the outage");
    // A change that is not a revocation is refused so the IdP retries.
    let (status, e) = lab
        .http(
            0,
            "POST",
            "/scim/v2/Users",
            SCIM_TOKEN,
            r#"{"userName": "carol", "active": true}"#,
        )
        .unwrap();
    assert_eq!(status, 503, "{e}");
    // A revocation on A: in effect there at once; C does not know yet.
    let (status, off) = lab.set_active(0, &bob_id, false).unwrap();
    assert_eq!(
        (status, off["active"].as_bool()),
        (200, Some(false)),
        "{off}"
    );
    expect_reset(&mut bob_on_a, Duration::from_secs(2)).unwrap();
    while outage.elapsed() < Duration::from_secs(60) {
        still_echoes(&mut via_b, "alice keeps her access");
        still_echoes(&mut bob_on_c, "C has not heard of the revocation");
        std::thread::sleep(Duration::from_secs(5));
    }
    let back = Instant::now();
    lab.postgres.resume().unwrap();
    // The kept revocation reaches C without being requested again.
    expect_reset(&mut bob_on_c, Duration::from_secs(10)).unwrap();
    eprintln!(
        "revocation reached node C {:?} after the database was restarted",
        back.elapsed()
    );
    still_echoes(&mut via_b, "alice after the outage");
    // Every node has the same users, alice active and bob not.
    let users = same_users_everywhere(&lab);
    assert_eq!(users, {
        let mut v = vec![
            (alice_id, "alice".to_string(), true),
            (bob_id, "bob".to_string(), false),
        ];
        v.sort();
        v
    });
    // Changes go through again.
    let (status, e) = lab
        .http(
            2,
            "POST",
            "/scim/v2/Users",
            SCIM_TOKEN,
            r#"{"userName": "carol", "active": true}"#,
        )
        .unwrap();
    assert_eq!(status, 201, "{e}");
}

/// Each node chains its own events under its node id into the same ClickHouse;
/// `audit verify` checks every node's chain and names a registered node with none.
#[test]
fn every_node_chains_its_own_trail_and_audit_verify_checks_them_all() {
    let ch = portcullis_testkit::ClickHouse::start().unwrap();
    let (alice_key, alice_pub) = wg_genkey().unwrap();
    // Every node signs its chain head every second with the cluster's key.
    let keys = tempfile::tempdir().unwrap();
    let made = std::process::Command::new(portcullis_e2e::portcullis_bin().unwrap())
        .args(["audit", "keygen", "--out"])
        .arg(keys.path().join("k"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let pem = std::fs::read_to_string(keys.path().join("k")).unwrap();
    let mut lab = ClusterLab::start_audited(
        ClusterOptions {
            // retention_days lands in [audit.clickhouse]: one node applies it.
            extra_config: format!(
                "retention_days = 3650\n[[peer]]\nuser = \"alice\"\npublic_key = \"{alice_pub}\"\naddress = \"100.64.0.2\"\n"
            ),
            audit_config: "checkpoint_key_file = \"audit-signing.key\"\ncheckpoint_interval_secs = 1\n"
                .into(),
            files: vec![("audit-signing.key".into(), pem)],
            ..ClusterOptions::default()
        },
        &ch,
    )
    .unwrap();
    let out = lab.cli(0, &["audit", "migrate"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alice = lab
        .add_client("alice", &alice_key, "100.64.0.2", 2)
        .unwrap();
    provision(&lab, 0, "alice", "sre");
    let s = open_when_granted(&lab, &alice, 2);
    // Retention and repair are once-per-cluster work: each lease has one holder.
    for lease in ["audit-retention", "node-repair"] {
        wait_until(Duration::from_secs(10), || {
            Ok(holder(&lab, 1, lease).is_some())
        })
        .unwrap_or_else(|e| panic!("{lease}: {e}"));
    }
    // Node C dies with alice's session open: another node records its death once (the
    // repair lease), and the sessions report ends her session with it.
    // Once her session and flow are in ClickHouse (what an auditor reads of a node
    // that never comes back).
    wait_until(Duration::from_secs(20), || {
        Ok(ch
            .count("SELECT count() FROM portcullis.events WHERE gateway = 'gw-c' AND kind = 'flow_opened' AND user = 'alice'")
            .unwrap_or(0)
            > 0)
    })
    .unwrap();
    lab.kill_node(2).unwrap();
    let died = Instant::now();
    let downs = || {
        ch.query("SELECT gateway, visitParamExtractString(detail, 'node'), reason FROM portcullis.events FINAL WHERE kind = 'node_down'")
            .unwrap_or_default()
    };
    wait_until(Duration::from_secs(30), || Ok(!downs().is_empty())).unwrap();
    eprintln!("node_down recorded {:?} after the kill", died.elapsed());
    let recorded = downs();
    let fields: Vec<&str> = recorded.trim().split('\t').collect();
    assert!(
        matches!(fields.as_slice(), [by, "gw-c", "no_heartbeat"] if *by == "gw-a" || *by == "gw-b"),
        "{recorded}"
    );
    // Back, then every node stopped cleanly: its sessions end in its own trail, and a
    // clean stop is not a death.
    lab.start_node(2).unwrap();
    drop(s.shutdown(std::net::Shutdown::Both));
    for i in 0..3 {
        lab.stop_node(i);
    }
    assert_eq!(
        lab.postgres
            .psql(
                "portcullis",
                "SELECT count(*) FROM nodes WHERE stopped IS NULL"
            )
            .unwrap(),
        "0"
    );
    let gateways = || {
        let mut g: Vec<String> = ch
            .query("SELECT DISTINCT gateway FROM portcullis.events")
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        g.sort();
        g
    };
    wait_until(Duration::from_secs(30), || Ok(gateways().len() == 3)).unwrap();
    assert_eq!(gateways(), ["gw-a", "gw-b", "gw-c"]);
    // alice's flow is in C's chain, decided there.
    let flows = ch
        .query("SELECT gateway FROM portcullis.events FINAL WHERE kind = 'flow_opened' AND user = 'alice'")
        .unwrap();
    assert!(
        flows.lines().all(|g| g == "gw-c") && !flows.is_empty(),
        "{flows}"
    );
    let verify = |node: usize| {
        let out = lab.cli(node, &["audit", "verify", "--json"]).unwrap();
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        (out.status.success(), report)
    };
    assert_eq!(
        downs().lines().count(),
        1,
        "one death, one record: {}",
        downs()
    );
    let out = lab
        .cli(
            1,
            &[
                "audit", "query", "--report", "sessions", "--user", "alice", "--json",
            ],
        )
        .unwrap();
    let sessions: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    let rows = sessions["rows"].as_array().unwrap();
    let cols: Vec<&str> = sessions["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let at = |name: &str| cols.iter().position(|c| *c == name).unwrap();
    assert!(
        rows.iter()
            .any(|r| r[at("gateway")] == "gw-c" && r[at("ended")] == "node_down"),
        "{sessions}"
    );
    assert!(
        rows.iter().all(|r| r[at("ended")] != ""),
        "every session of alice ended: {sessions}"
    );
    let (ok, report) = verify(1);
    assert!(ok, "{report}");
    for g in ["gw-a", "gw-b", "gw-c"] {
        assert!(report["gateways"].get(g).is_some(), "{report}");
    }
    // Every node's signed checkpoints are also in the cluster database, and verify checks
    // them there (no grace: every node is stopped, its trail uploaded).
    let copied = lab
        .postgres
        .psql(
            "portcullis",
            "SELECT string_agg(DISTINCT split_part(id, '/', 1), ',' ORDER BY split_part(id, '/', 1)) FROM records WHERE kind = 'audit-checkpoint'",
        )
        .unwrap();
    assert_eq!(copied, "gw-a,gw-b,gw-c");
    let out = lab
        .cli(1, &["audit", "verify", "--json", "--grace-secs", "0"])
        .unwrap();
    let signed: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{signed}");
    assert!(
        signed["checkpoints_verified"].as_u64().unwrap() > 6,
        "{signed}"
    );
    // A node the registry knows but whose trail is missing is a finding.
    lab.postgres
        .psql(
            "portcullis",
            "INSERT INTO nodes (node_id, address, version, started, heartbeat) VALUES ('gw-d', '192.168.74.1:51820', '0.1.0', now(), now())",
        )
        .unwrap();
    let (ok, report) = verify(0);
    assert!(!ok, "{report}");
    assert_eq!(
        report["findings"][0]["finding"], "missing_chain",
        "{report}"
    );
    assert_eq!(report["findings"][0]["gateway"], "gw-d", "{report}");
}

/// A device enrolled through node A connects through node B; a node stopped while
/// 1,000 changes are made elsewhere has them all once it is back.
#[test]
fn a_device_enrolled_on_one_node_connects_through_another_and_a_stopped_node_catches_up() {
    let mut lab = ClusterLab::start(ClusterOptions {
        extra_config: "[devices]\npool = \"100.64.0.128/26\"\nendpoint = \"192.168.72.1:51820\"\n"
            .into(),
        ..ClusterOptions::default()
    })
    .unwrap();
    provision(&lab, 0, "alice", "sre");
    let (private, public) = wg_genkey().unwrap();
    let (status, d) = lab
        .http_with(
            0,
            "POST",
            "/admin/v1/devices",
            &[],
            &format!(r#"{{"user": "alice", "public_key": "{public}", "name": "laptop"}}"#),
        )
        .unwrap();
    assert_eq!(status, 201, "{d}");
    let address = d["device"]["address"].as_str().unwrap().to_string();
    // B has the device (from the change log) and lists it.
    wait_until(Duration::from_secs(5), || {
        let (_, list) = lab
            .http_with(1, "GET", "/admin/v1/devices", &[], "")
            .unwrap();
        Ok(list
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["public_key"] == public.as_str())))
    })
    .unwrap();
    let laptop = lab.add_client("alice", &private, &address, 1).unwrap();
    let _s = open_when_granted(&lab, &laptop, 1);

    // C stops; 1,000 changes are made through A and B meanwhile.
    lab.stop_node(2);
    let started = Instant::now();
    for i in 0..1000 {
        let (status, u) = lab
            .http(
                i % 2,
                "POST",
                "/scim/v2/Users",
                SCIM_TOKEN,
                &format!(r#"{{"userName": "user{i}", "active": true}}"#),
            )
            .unwrap();
        assert_eq!(status, 201, "{u}");
    }
    eprintln!(
        "1000 SCIM creations through two nodes: {:.0}/s",
        1000.0 / started.elapsed().as_secs_f64()
    );
    lab.start_node(2).unwrap();
    let users = same_users_everywhere(&lab);
    assert_eq!(users.len(), 1001);
    // And C's applied change is the cluster's last.
    wait_until(Duration::from_secs(5), || {
        let (_, c) = lab
            .http(2, "GET", "/admin/v1/cluster", ADMIN_TOKEN, "")
            .unwrap();
        Ok(c["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["applied_change"] == c["last_change"]))
    })
    .unwrap();
}
