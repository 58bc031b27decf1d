//! The lab: a gateway, real WireGuard clients and private networks, each in a network
//! namespace this process creates and deletes.
//!
//! ```text
//!  ns alice ── wireguard-go (100.64.0.2, fd00:64::2) ─┐ 192.168.77.0/24
//!  ns bob   ── wireguard-go (100.64.0.3, fd00:64::3) ─┤ 192.168.78.0/24
//!                                                     ▼
//!  ns gw: portcullis gateway (UDP :51820, TUN pc0 100.64.0.1/24, fd00:64::1/64), forwarding on
//!        ├── ns prod: 10.8.0.2/24, fd00:8::2/64   (TCP echo :8080, :22, :23, :5432; UDP echo :5353)
//!        │            10.8.5.10/32 (prod-db)
//!        └── ns dev:  10.9.0.2/24, fd00:9::2/64   (TCP echo :443, :8080)
//! ```
//!
//! Used by the end-to-end tests (`e2e.rs`) and by the lab demo (`lab.rs`). Needs root,
//! `ip`, `wg`, `wireguard-go` and `ping`; the README's commands install them.
//! Everything is torn down in `Drop`, also when a test fails: processes this lab started
//! are stopped by PID, namespaces deleted, wireguard-go sockets removed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

pub mod cluster;

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// One client device in its own namespace.
#[derive(Debug)]
pub struct Client {
    pub user: String,
    pub ns: String,
    pub ifname: String,
    pub addr: String,
    pub addr6: String,
    pub public_key: String,
    /// The gateway's address as this client dials it.
    pub endpoint: String,
}

/// What the clients route into the tunnel.
const CLIENT_ALLOWED_IPS: &str =
    "10.8.0.0/16,10.9.0.0/16,100.64.0.0/24,fd00:8::/32,fd00:9::/32,fd00:64::/64";

/// A running lab.
pub struct Lab {
    pub id: String,
    pub dir: PathBuf,
    pub ns_gw: String,
    pub ns_prod: String,
    pub ns_dev: String,
    pub alice: Client,
    pub bob: Client,
    pub gateway_public_key: String,
    gateway: Option<Child>,
    gateway_log_filter: String,
    gateway_stderr_inherit: bool,
    gateway_ifname: Option<String>,
    wg_procs: Vec<Child>,
    /// Sockets of wireguard-go interfaces started by [`Lab::start_wireguard_go`].
    extra_wg_socks: Vec<PathBuf>,
    namespaces: Vec<String>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    /// The lab's OpenLDAP server (`LabOptions::slapd`), in the gateway's namespace.
    pub slapd: Option<portcullis_testkit::Slapd>,
    /// The lab's SAML IdP (`LabOptions::saml_idp`), in the gateway's namespace.
    pub saml_idp: Option<portcullis_testkit::SamlIdp>,
}

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> Result<String> {
    let (prog, rest) = args.split_first().ok_or_else(|| anyhow!("empty command"))?;
    let out = Command::new(prog)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside a network namespace.
pub fn sh_in(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    sh(&full)
}

/// Finds the `portcullis` binary built next to this executable (target/<profile>/).
pub fn portcullis_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PORTCULLIS_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("portcullis");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "portcullis binary not found near {}; build it first (cargo build -p portcullis)",
        exe.display()
    )
}

/// The repository root (for `policies/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Checks the lab's prerequisites, with a message saying what is missing.
pub fn check_prerequisites() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab needs root (network namespaces, TUN devices)");
    }
    for tool in ["ip", "wg", "wireguard-go", "ping"] {
        if sh(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
            bail!("{tool} is not installed: run scripts/install-deps.sh");
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        bail!("/dev/net/tun is missing");
    }
    Ok(())
}

/// A WireGuard key pair (private, public), base64, from `wg`.
pub fn wg_genkey() -> Result<(String, String)> {
    let private = sh(&["wg", "genkey"])?.trim().to_string();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("wg pubkey stdin"))?
        .write_all(private.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        private,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

/// Which gateway the lab runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayKind {
    /// The portcullis binary (found by [`portcullis_bin`]).
    Portcullis,
    /// wireguard-go as a plain WireGuard gateway with kernel forwarding (for comparison).
    WireguardGo,
}

/// The `[http]`, `[devices]` and `[saml]` sections of a lab whose users sign on through
/// its SimpleSAMLphp IdP (`saml_idp`) at `http://127.0.0.1:18080`; a test appends its own.
pub const SIGN_ON_CONFIG: &str = "[http]\nlisten = \"127.0.0.1:18080\"\n\
    [devices]\npool = \"100.64.0.128/26\"\nendpoint = \"192.168.77.1:51820\"\n\
    [saml]\nidp_metadata = \"{idp_metadata_url}\"\nbase_url = \"http://127.0.0.1:18080\"\n\
    user_attribute = \"uid\"\nlogin_max_secs = 3600\n";

/// Options for [`Lab::start`].
#[derive(Clone, Debug)]
pub struct LabOptions {
    pub gateway: GatewayKind,
    /// Extra lines appended to the gateway config.
    pub extra_config: String,
    /// Extra lines inside the gateway config's `[audit]` table.
    pub audit_config: String,
    /// Log filter for the gateway.
    pub gateway_log: String,
    /// Where the gateway's stderr goes (None: a file in the lab dir).
    pub gateway_stderr_inherit: bool,
    /// Leave alice out of the config's `[[user]]`s: her device waits until an identity
    /// source (SCIM) provides her.
    pub alice_from_identity_source: bool,
    /// Files written into the lab directory before the gateway starts (name, content).
    pub files: Vec<(String, String)>,
    /// Start an OpenLDAP server in the gateway's namespace first; `{ldap_url}` in
    /// `extra_config` becomes its URL.
    pub slapd: bool,
    /// With `slapd`: also serve ldaps://; `{ldaps_url}` and `{ldap_ca_file}` in
    /// `extra_config` become its URL and certificate.
    pub slapd_tls: bool,
    /// Start a SimpleSAMLphp IdP in the gateway's namespace that trusts the SP at
    /// `http://127.0.0.1:18080` and knows alice (group sre), bob (developers), carol
    /// (sre, her sign-ons with a second factor), audrey (audit), ivan (it) and sam (security),
    /// password `<name>-password`; its metadata is `idp-metadata.xml` in the lab dir, and
    /// `{idp_metadata_url}` in `extra_config` becomes its metadata URL.
    pub saml_idp: bool,
    /// With `start_audited`: `[audit.clickhouse] batch_interval_ms` (200, so tests see
    /// rows quickly); `None` keeps the product's default.
    pub upload_interval_ms: Option<u64>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            gateway: GatewayKind::Portcullis,
            extra_config: String::new(),
            audit_config: String::new(),
            gateway_log: std::env::var("PORTCULLIS_LAB_LOG").unwrap_or_else(|_| "info".into()),
            gateway_stderr_inherit: false,
            alice_from_identity_source: false,
            files: Vec::new(),
            slapd: false,
            slapd_tls: false,
            saml_idp: false,
            upload_interval_ms: Some(200),
        }
    }
}

impl Lab {
    /// Builds the topology, starts the gateway and both clients, and waits until both
    /// tunnels have completed a handshake.
    pub fn start(opts: LabOptions) -> Result<Lab> {
        check_prerequisites()?;
        let n = NEXT_LAB.fetch_add(1, Ordering::SeqCst);
        let id = format!("{:x}{n}", std::process::id() & 0xfffff);
        let dir = std::env::temp_dir().join(format!("portcullis-lab-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let ns = |role: &str| format!("pcl{id}-{role}");
        let mut lab = Lab {
            dir: dir.clone(),
            ns_gw: ns("gw"),
            ns_prod: ns("prod"),
            ns_dev: ns("dev"),
            alice: Client {
                user: "alice".into(),
                ns: ns("alice"),
                ifname: format!("wg{id}a"),
                addr: "100.64.0.2".into(),
                addr6: "fd00:64::2".into(),
                public_key: String::new(),
                endpoint: "192.168.77.1:51820".into(),
            },
            bob: Client {
                user: "bob".into(),
                ns: ns("bob"),
                ifname: format!("wg{id}b"),
                addr: "100.64.0.3".into(),
                addr6: "fd00:64::3".into(),
                public_key: String::new(),
                endpoint: "192.168.78.1:51820".into(),
            },
            id,
            gateway_public_key: String::new(),
            gateway: None,
            gateway_log_filter: String::new(),
            gateway_stderr_inherit: false,
            gateway_ifname: None,
            wg_procs: Vec::new(),
            extra_wg_socks: Vec::new(),
            namespaces: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            slapd: None,
            saml_idp: None,
        };
        // From here on, Drop cleans up whatever was created.
        lab.build_topology()?;
        lab.start_servers()?;
        if opts.slapd {
            lab.slapd = Some(if opts.slapd_tls {
                portcullis_testkit::Slapd::start_tls(Some(&lab.ns_gw))?
            } else {
                portcullis_testkit::Slapd::start(Some(&lab.ns_gw))?
            });
        }
        if opts.saml_idp {
            let idp = portcullis_testkit::SamlIdp::start(
                Some(&lab.ns_gw),
                &[portcullis_testkit::SpEntry {
                    entity_id: "http://127.0.0.1:18080/saml/metadata".into(),
                    acs_url: "http://127.0.0.1:18080/saml/acs".into(),
                }],
                // carol's sign-ons state a second factor (REFEDS MFA), the others' do not.
                &[
                    ("alice", "sre", None),
                    ("bob", "developers", None),
                    ("carol", "sre", Some("https://refeds.org/profile/mfa")),
                    // The console's auditor and help desk.
                    ("audrey", "audit", None),
                    ("ivan", "it", None),
                    ("sam", "security", None),
                ]
                .map(|(name, group, acr)| portcullis_testkit::IdpUser {
                    name: name.into(),
                    password: format!("{name}-password"),
                    groups: vec![group.into()],
                    authn_context: acr.map(str::to_string),
                }),
                &portcullis_testkit::IdpOptions::default(),
            )?;
            std::fs::write(lab.dir.join("idp-metadata.xml"), idp.metadata()?)?;
            lab.saml_idp = Some(idp);
        }
        lab.start_gateway(&opts)?;
        lab.start_clients()?;
        Ok(lab)
    }

    /// A further namespace of this lab (`pcl<id>-<role>`), removed with it.
    pub fn add_namespace(&mut self, role: &str) -> Result<String> {
        let name = format!("pcl{}-{role}", self.id);
        self.add_ns(&name)?;
        Ok(name)
    }

    /// Adds `cidr` to `dev` in `ns`.
    pub fn add_address(ns: &str, cidr: &str, dev: &str) -> Result<()> {
        sh(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev]).map(drop)
    }

    /// A veth pair between two namespaces, both ends up.
    pub fn link(&self, a_ns: &str, a: &str, b_ns: &str, b: &str) -> Result<()> {
        self.veth(a_ns, a, b_ns, b)
    }

    /// Starts wireguard-go for `ifname` in `ns` (stopped with the lab), its log in the
    /// lab directory, and waits for its control socket.
    fn spawn_wireguard_go(&mut self, ns: &str, ifname: &str, log: &str) -> Result<()> {
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        let _ = std::fs::remove_file(&sock);
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "wireguard-go", "-f", ifname])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(self.dir.join(log))?))
            .spawn()
            .context("starting wireguard-go")?;
        self.wg_procs.push(child);
        wait_until(Duration::from_secs(10), || Ok(sock.exists()))
            .with_context(|| format!("wireguard-go did not create {}", sock.display()))
    }

    /// A wireguard-go interface `ifname` in `ns` with `address` (/32), a peer of the
    /// gateway at `endpoint` for `allowed_ips`, stopped with the lab. The key file is
    /// `key_file` in the lab directory.
    pub fn start_wireguard_go(
        &mut self,
        ns: &str,
        ifname: &str,
        key_file: &str,
        address: &str,
        endpoint: &str,
        allowed_ips: &str,
    ) -> Result<()> {
        self.spawn_wireguard_go(ns, ifname, &format!("wireguard-go-{ifname}.log"))?;
        self.extra_wg_socks
            .push(PathBuf::from(format!("/var/run/wireguard/{ifname}.sock")));
        let key = self.dir.join(key_file);
        let key = key.to_string_lossy();
        sh_in(
            ns,
            &[
                "wg",
                "set",
                ifname,
                "private-key",
                &key,
                "peer",
                &self.gateway_public_key,
                "endpoint",
                endpoint,
                "allowed-ips",
                allowed_ips,
            ],
        )?;
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            ifname,
        ])?;
        sh(&["ip", "-n", ns, "link", "set", ifname, "up"])?;
        for net in allowed_ips.split(',') {
            sh(&["ip", "-n", ns, "route", "add", net, "dev", ifname])?;
        }
        Ok(())
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        sh(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_string());
        sh(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        // Fresh links would otherwise spend ~1 s in duplicate address detection, during
        // which the kernel holds the first IPv6 packets (no usable link-local source).
        sh_in(
            name,
            &[
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        Ok(())
    }

    fn veth(&self, a_ns: &str, a: &str, b_ns: &str, b: &str) -> Result<()> {
        sh(&[
            "ip", "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns", b_ns,
        ])?;
        sh(&["ip", "-n", a_ns, "link", "set", a, "up"])?;
        sh(&["ip", "-n", b_ns, "link", "set", b, "up"])?;
        Ok(())
    }

    fn build_topology(&mut self) -> Result<()> {
        let (gw, prod, dev) = (
            self.ns_gw.clone(),
            self.ns_prod.clone(),
            self.ns_dev.clone(),
        );
        let (alice, bob) = (self.alice.ns.clone(), self.bob.ns.clone());
        for ns in [&gw, &prod, &dev, &alice, &bob] {
            self.add_ns(ns)?;
        }
        self.veth(&gw, "to-alice", &alice, "eth0")?;
        self.veth(&gw, "to-bob", &bob, "eth0")?;
        self.veth(&gw, "to-prod", &prod, "eth0")?;
        self.veth(&gw, "to-dev", &dev, "eth0")?;
        let addr = |ns: &str, a: &str, dev: &str| {
            sh(&["ip", "-n", ns, "addr", "add", a, "dev", dev, "nodad"])
        };
        addr(&gw, "192.168.77.1/24", "to-alice")?;
        addr(&alice, "192.168.77.2/24", "eth0")?;
        addr(&gw, "192.168.78.1/24", "to-bob")?;
        addr(&bob, "192.168.78.2/24", "eth0")?;
        addr(&gw, "10.8.0.1/24", "to-prod")?;
        addr(&gw, "fd00:8::1/64", "to-prod")?;
        addr(&prod, "10.8.0.2/24", "eth0")?;
        // prod-db's host, reached through prod's segment.
        addr(&prod, "10.8.5.10/32", "eth0")?;
        addr(&prod, "fd00:8::2/64", "eth0")?;
        addr(&gw, "10.9.0.1/24", "to-dev")?;
        addr(&gw, "fd00:9::1/64", "to-dev")?;
        addr(&dev, "10.9.0.2/24", "eth0")?;
        addr(&dev, "fd00:9::2/64", "eth0")?;
        for (ns, v4, v6) in [
            (&prod, "10.8.0.1", "fd00:8::1"),
            (&dev, "10.9.0.1", "fd00:9::1"),
        ] {
            sh(&["ip", "-n", ns, "route", "add", "default", "via", v4])?;
            sh(&["ip", "-n", ns, "-6", "route", "add", "default", "via", v6])?;
        }
        sh(&[
            "ip",
            "-n",
            &gw,
            "route",
            "add",
            "10.8.5.10/32",
            "via",
            "10.8.0.2",
            "dev",
            "to-prod",
        ])?;
        // The gateway host forwards between its TUN device and the private networks.
        sh_in(&gw, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        sh_in(&gw, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        Ok(())
    }

    fn start_servers(&mut self) -> Result<()> {
        let servers = [
            (self.ns_prod.clone(), 8080u16),
            (self.ns_prod.clone(), 22),
            (self.ns_prod.clone(), 23),
            (self.ns_prod.clone(), 5432),
            (self.ns_dev.clone(), 443),
            (self.ns_dev.clone(), 8080),
        ];
        for (ns, port) in servers {
            let stop = self.stop.clone();
            let listener = in_ns(&ns, move || -> Result<TcpListener> {
                let l = TcpListener::bind(("::", port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })??;
            self.servers
                .push(std::thread::spawn(move || echo_server(listener, stop)));
        }
        Ok(())
    }

    fn start_gateway(&mut self, opts: &LabOptions) -> Result<()> {
        let (private, public) = wg_genkey()?;
        std::fs::write(self.dir.join("gw.key"), format!("{private}\n"))?;
        self.gateway_public_key = public;
        let (a_priv, a_pub) = wg_genkey()?;
        let (b_priv, b_pub) = wg_genkey()?;
        std::fs::write(self.dir.join("alice.key"), a_priv)?;
        std::fs::write(self.dir.join("bob.key"), b_priv)?;
        self.alice.public_key = a_pub;
        self.bob.public_key = b_pub;
        copy_dir(&repo_root().join("policies"), &self.dir.join("policies"))?;
        let config = format!(
            r#"[gateway]
id = "lab-{id}"
listen = "0.0.0.0:51820"
private_key_file = "gw.key"
tun_name = "pc0"
tunnel_address = "100.64.0.1/24"
tunnel_address6 = "fd00:64::1/64"
mtu = 1420

[policy]
dir = "policies"

[audit]
events_file = "events.jsonl"
{audit}

[[user]]
name = "alice"
email = "alice@example.com"
groups = ["sre"]
tags = ["oncall"]

[[user]]
name = "bob"
email = "bob@example.com"
groups = ["developers"]

[[peer]]
user = "alice"
public_key = "{a}"
address = "100.64.0.2"
address6 = "fd00:64::2"

[[peer]]
user = "bob"
public_key = "{b}"
address = "100.64.0.3"
address6 = "fd00:64::3"
{extra}
"#,
            id = self.id,
            a = self.alice.public_key,
            b = self.bob.public_key,
            extra = opts
                .extra_config
                .replace(
                    "{ldap_url}",
                    &self.slapd.as_ref().map(|s| s.url()).unwrap_or_default()
                )
                .replace(
                    "{idp_metadata_url}",
                    &self
                        .saml_idp
                        .as_ref()
                        .map(|i| i.metadata_url())
                        .unwrap_or_default()
                )
                .replace(
                    "{ldaps_url}",
                    &self
                        .slapd
                        .as_ref()
                        .and_then(|s| s.ldaps_url())
                        .unwrap_or_default()
                )
                .replace(
                    "{ldap_ca_file}",
                    &self
                        .slapd
                        .as_ref()
                        .map(|s| s.ca_file().display().to_string())
                        .unwrap_or_default()
                ),
            audit = opts.audit_config,
        );
        let config = if opts.alice_from_identity_source {
            config.replace(
                "[[user]]\nname = \"alice\"\nemail = \"alice@example.com\"\ngroups = [\"sre\"]\ntags = [\"oncall\"]\n",
                "",
            )
        } else {
            config
        };
        for (name, content) in &opts.files {
            std::fs::write(self.dir.join(name), content)?;
        }
        std::fs::write(self.config_path(), config)?;
        if opts.gateway == GatewayKind::WireguardGo {
            return self.start_wireguard_go_gateway();
        }
        self.gateway_log_filter = opts.gateway_log.clone();
        self.gateway_stderr_inherit = opts.gateway_stderr_inherit;
        self.spawn_gateway()
    }

    /// Starts the portcullis gateway with the lab's config and waits for its TUN device.
    pub fn spawn_gateway(&mut self) -> Result<()> {
        let stderr = if self.gateway_stderr_inherit {
            Stdio::inherit()
        } else {
            Stdio::from(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("gateway.log"))?,
            )
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns_gw])
            .arg(portcullis_bin()?)
            .args(["gateway", "--config"])
            .arg(self.config_path())
            .env("PORTCULLIS_LOG", &self.gateway_log_filter)
            // Debug-build hooks (SIGUSR1 stalls the packet loop, for the /readyz test).
            .env("PORTCULLIS_TEST_HOOKS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting the gateway")?;
        self.gateway = Some(child);
        // Ready when its TUN device is up.
        wait_until(Duration::from_secs(15), || {
            if let Some(g) = self.gateway.as_mut() {
                if let Ok(Some(status)) = g.try_wait() {
                    return Err(anyhow!(
                        "gateway exited with {status}: {}",
                        self.gateway_log()
                    ));
                }
            }
            Ok(sh(&["ip", "-n", &self.ns_gw, "link", "show", "pc0"])
                .is_ok_and(|s| s.contains(",UP")))
        })
        .with_context(|| format!("gateway did not come up: {}", self.gateway_log()))?;
        Ok(())
    }

    fn start_wireguard_go_gateway(&mut self) -> Result<()> {
        let ifname = format!("wg{}g", self.id);
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns_gw, "wireguard-go", "-f", &ifname])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(self.dir.join("gateway.log"))?))
            .spawn()
            .context("starting wireguard-go as the gateway")?;
        self.gateway = Some(child);
        self.gateway_ifname = Some(ifname.clone());
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        wait_until(Duration::from_secs(10), || Ok(sock.exists()))?;
        let key = self.dir.join("gw.key");
        let key = key.to_string_lossy();
        sh_in(
            &self.ns_gw,
            &[
                "wg",
                "set",
                &ifname,
                "listen-port",
                "51820",
                "private-key",
                &key,
                "peer",
                &self.alice.public_key,
                "allowed-ips",
                "100.64.0.2/32,fd00:64::2/128",
                "peer",
                &self.bob.public_key,
                "allowed-ips",
                "100.64.0.3/32,fd00:64::3/128",
            ],
        )?;
        sh(&[
            "ip",
            "-n",
            &self.ns_gw,
            "addr",
            "add",
            "100.64.0.1/24",
            "dev",
            &ifname,
        ])?;
        sh(&[
            "ip",
            "-n",
            &self.ns_gw,
            "addr",
            "add",
            "fd00:64::1/64",
            "dev",
            &ifname,
            "nodad",
        ])?;
        sh(&["ip", "-n", &self.ns_gw, "link", "set", &ifname, "up"])?;
        Ok(())
    }

    fn start_clients(&mut self) -> Result<()> {
        for (who, key) in [("alice", "alice.key"), ("bob", "bob.key")] {
            let c = if who == "alice" {
                &self.alice
            } else {
                &self.bob
            };
            let (ns, ifname, addr, addr6, endpoint) = (
                c.ns.clone(),
                c.ifname.clone(),
                c.addr.clone(),
                c.addr6.clone(),
                c.endpoint.clone(),
            );
            self.spawn_wireguard_go(&ns, &ifname, &format!("wireguard-go-{who}.log"))
                .with_context(|| format!("wireguard-go for {who}"))?;
            let key = self.dir.join(key);
            let key = key.to_string_lossy();
            sh_in(
                &ns,
                &[
                    "wg",
                    "set",
                    &ifname,
                    "private-key",
                    &key,
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
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr6}/128"),
                "dev",
                &ifname,
                "nodad",
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", &ifname, "up"])?;
            for net in ["10.8.0.0/16", "10.9.0.0/16", "100.64.0.0/24"] {
                sh(&["ip", "-n", &ns, "route", "add", net, "dev", &ifname])?;
            }
            for net in ["fd00:8::/32", "fd00:9::/32", "fd00:64::/64"] {
                sh(&["ip", "-n", &ns, "-6", "route", "add", net, "dev", &ifname])?;
            }
        }
        Ok(())
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("portcullis.toml")
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.dir.join("policies")
    }

    pub fn events_path(&self) -> PathBuf {
        self.dir.join("events.jsonl")
    }

    pub fn gateway_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    pub fn gateway_pid(&self) -> Option<u32> {
        self.gateway.as_ref().map(Child::id)
    }

    /// CPU seconds (user + system) the gateway process has used so far.
    pub fn gateway_cpu_seconds(&self) -> Result<f64> {
        let pid = self.gateway_pid().ok_or_else(|| anyhow!("no gateway"))?;
        Ok(portcullis_testkit::cpu_seconds(&format!(
            "/proc/{pid}/stat"
        )))
    }

    /// Sends SIGHUP to the gateway: reload the policy directory.
    pub fn reload(&self) -> Result<()> {
        let pid = self.gateway_pid().ok_or_else(|| anyhow!("no gateway"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )?;
        Ok(())
    }

    /// All events written so far.
    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.events_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for an event matching `pred`.
    pub fn wait_event(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events().into_iter().find(&pred) {
                return Ok(e);
            }
            if Instant::now() > deadline {
                bail!(
                    "no matching event within {timeout:?}; events: {:#?}",
                    self.events()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ping` from a client's namespace; true when a reply came back.
    pub fn ping(&self, c: &Client, dst: &str) -> bool {
        sh_in(&c.ns, &["ping", "-c", "1", "-W", "2", dst]).is_ok()
    }

    /// Opens a TCP connection from a client's namespace.
    pub fn connect(&self, c: &Client, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        let s = in_ns(&c.ns, move || TcpStream::connect_timeout(&dst, timeout))??;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(s)
    }

    /// Sends a UDP datagram from a client's namespace, optionally from a given source.
    pub fn udp_send(
        &self,
        c: &Client,
        src: Option<SocketAddr>,
        dst: SocketAddr,
        payload: &[u8],
    ) -> Result<()> {
        let payload = payload.to_vec();
        in_ns(&c.ns, move || -> Result<()> {
            let bind = src.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
            let s = UdpSocket::bind(bind)?;
            s.send_to(&payload, dst)?;
            Ok(())
        })?
    }

    /// Binds a UDP socket in a namespace (to observe what arrives there).
    pub fn udp_listen(&self, ns: &str, addr: SocketAddr) -> Result<UdpSocket> {
        let s = in_ns(ns, move || UdpSocket::bind(addr))??;
        s.set_read_timeout(Some(Duration::from_millis(1500)))?;
        Ok(s)
    }

    /// A lab whose gateway spools its audit trail and uploads it to `clickhouse` (reachable
    /// from the gateway's namespace at the same URL as from here).
    pub fn start_audited(
        opts: LabOptions,
        clickhouse: &portcullis_testkit::ClickHouse,
    ) -> Result<Lab> {
        let mut lab = Lab::start(LabOptions {
            audit_config: format!("spool_dir = \"spool\"\n{}", opts.audit_config),
            extra_config: format!(
                "[audit.clickhouse]\nurl = \"{}\"\n{}{}",
                clickhouse.url(),
                opts.upload_interval_ms
                    .map(|ms| format!("batch_interval_ms = {ms}\n"))
                    .unwrap_or_default(),
                opts.extra_config
            ),
            ..opts
        })?;
        lab.forward_into_gateway_ns(clickhouse.http_port)?;
        Ok(lab)
    }

    /// Runs `portcullis audit <args> --config <the lab's config>`.
    pub fn audit(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = Command::new(portcullis_bin()?);
        cmd.arg("audit");
        self.portcullis(cmd, args)
    }

    /// Runs `portcullis <args> --config <the lab's config>` inside the gateway's namespace,
    /// where its `[http] listen` address is (the `users` and `sessions` commands).
    /// One HTTP request to the gateway's `[http]` listener at 127.0.0.1:18080, made from
    /// inside its namespace: (status, JSON body or Null).
    pub fn http(&self, method: &str, path: &str, token: &str, body: &str) -> Result<(u16, Value)> {
        let auth = format!("Bearer {token}");
        self.http_with(
            method,
            path,
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/scim+json"),
            ],
            body,
        )
    }

    /// One HTTP request to the gateway's listener (127.0.0.1:18080 in its namespace) with
    /// these headers: (status, JSON body or null).
    pub fn http_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(u16, Value)> {
        http_in(&self.ns_gw, method, path, headers, body)
    }

    /// Runs the Python client `tests/clients/{script}` in the gateway's namespace (where
    /// its listener and the lab's IdP are), as `user` with the IdP password the lab gives
    /// (`<user>-password`) and then `args`; the JSON it prints.
    pub fn sign_on_client(&self, script: &str, user: &str, args: &[&str]) -> Result<Value> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns_gw, "python3"])
            .arg(repo_root().join("tests/clients").join(script))
            .args(["http://127.0.0.1:18080", user, &format!("{user}-password")])
            .args(args)
            .output()
            .with_context(|| format!("running {script}"))?;
        if !out.status.success() {
            bail!("{script}: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("{script}'s output"))
    }

    /// Runs `tests/browser/<script>` (Node, driving Chromium) in the gateway's namespace
    /// as `user` (password `<user>-password`) and returns the JSON object it prints.
    pub fn browser(&self, script: &str, user: &str, args: &[&str]) -> Result<Value> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns_gw, "node"])
            .arg(repo_root().join("tests/browser").join(script))
            .args(["http://127.0.0.1:18080", user, &format!("{user}-password")])
            .args(args)
            .output()
            .with_context(|| format!("running {script}"))?;
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "{script}'s output: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if let Some(e) = v.get("error") {
            bail!("{script} {args:?} as {user}: {e}; {v}");
        }
        Ok(v)
    }

    pub fn cli_in_gateway_ns(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns_gw])
            .arg(portcullis_bin()?);
        self.portcullis(cmd, args)
    }

    /// [`Lab::cli_in_gateway_ns`] as (success, stdout, stderr); a CLI that cannot be run
    /// at all is an error.
    pub fn cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = self.cli_in_gateway_ns(args)?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        ))
    }

    /// `portcullis access request` for `user` to the lab's database (prod-db,
    /// 10.8.5.10:5432/tcp): the CLI's answer and the request's id, or its error.
    pub fn request_db_access(
        &self,
        user: &str,
        duration: &str,
        reason: &str,
    ) -> Result<(String, String)> {
        let (ok, out, err) = self.cli(&[
            "access",
            "request",
            "--user",
            user,
            "--network",
            "prod-db",
            "--dst",
            "10.8.5.10",
            "--port",
            "5432/tcp",
            "--for",
            duration,
            "--reason",
            reason,
        ])?;
        if !ok {
            return Err(anyhow!("portcullis access request failed: {}", err.trim()));
        }
        let id = out
            .split_whitespace()
            .nth(2)
            .ok_or_else(|| anyhow!("no request id in {out:?}"))?
            .to_string();
        Ok((out.trim().to_string(), id))
    }

    fn portcullis(&self, mut cmd: Command, args: &[&str]) -> Result<std::process::Output> {
        cmd.args(args)
            .arg("--config")
            .arg(self.config_path())
            .output()
            .with_context(|| format!("running portcullis {}", args.join(" ")))
    }

    /// Makes `127.0.0.1:port` inside the gateway's namespace reach `127.0.0.1:port` of
    /// the test's own namespace (where ClickHouse runs), so one URL works for both the
    /// gateway and the CLI. The listening socket is created in the gateway namespace; the
    /// outbound connections are made from this namespace.
    pub fn forward_into_gateway_ns(&mut self, port: u16) -> Result<()> {
        let ns = self.ns_gw.clone();
        self.servers
            .push(forward_into_ns(&ns, port, self.stop.clone())?);
        Ok(())
    }

    /// Makes a client start a fresh handshake on its next packet (after a gateway restart
    /// lost the sessions; wireguard-go would otherwise wait ~15 s to notice).
    pub fn rehandshake(&self, c: &Client) -> Result<()> {
        sh_in(
            &c.ns,
            &[
                "wg",
                "set",
                &c.ifname,
                "peer",
                &self.gateway_public_key,
                "remove",
            ],
        )?;
        sh_in(
            &c.ns,
            &[
                "wg",
                "set",
                &c.ifname,
                "peer",
                &self.gateway_public_key,
                "endpoint",
                &c.endpoint,
                "allowed-ips",
                CLIENT_ALLOWED_IPS,
            ],
        )?;
        Ok(())
    }

    /// Reconfigures a client's WireGuard interface from a `wg-quick` profile the gateway
    /// handed out, as a stock client importing it would: its private key (or
    /// `private_key` when the device generated its own), its address, and the gateway
    /// peer with the profile's endpoint and AllowedIPs. `endpoint` overrides the
    /// profile's (the lab's client namespaces reach the gateway on different links).
    pub fn use_profile(
        &self,
        c: &Client,
        profile: &str,
        private_key: Option<&str>,
        endpoint: Option<&str>,
    ) -> Result<()> {
        let p = parse_profile(profile)?;
        let private = match (private_key, &p.private_key) {
            (Some(k), _) => k.to_string(),
            (None, Some(k)) => k.clone(),
            (None, None) => return Err(anyhow!("profile has no PrivateKey:\n{profile}")),
        };
        let address = p.address.clone();
        let first = p
            .peers
            .first()
            .ok_or_else(|| anyhow!("profile has no [Peer]:\n{profile}"))?;
        let peer = first.public_key.clone();
        let endpoint = match endpoint {
            Some(e) => e.to_string(),
            None => first.endpoint.clone(),
        };
        let allowed = first.allowed_ips.join(",");
        let key_file = self.dir.join(format!("{}-profile.key", c.ifname));
        std::fs::write(&key_file, format!("{private}\n"))?;
        let key_file = key_file.to_string_lossy().to_string();
        let _ = sh_in(&c.ns, &["wg", "set", &c.ifname, "peer", &peer, "remove"]);
        sh_in(
            &c.ns,
            &[
                "wg",
                "set",
                &c.ifname,
                "private-key",
                &key_file,
                "peer",
                &peer,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
            ],
        )?;
        // The new address first: removing an interface's last IPv4 address would take
        // its routes with it.
        let old = sh(&[
            "ip", "-n", &c.ns, "-o", "-4", "addr", "show", "dev", &c.ifname,
        ])?;
        if !old.contains(&format!("inet {address} ")) {
            sh(&["ip", "-n", &c.ns, "addr", "add", &address, "dev", &c.ifname])?;
        }
        for line in old.lines() {
            let a = line.split_whitespace().skip_while(|w| *w != "inet").nth(1);
            if let Some(a) = a.filter(|a| *a != address) {
                sh(&["ip", "-n", &c.ns, "addr", "del", a, "dev", &c.ifname])?;
            }
        }
        Ok(())
    }

    /// Kills the gateway with SIGKILL (a crash: nothing is flushed) and reaps it.
    pub fn kill_gateway(&mut self) -> Result<()> {
        if let Some(mut g) = self.gateway.take() {
            g.kill()?;
            g.wait()?;
        }
        Ok(())
    }

    /// Stops the gateway with SIGTERM (it closes every flow and session in the audit
    /// trail) and waits for it.
    pub fn stop_gateway(&mut self) -> Result<()> {
        if let Some(mut g) = self.gateway.take() {
            terminate(&mut g);
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for mut c in self.wg_procs.drain(..) {
            terminate(&mut c);
        }
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.alice.ifname));
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.bob.ifname));
        if let Some(g) = &self.gateway_ifname {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{g}.sock"));
        }
        for sock in self.extra_wg_socks.drain(..) {
            let _ = std::fs::remove_file(sock);
        }
        if let Some(mut g) = self.gateway.take() {
            terminate(&mut g);
        }
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
        for ns in self.namespaces.drain(..) {
            let _ = sh(&["ip", "netns", "del", &ns]);
        }
        if std::env::var_os("PORTCULLIS_KEEP_LAB").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// SIGTERM, then SIGKILL after 5 s; always reaped.
pub(crate) fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `f` on a fresh thread inside network namespace `ns` (sockets it creates stay there).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {path}"))?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("namespace thread panicked"))?
}

pub(crate) fn echo_server(listener: TcpListener, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::SeqCst) {
                        match stream.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if stream.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                                    break;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => break,
                        }
                    }
                    let _ = stream.shutdown(Shutdown::Both);
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// One HTTP request to 127.0.0.1:18080 inside namespace `ns` with these headers:
/// (status, JSON body or null).
pub fn http_in(
    ns: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, Value)> {
    let headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: gw\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    in_ns(ns, move || -> Result<(u16, Value)> {
        let mut s = TcpStream::connect("127.0.0.1:18080")?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("not an HTTP answer: {head:?}"))?;
        Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
    })?
}

/// Serves 127.0.0.1:`port` inside namespace `ns` by relaying each connection to
/// 127.0.0.1:`port` of this process's namespace (a server the test started here), until
/// `stop`.
pub fn forward_into_ns(ns: &str, port: u16, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>> {
    let listener = in_ns(ns, move || std::net::TcpListener::bind(("127.0.0.1", port)))??;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((inbound, _)) => {
                    let _ = inbound.set_nonblocking(false);
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", port)) else {
                        continue;
                    };
                    for (mut from, mut to) in [
                        (inbound.try_clone(), outbound.try_clone()),
                        (outbound.try_clone(), inbound.try_clone()),
                    ]
                    .into_iter()
                    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                    {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Write);
                        });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => break,
            }
        }
    }))
}

/// Polls `f` every 50 ms until it returns true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// A `wg-quick` profile as the gateway hands it out: the interface's key and address,
/// and its peers.
pub(crate) struct Profile {
    /// `None` when the device made its own key (the line is a comment then).
    pub private_key: Option<String>,
    pub address: String,
    pub peers: Vec<ProfilePeer>,
}

pub(crate) struct ProfilePeer {
    pub public_key: String,
    pub endpoint: String,
    pub allowed_ips: Vec<String>,
    pub persistent_keepalive: Option<String>,
}

pub(crate) fn parse_profile(text: &str) -> Result<Profile> {
    let mut interface: Vec<(String, String)> = Vec::new();
    let mut peers: Vec<Vec<(String, String)>> = Vec::new();
    let mut in_peer = false;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line {
            "[Interface]" => in_peer = false,
            "[Peer]" => {
                in_peer = true;
                peers.push(Vec::new());
            }
            _ => {
                let (k, v) = line
                    .split_once('=')
                    .ok_or_else(|| anyhow!("profile line {line:?} is not key = value"))?;
                let kv = (k.trim().to_string(), v.trim().to_string());
                match peers.last_mut() {
                    Some(p) if in_peer => p.push(kv),
                    _ => interface.push(kv),
                }
            }
        }
    }
    let get = |fields: &[(String, String)], key: &str| {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| anyhow!("profile has no {key}:\n{text}"))
    };
    Ok(Profile {
        private_key: get(&interface, "PrivateKey").ok(),
        address: get(&interface, "Address")?,
        peers: peers
            .iter()
            .map(|p| {
                Ok(ProfilePeer {
                    public_key: get(p, "PublicKey")?,
                    endpoint: get(p, "Endpoint")?,
                    allowed_ips: get(p, "AllowedIPs")?
                        .split(',')
                        .map(|a| a.trim().to_string())
                        .collect(),
                    persistent_keepalive: get(p, "PersistentKeepalive").ok(),
                })
            })
            .collect::<Result<_>>()?,
    })
}

/// Reads from `s` until the gateway's reset arrives: how long that took (anything else
/// within `within` is an error).
pub fn expect_reset(s: &mut TcpStream, within: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    s.set_read_timeout(Some(within))?;
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(t0.elapsed()),
        other => Err(anyhow!(
            "expected a connection reset, got {other:?} after {:?}",
            t0.elapsed()
        )),
    }
}

/// Sends `data` over `stream` and reads the same number of bytes back (echo server).
pub fn echo_round_trip(stream: &mut TcpStream, data: &[u8]) -> Result<Vec<u8>> {
    let mut writer = stream.try_clone()?;
    let data_owned = data.to_vec();
    let w = std::thread::spawn(move || writer.write_all(&data_owned));
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back)?;
    w.join().map_err(|_| anyhow!("writer panicked"))??;
    Ok(back)
}

/// The `q` quantile (0..=1) of `v`, nearest rank (NaN for none): what the benchmarks report.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((v.len() as f64 - 1.0) * q.clamp(0.0, 1.0)).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}
