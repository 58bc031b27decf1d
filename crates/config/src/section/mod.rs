//! The configuration's sections, one file each: the schema of the section, its
//! defaults, and `check`, the rules the section can check by itself (ranges, formats,
//! keys that go together). Rules that span sections are in `validate`.

mod audit;
mod cluster;
mod console;
mod devices;
mod flows;
mod gateway;
mod http;
mod ldap;
mod mfa;
pub(crate) mod peers;
mod saml;

pub use audit::{AuditApiConfig, AuditConfig, ClickHouseConfig, FsyncMode, OnFull};
pub use cluster::{ClusterConfig, SiteConfig};
pub use console::{ConsoleConfig, MAX_CONSOLE_IDLE_SECS};
pub use devices::DevicesConfig;
pub use flows::FlowsConfig;
pub use gateway::{GatewayConfig, IdentityConfig, PolicyConfig};
pub use http::{AdminConfig, ApiConfig, HttpConfig, ScimConfig};
pub use ldap::{LdapAttributes, LdapConfig, LdapDisabled};
pub use mfa::MfaConfig;
pub use peers::{PeerConfig, UserConfig};
pub use saml::SamlConfig;

use crate::MAX_DURATION_SECS;

/// A section's refusal: the full key (`gateway.mtu`) and why. The loader adds the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Every duration is at most [`MAX_DURATION_SECS`]: an `Instant + Duration` past the
/// end of time panics.
pub(crate) fn at_most_max(key: &str, secs: u64) -> Result<(), Invalid> {
    if secs > MAX_DURATION_SECS {
        return Err(Invalid::new(
            key,
            format!("{secs} is out of range (at most {MAX_DURATION_SECS} seconds, 10 years)"),
        ));
    }
    Ok(())
}

/// `v` is within `1..=max`.
pub(crate) fn one_to(key: &str, v: u64, max: u64) -> Result<(), Invalid> {
    if v == 0 || v > max {
        return Err(Invalid::new(key, format!("{v} is outside 1..={max}")));
    }
    Ok(())
}

/// Each section checked on its own, from its TOML alone.
#[cfg(test)]
mod tests {
    use super::*;

    fn refusal<T: serde::de::DeserializeOwned>(
        toml_text: &str,
        check: impl Fn(&T) -> Result<(), Invalid>,
    ) -> Option<String> {
        let section: T = match toml::from_str(toml_text) {
            Ok(s) => s,
            Err(e) => return Some(format!("parse: {e}")),
        };
        check(&section).err().map(|e| e.key)
    }

    #[test]
    fn each_section_names_its_own_bad_key() {
        let http = |extra: &str| format!("listen = \"127.0.0.1:8080\"\n{extra}");
        assert_eq!(refusal::<HttpConfig>(&http(""), HttpConfig::check), None);
        for (extra, key) in [
            ("header_timeout_secs = 0", "http.header_timeout_secs"),
            ("idle_timeout_secs = 86401", "http.idle_timeout_secs"),
            ("max_connections = 0", "http.max_connections"),
            ("cert_file = \"c.pem\"", "http.key_file"),
            ("max_body_bytes = 10", "http.max_body_bytes"),
        ] {
            assert_eq!(
                refusal::<HttpConfig>(&http(extra), HttpConfig::check).as_deref(),
                Some(key),
                "{extra}"
            );
        }
        let ldap = |extra: &str| {
            format!("url = \"ldap://127.0.0.1:389\"\nuser_base = \"ou=people,dc=x\"\ngroup_base = \"ou=groups,dc=x\"\n{extra}")
        };
        assert_eq!(refusal::<LdapConfig>(&ldap(""), LdapConfig::check), None);
        for (extra, key) in [
            ("max_removal_share = 1.5", "ldap.max_removal_share"),
            ("bind_dn = \"cn=a\"", "ldap.password_file"),
            ("ca_file = \"ca.pem\"", "ldap.ca_file"),
            (
                "reconcile_interval_secs = 3",
                "ldap.reconcile_interval_secs",
            ),
            ("user_filter = \"uid=*\"", "ldap.user_filter"),
            ("timeout_secs = 18446744073709551615", "ldap.timeout_secs"),
        ] {
            assert_eq!(
                refusal::<LdapConfig>(&ldap(extra), LdapConfig::check).as_deref(),
                Some(key),
                "{extra}"
            );
        }
        let cluster = |id: &str, url: &str| format!("node_id = \"{id}\"\ndatabase_url = \"{url}\"");
        let pg = "postgres://portcullis@127.0.0.1:5432/portcullis";
        assert_eq!(
            refusal::<ClusterConfig>(&cluster("gw-a", pg), ClusterConfig::check),
            None
        );
        for (id, url, key) in [
            ("", pg, "cluster.node_id"),
            ("gw a", pg, "cluster.node_id"),
            ("gw-a", "mysql://x/y", "cluster.database_url"),
            (
                "gw-a",
                "postgres://portcullis:hunter2@127.0.0.1/p",
                "cluster.database_url",
            ),
            (
                "gw-a",
                "postgres://127.0.0.1/p?password=hunter2",
                "cluster.database_url",
            ),
        ] {
            let got = refusal::<ClusterConfig>(&cluster(id, url), ClusterConfig::check);
            assert_eq!(got.as_deref(), Some(key), "{id} {url}");
        }
        let flows_ok = refusal::<FlowsConfig>("", FlowsConfig::check);
        assert_eq!(flows_ok, None);
        assert_eq!(
            refusal::<FlowsConfig>("udp_timeout_secs = 0", FlowsConfig::check).as_deref(),
            Some("flows.udp_timeout_secs")
        );
        assert_eq!(
            refusal::<FlowsConfig>("max_flows = 0", FlowsConfig::check).as_deref(),
            Some("flows.max_flows")
        );
        let tunnel: ipnet::IpNet = "100.64.0.1/16".parse().unwrap_or_else(|_| unreachable!());
        let devices = |extra: &str| {
            format!("pool = \"100.64.8.0/24\"\nendpoint = \"vpn.example.com:51820\"\n{extra}")
        };
        let check_devices = |d: &DevicesConfig| d.check(&tunnel);
        assert_eq!(refusal::<DevicesConfig>(&devices(""), check_devices), None);
        for (extra, key) in [
            ("key_lifetime_secs = 0", "devices.key_lifetime_secs"),
            (
                "rotation_grace_secs = 99999999999",
                "devices.rotation_grace_secs",
            ),
        ] {
            assert_eq!(
                refusal::<DevicesConfig>(&devices(extra), check_devices).as_deref(),
                Some(key),
                "{extra}"
            );
        }
        assert_eq!(
            refusal::<DevicesConfig>(
                "pool = \"10.0.0.0/24\"\nendpoint = \"vpn:51820\"",
                check_devices
            )
            .as_deref(),
            Some("devices.pool")
        );
        assert_eq!(
            refusal::<DevicesConfig>(
                "pool = \"100.64.8.0/24\"\nendpoint = \"vpn\"",
                check_devices
            )
            .as_deref(),
            Some("devices.endpoint")
        );
    }
}
