//! The shared directory: [`ClusterStore`], the identity crate's [`Store`] on PostgreSQL.
//!
//! Every write runs in one transaction under `pg_advisory_xact_lock(WRITER_LOCK)`: the
//! writer first reads the changes other nodes committed since its last one (applied
//! before it plans, so a read-modify-write on one node never loses another node's
//! change), then writes the records and one row of `changes` (its `number` assigned
//! under the lock, so numbers commit in order and a reader that sees `n` has seen every
//! change before it), and `pg_notify('portcullis_changes', n)`, delivered at commit.
//!
//! A change's `body` (kind `identity`) is `{"source", "mutation", "devices"}`: the
//! identity crate's `Mutation` and `DeviceMutation`, the same records the tables hold. A
//! change of kind `import` (and any kind this gateway does not know) makes a node reload
//! the whole directory, as does a log trimmed past the node's last change
//! (`meta.changes.trimmed_through`).

use std::time::Duration;

use portcullis_identity::backend::BoxFuture;
use portcullis_identity::{
    Device, DeviceMutation, Expect, Group, Mutation, Remote, Store, StoreError, User,
};
use serde::{Deserialize, Serialize};
use tokio_postgres::types::Json;
use tokio_postgres::{Client, GenericClient};

use crate::{connect, schema, ClusterError};

/// Held (per transaction) by every writer of the directory, cluster-wide.
pub const WRITER_LOCK: i64 = 0x706f_7274_6377;

/// The channel every node listens on; the payload is the change number.
pub const CHANNEL: &str = "portcullis_changes";

/// The `meta` key below which the change log was trimmed.
pub const TRIMMED_KEY: &str = "changes.trimmed_through";

/// Changes read per query while catching up.
const BATCH: i64 = 2_000;

/// Where the cluster's database is (the password never logged).
#[derive(Clone)]
pub struct Target {
    pub url: String,
    pub password: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Target {
    pub async fn connect(&self) -> Result<Client, ClusterError> {
        connect(&self.url, self.password.as_deref()).await
    }
}

/// The body of a change of kind `identity`.
#[derive(Debug, Serialize, Deserialize)]
struct Body {
    source: String,
    mutation: Mutation,
    devices: DeviceMutation,
}

/// The directory as one consistent snapshot, with the change it includes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub users: Vec<User>,
    pub groups: Vec<Group>,
    pub devices: Vec<Device>,
    /// The [`RECORD_KINDS`] records, as `(kind, body)`.
    pub records: Vec<(String, serde_json::Value)>,
    /// The last change the snapshot includes.
    pub number: i64,
}

/// Reads the whole directory in one repeatable-read transaction.
pub async fn snapshot(client: &mut Client) -> Result<Snapshot, ClusterError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(crate::pg("reading the directory"))?;
    let s = read_all(&tx).await?;
    tx.commit()
        .await
        .map_err(crate::pg("reading the directory"))?;
    Ok(s)
}

async fn read_all(c: &impl GenericClient) -> Result<Snapshot, ClusterError> {
    async fn records<T: serde::de::DeserializeOwned>(
        c: &impl GenericClient,
        sql: &str,
    ) -> Result<Vec<T>, ClusterError> {
        let rows = c
            .query(sql, &[])
            .await
            .map_err(crate::pg("reading the directory"))?;
        rows.iter()
            .map(|r| {
                let id: uuid::Uuid = r.try_get(0).map_err(crate::pg("a directory row"))?;
                let Json(v): Json<serde_json::Value> =
                    r.try_get(1).map_err(crate::pg("a directory row"))?;
                serde_json::from_value(v)
                    .map_err(|e| ClusterError::Record(format!("record {id}: {e}")))
            })
            .collect()
    }
    // A log trimmed to nothing still says how far the tables are.
    let number: i64 = c
        .query_one(
            "SELECT GREATEST(COALESCE(max(number), 0),
                    COALESCE((SELECT value::bigint FROM meta WHERE key = $1), 0)) FROM changes",
            &[&TRIMMED_KEY],
        )
        .await
        .map_err(crate::pg("reading the change log"))?
        .try_get(0)
        .map_err(crate::pg("reading the change log"))?;
    Ok(Snapshot {
        users: records(c, "SELECT id, record FROM users ORDER BY id").await?,
        groups: records(c, "SELECT id, record FROM groups ORDER BY id").await?,
        devices: records(c, "SELECT id, record FROM devices ORDER BY id").await?,
        records: {
            let mut out = Vec::new();
            for kind in RECORD_KINDS {
                for body in read_records(c, kind).await? {
                    out.push((kind.to_string(), body));
                }
            }
            out
        },
        number,
    })
}

/// The changes after `after`, in order (a reload where the log does not reach back).
async fn changes_after(c: &impl GenericClient, after: i64) -> Result<Vec<Remote>, ClusterError> {
    let trimmed: i64 = c
        .query_one(
            "SELECT COALESCE((SELECT value::bigint FROM meta WHERE key = $1), 0)",
            &[&TRIMMED_KEY],
        )
        .await
        .map_err(crate::pg("reading the change log"))?
        .try_get(0)
        .map_err(crate::pg("reading the change log"))?;
    if trimmed > after {
        return reload(c).await;
    }
    let mut out = Vec::new();
    let mut from = after;
    loop {
        let rows = c
            .query(
                "SELECT number, kind, body FROM changes WHERE number > $1 ORDER BY number LIMIT $2",
                &[&from, &BATCH],
            )
            .await
            .map_err(crate::pg("reading the change log"))?;
        let n = rows.len();
        for r in rows {
            let number: i64 = r.try_get(0).map_err(crate::pg("a change row"))?;
            let kind: String = r.try_get(1).map_err(crate::pg("a change row"))?;
            from = number;
            if kind == crate::policy::KIND || RECORD_KINDS.contains(&kind.as_str()) {
                let Json(body): Json<serde_json::Value> =
                    r.try_get(2).map_err(crate::pg("a change row"))?;
                out.push(Remote::Other { number, kind, body });
                continue;
            }
            if kind != "identity" {
                // An import, or a kind a newer gateway wrote: the tables are the truth.
                out.clear();
                out.extend(reload(c).await?);
                return Ok(out);
            }
            let Json(body): Json<serde_json::Value> =
                r.try_get(2).map_err(crate::pg("a change row"))?;
            let body: Body = serde_json::from_value(body)
                .map_err(|e| ClusterError::Record(format!("change {number}: {e}")))?;
            out.push(Remote::Change {
                number,
                source: body.source,
                mutation: body.mutation,
                devices: body.devices,
            });
        }
        if i64::try_from(n).unwrap_or(i64::MAX) < BATCH {
            return Ok(out);
        }
    }
}

/// The whole state: the directory, then the policy set (whose change may be among
/// those the reload skips).
async fn reload(c: &impl GenericClient) -> Result<Vec<Remote>, ClusterError> {
    let s = read_all(c).await?;
    let number = s.number;
    let mut out = vec![Remote::Reload {
        number,
        users: s.users,
        groups: s.groups,
        devices: s.devices,
    }];
    for (kind, body) in s.records {
        out.push(Remote::Other { number, kind, body });
    }
    if let Some(body) = crate::policy::current(c).await? {
        out.push(Remote::Other {
            number,
            kind: crate::policy::KIND.to_string(),
            body,
        });
    }
    Ok(out)
}

/// The kinds of `records` a node follows through the change log.
pub const RECORD_KINDS: &[&str] = &["access", "totp"];

async fn read_records(
    c: &impl GenericClient,
    kind: &str,
) -> Result<Vec<serde_json::Value>, ClusterError> {
    let rows = c
        .query(
            "SELECT body FROM records WHERE kind = $1 ORDER BY id",
            &[&kind],
        )
        .await
        .map_err(crate::pg("reading records"))?;
    rows.iter()
        .map(|r| {
            r.try_get::<_, Json<serde_json::Value>>(0)
                .map(|Json(v)| v)
                .map_err(crate::pg("a record row"))
        })
        .collect()
}

fn json<T: Serialize>(v: &T) -> Result<serde_json::Value, ClusterError> {
    serde_json::to_value(v).map_err(|e| ClusterError::Record(e.to_string()))
}

/// Maps a database error: unreachable (retry later) or refused.
fn store_error(e: ClusterError) -> StoreError {
    match &e {
        ClusterError::Timeout(_) => StoreError::Unavailable {
            reason: e.to_string(),
        },
        ClusterError::Postgres { source, .. } if source.is_closed() || source.code().is_none() => {
            StoreError::Unavailable {
                reason: e.to_string(),
            }
        }
        _ => StoreError::Shared {
            reason: e.to_string(),
        },
    }
}

/// The identity store of a cluster node.
pub struct ClusterStore {
    target: Target,
    node_id: String,
    /// Connected on first use, on the runtime that uses it (the control plane's), and
    /// again after the connection is lost.
    client: Option<Client>,
    applied: i64,
    initial_devices: Option<Vec<Device>>,
    /// The snapshot's records, for the packet loop's start (read on the start's own
    /// runtime: a connection opened on the data plane's would be driven by it).
    initial_records: Vec<(String, serde_json::Value)>,
}

impl std::fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStore")
            .field("node_id", &self.node_id)
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl ClusterStore {
    /// Opens the store on a snapshot read at start (`snapshot.number` is applied).
    pub fn new(target: Target, node_id: &str, snapshot: &Snapshot) -> ClusterStore {
        ClusterStore {
            target,
            node_id: node_id.to_string(),
            client: None,
            applied: snapshot.number,
            initial_devices: Some(snapshot.devices.clone()),
            initial_records: snapshot.records.clone(),
        }
    }

    async fn client(&mut self) -> Result<&mut Client, ClusterError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let client = self.target.connect().await?;
            // A writer that hangs never holds the cluster's lock for long.
            client
                .batch_execute("SET statement_timeout = '10s'; SET lock_timeout = '10s'")
                .await
                .map_err(crate::pg("configuring the session"))?;
            schema::require_current(&client).await?;
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or(ClusterError::Url("no connection".into()))
    }

    async fn rollback(&mut self) {
        if let Some(c) = &self.client {
            if c.batch_execute("ROLLBACK").await.is_err() {
                self.client = None;
            }
        }
    }

    async fn begin_write(&mut self) -> Result<Vec<Remote>, ClusterError> {
        let after = self.applied;
        let c = self.client().await?;
        c.batch_execute("BEGIN")
            .await
            .map_err(crate::pg("starting a change"))?;
        c.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITER_LOCK])
            .await
            .map_err(crate::pg("taking the writers' lock"))?;
        changes_after(&*c, after).await
    }

    async fn write(
        &mut self,
        source: &str,
        m: &Mutation,
        dm: &DeviceMutation,
    ) -> Result<i64, ClusterError> {
        let node_id = self.node_id.clone();
        let c = self.client().await?;
        for u in &m.users {
            c.execute(
                "INSERT INTO users (id, user_name, record) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET user_name = EXCLUDED.user_name, record = EXCLUDED.record",
                &[&u.id, &u.user_name, &Json(json(u)?)],
            )
            .await
            .map_err(crate::pg("writing a user"))?;
        }
        for id in &m.removed_users {
            c.execute("DELETE FROM users WHERE id = $1", &[id])
                .await
                .map_err(crate::pg("deleting a user"))?;
        }
        for g in &m.groups {
            c.execute(
                "INSERT INTO groups (id, display_name, record) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET display_name = EXCLUDED.display_name, record = EXCLUDED.record",
                &[&g.id, &g.display_name, &Json(json(g)?)],
            )
            .await
            .map_err(crate::pg("writing a group"))?;
        }
        for id in &m.removed_groups {
            c.execute("DELETE FROM groups WHERE id = $1", &[id])
                .await
                .map_err(crate::pg("deleting a group"))?;
        }
        for (id, _) in &dm.removed {
            c.execute("DELETE FROM devices WHERE id = $1", &[id])
                .await
                .map_err(crate::pg("deleting a device"))?;
        }
        for d in &dm.upsert {
            let address = std::net::IpAddr::V4(d.address);
            c.execute(
                "INSERT INTO devices (id, user_name, public_key, address, expires, record)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (id) DO UPDATE SET user_name = EXCLUDED.user_name,
                   public_key = EXCLUDED.public_key, address = EXCLUDED.address,
                   expires = EXCLUDED.expires, record = EXCLUDED.record",
                &[
                    &d.id,
                    &d.user_name,
                    &d.key_b64(),
                    &address,
                    &d.expires,
                    &Json(json(d)?),
                ],
            )
            .await
            .map_err(crate::pg("writing a device"))?;
        }
        let body = Body {
            source: source.to_string(),
            mutation: m.clone(),
            devices: dm.clone(),
        };
        let number: i64 = c
            .query_one(
                "INSERT INTO changes (node_id, kind, body) VALUES ($1, 'identity', $2) RETURNING number",
                &[&node_id, &Json(json(&body)?)],
            )
            .await
            .map_err(crate::pg("recording the change"))?
            .try_get(0)
            .map_err(crate::pg("recording the change"))?;
        c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &number.to_string()])
            .await
            .map_err(crate::pg("announcing the change"))?;
        c.batch_execute("COMMIT")
            .await
            .map_err(crate::pg("committing the change"))?;
        Ok(number)
    }

    async fn read_pending(&mut self) -> Result<Vec<Remote>, ClusterError> {
        let after = self.applied;
        let c = self.client().await?;
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(crate::pg("reading the change log"))?;
        let out = changes_after(&tx, after).await?;
        tx.commit()
            .await
            .map_err(crate::pg("reading the change log"))?;
        Ok(out)
    }

    /// `None`: the stored record was not the expected one, nothing written.
    async fn write_record(
        &mut self,
        kind: &str,
        id: &str,
        body: &serde_json::Value,
        expect: Expect<'_>,
    ) -> Result<Option<i64>, ClusterError> {
        let node_id = self.node_id.clone();
        let c = self.client().await?;
        let tx = c
            .transaction()
            .await
            .map_err(crate::pg("starting a record write"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITER_LOCK])
            .await
            .map_err(crate::pg("taking the writers' lock"))?;
        // Under the writers' lock every record write is serialised cluster-wide: the
        // check and the write are one step.
        if expect != Expect::Any {
            let stored = tx
                .query_opt(
                    "SELECT body FROM records WHERE kind = $1 AND id = $2",
                    &[&kind, &id],
                )
                .await
                .map_err(crate::pg("reading a record"))?
                .map(|r| {
                    r.try_get::<_, Json<serde_json::Value>>(0)
                        .map(|Json(v)| v)
                        .map_err(crate::pg("a record row"))
                })
                .transpose()?;
            if !expect.matches(stored.as_ref()) {
                tx.rollback()
                    .await
                    .map_err(crate::pg("ending a record write"))?;
                return Ok(None);
            }
        }
        tx.execute(
            "INSERT INTO records (kind, id, body) VALUES ($1, $2, $3)
             ON CONFLICT (kind, id) DO UPDATE SET body = EXCLUDED.body, updated = now()",
            &[&kind, &id, &Json(body)],
        )
        .await
        .map_err(crate::pg("writing a record"))?;
        let number: i64 = tx
            .query_one(
                "INSERT INTO changes (node_id, kind, body) VALUES ($1, $2, $3) RETURNING number",
                &[&node_id, &kind, &Json(body)],
            )
            .await
            .map_err(crate::pg("recording the change"))?
            .try_get(0)
            .map_err(crate::pg("recording the change"))?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &number.to_string()])
            .await
            .map_err(crate::pg("announcing the change"))?;
        tx.commit()
            .await
            .map_err(crate::pg("committing the record"))?;
        Ok(Some(number))
    }

    async fn read_meta(&mut self, key: &str) -> Result<Option<String>, ClusterError> {
        let c = self.client().await?;
        let row = c
            .query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
            .await
            .map_err(crate::pg("reading a sync state"))?;
        row.map(|r| r.try_get(0).map_err(crate::pg("reading a sync state")))
            .transpose()
    }

    async fn write_meta(&mut self, key: &str, value: &str) -> Result<(), ClusterError> {
        let c = self.client().await?;
        crate::write_meta(c, key, value).await
    }

    /// Drops a connection that failed, so the next call reconnects.
    fn after_error(&mut self) {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
    }
}

/// The longest a store operation may take (the writers' lock waits at most 10 s): past
/// it the connection counts as lost, so a vanished database never holds a writer (or
/// the catch-up) for TCP's retransmission backoff.
const OP_TIMEOUT: Duration = Duration::from_secs(15);

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, ClusterError>>,
) -> Result<T, ClusterError> {
    tokio::time::timeout(OP_TIMEOUT, f)
        .await
        .unwrap_or(Err(ClusterError::Timeout(OP_TIMEOUT)))
}

impl Store for ClusterStore {
    fn begin(&mut self) -> BoxFuture<'_, Result<Vec<Remote>, StoreError>> {
        Box::pin(async move {
            let r = bounded(self.begin_write()).await;
            if matches!(r, Err(ClusterError::Timeout(_))) {
                self.client = None;
            }
            match r {
                Ok(r) => Ok(r),
                Err(e) => {
                    self.rollback().await;
                    self.after_error();
                    Err(store_error(e))
                }
            }
        })
    }

    fn commit<'a>(
        &'a mut self,
        source: &'a str,
        m: &'a Mutation,
        dm: &'a DeviceMutation,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let r = bounded(self.write(source, m, dm)).await;
            if matches!(r, Err(ClusterError::Timeout(_))) {
                // Whether it committed is unknown: if it did, the catch-up applies it
                // as a change of the log (this node's number was not taken).
                self.client = None;
            }
            match r {
                Ok(number) => {
                    self.applied = number;
                    Ok(())
                }
                Err(e) => {
                    self.rollback().await;
                    self.after_error();
                    Err(store_error(e))
                }
            }
        })
    }

    fn abort(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.rollback())
    }

    fn pending(&mut self) -> BoxFuture<'_, Result<Vec<Remote>, StoreError>> {
        Box::pin(async move {
            let r = bounded(self.read_pending()).await;
            if matches!(r, Err(ClusterError::Timeout(_))) {
                self.client = None;
            }
            if r.is_err() {
                self.after_error();
            }
            r.map_err(store_error)
        })
    }

    fn applied(&mut self, number: i64) {
        self.applied = self.applied.max(number);
    }

    fn last_applied(&self) -> i64 {
        self.applied
    }

    fn initial_devices(&mut self) -> Result<Vec<Device>, StoreError> {
        Ok(self.initial_devices.take().unwrap_or_default())
    }

    fn shared(&self) -> bool {
        true
    }

    fn initial_records(&mut self, kind: &str) -> Option<Vec<serde_json::Value>> {
        let (this, rest) = std::mem::take(&mut self.initial_records)
            .into_iter()
            .partition(|(k, _)| k == kind);
        self.initial_records = rest;
        Some(this.into_iter().map(|(_, body)| body).collect())
    }

    fn save_record<'a>(
        &'a mut self,
        kind: &'a str,
        id: &'a str,
        body: &'a serde_json::Value,
        expect: Expect<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            // This node's number is not marked applied: the catch-up reads the change
            // back like any other (applying a record is idempotent), so the changes of
            // other nodes before it are never skipped.
            let r = bounded(self.write_record(kind, id, body, expect)).await;
            if matches!(r, Err(ClusterError::Timeout(_))) {
                self.client = None;
            }
            if r.is_err() {
                self.after_error();
            }
            r.map(|n| n.is_some()).map_err(store_error)
        })
    }

    fn record<'a>(
        &'a mut self,
        kind: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<serde_json::Value>, StoreError>> {
        Box::pin(async move {
            let r = match self.client().await {
                Ok(c) => {
                    bounded(async {
                        let row = c
                            .query_opt(
                                "SELECT body FROM records WHERE kind = $1 AND id = $2",
                                &[&kind, &id],
                            )
                            .await
                            .map_err(crate::pg("reading a record"))?;
                        row.map(|r| {
                            r.try_get::<_, Json<serde_json::Value>>(0)
                                .map(|Json(v)| v)
                                .map_err(crate::pg("a record row"))
                        })
                        .transpose()
                    })
                    .await
                }
                Err(e) => Err(e),
            };
            if r.is_err() {
                self.after_error();
            }
            r.map_err(store_error)
        })
    }

    fn records<'a>(
        &'a mut self,
        kind: &'a str,
    ) -> BoxFuture<'a, Result<Vec<serde_json::Value>, StoreError>> {
        Box::pin(async move {
            let r = match self.client().await {
                Ok(c) => bounded(read_records(&*c, kind)).await,
                Err(e) => Err(e),
            };
            if r.is_err() {
                self.after_error();
            }
            r.map_err(store_error)
        })
    }

    fn meta<'a>(&'a mut self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move {
            let r = self.read_meta(key).await;
            if r.is_err() {
                self.after_error();
            }
            r.map_err(store_error)
        })
    }

    fn set_meta<'a>(
        &'a mut self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let r = self.write_meta(key, value).await;
            if r.is_err() {
                self.after_error();
            }
            r.map_err(store_error)
        })
    }
}

/// How long a node waits before reconnecting its listener.
pub const RECONNECT: Duration = Duration::from_millis(500);
