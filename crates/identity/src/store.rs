//! The directory on disk: one SQLite database.
//!
//! Format (schema version 3, in `PRAGMA user_version`; version 1 lacked `devices`,
//! version 2 lacked `records`):
//! - `users(id TEXT PRIMARY KEY, user_name TEXT NOT NULL, record TEXT NOT NULL)`
//! - `groups(id TEXT PRIMARY KEY, display_name TEXT NOT NULL, record TEXT NOT NULL)`
//! - `devices(id TEXT PRIMARY KEY, user_name TEXT NOT NULL, public_key TEXT NOT NULL
//!   UNIQUE, expires TEXT NOT NULL, record TEXT NOT NULL)`: registered WireGuard keys
//!   ([`Device`]; `expires` is RFC 3339)
//! - `meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)` (a sync source's state, e.g. the
//!   LDAP sync cookie)
//! - `records(kind TEXT, id TEXT, body TEXT NOT NULL, PRIMARY KEY (kind, id))`: records
//!   other crates own the format of (`access`: `portcullis-access`'s requests, JSON)
//!
//! `record` is the JSON of [`User`] / [`Group`] (membership lives in the group record);
//! the name columns are copies for people reading the database with `sqlite3`. Journal
//! mode WAL with `synchronous = FULL`: a change the caller was told is committed survives
//! a power loss.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension as _};

use crate::devices::{Device, DeviceMutation};
use crate::directory::{Group, Mutation, User};

const SCHEMA_VERSION: i64 = 3;

/// Errors of the SQLite store; they name the database file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("identity database {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("identity database {path}: record {id} is not valid: {reason}")]
    Corrupt {
        path: String,
        id: String,
        reason: String,
    },
    #[error("identity database {path}: schema version {found} is newer than this gateway's {SCHEMA_VERSION}")]
    TooNew { path: String, found: i64 },
    #[error("identity store: a commit did not complete: {reason}")]
    Lost { reason: String },
    /// The cluster's database cannot be reached: nothing was changed; try again later.
    #[error("the cluster database is unreachable, nothing was changed: {reason}")]
    Unavailable { reason: String },
    /// The cluster's database refused or failed the operation.
    #[error("cluster database: {reason}")]
    Shared { reason: String },
}

impl StoreError {
    /// Whether trying again later can succeed (the database is down or unreachable).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// The SQLite database behind the directory.
pub struct SqliteStore {
    conn: Connection,
    path: String,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database and reads every record.
    pub fn open(path: &Path) -> Result<(SqliteStore, Vec<User>, Vec<Group>), StoreError> {
        let name = path.display().to_string();
        // Created 0600 before SQLite opens it (its -wal and -shm files take the same
        // mode): the directory holds who may reach what.
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path);
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Sqlite {
            path: name.clone(),
            source,
        })?;
        Self::init(conn, name)
    }

    /// A database in memory (tests, or `[identity] database = ":memory:"`).
    pub fn in_memory() -> Result<(SqliteStore, Vec<User>, Vec<Group>), StoreError> {
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Sqlite {
            path: ":memory:".into(),
            source,
        })?;
        Self::init(conn, ":memory:".into())
    }

    fn init(
        conn: Connection,
        path: String,
    ) -> Result<(SqliteStore, Vec<User>, Vec<Group>), StoreError> {
        let store = SqliteStore { conn, path };
        let found: i64 = store
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| store.err(e))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: store.path.clone(),
                found,
            });
        }
        store
            .conn
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, user_name TEXT NOT NULL, record TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS groups (id TEXT PRIMARY KEY, display_name TEXT NOT NULL, record TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, user_name TEXT NOT NULL, public_key TEXT NOT NULL UNIQUE, expires TEXT NOT NULL, record TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS records (kind TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (kind, id));
                 PRAGMA user_version = 3;",
            )
            .map_err(|e| store.err(e))?;
        let users = store.load::<User>("SELECT id, record FROM users")?;
        let groups = store.load::<Group>("SELECT id, record FROM groups")?;
        Ok((store, users, groups))
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn load<T: serde::de::DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, record) = row.map_err(|e| self.err(e))?;
            out.push(
                serde_json::from_str(&record).map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    id,
                    reason: e.to_string(),
                })?,
            );
        }
        Ok(out)
    }

    /// Every registered device.
    pub fn devices(&self) -> Result<Vec<Device>, StoreError> {
        self.load::<Device>("SELECT id, record FROM devices")
    }

    /// Writes a mutation as one transaction.
    pub fn commit(&mut self, m: &Mutation) -> Result<(), StoreError> {
        self.commit_with_devices(m, &DeviceMutation::default())
    }

    /// Writes a directory and a device mutation as one transaction (a deleted user's
    /// devices go in the same commit).
    pub fn commit_with_devices(
        &mut self,
        m: &Mutation,
        dm: &DeviceMutation,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let json = |v: serde_json::Result<String>| {
            v.map_err(|e| err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))
        };
        let tx = self.conn.transaction().map_err(err)?;
        for u in &m.users {
            tx.execute(
                "INSERT OR REPLACE INTO users (id, user_name, record) VALUES (?1, ?2, ?3)",
                params![
                    u.id.to_string(),
                    u.user_name,
                    json(serde_json::to_string(u))?
                ],
            )
            .map_err(err)?;
        }
        for id in &m.removed_users {
            tx.execute("DELETE FROM users WHERE id = ?1", params![id.to_string()])
                .map_err(err)?;
        }
        for g in &m.groups {
            tx.execute(
                "INSERT OR REPLACE INTO groups (id, display_name, record) VALUES (?1, ?2, ?3)",
                params![
                    g.id.to_string(),
                    g.display_name,
                    json(serde_json::to_string(g))?
                ],
            )
            .map_err(err)?;
        }
        for id in &m.removed_groups {
            tx.execute("DELETE FROM groups WHERE id = ?1", params![id.to_string()])
                .map_err(err)?;
        }
        for (id, _) in &dm.removed {
            tx.execute("DELETE FROM devices WHERE id = ?1", params![id.to_string()])
                .map_err(err)?;
        }
        for d in &dm.upsert {
            tx.execute(
                "INSERT OR REPLACE INTO devices (id, user_name, public_key, expires, record) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    d.id.to_string(),
                    d.user_name,
                    d.key_b64(),
                    d.expires.to_rfc3339(),
                    json(serde_json::to_string(d))?
                ],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Writes (or replaces) a record of `kind`, durably, when the stored one is the
    /// `expect`ed one (`false`: nothing written). One connection, `&mut self`: the read
    /// and the write cannot interleave with another writer of this process.
    pub fn save_record(
        &mut self,
        kind: &str,
        id: &str,
        body: &serde_json::Value,
        expect: crate::backend::Expect<'_>,
    ) -> Result<bool, StoreError> {
        if expect != crate::backend::Expect::Any && !expect.matches(self.record(kind, id)?.as_ref())
        {
            return Ok(false);
        }
        self.conn
            .execute(
                "INSERT OR REPLACE INTO records (kind, id, body) VALUES (?1, ?2, ?3)",
                params![kind, id, body.to_string()],
            )
            .map(|_| true)
            .map_err(|e| self.err(e))
    }

    /// One record of `kind`.
    pub fn record(&self, kind: &str, id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let body: Option<String> = self
            .conn
            .query_row(
                "SELECT body FROM records WHERE kind = ?1 AND id = ?2",
                params![kind, id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        body.map(|b| {
            serde_json::from_str(&b).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                id: id.to_string(),
                reason: e.to_string(),
            })
        })
        .transpose()
    }

    /// Every record of `kind`, by id.
    pub fn records(&self, kind: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, body FROM records WHERE kind = ?1 ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![kind], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row.map_err(|e| self.err(e))?;
            out.push(
                serde_json::from_str(&body).map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    id,
                    reason: e.to_string(),
                })?,
            );
        }
        Ok(out)
    }

    /// A sync source's saved state.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}
