//! The identity store: users, groups, membership and tags as the identity sources (SCIM,
//! LDAP, administrators) describe them, turned into the policy principals and into the
//! [`IdentityChange`]s the gateway core applies (grant, re-decide, revoke).
//!
//! What it does:
//! - [`Directory`] (sans-IO): users with stable ids (a user deleted and created again
//!   under the same name is a new user, with none of the old memberships), groups,
//!   membership; every change is planned into a [`Mutation`], persisted, then applied,
//!   which yields one [`IdentityChange`] per user whose principal changed.
//! - [`SqliteStore`]: the directory on disk (format in [`store`]), so a restart keeps it.
//! - [`Identity`]: the shared handle the sources use. A change is persisted, applied to
//!   the directory and queued to the core in one critical section (so the core sees
//!   changes in commit order), then awaited until the core has applied it: a SCIM or admin
//!   request answers only after the user's tunnels are cut.
//!
//! What it deliberately does not: no protocol (SCIM and LDAP have their own crates or
//! modules), no policy evaluation, no access to the data plane except through the queue.

pub mod directory;
pub mod store;
pub mod sync;

use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};
pub use directory::{check_name, Directory, DirectoryError, Group, Mutation, User};
use portcullis_model::IdentityChange;
pub use store::{SqliteStore, StoreError};
pub use sync::{SyncPlan, SyncScope, SyncedGroup, SyncedUser};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Changes for the core to apply, with when their request arrived; `done` is answered
/// once the core has applied them all.
#[derive(Debug)]
pub struct Apply {
    pub changes: Vec<IdentityChange>,
    pub requested: Instant,
    pub requested_at: DateTime<Utc>,
    pub done: oneshot::Sender<()>,
}

/// Errors of [`Identity::change`].
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the gateway core is not running; the change is stored but not applied")]
    CoreGone,
}

/// What a committed change wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    pub users: Vec<Uuid>,
    pub groups: Vec<Uuid>,
    /// How many users' access changed.
    pub changes: usize,
}

struct State {
    directory: Directory,
    store: SqliteStore,
}

/// The directory shared by the identity sources, with the queue to the core.
pub struct Identity {
    state: Mutex<State>,
    core: mpsc::UnboundedSender<Apply>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

impl Identity {
    pub fn new(
        directory: Directory,
        store: SqliteStore,
        core: mpsc::UnboundedSender<Apply>,
    ) -> Identity {
        Identity {
            state: Mutex::new(State { directory, store }),
            core,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change: the store
        // commits first, the directory applies infallibly.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the directory.
    pub fn read<R>(&self, f: impl FnOnce(&Directory) -> R) -> R {
        f(&self.lock().directory)
    }

    /// Plans a change on the current directory, persists it, applies it and waits until
    /// the core has applied the resulting access changes.
    ///
    /// `plan` runs under the directory lock, so a read-modify-write (a SCIM PATCH) cannot
    /// lose a concurrent change; its error type is the caller's.
    pub async fn change<E: From<IdentityError>>(
        &self,
        source: &str,
        requested: Instant,
        requested_at: DateTime<Utc>,
        plan: impl FnOnce(&Directory, DateTime<Utc>) -> Result<Mutation, E>,
    ) -> Result<Committed, E> {
        let done = {
            let mut state = self.lock();
            let m = plan(&state.directory, requested_at)?;
            if m.is_empty() {
                return Ok(Committed::default());
            }
            state.store.commit(&m).map_err(IdentityError::from)?;
            let mut committed = Committed {
                users: m.users.iter().map(|u| u.id).collect(),
                groups: m.groups.iter().map(|g| g.id).collect(),
                changes: 0,
            };
            let changes = state.directory.apply(m, source);
            committed.changes = changes.len();
            if changes.is_empty() {
                return Ok(committed);
            }
            let (tx, rx) = oneshot::channel();
            // Sent while the lock is held: the core applies changes in commit order.
            self.core
                .send(Apply {
                    changes,
                    requested,
                    requested_at,
                    done: tx,
                })
                .map_err(|_| IdentityError::CoreGone)?;
            (rx, committed)
        };
        let (rx, committed) = done;
        rx.await.map_err(|_| IdentityError::CoreGone)?;
        Ok(committed)
    }

    /// A sync source's saved state (e.g. the LDAP cookie).
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.lock().store.meta(key)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.lock().store.set_meta(key, value)
    }
}
