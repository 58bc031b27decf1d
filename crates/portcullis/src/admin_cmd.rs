//! `portcullis users ...`, `sessions ...`, `devices ...` and `ldap ...`: commands that talk to
//! the running gateway's admin API (`[http] listen`, token from `[admin] token_file`).

// Indexing a serde_json Value by key yields Null for a missing key; it never panics.
#![allow(clippy::indexing_slicing)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use clap::Subcommand;
use serde_json::Value;

#[derive(Subcommand)]
pub enum UsersCommand {
    /// Every user the gateway knows: source, groups, devices, live sessions.
    List {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revokes a user at once: every session and flow is cut before this returns.
    Disable {
        name: String,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Removes a user's TOTP authenticator (a lost phone); their next sign-on sets one
    /// up again. Audited.
    ResetMfa {
        name: String,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum ConsoleCommand {
    /// Prints a one-time link that signs its holder in to the console as NAME, valid
    /// 10 minutes, for when the IdP is down. Issuing it is an audited admin action.
    LoginLink {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// The console user the link signs in (their groups give the roles).
        #[arg(long = "as")]
        name: String,
    },
}

pub fn console(cmd: ConsoleCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ConsoleCommand::LoginLink { config, name } => {
            let v = call_with(
                &config,
                "POST",
                "/admin/v1/console/login-links",
                Some(&serde_json::json!({ "as": name })),
            )?;
            println!(
                "{}",
                v.get("url").and_then(Value::as_str).unwrap_or_default()
            );
            eprintln!(
                "valid once, until {}",
                v.get("expires_at")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Subcommand)]
pub enum SessionsCommand {
    /// Live sessions.
    List {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Ends one session and cuts its flows (the device may connect again if allowed).
    Kill {
        id: u64,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum LdapCommand {
    /// The LDAP sync: connected, live, counts, the last pass, a refused pass.
    Status {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Applies the directory as it is now, past the mass-removal guard. Check first
    /// (`ldap status`, `ldap lookup`) that the directory really is right.
    ApproveRemoval {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Looks a user up in the directory itself, as the sync maps it.
    Lookup {
        name: String,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum DevicesCommand {
    /// Registered devices: owner, address, expiry, rotation.
    List {
        /// Only this user's devices.
        #[arg(long)]
        user: Option<String>,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Prints a registered device's WireGuard profile again (a site's router's: its
    /// subnets named, AllowedIPs per site), without the private key.
    Profile {
        id: String,
        /// Write the profile to this file (mode 0600) instead of standard output.
        #[arg(long)]
        profile: Option<PathBuf>,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Registers a device for USER and prints its WireGuard profile. Without
    /// --public-key the gateway generates the key pair: the profile then holds the
    /// private key, shown this once.
    Add {
        user: String,
        /// The device's own public key (`wg pubkey`), so its private key never leaves it.
        #[arg(long)]
        public_key: Option<String>,
        /// A label ("alice's laptop").
        #[arg(long)]
        name: Option<String>,
        /// Shorter than `[devices] key_lifetime_secs` (never longer).
        #[arg(long)]
        lifetime_secs: Option<u64>,
        /// A subnet behind the device, which is then a site's router (repeatable; e.g.
        /// --route 192.168.10.0/24).
        #[arg(long = "route", value_name = "CIDR")]
        routes: Vec<ipnet::IpNet>,
        /// Write the profile to this file (mode 0600) instead of standard output.
        #[arg(long)]
        profile: Option<PathBuf>,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Replaces a device's key (and tunnel address); the old key keeps working for the
    /// grace period. Prints the new profile.
    Rotate {
        id: String,
        #[arg(long)]
        public_key: Option<String>,
        /// How long the old key stays valid (default `[devices] rotation_grace_secs`).
        #[arg(long)]
        grace_secs: Option<u64>,
        #[arg(long)]
        profile: Option<PathBuf>,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Removes a device: its session and flows are cut before this returns.
    Remove {
        id: String,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
}

/// Writes a profile (it may hold a private key: owner-only permissions) or prints it.
fn emit_profile(v: &Value, file: Option<&Path>) -> anyhow::Result<()> {
    let text = v["profile"].as_str().unwrap_or_default();
    match file {
        Some(f) => {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(f)
                .with_context(|| format!("writing the profile to {}", f.display()))?;
            out.write_all(text.as_bytes())?;
            eprintln!(
                "device {} ({}): profile written to {}",
                v["device"]["id"].as_str().unwrap_or(""),
                v["device"]["address"].as_str().unwrap_or(""),
                f.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(())
}

pub fn devices(cmd: DevicesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DevicesCommand::List { user, config, json } => {
            let path = match &user {
                Some(u) => format!("/admin/v1/devices?user={}", encode(u)),
                None => "/admin/v1/devices".into(),
            };
            let v = call(&config, "GET", &path)?;
            if json {
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<36} {:<16} {:<15} {:<20} {:<44} STATE",
                "ID", "USER", "ADDRESS", "EXPIRES", "PUBLIC_KEY"
            );
            for d in v.as_array().into_iter().flatten() {
                let state = match d["replaced_by"].as_str() {
                    Some(next) => format!("rotated to {next}, valid until expiry"),
                    None => "active".into(),
                };
                println!(
                    "{:<36} {:<16} {:<15} {:<20} {:<44} {state}",
                    d["id"].as_str().unwrap_or(""),
                    d["user"].as_str().unwrap_or(""),
                    d["address"].as_str().unwrap_or(""),
                    d["expires"].as_str().unwrap_or("").get(..19).unwrap_or(""),
                    d["public_key"].as_str().unwrap_or(""),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DevicesCommand::Profile {
            id,
            profile,
            config,
        } => {
            let v = call_with(
                &config,
                "GET",
                &format!("/admin/v1/devices/{id}/profile"),
                None,
            )?;
            emit_profile(&v, profile.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        DevicesCommand::Add {
            user,
            public_key,
            name,
            lifetime_secs,
            routes,
            profile,
            config,
        } => {
            let body = serde_json::json!({
                "user": user, "public_key": public_key, "name": name, "lifetime_secs": lifetime_secs,
                "routes": routes,
            });
            let v = call_with(&config, "POST", "/admin/v1/devices", Some(&body))?;
            emit_profile(&v, profile.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        DevicesCommand::Rotate {
            id,
            public_key,
            grace_secs,
            profile,
            config,
        } => {
            let body = serde_json::json!({"public_key": public_key, "grace_secs": grace_secs});
            let v = call_with(
                &config,
                "POST",
                &format!("/admin/v1/devices/{}/rotate", encode(&id)),
                Some(&body),
            )?;
            eprintln!(
                "device {id}: rotated to {}; the old key works until {}",
                v["device"]["id"].as_str().unwrap_or(""),
                v["previous"]["expires"].as_str().unwrap_or("-"),
            );
            emit_profile(&v, profile.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        DevicesCommand::Remove { id, config } => {
            call(
                &config,
                "DELETE",
                &format!("/admin/v1/devices/{}", encode(&id)),
            )?;
            println!("device {id}: removed");
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn ldap(cmd: LdapCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LdapCommand::Status { config, json } => {
            let v = call(&config, "GET", "/admin/v1/ldap")?;
            if json {
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            for k in [
                "url",
                "connected",
                "live",
                "users",
                "groups",
                "last_pass_at",
                "last_error",
                "refused",
            ] {
                let shown = match &v[k] {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    other => other.to_string(),
                };
                println!("{k:<13} {shown}");
            }
            for s in v["skipped"].as_array().into_iter().flatten() {
                println!("skipped       {}", s.as_str().unwrap_or(""));
            }
            Ok(ExitCode::SUCCESS)
        }
        LdapCommand::ApproveRemoval { config } => {
            let v = call(&config, "POST", "/admin/v1/ldap/approve-removal")?;
            println!("{}", v["outcome"].as_str().unwrap_or("approved"));
            Ok(ExitCode::SUCCESS)
        }
        LdapCommand::Lookup { name, config } => {
            let v = call(
                &config,
                "GET",
                &format!("/admin/v1/ldap/users/{}", encode(&name)),
            )?;
            let matches = v["matches"].as_array().cloned().unwrap_or_default();
            if matches.is_empty() {
                println!("no user named {name:?} in the directory");
                return Ok(ExitCode::from(1));
            }
            for m in matches {
                println!(
                    "{}\n  user_name {}\n  email     {}\n  active    {}\n  tags      {}{}",
                    m["dn"].as_str().unwrap_or(""),
                    m["user_name"].as_str().unwrap_or("-"),
                    m["email"].as_str().unwrap_or(""),
                    m["active"].as_bool().unwrap_or(false),
                    m["tags"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(","))
                        .unwrap_or_default(),
                    m["problem"]
                        .as_str()
                        .map(|p| format!("\n  problem   {p}"))
                        .unwrap_or_default(),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn users(cmd: UsersCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        UsersCommand::List { config, json } => {
            let v = call(&config, "GET", "/admin/v1/users")?;
            if json {
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<24} {:<8} {:<7} {:<30} {:>7} {:>8}",
                "USER", "SOURCE", "ACTIVE", "GROUPS", "DEVICES", "SESSIONS"
            );
            for u in v.as_array().into_iter().flatten() {
                let list = |k: &str| {
                    u[k].as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default()
                };
                println!(
                    "{:<24} {:<8} {:<7} {:<30} {:>7} {:>8}",
                    u["name"].as_str().unwrap_or(""),
                    u["source"].as_str().unwrap_or(""),
                    u["active"].as_bool().unwrap_or(false),
                    list("groups"),
                    u["devices"].as_array().map_or(0, Vec::len),
                    u["sessions"].as_u64().unwrap_or(0),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        UsersCommand::Disable { name, config } => {
            let v = call(
                &config,
                "POST",
                &format!("/admin/v1/users/{}/disable", encode(&name)),
            )?;
            println!("{name}: disabled");
            if let Some(note) = v["note"].as_str() {
                eprintln!("note: {note}");
            }
            Ok(ExitCode::SUCCESS)
        }
        UsersCommand::ResetMfa { name, config } => {
            call(
                &config,
                "POST",
                &format!("/admin/v1/users/{}/reset-mfa", encode(&name)),
            )?;
            println!("{name}: authenticator reset; the next sign-on sets one up");
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn sessions(cmd: SessionsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SessionsCommand::List { config, json } => {
            let v = call(&config, "GET", "/admin/v1/sessions")?;
            if json {
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<18} {:<20} {:<22} {:<25} {:>12} {:>12}",
                "ID", "USER", "ENDPOINT", "STARTED", "RX_BYTES", "TX_BYTES"
            );
            for s in v.as_array().into_iter().flatten() {
                println!(
                    "{:<18} {:<20} {:<22} {:<25} {:>12} {:>12}",
                    s["id"].as_u64().unwrap_or(0),
                    s["user"].as_str().unwrap_or(""),
                    s["endpoint"].as_str().unwrap_or(""),
                    s["started"].as_str().unwrap_or(""),
                    s["rx_bytes"].as_u64().unwrap_or(0),
                    s["tx_bytes"].as_u64().unwrap_or(0),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCommand::Kill { id, config } => {
            call(&config, "POST", &format!("/admin/v1/sessions/{id}/kill"))?;
            println!("session {id}: killed");
            Ok(ExitCode::SUCCESS)
        }
    }
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// TLS to the gateway's own listener, trusting exactly the certificate in its
/// `[http] cert_file` (the CLI runs where the configuration is): no CA or host name is
/// involved, and any other certificate is refused.
fn pinned_tls(
    tcp: TcpStream,
    cert_file: &Path,
) -> anyhow::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    use rustls_pki_types::pem::PemObject as _;
    let leaf = rustls_pki_types::CertificateDer::pem_file_iter(cert_file)
        .with_context(|| format!("reading {}", cert_file.display()))?
        .next()
        .ok_or_else(|| anyhow!("{} holds no certificate", cert_file.display()))?
        .with_context(|| format!("{}: not a PEM certificate", cert_file.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Pinned {
        leaf: leaf.into_owned(),
        algorithms: provider.signature_verification_algorithms,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("portcullis.invalid")?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

#[derive(Debug)]
struct Pinned {
    leaf: rustls_pki_types::CertificateDer<'static>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the gateway presented a certificate other than [http] cert_file".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Percent-encodes a path segment.
pub(crate) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn call(config: &Path, method: &str, path: &str) -> anyhow::Result<Value> {
    call_with(config, method, path, None)
}

/// One request to the admin API over plain HTTP/1.1, with an optional JSON body; errors
/// carry the API's message.
pub(crate) fn call_with(
    config: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let loaded = portcullis_config::load_unkeyed(config)?;
    let c = &loaded.config;
    let http = c.http.as_ref().ok_or_else(|| {
        anyhow!(
            "{}: no [http] listen: the admin API is not enabled",
            config.display()
        )
    })?;
    let admin = c.admin.as_ref().ok_or_else(|| {
        anyhow!(
            "{}: no [admin] token_file: the admin API is not enabled",
            config.display()
        )
    })?;
    let token = portcullis_config::TokenSet::first_token(
        &loaded.path,
        "admin.token_file",
        &admin.token_file,
    )?;
    let mut addr = http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| {
        format!("connecting to the gateway's admin API at {addr} (is the gateway running?)")
    })?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut stream: Box<dyn ReadWrite> = match &http.cert_file {
        Some(cert) => Box::new(pinned_tls(tcp, cert)?),
        None => Box::new(tcp),
    };
    let payload = body.map(Value::to_string).unwrap_or_default();
    let content_type = if body.is_some() {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n{content_type}Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        token.0,
        payload.len()
    )?;
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Ok(_) => {}
        // Servers may close without close_notify after `Connection: close`.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e).context(format!("reading the answer from {addr}")),
    }
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed answer from {addr}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed status line from {addr}"))?;
    let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        let msg = value["error"].as_str().unwrap_or(body.trim());
        return Err(anyhow!("{method} {path}: {status}: {msg}"));
    }
    Ok(value)
}
