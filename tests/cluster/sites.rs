//! Sites behind virtual addresses, for the failover tests (`ClusterOptions::sites`).
//!
//! ```text
//!  client ns ── eth0 ── wan eu-1: 192.168.90.0/24, VIP 192.168.90.100 ── nodes gw-a, gw-b
//!            └─ eth1 ── wan us-1: 192.168.91.0/24, VIP 192.168.91.100 ── nodes gw-c, gw-d
//!                                         (keepalived per node, VRRPv3, 0.5 s adverts)
//!  lan (one bridge standing in for each site's own LAN):
//!    eu-1: prod 10.8.0.2, inside VIP 10.8.0.254 → the tunnel pool's route (main table)
//!    us-1: prod-us 10.20.0.2, inside VIP 10.20.0.254 → the pool's route for replies
//!          from 10.20.0.0/16 (a policy-routing rule: the two sites' LANs in one namespace)
//! ```
//!
//! Every node of a site has that site's WireGuard key and listens on its VIP (bound
//! before it holds it: `IP_FREEBIND`). keepalived moves the outer and the inside VIP
//! together, so return traffic follows without SNAT. With one site the nodes have no
//! `[cluster] site` (a single-site cluster behind one address); with two, every node
//! names its own and both are listed in `[[cluster.sites]]`, and the networks of eu-1
//! (`prod` and below) and of us-1 (`prod-us`) say their site.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};

use super::{addr_add, link_up, route_via, veth_into_bridge, ClusterLab};
use crate::{parse_profile, sh, sh_in, wait_until, wg_genkey, Client};

/// The sites the lab can build, in order.
pub const SITE_NAMES: [&str; 2] = ["eu-1", "us-1"];

/// One site: its addresses, its key and its nodes.
#[derive(Clone, Debug)]
pub struct Site {
    pub name: String,
    /// What clients connect to (port 51820).
    pub vip: String,
    /// The lan's next hop for the tunnel pool.
    pub inside_vip: String,
    /// The site's echo server (TCP :22, :8080; ping).
    pub server: String,
    /// The site's networks on the lan.
    pub lan_net: String,
    pub public_key: String,
    pub(super) private_key: String,
    /// Indices into `ClusterLab::nodes`.
    pub nodes: Vec<usize>,
    pub(super) ns_wan: String,
}

/// The sites for `count` sites over `nodes` nodes (split evenly, in order).
pub(super) fn plan(id: &str, count: usize, nodes: usize) -> Result<Vec<Site>> {
    if count > SITE_NAMES.len() || (count > 0 && nodes < count) {
        return Err(anyhow!(
            "the lab builds 0–2 sites of at least one node each"
        ));
    }
    let per_site = nodes.div_ceil(count.max(1));
    (0..count)
        .map(|s| {
            let (private_key, public_key) = wg_genkey()?;
            let (inside, server, lan_net) = if s == 0 {
                ("10.8.0.254", "10.8.0.2", "10.8.0.0/16")
            } else {
                ("10.20.0.254", "10.20.0.2", "10.20.0.0/16")
            };
            Ok(Site {
                name: SITE_NAMES.get(s).copied().unwrap_or_default().to_string(),
                vip: format!("192.168.{}.100", 90 + s),
                inside_vip: inside.into(),
                server: server.into(),
                lan_net: lan_net.into(),
                public_key,
                private_key,
                nodes: (s * per_site..((s + 1) * per_site).min(nodes)).collect(),
                ns_wan: format!("pcc{id}-w{s}"),
            })
        })
        .collect()
}

/// The `[cluster]` lines naming node's `site` and the `[[cluster.sites]]` tables (two
/// sites or more; one site needs none).
pub(super) fn config_tables(sites: &[Site], site: usize) -> (String, String) {
    if sites.len() < 2 {
        return (String::new(), String::new());
    }
    let own = sites
        .get(site)
        .map(|s| format!("site = \"{}\"\n", s.name))
        .unwrap_or_default();
    let tables = sites
        .iter()
        .map(|s| {
            format!(
                "\n[[cluster.sites]]\nname = \"{}\"\nendpoint = \"{}:51820\"\npublic_key = \"{}\"\n",
                s.name, s.vip, s.public_key
            )
        })
        .collect();
    (own, tables)
}

/// Gives the shipped `prod` tree to eu-1 and adds us-1's `prod-us` (10.20.0.0/16)
/// with a policy letting SREs reach it.
pub(super) fn write_site_policies(dir: &Path) -> Result<()> {
    let path = dir.join("networks.toml");
    let networks = std::fs::read_to_string(&path)?;
    let marker = "name = \"prod\"\n";
    if !networks.contains(marker) {
        return Err(anyhow!("{}: no prod network", path.display()));
    }
    let networks = networks.replacen(marker, "name = \"prod\"\nsite = \"eu-1\"\n", 1)
        + "\n[[network]]\nname = \"prod-us\"\nsite = \"us-1\"\ncidrs = [\"10.20.0.0/16\"]\ntags = [\"prod\"]\n";
    std::fs::write(&path, networks)?;
    std::fs::write(
        dir.join("sites.cedar"),
        "// us-1's production, served by that site's nodes only.\n\
         @id(\"sre-prod-us\")\n\
         permit (principal in Group::\"sre\", action == Action::\"connect\", resource in Network::\"prod-us\");\n",
    )?;
    Ok(())
}

impl ClusterLab {
    /// The site node `i` belongs to.
    pub fn site_of(&self, i: usize) -> Option<usize> {
        self.sites.iter().position(|s| s.nodes.contains(&i))
    }

    /// Every site's outer segment (a bridge in a namespace of its own), its nodes' `wan`
    /// links on it, and the lan's route to the tunnel pool through its inside address.
    pub(super) fn build_wans(&mut self) -> Result<()> {
        for (s, site) in self.sites.clone().iter().enumerate() {
            self.add_ns(&site.ns_wan)?;
            sh(&[
                "ip",
                "-n",
                &site.ns_wan,
                "link",
                "add",
                "br0",
                "type",
                "bridge",
            ])?;
            sh(&["ip", "-n", &site.ns_wan, "link", "set", "br0", "up"])?;
            for &i in &site.nodes {
                let node = self.nodes.get(i).ok_or_else(|| anyhow!("no node {i}"))?;
                veth_into_bridge(&node.ns, "wan", &site.ns_wan, &format!("w{i}"))?;
                addr_add(
                    &node.ns,
                    &format!("192.168.{}.1{}/24", 90 + s, i + 1),
                    "wan",
                )?;
                link_up(&node.ns, "wan")?;
            }
            if s == 0 {
                route_via(&self.ns_lan, "100.64.0.0/24", &site.inside_vip)?;
            } else {
                // Replies from this site's networks go back through this site.
                let table = (100 + s).to_string();
                sh(&[
                    "ip",
                    "-n",
                    &self.ns_lan,
                    "rule",
                    "add",
                    "from",
                    &site.lan_net,
                    "lookup",
                    &table,
                ])?;
                sh(&[
                    "ip",
                    "-n",
                    &self.ns_lan,
                    "route",
                    "replace",
                    "100.64.0.0/24",
                    "via",
                    &site.inside_vip,
                    "dev",
                    "br0",
                    "onlink",
                    "table",
                    &table,
                ])?;
            }
        }
        Ok(())
    }

    /// keepalived in node `i`'s namespace: VRRPv3 with 0.5 s adverts on `wan`, its
    /// site's outer and inside addresses, the site's first node preferred, `/readyz`
    /// asked every second (one failure gives the address up: a dead or stuck gateway
    /// loses it while keepalived itself lives on).
    pub(super) fn start_keepalived(&mut self, i: usize) -> Result<()> {
        let s = self
            .site_of(i)
            .ok_or_else(|| anyhow!("node {i} has no site"))?;
        let site = self.sites.get(s).ok_or_else(|| anyhow!("no site {s}"))?;
        let rank = site.nodes.iter().position(|&n| n == i).unwrap_or(0);
        let node = self.nodes.get(i).ok_or_else(|| anyhow!("no node {i}"))?;
        let conf = node.dir.join("keepalived.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global_defs {{
    router_id {id}
    vrrp_version 3
    enable_script_security
    script_user root
}}
vrrp_script readyz {{
    script "/usr/bin/curl -fsS -m 1 -o /dev/null http://127.0.0.1:18080/readyz"
    interval 1
    timeout 1
    fall 1
    rise 1
}}
vrrp_instance site {{
    state BACKUP
    interface wan
    virtual_router_id {vrid}
    priority {priority}
    advert_int 0.5
    virtual_ipaddress {{
        {vip}/24 dev wan
        {inside}/24 dev lan
    }}
    track_script {{
        readyz
    }}
}}
"#,
                id = node.node_id,
                vrid = 51 + s,
                priority = 150usize.saturating_sub(50 * rank).max(1),
                vip = site.vip,
                inside = site.inside_vip,
            ),
        )?;
        let pid = |name: &str| node.dir.join(name).to_string_lossy().to_string();
        let log = File::create(node.dir.join("keepalived.log"))?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &node.ns,
                "keepalived",
                "-n",
                "-l",
                "-D",
                "-f",
            ])
            .arg(&conf)
            .args(["-p", &pid("keepalived.pid")])
            .args(["-r", &pid("vrrp.pid")])
            .args(["-c", &pid("checkers.pid")])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting keepalived")?;
        self.keepalived.push(child);
        Ok(())
    }

    /// Node `i` has its site's outer address on `wan` (a dark node may still list it).
    pub fn holds_vip(&self, i: usize) -> bool {
        let (Some(node), Some(site)) = (
            self.nodes.get(i),
            self.site_of(i).and_then(|s| self.sites.get(s)),
        ) else {
            return false;
        };
        sh(&["ip", "-n", &node.ns, "-4", "addr", "show", "dev", "wan"])
            .is_ok_and(|out| out.contains(&format!("{}/", site.vip)))
    }

    /// The node holding the first site's address now.
    pub fn vip_holder(&self) -> Option<usize> {
        self.vip_holder_of(0)
    }

    /// The node holding site `s`'s address now.
    pub fn vip_holder_of(&self, s: usize) -> Option<usize> {
        let site = self.sites.get(s)?;
        site.nodes.iter().copied().find(|&i| self.holds_vip(i))
    }

    pub(super) fn wait_for_vip_holders(&self) -> Result<()> {
        // The steady state: each site's preferred (first) node holds its address (a
        // backup may take it first while the preferred node's check is not yet up).
        wait_until(Duration::from_secs(20), || {
            Ok(self
                .sites
                .iter()
                .enumerate()
                .all(|(s, site)| self.vip_holder_of(s) == site.nodes.first().copied()))
        })
        .with_context(|| {
            format!(
                "a site's address was not taken: {}",
                self.nodes
                    .iter()
                    .map(|n| std::fs::read_to_string(n.dir.join("keepalived.log"))
                        .unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            )
        })
    }

    /// A namespace for client `k` with one link into every site's outer segment.
    fn site_client_ns(&mut self) -> Result<(String, usize)> {
        if self.sites.is_empty() {
            return Err(anyhow!("the lab has no sites (ClusterOptions::sites)"));
        }
        let k = self.wg_procs.len();
        let ns = format!("pcc{}-c{k}", self.id);
        self.add_ns(&ns)?;
        for (s, site) in self.sites.iter().enumerate() {
            let dev = format!("eth{s}");
            veth_into_bridge(&ns, &dev, &site.ns_wan, &format!("c{k}"))?;
            addr_add(&ns, &format!("192.168.{}.{}/24", 90 + s, 20 + k), &dev)?;
            link_up(&ns, &dev)?;
        }
        Ok((ns, k))
    }

    /// A wireguard-go client for `user` (a static peer, its private key in `key`) on the
    /// first site's outer segment, pointed at that site's address.
    pub fn add_site_client(&mut self, user: &str, key: &str, addr: &str) -> Result<Client> {
        let (ns, k) = self.site_client_ns()?;
        let site = self
            .sites
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("no site"))?;
        self.start_wireguard(
            user,
            key,
            addr,
            ns,
            k,
            format!("{}:51820", site.vip),
            &site.inside_vip,
        )
    }

    /// A wireguard-go client running `profile` exactly as the gateway handed it out
    /// (one `[Peer]` per site: its key, endpoint, AllowedIPs and keepalive), with a link
    /// into every site's outer segment. Each site's lan routes the pool back itself.
    pub fn add_profile_client(&mut self, user: &str, profile: &str) -> Result<Client> {
        let p = parse_profile(profile)?;
        let (ns, k) = self.site_client_ns()?;
        let ifname = self.spawn_wireguard_go(&ns, k)?;
        let key_file = self.dir.join(format!("client-{k}.key"));
        let private = p
            .private_key
            .as_deref()
            .ok_or_else(|| anyhow!("profile has no PrivateKey:\n{profile}"))?;
        std::fs::write(&key_file, format!("{private}\n"))?;
        let key_file = key_file.to_string_lossy().to_string();
        let mut args: Vec<String> = [
            "wg",
            "set",
            ifname.as_str(),
            "private-key",
            key_file.as_str(),
        ]
        .map(String::from)
        .into();
        for peer in &p.peers {
            args.extend(
                [
                    "peer",
                    peer.public_key.as_str(),
                    "endpoint",
                    peer.endpoint.as_str(),
                    "allowed-ips",
                    peer.allowed_ips.join(",").as_str(),
                ]
                .map(String::from),
            );
            if let Some(k) = &peer.persistent_keepalive {
                args.extend(["persistent-keepalive".to_string(), k.clone()]);
            }
        }
        sh_in(&ns, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
        sh(&["ip", "-n", &ns, "addr", "add", &p.address, "dev", &ifname])?;
        sh(&["ip", "-n", &ns, "link", "set", &ifname, "up"])?;
        // What wg-quick does with AllowedIPs: a route for each through the tunnel.
        for net in p.peers.iter().flat_map(|peer| &peer.allowed_ips) {
            sh(&["ip", "-n", &ns, "route", "replace", net, "dev", &ifname])?;
        }
        Ok(Client {
            user: user.to_string(),
            ns,
            ifname,
            addr: p.address.split('/').next().unwrap_or_default().to_string(),
            addr6: String::new(),
            public_key: String::new(),
            endpoint: p
                .peers
                .first()
                .map(|peer| peer.endpoint.clone())
                .unwrap_or_default(),
        })
    }

    /// A device for `user` registered through node `i`'s admin API with a key the
    /// gateway makes: its profile as handed out.
    pub fn device_profile(&self, i: usize, user: &str) -> Result<String> {
        let (status, d) = self.http_with(
            i,
            "POST",
            "/admin/v1/devices",
            &[],
            &format!(r#"{{"user": "{user}", "name": "laptop"}}"#),
        )?;
        if status != 201 {
            return Err(anyhow!("registering a device for {user}: {status} {d}"));
        }
        d.get("profile")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no profile in {d}"))
    }

    /// Blocks node `i`'s packet loop for 3 s (the debug build's SIGUSR1 hook): a stuck
    /// data plane whose process lives on.
    pub fn stall_node(&self, i: usize) -> Result<()> {
        let pid = self
            .nodes
            .get(i)
            .and_then(|n| n.pid())
            .ok_or_else(|| anyhow!("node {i} is not running"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid)?),
            nix::sys::signal::Signal::SIGUSR1,
        )?;
        Ok(())
    }

    /// Brings node `i`'s links back up after [`ClusterLab::cut_links`].
    pub fn restore_links(&self, i: usize) -> Result<()> {
        self.set_links(i, "up")
    }

    /// Cuts node `i`'s links (outer and lan): the node goes dark, its processes live on.
    pub fn cut_links(&self, i: usize) -> Result<()> {
        self.set_links(i, "down")
    }

    fn set_links(&self, i: usize, state: &str) -> Result<()> {
        let ns = &self.nodes.get(i).ok_or_else(|| anyhow!("no node {i}"))?.ns;
        for link in ["wan", "lan"] {
            sh(&["ip", "-n", ns, "link", "set", link, state])?;
        }
        Ok(())
    }

    /// An iperf3 server on `addr` in the lan (stopped with the lab).
    pub fn iperf3_server(&mut self, addr: &str) -> Result<()> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns_lan, "iperf3", "-s", "-B", addr])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        self.procs.push(child);
        let ns = self.ns_lan.clone();
        wait_until(Duration::from_secs(5), || {
            Ok(sh(&[
                "ip", "netns", "exec", &ns, "ss", "-Hltn", "sport", "=", ":5201",
            ])
            .is_ok_and(|out| out.contains(addr)))
        })
    }
}
