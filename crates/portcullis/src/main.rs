//! The `portcullis` binary: one CLI for the gateway and its tooling.
//!
//! - `portcullis gateway --config FILE`: run the gateway.
//! - `portcullis policy validate|test|explain|bench`: policy tooling (for a policy repo's CI).
//! - `portcullis audit migrate|query|verify|serve --config FILE`: the audit trail in
//!   ClickHouse (schema, auditor queries and reports, chain verification, HTTP API).
//! - `portcullis users list|disable NAME` / `portcullis sessions list|kill ID`: offboarding,
//!   through the running gateway's admin API.
//! - `portcullis check-config --config FILE`: check a configuration file.
//! - `portcullis keygen` / `portcullis pubkey`: WireGuard keys, like `wg genkey` / `wg pubkey`.
//!
//! Every flag can also be set from the environment (`PORTCULLIS_*`, shown in `--help`).

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use base64::Engine as _;
use clap::{Parser, Subcommand};

mod access_cmd;
mod admin_cmd;
mod audit_cmd;
mod cluster_cmd;
mod gateway;
mod policy_cmd;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Identity-aware WireGuard gateway"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "portcullis_io=debug".
    #[arg(long, global = true, env = "PORTCULLIS_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Gateway {
        /// The TOML configuration file.
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// Overrides [gateway] listen.
        #[arg(long, env = "PORTCULLIS_LISTEN")]
        listen: Option<SocketAddr>,
        /// Overrides [audit] events_file.
        #[arg(long, env = "PORTCULLIS_EVENTS_FILE")]
        events_file: Option<PathBuf>,
        /// Overrides [policy] dir.
        #[arg(long, env = "PORTCULLIS_POLICY_DIR")]
        policy_dir: Option<PathBuf>,
    },
    /// Check a configuration file and exit (0 when valid).
    CheckConfig {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Policy tooling.
    Policy {
        #[command(subcommand)]
        command: policy_cmd::PolicyCommand,
    },
    /// The audit trail in ClickHouse: migrate, query, verify, serve.
    Audit {
        #[command(subcommand)]
        command: audit_cmd::AuditCommand,
    },
    /// The cluster on PostgreSQL (`[cluster]`): migrate the schema, import a single node's
    /// directory, list the nodes.
    Cluster {
        #[command(subcommand)]
        command: cluster_cmd::ClusterCommand,
    },
    /// Users of the running gateway: list, disable (revokes at once).
    Users {
        #[command(subcommand)]
        command: admin_cmd::UsersCommand,
    },
    /// Sessions of the running gateway: list, kill.
    Sessions {
        #[command(subcommand)]
        command: admin_cmd::SessionsCommand,
    },
    /// Devices of the running gateway: list, add (prints a WireGuard profile), rotate,
    /// remove.
    Devices {
        #[command(subcommand)]
        command: admin_cmd::DevicesCommand,
    },
    /// Just-in-time access requests on the running gateway: request, list, show,
    /// approve, deny, revoke.
    Access {
        #[command(subcommand)]
        command: access_cmd::AccessCommand,
    },
    /// The web console: login-link (break-glass sign-in when the IdP is down).
    Console {
        #[command(subcommand)]
        command: admin_cmd::ConsoleCommand,
    },
    /// The running gateway's LDAP sync: status, approve-removal, lookup.
    Ldap {
        #[command(subcommand)]
        command: admin_cmd::LdapCommand,
    },
    /// Print a new WireGuard private key (base64).
    Keygen,
    /// Read a private key on stdin, print its public key.
    Pubkey,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Gateway {
            config,
            listen,
            events_file,
            policy_dir,
        } => {
            let mut loaded = portcullis_config::load(&config)?;
            for w in &loaded.warnings {
                tracing::warn!("{w}");
            }
            if let Some(l) = listen {
                loaded.config.gateway.listen = l;
            }
            if let Some(e) = events_file {
                loaded.config.audit.events_file = Some(e);
            }
            if let Some(d) = policy_dir {
                loaded.config.policy.dir = d;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(gateway::run(loaded))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => {
            let loaded = portcullis_config::load(&config)?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            gateway::check(&loaded)?;
            println!("{}: ok", config.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy { command } => policy_cmd::run(command),
        Command::Audit { command } => audit_cmd::run(command),
        Command::Cluster { command } => cluster_cmd::run(command),
        Command::Users { command } => admin_cmd::users(command),
        Command::Sessions { command } => admin_cmd::sessions(command),
        Command::Ldap { command } => admin_cmd::ldap(command),
        Command::Devices { command } => admin_cmd::devices(command),
        Command::Access { command } => access_cmd::run(command),
        Command::Console { command } => admin_cmd::console(command),
        Command::Keygen => {
            let secret = boringtun_secret();
            println!(
                "{}",
                base64::engine::general_purpose::STANDARD.encode(secret)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Pubkey => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            let key = portcullis_config::decode_key(&text)
                .map_err(|_| anyhow::anyhow!("stdin does not hold a base64 32-byte private key"))?;
            let public = x25519_public(key);
            println!(
                "{}",
                base64::engine::general_purpose::STANDARD.encode(public)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn boringtun_secret() -> [u8; 32] {
    use rand::RngCore as _;
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    // Clamp as X25519 expects (wg genkey does the same).
    key[0] &= 248;
    key[31] = (key[31] & 127) | 64;
    key
}

fn x25519_public(private: [u8; 32]) -> [u8; 32] {
    portcullis_core_public(private)
}

fn portcullis_core_public(private: [u8; 32]) -> [u8; 32] {
    let secret = boringtun::x25519::StaticSecret::from(private);
    boringtun::x25519::PublicKey::from(&secret).to_bytes()
}
