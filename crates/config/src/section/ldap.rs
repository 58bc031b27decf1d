//! `[ldap]`: users and groups pushed from an LDAP directory.
//! The schema, its defaults, and the checks the section makes of itself.

use std::path::PathBuf;

use serde::Deserialize;

use super::{at_most_max, Invalid};

/// `[ldap]`: users and groups pushed from an LDAP directory (RFC 4533 refreshAndPersist,
/// as OpenLDAP's syncprov serves it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldap://host:port`, or `ldaps://host:port` (TLS, the server's certificate checked
    /// against `ca_file` or the system's CAs, and its name against the URL's host).
    pub url: String,
    /// PEM CA certificates to trust for ldaps:// instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Simple bind; anonymous when absent.
    #[serde(default)]
    pub bind_dn: Option<String>,
    /// Holds the bind password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    pub user_base: String,
    #[serde(default = "default_user_filter")]
    pub user_filter: String,
    pub group_base: String,
    #[serde(default = "default_group_filter")]
    pub group_filter: String,
    #[serde(default)]
    pub attributes: LdapAttributes,
    /// How a disabled account is recognised; without it every listed user is active.
    #[serde(default)]
    pub disabled: Option<LdapDisabled>,
    /// A full re-read of the directory, as a safety net under the push, every this many
    /// seconds.
    #[serde(default = "default_reconcile_secs")]
    pub reconcile_interval_secs: u64,
    /// A full pass that would take access from more than this share of the directory's
    /// users (0.0..=1.0) is refused until an administrator approves it
    /// (`portcullis ldap approve-removal`). A pass that would leave no user is always refused.
    #[serde(default = "default_max_removal_share")]
    pub max_removal_share: f64,
    /// Connect and bind timeout.
    #[serde(default = "default_ldap_timeout")]
    pub timeout_secs: u64,
}

fn default_user_filter() -> String {
    "(objectClass=inetOrgPerson)".into()
}
fn default_group_filter() -> String {
    "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))".into()
}
fn default_reconcile_secs() -> u64 {
    900
}
fn default_max_removal_share() -> f64 {
    0.2
}
fn default_ldap_timeout() -> u64 {
    10
}

/// `[ldap.attributes]`: which LDAP attribute holds what.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LdapAttributes {
    /// The login name policies see (`User::"<value>"`).
    pub user_name: String,
    pub email: String,
    pub display_name: String,
    /// Multi-valued attribute whose values become the user's tags.
    pub tags: Option<String>,
    pub group_name: String,
    /// The groups' member attribute (DNs of users).
    pub member: String,
}

impl Default for LdapAttributes {
    fn default() -> Self {
        LdapAttributes {
            user_name: "uid".into(),
            email: "mail".into(),
            display_name: "cn".into(),
            tags: None,
            group_name: "cn".into(),
            member: "member".into(),
        }
    }
}

/// `[ldap.disabled]`: a user is disabled when `attribute` is present and, if `values` is
/// given, holds one of them (case-insensitive), or, if `bitmask` is given, its integer
/// value has one of those bits (Active Directory: `userAccountControl`, bitmask 2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapDisabled {
    pub attribute: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub bitmask: Option<u64>,
}

impl LdapConfig {
    /// The URL and its TLS, the removal guard, the bind pair, the intervals, the filters.
    pub(crate) fn check(&self) -> Result<(), Invalid> {
        at_most_max("ldap.reconcile_interval_secs", self.reconcile_interval_secs)?;
        at_most_max("ldap.timeout_secs", self.timeout_secs)?;
        if !(self.url.starts_with("ldap://") || self.url.starts_with("ldaps://")) {
            return Err(Invalid::new(
                "ldap.url",
                format!("{:?} is not an ldap:// or ldaps:// URL", self.url),
            ));
        }
        if self.ca_file.is_some() && !self.url.starts_with("ldaps://") {
            return Err(Invalid::new(
                "ldap.ca_file",
                "only used with an ldaps:// url",
            ));
        }
        if !(0.0..=1.0).contains(&self.max_removal_share) {
            return Err(Invalid::new(
                "ldap.max_removal_share",
                format!("{} is outside 0.0..=1.0", self.max_removal_share),
            ));
        }
        if self.bind_dn.is_some() != self.password_file.is_some() {
            return Err(Invalid::new(
                "ldap.password_file",
                "bind_dn and password_file go together (neither: anonymous bind)",
            ));
        }
        if self.reconcile_interval_secs < 10 {
            return Err(Invalid::new(
                "ldap.reconcile_interval_secs",
                format!("{} is below 10", self.reconcile_interval_secs),
            ));
        }
        for (key, v) in [
            ("user_filter", &self.user_filter),
            ("group_filter", &self.group_filter),
        ] {
            if !(v.starts_with('(') && v.ends_with(')')) {
                return Err(Invalid::new(
                    format!("ldap.{key}"),
                    format!("{v:?} is not an LDAP filter in parentheses (RFC 4515)"),
                ));
            }
        }
        Ok(())
    }
}
