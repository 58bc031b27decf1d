//! `[devices]`: WireGuard keys registered at run time.
//! The schema, its defaults, and the checks the section makes of itself.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::{at_most_max, Invalid};

/// `[devices]`: WireGuard keys registered at run time (the admin API, the SSO
/// enrollment), each with a tunnel address from `pool` and an expiry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesConfig {
    /// IPv4 addresses for devices, inside `gateway.tunnel_address`'s network; static
    /// `[[peer]]` addresses and the gateway's own are skipped.
    pub pool: ipnet::Ipv4Net,
    /// `host:port` the profiles tell clients to connect to.
    pub endpoint: String,
    /// How long a key is valid (the default and the most an administrator may give).
    #[serde(default = "default_key_lifetime")]
    pub key_lifetime_secs: u64,
    /// How long the old key keeps working after a rotation.
    #[serde(default = "default_rotation_grace")]
    pub rotation_grace_secs: u64,
    /// AllowedIPs in the profiles; empty: the tunnel network and every network in
    /// `networks.toml`.
    #[serde(default)]
    pub allowed_ips: Vec<IpNet>,
    /// DNS servers in the profiles.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    #[serde(default = "default_device_keepalive")]
    pub persistent_keepalive: Option<u16>,
}

fn default_key_lifetime() -> u64 {
    12 * 3600
}
fn default_rotation_grace() -> u64 {
    300
}
fn default_device_keepalive() -> Option<u16> {
    Some(25)
}

impl DevicesConfig {
    /// The pool inside the tunnel network `tunnel` (from `[gateway]`), the lifetimes,
    /// the endpoint.
    pub(crate) fn check(&self, tunnel: &IpNet) -> Result<(), Invalid> {
        at_most_max("devices.rotation_grace_secs", self.rotation_grace_secs)?;
        let net = match tunnel {
            IpNet::V4(n) => n.trunc(),
            IpNet::V6(_) => {
                return Err(Invalid::new(
                    "gateway.tunnel_address",
                    "must be IPv4 for [devices]",
                ))
            }
        };
        if !net.contains(&self.pool) {
            return Err(Invalid::new(
                "devices.pool",
                format!("{} is not inside the tunnel network {net}", self.pool),
            ));
        }
        if self.key_lifetime_secs == 0 || self.key_lifetime_secs > crate::MAX_DURATION_SECS {
            return Err(Invalid::new(
                "devices.key_lifetime_secs",
                format!(
                    "{} is out of range: must be at least 1 second and at most {} (10 years)",
                    self.key_lifetime_secs,
                    crate::MAX_DURATION_SECS
                ),
            ));
        }
        if self.rotation_grace_secs > self.key_lifetime_secs {
            return Err(Invalid::new(
                "devices.rotation_grace_secs",
                format!(
                    "{} is longer than key_lifetime_secs ({})",
                    self.rotation_grace_secs, self.key_lifetime_secs
                ),
            ));
        }
        let endpoint_ok = self.endpoint.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !endpoint_ok {
            return Err(Invalid::new(
                "devices.endpoint",
                format!("{:?} is not host:port", self.endpoint),
            ));
        }
        Ok(())
    }
}
