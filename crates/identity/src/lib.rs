//! The identity store: users, groups, membership and tags as the identity sources (SCIM,
//! LDAP, administrators) describe them, turned into the policy principals and into the
//! [`IdentityChange`]s the gateway core applies (grant, re-decide, revoke).
//!
//! What it does:
//! - [`Directory`] (sans-IO): users with stable ids (a user deleted and created again
//!   under the same name is a new user, with none of the old memberships), groups,
//!   membership; every change is planned into a [`Mutation`], persisted, then applied,
//!   which yields one [`IdentityChange`] per user whose principal changed.
//! - [`Devices`] (sans-IO): users' WireGuard keys with their pool address and expiry,
//!   registered, rotated (with a grace period for the old key), expired and removed.
//! - [`SqliteStore`]: the directory and the devices on disk (format in [`store`]), so a
//!   restart keeps them; [`Store`] is the interface the cluster's PostgreSQL store
//!   implements too (`portcullis-cluster`), and [`Remote`] what other nodes committed.
//! - [`Identity`]: the shared handle the sources use. A change is persisted, applied to
//!   the directory and queued to the core in one critical section (so the core sees
//!   changes in commit order), then awaited until the core has applied it: a SCIM or admin
//!   request answers only after the user's tunnels are cut. The commit holds only the
//!   writers' lock: readers never wait for SQLite.
//!
//! What it deliberately does not: no protocol (SCIM and LDAP have their own crates or
//! modules), no policy evaluation, no access to the data plane except through the queue.

pub mod backend;
pub mod devices;
pub mod directory;
pub mod pending;
pub mod store;
pub mod sync;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use portcullis_control::Apply;
use portcullis_control::Command;

pub use backend::{Expect, Remote, SqliteBackend, Store};
use chrono::{DateTime, TimeDelta, Utc};
pub use devices::{
    profile, Device, DeviceError, DeviceMutation, DevicePolicy, Devices, NewDevice, Owner,
    ProfileSettings, SitePeer,
};
pub use directory::{check_name, Directory, DirectoryError, Group, Mutation, User};
pub use portcullis_model::SignOn;
use portcullis_model::{DeviceChange, IdentityChange};
pub use store::{SqliteStore, StoreError};
pub use sync::{SyncPlan, SyncScope, SyncedGroup, SyncedUser};
use tokio::sync::Mutex as AsyncMutex;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Errors of [`Identity::change`].
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("no [devices] section is configured")]
    NoDevices,
    #[error("the gateway core is not running; the change is stored but not applied")]
    CoreGone,
    #[error("the identity store's commit did not complete: {0}")]
    Commit(String),
}

impl IdentityError {
    /// Whether the change was refused only because the store is unreachable (a SCIM
    /// client should retry: 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, IdentityError::Store(e) if e.is_unavailable())
    }
}

/// The active users `m` deactivates or deletes (by name).
fn revocations(directory: &Directory, m: &Mutation) -> Vec<String> {
    let deactivated = m
        .users
        .iter()
        .filter(|u| !u.active)
        .filter_map(|u| directory.user(&u.id).filter(|old| old.active));
    let deleted = m
        .removed_users
        .iter()
        .filter_map(|id| directory.user(id).filter(|old| old.active));
    deactivated
        .chain(deleted)
        .map(|u| u.user_name.clone())
        .collect()
}

/// What a committed change wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    pub users: Vec<Uuid>,
    pub groups: Vec<Uuid>,
    /// How many users' access changed.
    pub changes: usize,
}

/// What readers see: held only for a plan, an apply or a read, never across a commit.
struct State {
    directory: Directory,
    devices: Devices,
}

/// The directory shared by the identity sources, with the queue to the core.
///
/// Two locks: `store` serialises writers (taken first, held across the SQLite commit
/// and the hand-off to the core, so the core sees changes in commit order); `state` is
/// taken briefly to plan and to apply. A reader (the admin API listing users, the
/// expiry timer) waits for neither a commit nor its fsync. Every mutation of `state`
/// happens with `store` held, so a plan made under `store` stays valid until applied.
pub struct Identity {
    state: Mutex<State>,
    store: Arc<AsyncMutex<Box<dyn Store>>>,
    /// The last change number applied here (0 on a single node).
    applied: AtomicI64,
    core: mpsc::Sender<Command>,
    device_policy: Option<DevicePolicy>,
    /// Woken when a device changes, so the expiry timer can re-arm.
    devices_changed: tokio::sync::Notify,
    /// Where changes of the log that are not the directory's go (see [`Remote::Other`]).
    others: Mutex<Vec<mpsc::UnboundedSender<OtherChange>>>,
    /// In a cluster: revocations accepted while the database was unreachable.
    pending: Option<Mutex<pending::PendingFile>>,
}

/// A change of the cluster's log that is not the directory's, in log order.
#[derive(Clone, Debug, PartialEq)]
pub struct OtherChange {
    pub number: i64,
    pub kind: String,
    pub body: serde_json::Value,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

impl Identity {
    pub fn new(directory: Directory, store: SqliteStore, core: mpsc::Sender<Command>) -> Identity {
        Identity::with_store(directory, Box::new(SqliteBackend::new(store)), core)
    }

    /// An identity on any store (the cluster's, or SQLite's); `directory` is what the
    /// store held at start.
    pub fn with_store(
        directory: Directory,
        store: Box<dyn Store>,
        core: mpsc::Sender<Command>,
    ) -> Identity {
        Identity {
            state: Mutex::new(State {
                directory,
                devices: Devices::default(),
            }),
            store: Arc::new(AsyncMutex::new(store)),
            applied: AtomicI64::new(0),
            core,
            device_policy: None,
            devices_changed: tokio::sync::Notify::new(),
            others: Mutex::new(Vec::new()),
            pending: None,
        }
    }

    /// Keeps revocations accepted during a database outage in `file` (a cluster node),
    /// and applies those a previous run kept but did not commit yet: they stay in effect
    /// here from the first packet on, and are committed once the database answers.
    pub fn with_pending(mut self, file: pending::PendingFile) -> Identity {
        {
            let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
            for p in file.entries() {
                state.directory.apply(p.mutation.clone(), &p.source);
                state
                    .devices
                    .apply(p.devices.clone(), self.device_policy.as_ref());
            }
            if !file.is_empty() {
                tracing::warn!(
                    changes = file.entries().len(),
                    "revocations from before a restart are not in the cluster yet: in effect here, committed when the database answers"
                );
            }
        }
        self.pending = Some(Mutex::new(file));
        self
    }

    fn pending_entries(&self) -> Vec<pending::PendingChange> {
        self.pending
            .as_ref()
            .map(|p| {
                p.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entries()
                    .to_vec()
            })
            .unwrap_or_default()
    }

    /// Commits the revocations kept during an outage, in order; stops at the first the
    /// database still cannot take. Called with `store` held.
    async fn flush_pending(&self, store: &mut dyn Store) {
        let entries = self.pending_entries();
        if entries.is_empty() {
            return;
        }
        let mut done = 0;
        for p in &entries {
            let remote = match store.begin().await {
                Ok(r) => r,
                Err(_) => break,
            };
            if self.apply_remote(store, remote).await.is_err() {
                store.abort().await;
                break;
            }
            match store.commit(&p.source, &p.mutation, &p.devices).await {
                Ok(()) => {
                    self.note_applied(store);
                    done += 1;
                }
                Err(e) if e.is_unavailable() => break,
                Err(e) => {
                    // Refused for good (not for unavailability): it stays in effect here.
                    tracing::error!(source = %p.source, "a revocation kept during an outage was refused by the cluster and is dropped (it stays in effect on this node until the user changes): {e}");
                    done += 1;
                }
            }
        }
        if done == 0 {
            return;
        }
        if let Some(file) = &self.pending {
            let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
            match file.committed(done) {
                Ok(()) => tracing::info!(
                    changes = done,
                    "revocations kept during the outage committed to the cluster"
                ),
                Err(e) => tracing::error!("{e}"),
            }
        }
    }

    fn keep_pending(&self, p: pending::PendingChange) -> Result<(), StoreError> {
        match &self.pending {
            Some(file) => file.lock().unwrap_or_else(|e| e.into_inner()).push(p),
            None => Err(StoreError::Lost {
                reason: "no pending revocations file".into(),
            }),
        }
    }

    /// Hands the log's other changes (policy replacements, access requests) to `to`, in
    /// order, from now on; every receiver gets every change and picks its kinds.
    pub fn forward_other(&self, to: mpsc::UnboundedSender<OtherChange>) {
        self.others
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(to);
    }

    /// Enables devices: the stored ones (read from the store) and the policy for new ones.
    pub fn with_devices(mut self, policy: DevicePolicy) -> Result<Identity, StoreError> {
        let records = match Arc::get_mut(&mut self.store) {
            Some(store) => store.get_mut().initial_devices()?,
            None => self.store.blocking_lock().initial_devices()?,
        };
        self.state
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .devices = Devices::from_records(records);
        self.device_policy = Some(policy);
        Ok(self)
    }

    /// Starts counting applied changes at `number` (what the store held at start).
    pub fn starting_at(self, number: i64) -> Identity {
        self.applied.store(number, Ordering::Relaxed);
        self
    }

    /// The last change number applied here (a cluster node's heartbeat reports it).
    pub fn applied_change(&self) -> i64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Applies what other nodes committed since this node's last change (after a
    /// notification, a reconnect, or on a timer); returns how many changes.
    pub async fn catch_up(&self) -> Result<usize, IdentityError> {
        let mut store = self.store.lock().await;
        self.flush_pending(&mut **store).await;
        let remote = store.pending().await?;
        let n = remote.len();
        self.apply_remote(&mut **store, remote).await?;
        Ok(n)
    }

    /// Applies changes of other nodes in order and queues their access changes to the
    /// core (not awaited: the core applies its queue in order). Called with `store` held.
    async fn apply_remote(
        &self,
        store: &mut dyn Store,
        remote: Vec<Remote>,
    ) -> Result<(), IdentityError> {
        let mut batch: (Vec<IdentityChange>, Vec<DeviceChange>) = (Vec::new(), Vec::new());
        for r in remote {
            let number = r.number();
            if let Remote::Other { kind, body, .. } = r {
                let change = OtherChange { number, kind, body };
                self.others
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|to| to.send(change.clone()).is_ok());
                store.applied(number);
                self.applied.store(number, Ordering::Relaxed);
                continue;
            }
            let (changes, devices) = {
                let mut state = self.lock();
                let (m, dm, source) = match r {
                    Remote::Change {
                        source,
                        mutation,
                        devices,
                        ..
                    } => (mutation, devices, source),
                    Remote::Reload {
                        users,
                        groups,
                        devices,
                        ..
                    } => {
                        tracing::warn!(
                            number,
                            "the change log was trimmed past this node's last change: reloading the directory"
                        );
                        // A key this node already expired on its own stays out.
                        let now = Utc::now();
                        let devices = devices.into_iter().filter(|d| d.expires > now).collect();
                        (
                            state.directory.plan_replace(users, groups),
                            state.devices.plan_replace(devices),
                            "cluster".to_string(),
                        )
                    }
                    Remote::Other { .. } => continue,
                };
                let changes = state.directory.apply(m, &source);
                let devices = state.devices.apply(dm, self.device_policy.as_ref());
                (changes, devices)
            };
            store.applied(number);
            self.applied.store(number, Ordering::Relaxed);
            batch.0.extend(changes);
            if !devices.is_empty() {
                self.devices_changed.notify_one();
                // The core applies an Apply's access changes before its peers: a batch
                // ends with the change whose peers changed, so the order holds.
                batch.1.extend(devices);
                self.hand_off_batch(&mut batch).await?;
            }
        }
        self.hand_off_batch(&mut batch).await
    }

    /// Queues the batched access and peer changes to the core as one `Apply` (one audit
    /// flush, not one per change: a node catching up 10,000 changes is not held to one
    /// fsync each). Not awaited: the core applies its queue in order.
    async fn hand_off_batch(
        &self,
        batch: &mut (Vec<IdentityChange>, Vec<DeviceChange>),
    ) -> Result<(), IdentityError> {
        if batch.0.is_empty() && batch.1.is_empty() {
            return Ok(());
        }
        let (changes, devices) = std::mem::take(batch);
        let _done = self
            .hand_off(changes, devices, Instant::now(), Utc::now())
            .await?;
        Ok(())
    }

    pub fn device_policy(&self) -> Option<&DevicePolicy> {
        self.device_policy.as_ref()
    }

    /// Reads the devices.
    pub fn read_devices<R>(&self, f: impl FnOnce(&Devices) -> R) -> R {
        f(&self.lock().devices)
    }

    /// Woken whenever a device is registered, rotated or removed.
    pub fn devices_changed(&self) -> &tokio::sync::Notify {
        &self.devices_changed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change: the store
        // commits first (outside this lock), the directory applies infallibly.
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
        let mut store = self.store.clone().lock_owned().await;
        self.flush_pending(&mut **store).await;
        // Without the database only a revocation goes ahead (kept here until it is back).
        let offline = match store.begin().await {
            Ok(remote) => {
                if let Err(e) = self.apply_remote(&mut **store, remote).await {
                    store.abort().await;
                    return Err(e.into());
                }
                None
            }
            Err(e) if e.is_unavailable() && self.pending.is_some() => Some(e),
            Err(e) => return Err(IdentityError::from(e).into()),
        };
        let planned = {
            let state = self.lock();
            plan(&state.directory, requested_at).map(|m| {
                // A deleted user's devices go in the same commit.
                let dm = state.devices.plan_users_removed(&m.removed_users);
                (m, dm)
            })
        };
        let (m, dm) = match planned {
            Ok((m, dm)) if !m.is_empty() => (m, dm),
            Ok(_) => {
                if offline.is_none() {
                    store.abort().await;
                }
                return Ok(Committed::default());
            }
            Err(e) => {
                if offline.is_none() {
                    store.abort().await;
                }
                return Err(e);
            }
        };
        // Access taken away is cut before the commit, not after its fsync.
        let revoking = revocations(&self.lock().directory, &m);
        if let Some(e) = offline.as_ref().filter(|_| revoking.is_empty()) {
            return Err(IdentityError::Store(StoreError::Unavailable {
                reason: e.to_string(),
            })
            .into());
        }
        if !revoking.is_empty() {
            let sent = self
                .core
                .send(Command::Revoke(portcullis_control::Revoke {
                    users: revoking.clone(),
                    source: source.to_string(),
                    requested,
                    requested_at,
                }))
                .await;
            if sent.is_err() {
                if offline.is_none() {
                    store.abort().await;
                }
                return Err(IdentityError::CoreGone.into());
            }
        }
        let stored = match offline {
            Some(e) => Err(e),
            None => store.commit(source, &m, &dm).await,
        };
        match stored {
            Ok(()) => {}
            Err(e) if e.is_unavailable() && !revoking.is_empty() && self.pending.is_some() => {
                self.keep_pending(pending::PendingChange {
                    source: source.to_string(),
                    requested_at,
                    mutation: m.clone(),
                    devices: dm.clone(),
                })
                .map_err(IdentityError::from)?;
                tracing::warn!(users = ?revoking, "cluster database unreachable: the revocation is in effect on this node and kept until the database is back ({e})");
            }
            Err(e) => return Err(IdentityError::from(e).into()),
        }
        let mut committed = Committed {
            users: m.users.iter().map(|u| u.id).collect(),
            groups: m.groups.iter().map(|g| g.id).collect(),
            changes: 0,
        };
        let (changes, devices) = {
            let mut state = self.lock();
            let changes = state.directory.apply(m, source);
            let devices = state.devices.apply(dm, self.device_policy.as_ref());
            (changes, devices)
        };
        self.note_applied(&**store);
        committed.changes = changes.len();
        if changes.is_empty() && devices.is_empty() {
            return Ok(committed);
        }
        if !devices.is_empty() {
            self.devices_changed.notify_one();
        }
        let rx = self
            .hand_off(changes, devices, requested, requested_at)
            .await?;
        drop(store);
        rx.await.map_err(|_| IdentityError::CoreGone)?;
        Ok(committed)
    }

    fn note_applied(&self, store: &dyn Store) {
        self.applied.store(store.last_applied(), Ordering::Relaxed);
    }

    /// Queues applied changes to the core; called with `store` held, so the core sees
    /// them in commit order. A full queue waits here (on the control plane's thread).
    async fn hand_off(
        &self,
        changes: Vec<IdentityChange>,
        devices: Vec<DeviceChange>,
        requested: Instant,
        requested_at: DateTime<Utc>,
    ) -> Result<oneshot::Receiver<()>, IdentityError> {
        let (tx, rx) = oneshot::channel();
        self.core
            .send(Command::Apply(Apply {
                changes,
                devices,
                requested,
                requested_at,
                done: tx,
            }))
            .await
            .map_err(|_| IdentityError::CoreGone)?;
        Ok(rx)
    }

    /// Plans a device change under the lock (with the directory, to resolve owners),
    /// persists it, applies it and waits until the core has added or removed the peers.
    /// Returns what `plan` returned next to the mutation.
    pub async fn change_devices<T>(
        &self,
        requested: Instant,
        requested_at: DateTime<Utc>,
        plan: impl FnOnce(
            &Directory,
            &Devices,
            &DevicePolicy,
            DateTime<Utc>,
        ) -> Result<(DeviceMutation, T), IdentityError>,
    ) -> Result<T, IdentityError> {
        let policy = self
            .device_policy
            .as_ref()
            .ok_or(IdentityError::NoDevices)?;
        let mut store = self.store.clone().lock_owned().await;
        self.flush_pending(&mut **store).await;
        let remote = store.begin().await?;
        if let Err(e) = self.apply_remote(&mut **store, remote).await {
            store.abort().await;
            return Err(e);
        }
        let planned = {
            let state = self.lock();
            plan(&state.directory, &state.devices, policy, requested_at)
        };
        let (dm, out) = match planned {
            Ok((dm, out)) if !dm.is_empty() => (dm, out),
            Ok((_, out)) => {
                store.abort().await;
                return Ok(out);
            }
            Err(e) => {
                store.abort().await;
                return Err(e);
            }
        };
        store.commit("devices", &Mutation::default(), &dm).await?;
        let devices = self.lock().devices.apply(dm, Some(policy));
        self.note_applied(&**store);
        self.devices_changed.notify_one();
        let rx = self
            .hand_off(Vec::new(), devices, requested, requested_at)
            .await?;
        drop(store);
        rx.await.map_err(|_| IdentityError::CoreGone)?;
        Ok(out)
    }

    /// Resolves the owner of a new device: an active directory user, or a user of the
    /// configuration file.
    pub fn owner(
        directory: &Directory,
        policy: &DevicePolicy,
        name: &str,
    ) -> Result<Owner, DeviceError> {
        if let Some(u) = directory.user_by_name(name) {
            if !u.active {
                return Err(DeviceError::NoSuchUser(name.to_string()));
            }
            return Ok(Owner {
                user_name: u.user_name.clone(),
                user_id: Some(u.id),
            });
        }
        policy
            .config_users
            .iter()
            .find(|c| c.eq_ignore_ascii_case(name))
            .map(|c| Owner {
                user_name: c.clone(),
                user_id: None,
            })
            .ok_or_else(|| DeviceError::NoSuchUser(name.to_string()))
    }

    /// A single sign-on login by `user` with the asserted `groups`, valid until `until`:
    /// the directory follows the login (see [`Directory::plan_login`]), then the user's
    /// devices are renewed up to `until` (capped by the configured lifetime) and given
    /// the login's `sign_on`. Returns the owner the user's new devices get; a disabled
    /// or unknown user is refused.
    #[allow(clippy::too_many_arguments)]
    pub async fn login(
        &self,
        source: &str,
        user: &str,
        groups: &[String],
        until: DateTime<Utc>,
        sign_on: SignOn,
        requested: Instant,
        requested_at: DateTime<Utc>,
    ) -> Result<Owner, IdentityError> {
        self.change(source, requested, requested_at, |d, now| {
            Ok::<_, IdentityError>(d.plan_login(user, groups, source, now)?)
        })
        .await?;
        self.change_devices(requested, requested_at, |dir, devices, policy, now| {
            let owner = Self::owner(dir, policy, user)?;
            Ok((
                devices.plan_renew(policy, &owner.user_name, until, sign_on, now),
                owner,
            ))
        })
        .await
    }

    /// Registers `public_key` for user `user` (see [`Devices::plan_register`]).
    pub async fn register_device(
        &self,
        user: &str,
        public_key: [u8; 32],
        new: &NewDevice,
        requested: Instant,
        requested_at: DateTime<Utc>,
    ) -> Result<Device, IdentityError> {
        self.change_devices(requested, requested_at, |dir, devices, policy, now| {
            let owner = Self::owner(dir, policy, user)?;
            Ok(devices.plan_register(policy, owner, public_key, new, now)?)
        })
        .await
    }

    /// Rotates device `id` to `public_key`; returns the new device.
    pub async fn rotate_device(
        &self,
        id: &Uuid,
        public_key: [u8; 32],
        grace: Option<TimeDelta>,
        requested: Instant,
        requested_at: DateTime<Utc>,
    ) -> Result<Device, IdentityError> {
        self.change_devices(requested, requested_at, |_, devices, policy, now| {
            Ok(devices.plan_rotate(policy, id, public_key, grace, now)?)
        })
        .await
    }

    /// Removes device `id` (its sessions and flows are cut).
    pub async fn remove_device(
        &self,
        id: &Uuid,
        requested: Instant,
        requested_at: DateTime<Utc>,
    ) -> Result<Device, IdentityError> {
        self.change_devices(requested, requested_at, |_, devices, _, _| {
            let device = devices
                .get(id)
                .cloned()
                .ok_or_else(|| DeviceError::NoSuchDevice(id.to_string()))?;
            Ok((devices.plan_remove(id, "removed")?, device))
        })
        .await
    }

    /// Removes every device expired at `now`; returns how many.
    pub async fn expire_devices(
        &self,
        requested: Instant,
        now: DateTime<Utc>,
    ) -> Result<usize, IdentityError> {
        self.change_devices(requested, now, |_, devices, _, now| {
            let m = devices.plan_expire(now);
            let n = m.removed.len();
            Ok((m, n))
        })
        .await
    }

    /// Stops accepting every device expired at `now` on this node only, without
    /// writing to the store: a cluster node that does not hold the sweep's lease (or
    /// cannot reach the database) never lets an expired key in; the lease holder's
    /// removal follows through the change log. Returns how many.
    pub async fn expire_locally(
        &self,
        requested: Instant,
        now: DateTime<Utc>,
    ) -> Result<usize, IdentityError> {
        let store = self.store.lock().await;
        let devices = {
            let mut state = self.lock();
            let dm = state.devices.plan_expire(now);
            if dm.is_empty() {
                return Ok(0);
            }
            state.devices.apply(dm, self.device_policy.as_ref())
        };
        let n = devices.len();
        self.devices_changed.notify_one();
        let rx = self.hand_off(Vec::new(), devices, requested, now).await?;
        drop(store);
        rx.await.map_err(|_| IdentityError::CoreGone)?;
        Ok(n)
    }

    /// At start, before the core runs: removes the devices that expired while the
    /// gateway was down and returns them (the caller records their removal), so an
    /// expired key is never accepted, not even briefly.
    pub async fn take_expired(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(Device, String)>, StoreError> {
        let mut store = self.store.lock().await;
        let dm = self.lock().devices.plan_expire(now);
        if dm.is_empty() {
            return Ok(Vec::new());
        }
        let shared = store.shared();
        if !shared {
            store.begin().await?;
            store.commit("devices", &Mutation::default(), &dm).await?;
        }
        let mut state = self.lock();
        let gone: Vec<(Device, String)> = dm
            .removed
            .iter()
            .filter_map(|(id, why)| state.devices.get(id).cloned().map(|d| (d, why.clone())))
            .collect();
        state.devices.apply(dm, self.device_policy.as_ref());
        // In a cluster the node holding the sweep's lease removes them from the shared
        // store and records it; this node only stops accepting them at once.
        Ok(if shared { Vec::new() } else { gone })
    }

    /// Writes a record another crate owns the format of (see [`Store::save_record`]).
    pub async fn save_record(
        &self,
        kind: &str,
        id: &str,
        body: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.store
            .lock()
            .await
            .save_record(kind, id, body, Expect::Any)
            .await
            .map(|_| ())
    }

    /// Replaces a record only if the stored one is still `expect` (see [`Expect`]);
    /// `false`: another writer came first and nothing was written.
    pub async fn replace_record(
        &self,
        kind: &str,
        id: &str,
        body: &serde_json::Value,
        expect: Expect<'_>,
    ) -> Result<bool, StoreError> {
        self.store
            .lock()
            .await
            .save_record(kind, id, body, expect)
            .await
    }

    /// One stored record of `kind`.
    pub async fn record(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        self.store.lock().await.record(kind, id).await
    }

    /// The records of `kind` for the packet loop's start: what the store read at its
    /// open when it did (a cluster node must not connect from the data plane's
    /// runtime), else read now.
    pub async fn startup_records(&self, kind: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut store = self.store.lock().await;
        match store.initial_records(kind) {
            Some(r) => Ok(r),
            None => store.records(kind).await,
        }
    }

    /// Every stored record of `kind`.
    pub async fn records(&self, kind: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        self.store.lock().await.records(kind).await
    }

    pub async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.store.lock().await.meta(key).await
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.store.lock().await.set_meta(key, value).await
    }
}
