//! The cluster schema, owned here. Its version is the one row of `portcullis_schema`;
//! [`migrate`] applies the missing steps in order, each in its own transaction, under
//! `pg_advisory_xact_lock(MIGRATION_LOCK)` so nodes started together do not race. A
//! gateway refuses a schema newer than it knows, and an older one until it is migrated.
//!
//! Version 1:
//! - `nodes(node_id text PRIMARY KEY, address, version, started, heartbeat, sessions,
//!   flows, applied_change, stopped)`: the node registry;
//! - `changes(number bigserial PRIMARY KEY, node_id, at, kind, body jsonb)`: the change
//!   log every node applies in `number` order;
//! - `leases(name text PRIMARY KEY, holder, expires)`: once-per-cluster work;
//! - `users(id uuid PRIMARY KEY, user_name, record jsonb)` (user names unique, case
//!   folded), `groups(id uuid PRIMARY KEY, display_name, record jsonb)`,
//!   `devices(id uuid PRIMARY KEY, user_name, public_key UNIQUE, address inet UNIQUE,
//!   expires, record jsonb)`: the directory, with the same JSON records as the
//!   single node's SQLite store; the database refuses two devices on one address;
//! - `meta(key text PRIMARY KEY, value)`: a sync source's state (the LDAP cookie).
//!
//! Version 2:
//! - `policy_set(id = 1, version, files jsonb, node_id, updated)`: the cluster's policy
//!   set (the admin API's `PolicyFiles` JSON and its version digest); a replacement
//!   writes it with a `changes` row of kind `policy`;
//! - `once(kind, value, data, expires, PRIMARY KEY (kind, value))`: values accepted at
//!   most once cluster-wide until they expire: API nonces (`api-nonce`), SAML assertion
//!   ids (`saml-assertion`), and SAML request ids a node issued (`saml-request`, with
//!   the relay state in `data`), used up by whichever node the answer reaches;
//! - `web_sessions(id text PRIMARY KEY, body jsonb, expires)`: enrollment and login
//!   sessions by the SHA-256 of their cookie, so any node serves a cookie any node set.
//!
//! Version 3:
//! - `sync_state(source text PRIMARY KEY, cookies jsonb, updated)` and
//!   `sync_entries(source, kind, uuid, entry jsonb, PRIMARY KEY (source, kind, uuid))`:
//!   a sync consumer's mirror (the LDAP consumer's entries by entryUUID, its cookies), so
//!   the node that takes its lease over resumes; `source` names the directory as
//!   configured;
//! - `nodes.repaired`: when what the node's last run left (its open sessions) was marked
//!   ended in the audit trail; a node needs repair when it is neither stopped nor
//!   repaired since it `started`.
//!
//! Version 4:
//! - `records(kind, id, body jsonb, updated, PRIMARY KEY (kind, id))`: records other
//!   crates own the format of (kind `access`: `portcullis-access`'s requests), each
//!   write with a `changes` row of the same kind whose body is the record; kind
//!   `audit-checkpoint` (each node's signed audit checkpoints, `portcullis-audit`'s
//!   format, id `<node>/<seq>`) is written without one: no node applies them.

use tokio_postgres::Client;

use crate::{pg, ClusterError};

/// The schema version this gateway writes.
pub const SCHEMA_VERSION: i32 = 4;

/// Held (per transaction) while migrating.
const MIGRATION_LOCK: i64 = 0x706f_7274_6375;

/// Step `n` takes the schema from version `n` to `n + 1`.
const STEPS: [&str; 4] = [
    r"
CREATE TABLE nodes (
    node_id text PRIMARY KEY,
    address text NOT NULL,
    version text NOT NULL,
    started timestamptz NOT NULL,
    heartbeat timestamptz NOT NULL,
    sessions bigint NOT NULL DEFAULT 0,
    flows bigint NOT NULL DEFAULT 0,
    applied_change bigint NOT NULL DEFAULT 0,
    stopped timestamptz
);
CREATE TABLE changes (
    number bigserial PRIMARY KEY,
    node_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    kind text NOT NULL,
    body jsonb NOT NULL
);
CREATE TABLE leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    expires timestamptz NOT NULL
);
CREATE TABLE users (
    id uuid PRIMARY KEY,
    user_name text NOT NULL,
    record jsonb NOT NULL
);
CREATE UNIQUE INDEX users_name ON users (lower(user_name));
CREATE TABLE groups (
    id uuid PRIMARY KEY,
    display_name text NOT NULL,
    record jsonb NOT NULL
);
CREATE TABLE devices (
    id uuid PRIMARY KEY,
    user_name text NOT NULL,
    public_key text NOT NULL UNIQUE,
    address inet NOT NULL UNIQUE,
    expires timestamptz NOT NULL,
    record jsonb NOT NULL
);
CREATE TABLE meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
",
    r"
CREATE TABLE policy_set (
    id integer PRIMARY KEY CHECK (id = 1),
    version text NOT NULL,
    files jsonb NOT NULL,
    node_id text NOT NULL,
    updated timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE once (
    kind text NOT NULL,
    value text NOT NULL,
    data text NOT NULL DEFAULT '',
    expires timestamptz NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE INDEX once_expires ON once (expires);
CREATE TABLE web_sessions (
    id text PRIMARY KEY,
    body jsonb NOT NULL,
    expires timestamptz NOT NULL
);
",
    r"
CREATE TABLE sync_state (
    source text PRIMARY KEY,
    cookies jsonb NOT NULL,
    updated timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE sync_entries (
    source text NOT NULL,
    kind text NOT NULL,
    uuid text NOT NULL,
    entry jsonb NOT NULL,
    PRIMARY KEY (source, kind, uuid)
);
ALTER TABLE nodes ADD COLUMN repaired timestamptz;
",
    r"
CREATE TABLE records (
    kind text NOT NULL,
    id text NOT NULL,
    body jsonb NOT NULL,
    updated timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, id)
);
",
];

/// The schema's version (0: none yet).
pub async fn version(client: &Client) -> Result<i32, ClusterError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('portcullis_schema') IS NOT NULL", &[])
        .await
        .map_err(pg("reading the schema version"))?
        .try_get(0)
        .map_err(pg("reading the schema version"))?;
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_opt("SELECT version FROM portcullis_schema", &[])
        .await
        .map_err(pg("reading the schema version"))?;
    match row {
        Some(r) => r.try_get(0).map_err(pg("reading the schema version")),
        None => Ok(0),
    }
}

/// Fails unless the schema is this gateway's version.
pub async fn require_current(client: &Client) -> Result<(), ClusterError> {
    match version(client).await? {
        v if v == SCHEMA_VERSION => Ok(()),
        v if v > SCHEMA_VERSION => Err(ClusterError::TooNew { found: v }),
        v => Err(ClusterError::TooOld { found: v }),
    }
}

/// Creates or upgrades the schema; returns (version before, version now).
pub async fn migrate(client: &mut Client) -> Result<(i32, i32), ClusterError> {
    let before = version(client).await?;
    if before > SCHEMA_VERSION {
        return Err(ClusterError::TooNew { found: before });
    }
    loop {
        let tx = client
            .transaction()
            .await
            .map_err(pg("starting a migration"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg("taking the migration lock"))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS portcullis_schema (version integer NOT NULL)")
            .await
            .map_err(pg("creating portcullis_schema"))?;
        // Read again under the lock: another node may have migrated meanwhile.
        let current: i32 = match tx
            .query_opt("SELECT version FROM portcullis_schema", &[])
            .await
            .map_err(pg("reading the schema version"))?
        {
            Some(r) => r.try_get(0).map_err(pg("reading the schema version"))?,
            None => {
                tx.execute("INSERT INTO portcullis_schema (version) VALUES (0)", &[])
                    .await
                    .map_err(pg("initialising portcullis_schema"))?;
                0
            }
        };
        let Some(step) = usize::try_from(current).ok().and_then(|i| STEPS.get(i)) else {
            tx.commit().await.map_err(pg("committing a migration"))?;
            return Ok((before, current));
        };
        tx.batch_execute(step)
            .await
            .map_err(pg("applying a schema step"))?;
        tx.execute(
            "UPDATE portcullis_schema SET version = $1",
            &[&(current + 1)],
        )
        .await
        .map_err(pg("recording the schema version"))?;
        tx.commit().await.map_err(pg("committing a migration"))?;
        tracing::info!(version = current + 1, "cluster schema migrated");
    }
}
