//! `[flows]`: flow table limits and idle timeouts.
//! The schema, its defaults, and the checks the section makes of itself.

use serde::Deserialize;

use super::{at_most_max, Invalid};

/// Flow table limits and idle timeouts (seconds).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowsConfig {
    pub max_flows: usize,
    pub max_flows_per_peer: usize,
    pub tcp_syn_timeout_secs: u64,
    pub tcp_established_timeout_secs: u64,
    pub tcp_closing_timeout_secs: u64,
    pub udp_timeout_secs: u64,
    pub icmp_timeout_secs: u64,
    pub other_timeout_secs: u64,
    pub fragment_timeout_secs: u64,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        FlowsConfig {
            max_flows: 262_144,
            max_flows_per_peer: 8_192,
            tcp_syn_timeout_secs: 30,
            tcp_established_timeout_secs: 3_600,
            tcp_closing_timeout_secs: 30,
            udp_timeout_secs: 60,
            icmp_timeout_secs: 30,
            other_timeout_secs: 60,
            fragment_timeout_secs: 30,
        }
    }
}

impl FlowsConfig {
    /// Limits at least 1; every timeout between 1 second and 10 years.
    pub(crate) fn check(&self) -> Result<(), Invalid> {
        if self.max_flows == 0 || self.max_flows_per_peer == 0 {
            return Err(Invalid::new("flows.max_flows", "limits must be at least 1"));
        }
        for (key, v) in [
            ("tcp_syn_timeout_secs", self.tcp_syn_timeout_secs),
            (
                "tcp_established_timeout_secs",
                self.tcp_established_timeout_secs,
            ),
            ("tcp_closing_timeout_secs", self.tcp_closing_timeout_secs),
            ("udp_timeout_secs", self.udp_timeout_secs),
            ("icmp_timeout_secs", self.icmp_timeout_secs),
            ("other_timeout_secs", self.other_timeout_secs),
            ("fragment_timeout_secs", self.fragment_timeout_secs),
        ] {
            let key = format!("flows.{key}");
            at_most_max(&key, v)?;
            if v == 0 {
                return Err(Invalid::new(key, "must be at least 1 second"));
            }
        }
        Ok(())
    }
}
