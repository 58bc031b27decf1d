//! `portcullis access …`: just-in-time access requests on the running gateway, through
//! its admin API (`/admin/v1/access-requests`, token from `[admin] token_file`).

// Indexing a serde_json Value by key yields Null for a missing key; it never panics.
#![allow(clippy::indexing_slicing)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{json, Value};

use crate::admin_cmd::{call_with, encode};

#[derive(Subcommand)]
pub enum AccessCommand {
    /// Asks for temporary access for a user: pending until someone the `approve_access`
    /// policies allow approves it.
    Request {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// The user the grant would be for.
        #[arg(long)]
        user: String,
        /// A network declared in networks.toml (its sub-networks included).
        #[arg(long)]
        network: String,
        /// Narrows the grant to an address or CIDR inside the network.
        #[arg(long)]
        dst: Option<String>,
        /// Narrows the grant to one port: 5432/tcp.
        #[arg(long)]
        port: Option<String>,
        /// How long the grant lasts once approved: 2h, 90m, 1h30m (10 s to 30 days).
        #[arg(long = "for")]
        duration: String,
        #[arg(long)]
        reason: String,
    },
    /// Access requests, newest first.
    List {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// Only this requester's.
        #[arg(long)]
        user: Option<String>,
        /// Only in this state: requested, approved, denied, expired, revoked.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One request, in full (JSON).
    Show {
        id: String,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Approves a request as the user NAME (who must be allowed by the policies and
    /// must not be the requester); the grant is live when this returns.
    Approve {
        id: String,
        #[arg(long = "as")]
        approver: String,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Denies a request as the user NAME.
    Deny {
        id: String,
        #[arg(long = "as")]
        approver: String,
        #[arg(long)]
        reason: String,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Ends a grant now (its connections are cut before this returns) or withdraws a
    /// pending request.
    Revoke {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
}

fn summary(r: &Value) -> String {
    let mut what = r["network"].as_str().unwrap_or_default().to_string();
    if let Some(d) = r["dst"].as_str() {
        what.push_str(&format!(" {d}"));
    }
    if let Some(p) = r["port"].as_str() {
        what.push_str(&format!(" {p}"));
    }
    let window = match (r["starts_at"].as_str(), r["ends_at"].as_str()) {
        (Some(s), Some(e)) => format!("{s} → {e}"),
        _ => format!("for {} s", r["duration_secs"]),
    };
    format!(
        "{:<16} {:<9} {:<10} {:<28} {:<46} {}",
        r["id"].as_str().unwrap_or_default(),
        r["state"].as_str().unwrap_or_default(),
        r["user"].as_str().unwrap_or_default(),
        what,
        window,
        r["decided_by"].as_str().unwrap_or_default(),
    )
}

pub fn run(cmd: AccessCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AccessCommand::Request {
            config,
            user,
            network,
            dst,
            port,
            duration,
            reason,
        } => {
            let r = call_with(
                &config,
                "POST",
                "/admin/v1/access-requests",
                Some(&json!({
                    "user": user, "network": network, "dst": dst, "port": port,
                    "duration": duration, "reason": reason,
                })),
            )?;
            println!(
                "access request {} filed: {} for {} ({} s), pending approval",
                r["id"].as_str().unwrap_or_default(),
                r["user"].as_str().unwrap_or_default(),
                r["network"].as_str().unwrap_or_default(),
                r["duration_secs"]
            );
        }
        AccessCommand::List {
            config,
            user,
            state,
            json,
        } => {
            let mut query = Vec::new();
            if let Some(u) = user {
                query.push(format!("user={}", encode(&u)));
            }
            if let Some(s) = state {
                query.push(format!("state={}", encode(&s)));
            }
            let path = if query.is_empty() {
                "/admin/v1/access-requests".to_string()
            } else {
                format!("/admin/v1/access-requests?{}", query.join("&"))
            };
            let v = call_with(&config, "GET", &path, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v["requests"])?);
            } else {
                println!(
                    "{:<16} {:<9} {:<10} {:<28} {:<46} decided by",
                    "id", "state", "user", "network", "window"
                );
                for r in v["requests"].as_array().into_iter().flatten() {
                    println!("{}", summary(r));
                }
            }
        }
        AccessCommand::Show { id, config } => {
            let path = format!("/admin/v1/access-requests/{}", encode(&id));
            let v = call_with(&config, "GET", &path, None)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        AccessCommand::Approve {
            id,
            approver,
            config,
        } => {
            let path = format!("/admin/v1/access-requests/{}/approve", encode(&id));
            let r = call_with(&config, "POST", &path, Some(&json!({ "as": approver })))?;
            println!(
                "access request {id} approved by {approver} ({}): {} may reach {} until {}",
                r["approval_policies"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default(),
                r["user"].as_str().unwrap_or_default(),
                r["network"].as_str().unwrap_or_default(),
                r["ends_at"].as_str().unwrap_or_default()
            );
        }
        AccessCommand::Deny {
            id,
            approver,
            reason,
            config,
        } => {
            let path = format!("/admin/v1/access-requests/{}/deny", encode(&id));
            call_with(
                &config,
                "POST",
                &path,
                Some(&json!({ "as": approver, "reason": reason })),
            )?;
            println!("access request {id} denied by {approver}");
        }
        AccessCommand::Revoke { id, reason, config } => {
            let path = format!("/admin/v1/access-requests/{}/revoke", encode(&id));
            call_with(&config, "POST", &path, Some(&json!({ "reason": reason })))?;
            println!("access request {id} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}
