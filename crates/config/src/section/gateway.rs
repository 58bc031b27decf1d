//! `[gateway]`, `[policy]` and `[identity]`.
//! The schema, its defaults, and the checks the section makes of itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;

use super::{at_most_max, Invalid};

/// `[identity]`: the directory the identity sources keep.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The SQLite database (relative to the config file).
    #[serde(default = "default_identity_database")]
    pub database: PathBuf,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            database: default_identity_database(),
        }
    }
}

fn default_identity_database() -> PathBuf {
    PathBuf::from("identity.db")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// This gateway's name in audit events.
    #[serde(default = "default_gateway_id")]
    pub id: String,
    pub listen: SocketAddr,
    pub private_key_file: PathBuf,
    pub tun_name: String,
    /// The gateway's IPv4 address on the tunnel, with the tunnel prefix.
    pub tunnel_address: IpNet,
    /// Optional IPv6 tunnel address and prefix.
    #[serde(default)]
    pub tunnel_address6: Option<IpNet>,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// TUN offloads (TSO/GRO through virtio-net headers) and UDP GSO/GRO batching.
    #[serde(default = "default_true")]
    pub offload: bool,
    /// UDP socket send and receive buffer size.
    #[serde(default = "default_socket_buffer")]
    pub socket_buffer_bytes: usize,
    /// A session ends after this long without an authenticated packet from the peer.
    #[serde(default = "default_session_idle")]
    pub session_idle_timeout_secs: u64,
}

fn default_gateway_id() -> String {
    "portcullis".into()
}
fn default_true() -> bool {
    true
}
fn default_mtu() -> u16 {
    1420
}
fn default_socket_buffer() -> usize {
    7 * 1024 * 1024
}
fn default_session_idle() -> u64 {
    180
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub dir: PathBuf,
}

impl GatewayConfig {
    /// The interface name, the tunnel addresses, the MTU, the idle timeout.
    pub(crate) fn check(&self) -> Result<(), Invalid> {
        if self.tun_name.is_empty() || self.tun_name.len() > 15 {
            return Err(Invalid::new(
                "gateway.tun_name",
                format!(
                    "{:?} must be 1 to 15 characters (a Linux interface name)",
                    self.tun_name
                ),
            ));
        }
        if !self.tunnel_address.addr().is_ipv4() {
            return Err(Invalid::new(
                "gateway.tunnel_address",
                format!(
                    "{} is not IPv4 (use tunnel_address6 for IPv6)",
                    self.tunnel_address
                ),
            ));
        }
        if let Some(v6) = self.tunnel_address6 {
            if !v6.addr().is_ipv6() {
                return Err(Invalid::new(
                    "gateway.tunnel_address6",
                    format!("{v6} is not IPv6"),
                ));
            }
        }
        let min_mtu = if self.tunnel_address6.is_some() {
            1280
        } else {
            576
        };
        if !(min_mtu..=9000).contains(&self.mtu) {
            return Err(Invalid::new(
                "gateway.mtu",
                format!("{} is outside {min_mtu}..=9000", self.mtu),
            ));
        }
        at_most_max(
            "gateway.session_idle_timeout_secs",
            self.session_idle_timeout_secs,
        )
    }
}
