//! `portcullis cluster import`: a single node's directory (users, groups, devices, as the
//! SQLite store holds them) into an empty cluster, ids kept, in one transaction with one
//! `import` entry in the change log (so running nodes reload fully).

use portcullis_identity::{Device, Group, User};
use serde::Serialize;
use tokio_postgres::Client;

use crate::{pg, schema, ClusterError};

/// What an import wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Imported {
    pub users: usize,
    pub groups: usize,
    pub devices: usize,
    /// The change number of the `import` entry.
    pub change: i64,
}

/// Imports into a cluster that holds no users, groups or devices yet (refused
/// otherwise: merging two directories is not an import). `node_id` is recorded as the
/// change's author.
pub async fn import(
    client: &mut Client,
    node_id: &str,
    users: &[User],
    groups: &[Group],
    devices: &[Device],
) -> Result<Imported, ClusterError> {
    schema::require_current(client).await?;
    let tx = client
        .transaction()
        .await
        .map_err(pg("starting the import"))?;
    // Serialised with other writers of the directory.
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&crate::store::WRITER_LOCK],
    )
    .await
    .map_err(pg("taking the writers' lock"))?;
    let held: i64 = tx
        .query_one(
            "SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM groups) + (SELECT count(*) FROM devices)",
            &[],
        )
        .await
        .map_err(pg("counting the directory"))?
        .try_get(0)
        .map_err(pg("counting the directory"))?;
    if held > 0 {
        return Err(ClusterError::NotEmpty { records: held });
    }
    let json = |v: serde_json::Result<serde_json::Value>| {
        v.map_err(|e| ClusterError::Record(e.to_string()))
    };
    for u in users {
        let record = json(serde_json::to_value(u))?;
        tx.execute(
            "INSERT INTO users (id, user_name, record) VALUES ($1, $2, $3)",
            &[&u.id, &u.user_name, &record],
        )
        .await
        .map_err(pg("importing a user"))?;
    }
    for g in groups {
        let record = json(serde_json::to_value(g))?;
        tx.execute(
            "INSERT INTO groups (id, display_name, record) VALUES ($1, $2, $3)",
            &[&g.id, &g.display_name, &record],
        )
        .await
        .map_err(pg("importing a group"))?;
    }
    for d in devices {
        let record = json(serde_json::to_value(d))?;
        let address = std::net::IpAddr::V4(d.address);
        tx.execute(
            "INSERT INTO devices (id, user_name, public_key, address, expires, record)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &d.id,
                &d.user_name,
                &d.key_b64(),
                &address,
                &d.expires,
                &record,
            ],
        )
        .await
        .map_err(pg("importing a device"))?;
    }
    let out = Imported {
        users: users.len(),
        groups: groups.len(),
        devices: devices.len(),
        change: 0,
    };
    let body = json(serde_json::to_value(out))?;
    let change: i64 = tx
        .query_one(
            "INSERT INTO changes (node_id, kind, body) VALUES ($1, 'import', $2) RETURNING number",
            &[&node_id, &body],
        )
        .await
        .map_err(pg("recording the import"))?
        .try_get(0)
        .map_err(pg("recording the import"))?;
    tx.commit().await.map_err(pg("committing the import"))?;
    Ok(Imported { change, ..out })
}
