//! Devices: the WireGuard keys users register, each with a tunnel address from the pool
//! and an expiry. Sans-IO like the directory: changes are planned ([`DeviceMutation`]),
//! persisted by the caller, then applied, which yields the [`DeviceChange`]s (peers added
//! and removed) for the core.
//!
//! Lifecycle:
//! - registered: a new key gets the lowest free pool address and expires after the
//!   configured lifetime (default 12 h);
//! - rotated: a new key (and a new address, so both keys can carry traffic during the
//!   grace period) replaces the old one, whose expiry is brought forward to the end of
//!   the grace period;
//! - expired: at its expiry the device is removed (reason `expired`, or `rotated` for
//!   the old key of a rotation);
//! - removed: by an administrator, or with its user (a deleted directory user's devices
//!   go with it, so a user re-created under the same name gets none of them).
//!
//! The WireGuard profile a device's owner installs ([`profile`]) is the `wg-quick` format
//! every stock client imports.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use base64::Engine as _;
use chrono::{DateTime, TimeDelta, Utc};
use ipnet::{IpNet, Ipv4Net};
use portcullis_model::{DeviceChange, SignOn};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A registered device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: Uuid,
    /// The owner's name, as policies see it.
    pub user_name: String,
    /// The owner's directory id; `None` for a user the configuration file defines.
    pub user_id: Option<Uuid>,
    /// A label for people ("alice's laptop").
    pub name: String,
    #[serde(with = "key_b64")]
    pub public_key: [u8; 32],
    pub address: Ipv4Addr,
    pub created: DateTime<Utc>,
    pub expires: DateTime<Utc>,
    /// The device this one replaced (a rotation).
    #[serde(default)]
    pub replaces: Option<Uuid>,
    /// Set on the old key of a rotation: valid until `expires`, the end of the grace.
    #[serde(default)]
    pub replaced_by: Option<Uuid>,
    /// The sign-on that last enrolled or renewed it (never: registered by an administrator).
    #[serde(default)]
    pub sign_on: SignOn,
    /// Subnets behind the device (a site's router), set only by an administrator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNet>,
}

impl Device {
    /// The public key as WireGuard tools print it.
    pub fn key_b64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.public_key)
    }
}

mod key_b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(key: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(key))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| serde::de::Error::custom("a public key is 32 bytes"))
    }
}

/// How devices are handed out (from `[devices]`).
#[derive(Clone, Debug)]
pub struct DevicePolicy {
    /// Tunnel addresses for devices.
    pub pool: Ipv4Net,
    /// Addresses and keys taken outside the registry (the gateway, static `[[peer]]`s).
    pub reserved_addresses: BTreeSet<IpAddr>,
    pub reserved_keys: BTreeSet<[u8; 32]>,
    /// Subnets routed to other peers (the configuration's `[[peer]] routes`).
    pub reserved_routes: Vec<IpNet>,
    /// Longest and default lifetime of a key.
    pub lifetime: TimeDelta,
    /// How long the old key stays valid after a rotation.
    pub grace: TimeDelta,
    pub persistent_keepalive: Option<u16>,
    /// Users of the configuration file (they may own devices too).
    pub config_users: Vec<String>,
}

/// Who owns a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub user_name: String,
    pub user_id: Option<Uuid>,
}

/// Records to write and to delete (with why), as one transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMutation {
    pub upsert: Vec<Device>,
    pub removed: Vec<(Uuid, String)>,
}

impl DeviceMutation {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.removed.is_empty()
    }
}

/// Why a device change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("no active user {0:?}")]
    NoSuchUser(String),
    #[error("no device {0}")]
    NoSuchDevice(String),
    #[error("public key {0} is already registered")]
    DuplicateKey(String),
    #[error("no free address left in the device pool {0}")]
    PoolExhausted(Ipv4Net),
    #[error("device {0} was already rotated; rotate its replacement {1}")]
    AlreadyRotated(Uuid, Uuid),
    #[error("{0}")]
    Invalid(String),
}

/// The registered devices, by id and by key.
#[derive(Clone, Debug, Default)]
pub struct Devices {
    by_id: BTreeMap<Uuid, Device>,
    by_key: HashMap<[u8; 32], Uuid>,
}

impl Devices {
    pub fn from_records(records: impl IntoIterator<Item = Device>) -> Devices {
        let mut d = Devices::default();
        for r in records {
            d.by_key.insert(r.public_key, r.id);
            d.by_id.insert(r.id, r);
        }
        d
    }

    /// Plans making the devices exactly `records` (see [`crate::Directory::plan_replace`]).
    pub fn plan_replace(&self, records: Vec<Device>) -> DeviceMutation {
        let keep: std::collections::BTreeSet<Uuid> = records.iter().map(|d| d.id).collect();
        DeviceMutation {
            removed: self
                .by_id
                .keys()
                .filter(|id| !keep.contains(id))
                .map(|id| (*id, "removed".to_string()))
                .collect(),
            upsert: records
                .into_iter()
                .filter(|d| self.by_id.get(&d.id) != Some(d))
                .collect(),
        }
    }

    pub fn get(&self, id: &Uuid) -> Option<&Device> {
        self.by_id.get(id)
    }

    pub fn by_key(&self, key: &[u8; 32]) -> Option<&Device> {
        self.by_key.get(key).and_then(|id| self.by_id.get(id))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Device> {
        self.by_id.values()
    }

    /// The earliest expiry, when the next [`Devices::plan_expire`] has work.
    pub fn next_expiry(&self) -> Option<DateTime<Utc>> {
        self.by_id.values().map(|d| d.expires).min()
    }

    /// The lowest pool address no device, static peer or the gateway holds (the pool's
    /// network and broadcast addresses are never handed out).
    fn allocate(&self, policy: &DevicePolicy) -> Result<Ipv4Addr, DeviceError> {
        let taken: BTreeSet<Ipv4Addr> = self.by_id.values().map(|d| d.address).collect();
        let pool = policy.pool;
        pool.hosts()
            .filter(|a| pool.prefix_len() >= 31 || (*a != pool.network() && *a != pool.broadcast()))
            .find(|a| !taken.contains(a) && !policy.reserved_addresses.contains(&IpAddr::V4(*a)))
            .ok_or(DeviceError::PoolExhausted(pool))
    }

    fn check_key(&self, policy: &DevicePolicy, key: &[u8; 32]) -> Result<(), DeviceError> {
        if self.by_key.contains_key(key) || policy.reserved_keys.contains(key) {
            return Err(DeviceError::DuplicateKey(
                base64::engine::general_purpose::STANDARD.encode(key),
            ));
        }
        if key == &[0; 32] {
            return Err(DeviceError::Invalid(
                "the all-zero key is not a public key".into(),
            ));
        }
        Ok(())
    }

    /// A router's subnets are networks (no host bits, not everything), outside the
    /// device pool, and overlap no other peer's subnets or addresses: each source has one
    /// owner.
    fn check_routes(&self, policy: &DevicePolicy, routes: &[IpNet]) -> Result<(), DeviceError> {
        let overlap = |a: &IpNet, b: &IpNet| a.contains(&b.network()) || b.contains(&a.network());
        for (i, route) in routes.iter().enumerate() {
            if route.addr() != route.network() {
                return Err(DeviceError::Invalid(format!(
                    "route {route} has host bits set: the subnet is {}",
                    route.trunc()
                )));
            }
            if route.prefix_len() == 0 {
                return Err(DeviceError::Invalid(format!(
                    "route {route} is every address: a router carries named subnets"
                )));
            }
            if overlap(route, &IpNet::V4(policy.pool.trunc())) {
                return Err(DeviceError::Invalid(format!(
                    "route {route} overlaps the device pool {}",
                    policy.pool
                )));
            }
            if let Some(a) = policy
                .reserved_addresses
                .iter()
                .find(|a| route.contains(*a))
            {
                return Err(DeviceError::Invalid(format!(
                    "route {route} contains {a}, a tunnel address of another peer"
                )));
            }
            if let Some(other) = policy.reserved_routes.iter().find(|o| overlap(route, o)) {
                return Err(DeviceError::Invalid(format!(
                    "route {route} overlaps {other}, routed to a peer of the configuration file"
                )));
            }
            if let Some((d, other)) = self
                .by_id
                .values()
                .filter(|d| d.replaced_by.is_none())
                .find_map(|d| d.routes.iter().find(|o| overlap(route, o)).map(|o| (d, o)))
            {
                return Err(DeviceError::Invalid(format!(
                    "route {route} overlaps {other} of device {} ({})",
                    d.id, d.user_name
                )));
            }
            if let Some(earlier) = routes
                .get(..i)
                .and_then(|r| r.iter().find(|o| overlap(route, o)))
            {
                return Err(DeviceError::Invalid(format!(
                    "route {route} overlaps {earlier}, given before it"
                )));
            }
        }
        Ok(())
    }

    fn lifetime(policy: &DevicePolicy, asked: Option<TimeDelta>) -> Result<TimeDelta, DeviceError> {
        match asked {
            None => Ok(policy.lifetime),
            Some(l) if l <= TimeDelta::zero() => {
                Err(DeviceError::Invalid("a lifetime must be positive".into()))
            }
            // Never longer than the configured lifetime: that is the policy's promise.
            Some(l) => Ok(l.min(policy.lifetime)),
        }
    }

    /// Plans registering `public_key` for `owner`.
    pub fn plan_register(
        &self,
        policy: &DevicePolicy,
        owner: Owner,
        public_key: [u8; 32],
        new: &NewDevice,
        now: DateTime<Utc>,
    ) -> Result<(DeviceMutation, Device), DeviceError> {
        let NewDevice {
            name,
            lifetime,
            sign_on,
            routes,
        } = new.clone();
        let name = name.as_str();
        check_label(name)?;
        self.check_key(policy, &public_key)?;
        self.check_routes(policy, &routes)?;
        let device = Device {
            id: Uuid::new_v4(),
            user_name: owner.user_name,
            user_id: owner.user_id,
            name: name.to_string(),
            public_key,
            address: self.allocate(policy)?,
            created: now,
            expires: now + Self::lifetime(policy, lifetime)?,
            replaces: None,
            replaced_by: None,
            sign_on,
            routes,
        };
        Ok((
            DeviceMutation {
                upsert: vec![device.clone()],
                removed: Vec::new(),
            },
            device,
        ))
    }

    /// Plans extending `user_name`'s devices to `until` (a new login's end), never
    /// beyond the configured lifetime from `now` and never shortening one, and giving
    /// them `sign_on` (the login's; the latest sign-on is the device's, weaker or not).
    /// Keys being rotated out keep their grace and their sign-on.
    pub fn plan_renew(
        &self,
        policy: &DevicePolicy,
        user_name: &str,
        until: DateTime<Utc>,
        sign_on: SignOn,
        now: DateTime<Utc>,
    ) -> DeviceMutation {
        let until = until.min(now + policy.lifetime);
        let upsert = self
            .by_id
            .values()
            .filter(|d| {
                d.user_name.eq_ignore_ascii_case(user_name)
                    && d.replaced_by.is_none()
                    && d.expires > now
                    && (d.expires < until || d.sign_on != sign_on)
            })
            .map(|d| Device {
                expires: d.expires.max(until),
                sign_on,
                ..d.clone()
            })
            .collect();
        DeviceMutation {
            upsert,
            removed: Vec::new(),
        }
    }

    /// Plans replacing device `id`'s key with `public_key`: the new key gets a new
    /// address and a full lifetime; the old key stays valid for `grace` (the configured
    /// grace when `None`), never beyond its own expiry.
    pub fn plan_rotate(
        &self,
        policy: &DevicePolicy,
        id: &Uuid,
        public_key: [u8; 32],
        grace: Option<TimeDelta>,
        now: DateTime<Utc>,
    ) -> Result<(DeviceMutation, Device), DeviceError> {
        let old = self
            .by_id
            .get(id)
            .ok_or_else(|| DeviceError::NoSuchDevice(id.to_string()))?;
        if let Some(next) = old.replaced_by {
            return Err(DeviceError::AlreadyRotated(*id, next));
        }
        self.check_key(policy, &public_key)?;
        let grace = grace.unwrap_or(policy.grace);
        if grace < TimeDelta::zero() {
            return Err(DeviceError::Invalid(
                "a grace period cannot be negative".into(),
            ));
        }
        let new = Device {
            id: Uuid::new_v4(),
            user_name: old.user_name.clone(),
            user_id: old.user_id,
            name: old.name.clone(),
            public_key,
            address: self.allocate(policy)?,
            created: now,
            expires: now + policy.lifetime,
            replaces: Some(old.id),
            replaced_by: None,
            sign_on: old.sign_on,
            // A router's subnets move to the new key at once (one owner per source);
            // the old key carries only its own address through the grace period.
            routes: old.routes.clone(),
        };
        let mut retiring = old.clone();
        retiring.routes.clear();
        retiring.replaced_by = Some(new.id);
        retiring.expires = retiring.expires.min(now + grace);
        Ok((
            DeviceMutation {
                upsert: vec![retiring, new.clone()],
                removed: Vec::new(),
            },
            new,
        ))
    }

    /// Plans removing device `id`.
    pub fn plan_remove(&self, id: &Uuid, reason: &str) -> Result<DeviceMutation, DeviceError> {
        if !self.by_id.contains_key(id) {
            return Err(DeviceError::NoSuchDevice(id.to_string()));
        }
        Ok(DeviceMutation {
            upsert: Vec::new(),
            removed: vec![(*id, reason.to_string())],
        })
    }

    /// Plans removing every device whose expiry is at or before `now`.
    pub fn plan_expire(&self, now: DateTime<Utc>) -> DeviceMutation {
        DeviceMutation {
            upsert: Vec::new(),
            removed: self
                .by_id
                .values()
                .filter(|d| d.expires <= now)
                .map(|d| {
                    let reason = if d.replaced_by.is_some() {
                        "rotated"
                    } else {
                        "expired"
                    };
                    (d.id, reason.to_string())
                })
                .collect(),
        }
    }

    /// Plans removing the devices of directory users that are gone.
    pub fn plan_users_removed(&self, users: &[Uuid]) -> DeviceMutation {
        DeviceMutation {
            upsert: Vec::new(),
            removed: self
                .by_id
                .values()
                .filter(|d| d.user_id.is_some_and(|u| users.contains(&u)))
                .map(|d| (d.id, "user deleted".to_string()))
                .collect(),
        }
    }

    /// Applies a persisted mutation; returns the peers to add and remove.
    pub fn apply(&mut self, m: DeviceMutation, policy: Option<&DevicePolicy>) -> Vec<DeviceChange> {
        let mut changes = Vec::new();
        for (id, reason) in m.removed {
            if let Some(d) = self.by_id.remove(&id) {
                self.by_key.remove(&d.public_key);
                changes.push(DeviceChange::Removed {
                    public_key: d.public_key,
                    reason,
                });
            }
        }
        for d in m.upsert {
            match self.by_id.get(&d.id) {
                None => {
                    let previous = d
                        .replaces
                        .and_then(|p| self.by_id.get(&p))
                        .map(|p| p.public_key);
                    changes.push(added(&d, previous, policy));
                }
                Some(old) if old.sign_on != d.sign_on => changes.push(DeviceChange::SignedOn {
                    public_key: d.public_key,
                    sign_on: d.sign_on,
                }),
                Some(_) => {}
            }
            self.by_key.insert(d.public_key, d.id);
            self.by_id.insert(d.id, d);
        }
        changes
    }

    /// The peers to add for every stored device (at start).
    pub fn peers(&self, policy: Option<&DevicePolicy>) -> Vec<DeviceChange> {
        self.by_id
            .values()
            .map(|d| added(d, None, policy))
            .collect()
    }
}

fn added(d: &Device, previous: Option<[u8; 32]>, policy: Option<&DevicePolicy>) -> DeviceChange {
    DeviceChange::Added {
        user: d.user_name.clone(),
        public_key: d.public_key,
        addresses: vec![IpAddr::V4(d.address)],
        routes: d.routes.clone(),
        persistent_keepalive: policy.and_then(|p| p.persistent_keepalive),
        expires_at: d.expires,
        previous,
        sign_on: d.sign_on,
    }
}

fn check_label(name: &str) -> Result<(), DeviceError> {
    if name.len() > 128 || name.chars().any(char::is_control) {
        return Err(DeviceError::Invalid(
            "a device name is at most 128 bytes without control characters".into(),
        ));
    }
    Ok(())
}

/// What a new device is given besides its owner and key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewDevice {
    /// A label for people ("alice's laptop"); may be empty.
    pub name: String,
    /// At most the configured lifetime; `None`: that lifetime.
    pub lifetime: Option<TimeDelta>,
    /// The sign-on enrolling it; default: none (an administrator registers it).
    pub sign_on: SignOn,
    /// Subnets behind it (a site's router): an administrator's registration only;
    /// enrollment never sets them.
    pub routes: Vec<IpNet>,
}

/// What a WireGuard profile for a device says besides the device itself.
#[derive(Clone, Debug)]
pub struct ProfileSettings {
    pub gateway_public_key: [u8; 32],
    /// `host:port` clients connect to.
    pub endpoint: String,
    pub allowed_ips: Vec<IpNet>,
    pub dns: Vec<IpAddr>,
    pub persistent_keepalive: Option<u16>,
    /// In a cluster with sites: one `[Peer]` each (its key, its endpoint, only its
    /// networks), in place of the one above. Sites with no AllowedIPs are left out.
    pub sites: Vec<SitePeer>,
}

/// One site's `[Peer]` in a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SitePeer {
    pub name: String,
    pub public_key: [u8; 32],
    pub endpoint: String,
    pub allowed_ips: Vec<IpNet>,
}

/// The device's `wg-quick` profile. Without the private key (the device generated its
/// own), the `PrivateKey` line says where to put it.
pub fn profile(device: &Device, private_key: Option<&str>, s: &ProfileSettings) -> String {
    use std::fmt::Write as _;
    let b64 = |k: &[u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Portcullis device {} of {} ({}), valid until {}",
        device.id,
        device.user_name,
        if device.name.is_empty() {
            "unnamed"
        } else {
            &device.name
        },
        device
            .expires
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    out.push_str("[Interface]\n");
    match private_key {
        Some(k) => {
            let _ = writeln!(out, "PrivateKey = {k}");
        }
        None => {
            let _ = writeln!(
                out,
                "# PrivateKey = <the private key this device generated for {}>",
                device.key_b64()
            );
        }
    }
    let router = !device.routes.is_empty();
    if router {
        let subnets: Vec<String> = device.routes.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "# A site's router for {}: forward its LAN's traffic for the AllowedIPs below into\n\
             # this tunnel without NAT (the gateway decides and audits each LAN host by its own\n\
             # address and accepts those sources from this key only); enable IP forwarding.",
            subnets.join(", ")
        );
    }
    let _ = writeln!(out, "Address = {}/32", device.address);
    // A router keeps its resolver: the LAN's hosts have their own.
    if !s.dns.is_empty() && !router {
        let dns: Vec<String> = s.dns.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "DNS = {}", dns.join(", "));
    }
    let single = [SitePeer {
        name: String::new(),
        public_key: s.gateway_public_key,
        endpoint: s.endpoint.clone(),
        allowed_ips: s.allowed_ips.clone(),
    }];
    let peers = if s.sites.is_empty() {
        &single[..]
    } else {
        &s.sites[..]
    };
    for peer in peers.iter().filter(|p| !p.allowed_ips.is_empty()) {
        out.push('\n');
        if !peer.name.is_empty() {
            let _ = writeln!(out, "# site {}", peer.name);
        }
        out.push_str("[Peer]\n");
        let _ = writeln!(out, "PublicKey = {}", b64(&peer.public_key));
        let _ = writeln!(out, "Endpoint = {}", peer.endpoint);
        let allowed: Vec<String> = peer.allowed_ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "AllowedIPs = {}", allowed.join(", "));
        // A router is usually behind NAT and carries traffic the gateway starts too
        // (return traffic only, but after a quiet spell): keep its mapping alive.
        let keepalive = s.persistent_keepalive.or(router.then_some(25));
        if let Some(k) = keepalive {
            let _ = writeln!(out, "PersistentKeepalive = {k}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]
    use super::*;

    fn nd(name: &str, lifetime: Option<TimeDelta>) -> NewDevice {
        NewDevice {
            name: name.into(),
            lifetime,
            sign_on: SignOn::default(),
            routes: Vec::new(),
        }
    }

    fn policy() -> DevicePolicy {
        DevicePolicy {
            pool: "100.64.0.0/29".parse().unwrap(),
            reserved_addresses: ["100.64.0.1".parse().unwrap(), "100.64.0.2".parse().unwrap()]
                .into(),
            reserved_keys: [[9; 32]].into(),
            reserved_routes: Vec::new(),
            lifetime: TimeDelta::hours(12),
            grace: TimeDelta::minutes(5),
            persistent_keepalive: Some(25),
            config_users: vec!["alice".into()],
        }
    }

    fn owner() -> Owner {
        Owner {
            user_name: "alice".into(),
            user_id: None,
        }
    }

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn register(d: &mut Devices, key: u8, now: DateTime<Utc>) -> Result<Device, DeviceError> {
        let (m, dev) = d.plan_register(&policy(), owner(), [key; 32], &nd("laptop", None), now)?;
        d.apply(m, Some(&policy()));
        Ok(dev)
    }

    #[test]
    fn a_router_device_owns_its_subnets_alone_and_keeps_them_through_a_rotation() {
        let mut pol = policy();
        pol.reserved_routes = vec!["10.77.0.0/16".parse().unwrap()];
        let mut d = Devices::default();
        let router = |routes: &[&str]| NewDevice {
            routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
            ..nd("office router", None)
        };
        let (m, office) = d
            .plan_register(&pol, owner(), [1; 32], &router(&["192.168.10.0/24"]), t(0))
            .unwrap();
        d.apply(m, Some(&pol));
        let refused = [
            (
                &["192.168.10.128/25"][..],
                "overlaps 192.168.10.0/24 of device",
            ),
            (&["192.168.10.5/24"], "host bits"),
            (&["0.0.0.0/0"], "every address"),
            (&["100.64.0.0/30"], "device pool"),
            (&["10.77.1.0/24"], "configuration file"),
            (&["192.168.20.0/24", "192.168.20.0/25"], "given before it"),
        ];
        for (routes, said) in refused {
            match d.plan_register(&pol, owner(), [2; 32], &router(routes), t(0)) {
                Err(DeviceError::Invalid(e)) => assert!(e.contains(said), "{routes:?}: {e}"),
                other => panic!("{routes:?}: {other:?}"),
            }
        }
        // The peer the core gets carries the routes.
        match &d.peers(Some(&pol))[..] {
            [DeviceChange::Added { routes, .. }] => {
                assert_eq!(routes, &office.routes);
            }
            other => panic!("{other:?}"),
        }
        // A rotation moves them to the new key; the retiring key keeps none.
        let (m, new) = d
            .plan_rotate(&pol, &office.id, [3; 32], None, t(10))
            .unwrap();
        d.apply(m, Some(&pol));
        assert_eq!(new.routes, office.routes);
        let retiring = d.iter().find(|x| x.id == office.id).unwrap();
        assert!(retiring.routes.is_empty());
        // A user's own device has none.
        assert!(register(&mut d, 4, t(0)).unwrap().routes.is_empty());
    }

    #[test]
    fn addresses_come_from_the_pool_skipping_reserved_and_taken_ones() {
        let mut d = Devices::default();
        let got: Vec<Ipv4Addr> = (1..=4)
            .map(|k| register(&mut d, k, t(0)).unwrap().address)
            .collect();
        // .0 network, .1 .2 reserved, .7 broadcast.
        assert_eq!(
            got,
            ["100.64.0.3", "100.64.0.4", "100.64.0.5", "100.64.0.6"]
                .map(|a| a.parse::<Ipv4Addr>().unwrap())
        );
        assert_eq!(
            register(&mut d, 5, t(0)),
            Err(DeviceError::PoolExhausted(policy().pool))
        );
        // A freed address is handed out again.
        let first = d.iter().find(|x| x.address == got[0]).unwrap().id;
        let m = d.plan_remove(&first, "removed").unwrap();
        d.apply(m, None);
        assert_eq!(register(&mut d, 6, t(0)).unwrap().address, got[0]);
    }

    #[test]
    fn a_login_renews_the_users_devices_up_to_the_lifetime_never_shortening() {
        let mut d = Devices::default();
        let a = register(&mut d, 1, t(0)).unwrap(); // expires t(0) + 12 h
                                                    // Renewed one hour later to the login's end, capped at 12 h from then.
        let m = d.plan_renew(
            &policy(),
            "ALICE",
            t(3600) + TimeDelta::days(2),
            SignOn::default(),
            t(3600),
        );
        assert_eq!(m.upsert.len(), 1);
        assert_eq!(m.upsert[0].expires, t(3600) + TimeDelta::hours(12));
        d.apply(m, None);
        // A login ending sooner does not shorten it; another user's login does nothing.
        assert!(d
            .plan_renew(&policy(), "alice", t(7200), SignOn::default(), t(3600))
            .is_empty());
        assert!(d
            .plan_renew(&policy(), "bob", t(90_000), SignOn::default(), t(3600))
            .is_empty());
        // A key in its rotation grace keeps its grace.
        let (m, _) = d
            .plan_rotate(&policy(), &a.id, [2; 32], None, t(4000))
            .unwrap();
        d.apply(m, None);
        let renewed = d.plan_renew(&policy(), "alice", t(80_000), SignOn::default(), t(5000));
        assert!(
            renewed.upsert.iter().all(|x| x.public_key == [2; 32]),
            "{renewed:?}"
        );
    }

    #[test]
    fn keys_must_be_new_and_not_static_peers() {
        let mut d = Devices::default();
        register(&mut d, 1, t(0)).unwrap();
        assert!(matches!(
            register(&mut d, 1, t(0)),
            Err(DeviceError::DuplicateKey(_))
        ));
        assert!(matches!(
            register(&mut d, 9, t(0)),
            Err(DeviceError::DuplicateKey(_))
        ));
        assert!(matches!(
            register(&mut d, 0, t(0)),
            Err(DeviceError::Invalid(_))
        ));
    }

    #[test]
    fn lifetime_is_capped_by_the_policy() {
        let d = Devices::default();
        let p = policy();
        let (_, dev) = d
            .plan_register(
                &p,
                owner(),
                [1; 32],
                &nd("", Some(TimeDelta::days(30))),
                t(0),
            )
            .unwrap();
        assert_eq!(dev.expires, t(12 * 3600));
        let (_, dev) = d
            .plan_register(
                &p,
                owner(),
                [1; 32],
                &nd("", Some(TimeDelta::seconds(3))),
                t(0),
            )
            .unwrap();
        assert_eq!(dev.expires, t(3));
        assert!(d
            .plan_register(&p, owner(), [1; 32], &nd("", Some(TimeDelta::zero())), t(0))
            .is_err());
        assert!(d
            .plan_register(&p, owner(), [1; 32], &nd("a\nb", None), t(0))
            .is_err());
    }

    #[test]
    fn expiry_removes_due_devices_only() {
        let mut d = Devices::default();
        let a = register(&mut d, 1, t(0)).unwrap();
        let b = register(&mut d, 2, t(100)).unwrap();
        assert_eq!(d.next_expiry(), Some(a.expires));
        assert!(d.plan_expire(a.expires - TimeDelta::seconds(1)).is_empty());
        let m = d.plan_expire(a.expires);
        assert_eq!(m.removed, vec![(a.id, "expired".to_string())]);
        let changes = d.apply(m, None);
        assert_eq!(
            changes,
            vec![DeviceChange::Removed {
                public_key: [1; 32],
                reason: "expired".into()
            }]
        );
        assert_eq!(d.next_expiry(), Some(b.expires));
    }

    #[test]
    fn rotation_keeps_the_old_key_for_the_grace_then_removes_it_as_rotated() {
        let mut d = Devices::default();
        let old = register(&mut d, 1, t(0)).unwrap();
        let (m, new) = d
            .plan_rotate(&policy(), &old.id, [2; 32], None, t(60))
            .unwrap();
        let changes = d.apply(m, Some(&policy()));
        assert_eq!(
            changes,
            vec![DeviceChange::Added {
                user: "alice".into(),
                public_key: [2; 32],
                addresses: vec![IpAddr::V4(new.address)],
                routes: Vec::new(),
                persistent_keepalive: Some(25),
                expires_at: t(60 + 12 * 3600),
                previous: Some([1; 32]),
                sign_on: SignOn::default(),
            }]
        );
        assert_ne!(
            new.address, old.address,
            "both keys carry traffic during the grace"
        );
        let retiring = d.get(&old.id).unwrap();
        assert_eq!(retiring.expires, t(60 + 300));
        assert_eq!(retiring.replaced_by, Some(new.id));
        // Rotating the retiring key again is refused; the replacement is named.
        assert_eq!(
            d.plan_rotate(&policy(), &old.id, [3; 32], None, t(61))
                .err(),
            Some(DeviceError::AlreadyRotated(old.id, new.id))
        );
        let m = d.plan_expire(t(360));
        assert_eq!(m.removed, vec![(old.id, "rotated".to_string())]);
        d.apply(m, None);
        assert!(d.get(&new.id).is_some());
        // A grace longer than the old key's remaining life does not extend it.
        let (m, _) = d
            .plan_rotate(
                &policy(),
                &new.id,
                [4; 32],
                Some(TimeDelta::days(2)),
                t(400),
            )
            .unwrap();
        assert_eq!(m.upsert[0].expires, new.expires);
    }

    #[test]
    fn a_deleted_directory_users_devices_go_with_it() {
        let mut d = Devices::default();
        let uid = Uuid::new_v4();
        let p = policy();
        let (m, dev) = d
            .plan_register(
                &p,
                Owner {
                    user_name: "erin".into(),
                    user_id: Some(uid),
                },
                [1; 32],
                &nd("", None),
                t(0),
            )
            .unwrap();
        d.apply(m, None);
        register(&mut d, 2, t(0)).unwrap();
        let m = d.plan_users_removed(&[uid]);
        assert_eq!(m.removed, vec![(dev.id, "user deleted".to_string())]);
        assert!(d.plan_users_removed(&[Uuid::new_v4()]).is_empty());
    }

    #[test]
    fn records_round_trip_through_json() {
        let mut d = Devices::default();
        let dev = register(&mut d, 7, t(0)).unwrap();
        let json = serde_json::to_string(&dev).unwrap();
        assert!(json.contains(&dev.key_b64()));
        let back: Device = serde_json::from_str(&json).unwrap();
        assert_eq!(back, dev);
        assert!(serde_json::from_str::<Device>(&json.replace(&dev.key_b64(), "AAAA")).is_err());
    }

    #[test]
    fn a_router_profile_names_its_subnets_keeps_its_resolver_and_stays_alive() {
        let mut d = Devices::default();
        let new = NewDevice {
            routes: vec!["192.168.10.0/24".parse().unwrap()],
            ..nd("office router", None)
        };
        let (m, dev) = d
            .plan_register(&policy(), owner(), [8; 32], &new, t(0))
            .unwrap();
        d.apply(m, Some(&policy()));
        let s = ProfileSettings {
            gateway_public_key: [1; 32],
            endpoint: "gw.example.com:51820".into(),
            allowed_ips: vec!["10.8.0.0/16".parse().unwrap()],
            dns: vec!["10.8.0.53".parse().unwrap()],
            persistent_keepalive: None,
            sites: Vec::new(),
        };
        let p = profile(&dev, None, &s);
        assert!(p.contains("# A site's router for 192.168.10.0/24"), "{p}");
        assert!(p.lines().any(|l| l == "AllowedIPs = 10.8.0.0/16"), "{p}");
        assert!(p.lines().any(|l| l == "PersistentKeepalive = 25"), "{p}");
        assert!(!p.lines().any(|l| l.starts_with("DNS")), "{p}");
    }

    #[test]
    fn profile_is_wg_quick() {
        let mut d = Devices::default();
        let dev = register(&mut d, 7, t(0)).unwrap();
        let s = ProfileSettings {
            gateway_public_key: [1; 32],
            endpoint: "gw.example.com:51820".into(),
            allowed_ips: vec![
                "10.8.0.0/16".parse().unwrap(),
                "100.64.0.0/24".parse().unwrap(),
            ],
            dns: vec!["10.8.0.53".parse().unwrap()],
            persistent_keepalive: Some(25),
            sites: Vec::new(),
        };
        let p = profile(&dev, Some("cHJpdmF0ZQ=="), &s);
        for line in [
            "[Interface]",
            "PrivateKey = cHJpdmF0ZQ==",
            "Address = 100.64.0.3/32",
            "DNS = 10.8.0.53",
            "[Peer]",
            "PublicKey = AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
            "Endpoint = gw.example.com:51820",
            "AllowedIPs = 10.8.0.0/16, 100.64.0.0/24",
            "PersistentKeepalive = 25",
        ] {
            assert!(p.lines().any(|l| l == line), "{line:?} missing from\n{p}");
        }
        let p = profile(&dev, None, &s);
        assert!(!p.lines().any(|l| l.starts_with("PrivateKey")));

        // With sites: one [Peer] per site with its key, endpoint and networks; a site
        // with none is left out.
        let site = |name: &str, key: u8, endpoint: &str, nets: &[&str]| SitePeer {
            name: name.into(),
            public_key: [key; 32],
            endpoint: endpoint.into(),
            allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
        };
        let s = ProfileSettings {
            sites: vec![
                site(
                    "eu-1",
                    2,
                    "203.0.113.10:51820",
                    &["100.64.0.0/24", "10.8.1.0/24"],
                ),
                site("us-1", 3, "198.51.100.10:51820", &["10.8.2.0/24"]),
                site("ap-1", 4, "192.0.2.10:51820", &[]),
            ],
            ..s
        };
        let p = profile(&dev, None, &s);
        assert_eq!(p.matches("[Peer]").count(), 2, "{p}");
        let eu = p.split("# site ").find(|b| b.starts_with("eu-1")).unwrap();
        assert!(
            eu.contains("PublicKey = AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="),
            "{eu}"
        );
        assert!(eu.contains("Endpoint = 203.0.113.10:51820"), "{eu}");
        assert!(
            eu.contains("AllowedIPs = 100.64.0.0/24, 10.8.1.0/24"),
            "{eu}"
        );
        let us = p.split("# site ").find(|b| b.starts_with("us-1")).unwrap();
        assert!(
            us.contains("Endpoint = 198.51.100.10:51820")
                && us.contains("AllowedIPs = 10.8.2.0/24"),
            "{us}"
        );
        assert!(!p.contains("ap-1") && !p.contains("gw.example.com"), "{p}");
        assert_eq!(p.matches("PersistentKeepalive = 25").count(), 2);
    }

    #[test]
    fn a_login_gives_the_users_devices_its_sign_on_and_says_so_once() {
        let mut d = Devices::default();
        let a = register(&mut d, 1, t(0)).unwrap();
        assert_eq!(
            a.sign_on,
            SignOn::default(),
            "registered by an administrator"
        );
        let with_mfa = SignOn { at: 100, mfa: true };
        // Within the lifetime already: only the sign-on changes, the expiry stays.
        let m = d.plan_renew(&policy(), "alice", t(60), with_mfa, t(100));
        assert_eq!(m.upsert.len(), 1);
        assert_eq!(
            (m.upsert[0].sign_on, m.upsert[0].expires),
            (with_mfa, a.expires)
        );
        assert_eq!(
            d.apply(m, None),
            vec![DeviceChange::SignedOn {
                public_key: a.public_key,
                sign_on: with_mfa
            }]
        );
        // The same sign-on again changes nothing; a later one without MFA replaces it.
        assert!(d
            .plan_renew(&policy(), "alice", t(60), with_mfa, t(200))
            .is_empty());
        let weaker = SignOn {
            at: 300,
            mfa: false,
        };
        let m = d.plan_renew(&policy(), "alice", t(60), weaker, t(300));
        assert_eq!(d.apply(m, None).len(), 1);
        // A device enrolled by a sign-on carries it from the start.
        let (m, dev) = d
            .plan_register(
                &policy(),
                owner(),
                [7; 32],
                &NewDevice {
                    sign_on: with_mfa,
                    routes: Vec::new(),
                    ..nd("phone", None)
                },
                t(400),
            )
            .unwrap();
        assert_eq!(dev.sign_on, with_mfa);
        assert!(matches!(
            d.apply(m, None).as_slice(),
            [DeviceChange::Added { sign_on, .. }] if *sign_on == with_mfa
        ));
    }
}
