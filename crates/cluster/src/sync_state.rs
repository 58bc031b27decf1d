//! A sync consumer's saved mirror (the LDAP consumer's, under its lease): entries by
//! kind and id as JSON, and the cookies, for the node that takes the lease over to
//! resume from. The format of `entry` and `cookies` is the consumer's; this module only
//! stores them, a delta at a time, in one transaction.

use tokio_postgres::types::Json;
use tokio_postgres::Client;

use crate::{pg, ClusterError};

/// A saved mirror as stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Saved {
    pub cookies: serde_json::Value,
    /// (kind, id, entry).
    pub entries: Vec<(String, String, serde_json::Value)>,
}

/// What changed since the last save.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub cookies: serde_json::Value,
    /// With `replace`, these are the whole mirror (everything else is forgotten).
    pub replace: bool,
    pub upserts: Vec<(String, String, serde_json::Value)>,
    pub removes: Vec<(String, String)>,
}

/// The mirror saved for `source`, if any.
pub async fn load(client: &Client, source: &str) -> Result<Option<Saved>, ClusterError> {
    let Some(row) = client
        .query_opt(
            "SELECT cookies FROM sync_state WHERE source = $1",
            &[&source],
        )
        .await
        .map_err(pg("reading a saved sync state"))?
    else {
        return Ok(None);
    };
    let cookies: Json<serde_json::Value> = row.try_get(0).map_err(pg("a saved sync state"))?;
    let rows = client
        .query(
            "SELECT kind, uuid, entry FROM sync_entries WHERE source = $1",
            &[&source],
        )
        .await
        .map_err(pg("reading saved sync entries"))?;
    let entries = rows
        .iter()
        .map(|r| {
            Ok((
                r.try_get(0).map_err(pg("a saved sync entry"))?,
                r.try_get(1).map_err(pg("a saved sync entry"))?,
                r.try_get::<_, Json<serde_json::Value>>(2)
                    .map_err(pg("a saved sync entry"))?
                    .0,
            ))
        })
        .collect::<Result<Vec<_>, ClusterError>>()?;
    Ok(Some(Saved {
        cookies: cookies.0,
        entries,
    }))
}

/// Applies `delta` to the mirror saved for `source` (creating it), atomically: a
/// reader sees the mirror before or after, never a mix.
pub async fn save(client: &mut Client, source: &str, delta: &Delta) -> Result<(), ClusterError> {
    let tx = client
        .transaction()
        .await
        .map_err(pg("saving a sync state"))?;
    if delta.replace {
        tx.execute("DELETE FROM sync_entries WHERE source = $1", &[&source])
            .await
            .map_err(pg("replacing saved sync entries"))?;
    }
    if !delta.removes.is_empty() {
        let (kinds, ids): (Vec<&str>, Vec<&str>) = delta
            .removes
            .iter()
            .map(|(k, u)| (k.as_str(), u.as_str()))
            .unzip();
        tx.execute(
            "DELETE FROM sync_entries e USING unnest($2::text[], $3::text[]) AS d(kind, uuid)
             WHERE e.source = $1 AND e.kind = d.kind AND e.uuid = d.uuid",
            &[&source, &kinds, &ids],
        )
        .await
        .map_err(pg("forgetting saved sync entries"))?;
    }
    if !delta.upserts.is_empty() {
        let mut kinds = Vec::with_capacity(delta.upserts.len());
        let mut ids = Vec::with_capacity(delta.upserts.len());
        let mut entries = Vec::with_capacity(delta.upserts.len());
        for (k, u, e) in &delta.upserts {
            kinds.push(k.as_str());
            ids.push(u.as_str());
            entries.push(Json(e));
        }
        tx.execute(
            "INSERT INTO sync_entries (source, kind, uuid, entry)
             SELECT $1, kind, uuid, entry FROM unnest($2::text[], $3::text[], $4::jsonb[]) AS d(kind, uuid, entry)
             ON CONFLICT (source, kind, uuid) DO UPDATE SET entry = EXCLUDED.entry",
            &[&source, &kinds, &ids, &entries],
        )
        .await
        .map_err(pg("writing saved sync entries"))?;
    }
    tx.execute(
        "INSERT INTO sync_state (source, cookies, updated) VALUES ($1, $2, now())
         ON CONFLICT (source) DO UPDATE SET cookies = EXCLUDED.cookies, updated = now()",
        &[&source, &Json(&delta.cookies)],
    )
    .await
    .map_err(pg("writing a sync state's cookies"))?;
    tx.commit().await.map_err(pg("saving a sync state"))?;
    Ok(())
}
