//! `portcullis audit …`: schema migration, auditor queries, chain verification, and the
//! auditor HTTP API. All read `[audit.clickhouse]` (and `[audit.api]`) from the config;
//! none needs the gateway's private key.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Context as _};
use clap::{Args, Subcommand};
use portcullis_audit::Store;
use portcullis_auditor::{Filter, Report};

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Create or upgrade the ClickHouse database and tables.
    Migrate {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// List events, or run a canned report, from ClickHouse.
    Query {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        filter: FilterArgs,
        /// sessions, who-reached, denied, top-talkers, access-requests, revocations or policy-changes.
        #[arg(long)]
        report: Option<String>,
        /// JSON ({"columns": [...], "rows": [[...]]}) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Recompute every gateway's hash chain from ClickHouse; exit 1 on any finding.
    Verify {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// RFC 3339 time or a duration ago (24h, 7d).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// Only this gateway.
        #[arg(long)]
        gateway: Option<String>,
        /// Public keys (`ed25519:…`, a PEM public key, or a file holding one) signed
        /// checkpoints are checked with; default: the one of `[audit]
        /// checkpoint_key_file`. Repeat for keys rotated out.
        #[arg(long, env = "PORTCULLIS_AUDIT_PUBKEY", value_delimiter = ',')]
        pubkey: Vec<String>,
        /// Checkpoint copies kept outside ClickHouse (`checkpoints.jsonl` of each node);
        /// default: this node's, beside its spool. Repeatable.
        #[arg(long)]
        checkpoints: Vec<PathBuf>,
        /// Outside checkpoints younger than this are not used (their rows may still be
        /// in a live node's spool).
        #[arg(long, default_value_t = 120)]
        grace_secs: u64,
        #[arg(long)]
        json: bool,
    },
    /// Export the rows the filters select, with a signed manifest and a proof per row,
    /// for an auditor to check offline (`audit verify-export`).
    Export {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        filter: FilterArgs,
        /// csv or jsonl.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// A new (or empty) directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check an export offline (no ClickHouse): manifest signature, file digests,
    /// checkpoint signatures, every row's hash and proof, their order. Exit 1 on any finding.
    VerifyExport {
        dir: PathBuf,
        /// The published checkpoint key (`ed25519:…`, PEM, or a file holding one);
        /// repeatable for rotated keys.
        #[arg(long, required = true, value_delimiter = ',')]
        pubkey: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Legal holds: retention never drops partitions holding rows of a held user or
    /// time range. Placed and lifted through the gateway's admin API, audited.
    Hold {
        #[command(subcommand)]
        command: HoldCommand,
    },
    /// Write a new Ed25519 checkpoint signing key (PKCS#8 PEM, mode 0600).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key of `[audit] checkpoint_key_file` (what auditors verify with).
    Pubkey {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Serve the read-only auditor HTTP API ([audit.api]).
    Serve {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum HoldCommand {
    /// Place a hold: a user's rows in a time range, or every row in it (no --user).
    Add {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        user: Option<String>,
        /// RFC 3339 time or a duration ago (90d).
        #[arg(long)]
        since: String,
        #[arg(long, default_value = "0s")]
        until: String,
        /// The case or request the hold is for (recorded).
        #[arg(long)]
        reason: String,
    },
    /// The active holds.
    List {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Lift a hold.
    Remove {
        id: String,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        reason: String,
    },
}

// Indexing a serde_json Value by key yields Null for a missing key; it never panics.
#[allow(clippy::indexing_slicing)]
fn run_hold(command: HoldCommand) -> anyhow::Result<ExitCode> {
    use crate::admin_cmd::call_with;
    match command {
        HoldCommand::Add {
            config,
            user,
            since,
            until,
            reason,
        } => {
            let body =
                serde_json::json!({"user": user, "since": since, "until": until, "reason": reason});
            let v = call_with(&config, "POST", "/admin/v1/audit/holds", Some(&body))?;
            println!(
                "hold {} placed: {} from {} to {}",
                v["id"].as_str().unwrap_or("?"),
                v["user"]
                    .as_str()
                    .filter(|u| !u.is_empty())
                    .unwrap_or("every user"),
                v["since"].as_str().unwrap_or("?"),
                v["until"].as_str().unwrap_or("?")
            );
        }
        HoldCommand::List { config, json } => {
            let v = call_with(&config, "GET", "/admin/v1/audit/holds", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v["holds"])?);
            } else {
                let holds = v["holds"].as_array().cloned().unwrap_or_default();
                for h in &holds {
                    println!(
                        "{}  {}  {} .. {}  by {} at {}: {}",
                        h["id"].as_str().unwrap_or(""),
                        h["user"]
                            .as_str()
                            .filter(|u| !u.is_empty())
                            .unwrap_or("(every user)"),
                        h["since"].as_str().unwrap_or(""),
                        h["until"].as_str().unwrap_or(""),
                        h["placed_by"].as_str().unwrap_or(""),
                        h["placed_at"].as_str().unwrap_or(""),
                        h["reason"].as_str().unwrap_or("")
                    );
                }
                println!("({} active holds)", holds.len());
            }
        }
        HoldCommand::Remove { id, config, reason } => {
            let path = format!(
                "/admin/v1/audit/holds/{}/remove",
                crate::admin_cmd::encode(&id)
            );
            call_with(
                &config,
                "POST",
                &path,
                Some(&serde_json::json!({"reason": reason})),
            )?;
            println!("hold {id} lifted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct FilterArgs {
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    group: Option<String>,
    /// Destination address or CIDR.
    #[arg(long)]
    dst: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    /// allow or deny.
    #[arg(long)]
    decision: Option<String>,
    /// RFC 3339 time or a duration ago (90s, 15m, 24h, 7d).
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    session: Option<u64>,
    /// Event kind (flow_opened, flow_denied, session_started, user_revoked, …).
    #[arg(long)]
    kind: Option<String>,
    /// Most rows to show (default 1000).
    #[arg(long)]
    limit: Option<u64>,
    /// Rows to skip first (the next page; the order is fixed).
    #[arg(long)]
    offset: Option<u64>,
    /// A listing's order: asc (oldest first, the default) or desc (newest first).
    #[arg(long)]
    order: Option<String>,
    /// who-reached and top-talkers also by source subnet: IPv4 sources by this prefix
    /// length (24: a site's /24), IPv6 sources by /64.
    #[arg(long)]
    source_prefix: Option<u8>,
}

impl From<FilterArgs> for Filter {
    fn from(a: FilterArgs) -> Filter {
        Filter {
            user: a.user,
            group: a.group,
            dst: a.dst,
            port: a.port,
            decision: a.decision,
            since: a.since,
            until: a.until,
            session: a.session,
            kind: a.kind,
            limit: a.limit,
            offset: a.offset,
            order: a.order,
            source_prefix: a.source_prefix,
        }
    }
}

async fn connect(config: &Path) -> anyhow::Result<(Store, portcullis_config::Loaded)> {
    let loaded = portcullis_config::load_unkeyed(config)?;
    let sc = portcullis_io::store_config(&loaded)?.ok_or_else(|| {
        anyhow!(
            "{}: key `audit.clickhouse`: missing (the audit commands need ClickHouse)",
            config.display()
        )
    })?;
    let store = Store::connect(&sc).await?;
    Ok((store, loaded))
}

pub fn run(command: AuditCommand) -> anyhow::Result<ExitCode> {
    // The admin API client blocks: no runtime around it.
    if let AuditCommand::Hold { command } = command {
        return run_hold(command);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(command))
}

async fn run_async(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Migrate { config } => {
            let (store, _) = connect(&config).await?;
            let applied = store.migrate().await?;
            println!(
                "clickhouse {}.{} database {}: schema version {} ({})",
                store.version.0,
                store.version.1,
                store.database,
                portcullis_audit::SCHEMA_VERSION,
                if applied.is_empty() {
                    "already current".to_string()
                } else {
                    format!("applied {applied:?}")
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Query {
            config,
            filter,
            report,
            json,
        } => {
            let report: Option<Report> = report.as_deref().map(str::parse).transpose()?;
            let (store, _) = connect(&config).await?;
            let table =
                portcullis_auditor::run_query(&store, &filter.into(), report, chrono::Utc::now())
                    .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&table)?);
            } else {
                print!("{}", table.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export {
            config,
            filter,
            format,
            out,
        } => {
            let format = portcullis_auditor::evidence::Format::parse(&format)
                .ok_or_else(|| anyhow!("--format {format:?}: expected csv or jsonl"))?;
            let (store, loaded) = connect(&config).await?;
            let key_file = loaded.config.audit.checkpoint_key_file.clone().ok_or_else(|| {
                anyhow!(
                    "{}: key `audit.checkpoint_key_file`: missing (exports are signed with the checkpoint key)",
                    config.display()
                )
            })?;
            let key = portcullis_io::checkpoint_key(&loaded, &key_file)?;
            let summary = portcullis_auditor::export::export(
                &store,
                &filter.into(),
                format,
                &out,
                &key,
                chrono::Utc::now(),
            )
            .await?;
            println!(
                "exported {} rows under {} signed checkpoints into {}",
                summary.rows,
                summary.checkpoints,
                out.display()
            );
            for s in &summary.segments {
                println!(
                    "gateway {}: seq {}..={} ({} rows)",
                    s.gateway, s.first_seq, s.last_seq, s.rows
                );
            }
            println!(
                "verify with: portcullis audit verify-export {} --pubkey {}",
                out.display(),
                key.public()
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::VerifyExport { dir, pubkey, json } => {
            let keys = parse_keys(&pubkey)?;
            let report = portcullis_auditor::evidence::verify_export(&dir, &keys)
                .with_context(|| format!("reading export {}", dir.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for f in &report.findings {
                    println!("FINDING {}", serde_json::to_string(f)?);
                }
                println!(
                    "{} rows checked under {} signed checkpoints, {} findings: {}",
                    report.rows,
                    report.checkpoints,
                    report.findings.len(),
                    if report.ok {
                        "verified"
                    } else {
                        "NOT verified"
                    }
                );
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AuditCommand::Hold { command } => run_hold(command),
        AuditCommand::Keygen { out } => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let pem = portcullis_audit::checkpoint::SigningKey::generate_pem()?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("creating {} (it must not exist)", out.display()))?;
            f.write_all(pem.as_bytes())?;
            f.sync_all()?;
            let key = portcullis_audit::checkpoint::SigningKey::from_pem(&pem)?;
            println!("{}", key.public());
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Pubkey { config } => {
            let loaded = portcullis_config::load_unkeyed(&config)?;
            let file = loaded
                .config
                .audit
                .checkpoint_key_file
                .clone()
                .ok_or_else(|| {
                    anyhow!(
                        "{}: key `audit.checkpoint_key_file`: missing (no checkpoint signing key)",
                        config.display()
                    )
                })?;
            let key = portcullis_io::checkpoint_key(&loaded, &file)?;
            println!("{}", key.public());
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify {
            config,
            since,
            until,
            gateway,
            pubkey,
            checkpoints,
            grace_secs,
            json,
        } => {
            let now = chrono::Utc::now();
            let since = since
                .as_deref()
                .map(|t| portcullis_auditor::filter::parse_time(t, now))
                .transpose()?;
            let until = until
                .as_deref()
                .map(|t| portcullis_auditor::filter::parse_time(t, now))
                .transpose()?;
            let (store, loaded) = connect(&config).await?;
            let keys = verify_keys(&loaded, &pubkey)?;
            let mut outside = outside_checkpoints(&loaded, &checkpoints)?;
            // In a cluster, every node's copy in the database too (when checking them).
            let with_keys = !pubkey.is_empty() || loaded.config.audit.checkpoint_key_file.is_some();
            if let (Some(cl), true) = (&loaded.config.cluster, with_keys) {
                match cluster_checkpoints(&loaded, cl).await {
                    Ok(mut cps) => outside.append(&mut cps),
                    Err(e) => eprintln!(
                        "warning: the cluster database's checkpoints were not read: {e:#}"
                    ),
                }
            }
            let checking = !keys.is_empty();
            let opts = portcullis_auditor::VerifyOptions {
                gateway: gateway.clone(),
                since,
                until,
                keys,
                outside,
                grace: std::time::Duration::from_secs(grace_secs),
            };
            let mut report = portcullis_auditor::verify_trail(&store, &opts).await?;
            // In a cluster every registered node must have a chain (over all time).
            if let (Some(cl), None, None, None) = (&loaded.config.cluster, &gateway, since, until) {
                match registered_nodes(&loaded, cl).await {
                    Ok(nodes) => report.expect_gateways(nodes.iter().map(String::as_str)),
                    Err(e) => eprintln!(
                        "warning: the cluster's nodes were not cross-checked (every node's chain present): {e:#}"
                    ),
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for (g, (first, last)) in &report.gateways {
                    println!("gateway {g}: seq {first}..={last}");
                }
                for f in &report.findings {
                    println!("FINDING {}", serde_json::to_string(f)?);
                }
                if checking {
                    println!(
                        "{} signed checkpoints verified; rows not yet signed: {:?}",
                        report.checkpoints_verified, report.unsigned_tail
                    );
                    for (g, ranges) in &report.uncovered {
                        println!("gateway {g}: rows under no signed root (chain only): {ranges:?}");
                    }
                } else {
                    println!("signed checkpoints not checked: no key (--pubkey or [audit] checkpoint_key_file)");
                }
                println!(
                    "{} rows checked, {} findings",
                    report.rows,
                    report.findings.len()
                );
                if report.rows == 0 {
                    println!("nothing was verified: no rows in the range (not a pass)");
                }
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AuditCommand::Serve { config } => {
            let (store, loaded) = connect(&config).await?;
            let api = loaded
                .config
                .audit
                .api
                .clone()
                .ok_or_else(|| anyhow!("{}: key `audit.api`: missing", config.display()))?;
            let token = portcullis_config::read_secret(
                &loaded.path,
                "audit.api.token_file",
                &api.token_file,
            )?;
            let listener = tokio::net::TcpListener::bind(api.listen)
                .await
                .with_context(|| format!("binding {}", api.listen))?;
            tracing::info!(listen = %listener.local_addr()?, "auditor api up");
            // The gateway's listener limits (connection caps, header and idle timeouts)
            // and JSON errors apply to the auditors' API too.
            let limits = portcullis_http::serve::Limits {
                max_connections: 1024,
                max_connections_per_address: 64,
                header_timeout: std::time::Duration::from_secs(10),
                idle_timeout: std::time::Duration::from_secs(60),
            }
            .fitted();
            // Reconnecting to the next replica after a failed query.
            let sc = portcullis_io::store_config(&loaded)?
                .ok_or_else(|| anyhow!("{}: key `audit.clickhouse`: missing", config.display()))?;
            drop(store);
            let handle = portcullis_auditor::http::StoreHandle::lazy(sc)
                .with_keys(verify_keys(&loaded, &[])?);
            let app = portcullis_auditor::http::router_with(handle, token.0).layer(
                axum::middleware::from_fn(portcullis_http::serve::json_errors),
            );
            portcullis_http::serve::serve_plain(listener, app, limits).await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The keys to check checkpoints with: `--pubkey` values (a key or a file holding one),
/// else the public half of this node's signing key, else none.
fn verify_keys(
    loaded: &portcullis_config::Loaded,
    given: &[String],
) -> anyhow::Result<Vec<portcullis_audit::checkpoint::PublicKey>> {
    if !given.is_empty() {
        return parse_keys(given);
    }
    match &loaded.config.audit.checkpoint_key_file {
        Some(f) => Ok(vec![portcullis_io::checkpoint_key(loaded, f)?.public()]),
        None => Ok(Vec::new()),
    }
}

/// `--pubkey` values: a key, or a file holding one.
fn parse_keys(given: &[String]) -> anyhow::Result<Vec<portcullis_audit::checkpoint::PublicKey>> {
    given
        .iter()
        .map(|g| {
            let text = if Path::new(g).is_file() {
                std::fs::read_to_string(g).with_context(|| format!("reading --pubkey {g}"))?
            } else {
                g.clone()
            };
            portcullis_audit::checkpoint::PublicKey::parse(&text)
                .with_context(|| format!("--pubkey {g}"))
        })
        .collect()
}

/// Checkpoints from `--checkpoints` files, else this node's own file (when present).
fn outside_checkpoints(
    loaded: &portcullis_config::Loaded,
    given: &[PathBuf],
) -> anyhow::Result<Vec<portcullis_auditor::Sourced>> {
    let own = loaded
        .config
        .audit
        .spool_dir
        .as_ref()
        .map(|d| d.join(portcullis_io::CHECKPOINTS_FILE))
        .filter(|p| p.is_file());
    let files: Vec<PathBuf> = if given.is_empty() {
        own.into_iter().collect()
    } else {
        given.to_vec()
    };
    let mut out = Vec::new();
    for f in files {
        let (cps, bad) = portcullis_audit::signer::read_checkpoints(&f)
            .with_context(|| format!("reading checkpoints {}", f.display()))?;
        if bad > 0 {
            eprintln!("warning: {}: {bad} lines are not checkpoints", f.display());
        }
        out.extend(
            cps.into_iter()
                .map(|checkpoint| portcullis_auditor::Sourced {
                    checkpoint,
                    source: f.display().to_string(),
                }),
        );
    }
    Ok(out)
}

/// The signed checkpoints every node copied into the cluster database.
async fn cluster_checkpoints(
    loaded: &portcullis_config::Loaded,
    cl: &portcullis_config::ClusterConfig,
) -> anyhow::Result<Vec<portcullis_auditor::Sourced>> {
    let password = match &cl.password_file {
        Some(f) => {
            Some(portcullis_config::read_secret(&loaded.path, "cluster.password_file", f)?.0)
        }
        None => None,
    };
    let client = portcullis_cluster::connect(&cl.database_url, password.as_deref()).await?;
    let mut out = Vec::new();
    for body in portcullis_cluster::checkpoints(&client).await? {
        match serde_json::from_value(body) {
            Ok(checkpoint) => out.push(portcullis_auditor::Sourced {
                checkpoint,
                source: "cluster".into(),
            }),
            Err(e) => {
                eprintln!("warning: a checkpoint in the cluster database does not parse: {e}")
            }
        }
    }
    Ok(out)
}

/// The node ids of the cluster's registry.
async fn registered_nodes(
    loaded: &portcullis_config::Loaded,
    cl: &portcullis_config::ClusterConfig,
) -> anyhow::Result<Vec<String>> {
    let password = match &cl.password_file {
        Some(f) => {
            Some(portcullis_config::read_secret(&loaded.path, "cluster.password_file", f)?.0)
        }
        None => None,
    };
    let client = portcullis_cluster::connect(&cl.database_url, password.as_deref()).await?;
    Ok(portcullis_cluster::status(&client)
        .await?
        .into_iter()
        .map(|n| n.node_id)
        .collect())
}
