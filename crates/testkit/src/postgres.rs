//! A PostgreSQL 15 server of our own (Debian's `postgresql-15`): `initdb` into a temporary
//! directory owned by the `postgres` user, a superuser `portcullis` trusted on loopback,
//! a database `portcullis`, listening on 127.0.0.1 (inside `netns` when given) on a free
//! port and on a unix socket in that directory. Stopped (by its PID) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::{command_in, free_port};

/// Where Debian puts PostgreSQL 15's server programs.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    /// The TCP address it listens on (127.0.0.1 unless started with [`Postgres::start_on`]).
    pub host: String,
    netns: Option<String>,
    child: Option<Child>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("port", &self.port)
            .field("pid", &self.child.as_ref().map(|c| c.id()))
            .finish()
    }
}

fn as_postgres(netns: Option<&str>, program: &str) -> Command {
    // setpriv execs (no fork): the PID we hold is the server's own.
    let mut c = command_in(netns, "setpriv");
    c.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        program,
    ]);
    c
}

impl Postgres {
    pub const USER: &'static str = "portcullis";
    pub const DATABASE: &'static str = "portcullis";

    /// Whether the server programs are installed.
    pub fn available() -> bool {
        Path::new(PG_BIN).join("postgres").exists()
    }

    /// Creates the cluster, starts the server and creates the database.
    pub fn start(netns: Option<&str>) -> anyhow::Result<Postgres> {
        Self::start_on(netns, "127.0.0.1")
    }

    /// [`Postgres::start`] listening on `host` (an address of `netns`), so that other
    /// namespaces of the test reach it.
    pub fn start_on(netns: Option<&str>, host: &str) -> anyhow::Result<Postgres> {
        if !Self::available() {
            bail!("{PG_BIN}/postgres is missing: run scripts/install-deps.sh");
        }
        let dir = tempfile::Builder::new()
            .prefix("portcullis-pg-")
            .tempdir()?;
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path())
            .status()
            .context("chown of the postgres directory")?;
        if !status.success() {
            bail!("chown postgres {} failed", dir.path().display());
        }
        let data = dir.path().join("data");
        let out = as_postgres(None, &format!("{PG_BIN}/initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", Self::USER, "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb: {}", String::from_utf8_lossy(&out.stderr));
        }
        if host != "127.0.0.1" {
            // Clients in the test's other namespaces, on the same subnet.
            use std::io::Write as _;
            std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))?
                .write_all(b"host all all samenet trust\n")?;
        }
        let mut pg = Postgres {
            dir,
            port: free_port()?,
            host: host.to_string(),
            netns: netns.map(str::to_string),
            child: None,
        };
        pg.resume()?;
        pg.psql("postgres", &format!("CREATE DATABASE {}", Self::DATABASE))?;
        Ok(pg)
    }

    /// `postgres://portcullis@<host>:<port>/portcullis`.
    pub fn url(&self) -> String {
        format!(
            "postgres://{}@{}:{}/{}",
            Self::USER,
            self.host,
            self.port,
            Self::DATABASE
        )
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs SQL through psql over the unix socket (reachable from any namespace); returns
    /// its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                Self::USER,
                "-d",
                database,
            ])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Stops the server (fast shutdown: SIGINT to its PID), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix_kill(c.id(), "INT");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server (again) on the same port and data; returns once it answers.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let child = as_postgres(self.netns.as_deref(), &format!("{PG_BIN}/postgres"))
            .arg("-D")
            .arg(d.join("data"))
            .arg("-k")
            .arg(d)
            .args(["-p", &self.port.to_string()])
            .args(["-c", &format!("listen_addresses={}", self.host)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(d.join("postgres.log"))?))
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.psql("postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let log = std::fs::read_to_string(d.join("postgres.log")).unwrap_or_default();
                    bail!("postgres exited ({status}): {log}");
                }
            }
            if Instant::now() > deadline {
                bail!("postgres did not answer within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sends a signal by PID with kill(1) (no unsafe code here).
fn nix_kill(pid: u32, signal: &str) -> std::io::Result<std::process::ExitStatus> {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_of_our_own_answers_stops_and_resumes_with_its_data() -> anyhow::Result<()> {
        let mut pg = Postgres::start(None)?;
        pg.psql(
            Postgres::DATABASE,
            "CREATE TABLE t (v int); INSERT INTO t VALUES (7)",
        )?;
        pg.stop();
        assert!(pg.psql(Postgres::DATABASE, "SELECT 1").is_err());
        pg.resume()?;
        assert_eq!(pg.psql(Postgres::DATABASE, "SELECT v FROM t")?, "7");
        Ok(())
    }
}
