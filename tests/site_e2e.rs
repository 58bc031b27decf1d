//! Site-to-site, end to end: an office router (wireguard-go in its own namespace) with a
//! LAN behind it (three hosts on 192.168.10.0/24, each in a namespace of its own, on
//! the router's bridge) is one `[[peer]]` with `routes`. Its flows are decided by Cedar
//! as the service identity `office-sf` with the LAN host's real address as `src_ip`,
//! audited with that address, and cut when the identity is disabled.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use portcullis_e2e::{echo_round_trip, expect_reset, in_ns, sh, sh_in, wg_genkey, Lab, LabOptions};
use serde_json::Value;

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const ARTIFACTS: &str = "10.8.0.2:8080";

fn is(e: &Value, kind: &str) -> bool {
    e["type"] == kind
}

/// The lab with the office router's peer and identity, and the LAN topology:
/// gateway ns ─ 192.168.79.0/24 ─ router ns (wireguard-go, br0 192.168.10.1/24) ─ LAN hosts.
/// Returns the lab and the LAN hosts' namespaces by address.
fn office_lab() -> (Lab, Vec<(String, &'static str)>) {
    let (router_private, router_public) = wg_genkey().unwrap();
    let mut lab = Lab::start(LabOptions {
        extra_config: format!(
            "[http]\nlisten = \"127.0.0.1:18080\"\n[admin]\ntoken_file = \"admin.token\"\n\
             [devices]\npool = \"100.64.0.128/26\"\nendpoint = \"192.168.79.1:51820\"\n\n\
             [[user]]\nname = \"office-sf\"\ngroups = [\"offices\"]\n\n\
             [[user]]\nname = \"office-nyc\"\ngroups = [\"offices\"]\n\n\
             [[peer]]\nuser = \"office-sf\"\npublic_key = \"{router_public}\"\n\
             address = \"100.64.0.50\"\nroutes = [\"192.168.10.0/24\"]\n"
        ),
        files: vec![
            ("admin.token".into(), format!("{ADMIN_TOKEN}\n")),
            ("office.key".into(), router_private),
        ],
        ..LabOptions::default()
    })
    .expect("lab starts");
    let gw = lab.ns_gw.clone();
    let router = lab.add_namespace("rtr").unwrap();
    lab.link(&gw, "to-office", &router, "wan0").unwrap();
    Lab::add_address(&gw, "192.168.79.1/24", "to-office").unwrap();
    Lab::add_address(&router, "192.168.79.2/24", "wan0").unwrap();
    // The office LAN: a bridge on the router, one namespace per host.
    sh(&["ip", "-n", &router, "link", "add", "br0", "type", "bridge"]).unwrap();
    Lab::add_address(&router, "192.168.10.1/24", "br0").unwrap();
    sh(&["ip", "-n", &router, "link", "set", "br0", "up"]).unwrap();
    let mut hosts = Vec::new();
    for (i, addr) in ["192.168.10.10", "192.168.10.11", "192.168.10.20"]
        .into_iter()
        .enumerate()
    {
        let ns = lab.add_namespace(&format!("lan{i}")).unwrap();
        let port = format!("lan{i}");
        lab.link(&router, &port, &ns, "eth0").unwrap();
        sh(&["ip", "-n", &router, "link", "set", &port, "master", "br0"]).unwrap();
        Lab::add_address(&ns, &format!("{addr}/24"), "eth0").unwrap();
        sh(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            "192.168.10.1",
        ])
        .unwrap();
        hosts.push((ns, addr));
    }
    // The router forwards between its LAN and the tunnel, without NAT: the gateway sees
    // the LAN hosts' own addresses. An address outside its routes, for the spoofing case.
    sh_in(&router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]).unwrap();
    Lab::add_address(&router, "192.168.99.1/32", "lo").unwrap();
    let ifname = format!("wg{}r", lab.id);
    lab.start_wireguard_go(
        &router,
        &ifname,
        "office.key",
        "100.64.0.50",
        "192.168.79.1:51820",
        "10.8.0.0/16",
    )
    .unwrap();
    (lab, hosts)
}

fn connect_from(ns: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let dst: SocketAddr = ARTIFACTS.parse().unwrap();
    let s = in_ns(ns, move || TcpStream::connect_timeout(&dst, timeout))
        .map_err(std::io::Error::other)??;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

#[test]
fn an_office_router_carries_its_lan_decided_audited_and_cut_per_host() {
    let (lab, hosts) = office_lab();
    let gw_routes = sh_in(&lab.ns_gw, &["ip", "route", "show", "192.168.10.0/24"]).unwrap();
    assert!(
        gw_routes.contains("dev pc0"),
        "the gateway routes the office LAN to its TUN: {gw_routes}"
    );

    // Both build servers (192.168.10.0/28) reach the artifact store through the one tunnel.
    let mut live = Vec::new();
    for (ns, addr) in &hosts[..2] {
        let mut s = connect_from(ns, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{addr} reaches the artifact store: {e}"));
        assert_eq!(
            echo_round_trip(&mut s, addr.as_bytes()).unwrap(),
            addr.as_bytes()
        );
        live.push(s);
    }
    // A desk outside the permitted subnet is denied, audited with its real address.
    let (desk_ns, desk) = &hosts[2];
    assert!(
        connect_from(desk_ns, Duration::from_secs(2)).is_err(),
        "{desk} must not reach the artifact store"
    );
    let denied = lab
        .wait_event(Duration::from_secs(5), |e| {
            is(e, "flow_denied") && e["src_ip"] == *desk
        })
        .unwrap();
    assert_eq!(denied["user"], "office-sf", "{denied}");
    assert_eq!(denied["dst_ip"], "10.8.0.2", "{denied}");

    // The trail names each LAN host's own address under the office's identity and the
    // policy about its subnet.
    for (_, addr) in &hosts[..2] {
        let opened = lab
            .wait_event(Duration::from_secs(5), |e| {
                is(e, "flow_opened") && e["src_ip"] == *addr
            })
            .unwrap();
        assert_eq!(opened["user"], "office-sf", "{opened}");
        assert_eq!(
            opened["policy_ids"],
            serde_json::json!(["office-build-servers-artifacts"]),
            "{opened}"
        );
    }

    // A source in no route of the router's (its own 192.168.99.1) is dropped as spoofed.
    let router = format!("pcl{}-rtr", lab.id);
    assert!(sh_in(
        &router,
        &[
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "-I",
            "192.168.99.1",
            "10.8.0.2"
        ]
    )
    .is_err());
    let spoofed = lab
        .wait_event(Duration::from_secs(5), |e| {
            is(e, "spoof_dropped") && e["claimed_src"] == "192.168.99.1"
        })
        .unwrap();
    assert_eq!(spoofed["user"], "office-sf", "{spoofed}");

    // A second office's router registered through the admin API: its profile is the
    // router's, its subnet is routed to the TUN; a subnet another peer owns is refused.
    let (ok, profile, err) = lab
        .cli(&["devices", "add", "office-nyc", "--route", "192.168.20.0/24"])
        .unwrap();
    assert!(ok, "{err}");
    assert!(
        profile.contains("# A site's router for 192.168.20.0/24"),
        "{profile}"
    );
    assert!(profile.contains("AllowedIPs = 10.8.0.0/16"), "{profile}");
    portcullis_e2e::wait_until(Duration::from_secs(5), || {
        Ok(sh_in(&lab.ns_gw, &["ip", "route", "show", "192.168.20.0/24"])?.contains("dev pc0"))
    })
    .expect("the registered router's subnet is routed to the TUN");
    // Listed with its subnet; its profile again on request, without a private key.
    let (ok, listed, err) = lab.cli(&["devices", "list", "--json"]).unwrap();
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let nyc = &listed.as_array().unwrap()[0];
    assert_eq!(
        nyc["routes"],
        serde_json::json!(["192.168.20.0/24"]),
        "{nyc}"
    );
    let (ok, again, err) = lab
        .cli(&["devices", "profile", nyc["id"].as_str().unwrap()])
        .unwrap();
    assert!(ok, "{err}");
    assert!(
        again.contains("# A site's router for 192.168.20.0/24"),
        "{again}"
    );
    assert!(
        !again.lines().any(|l| l.starts_with("PrivateKey")),
        "{again}"
    );
    let (ok, _, err) = lab
        .cli(&[
            "devices",
            "add",
            "office-nyc",
            "--route",
            "192.168.10.128/25",
        ])
        .unwrap();
    assert!(!ok && err.contains("overlaps 192.168.10.0/24"), "{err}");

    // Disabling the office's identity cuts every LAN host's live connection.
    let out = lab
        .cli_in_gateway_ns(&["users", "disable", "office-sf"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for s in &mut live {
        expect_reset(s, Duration::from_secs(3)).expect("the connection is cut");
    }
    lab.wait_event(Duration::from_secs(2), |e| {
        is(e, "user_revoked") && e["user"] == "office-sf"
    })
    .unwrap();
    assert!(
        connect_from(&hosts[0].0, Duration::from_secs(2)).is_err(),
        "nothing passes once the office is disabled"
    );
}
