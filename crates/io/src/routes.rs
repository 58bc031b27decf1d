//! Kernel routes for routed peers: each subnet behind a peer (`[[peer]] routes`, or a
//! device's routes) is routed to the TUN device, so return traffic from the private
//! side reaches the gateway, whose flow table sends it to the owning peer.
//!
//! Installed with iproute2 (`ip route replace SUBNET dev TUN`): idempotent, and the
//! routes go with the TUN device when the process exits. A route of a removed device is
//! left until then: traffic to it meets no flow and is dropped. What the operator adds
//! on the private side is the reverse: the subnets via the gateway's private address.

use std::process::Command;

use anyhow::{anyhow, Context as _};
use ipnet::IpNet;

/// Routes `routes` to `tun`, failing on the first that cannot be installed.
pub fn install(tun: &str, routes: &[IpNet]) -> anyhow::Result<()> {
    for route in routes {
        let family = if matches!(route, IpNet::V6(_)) {
            "-6"
        } else {
            "-4"
        };
        let out = Command::new("ip")
            .args([family, "route", "replace", &route.to_string(), "dev", tun])
            .output()
            .with_context(|| format!("running `ip route replace {route} dev {tun}`"))?;
        if !out.status.success() {
            return Err(anyhow!(
                "routing {route} to {tun}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        tracing::info!(%route, tun, "routed subnet installed");
    }
    Ok(())
}

/// [`install`] off the calling thread (the packet loop must not wait on a process);
/// a failure is logged.
pub fn install_in_background(tun: &str, routes: Vec<IpNet>) {
    if routes.is_empty() {
        return;
    }
    let tun = tun.to_string();
    let spawned = std::thread::Builder::new()
        .name("routes".into())
        .spawn(move || {
            if let Err(e) = install(&tun, &routes) {
                tracing::error!("routed subnet not installed: {e:#}");
            }
        });
    if let Err(e) = spawned {
        tracing::error!("routed subnet not installed: {e}");
    }
}
