//! What a dead node leaves behind. A node that stops cleanly ends its sessions in its
//! own audit trail and marks itself stopped; one that dies (`kill -9`, a lost host)
//! leaves sessions that never end in the trail. Whichever node holds the
//! [`crate::lease::NODE_REPAIR`] lease claims such a node ([`claim_dead`]) once its
//! heartbeat is older than [`DEAD_AFTER`], and records one `node_down` event for it; a
//! node restarted before anyone noticed claims its own previous run at
//! [`crate::Registry::join`]. The claim (`nodes.repaired`) makes it happen once per
//! death. Pool addresses need no repair: they belong to devices in the shared directory,
//! allocated in a transaction, never to a node.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use crate::{pg, ClusterError};

/// A node is repaired once its heartbeat is this old (well past [`crate::DOWN_AFTER`]:
/// a node stalled for a few seconds is down, not dead).
pub const DEAD_AFTER: Duration = Duration::from_secs(10);

/// A node's run that ended without a clean exit, as the registry last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadNode {
    pub node_id: String,
    pub started: DateTime<Utc>,
    pub last_heartbeat: DateTime<Utc>,
    /// Sessions and flows it reported at its last heartbeat.
    pub sessions: i64,
    pub flows: i64,
    /// `no_heartbeat` (found by another node) or `restarted` (found by itself).
    pub reason: &'static str,
}

fn dead(r: &tokio_postgres::Row, reason: &'static str) -> Result<DeadNode, ClusterError> {
    Ok(DeadNode {
        node_id: r.try_get(0).map_err(pg("a node row"))?,
        started: r.try_get(1).map_err(pg("a node row"))?,
        last_heartbeat: r.try_get(2).map_err(pg("a node row"))?,
        sessions: r.try_get(3).map_err(pg("a node row"))?,
        flows: r.try_get(4).map_err(pg("a node row"))?,
        reason,
    })
}

/// Claims every node dead for [`DEAD_AFTER`] and not yet repaired (at most once each).
pub async fn claim_dead(client: &Client) -> Result<Vec<DeadNode>, ClusterError> {
    let after = i64::try_from(DEAD_AFTER.as_millis()).unwrap_or(i64::MAX) as f64;
    let rows = client
        .query(
            "UPDATE nodes SET repaired = now()
             WHERE stopped IS NULL AND now() - heartbeat > $1 * interval '1 millisecond'
               AND (repaired IS NULL OR repaired < started)
             RETURNING node_id, started, heartbeat, sessions, flows",
            &[&after],
        )
        .await
        .map_err(pg("claiming dead nodes"))?;
    rows.iter().map(|r| dead(r, "no_heartbeat")).collect()
}

/// Gives a claim back (its event could not be recorded): it is claimed again later.
pub async fn unclaim(client: &Client, node: &DeadNode) -> Result<(), ClusterError> {
    client
        .execute(
            "UPDATE nodes SET repaired = NULL WHERE node_id = $1 AND started = $2",
            &[&node.node_id, &node.started],
        )
        .await
        .map_err(pg("giving a repair claim back"))?;
    Ok(())
}

/// Within [`crate::Registry::join`]'s transaction: `node_id`'s previous run, when it
/// ended without a clean exit and nobody repaired it yet (then it is claimed).
pub(crate) async fn claim_previous_run(
    tx: &tokio_postgres::Transaction<'_>,
    node_id: &str,
) -> Result<Option<DeadNode>, ClusterError> {
    let row = tx
        .query_opt(
            "UPDATE nodes SET repaired = now()
             WHERE node_id = $1 AND stopped IS NULL AND (repaired IS NULL OR repaired < started)
             RETURNING node_id, started, heartbeat, sessions, flows",
            &[&node_id],
        )
        .await
        .map_err(pg("claiming this node's previous run"))?;
    row.map(|r| dead(&r, "restarted")).transpose()
}
