//! The cluster lab: N gateway nodes on one PostgreSQL, each in a network namespace this
//! process creates and deletes, with real wireguard-go clients.
//!
//! ```text
//!  ns <id>-c0 ── wireguard-go (alice, 100.64.0.2) ── 192.168.71.0/24 ──┐
//!                                                                     ▼
//!  ns <id>-n0 … n2: portcullis nodes gw-a, gw-b, gw-c (UDP :51820 on 192.168.7{1,2,3}.1,
//!                   TUN pc0 100.64.0.1/24, [http] 127.0.0.1:18080, one WireGuard key)
//!        │ 10.8.0.1{1,2,3}/24 and 172.31.0.1{1,2,3}/24
//!        ▼
//!  ns <id>-lan: bridge br0: prod 10.8.0.2 (TCP echo :22, :8080),
//!               PostgreSQL 15 on 172.31.0.100
//! ```
//!
//! A client is attached to one node (its endpoint); the lan routes its tunnel address
//! back through that node. Torn down in `Drop`, also when a test fails: the processes it
//! started are stopped by PID, the namespaces deleted.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use serde_json::Value;

use crate::{
    check_prerequisites, copy_dir, echo_server, in_ns, portcullis_bin, repo_root, sh, sh_in,
    terminate, wait_until, wg_genkey, Client, CLIENT_ALLOWED_IPS, NEXT_LAB,
};

pub const SCIM_TOKEN: &str = "scim-token-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

pub mod sites;

/// One gateway node.
pub struct Node {
    pub node_id: String,
    pub ns: String,
    pub dir: PathBuf,
    /// Where its clients dial it.
    pub endpoint: String,
    child: Option<Child>,
}

impl Node {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("portcullis.toml")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Options for [`ClusterLab::start`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// Extra lines appended to every node's config.
    pub extra_config: String,
    /// Files written into every node's directory (name, content).
    pub files: Vec<(String, String)>,
    /// Start a SimpleSAMLphp IdP in node A's namespace (127.0.0.1 there) that trusts
    /// the SP at `http://127.0.0.1:18080` and knows alice (group sre), password
    /// `alice-password`; its metadata is `idp-metadata.xml` in every node's directory and
    /// is served at [`IDP_METADATA_URL`] on the lan, each fetch recorded
    /// ([`ClusterLab::metadata_fetches`]).
    pub saml_idp: bool,
    /// Lines inside every node's `[audit]` table.
    pub audit_config: String,
    /// Start an OpenLDAP server on the lan (172.31.0.100); `{ldap_url}` in
    /// `extra_config` becomes its URL, `ldap.pw` in every node's directory its password.
    pub slapd: bool,
    /// Sites behind virtual addresses (0–2, see [`sites`]): the nodes split evenly
    /// among them, each node also has a `wan` link into its site's outer segment and
    /// listens on the site's address, which keepalived (VRRPv3, 0.5 s adverts, `/readyz`
    /// checked every second) moves between the site's nodes together with the inside
    /// address the lan routes the tunnel pool to. Clients join with
    /// [`ClusterLab::add_site_client`] or [`ClusterLab::add_profile_client`].
    pub sites: usize,
}

/// The first site's address clients connect to (with `sites`).
pub const SITE_VIP: &str = "192.168.90.100";

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            extra_config: String::new(),
            files: Vec::new(),
            saml_idp: false,
            slapd: false,
            audit_config: String::new(),
            sites: 0,
        }
    }
}

pub struct ClusterLab {
    pub id: String,
    pub dir: PathBuf,
    pub ns_lan: String,
    pub nodes: Vec<Node>,
    pub postgres: portcullis_testkit::Postgres,
    pub gateway_public_key: String,
    pub saml_idp: Option<portcullis_testkit::SamlIdp>,
    pub slapd: Option<portcullis_testkit::Slapd>,
    namespaces: Vec<String>,
    wg_procs: Vec<(Child, String)>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    /// Who fetched [`IDP_METADATA_URL`], in order (the nodes' lan addresses).
    pub metadata_fetches: Arc<std::sync::Mutex<Vec<std::net::IpAddr>>>,
    /// With `sites`: each site's addresses, key and nodes, and keepalived per node.
    pub sites: Vec<sites::Site>,
    keepalived: Vec<Child>,
    /// Other servers the lab started (iperf3), stopped with it.
    procs: Vec<Child>,
}

/// `ip -n NS addr add CIDR dev DEV`.
fn addr_add(ns: &str, cidr: &str, dev: &str) -> Result<()> {
    sh(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev]).map(drop)
}

/// `ip -n NS link set DEV up`.
fn link_up(ns: &str, dev: &str) -> Result<()> {
    sh(&["ip", "-n", ns, "link", "set", dev, "up"]).map(drop)
}

/// A veth pair: `dev` in `ns`, its peer `port` in `bridge_ns` on that namespace's
/// bridge `br0`, up.
fn veth_into_bridge(ns: &str, dev: &str, bridge_ns: &str, port: &str) -> Result<()> {
    sh(&[
        "ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port, "netns",
        bridge_ns,
    ])?;
    sh(&[
        "ip", "-n", bridge_ns, "link", "set", port, "master", "br0", "up",
    ])
    .map(drop)
}

/// `ip -n NS route replace DST via HOP`.
fn route_via(ns: &str, dst: &str, hop: &str) -> Result<()> {
    sh(&["ip", "-n", ns, "route", "replace", dst, "via", hop]).map(drop)
}

/// Where the lab serves the IdP's metadata (with `saml_idp`).
pub const IDP_METADATA_URL: &str = "http://172.31.0.100:8090/idp-metadata.xml";

/// Serves `body` to every GET on `listener`, recording who asked.
fn metadata_server(
    listener: TcpListener,
    body: String,
    fetches: Arc<std::sync::Mutex<Vec<std::net::IpAddr>>>,
    stop: Arc<AtomicBool>,
) {
    use std::io::{Read as _, Write as _};
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(buf.get(..n).unwrap_or_default()),
                    }
                }
                if let Ok(mut f) = fetches.lock() {
                    f.push(peer.ip());
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/samlmetadata+xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn node_name(i: usize) -> String {
    format!("gw-{}", char::from(b'a' + u8::try_from(i).unwrap_or(25)))
}

impl ClusterLab {
    /// Builds the topology, starts PostgreSQL, migrates the schema and starts every node.
    pub fn start(opts: ClusterOptions) -> Result<ClusterLab> {
        Self::start_with(opts, None)
    }

    fn start_with(opts: ClusterOptions, forward: Option<u16>) -> Result<ClusterLab> {
        check_prerequisites()?;
        let n = NEXT_LAB.fetch_add(1, Ordering::SeqCst);
        let id = format!("{:x}{n}", std::process::id() & 0xfffff);
        let dir = std::env::temp_dir().join(format!("portcullis-cluster-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let planned_sites = sites::plan(&id, opts.sites, opts.nodes)?;
        let ns_lan = format!("pcc{id}-lan");
        // The namespace must exist before PostgreSQL starts inside it.
        sh(&["ip", "netns", "add", &ns_lan])?;
        let mut namespaces = vec![ns_lan.clone()];
        let built = (|| -> Result<portcullis_testkit::Postgres> {
            sh(&["ip", "-n", &ns_lan, "link", "set", "lo", "up"])?;
            sh(&["ip", "-n", &ns_lan, "link", "add", "br0", "type", "bridge"])?;
            sh(&["ip", "-n", &ns_lan, "link", "set", "br0", "up"])?;
            for a in ["10.8.0.2/24", "172.31.0.100/24"] {
                sh(&["ip", "-n", &ns_lan, "addr", "add", a, "dev", "br0"])?;
            }
            // Later sites' servers (the first site's is prod's 10.8.0.2).
            for site in planned_sites.iter().skip(1) {
                let a = format!("{}/24", site.server);
                sh(&["ip", "-n", &ns_lan, "addr", "add", &a, "dev", "br0"])?;
            }
            portcullis_testkit::Postgres::start_on(Some(&ns_lan), "172.31.0.100")
        })();
        let postgres = match built {
            Ok(pg) => pg,
            Err(e) => {
                let _ = sh(&["ip", "netns", "del", &ns_lan]);
                return Err(e);
            }
        };
        // Without sites every node shares one key; with sites, each site has its own.
        let (private, public) = match planned_sites.first() {
            Some(site) => (site.private_key.clone(), site.public_key.clone()),
            None => wg_genkey()?,
        };
        let mut lab = ClusterLab {
            id,
            dir,
            ns_lan,
            nodes: Vec::new(),
            postgres,
            gateway_public_key: public,
            saml_idp: None,
            slapd: None,
            namespaces: Vec::new(),
            wg_procs: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            metadata_fetches: Arc::default(),
            sites: planned_sites,
            keepalived: Vec::new(),
            procs: Vec::new(),
        };
        lab.namespaces.append(&mut namespaces);
        lab.start_servers()?;
        let mut opts = opts;
        if opts.slapd {
            let slapd = portcullis_testkit::Slapd::start_on(Some(&lab.ns_lan), "172.31.0.100")?;
            opts.extra_config = opts.extra_config.replace("{ldap_url}", &slapd.url());
            opts.files.push((
                "ldap.pw".into(),
                format!("{}\n", portcullis_testkit::Slapd::ADMIN_PASSWORD),
            ));
            lab.slapd = Some(slapd);
        }
        for i in 0..opts.nodes {
            lab.add_node(i, &private, &opts)?;
            if let (Some(port), Some(node)) = (forward, lab.nodes.last()) {
                let ns = node.ns.clone();
                lab.servers
                    .push(crate::forward_into_ns(&ns, port, lab.stop.clone())?);
            }
        }
        if opts.saml_idp {
            let ns = lab.nodes.first().map(|n| n.ns.clone()).unwrap_or_default();
            let idp = portcullis_testkit::SamlIdp::start(
                Some(&ns),
                &[portcullis_testkit::SpEntry {
                    entity_id: "http://127.0.0.1:18080/saml/metadata".into(),
                    acs_url: "http://127.0.0.1:18080/saml/acs".into(),
                }],
                &[portcullis_testkit::IdpUser {
                    name: "alice".into(),
                    password: "alice-password".into(),
                    groups: vec!["sre".into()],
                    authn_context: None,
                }],
                &portcullis_testkit::IdpOptions::default(),
            )?;
            let metadata = idp.metadata()?;
            for n in &lab.nodes {
                std::fs::write(n.dir.join("idp-metadata.xml"), &metadata)?;
            }
            let listener = in_ns(&lab.ns_lan, || -> Result<TcpListener> {
                let l = TcpListener::bind(("172.31.0.100", 8090))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })??;
            let (fetches, stop) = (lab.metadata_fetches.clone(), lab.stop.clone());
            lab.servers.push(std::thread::spawn(move || {
                metadata_server(listener, metadata, fetches, stop)
            }));
            lab.saml_idp = Some(idp);
        }
        let migrated = lab.cli(0, &["cluster", "migrate"])?;
        if !migrated.status.success() {
            return Err(anyhow!(
                "cluster migrate: {}",
                String::from_utf8_lossy(&migrated.stderr)
            ));
        }
        if !lab.sites.is_empty() {
            lab.build_wans()?;
        }
        for i in 0..opts.nodes {
            lab.start_node(i)?;
        }
        if !lab.sites.is_empty() {
            for i in 0..opts.nodes {
                lab.start_keepalived(i)?;
            }
            lab.wait_for_vip_holders()?;
        }
        Ok(lab)
    }

    fn start_servers(&mut self) -> Result<()> {
        let mut addrs = vec!["10.8.0.2".to_string()];
        addrs.extend(self.sites.iter().skip(1).map(|s| s.server.clone()));
        for (addr, port) in addrs
            .into_iter()
            .flat_map(|a| [(a.clone(), 22u16), (a, 8080)])
        {
            let stop = self.stop.clone();
            let listener = in_ns(&self.ns_lan, move || -> Result<TcpListener> {
                let l = TcpListener::bind((addr.as_str(), port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })??;
            self.servers
                .push(std::thread::spawn(move || echo_server(listener, stop)));
        }
        Ok(())
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        sh(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_string());
        sh(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn add_node(&mut self, i: usize, private_key: &str, opts: &ClusterOptions) -> Result<()> {
        let node_id = node_name(i);
        let site = self
            .site_of(i)
            .and_then(|s| Some((s, self.sites.get(s)?.clone())));
        // A node's inside address is on its site's LAN (the first site's is prod's).
        let inside_prefix = site
            .as_ref()
            .and_then(|(_, s)| s.server.rsplit_once('.').map(|(p, _)| p.to_string()))
            .unwrap_or_else(|| "10.8.0".into());
        let ns = format!("pcc{}-n{i}", self.id);
        self.add_ns(&ns)?;
        veth_into_bridge(&ns, "lan", &self.ns_lan, &format!("p{i}"))?;
        sh(&["ip", "-n", &ns, "link", "set", "lan", "up"])?;
        for a in [
            format!("{inside_prefix}.1{}/24", i + 1),
            format!("172.31.0.1{}/24", i + 1),
        ] {
            sh(&["ip", "-n", &ns, "addr", "add", &a, "dev", "lan"])?;
        }
        sh_in(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let dir = self.dir.join(&node_id);
        std::fs::create_dir_all(&dir)?;
        let private_key = site
            .as_ref()
            .map_or(private_key, |(_, s)| s.private_key.as_str());
        std::fs::write(dir.join("gw.key"), format!("{private_key}\n"))?;
        std::fs::write(dir.join("scim.token"), format!("{SCIM_TOKEN}\n"))?;
        std::fs::write(dir.join("admin.token"), format!("{ADMIN_TOKEN}\n"))?;
        for (name, content) in &opts.files {
            std::fs::write(dir.join(name), content)?;
        }
        copy_dir(&repo_root().join("policies"), &dir.join("policies"))?;
        if self.sites.len() > 1 {
            sites::write_site_policies(&dir.join("policies"))?;
        }
        let (own_site, site_tables) =
            sites::config_tables(&self.sites, site.as_ref().map_or(0, |(s, _)| *s));
        let config = format!(
            r#"[gateway]
listen = "{listen}"
private_key_file = "gw.key"
tun_name = "pc0"
tunnel_address = "100.64.0.1/24"
mtu = 1420

[policy]
dir = "policies"

[audit]
events_file = "events.jsonl"
{audit}

[http]
listen = "127.0.0.1:18080"

[scim]
token_file = "scim.token"

[admin]
token_file = "admin.token"

[cluster]
node_id = "{node_id}"
database_url = "{url}"
{own_site}{extra}
{site_tables}"#,
            url = self.postgres.url(),
            extra = opts.extra_config,
            audit = opts.audit_config,
            listen = site
                .as_ref()
                .map_or("0.0.0.0:51820".to_string(), |(_, s)| format!(
                    "{}:51820",
                    s.vip
                )),
        );
        std::fs::write(dir.join("portcullis.toml"), config)?;
        self.nodes.push(Node {
            node_id,
            ns,
            dir,
            endpoint: format!("192.168.7{}.1:51820", i + 1),
            child: None,
        });
        Ok(())
    }

    /// A cluster whose nodes spool their audit trails and upload them to `clickhouse`
    /// (reachable from every node's namespace at the same URL as from here).
    pub fn start_audited(
        opts: ClusterOptions,
        clickhouse: &portcullis_testkit::ClickHouse,
    ) -> Result<ClusterLab> {
        let opts = ClusterOptions {
            audit_config: format!("spool_dir = \"spool\"\n{}", opts.audit_config),
            extra_config: format!(
                "[audit.clickhouse]\nurl = \"{}\"\nbatch_interval_ms = 200\n{}",
                clickhouse.url(),
                opts.extra_config
            ),
            ..opts
        };
        Self::start_with(opts, Some(clickhouse.http_port))
    }

    /// Starts node `i` (again) and waits for its TUN device and its HTTP listener.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        let node = self
            .nodes
            .get_mut(i)
            .ok_or_else(|| anyhow!("no node {i}"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("gateway.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns])
            .arg(portcullis_bin()?)
            .args(["gateway", "--config"])
            .arg(node.config_path())
            .current_dir(&node.dir)
            .env(
                "PORTCULLIS_LOG",
                std::env::var("PORTCULLIS_LAB_LOG").unwrap_or_else(|_| "info".into()),
            )
            // Debug builds: SIGUSR1 stalls the packet loop for 3 s ([`ClusterLab::stall_node`]).
            .env("PORTCULLIS_TEST_HOOKS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting a cluster node")?;
        node.child = Some(child);
        let ns = node.ns.clone();
        wait_until(Duration::from_secs(20), || {
            let node = self
                .nodes
                .get_mut(i)
                .ok_or_else(|| anyhow!("no node {i}"))?;
            if let Some(Ok(Some(status))) = node.child.as_mut().map(Child::try_wait) {
                return Err(anyhow!(
                    "node {} exited with {status}: {}",
                    node.node_id,
                    node.log()
                ));
            }
            let tun =
                sh(&["ip", "-n", &ns, "link", "show", "pc0"]).is_ok_and(|s| s.contains(",UP"));
            let http =
                in_ns(&ns, || TcpStream::connect("127.0.0.1:18080").is_ok()).unwrap_or(false);
            Ok(tun && http)
        })
        .with_context(|| {
            format!(
                "node {i} did not come up: {}",
                self.nodes.get(i).map(Node::log).unwrap_or_default()
            )
        })
    }

    /// SIGKILL, no clean exit (a crash, a power loss).
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.nodes.get_mut(i).and_then(|n| n.child.take()) {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Runs a 10 ms ping from client namespace `ns` to prod (10.8.0.2) for `run`, with
    /// `event` 300 ms in; the longest gap between two replies.
    pub fn ping_gap(ns: &str, run: Duration, event: impl FnOnce()) -> Result<Duration> {
        Self::ping_gap_to(ns, "10.8.0.2", run, event)
    }

    /// [`ClusterLab::ping_gap`] to `dst`.
    pub fn ping_gap_to(
        ns: &str,
        dst: &str,
        run: Duration,
        event: impl FnOnce(),
    ) -> Result<Duration> {
        let times = Self::ping_replies(ns, dst, run, event)?;
        if times.len() < 10 {
            return Err(anyhow!(
                "ping from {ns} to {dst} got {} replies",
                times.len()
            ));
        }
        let gap = times
            .windows(2)
            .filter_map(|w| Some(w.get(1)? - w.first()?))
            .fold(0.0f64, f64::max);
        Ok(Duration::from_secs_f64(gap))
    }

    /// Runs a 10 ms ping from `ns` to `dst` for `run`, with `event` 300 ms in; when each
    /// reply came (seconds since the epoch).
    pub fn ping_replies(
        ns: &str,
        dst: &str,
        run: Duration,
        event: impl FnOnce(),
    ) -> Result<Vec<f64>> {
        let mut ping = Command::new("ip")
            .args([
                "netns", "exec", ns, "ping", "-n", "-D", "-i", "0.01", "-W", "1",
            ])
            .arg(dst)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ping")?;
        // Read as it comes: a full pipe (~800 lines) would block ping, and the replies
        // after that would never be sent nor measured.
        let stdout = ping
            .stdout
            .take()
            .ok_or_else(|| anyhow!("ping has no stdout"))?;
        let reader = std::thread::spawn(move || {
            use std::io::BufRead as _;
            // "[1733150000.123456] 64 bytes from 10.8.0.2: icmp_seq=…"
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter(|l| l.contains("bytes from"))
                .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
                .collect::<Vec<f64>>()
        });
        let t0 = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        event();
        std::thread::sleep(run.saturating_sub(t0.elapsed()));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(ping.id())?),
            nix::sys::signal::Signal::SIGINT,
        )?;
        ping.wait()?;
        reader
            .join()
            .map_err(|_| anyhow!("reading ping's output failed"))
    }

    /// SIGTERM and wait.
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes.get_mut(i).and_then(|n| n.child.take()) {
            terminate(&mut c);
        }
    }

    /// Attaches a wireguard-go client for `user` (tunnel address `addr`, its private key
    /// in `key`) to node `via`; the lan routes `addr` back through that node.
    pub fn add_client(&mut self, user: &str, key: &str, addr: &str, via: usize) -> Result<Client> {
        let k = self.wg_procs.len();
        let ns = format!("pcc{}-c{k}", self.id);
        self.add_ns(&ns)?;
        let node = self
            .nodes
            .get(via)
            .ok_or_else(|| anyhow!("no node {via}"))?;
        let (gw_ns, endpoint) = (node.ns.clone(), node.endpoint.clone());
        let subnet = format!("192.168.7{}", via + 1);
        let if_gw = format!("c{k}");
        sh(&[
            "ip", "link", "add", &if_gw, "netns", &gw_ns, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        sh(&["ip", "-n", &gw_ns, "link", "set", &if_gw, "up"])?;
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        // One client per node's subnet: the node's side is .1, the client .2+k.
        let gw_addr = format!("{subnet}.1/24");
        if !sh(&["ip", "-n", &gw_ns, "addr", "show"])?.contains(&format!("{subnet}.1/")) {
            sh(&["ip", "-n", &gw_ns, "addr", "add", &gw_addr, "dev", &if_gw])?;
        }
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{subnet}.{}/24", k + 2),
            "dev",
            "eth0",
        ])?;
        self.start_wireguard(
            user,
            key,
            addr,
            ns,
            k,
            endpoint,
            &format!("10.8.0.1{}", via + 1),
        )
    }

    /// Starts wireguard-go (interface not yet configured) in client namespace `ns`
    /// for client `k`; its interface name.
    pub(crate) fn spawn_wireguard_go(&mut self, ns: &str, k: usize) -> Result<String> {
        let ifname = format!("wg{}c{k}", self.id);
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "wireguard-go", "-f", &ifname])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(
                self.dir.join(format!("wireguard-go-{k}.log")),
            )?))
            .spawn()
            .context("starting wireguard-go")?;
        self.wg_procs.push((child, ifname.clone()));
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        wait_until(Duration::from_secs(10), || Ok(sock.exists()))?;
        Ok(ifname)
    }

    /// Starts wireguard-go in client namespace `ns` (already linked), pointed at
    /// `endpoint`; the lan routes `addr` back through `next_hop`.
    #[allow(clippy::too_many_arguments)]
    fn start_wireguard(
        &mut self,
        user: &str,
        key: &str,
        addr: &str,
        ns: String,
        k: usize,
        endpoint: String,
        next_hop: &str,
    ) -> Result<Client> {
        let ifname = self.spawn_wireguard_go(&ns, k)?;
        let key_file = self.dir.join(format!("client-{k}.key"));
        std::fs::write(&key_file, key)?;
        sh_in(
            &ns,
            &[
                "wg",
                "set",
                &ifname,
                "private-key",
                &key_file.to_string_lossy(),
                "peer",
                &self.gateway_public_key,
                "endpoint",
                &endpoint,
                "allowed-ips",
                CLIENT_ALLOWED_IPS,
            ],
        )?;
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            &ifname,
        ])?;
        sh(&["ip", "-n", &ns, "link", "set", &ifname, "up"])?;
        for net in ["10.8.0.0/16", "100.64.0.0/24"] {
            sh(&["ip", "-n", &ns, "route", "add", net, "dev", &ifname])?;
        }
        sh(&[
            "ip",
            "-n",
            &self.ns_lan,
            "route",
            "replace",
            &format!("{addr}/32"),
            "via",
            next_hop,
        ])?;
        Ok(Client {
            user: user.to_string(),
            ns,
            ifname,
            addr: addr.to_string(),
            addr6: String::new(),
            public_key: String::new(),
            endpoint,
        })
    }

    /// Points client `c` at node `via` instead (a new link to that node, its endpoint,
    /// the lan's route back): what a VIP or DNS change does for a stock client.
    pub fn move_client(&self, c: &Client, via: usize) -> Result<Client> {
        let node = self
            .nodes
            .get(via)
            .ok_or_else(|| anyhow!("no node {via}"))?;
        let subnet = format!("192.168.7{}", via + 1);
        let if_gw = format!("m{}", c.ifname.len() % 10);
        sh(&[
            "ip", "link", "add", &if_gw, "netns", &node.ns, "type", "veth", "peer", "name", "eth1",
            "netns", &c.ns,
        ])?;
        sh(&["ip", "-n", &node.ns, "link", "set", &if_gw, "up"])?;
        sh(&["ip", "-n", &c.ns, "link", "set", "eth1", "up"])?;
        if !sh(&["ip", "-n", &node.ns, "addr", "show"])?.contains(&format!("{subnet}.1/")) {
            sh(&[
                "ip",
                "-n",
                &node.ns,
                "addr",
                "add",
                &format!("{subnet}.1/24"),
                "dev",
                &if_gw,
            ])?;
        }
        sh(&[
            "ip",
            "-n",
            &c.ns,
            "addr",
            "add",
            &format!("{subnet}.200/24"),
            "dev",
            "eth1",
        ])?;
        let moved = Client {
            user: c.user.clone(),
            ns: c.ns.clone(),
            ifname: c.ifname.clone(),
            addr: c.addr.clone(),
            addr6: c.addr6.clone(),
            public_key: c.public_key.clone(),
            endpoint: node.endpoint.clone(),
        };
        self.rehandshake(&moved)?;
        sh(&[
            "ip",
            "-n",
            &self.ns_lan,
            "route",
            "replace",
            &format!("{}/32", c.addr),
            "via",
            &format!("10.8.0.1{}", via + 1),
        ])?;
        Ok(moved)
    }

    /// Makes a client start a fresh handshake on its next packet (a revocation dropped
    /// its session on the node).
    pub fn rehandshake(&self, c: &Client) -> Result<()> {
        let key = self.gateway_public_key.as_str();
        sh_in(&c.ns, &["wg", "set", &c.ifname, "peer", key, "remove"])?;
        sh_in(
            &c.ns,
            &[
                "wg",
                "set",
                &c.ifname,
                "peer",
                key,
                "endpoint",
                &c.endpoint,
                "allowed-ips",
                CLIENT_ALLOWED_IPS,
            ],
        )?;
        Ok(())
    }

    /// Opens a TCP connection from a client's namespace.
    pub fn connect(&self, c: &Client, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        let s = in_ns(&c.ns, move || TcpStream::connect_timeout(&dst, timeout))??;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(s)
    }

    /// Creates `name` through node `node`'s SCIM as the only member of a new `group`;
    /// the user's SCIM id.
    pub fn provision(&self, node: usize, name: &str, group: &str) -> Result<String> {
        let (status, user) = self.http(
            node,
            "POST",
            "/scim/v2/Users",
            SCIM_TOKEN,
            &format!(r#"{{"userName": "{name}", "active": true}}"#),
        )?;
        if status != 201 {
            return Err(anyhow!("creating {name}: {status} {user}"));
        }
        let id = user
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let (status, g) = self.http(
            node,
            "POST",
            "/scim/v2/Groups",
            SCIM_TOKEN,
            &format!(r#"{{"displayName": "{group}", "members": [{{"value": "{id}"}}]}}"#),
        )?;
        if status != 201 {
            return Err(anyhow!("creating group {group}: {status} {g}"));
        }
        Ok(id)
    }

    /// Sets user `id`'s `active` through node `node`'s SCIM (a PATCH, as IdPs send it).
    pub fn set_active(&self, node: usize, id: &str, active: bool) -> Result<(u16, Value)> {
        self.http(
            node,
            "PATCH",
            &format!("/scim/v2/Users/{id}"),
            SCIM_TOKEN,
            &format!(
                r#"{{"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{{"op": "replace", "path": "active", "value": {active}}}]}}"#
            ),
        )
    }

    /// A TCP connection from `c` to `dst`, once the policies let it through (up to 20 s).
    pub fn open_when_granted(&self, c: &Client, dst: SocketAddr) -> Result<TcpStream> {
        let mut s = None;
        wait_until(Duration::from_secs(20), || {
            s = self.connect(c, dst, Duration::from_millis(900)).ok();
            Ok(s.is_some())
        })?;
        s.ok_or_else(|| anyhow!("no connection"))
    }

    /// The site's address moves from node `from` to node `to`, what VRRP or a UDP load
    /// balancer does: the client's link (client `k`, as [`ClusterLab::add_client`]
    /// numbered it) now ends in `to`'s namespace with the same addresses on both sides,
    /// and the lan routes the client's tunnel address through `to` (the inside route
    /// moves with the outside address). The client itself is not touched: it keeps its
    /// endpoint and its session.
    pub fn move_site_address(&self, c: &Client, from: usize, to: usize) -> Result<()> {
        let k: usize =
            c.ns.rsplit("-c")
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow!("{}: not a client namespace", c.ns))?;
        let to_ns = &self
            .nodes
            .get(to)
            .ok_or_else(|| anyhow!("no node {to}"))?
            .ns;
        let subnet = format!("192.168.7{}", from + 1);
        // Deleting one end of a veth deletes both: the link to `from` is gone.
        let _ = sh(&["ip", "-n", &c.ns, "link", "del", "eth0"]);
        let if_gw = format!("t{k}");
        sh(&[
            "ip", "link", "add", &if_gw, "netns", to_ns, "type", "veth", "peer", "name", "eth0",
            "netns", &c.ns,
        ])?;
        addr_add(to_ns, &format!("{subnet}.1/24"), &if_gw)?;
        link_up(to_ns, &if_gw)?;
        addr_add(&c.ns, &format!("{subnet}.{}/24", k + 2), "eth0")?;
        link_up(&c.ns, "eth0")?;
        route_via(
            &self.ns_lan,
            &format!("{}/32", c.addr),
            &format!("10.8.0.1{}", to + 1),
        )
    }

    /// One HTTP request to node `i`'s listener: (status, JSON body or null).
    pub fn http(
        &self,
        i: usize,
        method: &str,
        path: &str,
        token: &str,
        body: &str,
    ) -> Result<(u16, Value)> {
        let node = self.nodes.get(i).ok_or_else(|| anyhow!("no node {i}"))?;
        crate::http_in(
            &node.ns,
            method,
            path,
            &[
                ("Authorization", &format!("Bearer {token}")),
                ("Content-Type", "application/scim+json"),
            ],
            body,
        )
    }

    /// An admin API request (JSON) to node `i` with extra headers.
    pub fn http_with(
        &self,
        i: usize,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(u16, Value)> {
        let node = self.nodes.get(i).ok_or_else(|| anyhow!("no node {i}"))?;
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let mut all = vec![
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        all.extend_from_slice(headers);
        crate::http_in(&node.ns, method, path, &all, body)
    }

    /// Runs `portcullis <args> --config <node i's config>` inside node `i`'s namespace.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<std::process::Output> {
        let node = self.nodes.get(i).ok_or_else(|| anyhow!("no node {i}"))?;
        Ok(Command::new("ip")
            .args(["netns", "exec", &node.ns])
            .arg(portcullis_bin()?)
            .args(args)
            .arg("--config")
            .arg(node.config_path())
            .stdin(Stdio::null())
            .output()?)
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (mut c, ifname) in self.wg_procs.drain(..) {
            terminate(&mut c);
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                terminate(&mut c);
            }
        }
        for mut k in self.keepalived.drain(..).chain(self.procs.drain(..)) {
            terminate(&mut k);
        }
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
        drop(self.saml_idp.take());
        drop(self.slapd.take());
        self.postgres.stop();
        for ns in self.namespaces.drain(..) {
            let _ = sh(&["ip", "netns", "del", &ns]);
        }
        if std::env::var_os("PORTCULLIS_KEEP_LAB").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
