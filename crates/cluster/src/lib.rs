//! The cluster's shared state in PostgreSQL (`[cluster]`): N equal gateway nodes, no
//! master, all messaging through the database.
//!
//! What it does:
//! - [`migrate`]: creates or upgrades the schema ([`schema`], which owns the format), one
//!   version at a time in a transaction each, under an advisory lock so that nodes started
//!   together do not race;
//! - [`ClusterStore`] ([`store`]): the identity directory and the devices, written under
//!   one cluster-wide writers' lock together with a numbered entry of the change log and
//!   a notification; [`snapshot`] reads the whole directory at start;
//! - [`node`]: a running node's listener (LISTEN, then catch-up from its last applied
//!   change after every notification or reconnection) and its heartbeat;
//! - [`Registry`]: the node registry: each node's row, a heartbeat every second with its
//!   sessions, flows and last applied change number, marked stopped on a clean exit;
//!   [`status`] lists the nodes, down when their heartbeat is older than [`DOWN_AFTER`];
//! - [`import`]: a single node's SQLite directory into an empty cluster, ids kept;
//! - [`lease`]: once-per-cluster work; [`repair`]: what a dead node left (its sessions
//!   ended in the trail); [`sync_state`]: the LDAP consumer's mirror, saved so a
//!   takeover resumes; [`shared`]: one-time values and login sessions; [`policy`]: the
//!   cluster's policy set.
//!
//! Why LISTEN/NOTIFY and not logical decoding: a notification is sent at commit, in
//! commit order, to every listening session, with no replication slot to manage (a slot
//! left by a dead node makes PostgreSQL keep WAL forever); what a notification can lose
//! (a node not connected at the time) the change log's numbers make up, since a node
//! always reads "everything after my last", never "the change in the message".
//!
//! What it deliberately does not: no connection pooling (a connection per task: the
//! store's, the listener's, the heartbeat's); the data plane never touches it.

mod import;
pub mod lease;
pub mod node;
pub mod policy;
pub mod repair;
pub mod schema;
pub mod shared;
pub mod store;
pub mod sync_state;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{Client, NoTls};

pub use import::{import, Imported};
pub use schema::{migrate, SCHEMA_VERSION};
pub use store::{snapshot, ClusterStore, Snapshot, Target};

/// A node whose last heartbeat is older than this is down.
pub const DOWN_AFTER: Duration = Duration::from_secs(5);

/// Errors of the cluster store; they name what was being done, never a password.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("postgresql: {what}: {detail}")]
    Postgres {
        what: &'static str,
        /// The server's message and SQLSTATE, or the client's error.
        detail: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the cluster schema is version {found}, newer than this gateway's {SCHEMA_VERSION}: upgrade the gateway first")]
    TooNew { found: i32 },
    #[error("the cluster schema is version {found}; run `portcullis cluster migrate` (this gateway needs {SCHEMA_VERSION})")]
    TooOld { found: i32 },
    #[error("database_url: {0}")]
    Url(String),
    #[error("the cluster already holds {records} users, groups or devices: import only into an empty cluster")]
    NotEmpty { records: i64 },
    #[error("a record could not be encoded: {0}")]
    Record(String),
    #[error("postgresql did not answer within {0:?}")]
    Timeout(Duration),
}

pub(crate) fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ClusterError {
    move |source| ClusterError::Postgres {
        what,
        detail: match source.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => source.to_string(),
        },
        source,
    }
}

/// Writes `key` of `meta` (a sync source's state, a value shared by the nodes).
pub(crate) async fn write_meta(
    client: &Client,
    key: &str,
    value: &str,
) -> Result<(), ClusterError> {
    client
        .execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&key, &value],
        )
        .await
        .map_err(pg("writing a shared value"))?;
    Ok(())
}

/// Connects to `url` (the password, if any, from `password`); the connection runs on a
/// task of its own until the client is dropped.
pub async fn connect(url: &str, password: Option<&str>) -> Result<Client, ClusterError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| ClusterError::Url(e.to_string()))?;
    if let Some(p) = password {
        config.password(p);
    }
    config.application_name("portcullis");
    dead_peer_limits(&mut config);
    let (client, connection) = config.connect(NoTls).await.map_err(pg("connecting"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("postgresql connection closed: {e}");
        }
    });
    Ok(client)
}

/// How long a connection may hang on a database that vanished from the network (no
/// RST: a cable, a partition) before it counts as lost and is opened again. Without
/// these a request waits out TCP's retransmission backoff (tens of seconds).
pub(crate) fn dead_peer_limits(config: &mut tokio_postgres::Config) {
    config.connect_timeout(Duration::from_secs(5));
    config.tcp_user_timeout(Duration::from_secs(5));
    config.keepalives_idle(Duration::from_secs(5));
    config.keepalives_interval(Duration::from_secs(1));
    config.keepalives_retries(3);
}

/// A node as `portcullis cluster status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeRow {
    pub node_id: String,
    pub address: String,
    pub version: String,
    pub started: DateTime<Utc>,
    pub heartbeat: DateTime<Utc>,
    pub sessions: i64,
    pub flows: i64,
    pub applied_change: i64,
    /// Changes in the log this node has not applied.
    pub lag: i64,
    /// `up`, `down` (no heartbeat for [`DOWN_AFTER`]) or `stopped` (a clean exit).
    pub state: String,
}

/// What a heartbeat reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Beat {
    pub sessions: u64,
    pub flows: u64,
    pub applied_change: i64,
}

/// This node's row in the registry.
#[derive(Debug)]
pub struct Registry {
    node_id: String,
}

impl Registry {
    /// Registers `node_id`, reachable at `address`. A `fresh` run (the process's first
    /// join; not a reconnection) restarts the row and returns this node's previous run
    /// when it ended without a clean exit and was not repaired yet (the caller records
    /// it: [`repair`]).
    pub async fn join(
        client: &mut Client,
        node_id: &str,
        address: &str,
        version: &str,
        fresh: bool,
    ) -> Result<(Registry, Option<repair::DeadNode>), ClusterError> {
        schema::require_current(client).await?;
        let tx = client
            .transaction()
            .await
            .map_err(pg("registering the node"))?;
        let previous = if fresh {
            repair::claim_previous_run(&tx, node_id).await?
        } else {
            None
        };
        tx.execute(
            "INSERT INTO nodes (node_id, address, version, started, heartbeat, stopped)
             VALUES ($1, $2, $3, now(), now(), NULL)
             ON CONFLICT (node_id) DO UPDATE SET address = $2, version = $3,
               started = CASE WHEN $4 THEN now() ELSE nodes.started END,
               heartbeat = now(), stopped = NULL",
            &[&node_id, &address, &version, &fresh],
        )
        .await
        .map_err(pg("registering the node"))?;
        tx.commit().await.map_err(pg("registering the node"))?;
        Ok((
            Registry {
                node_id: node_id.to_string(),
            },
            previous,
        ))
    }

    /// Records that the node is alive, with its numbers.
    pub async fn beat(&self, client: &Client, beat: Beat) -> Result<(), ClusterError> {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        client
            .execute(
                // Not once stopped: a beat racing the clean exit must not undo it.
                "UPDATE nodes SET heartbeat = now(), sessions = $2, flows = $3,
                   applied_change = $4 WHERE node_id = $1 AND stopped IS NULL",
                &[
                    &self.node_id,
                    &clamp(beat.sessions),
                    &clamp(beat.flows),
                    &beat.applied_change,
                ],
            )
            .await
            .map_err(pg("heartbeat"))?;
        Ok(())
    }

    /// A clean exit: the node shows as stopped, not down.
    pub async fn leave(&self, client: &Client) -> Result<(), ClusterError> {
        client
            .execute(
                "UPDATE nodes SET stopped = now(), sessions = 0, flows = 0 WHERE node_id = $1",
                &[&self.node_id],
            )
            .await
            .map_err(pg("leaving the cluster"))?;
        Ok(())
    }
}

/// `records` of this kind hold each node's signed audit checkpoints (the
/// `portcullis-audit` `SignedCheckpoint` JSON, id `<node>/<seq>`): the cluster's copy
/// outside ClickHouse. Written without a `changes` row: no node applies them.
pub const CHECKPOINT_KIND: &str = "audit-checkpoint";

/// Keeps one signed checkpoint (a repeat of the same one changes nothing).
pub async fn put_checkpoint(
    client: &Client,
    node: &str,
    seq: u64,
    body: &serde_json::Value,
) -> Result<(), ClusterError> {
    client
        .execute(
            "INSERT INTO records (kind, id, body) VALUES ($1, $2, $3) ON CONFLICT (kind, id) DO NOTHING",
            &[
                &CHECKPOINT_KIND,
                &format!("{node}/{seq}"),
                &tokio_postgres::types::Json(body),
            ],
        )
        .await
        .map_err(pg("writing an audit checkpoint"))?;
    Ok(())
}

/// Every node's signed checkpoints, as stored.
pub async fn checkpoints(client: &Client) -> Result<Vec<serde_json::Value>, ClusterError> {
    schema::require_current(client).await?;
    let rows = client
        .query(
            "SELECT body FROM records WHERE kind = $1 ORDER BY id",
            &[&CHECKPOINT_KIND],
        )
        .await
        .map_err(pg("reading the audit checkpoints"))?;
    rows.iter()
        .map(|r| {
            r.try_get::<_, tokio_postgres::types::Json<serde_json::Value>>(0)
                .map(|j| j.0)
                .map_err(pg("reading the audit checkpoints"))
        })
        .collect()
}

/// Every node, by id, with its state as of the database's clock.
pub async fn status(client: &Client) -> Result<Vec<NodeRow>, ClusterError> {
    schema::require_current(client).await?;
    let down_after = i64::try_from(DOWN_AFTER.as_millis()).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT node_id, address, version, started, heartbeat, sessions, flows,
                    applied_change,
                    GREATEST(0, (SELECT COALESCE(max(number), 0) FROM changes) - applied_change),
                    CASE WHEN stopped IS NOT NULL THEN 'stopped'
                         WHEN now() - heartbeat > $1 * interval '1 millisecond' THEN 'down'
                         ELSE 'up' END
             FROM nodes ORDER BY node_id",
            &[&(down_after as f64)],
        )
        .await
        .map_err(pg("reading the nodes"))?;
    rows.iter()
        .map(|r| {
            Ok(NodeRow {
                node_id: r.try_get(0).map_err(pg("a node row"))?,
                address: r.try_get(1).map_err(pg("a node row"))?,
                version: r.try_get(2).map_err(pg("a node row"))?,
                started: r.try_get(3).map_err(pg("a node row"))?,
                heartbeat: r.try_get(4).map_err(pg("a node row"))?,
                sessions: r.try_get(5).map_err(pg("a node row"))?,
                flows: r.try_get(6).map_err(pg("a node row"))?,
                applied_change: r.try_get(7).map_err(pg("a node row"))?,
                lag: r.try_get(8).map_err(pg("a node row"))?,
                state: r.try_get(9).map_err(pg("a node row"))?,
            })
        })
        .collect()
}

/// A lease on once-per-cluster work.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LeaseRow {
    pub name: String,
    pub holder: String,
    pub expires: DateTime<Utc>,
    /// Whether it is still held (not expired) by the database's clock.
    pub held: bool,
}

/// What `portcullis cluster status` and `GET /cluster` show.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Overview {
    pub nodes: Vec<NodeRow>,
    pub leases: Vec<LeaseRow>,
    /// The newest change number in the log.
    pub last_change: i64,
}

/// The nodes, the leases and the newest change.
pub async fn overview(client: &Client) -> Result<Overview, ClusterError> {
    let nodes = status(client).await?;
    let rows = client
        .query(
            "SELECT name, holder, expires, expires > now() FROM leases ORDER BY name",
            &[],
        )
        .await
        .map_err(pg("reading the leases"))?;
    let leases = rows
        .iter()
        .map(|r| {
            Ok(LeaseRow {
                name: r.try_get(0).map_err(pg("a lease row"))?,
                holder: r.try_get(1).map_err(pg("a lease row"))?,
                expires: r.try_get(2).map_err(pg("a lease row"))?,
                held: r.try_get(3).map_err(pg("a lease row"))?,
            })
        })
        .collect::<Result<Vec<_>, ClusterError>>()?;
    let last_change: i64 = client
        .query_one("SELECT COALESCE(max(number), 0) FROM changes", &[])
        .await
        .map_err(pg("reading the change log"))?
        .try_get(0)
        .map_err(pg("reading the change log"))?;
    Ok(Overview {
        nodes,
        leases,
        last_change,
    })
}
