//! The cluster's policy set: one row of `policy_set` (the admin API's policy files as
//! JSON, with their version digest). A replacement is written under the writers' lock
//! with a change of kind [`KIND`] whose body is `{"version", "files"}`, so every node
//! applies it in log order, like a directory change.
//!
//! This module stores and announces; it does not parse or validate policies (the admin
//! API does, before it writes, and each node again before it applies).

use tokio_postgres::types::Json;
use tokio_postgres::{Client, GenericClient};

use crate::store::{CHANNEL, WRITER_LOCK};
use crate::{pg, ClusterError};

/// The change kind of a policy replacement.
pub const KIND: &str = "policy";

/// The body of a policy change, as JSON: `{"version": .., "files": ..}`.
pub fn body(version: &str, files: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({"version": version, "files": files})
}

/// The cluster's policy set as a change body, if one was ever stored.
pub async fn current(c: &impl GenericClient) -> Result<Option<serde_json::Value>, ClusterError> {
    let row = c
        .query_opt("SELECT version, files FROM policy_set WHERE id = 1", &[])
        .await
        .map_err(pg("reading the policy set"))?;
    row.map(|r| {
        let version: String = r.try_get(0).map_err(pg("reading the policy set"))?;
        let Json(files): Json<serde_json::Value> =
            r.try_get(1).map_err(pg("reading the policy set"))?;
        Ok(body(&version, &files))
    })
    .transpose()
}

/// At a node's start: stores `files` as the cluster's set unless there is one, and
/// returns the set that holds (the first node to start seeds the cluster; the others
/// adopt its set).
pub async fn seed(
    client: &Client,
    node_id: &str,
    version: &str,
    files: &serde_json::Value,
) -> Result<serde_json::Value, ClusterError> {
    client
        .execute(
            "INSERT INTO policy_set (id, version, files, node_id) VALUES (1, $1, $2, $3)
             ON CONFLICT (id) DO NOTHING",
            &[&version, &Json(files), &node_id],
        )
        .await
        .map_err(pg("seeding the policy set"))?;
    current(client)
        .await?
        .ok_or(ClusterError::Record("the policy set vanished".into()))
}

/// Why a replacement was not stored.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// `If-Match` named another version: the cluster's is this one.
    Changed { current: String },
}

/// Replaces the cluster's set (if its version is `expected`, when given); returns the
/// change number.
pub async fn replace(
    client: &mut Client,
    node_id: &str,
    expected: Option<&(dyn Fn(&str) -> bool + Sync)>,
    version: &str,
    files: &serde_json::Value,
) -> Result<Result<i64, Refused>, ClusterError> {
    let tx = client
        .transaction()
        .await
        .map_err(pg("starting a policy replacement"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITER_LOCK])
        .await
        .map_err(pg("taking the writers' lock"))?;
    let current: Option<String> = tx
        .query_opt("SELECT version FROM policy_set WHERE id = 1", &[])
        .await
        .map_err(pg("reading the policy set"))?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(pg("reading the policy set"))?;
    if let (Some(matches), Some(current)) = (expected, &current) {
        if !matches(current) {
            return Ok(Err(Refused::Changed {
                current: current.clone(),
            }));
        }
    }
    tx.execute(
        "INSERT INTO policy_set (id, version, files, node_id, updated) VALUES (1, $1, $2, $3, now())
         ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, files = EXCLUDED.files,
           node_id = EXCLUDED.node_id, updated = now()",
        &[&version, &Json(files), &node_id],
    )
    .await
    .map_err(pg("writing the policy set"))?;
    let number: i64 = tx
        .query_one(
            "INSERT INTO changes (node_id, kind, body) VALUES ($1, $2, $3) RETURNING number",
            &[&node_id, &KIND, &Json(body(version, files))],
        )
        .await
        .map_err(pg("recording the policy change"))?
        .try_get(0)
        .map_err(pg("recording the policy change"))?;
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &number.to_string()])
        .await
        .map_err(pg("announcing the policy change"))?;
    tx.commit()
        .await
        .map_err(pg("committing the policy change"))?;
    Ok(Ok(number))
}
