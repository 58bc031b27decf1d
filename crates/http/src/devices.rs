//! Registered devices at run time: the stored ones read for the loop at start, the expiry
//! timer, and the admin API routes that register, rotate and remove them.
//!
//! Admin API (same bearer token as the rest of `/admin/v1`):
//! - `GET /admin/v1/devices[?user=NAME]`: registered devices.
//! - `POST /admin/v1/devices` `{"user", "public_key"?, "name"?, "lifetime_secs"?,
//!   "routes"?}`: registers a key (the device's own public key; without one the gateway
//!   generates a key pair and returns the private key once, inside the profile). Answers
//!   201 with the device and its `wg-quick` profile once the peer is live. `routes` makes
//!   it a site's router (subnets behind it); only here, never through enrollment.
//! - `GET /admin/v1/devices/{id}/profile`: its profile again, without a private key.
//! - `POST /admin/v1/devices/{id}/rotate` `{"public_key"?, "grace_secs"?}`: a new key and
//!   address replace the device's; the old key keeps working for the grace period.
//! - `DELETE /admin/v1/devices/{id}`: removes the device, cutting its session and flows.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;
use portcullis_config::{DevicesConfig, Loaded};
use portcullis_core::PeerSpec;
use portcullis_identity::{
    Device, DeviceError, DevicePolicy, Identity, IdentityError, ProfileSettings,
};
use portcullis_model::{DeviceChange, Event};
use portcullis_policy::PolicyBundle;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::api::{body, AdminState, ApiError};
use portcullis_control::Command;

impl From<IdentityError> for ApiError {
    fn from(e: IdentityError) -> ApiError {
        let status = match &e {
            IdentityError::Device(DeviceError::NoSuchUser(_) | DeviceError::NoSuchDevice(_)) => {
                StatusCode::NOT_FOUND
            }
            IdentityError::Device(
                DeviceError::DuplicateKey(_)
                | DeviceError::AlreadyRotated(..)
                | DeviceError::PoolExhausted(_),
            ) => StatusCode::CONFLICT,
            IdentityError::Device(DeviceError::Invalid(_)) => StatusCode::BAD_REQUEST,
            IdentityError::CoreGone => StatusCode::SERVICE_UNAVAILABLE,
            _ if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// The device policy from `[devices]`: the static peers' addresses and keys and the
/// gateway's address are never handed out.
pub fn policy(loaded: &Loaded, d: &DevicesConfig) -> DevicePolicy {
    let c = &loaded.config;
    let mut reserved_addresses: BTreeSet<IpAddr> = c
        .peers
        .iter()
        .flat_map(|p| std::iter::once(p.address).chain(p.address6))
        .collect();
    reserved_addresses.insert(c.gateway.tunnel_address.addr());
    DevicePolicy {
        pool: d.pool,
        reserved_addresses,
        reserved_routes: c
            .peers
            .iter()
            .flat_map(|p| p.routes.iter().copied())
            .collect(),
        // The gateway's own key too: a device with it would make the gateway its own peer.
        reserved_keys: loaded
            .peer_keys
            .iter()
            .copied()
            .chain(std::iter::once(
                boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(
                    loaded.private_key.0,
                ))
                .to_bytes(),
            ))
            .collect(),
        // Both are range-checked by the configuration (at most MAX_DURATION_SECS).
        lifetime: TimeDelta::try_seconds(i64::try_from(d.key_lifetime_secs).unwrap_or(0))
            .unwrap_or(TimeDelta::zero()),
        grace: TimeDelta::try_seconds(i64::try_from(d.rotation_grace_secs).unwrap_or(0))
            .unwrap_or(TimeDelta::zero()),
        persistent_keepalive: d.persistent_keepalive,
        config_users: c.users.iter().map(|u| u.name.clone()).collect(),
    }
}

/// What every profile carries: the gateway's key and endpoint, and AllowedIPs (the
/// configured ones, or the tunnel network and every declared network; narrowed per user
/// by [`ProfileScope`] when a device is registered).
pub fn profile_settings(
    loaded: &Loaded,
    d: &DevicesConfig,
    bundle: &PolicyBundle,
) -> ProfileSettings {
    let g = &loaded.config.gateway;
    let allowed_ips = if d.allowed_ips.is_empty() {
        let mut nets: Vec<IpNet> = vec![g.tunnel_address.trunc()];
        nets.extend(g.tunnel_address6.map(|n| n.trunc()));
        nets.extend(
            bundle
                .networks()
                .iter()
                .flat_map(|n| n.cidrs.iter().copied()),
        );
        IpNet::aggregate(&nets)
    } else {
        d.allowed_ips.clone()
    };
    let public = boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(
        loaded.private_key.0,
    ));
    let tunnel: Vec<IpNet> = std::iter::once(g.tunnel_address.trunc())
        .chain(g.tunnel_address6.map(|n| n.trunc()))
        .collect();
    let networks: Vec<&portcullis_policy::Network> = bundle.networks().iter().collect();
    ProfileSettings {
        gateway_public_key: public.to_bytes(),
        endpoint: d.endpoint.clone(),
        // Fixed AllowedIPs are one [Peer]'s: this node's site.
        sites: if d.allowed_ips.is_empty() {
            site_peers(&site_templates(loaded), bundle, &tunnel, &networks)
        } else {
            Vec::new()
        },
        allowed_ips,
        dns: d.dns.clone(),
        persistent_keepalive: d.persistent_keepalive,
    }
}

/// `[[cluster.sites]]` as `[Peer]`s without AllowedIPs yet (empty without sites).
fn site_templates(loaded: &Loaded) -> Vec<portcullis_identity::SitePeer> {
    let Some(cl) = loaded.config.cluster.as_ref() else {
        return Vec::new();
    };
    cl.sites
        .iter()
        .filter_map(|site| {
            Some(portcullis_identity::SitePeer {
                name: site.name.clone(),
                // Checked when the configuration loaded.
                public_key: portcullis_config::decode_key(&site.public_key).ok()?,
                endpoint: site.endpoint.clone(),
                allowed_ips: Vec::new(),
            })
        })
        .collect()
}

/// One `[Peer]` per site, carrying the networks that site serves among `networks`.
/// Networks every site serves, and the tunnel, go to the first site listed: one peer
/// must carry them (the same prefix on two peers is the last one's; nested prefixes are
/// fine, the most specific wins, so prod-db of us-1 inside prod goes to us-1).
fn site_peers(
    templates: &[portcullis_identity::SitePeer],
    bundle: &PolicyBundle,
    tunnel: &[IpNet],
    networks: &[&portcullis_policy::Network],
) -> Vec<portcullis_identity::SitePeer> {
    templates
        .iter()
        .enumerate()
        .map(|(i, site)| {
            let mut nets: Vec<IpNet> = if i == 0 { tunnel.to_vec() } else { Vec::new() };
            nets.extend(
                networks
                    .iter()
                    .filter(|n| match bundle.networks().site_of_name(&n.name) {
                        Some(s) => s == site.name,
                        None => i == 0,
                    })
                    .flat_map(|n| n.cidrs.iter().copied()),
            );
            portcullis_identity::SitePeer {
                allowed_ips: IpNet::aggregate(&nets),
                ..site.clone()
            }
        })
        .collect()
}

/// How a profile's AllowedIPs are chosen: `[devices] allowed_ips` when set, else the
/// tunnel networks and the networks the policies could let the user reach.
#[derive(Clone, Debug)]
pub struct ProfileScope {
    fixed: bool,
    tunnel: Vec<IpNet>,
    /// `[[cluster.sites]]`, for one `[Peer]` each.
    sites: Vec<portcullis_identity::SitePeer>,
}

impl ProfileScope {
    pub fn new(loaded: &Loaded) -> ProfileScope {
        let g = &loaded.config.gateway;
        ProfileScope {
            fixed: loaded
                .config
                .devices
                .as_ref()
                .is_some_and(|d| !d.allowed_ips.is_empty()),
            tunnel: std::iter::once(g.tunnel_address.trunc())
                .chain(g.tunnel_address6.map(|n| n.trunc()))
                .collect(),
            sites: site_templates(loaded),
        }
    }

    /// AllowedIPs as the base settings say (tests).
    #[cfg(test)]
    pub(crate) fn new_fixed() -> ProfileScope {
        ProfileScope {
            fixed: true,
            tunnel: Vec::new(),
            sites: Vec::new(),
        }
    }

    /// The names in `[[cluster.sites]]` (none without sites).
    pub(crate) fn site_names(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.name.clone()).collect()
    }

    /// The WireGuard profile of `device` (with its private key when the gateway made
    /// it), its AllowedIPs chosen by [`Self::settings_for`].
    pub(crate) async fn profile(
        &self,
        base: &ProfileSettings,
        commands: &tokio::sync::mpsc::Sender<Command>,
        device: &Device,
        private_key: Option<&str>,
    ) -> String {
        let settings = self.settings_for(base, commands, &device.user_name).await;
        portcullis_identity::profile(device, private_key, &settings)
    }

    /// `base` with AllowedIPs for `user` (groups as the policies see them now): the
    /// tunnel and every network a `permit` whose scope matches could reach, conditions
    /// aside. `base` as is when the AllowedIPs are fixed or the event loop is gone.
    async fn settings_for(
        &self,
        base: &ProfileSettings,
        commands: &tokio::sync::mpsc::Sender<Command>,
        user: &str,
    ) -> ProfileSettings {
        if self.fixed {
            return base.clone();
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if commands
            .send(Command::Access(user.to_string(), tx))
            .await
            .is_err()
        {
            return base.clone();
        }
        let Ok((bundle, groups)) = rx.await else {
            return base.clone();
        };
        let reachable = bundle.reachable_networks(user, &groups);
        let mut nets = self.tunnel.clone();
        nets.extend(reachable.iter().flat_map(|n| n.cidrs.iter().copied()));
        ProfileSettings {
            allowed_ips: IpNet::aggregate(&nets),
            sites: site_peers(&self.sites, &bundle, &self.tunnel, &reachable),
            ..base.clone()
        }
    }
}

/// What the packet loop starts with from the identity store's devices.
#[derive(Debug, Default)]
pub struct StoredDevices {
    /// Every stored, unexpired device, as a peer.
    pub peers: Vec<PeerSpec>,
    /// `peer_removed` for each device that expired while the gateway was down.
    pub expired: Vec<Event>,
}

/// At start, before the loop runs: drops the devices that expired while the gateway
/// was down (for the loop to record), and returns every stored device as a peer.
pub async fn stored(identity: &Identity) -> anyhow::Result<StoredDevices> {
    let mut out = StoredDevices::default();
    let Some(policy) = identity.device_policy() else {
        return Ok(out);
    };
    for (d, reason) in identity.take_expired(Utc::now()).await? {
        tracing::info!(device = %d.id, user = %d.user_name, %reason, "device expired while the gateway was down");
        out.expired.push(Event::PeerRemoved {
            user: d.user_name.clone(),
            device: d.key_b64(),
            reason,
        });
    }
    for change in identity.read_devices(|d| d.peers(Some(policy))) {
        if let DeviceChange::Added {
            user,
            public_key,
            addresses,
            routes,
            persistent_keepalive,
            sign_on,
            ..
        } = change
        {
            out.peers.push(PeerSpec {
                user,
                public_key,
                addresses,
                routes,
                persistent_keepalive,
                sign_on,
            });
        }
    }
    Ok(out)
}

/// Removes devices at their expiry: sleeps until the earliest one (at most a minute, so
/// a wall-clock jump is caught up), or until a device changes.
///
/// In a cluster (`sweep` given: whether this node holds the sweep's lease) only the
/// holder removes expired devices from the shared store; every node stops accepting
/// them at their expiry on its own (also when the database is away).
pub fn spawn_expiry(identity: Arc<Identity>, sweep: Option<tokio::sync::watch::Receiver<bool>>) {
    tokio::spawn(async move {
        loop {
            let next = identity.read_devices(|d| d.next_expiry());
            let wait = next
                .map(|t| (t - Utc::now()).to_std().unwrap_or(Duration::ZERO))
                .unwrap_or(Duration::from_secs(60))
                .min(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = identity.devices_changed().notified() => continue,
            }
            let now = Utc::now();
            let holder = sweep.as_ref().is_none_or(|held| *held.borrow());
            let expired = if holder {
                match identity.expire_devices(Instant::now(), now).await {
                    Err(e) if sweep.is_some() => {
                        tracing::warn!("expired devices not removed from the cluster ({e}); removed on this node");
                        identity.expire_locally(Instant::now(), now).await
                    }
                    r => r,
                }
            } else {
                identity.expire_locally(Instant::now(), now).await
            };
            match expired {
                Ok(0) => {}
                Ok(n) => {
                    let late = next.map(|t| (now - t).num_milliseconds()).unwrap_or(0);
                    tracing::info!(devices = n, late_ms = late, "expired devices removed");
                }
                Err(e) => {
                    // The key stays until the removal is stored; retry shortly.
                    tracing::error!("expiring devices failed: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}

/// The device routes (the caller adds authentication).
pub(crate) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/devices", get(list).post(register))
        .route("/devices/{id}/rotate", post(rotate))
        .route("/devices/{id}/profile", get(profile_of))
        .route("/devices/{id}", axum::routing::delete(remove))
}

/// A device as the API shows it.
#[derive(Serialize)]
struct DeviceRow {
    id: Uuid,
    user: String,
    name: String,
    public_key: String,
    address: String,
    created: DateTime<Utc>,
    expires: DateTime<Utc>,
    replaces: Option<Uuid>,
    replaced_by: Option<Uuid>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes: Vec<String>,
}

impl From<&Device> for DeviceRow {
    fn from(d: &Device) -> Self {
        DeviceRow {
            id: d.id,
            user: d.user_name.clone(),
            name: d.name.clone(),
            public_key: d.key_b64(),
            address: d.address.to_string(),
            created: d.created,
            expires: d.expires,
            replaces: d.replaces,
            replaced_by: d.replaced_by,
            routes: d.routes.iter().map(ToString::to_string).collect(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    user: String,
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    lifetime_secs: Option<u64>,
    /// Subnets behind the device (a site's router). Only here, on the admin API.
    #[serde(default)]
    routes: Vec<ipnet::IpNet>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    grace_secs: Option<u64>,
}

fn devices_of(s: &AdminState) -> Result<(&Arc<Identity>, &ProfileSettings), ApiError> {
    match (&s.identity, &s.profile) {
        (Some(i), Some(p)) if i.device_policy().is_some() => Ok((i, p)),
        _ => Err(ApiError(
            StatusCode::NOT_FOUND,
            "no [devices] section is configured".into(),
        )),
    }
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("device id {id:?} is not a UUID"),
        )
    })
}

/// The device's public key, or a fresh key pair (private key base64) when none is given.
pub(crate) fn key_or_generate(given: Option<&str>) -> Result<([u8; 32], Option<String>), ApiError> {
    match given {
        Some(k) => portcullis_config::decode_key(k)
            .map(|k| (k, None))
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("public_key: {e}"))),
        None => {
            use rand::RngCore as _;
            let mut secret = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut secret);
            let secret = boringtun::x25519::StaticSecret::from(secret);
            let public = boringtun::x25519::PublicKey::from(&secret).to_bytes();
            let private = base64::engine::general_purpose::STANDARD.encode(secret.to_bytes());
            Ok((public, Some(private)))
        }
    }
}

/// A duration from a request body: 1 second to [`portcullis_config::MAX_DURATION_SECS`],
/// else a 400 naming the field.
fn secs(field: &str, v: Option<u64>) -> Result<Option<TimeDelta>, ApiError> {
    let Some(s) = v else { return Ok(None) };
    let max = portcullis_config::MAX_DURATION_SECS;
    match i64::try_from(s).ok().filter(|_| (1..=max).contains(&s)) {
        Some(s) => Ok(TimeDelta::try_seconds(s)),
        None => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{field}: {s} is out of range (1-{max} seconds)"),
        )),
    }
}

async fn list(
    State(s): State<AdminState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let (identity, _) = devices_of(&s)?;
    let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let rows: Vec<DeviceRow> = identity.read_devices(|d| {
        d.iter()
            .filter(|d| {
                q.user
                    .as_deref()
                    .is_none_or(|u| d.user_name.eq_ignore_ascii_case(u))
            })
            .map(DeviceRow::from)
            .collect()
    });
    Ok(Json(rows).into_response())
}

async fn register(
    State(s): State<AdminState>,
    b: Result<Json<RegisterBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (identity, profile) = devices_of(&s)?;
    let b = body(b)?;
    let (key, private) = key_or_generate(b.public_key.as_deref())?;
    let r = identity
        .register_device(
            &b.user,
            key,
            // An administrator's registration is no sign-on: no second factor, never.
            &portcullis_identity::NewDevice {
                name: b.name.clone().unwrap_or_default(),
                lifetime: secs("lifetime_secs", b.lifetime_secs)?,
                sign_on: portcullis_identity::SignOn::default(),
                routes: b.routes.clone(),
            },
            Instant::now(),
            Utc::now(),
        )
        .await;
    let d = r?;
    tracing::info!(device = %d.id, user = %d.user_name, address = %d.address, expires = %d.expires, "admin: device registered");
    let text = s
        .scope
        .profile(profile, &s.commands, &d, private.as_deref())
        .await;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "device": DeviceRow::from(&d),
            "profile": text,
            "private_key_included": private.is_some(),
        })),
    )
        .into_response())
}

async fn rotate(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    b: Result<Json<RotateBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (identity, profile) = devices_of(&s)?;
    let id = parse_id(&id)?;
    // No body at all means "generate a key, default grace".
    let b = match b {
        Err(JsonRejection::MissingJsonContentType(_)) => RotateBody::default(),
        other => body(other)?,
    };
    let (key, private) = key_or_generate(b.public_key.as_deref())?;
    let r = identity
        .rotate_device(
            &id,
            key,
            secs("grace_secs", b.grace_secs)?,
            Instant::now(),
            Utc::now(),
        )
        .await;
    let d = r?;
    let previous = identity.read_devices(|all| all.get(&id).map(DeviceRow::from));
    tracing::info!(device = %d.id, previous = %id, user = %d.user_name, "admin: device rotated");
    let text = s
        .scope
        .profile(profile, &s.commands, &d, private.as_deref())
        .await;
    Ok(Json(json!({
        "device": DeviceRow::from(&d),
        "previous": previous,
        "profile": text,
        "private_key_included": private.is_some(),
    }))
    .into_response())
}

/// A registered device's `wg-quick` profile again (a site's router's included), without
/// its private key: the gateway never keeps one.
async fn profile_of(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (identity, profile) = devices_of(&s)?;
    let id = parse_id(&id)?;
    let d = identity
        .read_devices(|d| d.get(&id).cloned())
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no device {id}")))?;
    let text = s.scope.profile(profile, &s.commands, &d, None).await;
    Ok(Json(json!({
        "device": DeviceRow::from(&d),
        "profile": text,
        "private_key_included": false,
    }))
    .into_response())
}

async fn remove(State(s): State<AdminState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let (identity, _) = devices_of(&s)?;
    let id = parse_id(&id)?;
    let r = identity
        .remove_device(&id, Instant::now(), Utc::now())
        .await;
    let d = r?;
    tracing::info!(device = %id, user = %d.user_name, "admin: device removed");
    Ok(Json(json!({"device": DeviceRow::from(&d), "removed": true})).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn each_site_peer_carries_only_its_sites_networks_and_the_first_the_shared_ones() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        let mut sources = portcullis_policy::Sources::read(&dir).unwrap();
        if let Some((_, text)) = sources.networks.as_mut() {
            *text = text
                .replace(
                    "name = \"prod-db\"\n",
                    "name = \"prod-db\"\nsite = \"us-1\"\n",
                )
                .replace("name = \"dev\"\n", "name = \"dev\"\nsite = \"eu-1\"\n");
        }
        let bundle = PolicyBundle::from_sources(sources).unwrap();
        let template = |name: &str, key: u8| portcullis_identity::SitePeer {
            name: name.into(),
            public_key: [key; 32],
            endpoint: format!("{name}.example:51820"),
            allowed_ips: Vec::new(),
        };
        let templates = [
            template("eu-1", 1),
            template("us-1", 2),
            template("ap-1", 3),
        ];
        let tunnel: Vec<IpNet> = vec!["100.64.0.0/24".parse().unwrap()];
        let net = |n: &str| bundle.networks().iter().find(|x| x.name == n).unwrap();
        let cidrs = |p: &portcullis_identity::SitePeer| -> Vec<String> {
            p.allowed_ips.iter().map(ToString::to_string).collect()
        };
        // alice may reach prod (every site) and prod-db (us-1).
        let peers = site_peers(&templates, &bundle, &tunnel, &[net("prod"), net("prod-db")]);
        assert_eq!(
            cidrs(&peers[0]),
            ["10.8.0.0/16", "100.64.0.0/24", "fd00:8::/32"]
        );
        assert_eq!(cidrs(&peers[1]), ["10.8.5.0/24"]);
        assert!(
            peers[2].allowed_ips.is_empty(),
            "ap-1 serves nothing of hers"
        );
        // bob may reach dev (eu-1) only: the first site carries it with the tunnel.
        let peers = site_peers(&templates, &bundle, &tunnel, &[net("dev")]);
        assert_eq!(
            cidrs(&peers[0]),
            ["10.9.0.0/16", "100.64.0.0/24", "fd00:9::/32"]
        );
        assert!(peers[1].allowed_ips.is_empty());
        assert_eq!(peers[1].endpoint, "us-1.example:51820");
    }
}
