//! `[[user]]` and `[[peer]]`: the configuration file's own users and devices.
//! The schema, its defaults, and the checks the section makes of itself.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::Invalid;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub user: String,
    /// Base64 X25519 public key, as `wg pubkey` prints it.
    pub public_key: String,
    pub address: IpAddr,
    #[serde(default)]
    pub address6: Option<IpAddr>,
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
    /// Subnets behind this peer (an office router): inner sources it may use, and the
    /// gateway's kernel routes towards the tunnel.
    #[serde(default)]
    pub routes: Vec<IpNet>,
}

/// What the `[[user]]` and `[[peer]]` tables yield once checked.
#[derive(Debug, Default)]
pub(crate) struct CheckedPeers {
    /// Each peer's decoded public key, in order.
    pub keys: Vec<[u8; 32]>,
    /// Not errors, but worth saying (without the file name).
    pub warnings: Vec<String>,
}

/// Users have unique, non-empty names; each peer a unique, valid key and unique host
/// addresses inside the tunnel networks of `[gateway]`.
pub(crate) fn check(
    users: &[UserConfig],
    peers: &[PeerConfig],
    gateway: &super::GatewayConfig,
) -> Result<CheckedPeers, Invalid> {
    let mut out = CheckedPeers::default();
    let mut user_names = std::collections::HashSet::new();
    for (i, u) in users.iter().enumerate() {
        if u.name.is_empty() {
            return Err(Invalid::new(format!("user[{i}].name"), "must not be empty"));
        }
        if !user_names.insert(u.name.as_str()) {
            return Err(Invalid::new(
                format!("user[{i}].name"),
                format!("duplicate user {:?}", u.name),
            ));
        }
    }
    let mut seen_keys = std::collections::HashSet::new();
    let mut seen_addrs = std::collections::HashSet::new();
    let mut seen_routes: Vec<(IpNet, String)> = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let key = crate::decode_key(&p.public_key)
            .map_err(|r| Invalid::new(format!("peer[{i}].public_key"), r))?;
        if !seen_keys.insert(key) {
            return Err(Invalid::new(
                format!("peer[{i}].public_key"),
                "the same public key is configured twice",
            ));
        }
        out.keys.push(key);
        let nets: [(Option<IpAddr>, Option<IpNet>, &str); 2] = [
            (Some(p.address), Some(gateway.tunnel_address), "address"),
            (p.address6, gateway.tunnel_address6, "address6"),
        ];
        for (addr, net, key) in nets {
            let Some(addr) = addr else { continue };
            let Some(net) = net else {
                return Err(Invalid::new(
                    format!("peer[{i}].{key}"),
                    "gateway.tunnel_address6 is not set",
                ));
            };
            if !net.contains(&addr) || addr == net.addr() || addr == net.network() {
                return Err(Invalid::new(
                    format!("peer[{i}].{key}"),
                    format!("{addr} is not a usable host address of the tunnel network {net}"),
                ));
            }
            if !seen_addrs.insert(addr) {
                return Err(Invalid::new(
                    format!("peer[{i}].{key}"),
                    format!("{addr} is assigned to another peer"),
                ));
            }
        }
        for (j, route) in p.routes.iter().enumerate() {
            let key = format!("peer[{i}].routes[{j}]");
            check_route(route, gateway).map_err(|r| Invalid::new(key.clone(), r))?;
            if let Some((other, at)) = seen_routes
                .iter()
                .find(|(o, _): &&(IpNet, String)| overlaps(o, route))
            {
                return Err(Invalid::new(
                    key,
                    format!("{route} of {:?} overlaps {other} ({at}): every source address has one owner", p.user),
                ));
            }
            seen_routes.push((*route, format!("peer[{i}].routes[{j}] of {:?}", p.user)));
        }
        if !user_names.contains(p.user.as_str()) {
            out.warnings.push(format!(
                "peer[{i}] names user {:?}, which no [[user]] defines: it has no access until an identity source provides that user",
                p.user
            ));
        }
    }
    Ok(out)
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A routed subnet is a network (no host bits), not everything, and outside the tunnel
/// networks (whose addresses are the devices' own).
fn check_route(route: &IpNet, gateway: &super::GatewayConfig) -> Result<(), String> {
    if route.addr() != route.network() {
        return Err(format!(
            "{route} has host bits set: the subnet is {}",
            route.trunc()
        ));
    }
    if route.prefix_len() == 0 {
        return Err(format!(
            "{route} is every address: a routed peer carries named subnets, not a default route"
        ));
    }
    for net in std::iter::once(gateway.tunnel_address).chain(gateway.tunnel_address6) {
        let net = net.trunc();
        if overlaps(&net, route) {
            return Err(format!("{route} overlaps the tunnel network {net}"));
        }
    }
    Ok(())
}
