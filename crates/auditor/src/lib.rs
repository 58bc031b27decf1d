//! The auditors' side of the trail: questions answered from ClickHouse, the hash chain
//! checked, the same over a read-only HTTP API.
//!
//! What it does: [`filter`] turns auditor filters (`--user`, `--group`, `--dst CIDR`,
//! `--port`, `--decision`, `--since/--until`, `--session`) and canned reports into SQL;
//! [`run_query`] returns a [`Table`] (columns in order, rows as JSON values);
//! [`verify`] recomputes every gateway's chain and reports gaps, edits, broken links and
//! conflicts, and checks signed checkpoints against the rows (streaming, constant memory);
//! [`export`] writes verifiable exports and [`evidence`] owns their format and checks one
//! offline; [`http`] serves queries, reports and verify to tools behind a bearer token.
//!
//! What it deliberately does not: write anything to ClickHouse (the gateway's
//! `portcullis-audit` crate owns the schema and the inserts).

pub mod evidence;
pub mod export;
pub mod filter;
pub mod http;
pub mod verify;

use chrono::{DateTime, Utc};
use portcullis_audit::{AuditRow, Store};
use serde::Serialize;

pub use filter::{Filter, FilterError, Report};
pub use verify::{Finding, Sourced, Verifier, VerifyReport};

#[derive(Debug, thiserror::Error)]
pub enum AuditorError {
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("clickhouse: {0}")]
    Store(#[from] clickhouse::error::Error),
    #[error("clickhouse answered something that is not JSONCompact: {0}")]
    Format(#[from] serde_json::Error),
    #[error(transparent)]
    Schema(#[from] portcullis_audit::StoreError),
}

/// A query result: column names in order, one JSON array per row.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<serde_json::Value>>,
}

impl Table {
    /// Plain-text rendering with aligned columns.
    pub fn render(&self) -> String {
        let cell = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| x.to_string())
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(cell).collect())
            .collect();
        let mut widths: Vec<usize> = self.columns.iter().map(|c| c.len()).collect();
        for r in &cells {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, vals: &mut dyn Iterator<Item = &str>| {
            let parts: Vec<String> = vals.zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
            out.push_str(parts.join("  ").trim_end());
            out.push('\n');
        };
        line(&mut out, &mut self.columns.iter().map(String::as_str));
        for r in &cells {
            line(&mut out, &mut r.iter().map(String::as_str));
        }
        out.push_str(&format!("({} rows)\n", self.rows.len()));
        out
    }
}

/// Runs a listing or a report.
pub async fn run_query(
    store: &Store,
    filter: &Filter,
    report: Option<Report>,
    now: DateTime<Utc>,
) -> Result<Table, AuditorError> {
    let sql = filter::sql(&store.database, filter, report, now)?;
    let mut table = select_table(store, &sql).await?;
    if report == Some(Report::Sessions) {
        let downs = select_table(
            store,
            &format!(
                "SELECT detail, toString(time) FROM {}.events FINAL WHERE kind = 'node_down'",
                store.database
            ),
        )
        .await?;
        end_sessions_of_dead_nodes(&mut table, &node_downs(&downs));
    }
    Ok(table)
}

/// (node, when its death was recorded) of each `node_down` event.
fn node_downs(t: &Table) -> Vec<(String, String)> {
    t.rows
        .iter()
        .filter_map(|r| {
            let detail: serde_json::Value = serde_json::from_str(r.first()?.as_str()?).ok()?;
            Some((
                detail.get("node")?.as_str()?.to_string(),
                r.get(1)?.as_str()?.to_string(),
            ))
        })
        .collect()
}

/// A session the trail never ended, on a node recorded dead after its last event,
/// ended with its node: `ended` becomes `node_down`.
fn end_sessions_of_dead_nodes(sessions: &mut Table, downs: &[(String, String)]) {
    let col = |name: &str| sessions.columns.iter().position(|c| c == name);
    let (Some(gw), Some(last), Some(ended)) = (col("gateway"), col("last_event"), col("ended"))
    else {
        return;
    };
    for row in &mut sessions.rows {
        let open = row.get(ended).and_then(|v| v.as_str()) == Some("");
        let (Some(g), Some(l)) = (
            row.get(gw).and_then(|v| v.as_str()),
            row.get(last).and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        // Both times are ClickHouse's `toString(DateTime)`: same format, ordered as text.
        if open && downs.iter().any(|(node, at)| node == g && at.as_str() >= l) {
            if let Some(cell) = row.get_mut(ended) {
                *cell = serde_json::Value::String("node_down".into());
            }
        }
    }
}

/// Runs any `SELECT` and returns it as a [`Table`].
pub async fn select_table(store: &Store, sql: &str) -> Result<Table, AuditorError> {
    #[derive(serde::Deserialize)]
    struct Meta {
        name: String,
    }
    #[derive(serde::Deserialize)]
    struct Compact {
        meta: Vec<Meta>,
        data: Vec<Vec<serde_json::Value>>,
    }
    let bytes = store
        .client()
        .query(sql)
        .fetch_bytes("JSONCompact")?
        .collect()
        .await?;
    let c: Compact = serde_json::from_slice(&bytes)?;
    Ok(Table {
        columns: c.meta.into_iter().map(|m| m.name).collect(),
        rows: c.data,
    })
}

/// What `verify_trail` reads and checks against.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    pub gateway: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Keys checkpoints are verified with (none: checkpoints are not checked).
    pub keys: Vec<portcullis_audit::checkpoint::PublicKey>,
    /// Checkpoints kept outside ClickHouse (files, the cluster database).
    pub outside: Vec<verify::Sourced>,
    /// Outside checkpoints younger than this are not used: their rows may still be on
    /// their way from a live node's spool.
    pub grace: std::time::Duration,
}

/// Reads the rows of every gateway (or one) in the window and verifies the chains and,
/// with keys, the signed checkpoints (the trail's own and the outside copies). Rows are
/// streamed: memory does not grow with the trail.
pub async fn verify_trail(
    store: &Store,
    opts: &VerifyOptions,
) -> Result<VerifyReport, AuditorError> {
    // Rows are read in the types this build knows (schema 4 hashes): an older schema is
    // named, with the remedy, instead of misread.
    store.check_schema().await?;
    let mut input = verify::CheckpointInput {
        keys: opts.keys.clone(),
        checkpoints: Vec::new(),
        whole_trail: opts.since.is_none() && opts.until.is_none(),
    };
    if !opts.keys.is_empty() {
        input.checkpoints = trail_checkpoints(store, opts.gateway.as_deref()).await?;
        let cutoff = (Utc::now().timestamp_micros().max(0) as u64)
            .saturating_sub(opts.grace.as_micros().min(u128::from(u64::MAX)) as u64);
        input.checkpoints.extend(
            opts.outside
                .iter()
                .filter(|s| {
                    let cp = &s.checkpoint.checkpoint;
                    cp.time_us <= cutoff && opts.gateway.as_ref().is_none_or(|g| *g == cp.node)
                })
                .cloned(),
        );
    }
    let sql = verify_sql(&store.database, opts);
    let mut cursor = store.client().query(&sql).fetch::<AuditRow>()?;
    let mut verifier = verify::Verifier::new(input);
    while let Some(row) = cursor.next().await? {
        verifier.push(row);
    }
    Ok(verifier.finish())
}

/// The rows `verify_trail` reads, in chain order. Without FINAL: a row edited into a
/// second version must show up as a conflict.
pub fn verify_sql(db: &str, opts: &VerifyOptions) -> String {
    let mut w = vec!["1".to_string()];
    if let Some(g) = &opts.gateway {
        w.push(format!("gateway = {}", filter::quote(g)));
    }
    if let Some(s) = opts.since {
        w.push(format!("time >= toDateTime({})", filter::db_seconds(s)));
    }
    if let Some(u) = opts.until {
        w.push(format!("time <= toDateTime({})", filter::db_seconds(u)));
    }
    format!(
        "SELECT {} FROM {db}.events WHERE {} ORDER BY gateway, seq",
        portcullis_audit::row::column_list(),
        w.join(" AND ")
    )
}

/// The trail's `audit_checkpoint` rows' details.
pub fn checkpoints_sql(db: &str, gateway: Option<&str>) -> String {
    let mut sql = format!("SELECT detail FROM {db}.events WHERE kind = 'audit_checkpoint'");
    if let Some(g) = gateway {
        sql.push_str(&format!(" AND gateway = {}", filter::quote(g)));
    }
    sql
}

/// The `audit_checkpoint` events in the trail, parsed (a row that does not parse is
/// left to the chain check: its hash still covers it).
pub async fn trail_checkpoints(
    store: &Store,
    gateway: Option<&str>,
) -> Result<Vec<verify::Sourced>, AuditorError> {
    let sql = checkpoints_sql(&store.database, gateway);
    let details: Vec<String> = store.client().query(&sql).fetch_all().await?;
    let mut out: Vec<verify::Sourced> = Vec::new();
    for d in details {
        if let Some(cp) = portcullis_audit::checkpoint::SignedCheckpoint::from_detail(&d) {
            // Retried uploads repeat rows: one of each.
            if !out.iter().any(|s| s.checkpoint == cp) {
                out.push(verify::Sourced {
                    checkpoint: cp,
                    source: "trail".into(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)]
    use super::*;
    use serde_json::json;

    #[test]
    fn open_sessions_of_a_dead_node_end_with_it_and_no_others() {
        let mut t = Table {
            columns: ["session_id", "gateway", "last_event", "ended"]
                .map(String::from)
                .to_vec(),
            rows: vec![
                // Open on gw-c before it died: ended by the death.
                vec![
                    json!(1),
                    json!("gw-c"),
                    json!("2026-12-02 10:00:00"),
                    json!(""),
                ],
                // Ended normally: kept.
                vec![
                    json!(2),
                    json!("gw-c"),
                    json!("2026-12-02 10:00:00"),
                    json!("client_timeout"),
                ],
                // Open on another node: kept open.
                vec![
                    json!(3),
                    json!("gw-a"),
                    json!("2026-12-02 10:00:00"),
                    json!(""),
                ],
                // Still active after the recorded death (a node cut off, not dead): open.
                vec![
                    json!(4),
                    json!("gw-c"),
                    json!("2026-12-02 10:05:00"),
                    json!(""),
                ],
            ],
        };
        let downs = node_downs(&Table {
            columns: vec!["detail".into(), "at".into()],
            rows: vec![
                vec![
                    json!(r#"{"node":"gw-c","sessions":1}"#),
                    json!("2026-12-02 10:00:12"),
                ],
                vec![json!("not json"), json!("2026-12-02 10:00:12")],
            ],
        });
        assert_eq!(
            downs,
            vec![("gw-c".to_string(), "2026-12-02 10:00:12".to_string())]
        );
        end_sessions_of_dead_nodes(&mut t, &downs);
        let ended: Vec<&str> = t
            .rows
            .iter()
            .map(|r| r[3].as_str().unwrap_or("?"))
            .collect();
        assert_eq!(ended, ["node_down", "client_timeout", "", ""]);
    }
}
