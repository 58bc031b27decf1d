//! The ClickHouse side: connecting (with the server version deciding compression and
//! row validation), the schema and its migrations, retention, and inserts.
//!
//! Schema (database from the config, `portcullis` by default):
//! - `events`: every event, one row ([`AuditRow`]; the two chain hashes as
//!   `FixedString(32)` since schema 4). `ReplacingMergeTree` partitioned by
//!   month, ordered by `(user, time, gateway, seq)`: per-user time ranges read a narrow
//!   slice, and a retried batch collapses onto the rows it repeats (same key) when parts
//!   merge; queries that count read `FINAL`.
//! - `flows_by_dst_idx` (since schema 5): a narrow index of flow events ordered by
//!   `(dst_addr, time, gateway, seq)`, holding only the destination and the key of the row
//!   in `events` (`user, time, gateway, seq`); per-destination questions find the keys
//!   here and read the rows from `events` by its primary key. Filled by the materialized
//!   view `flows_by_dst_idx_mv`. It replaced `flows_by_dst` (schema 2 to 4), a 24-column
//!   copy of every flow row that cost ClickHouse ~1.2 µs of CPU per flow row to write.
//! - `uploader_metrics`: each gateway's uploader state every 10 s (backlog, lag, errors).
//! - `legal_holds` (since schema 6): holds placed and lifted, append-only; retention
//!   keeps every partition that holds rows under an active hold.
//! - `schema_migrations`: applied migration versions.
//!
//! The SQL keeps to what ClickHouse 18.16 (Debian's) and current releases both accept: no
//! `DateTime64`, no `IPv4`/`IPv6` types, no `TTL`, no `LowCardinality`.

use std::time::Duration;

use crate::native::NativeBlock;
use crate::row::{AuditRow, COLUMNS};

/// Connection settings.
#[derive(Clone)]
pub struct StoreConfig {
    /// One server, or the replicas of one trail (tried in order, from where the last
    /// connection failed).
    pub urls: Vec<String>,
    /// The ClickHouse cluster the replicas form (replicated tables and a `Distributed`
    /// `events`); `None`: one server's plain tables.
    pub cluster: Option<String>,
    pub database: String,
    pub user: String,
    pub password: Option<String>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("urls", &self.urls)
            .field("cluster", &self.cluster)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("clickhouse at {url}: {source}")]
    Client {
        url: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("no clickhouse url configured")]
    NoUrl,
    #[error("clickhouse at {url} reports an unparseable version {version:?}")]
    Version { url: String, version: String },
    #[error("cannot encode a row for clickhouse: {0}")]
    Encode(String),
    #[error("column {database}.events.{column} is {found}, this gateway writes {expected}: run `portcullis audit migrate`")]
    Column {
        database: String,
        column: String,
        expected: String,
        found: String,
    },
    #[error("database {database} is at schema version {found}, this gateway needs {needed}: run `portcullis audit migrate`")]
    SchemaBehind {
        database: String,
        found: u32,
        needed: u32,
    },
}

/// A connected store.
#[derive(Clone)]
pub struct Store {
    client: clickhouse::Client,
    url: String,
    /// Which of the configured urls this is.
    pub url_index: usize,
    pub database: String,
    pub cluster: Option<String>,
    /// (major, minor) of the server.
    pub version: (u32, u32),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("version", &self.version)
            .finish()
    }
}

/// Servers older than this get uncompressed requests and queries without the crate's row
/// validation (they lack `RowBinaryWithNamesAndTypes` and the crate's compressed inserts);
/// newer ones get LZ4 and validated queries. Inserts are `Native` on both: the block names
/// every column with its type, which the server checks, and [`Store::check_schema`]
/// compares the table's column types with what the uploader encodes before any insert.
const MODERN_MAJOR: u32 = 22;

fn base_client(cfg: &StoreConfig, url: &str) -> clickhouse::Client {
    let mut c = clickhouse::Client::default()
        .with_url(url)
        .with_user(&cfg.user);
    if let Some(p) = &cfg.password {
        c = c.with_password(p);
    }
    c
}

impl Store {
    /// Connects to the first url that answers and detects its server version.
    pub async fn connect(cfg: &StoreConfig) -> Result<Store, StoreError> {
        Store::connect_from(cfg, 0).await
    }

    /// Connects to the first url that answers, trying them in order from `start`
    /// (wrapping around): after a replica failed, from the one after it.
    pub async fn connect_from(cfg: &StoreConfig, start: usize) -> Result<Store, StoreError> {
        let n = cfg.urls.len();
        let mut last = StoreError::NoUrl;
        for i in 0..n {
            let index = (start + i) % n;
            match Store::connect_one(cfg, index).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn connect_one(cfg: &StoreConfig, index: usize) -> Result<Store, StoreError> {
        let url = cfg.urls.get(index).ok_or(StoreError::NoUrl)?;
        let err = |source| StoreError::Client {
            url: url.clone(),
            source,
        };
        let probe = base_client(cfg, url)
            .with_validation(false)
            .with_compression(clickhouse::Compression::None);
        let version: String = probe
            .query("SELECT version()")
            .fetch_one()
            .await
            .map_err(err)?;
        let mut parts = version.split('.').map(|p| p.parse::<u32>());
        let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
            return Err(StoreError::Version {
                url: url.clone(),
                version,
            });
        };
        let client = if major >= MODERN_MAJOR {
            base_client(cfg, url).with_compression(clickhouse::Compression::Lz4)
        } else {
            probe
        };
        Ok(Store {
            client,
            url: url.clone(),
            url_index: index,
            database: cfg.database.clone(),
            cluster: cfg.cluster.clone(),
            version: (major, minor),
        })
    }

    /// The server this store talks to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The table rows are inserted into and partitions dropped from: `events`, or in a
    /// cluster the replicated `events_local` under the `Distributed` `events`.
    pub fn local(&self, table: &str) -> String {
        match self.cluster {
            Some(_) => format!("{}.{table}_local", self.database),
            None => format!("{}.{table}", self.database),
        }
    }

    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    fn err(&self) -> impl FnOnce(clickhouse::error::Error) -> StoreError + '_ {
        |source| StoreError::Client {
            url: self.url.clone(),
            source,
        }
    }

    /// Runs a statement (DDL or mutation).
    pub async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        self.client.query(sql).execute().await.map_err(self.err())
    }

    /// Applies the migrations the database lacks; returns the versions applied. With a
    /// cluster: see [`Store::migrate_cluster`].
    pub async fn migrate(&self) -> Result<Vec<u32>, StoreError> {
        match self.cluster.clone() {
            Some(c) => self.migrate_cluster(&c).await,
            None => self.migrate_to(SCHEMA_VERSION).await,
        }
    }

    /// The replicated schema, on every replica of `cluster` at once (`ON CLUSTER`; the
    /// servers need `<zookeeper>`, `<remote_servers>` naming the cluster, and the
    /// `{shard}`/`{replica}` macros): `events_local`, `flows_by_dst_idx_local` (with its
    /// view), `uploader_metrics_local` and `legal_holds_local` as `Replicated*MergeTree`
    /// under `/clickhouse/tables/{shard}/<database>/<table>`, a `Distributed` table of
    /// each one's name without `_local` for queries, and a replicated
    /// `schema_migrations`. A single-server trail on the server connected to (plain
    /// `events`) is first brought to the current schema, moved aside, copied into the
    /// replicated tables (which replicate it) and dropped. Every step can run again.
    /// Returns the versions recorded.
    pub async fn migrate_cluster(&self, cluster: &str) -> Result<Vec<u32>, StoreError> {
        let db = &self.database;
        let on = format!("ON CLUSTER {cluster}");
        let single = self.table_exists("events").await? && !self.is_distributed("events").await?;
        if single {
            // A plain trail here: current first, then out of the way.
            Store {
                cluster: None,
                ..self.clone()
            }
            .migrate_to(SCHEMA_VERSION)
            .await?;
            self.execute(&format!("DROP TABLE IF EXISTS {db}.flows_by_dst_idx_mv"))
                .await?;
            for t in CLUSTER_TABLES.iter().chain(&["schema_migrations"]) {
                if self.table_exists(t).await? {
                    self.execute(&format!("RENAME TABLE {db}.{t} TO {db}.{t}_single"))
                        .await?;
                }
            }
        }
        self.execute(&format!("CREATE DATABASE IF NOT EXISTS {db} {on}"))
            .await?;
        let replicated = |engine: &str, table: &str| {
            format!("{engine}('/clickhouse/tables/{{shard}}/{db}/{table}', '{{replica}}')")
        };
        let ddl = [
            cluster_table(EVENTS_V4, "events", &replicated("ReplicatedReplacingMergeTree", "events")),
            cluster_table(
                FLOWS_BY_DST_IDX,
                "flows_by_dst_idx",
                &replicated("ReplicatedReplacingMergeTree", "flows_by_dst_idx"),
            ),
            cluster_table(
                UPLOADER_METRICS,
                "uploader_metrics",
                &replicated("ReplicatedMergeTree", "uploader_metrics"),
            ),
            cluster_table(
                LEGAL_HOLDS,
                "legal_holds",
                &replicated("ReplicatedMergeTree", "legal_holds"),
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {{db}}.schema_migrations (version UInt32, name String, applied DateTime) \
                 ENGINE = {} ORDER BY version",
                replicated("ReplicatedMergeTree", "schema_migrations")
            ),
            FLOWS_BY_DST_IDX_MV
                .replace("{db}.flows_by_dst_idx_mv", "{db}.flows_by_dst_idx_mv_local")
                .replace("{db}.flows_by_dst_idx ", "{db}.flows_by_dst_idx_local ")
                .replace("{db}.events ", "{db}.events_local "),
        ];
        for stmt in ddl {
            let stmt = stmt.replace("{db}", db);
            // `CREATE … IF NOT EXISTS db.t` → `… db.t ON CLUSTER c`.
            self.execute(&on_cluster(&stmt, &on)).await?;
        }
        for t in CLUSTER_TABLES {
            self.execute(&format!(
                "CREATE TABLE IF NOT EXISTS {db}.{t} {on} AS {db}.{t}_local \
                 ENGINE = Distributed({cluster}, {db}, {t}_local)"
            ))
            .await?;
        }
        if single {
            for t in CLUSTER_TABLES {
                if self.table_exists(&format!("{t}_single")).await? {
                    // The view fills the index from the copied events.
                    if *t != "flows_by_dst_idx" {
                        self.execute(&format!(
                            "INSERT INTO {db}.{t}_local SELECT * FROM {db}.{t}_single"
                        ))
                        .await?;
                    }
                    self.execute(&format!("DROP TABLE {db}.{t}_single")).await?;
                }
            }
            self.execute(&format!(
                "DROP TABLE IF EXISTS {db}.schema_migrations_single"
            ))
            .await?;
        }
        let current = self.schema_version().await?;
        let mut recorded = Vec::new();
        for m in MIGRATIONS.iter().filter(|m| m.version > current) {
            self.client
                .query(&format!(
                    "INSERT INTO {db}.schema_migrations (version, name, applied) SELECT ?, ?, now()"
                ))
                .bind(m.version)
                .bind(m.name)
                .execute()
                .await
                .map_err(self.err())?;
            recorded.push(m.version);
        }
        tracing::info!(cluster, database = %db, converted = single, "audit schema on the cluster");
        Ok(recorded)
    }

    async fn is_distributed(&self, table: &str) -> Result<bool, StoreError> {
        let n: u64 = self
            .client
            .query("SELECT count() FROM system.tables WHERE database = ? AND name = ? AND engine = 'Distributed'")
            .bind(&self.database)
            .bind(table)
            .fetch_one()
            .await
            .map_err(self.err())?;
        Ok(n > 0)
    }

    /// Applies the migrations the database lacks up to `target` (an older schema, for
    /// upgrade tests); returns the versions applied.
    pub async fn migrate_to(&self, target: u32) -> Result<Vec<u32>, StoreError> {
        let db = &self.database;
        self.execute(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
            .await?;
        self.execute(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations \
             (version UInt32, name String, applied DateTime) ENGINE = TinyLog"
        ))
        .await?;
        let current = self.schema_version().await?;
        let mut applied = Vec::new();
        for m in MIGRATIONS
            .iter()
            .filter(|m| m.version > current && m.version <= target)
        {
            for stmt in m.sql {
                self.execute(&stmt.replace("{db}", db)).await?;
            }
            if m.version == 4 {
                self.raw_hashes().await?;
            }
            self.client
                .query(&format!(
                    "INSERT INTO {db}.schema_migrations (version, name, applied) \
                     SELECT ?, ?, now()"
                ))
                .bind(m.version)
                .bind(m.name)
                .execute()
                .await
                .map_err(self.err())?;
            tracing::info!(version = m.version, name = m.name, "audit schema migrated");
            applied.push(m.version);
        }
        Ok(applied)
    }

    /// The highest applied migration (0: none, or no database).
    pub async fn schema_version(&self) -> Result<u32, StoreError> {
        if !self.table_exists("schema_migrations").await? {
            return Ok(0);
        }
        self.client
            .query(&format!(
                "SELECT toUInt32(max(version)) FROM {}.schema_migrations",
                self.database
            ))
            .fetch_one()
            .await
            .map_err(self.err())
    }

    /// Fails unless the schema is at least what this build writes and every column the
    /// uploader inserts has the type it encodes (the Native insert names its columns, so
    /// order and extra columns do not matter).
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let found = self.schema_version().await?;
        if found < SCHEMA_VERSION {
            return Err(StoreError::SchemaBehind {
                database: self.database.clone(),
                found,
                needed: SCHEMA_VERSION,
            });
        }
        let columns: Vec<(String, String)> = self
            .client
            .query("SELECT name, type FROM system.columns WHERE database = ? AND table = 'events'")
            .bind(&self.database)
            .fetch_all()
            .await
            .map_err(self.err())?;
        for (name, expected) in COLUMNS {
            let found = columns
                .iter()
                .find(|(n, _)| n == name)
                .map_or("missing", |(_, t)| t.as_str());
            if found != *expected {
                return Err(StoreError::Column {
                    database: self.database.clone(),
                    column: (*name).to_string(),
                    expected: (*expected).to_string(),
                    found: found.to_string(),
                });
            }
        }
        Ok(())
    }

    async fn table_exists(&self, table: &str) -> Result<bool, StoreError> {
        let n: u64 = self
            .client
            .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
            .bind(&self.database)
            .bind(table)
            .fetch_one()
            .await
            .map_err(self.err())?;
        Ok(n > 0)
    }

    /// Schema 4: `prev_hash` and `hash` from 64 hex characters to 32 raw bytes. 18.16
    /// cannot convert a column with an expression, so the table is rebuilt: the old one is
    /// renamed aside (inserts fail and stay in the gateways' spools meanwhile), the new one
    /// created with the view, the rows copied, the old table dropped. Every step can run
    /// again after an interruption; rows copied twice collapse like retried uploads.
    async fn raw_hashes(&self) -> Result<(), StoreError> {
        let db = &self.database;
        if !self.table_exists("events_v3").await? {
            self.execute(&format!("DROP TABLE IF EXISTS {db}.flows_by_dst_mv"))
                .await?;
            self.execute(&format!("RENAME TABLE {db}.events TO {db}.events_v3"))
                .await?;
        }
        self.execute(&EVENTS_V4.replace("{db}", db)).await?;
        // Schema 5 dropped the wide copy; a rerun after it has no view to restore.
        if self.table_exists("flows_by_dst").await? {
            self.execute(&FLOWS_BY_DST_MV.replace("{db}", db)).await?;
        }
        // The old table's own columns (not this build's list, which later schemas extend).
        let names: Vec<String> = self
            .client
            .query("SELECT name FROM system.columns WHERE database = ? AND table = 'events_v3'")
            .bind(db)
            .fetch_all()
            .await
            .map_err(self.err())?;
        let copy: Vec<String> = names
            .iter()
            .map(|name| match name.as_str() {
                "prev_hash" | "hash" => format!("toFixedString(unhex({name}), 32) AS {name}"),
                _ => name.clone(),
            })
            .collect();
        self.execute(&format!(
            "INSERT INTO {db}.events ({}) SELECT {} FROM {db}.events_v3",
            names.join(", "),
            copy.join(", ")
        ))
        .await?;
        self.execute(&format!("DROP TABLE {db}.events_v3")).await
    }

    /// Inserts rows in one statement. Retrying the same rows never doubles them (see the
    /// module docs).
    pub async fn insert(&self, rows: &[AuditRow]) -> Result<(), StoreError> {
        let mut block = NativeBlock::default();
        let mut record = Vec::with_capacity(512);
        for row in rows {
            record.clear();
            row.encode_record(&mut record);
            block
                .push_record(&record)
                .map_err(|e| StoreError::Encode(e.to_string()))?;
        }
        self.insert_block(block).await
    }

    /// Inserts a block of rows in one statement (`FORMAT Native`, see [`crate::native`]).
    pub async fn insert_block(&self, block: NativeBlock) -> Result<(), StoreError> {
        let mut insert = self
            .client
            .insert_formatted_with(NativeBlock::insert_sql(&self.local("events")));
        insert
            .send(bytes::Bytes::from(block.finish()))
            .await
            .map_err(self.err())?;
        insert.end().await.map_err(self.err())
    }

    /// Writes one uploader metrics sample.
    pub async fn insert_metrics(&self, m: &MetricsRow) -> Result<(), StoreError> {
        let table = match self.cluster {
            Some(_) => "uploader_metrics_local",
            None => "uploader_metrics",
        };
        let mut insert = self
            .client
            .clone()
            .with_database(&self.database)
            .insert::<MetricsRow>(table)
            .await
            .map_err(self.err())?;
        insert.write(m).await.map_err(self.err())?;
        insert.end().await.map_err(self.err())
    }

    /// Drops monthly partitions whose newest row is older than `max_age`, except those
    /// an active legal hold covers: a hold on a time range keeps every month it overlaps
    /// (in every table); a hold on a user keeps the months holding that user's rows in
    /// the range. When the holds cannot be read nothing is dropped.
    pub async fn apply_retention(&self, max_age: Duration) -> Result<Retention, StoreError> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Part {
            table: String,
            partition: String,
        }
        let cutoff = chrono::Utc::now().timestamp() - max_age.as_secs() as i64;
        let tables = ["events", "flows_by_dst_idx", "uploader_metrics"]
            .map(|t| format!("'{}'", self.local(t).rsplit('.').next().unwrap_or(t)))
            .join(", ");
        let parts: Vec<Part> = self
            .client
            .query(&retention_parts_sql(&self.database, &tables, cutoff))
            .fetch_all()
            .await
            .map_err(self.err())?;
        let held = self.held_months().await?;
        let mut out = Retention::default();
        for p in parts {
            // Partition ids of toYYYYMM are digits; anything else is not ours to drop.
            let Ok(month) = p.partition.parse::<u32>() else {
                continue;
            };
            let name = format!("{}/{}", p.table, p.partition);
            if held.contains(&month) {
                out.held.push(name);
                continue;
            }
            self.execute(&format!(
                "ALTER TABLE {}.{} DROP PARTITION {}",
                self.database, p.table, p.partition
            ))
            .await?;
            out.dropped.push(name);
        }
        Ok(out)
    }

    /// Months (`YYYYMM`) an active hold keeps.
    async fn held_months(&self) -> Result<std::collections::BTreeSet<u32>, StoreError> {
        let mut months = std::collections::BTreeSet::new();
        for h in self.holds().await? {
            if h.user.is_empty() {
                let (mut y, mut m) = (h.since / 100, h.since % 100);
                while y * 100 + m <= h.until {
                    months.insert(y * 100 + m);
                    (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                }
                continue;
            }
            let found: Vec<u32> = self
                .client
                .query(&held_months_sql(
                    &self.database,
                    &h.user,
                    h.since_secs,
                    h.until_secs,
                ))
                .fetch_all()
                .await
                .map_err(self.err())?;
            months.extend(found);
        }
        Ok(months)
    }

    /// Records a hold placed (`add`) or lifted (`remove`).
    pub async fn record_hold(&self, h: &HoldRecord) -> Result<(), StoreError> {
        self.client
            .query(&format!(
                "INSERT INTO {} (id, action, user, since, until, reason, actor, time) \
                 SELECT ?, ?, ?, toDateTime(?), toDateTime(?), ?, ?, now()",
                self.local("legal_holds")
            ))
            .bind(&h.id)
            .bind(&h.action)
            .bind(&h.user)
            .bind(h.since_secs)
            .bind(h.until_secs)
            .bind(&h.reason)
            .bind(&h.actor)
            .execute()
            .await
            .map_err(self.err())
    }

    /// The active holds (placed and not lifted), oldest first.
    pub async fn holds(&self) -> Result<Vec<Hold>, StoreError> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Row {
            id: String,
            held_user: String,
            held_since: u32,
            held_until: u32,
            held_reason: String,
            placed_by: String,
            placed: u32,
        }
        let rows: Vec<Row> = self
            .client
            .query(&holds_sql(&self.database))
            .fetch_all()
            .await
            .map_err(self.err())?;
        let month = |secs: u32| {
            chrono::DateTime::from_timestamp(i64::from(secs), 0)
                .map(|t| {
                    use chrono::Datelike as _;
                    t.year().max(0) as u32 * 100 + t.month()
                })
                .unwrap_or(0)
        };
        Ok(rows
            .into_iter()
            .map(|r| Hold {
                since: month(r.held_since),
                until: month(r.held_until),
                id: r.id,
                user: r.held_user,
                since_secs: r.held_since,
                until_secs: r.held_until,
                reason: r.held_reason,
                actor: r.placed_by,
                placed_secs: r.placed,
            })
            .collect())
    }
}

/// A ClickHouse string literal (backslash and quote escaped; `?` doubled, which the
/// client library reads as a literal `?` rather than a bind).
pub fn sql_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\0' => out.push_str("\\0"),
            '?' => out.push_str("??"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The partitions of `tables` (quoted, comma separated) whose newest row is before
/// `cutoff` (Unix seconds).
pub fn retention_parts_sql(db: &str, tables: &str, cutoff: i64) -> String {
    format!(
        "SELECT table, partition FROM system.parts \
         WHERE database = {} AND active AND table IN ({tables}) \
         GROUP BY table, partition HAVING toInt64(max(max_time)) < {cutoff}",
        sql_string(db)
    )
}

/// The months (`YYYYMM`) with rows of `user` between the two times.
pub fn held_months_sql(db: &str, user: &str, since: u32, until: u32) -> String {
    format!(
        "SELECT DISTINCT toUInt32(toYYYYMM(time)) FROM {db}.events \
         WHERE user = {} AND time >= toDateTime({since}) AND time <= toDateTime({until})",
        sql_string(user)
    )
}

/// The active holds. Aliases differ from the column names (current ClickHouse resolves
/// an alias inside the aggregate that defines it).
pub fn holds_sql(db: &str) -> String {
    format!(
        "SELECT id, anyIf(user, action = 'add') AS held_user, \
         toUInt32(anyIf(since, action = 'add')) AS held_since, toUInt32(anyIf(until, action = 'add')) AS held_until, \
         anyIf(reason, action = 'add') AS held_reason, anyIf(actor, action = 'add') AS placed_by, \
         toUInt32(minIf(time, action = 'add')) AS placed \
         FROM {db}.legal_holds GROUP BY id \
         HAVING countIf(action = 'add') > 0 AND countIf(action = 'remove') = 0 ORDER BY placed, id"
    )
}

/// The tables of a fresh database at [`SCHEMA_VERSION`] on one server, as the migrations
/// leave them (a test holds the two equal): what the current-ClickHouse tests create.
pub fn current_schema(db: &str) -> Vec<String> {
    [
        "CREATE DATABASE IF NOT EXISTS {db}",
        "CREATE TABLE IF NOT EXISTS {db}.schema_migrations \
         (version UInt32, name String, applied DateTime) ENGINE = TinyLog",
        EVENTS_V4,
        FLOWS_BY_DST_IDX,
        FLOWS_BY_DST_IDX_MV,
        UPLOADER_METRICS,
        LEGAL_HOLDS,
    ]
    .iter()
    .map(|s| s.replace("{db}", db))
    .collect()
}

/// What a retention pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// `table/partition` dropped.
    pub dropped: Vec<String>,
    /// `table/partition` past the retention age and kept under a legal hold.
    pub held: Vec<String>,
}

/// A hold placed or lifted (one row of `legal_holds`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldRecord {
    pub id: String,
    /// `add` or `remove`.
    pub action: String,
    /// Empty: every user.
    pub user: String,
    pub since_secs: u32,
    pub until_secs: u32,
    pub reason: String,
    pub actor: String,
}

/// An active hold.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Hold {
    pub id: String,
    pub user: String,
    /// Months `YYYYMM` of the range's ends.
    #[serde(skip)]
    pub since: u32,
    #[serde(skip)]
    pub until: u32,
    pub since_secs: u32,
    pub until_secs: u32,
    pub reason: String,
    pub actor: String,
    pub placed_secs: u32,
}

/// A sample of the uploader's state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clickhouse::Row)]
pub struct MetricsRow {
    pub gateway: String,
    pub time: u32,
    pub backlog: u64,
    pub lag_ms: u64,
    pub batches: u64,
    pub rows: u64,
    pub errors: u64,
    pub spool_bytes: u64,
    pub refused: u64,
}

struct Migration {
    version: u32,
    name: &'static str,
    sql: &'static [&'static str],
}

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = 6;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events",
        sql: &["CREATE TABLE IF NOT EXISTS {db}.events (
            event_id UUID, gateway String, seq UInt64, time DateTime, time_us UInt64, v UInt32,
            kind String, user String, groups Array(String), device String,
            session_id UInt64, flow_id UInt64, protocol String,
            src_ip String, src_port UInt16, dst_ip String, dst_addr FixedString(16), dst_port UInt16,
            network String, decision String, policy_ids Array(String), policy_epoch UInt64,
            reason String, duration_ms UInt64,
            bytes_out UInt64, packets_out UInt64, bytes_in UInt64, packets_in UInt64,
            latency_us UInt64, detail String, prev_hash String, hash String
        ) ENGINE = ReplacingMergeTree()
        PARTITION BY toYYYYMM(time)
        ORDER BY (user, time, gateway, seq)"],
    },
    Migration {
        version: 2,
        name: "flows_by_dst",
        sql: &[
            "CREATE TABLE IF NOT EXISTS {db}.flows_by_dst (
            gateway String, seq UInt64, time DateTime, time_us UInt64, kind String,
            user String, groups Array(String), device String, session_id UInt64,
            protocol String, src_ip String, src_port UInt16,
            dst_ip String, dst_addr FixedString(16), dst_port UInt16,
            network String, decision String, policy_ids Array(String), reason String,
            duration_ms UInt64, bytes_out UInt64, packets_out UInt64, bytes_in UInt64, packets_in UInt64
        ) ENGINE = ReplacingMergeTree()
        PARTITION BY toYYYYMM(time)
        ORDER BY (dst_addr, time, gateway, seq)",
            FLOWS_BY_DST_MV,
        ],
    },
    Migration {
        version: 3,
        name: "uploader_metrics",
        sql: &[UPLOADER_METRICS],
    },
    // The table rebuild is code: `Store::raw_hashes`.
    Migration {
        version: 4,
        name: "raw_hashes",
        sql: &[],
    },
    // The index is created before the old copy goes: a destination query keeps an answer
    // throughout (flows inserted between the backfill and the view's creation are
    // backfilled again, collapsing onto the key).
    Migration {
        version: 5,
        name: "flows_by_dst_idx",
        sql: &[
            FLOWS_BY_DST_IDX,
            FLOWS_BY_DST_IDX_MV,
            "INSERT INTO {db}.flows_by_dst_idx (dst_addr, time, user, gateway, seq) \
             SELECT dst_addr, time, user, gateway, seq FROM {db}.events \
             WHERE kind IN ('flow_opened', 'flow_denied', 'flow_closed')",
            "DROP TABLE IF EXISTS {db}.flows_by_dst_mv",
            "DROP TABLE IF EXISTS {db}.flows_by_dst",
        ],
    },
    Migration {
        version: 6,
        name: "legal_holds",
        sql: &[LEGAL_HOLDS],
    },
];

/// The tables a cluster keeps as `<name>_local` (replicated) under a `Distributed` `<name>`.
const CLUSTER_TABLES: &[&str] = &[
    "events",
    "flows_by_dst_idx",
    "uploader_metrics",
    "legal_holds",
];

/// `uploader_metrics` as migration 3 made it.
const UPLOADER_METRICS: &str = "CREATE TABLE IF NOT EXISTS {db}.uploader_metrics (
            gateway String, time DateTime, backlog UInt64, lag_ms UInt64, batches UInt64,
            rows UInt64, errors UInt64, spool_bytes UInt64, refused UInt64
        ) ENGINE = MergeTree()
        PARTITION BY toYYYYMM(time)
        ORDER BY (gateway, time)";

/// A table's statement for the cluster: renamed `<table>_local`, with `engine`.
fn cluster_table(create: &str, table: &str, engine: &str) -> String {
    let renamed = create.replacen(
        &format!("{{db}}.{table} ("),
        &format!("{{db}}.{table}_local ("),
        1,
    );
    match renamed.split_once("ENGINE = ") {
        Some((head, tail)) => {
            let rest = tail.split_once(')').map_or("", |(_, r)| r);
            format!("{head}ENGINE = {engine}{rest}")
        }
        None => renamed,
    }
}

/// `CREATE … db.t …` → `CREATE … db.t ON CLUSTER c …` (after the first name).
fn on_cluster(stmt: &str, on: &str) -> String {
    let Some(at) = stmt.find("IF NOT EXISTS ") else {
        return stmt.to_string();
    };
    let name_start = at + "IF NOT EXISTS ".len();
    let name_end = stmt
        .get(name_start..)
        .and_then(|r| r.find([' ', '\n', '(']))
        .map_or(stmt.len(), |i| name_start + i);
    format!(
        "{} {on}{}",
        stmt.get(..name_end).unwrap_or_default(),
        stmt.get(name_end..).unwrap_or_default()
    )
}

/// Schema 6: legal holds, an append-only log (`add` and `remove` rows; a hold is active
/// while its `add` has no `remove`). Retention never drops it.
const LEGAL_HOLDS: &str = "CREATE TABLE IF NOT EXISTS {db}.legal_holds (
            id String, action String, user String, since DateTime, until DateTime,
            reason String, actor String, time DateTime
        ) ENGINE = MergeTree()
        ORDER BY (id, time)";

/// Schema 5's index table; see the module docs.
const FLOWS_BY_DST_IDX: &str = "CREATE TABLE IF NOT EXISTS {db}.flows_by_dst_idx (
            dst_addr FixedString(16), time DateTime, user String, gateway String, seq UInt64
        ) ENGINE = ReplacingMergeTree()
        PARTITION BY toYYYYMM(time)
        ORDER BY (dst_addr, time, gateway, seq)";

const FLOWS_BY_DST_IDX_MV: &str =
    "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.flows_by_dst_idx_mv TO {db}.flows_by_dst_idx AS
            SELECT dst_addr, time, user, gateway, seq
            FROM {db}.events WHERE kind IN ('flow_opened', 'flow_denied', 'flow_closed')";

const FLOWS_BY_DST_MV: &str =
    "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.flows_by_dst_mv TO {db}.flows_by_dst AS
            SELECT gateway, seq, time, time_us, kind, user, groups, device, session_id,
            protocol, src_ip, src_port, dst_ip, dst_addr, dst_port, network, decision,
            policy_ids, reason, duration_ms, bytes_out, packets_out, bytes_in, packets_in
            FROM {db}.events WHERE kind IN ('flow_opened', 'flow_denied', 'flow_closed')";

/// `events` from schema 4 on: the hashes as 32 raw bytes. Spelled out like migration 1's
/// table rather than built from [`COLUMNS`]: a migration is history and must create the
/// same table after later schemas change the columns.
const EVENTS_V4: &str = "CREATE TABLE IF NOT EXISTS {db}.events (
            event_id UUID, gateway String, seq UInt64, time DateTime, time_us UInt64, v UInt32,
            kind String, user String, groups Array(String), device String,
            session_id UInt64, flow_id UInt64, protocol String,
            src_ip String, src_port UInt16, dst_ip String, dst_addr FixedString(16), dst_port UInt16,
            network String, decision String, policy_ids Array(String), policy_epoch UInt64,
            reason String, duration_ms UInt64,
            bytes_out UInt64, packets_out UInt64, bytes_in UInt64, packets_in UInt64,
            latency_us UInt64, detail String, prev_hash FixedString(32), hash FixedString(32)
        ) ENGINE = ReplacingMergeTree()
        PARTITION BY toYYYYMM(time)
        ORDER BY (user, time, gateway, seq)";
