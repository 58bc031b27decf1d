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
//!   request answers only after the user's tunnels are cut.
//!
//! What it deliberately does not: no protocol (SCIM and LDAP have their own crates or
//! modules), no policy evaluation, no access to the data plane except through the queue.

pub mod devices;
pub mod directory;
pub mod store;
pub mod sync;

use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};
pub use devices::{
    profile, Device, DeviceError, DeviceMutation, DevicePolicy, Devices, Owner, ProfileSettings,
};
pub use directory::{check_name, Directory, DirectoryError, Group, Mutation, User};
use portcullis_model::{DeviceChange, IdentityChange};
pub use store::{SqliteStore, StoreError};
pub use sync::{SyncPlan, SyncScope, SyncedGroup, SyncedUser};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Changes for the core to apply, with when their request arrived; `done` is answered
/// once the core has applied them all.
#[derive(Debug)]
pub struct Apply {
    pub changes: Vec<IdentityChange>,
    /// Peers to add or remove, after `changes`.
    pub devices: Vec<DeviceChange>,
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
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("no [devices] section is configured")]
    NoDevices,
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
    devices: Devices,
    store: SqliteStore,
}

/// The directory shared by the identity sources, with the queue to the core.
pub struct Identity {
    state: Mutex<State>,
    core: mpsc::UnboundedSender<Apply>,
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
    pub fn new(
        directory: Directory,
        store: SqliteStore,
        core: mpsc::UnboundedSender<Apply>,
    ) -> Identity {
        Identity {
            state: Mutex::new(State {
                directory,
                devices: Devices::default(),
                store,
            }),
            core,
            device_policy: None,
            devices_changed: tokio::sync::Notify::new(),
        }
    }

    /// Enables devices: the stored ones (read from the store) and the policy for new ones.
    pub fn with_devices(mut self, policy: DevicePolicy) -> Result<Identity, StoreError> {
        {
            let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
            state.devices = Devices::from_records(state.store.devices()?);
        }
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
            // A deleted user's devices go in the same commit.
            let dm = state.devices.plan_users_removed(&m.removed_users);
            state
                .store
                .commit_with_devices(&m, &dm)
                .map_err(IdentityError::from)?;
            let mut committed = Committed {
                users: m.users.iter().map(|u| u.id).collect(),
                groups: m.groups.iter().map(|g| g.id).collect(),
                changes: 0,
            };
            let changes = state.directory.apply(m, source);
            let devices = state.devices.apply(dm, self.device_policy.as_ref());
            committed.changes = changes.len();
            if changes.is_empty() && devices.is_empty() {
                return Ok(committed);
            }
            if !devices.is_empty() {
                self.devices_changed.notify_one();
            }
            let (tx, rx) = oneshot::channel();
            // Sent while the lock is held: the core applies changes in commit order.
            self.core
                .send(Apply {
                    changes,
                    devices,
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
        let (rx, out) = {
            let mut state = self.lock();
            let (dm, out) = plan(&state.directory, &state.devices, policy, requested_at)?;
            if dm.is_empty() {
                return Ok(out);
            }
            state.store.commit_with_devices(&Mutation::default(), &dm)?;
            let devices = state.devices.apply(dm, Some(policy));
            self.devices_changed.notify_one();
            let (tx, rx) = oneshot::channel();
            self.core
                .send(Apply {
                    changes: Vec::new(),
                    devices,
                    requested,
                    requested_at,
                    done: tx,
                })
                .map_err(|_| IdentityError::CoreGone)?;
            (rx, out)
        };
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
    pub fn take_expired(&self, now: DateTime<Utc>) -> Result<Vec<(Device, String)>, StoreError> {
        let mut state = self.lock();
        let dm = state.devices.plan_expire(now);
        if dm.is_empty() {
            return Ok(Vec::new());
        }
        state.store.commit_with_devices(&Mutation::default(), &dm)?;
        let gone: Vec<(Device, String)> = dm
            .removed
            .iter()
            .filter_map(|(id, why)| state.devices.get(id).cloned().map(|d| (d, why.clone())))
            .collect();
        state.devices.apply(dm, self.device_policy.as_ref());
        Ok(gone)
    }

    /// A sync source's saved state (e.g. the LDAP cookie).
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.lock().store.meta(key)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.lock().store.set_meta(key, value)
    }
}
