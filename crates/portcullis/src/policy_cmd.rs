//! `portcullis policy …`: validate, test, explain, bench. Usable without a gateway, in a
//! policy repository's CI.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use portcullis_model::Principal;
use portcullis_policy::synth::{Company, Shape};
use portcullis_policy::testing::{load_cases, parse_destination, run_case};
use portcullis_policy::{Engine, PolicyBundle};
use serde_json::json;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Parse and validate a policy directory; errors as file:line:col. Exit 1 on errors.
    Validate {
        #[arg(long, env = "PORTCULLIS_POLICY_DIR", default_value = "policies")]
        dir: PathBuf,
        /// A gateway config: warn about groups the policies name that no [[user]] has.
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run the cases in DIR/tests/*.toml; prints pass/fail per case. Exit 1 on any failure.
    Test {
        #[arg(long, env = "PORTCULLIS_POLICY_DIR", default_value = "policies")]
        dir: PathBuf,
    },
    /// Explain the decision for one user and destination.
    Explain {
        #[arg(long, env = "PORTCULLIS_POLICY_DIR", default_value = "policies")]
        dir: PathBuf,
        #[command(flatten)]
        asked: Asked,
        #[arg(long)]
        json: bool,
    },
    /// Generate a policy set and users, and print one JSON line with p50/p99 of the fast
    /// path (cold and warm cache) and of plain Cedar over the full set, same run.
    Bench {
        #[arg(long, default_value_t = 1000)]
        policies: usize,
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        #[arg(long, default_value_t = 200)]
        groups: usize,
        #[arg(long, default_value_t = 60)]
        networks: usize,
        /// Requests for the fast path (the plain path samples fewer: it is slow).
        #[arg(long, default_value_t = 50_000)]
        requests: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Temporary grants in force (approved access requests) across the users.
        #[arg(long, default_value_t = 0)]
        grants: usize,
    },
}

pub fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Validate { dir, config } => validate(&dir, config.as_deref()),
        PolicyCommand::Test { dir } => test(&dir),
        PolicyCommand::Explain { dir, asked, json } => explain(&dir, asked, json),
        PolicyCommand::Bench {
            policies,
            users,
            groups,
            networks,
            requests,
            seed,
            grants,
        } => bench(
            Shape {
                policies,
                users,
                groups,
                networks,
                seed,
            },
            requests,
            grants,
        ),
    }
}

fn load(dir: &Path) -> Result<PolicyBundle, ExitCode> {
    PolicyBundle::load(dir).map_err(|e| {
        eprintln!("{e}");
        eprintln!("{} error(s)", e.errors.len());
        ExitCode::FAILURE
    })
}

fn validate(dir: &Path, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let bundle = match load(dir) {
        Ok(b) => b,
        Err(code) => return Ok(code),
    };
    for w in &bundle.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(config) = config {
        // Only the users matter here: no need for the gateway's key.
        let text = std::fs::read_to_string(config)
            .with_context(|| format!("reading {}", config.display()))?;
        let loaded = portcullis_config::parse(config, &text)?;
        let unknown = crate::gateway::unknown_sites(&loaded.config, &bundle);
        if !unknown.is_empty() {
            for e in &unknown {
                eprintln!("{e}");
            }
            eprintln!("{} error(s)", unknown.len());
            return Ok(ExitCode::FAILURE);
        }
        for g in bundle.unknown_groups(
            loaded
                .config
                .users
                .iter()
                .flat_map(|u| u.groups.iter().map(String::as_str)),
        ) {
            eprintln!(
                "warning: policies name Group::{g:?}, which no user in {} has (a typo, or a group only an identity source provides?)",
                config.display()
            );
        }
    }
    println!(
        "{}: {} policies, {} networks: ok",
        dir.display(),
        bundle.policies().len(),
        bundle.networks().len()
    );
    Ok(ExitCode::SUCCESS)
}

fn test(dir: &Path) -> anyhow::Result<ExitCode> {
    let bundle = match load(dir) {
        Ok(b) => Arc::new(b),
        Err(code) => return Ok(code),
    };
    let cases = match load_cases(dir) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let now = Utc::now();
    let mut failed = 0;
    for case in &cases {
        let o = run_case(&bundle, case, now);
        match &o.failure {
            None => println!("pass  {}", case.name),
            Some(why) => {
                failed += 1;
                println!(
                    "FAIL  {}  ({}:{})\n      {why}",
                    case.name,
                    case.file.display(),
                    case.line
                );
            }
        }
    }
    println!("{} passed, {} failed", cases.len() - failed, failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What `policy explain` is asked.
#[derive(Debug, clap::Args)]
pub struct Asked {
    #[arg(long)]
    user: String,
    /// Comma-separated groups.
    #[arg(long, value_delimiter = ',', default_value = "")]
    groups: Vec<String>,
    /// Comma-separated tags.
    #[arg(long, value_delimiter = ',', default_value = "")]
    tags: Vec<String>,
    /// Destination: ip:port/proto, [v6]:port/proto or ip/proto.
    #[arg(long)]
    dst: String,
    /// Time of the request (RFC 3339); default now.
    #[arg(long)]
    at: Option<DateTime<Utc>>,
    /// The device's sign-on used a second factor.
    #[arg(long)]
    mfa: bool,
    /// Seconds since that sign-on; absent: never signed on (a static peer).
    #[arg(long)]
    auth_age: Option<u32>,
    /// The running gateway's configuration: the user's temporary grants (approved
    /// access requests) are read from its admin API and take part in the decision.
    #[arg(long, env = "PORTCULLIS_CONFIG")]
    config: Option<PathBuf>,
}

/// `user`'s approved access requests on the running gateway (its admin API).
fn approved_requests(
    config: &Path,
    user: &str,
) -> anyhow::Result<Vec<portcullis_access::AccessRequest>> {
    let path = format!(
        "/admin/v1/access-requests?user={}&state=approved",
        crate::admin_cmd::encode(user)
    );
    let v = crate::admin_cmd::call_with(config, "GET", &path, None)?;
    let list = v.get("requests").cloned().unwrap_or_default();
    serde_json::from_value(list).context("reading the gateway's access requests")
}

// serde_json's `value["key"]` answers null for a missing key; it never panics.
#[allow(clippy::indexing_slicing)]
fn explain(dir: &Path, asked: Asked, json: bool) -> anyhow::Result<ExitCode> {
    let Asked {
        user,
        groups,
        tags,
        dst,
        at,
        mfa,
        auth_age,
        config,
    } = asked;
    let bundle = match load(dir) {
        Ok(b) => Arc::new(b),
        Err(code) => return Ok(code),
    };
    let dst = parse_destination(&dst).map_err(anyhow::Error::msg)?;
    let principal = Principal {
        email: format!("{user}@example.com"),
        name: user.clone(),
        groups: groups.into_iter().filter(|g| !g.is_empty()).collect(),
        tags: tags.into_iter().filter(|t| !t.is_empty()).collect(),
    };
    let granted = match &config {
        Some(config) => approved_requests(config, &user)?,
        None => Vec::new(),
    };
    let question = portcullis_policy::explain::Question {
        principal: principal.clone(),
        dst,
        at: at.unwrap_or_else(Utc::now),
        mfa,
        auth_age,
        grants: granted
            .iter()
            .filter_map(portcullis_access::AccessRequest::grant)
            .collect(),
    };
    let answer = portcullis_policy::explain::explain(bundle.clone(), &question, &|id| {
        granted.iter().find(|r| r.id == id).map(|r| {
            json!({
                "id": id, "effect": "permit", "temporary_grant": true,
                "approved_by": r.decided_by, "ends_at": r.ends_at, "reason": r.reason,
            })
        })
    })
    .context("building the request entities")?;
    if json {
        println!("{answer}");
        return Ok(ExitCode::SUCCESS);
    }
    let at = question.at;
    let allowed = answer["decision"] == "allow";
    let reason = answer["reason"].as_str().unwrap_or_default();
    let policies = answer["policies"].as_array().cloned().unwrap_or_default();
    let depends_on: Vec<&str> = answer["depends_on"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let ancestors: Vec<&str> = answer["ancestors"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let network = answer["network"].as_str().unwrap_or_default();
    let errors: Vec<&str> = answer["errors"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let dst_text = portcullis_policy::explain::destination_text(&dst);
    let sign_on = match auth_age {
        Some(a) => format!(
            "signed on {a} s ago, {} second factor",
            if mfa { "with a" } else { "without a" }
        ),
        None => "never signed on (a static peer)".to_string(),
    };
    println!(
        "{}  {} → {} at {}",
        if allowed { "ALLOW" } else { "DENY" },
        principal.name,
        dst_text,
        at.to_rfc3339()
    );
    println!(
        "  user:     groups [{}], tags [{}]",
        principal.groups.join(", "),
        principal.tags.join(", ")
    );
    let inside = if ancestors.is_empty() {
        String::new()
    } else {
        format!(" (inside {})", ancestors.join(" ⊂ "))
    };
    println!("  network:  {network}{inside}");
    println!("  sign-on:  {sign_on}");
    if !depends_on.is_empty() {
        let what: Vec<&str> = depends_on
            .iter()
            .map(|d| match *d {
                "mfa" => "the second factor",
                "temporary_grant" => "a temporary grant",
                _ => "the sign-on's age",
            })
            .collect();
        println!(
            "  depends:  on {} (changing it changes the answer)",
            what.join(" and ")
        );
    }
    match reason {
        "no permit matched" => println!("  reason:   no permit matched (default deny)"),
        r => {
            println!("  reason:   {r} by");
            for p in &policies {
                if p["temporary_grant"] == true {
                    println!(
                        "              {:<28} grant   approved by {}, until {} ({})",
                        p["id"].as_str().unwrap_or(""),
                        p["approved_by"].as_str().unwrap_or(""),
                        p["ends_at"].as_str().unwrap_or(""),
                        p["reason"].as_str().unwrap_or("")
                    );
                    continue;
                }
                println!(
                    "              {:<28} {:<7} {}:{}",
                    p["id"].as_str().unwrap_or(""),
                    p["effect"].as_str().unwrap_or(""),
                    p["file"].as_str().unwrap_or(""),
                    p["line"]
                );
            }
        }
    }
    for e in &errors {
        println!("  error:    {e} (the policy was skipped, as Cedar does)");
    }
    Ok(ExitCode::SUCCESS)
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(idx).copied().unwrap_or(0)
}

fn bench(shape: Shape, requests: usize, grants: usize) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut company = Company::generate(shape);
    let bundle = Arc::new(std::mem::replace(
        &mut company.bundle,
        Company::generate(Shape {
            policies: 1,
            users: 1,
            ..shape
        })
        .bundle,
    ));
    let mut engine = Engine::new(bundle.clone(), company.users.clone())?;
    // Grants in force all year (the requests fall in 2026): every one is live.
    let year = |y| {
        chrono::TimeZone::with_ymd_and_hms(&Utc, y, 1, 1, 0, 0, 0)
            .single()
            .map(|t| t.timestamp_millis())
            .unwrap_or_default()
    };
    let live: Vec<_> = company
        .grants(grants)
        .into_iter()
        .map(|g| portcullis_model::Grant {
            start_ms: year(2026),
            end_ms: year(2027),
            ..g
        })
        .collect();
    engine.set_grants(portcullis_policy::grants::Grants::new(live));
    let reqs: Vec<_> = (0..requests).map(|_| company.request()).collect();
    let setup_ms = started.elapsed().as_millis();

    let mut cold = Vec::with_capacity(requests);
    let mut granted_users = Vec::new();
    for (u, r, t) in &reqs {
        let s = Instant::now();
        std::hint::black_box(engine.decide(u, r, *t));
        let ns = s.elapsed().as_nanos() as u64;
        cold.push(ns);
        if !engine.grants().of(u).is_empty() {
            granted_users.push(ns);
        }
    }
    let allowed_by_grant = reqs
        .iter()
        .filter(|(u, r, t)| {
            engine
                .decide(u, r, *t)
                .policy_ids
                .iter()
                .any(|id| id.starts_with("grant-"))
        })
        .count();
    let misses = engine.stats.evaluations + engine.stats.empty_slices;
    let hits_before = engine.stats.cache_hits;
    let mut warm = Vec::with_capacity(requests);
    for (u, r, t) in &reqs {
        let s = Instant::now();
        std::hint::black_box(engine.decide(u, r, *t));
        warm.push(s.elapsed().as_nanos() as u64);
    }
    let warm_hits = engine.stats.cache_hits - hits_before;
    let plain_n = requests.min(if shape.policies >= 1000 { 1500 } else { 5000 });
    let mut plain = Vec::with_capacity(plain_n);
    for (u, r, t) in reqs.iter().take(plain_n) {
        let s = Instant::now();
        std::hint::black_box(engine.decide_plain(u, r, *t));
        plain.push(s.elapsed().as_nanos() as u64);
    }
    for v in [&mut cold, &mut warm, &mut plain, &mut granted_users] {
        v.sort_unstable();
    }
    let (cold50, plain50) = (percentile(&cold, 0.5), percentile(&plain, 0.5));
    println!(
        "{}",
        json!({
            "policies": shape.policies, "users": shape.users, "groups": shape.groups, "networks": shape.networks,
            "requests": requests, "plain_requests": plain_n, "setup_ms": setup_ms,
            "fast_cold_p50_ns": cold50, "fast_cold_p99_ns": percentile(&cold, 0.99),
            "fast_warm_p50_ns": percentile(&warm, 0.5), "fast_warm_p99_ns": percentile(&warm, 0.99),
            "plain_p50_ns": plain50, "plain_p99_ns": percentile(&plain, 0.99),
            "speedup_cold_p50": plain50 as f64 / cold50.max(1) as f64,
            "cold_cache_misses": misses, "warm_cache_hit_ratio": warm_hits as f64 / requests.max(1) as f64,
            "slice_builds": engine.stats.slice_builds,
            "grants": grants, "requests_of_granted_users": granted_users.len(),
            "granted_users_p50_ns": percentile(&granted_users, 0.5),
            "granted_users_p99_ns": percentile(&granted_users, 0.99),
            "allowed_by_a_grant": allowed_by_grant,
        })
    );
    Ok(ExitCode::SUCCESS)
}
