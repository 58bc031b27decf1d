//! Where the directory and the devices are kept: the [`Store`] interface [`crate::Identity`]
//! writes through, with the single node's SQLite file behind it by default
//! ([`SqliteBackend`]) and the cluster's PostgreSQL in `portcullis-cluster`.
//!
//! A write is `begin` (a cluster takes its writers' lock and returns what other nodes
//! committed since, for the caller to apply before it plans), then `commit` or `abort`.
//! Writers are serialised cluster-wide, so every node applies the same changes in the
//! same order: its own as it commits them, the others' as [`Remote`]s.

use std::future::Future;
use std::pin::Pin;

use crate::devices::{Device, DeviceMutation};
use crate::directory::{Group, Mutation, User};
use crate::store::{SqliteStore, StoreError};

/// A boxed future, so that [`Store`] can be a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What another node committed, as this node applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Remote {
    /// One change of the log, in order.
    Change {
        number: i64,
        /// The identity source it came from (`scim`, `ldap`, `admin`, `saml`, ...).
        source: String,
        mutation: Mutation,
        devices: DeviceMutation,
    },
    /// The log no longer reaches back to this node's last change (it was trimmed): the
    /// whole state as of change `number`.
    Reload {
        number: i64,
        users: Vec<User>,
        groups: Vec<Group>,
        devices: Vec<Device>,
    },
    /// A change of the log that is not the directory's (a policy replacement): handed,
    /// in order, to whoever [`crate::Identity::forward_other`] names.
    Other {
        number: i64,
        kind: String,
        body: serde_json::Value,
    },
}

impl Remote {
    pub fn number(&self) -> i64 {
        match self {
            Remote::Change { number, .. }
            | Remote::Reload { number, .. }
            | Remote::Other { number, .. } => *number,
        }
    }
}

/// What a record write expects to replace: a conditional write stores nothing when the
/// stored record is another (a compare-and-swap: two nodes accepting the same one-time
/// code at once, one of them wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect<'a> {
    /// Whatever is stored (or nothing).
    Any,
    /// No record of that id.
    Absent,
    /// Exactly this body (JSON equality).
    Body(&'a serde_json::Value),
}

impl Expect<'_> {
    /// Whether `stored` is what is expected.
    pub fn matches(&self, stored: Option<&serde_json::Value>) -> bool {
        match (self, stored) {
            (Expect::Any, _) | (Expect::Absent, None) => true,
            (Expect::Body(want), Some(have)) => *want == have,
            _ => false,
        }
    }
}

/// The identity store's persistence. Calls are serialised by the caller (the writers'
/// lock of [`crate::Identity`]).
pub trait Store: Send + 'static {
    /// Starts a write; returns the changes committed elsewhere that this node has not
    /// applied, which the caller applies before it plans.
    fn begin(&mut self) -> BoxFuture<'_, Result<Vec<Remote>, StoreError>>;

    /// Writes `m` and `dm` as one transaction (attributed to `source`) and ends the write.
    /// On error nothing was written.
    fn commit<'a>(
        &'a mut self,
        source: &'a str,
        m: &'a Mutation,
        dm: &'a DeviceMutation,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Ends a write that writes nothing.
    fn abort(&mut self) -> BoxFuture<'_, ()>;

    /// The changes committed elsewhere that this node has not applied (catch-up after a
    /// notification, a reconnect or a timer), without taking the writers' lock.
    fn pending(&mut self) -> BoxFuture<'_, Result<Vec<Remote>, StoreError>>;

    /// Records that changes up to `number` are applied here.
    fn applied(&mut self, number: i64);

    /// The last change applied here: the other nodes' up to `pending`, this node's own
    /// up to its last `commit` (0 on a single node).
    fn last_applied(&self) -> i64 {
        0
    }

    /// The devices as loaded at start.
    fn initial_devices(&mut self) -> Result<Vec<Device>, StoreError>;

    /// The records of `kind` as loaded at start, once, when the store read them then
    /// (a cluster's snapshot); `None`: ask [`Store::records`].
    fn initial_records(&mut self, _kind: &str) -> Option<Vec<serde_json::Value>> {
        None
    }

    /// Whether other nodes share this store: expired devices are then swept by the one
    /// node holding the sweep's lease, not by each node at start.
    fn shared(&self) -> bool {
        false
    }

    /// Writes (or replaces) one record of another `kind` than the directory's (an access
    /// request: `portcullis-access` owns its format). In a cluster it is written under the
    /// writers' lock with a change of that kind, which every node (this one too) reads
    /// back as a [`Remote::Other`]. `false`: the stored record was not the `expect`ed
    /// one and nothing was written.
    fn save_record<'a>(
        &'a mut self,
        kind: &'a str,
        id: &'a str,
        body: &'a serde_json::Value,
        expect: Expect<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// One stored record of `kind`, if there is one.
    fn record<'a>(
        &'a mut self,
        kind: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<serde_json::Value>, StoreError>>;

    /// Every stored record of `kind`.
    fn records<'a>(
        &'a mut self,
        kind: &'a str,
    ) -> BoxFuture<'a, Result<Vec<serde_json::Value>, StoreError>>;

    /// A sync source's saved state (e.g. the LDAP cookie).
    fn meta<'a>(&'a mut self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>>;

    fn set_meta<'a>(
        &'a mut self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// The single node's SQLite file. Commits run on a blocking thread, so the control
/// plane's runtime serves other requests (TLS handshakes among them) during the fsync.
pub struct SqliteBackend {
    /// `None` only while a commit runs on the blocking thread.
    store: Option<SqliteStore>,
}

impl SqliteBackend {
    pub fn new(store: SqliteStore) -> SqliteBackend {
        SqliteBackend { store: Some(store) }
    }

    fn store(&mut self) -> Result<&mut SqliteStore, StoreError> {
        self.store.as_mut().ok_or_else(|| StoreError::Lost {
            reason: "an earlier commit's thread did not return".into(),
        })
    }
}

impl Store for SqliteBackend {
    fn begin(&mut self) -> BoxFuture<'_, Result<Vec<Remote>, StoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn commit<'a>(
        &'a mut self,
        _source: &'a str,
        m: &'a Mutation,
        dm: &'a DeviceMutation,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut store = self.store.take().ok_or_else(|| StoreError::Lost {
                reason: "an earlier commit's thread did not return".into(),
            })?;
            let (m, dm) = (m.clone(), dm.clone());
            let joined = tokio::task::spawn_blocking(move || {
                let result = store.commit_with_devices(&m, &dm);
                (store, result)
            })
            .await;
            match joined {
                Ok((store, result)) => {
                    self.store = Some(store);
                    result
                }
                Err(e) => Err(StoreError::Lost {
                    reason: e.to_string(),
                }),
            }
        })
    }

    fn abort(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn pending(&mut self) -> BoxFuture<'_, Result<Vec<Remote>, StoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn applied(&mut self, _number: i64) {}

    fn initial_devices(&mut self) -> Result<Vec<Device>, StoreError> {
        self.store()?.devices()
    }

    fn save_record<'a>(
        &'a mut self,
        kind: &'a str,
        id: &'a str,
        body: &'a serde_json::Value,
        expect: Expect<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { self.store()?.save_record(kind, id, body, expect) })
    }

    fn records<'a>(
        &'a mut self,
        kind: &'a str,
    ) -> BoxFuture<'a, Result<Vec<serde_json::Value>, StoreError>> {
        Box::pin(async move { self.store()?.records(kind) })
    }

    fn record<'a>(
        &'a mut self,
        kind: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<serde_json::Value>, StoreError>> {
        Box::pin(async move { self.store()?.record(kind, id) })
    }

    fn meta<'a>(&'a mut self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move { self.store()?.meta(key) })
    }

    fn set_meta<'a>(
        &'a mut self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.store()?.set_meta(key, value) })
    }
}
