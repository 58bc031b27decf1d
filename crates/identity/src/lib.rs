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
//!   restart keeps them.
//! - [`Identity`]: the shared handle the sources use. A change is persisted, applied to
//!   the directory and queued to the core in one critical section (so the core sees
//!   changes in commit order), then awaited until the core has applied it: a SCIM or admin
//!   request answers only after the user's tunnels are cut. The commit holds only the
//!   writers' lock: readers never wait for SQLite.
//!
//! What it deliberately does not: no protocol (SCIM and LDAP have their own crates or
//! modules), no policy evaluation, no access to the data plane except through the queue.

pub mod devices;
pub mod directory;
pub mod store;
pub mod sync;

use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use portcullis_control::Apply;
use portcullis_control::Command;

use chrono::{DateTime, TimeDelta, Utc};
pub use devices::{
    profile, Device, DeviceError, DeviceMutation, DevicePolicy, Devices, Owner, ProfileSettings,
};
pub use directory::{check_name, Directory, DirectoryError, Group, Mutation, User};
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

/// Commits on a blocking thread, so the control plane's runtime serves other requests
/// (TLS handshakes among them) during the fsync; the writers' lock goes along and back.
async fn commit(
    mut store: tokio::sync::OwnedMutexGuard<SqliteStore>,
    m: Mutation,
    dm: DeviceMutation,
) -> Result<
    (
        tokio::sync::OwnedMutexGuard<SqliteStore>,
        Mutation,
        DeviceMutation,
    ),
    IdentityError,
> {
    let (store, m, dm, result) = tokio::task::spawn_blocking(move || {
        let result = store.commit_with_devices(&m, &dm);
        (store, m, dm, result)
    })
    .await
    .map_err(|e| IdentityError::Commit(e.to_string()))?;
    result?;
    Ok((store, m, dm))
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
    store: Arc<AsyncMutex<SqliteStore>>,
    core: mpsc::Sender<Command>,
    device_policy: Option<DevicePolicy>,
    /// Woken when a device changes, so the expiry timer can re-arm.
    devices_changed: tokio::sync::Notify,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

impl Identity {
    pub fn new(directory: Directory, store: SqliteStore, core: mpsc::Sender<Command>) -> Identity {
        Identity {
            state: Mutex::new(State {
                directory,
                devices: Devices::default(),
            }),
            store: Arc::new(AsyncMutex::new(store)),
            core,
            device_policy: None,
            devices_changed: tokio::sync::Notify::new(),
        }
    }

    /// Enables devices: the stored ones (read from the store) and the policy for new ones.
    pub fn with_devices(mut self, policy: DevicePolicy) -> Result<Identity, StoreError> {
        let records = match Arc::get_mut(&mut self.store) {
            Some(store) => store.get_mut().devices()?,
            None => self.store.blocking_lock().devices()?,
        };
        self.state
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .devices = Devices::from_records(records);
        self.device_policy = Some(policy);
        Ok(self)
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
        let store = self.store.clone().lock_owned().await;
        let (m, dm) = {
            let state = self.lock();
            let m = plan(&state.directory, requested_at)?;
            if m.is_empty() {
                return Ok(Committed::default());
            }
            // A deleted user's devices go in the same commit.
            let dm = state.devices.plan_users_removed(&m.removed_users);
            (m, dm)
        };
        // Access taken away is cut before the commit, not after its fsync.
        let revoking = revocations(&self.lock().directory, &m);
        if !revoking.is_empty() {
            self.core
                .send(Command::Revoke(portcullis_control::Revoke {
                    users: revoking,
                    source: source.to_string(),
                    requested,
                    requested_at,
                }))
                .await
                .map_err(|_| IdentityError::CoreGone)?;
        }
        let (store, m, dm) = commit(store, m, dm).await?;
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
        let store = self.store.clone().lock_owned().await;
        let (dm, out) = {
            let state = self.lock();
            plan(&state.directory, &state.devices, policy, requested_at)?
        };
        if dm.is_empty() {
            return Ok(out);
        }
        let (store, _, dm) = commit(store, Mutation::default(), dm).await?;
        let devices = self.lock().devices.apply(dm, Some(policy));
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
    /// devices are renewed up to `until` (capped by the configured lifetime). Returns
    /// the owner the user's new devices get; a disabled or unknown user is refused.
    pub async fn login(
        &self,
        source: &str,
        user: &str,
        groups: &[String],
        until: DateTime<Utc>,
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
                devices.plan_renew(policy, &owner.user_name, until, now),
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
        name: &str,
        lifetime: Option<TimeDelta>,
        requested: Instant,
        requested_at: DateTime<Utc>,
    ) -> Result<Device, IdentityError> {
        self.change_devices(requested, requested_at, |dir, devices, policy, now| {
            let owner = Self::owner(dir, policy, user)?;
            Ok(devices.plan_register(policy, owner, public_key, name, lifetime, now)?)
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
        store.commit_with_devices(&Mutation::default(), &dm)?;
        let mut state = self.lock();
        let gone: Vec<(Device, String)> = dm
            .removed
            .iter()
            .filter_map(|(id, why)| state.devices.get(id).cloned().map(|d| (d, why.clone())))
            .collect();
        state.devices.apply(dm, self.device_policy.as_ref());
        Ok(gone)
    }

    /// A sync source's saved state (e.g. the LDAP cookie).
    pub async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.store.lock().await.meta(key)
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.store.lock().await.set_meta(key, value)
    }
}
