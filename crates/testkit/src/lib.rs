//! Test support: real servers for tests, started on free loopback ports in throwaway
//! directories, and stopped by the PID this process started (on drop, also on a failed
//! test).
//!
//! What it does: [`Slapd`] runs an OpenLDAP server with syncprov and memberof; [`SamlIdp`]
//! runs SimpleSAMLphp as a SAML 2.0 IdP; [`ClickHouse`] runs Debian's `clickhouse-server` as a plain process with
//! its own config, data directory and ports; it can be stopped and started again on the
//! same ports and data (to test an outage).
//!
//! What it deliberately does not: install anything (`scripts/install-deps.sh` does), or
//! touch a system-wide server.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

mod postgres;
mod saml_idp;
pub use postgres::{Postgres, PG_BIN};
pub use saml_idp::{generate_key, IdpOptions, IdpUser, SamlIdp, SpEntry};

/// The server binary Debian's `clickhouse-server` package installs.
pub const CLICKHOUSE_SERVER: &str = "/usr/sbin/clickhouse-server";

/// `program`, run inside network namespace `netns` when given (`ip netns exec` execs it,
/// so the child's PID is the program's).
pub fn command_in(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// CPU seconds (user + system) from a `/proc/<pid>/stat` or `/proc/<pid>/task/<tid>/stat`
/// file; 0 when it cannot be read.
pub fn cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // After the command name (which may hold spaces): state is field 0, utime 11, stime 12.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // /proc reports clock ticks of USER_HZ, 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds (user + system) of each thread of a process, summed by thread name.
pub fn thread_cpu_seconds(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        *out.entry(name.trim().to_string()).or_insert(0.0) +=
            cpu_seconds(&path.join("stat").to_string_lossy());
    }
    out
}

/// The number after `--name` on the command line of a bench binary, or `default`.
pub fn numeric_arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A ClickHouse server of our own.
pub struct ClickHouse {
    dir: tempfile::TempDir,
    pub http_port: u16,
    pub tcp_port: u16,
    child: Option<Child>,
}

impl std::fmt::Debug for ClickHouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouse")
            .field("http_port", &self.http_port)
            .field("pid", &self.child.as_ref().map(|c| c.id()))
            .finish()
    }
}

impl ClickHouse {
    /// Whether the server binary is installed.
    pub fn available() -> bool {
        Path::new(CLICKHOUSE_SERVER).exists()
    }

    /// Starts a server and waits until it answers.
    pub fn start() -> anyhow::Result<ClickHouse> {
        if !Self::available() {
            bail!("{CLICKHOUSE_SERVER} is missing: run scripts/install-deps.sh");
        }
        let dir = tempfile::Builder::new()
            .prefix("portcullis-ch-")
            .tempdir()?;
        let mut ch = ClickHouse {
            http_port: free_port()?,
            tcp_port: free_port()?,
            dir,
            child: None,
        };
        ch.write_config("")?;
        ch.resume()?;
        Ok(ch)
    }

    /// `n` replicas of one shard of the ClickHouse cluster `cluster`, coordinated by `zk`
    /// (macros `{shard}` = 01, `{replica}` = r1, r2, …; `ON CLUSTER` DDL through ZooKeeper).
    pub fn start_replicas(
        n: usize,
        zk: &ZooKeeper,
        cluster: &str,
    ) -> anyhow::Result<Vec<ClickHouse>> {
        if !Self::available() {
            bail!("{CLICKHOUSE_SERVER} is missing: run scripts/install-deps.sh");
        }
        let mut servers = Vec::with_capacity(n);
        for _ in 0..n {
            servers.push(ClickHouse {
                http_port: free_port()?,
                tcp_port: free_port()?,
                dir: tempfile::Builder::new()
                    .prefix("portcullis-ch-")
                    .tempdir()?,
                child: None,
            });
        }
        let replicas: String = servers
            .iter()
            .map(|s| {
                format!(
                    "<replica><host>127.0.0.1</host><port>{}</port></replica>",
                    s.tcp_port
                )
            })
            .collect();
        for (i, s) in servers.iter().enumerate() {
            let interserver = free_port()?;
            s.write_config(&format!(
                "<zookeeper><node><host>127.0.0.1</host><port>{zk}</port></node><session_timeout_ms>6000</session_timeout_ms></zookeeper>
  <remote_servers><{cluster}><shard><internal_replication>true</internal_replication>{replicas}</shard></{cluster}></remote_servers>
  <macros><shard>01</shard><replica>r{}</replica></macros>
  <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
  <interserver_http_port>{interserver}</interserver_http_port>
  <interserver_http_host>127.0.0.1</interserver_http_host>",
                i + 1,
                zk = zk.port
            ))?;
        }
        for s in &mut servers {
            s.resume()?;
        }
        Ok(servers)
    }

    fn write_config(&self, extra: &str) -> anyhow::Result<()> {
        let d = self.dir.path().display();
        std::fs::write(
            self.dir.path().join("config.xml"),
            format!(
                r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/server.err.log</errorlog><console>0</console></logger>
  <http_port>{}</http_port>
  <tcp_port>{}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>5368709120</mark_cache_size>
  {extra}
</yandex>
"#,
                self.http_port, self.tcp_port
            ),
        )?;
        std::fs::write(
            self.dir.path().join("users.xml"),
            r#"<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"#,
        )?;
        Ok(())
    }

    /// The HTTP URL for clients.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (SIGKILL to our child, then reap): an outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same ports and data.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let child = Command::new(CLICKHOUSE_SERVER)
            .arg(format!("--config-file={}", d.join("config.xml").display()))
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(d.join("stderr.log"))?))
            .spawn()
            .context("starting clickhouse-server")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .query("SELECT 1")
                .map(|r| r.trim() == "1")
                .unwrap_or(false)
            {
                return Ok(());
            }
            if let Some(c) = &mut self.child {
                if let Some(status) = c.try_wait()? {
                    let log = std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default();
                    bail!("clickhouse-server exited ({status}): {log}");
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "clickhouse-server did not answer on {} within 30 s",
                    self.url()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a query over HTTP and returns the body (TabSeparated); a server error is an
    /// error carrying the server's message.
    pub fn query(&self, sql: &str) -> anyhow::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            s,
            "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{sql}",
            sql.len()
        )?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)?;
        let text = String::from_utf8_lossy(&resp);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        if !head.starts_with("HTTP/1.1 200") {
            bail!("clickhouse: {sql}: {}", body.trim());
        }
        Ok(body)
    }

    /// A query returning one number.
    pub fn count(&self, sql: &str) -> anyhow::Result<u64> {
        let out = self.query(sql)?;
        out.trim()
            .parse()
            .with_context(|| format!("{sql}: not a number: {out:?}"))
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(tail.get(..n).unwrap_or_default());
        rest = tail.get(n + 2..).unwrap_or_default();
    }
    out
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A ZooKeeper server of our own (Debian's `zookeeper`), on a free loopback port, for
/// ClickHouse 18.16's replication.
pub struct ZooKeeper {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl std::fmt::Debug for ZooKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZooKeeper")
            .field("port", &self.port)
            .finish()
    }
}

const ZK_SERVER: &str = "/usr/share/zookeeper/bin/zkServer.sh";

impl ZooKeeper {
    pub fn available() -> bool {
        Path::new(ZK_SERVER).exists()
    }

    /// Starts a standalone server and waits until it answers `ruok`.
    pub fn start() -> anyhow::Result<ZooKeeper> {
        if !Self::available() {
            bail!("{ZK_SERVER} is missing: run scripts/install-deps.sh");
        }
        let dir = tempfile::Builder::new()
            .prefix("portcullis-zk-")
            .tempdir()?;
        let port = free_port()?;
        let d = dir.path();
        std::fs::create_dir_all(d.join("data"))?;
        std::fs::write(
            d.join("zoo.cfg"),
            format!(
                "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={port}\n\
                 clientPortAddress=127.0.0.1\nadmin.enableServer=false\n4lw.commands.whitelist=ruok\n",
                d.join("data").display()
            ),
        )?;
        let child = Command::new(ZK_SERVER)
            .arg("start-foreground")
            .arg(d.join("zoo.cfg"))
            .env("ZOO_LOG_DIR", d)
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(d.join("zk.log"))?))
            .stderr(Stdio::from(std::fs::File::create(d.join("zk.err.log"))?))
            .spawn()
            .context("starting zookeeper")?;
        let mut zk = ZooKeeper {
            dir,
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                s.write_all(b"ruok")?;
                let mut r = String::new();
                s.read_to_string(&mut r)?;
                Ok(r == "imok")
            });
            if matches!(ok, Ok(true)) {
                return Ok(zk);
            }
            if let Some(c) = &mut zk.child {
                if let Some(status) = c.try_wait()? {
                    let log =
                        std::fs::read_to_string(zk.dir.path().join("zk.log")).unwrap_or_default();
                    bail!("zookeeper exited ({status}): {log}");
                }
            }
            if Instant::now() > deadline {
                bail!("zookeeper did not answer on port {port} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // zkServer.sh execs java: the child is the JVM itself.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A test CA and a certificate it signed for `host` (an IP address or a DNS name), ECDSA
/// P-256, valid for a day, made with `openssl`: `<dir>/<name>-ca.crt`, `<dir>/<name>.crt`
/// and `<dir>/<name>.key`. Returns (ca, cert, key). (A lone self-signed certificate is
/// not enough: webpki refuses a CA certificate used as the server's own.)
pub fn test_certificate(
    dir: &Path,
    name: &str,
    host: &str,
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let ca = dir.join(format!("{name}-ca.crt"));
    let ca_key = dir.join(format!("{name}-ca.key"));
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let san = if host.parse::<std::net::IpAddr>().is_ok() {
        format!("subjectAltName=IP:{host}")
    } else {
        format!("subjectAltName=DNS:{host}")
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
    ];
    let run = |args: Vec<std::ffi::OsString>| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(&args)
            .output()
            .context("running openssl (apt install openssl)")?;
        if !out.status.success() {
            bail!("openssl failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let os = |v: &[&str]| {
        v.iter()
            .map(Into::into)
            .collect::<Vec<std::ffi::OsString>>()
    };
    let mut a = os(&["req", "-x509"]);
    a.extend(os(&ec));
    a.extend(os(&[
        "-subj",
        &format!("/CN={name} test CA"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
        "-keyout",
    ]));
    a.extend([ca_key.clone().into(), "-out".into(), ca.clone().into()]);
    run(a)?;
    let mut a = os(&["req", "-x509"]);
    a.extend(os(&ec));
    a.extend(os(&[
        "-subj",
        &format!("/CN={host}"),
        "-addext",
        &san,
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-addext",
        "extendedKeyUsage=serverAuth",
        "-CA",
    ]));
    a.extend([
        ca.clone().into(),
        "-CAkey".into(),
        ca_key.into(),
        "-keyout".into(),
        key.clone().into(),
        "-out".into(),
        cert.clone().into(),
    ]);
    run(a)?;
    Ok((ca, cert, key))
}

/// The server binary Debian's `slapd` package installs.
pub const SLAPD: &str = "/usr/sbin/slapd";

/// An OpenLDAP server of our own: `back_mdb` with the `memberof` and `syncprov` overlays
/// (what refreshAndPersist needs), suffix [`Slapd::SUFFIX`], `ou=people` and `ou=groups`.
/// Listens on 127.0.0.1 (in `netns` when given) and on a unix socket (ldapi), which the
/// test's own changes use: it reaches the server from any namespace, and also while the
/// TCP listener is off ([`Slapd::resume_unreachable`]).
pub struct Slapd {
    dir: tempfile::TempDir,
    pub port: u16,
    /// The ldaps:// port, when started with TLS.
    pub tls_port: Option<u16>,
    /// The address it listens on (127.0.0.1 unless started with [`Slapd::start_on`]).
    pub host: String,
    netns: Option<String>,
    child: Option<Child>,
}

impl std::fmt::Debug for Slapd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slapd")
            .field("port", &self.port)
            .field("pid", &self.child.as_ref().map(|c| c.id()))
            .finish()
    }
}

impl Slapd {
    pub const SUFFIX: &'static str = "dc=example,dc=org";
    pub const ADMIN_DN: &'static str = "cn=admin,dc=example,dc=org";
    pub const ADMIN_PASSWORD: &'static str = "admin-secret";

    /// Whether slapd and the ldap-utils are installed.
    pub fn available() -> bool {
        Path::new(SLAPD).exists() && Path::new("/usr/bin/ldapmodify").exists()
    }

    /// Starts a server (in `netns` when given), waits until it answers, adds the base
    /// entries.
    pub fn start(netns: Option<&str>) -> anyhow::Result<Slapd> {
        Self::start_with(netns, false, "127.0.0.1")
    }

    /// [`Slapd::start`] listening on `host` (an address of `netns`), so that other
    /// namespaces of the test reach it.
    pub fn start_on(netns: Option<&str>, host: &str) -> anyhow::Result<Slapd> {
        Self::start_with(netns, false, host)
    }

    /// Like [`Slapd::start`], also listening on ldaps:// with a self-signed certificate
    /// for 127.0.0.1 ([`Slapd::ca_file`]).
    pub fn start_tls(netns: Option<&str>) -> anyhow::Result<Slapd> {
        Self::start_with(netns, true, "127.0.0.1")
    }

    fn start_with(netns: Option<&str>, tls: bool, host: &str) -> anyhow::Result<Slapd> {
        if !Self::available() {
            bail!("{SLAPD} or ldapmodify is missing: run scripts/install-deps.sh");
        }
        let dir = tempfile::Builder::new()
            .prefix("portcullis-slapd-")
            .tempdir()?;
        let d = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("db"))?;
        let tls_lines = if tls {
            let (_, cert, key) = test_certificate(dir.path(), "slapd", "127.0.0.1")?;
            format!(
                "TLSCertificateFile {}\nTLSCertificateKeyFile {}\n",
                cert.display(),
                key.display()
            )
        } else {
            String::new()
        };
        std::fs::write(
            dir.path().join("slapd.conf"),
            format!(
                "include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
moduleload syncprov
pidfile {d}/slapd.pid
{tls_lines}database mdb
suffix \"{suffix}\"
rootdn \"{admin}\"
rootpw {pw}
directory {d}/db
maxsize 104857600
index objectClass,entryUUID,entryCSN eq
overlay memberof
overlay syncprov
syncprov-checkpoint 100 10
",
                suffix = Self::SUFFIX,
                admin = Self::ADMIN_DN,
                pw = Self::ADMIN_PASSWORD,
            ),
        )?;
        let mut s = Slapd {
            dir,
            port: free_port()?,
            tls_port: if tls { Some(free_port()?) } else { None },
            host: host.to_string(),
            netns: netns.map(str::to_string),
            child: None,
        };
        s.launch(true)?;
        s.modify(&format!(
            "dn: {suffix}\nchangetype: add\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\n\
             dn: ou=people,{suffix}\nchangetype: add\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: ou=groups,{suffix}\nchangetype: add\nobjectClass: organizationalUnit\nou: groups\n",
            suffix = Self::SUFFIX
        ))?;
        Ok(s)
    }

    /// `ldap://<host>:<port>/`.
    pub fn url(&self) -> String {
        format!("ldap://{}:{}/", self.host, self.port)
    }

    /// `ldaps://127.0.0.1:<tls_port>/`, when started with TLS.
    pub fn ldaps_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("ldaps://127.0.0.1:{p}/"))
    }

    /// The certificate ldaps:// presents (self-signed: also its CA).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("slapd-ca.crt")
    }

    fn ldapi(&self) -> String {
        let path = self.dir.path().join("ldapi");
        format!("ldapi://{}", path.display().to_string().replace('/', "%2F"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn launch(&mut self, tcp: bool) -> anyhow::Result<()> {
        let d = self.dir.path();
        let listeners = if tcp {
            let tls = self.ldaps_url().unwrap_or_default();
            format!("{} {tls} {}", self.url(), self.ldapi())
        } else {
            self.ldapi()
        };
        let mut cmd = command_in(self.netns.as_deref(), SLAPD);
        // -d 0: stay in the foreground (our child, stopped by its PID).
        let child = cmd
            .arg("-f")
            .arg(d.join("slapd.conf"))
            .args(["-h", &listeners, "-d", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(d.join("stderr.log"))?))
            .spawn()
            .context("starting slapd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = Command::new("ldapsearch")
                .args(["-x", "-H", &self.ldapi(), "-s", "base", "-b", ""])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if let Some(c) = &mut self.child {
                if let Some(status) = c.try_wait()? {
                    let log = std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default();
                    bail!("slapd exited ({status}): {log}");
                }
            }
            if Instant::now() > deadline {
                bail!("slapd did not answer within 15 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGKILL to our child, then reap): an outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.launch(true)
    }

    /// Starts it again on its unix socket only: the gateway cannot reach it, the test can
    /// still change the directory.
    pub fn resume_unreachable(&mut self) -> anyhow::Result<()> {
        self.launch(false)
    }

    /// Runs `ldapmodify` (as the admin, over ldapi) with this LDIF; `changetype: add`
    /// entries are added.
    pub fn modify(&self, ldif: &str) -> anyhow::Result<()> {
        let mut child = Command::new("ldapmodify")
            .args([
                "-x",
                "-H",
                &self.ldapi(),
                "-D",
                Self::ADMIN_DN,
                "-w",
                Self::ADMIN_PASSWORD,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ldapmodify")?;
        child
            .stdin
            .take()
            .context("ldapmodify stdin")?
            .write_all(ldif.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "ldapmodify failed: {}\n{ldif}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}
