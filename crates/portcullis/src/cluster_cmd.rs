//! `portcullis cluster migrate|import|status`: the cluster's schema and its nodes, read from
//! `[cluster]` in the configuration.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Context as _};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Create or upgrade the cluster schema in PostgreSQL.
    Migrate {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Move a single node's users, groups and devices (its SQLite identity store) into an
    /// empty cluster, ids kept.
    Import {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// The single node's `[identity] database`.
        #[arg(long)]
        from_sqlite: PathBuf,
    },
    /// The nodes: id, address, version, started, last heartbeat, sessions, flows, applied
    /// change number and lag, state (up, down, stopped).
    Status {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: ClusterCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(command))
}

async fn connect(config: &Path) -> anyhow::Result<tokio_postgres::Client> {
    connect_as(config).await.map(|(client, _)| client)
}

/// The client, and this node's id.
async fn connect_as(config: &Path) -> anyhow::Result<(tokio_postgres::Client, String)> {
    let loaded = portcullis_config::load_unkeyed(config)?;
    let c = loaded
        .config
        .cluster
        .as_ref()
        .ok_or_else(|| anyhow!("{}: no [cluster] section", config.display()))?;
    let password = match &c.password_file {
        Some(f) => {
            Some(portcullis_config::read_secret(&loaded.path, "cluster.password_file", f)?.0)
        }
        None => None,
    };
    let client = portcullis_cluster::connect(&c.database_url, password.as_deref())
        .await
        .with_context(|| {
            format!(
                "cluster.database_url {}",
                portcullis_config::redact_url(&c.database_url)
            )
        })?;
    Ok((client, c.node_id.clone()))
}

async fn run_async(command: ClusterCommand) -> anyhow::Result<ExitCode> {
    match command {
        ClusterCommand::Migrate { config } => {
            let mut client = connect(&config).await?;
            let (before, after) = portcullis_cluster::migrate(&mut client).await?;
            if before == after {
                println!("cluster schema version {after} (already current)");
            } else {
                println!("cluster schema version {after} (was {before})");
            }
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Import {
            config,
            from_sqlite,
        } => {
            // Opening creates a missing database: refuse a path that is not there.
            if !from_sqlite.is_file() {
                return Err(anyhow!(
                    "--from-sqlite {}: no such file",
                    from_sqlite.display()
                ));
            }
            let (store, users, groups) = portcullis_identity::SqliteStore::open(&from_sqlite)?;
            let devices = store.devices()?;
            drop(store);
            let (mut client, node) = connect_as(&config).await?;
            let done =
                portcullis_cluster::import(&mut client, &node, &users, &groups, &devices).await?;
            println!(
                "imported {} users, {} groups, {} devices from {} (change {})",
                done.users,
                done.groups,
                done.devices,
                from_sqlite.display(),
                done.change
            );
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Status { config, json } => {
            let client = connect(&config).await?;
            let overview = portcullis_cluster::overview(&client).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&overview)?);
                return Ok(ExitCode::SUCCESS);
            }
            let nodes = overview.nodes;
            println!(
                "{:<16} {:<22} {:<8} {:<7} {:<20} {:>8} {:>8} {:>8} {:>6}",
                "NODE",
                "ADDRESS",
                "VERSION",
                "STATE",
                "LAST HEARTBEAT",
                "SESSIONS",
                "FLOWS",
                "APPLIED",
                "LAG"
            );
            for n in nodes {
                println!(
                    "{:<16} {:<22} {:<8} {:<7} {:<20} {:>8} {:>8} {:>8} {:>6}",
                    n.node_id,
                    n.address,
                    n.version,
                    n.state,
                    n.heartbeat.format("%Y-%m-%d %H:%M:%S"),
                    n.sessions,
                    n.flows,
                    n.applied_change,
                    n.lag
                );
            }
            println!("last change {}", overview.last_change);
            for l in overview.leases {
                println!(
                    "lease {:<24} {:<16} {} until {}",
                    l.name,
                    l.holder,
                    if l.held { "held" } else { "expired" },
                    l.expires.format("%Y-%m-%d %H:%M:%S")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
