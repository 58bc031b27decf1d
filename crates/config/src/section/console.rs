//! `[console]`: the web console under `/console`, and who may do what in it.

use serde::Deserialize;

use super::Invalid;

/// The longest idle time a console session may be given (a day).
pub const MAX_CONSOLE_IDLE_SECS: u64 = 86_400;

/// `[console]`: roles from the IdP groups a user signed in with (re-read at every
/// sign-in). A user in none of them is refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Everything: policies, users, sessions, devices, audit.
    #[serde(default)]
    pub admin_groups: Vec<String>,
    /// Read-only: audit search, reports, verification, policies (read).
    #[serde(default)]
    pub auditor_groups: Vec<String>,
    /// Users, sessions and devices: disable, kill, rotate, remove.
    #[serde(default)]
    pub helpdesk_groups: Vec<String>,
    /// A console session ends after this long without a request.
    #[serde(default = "default_idle_secs")]
    pub idle_timeout_secs: u64,
}

fn default_idle_secs() -> u64 {
    30 * 60
}

impl ConsoleConfig {
    pub(crate) fn check(&self) -> Result<(), Invalid> {
        if self.admin_groups.is_empty()
            && self.auditor_groups.is_empty()
            && self.helpdesk_groups.is_empty()
        {
            return Err(Invalid::new(
                "console.admin_groups",
                "no group has any role: name at least one of admin_groups, auditor_groups, helpdesk_groups",
            ));
        }
        for (key, list) in [
            ("console.admin_groups", &self.admin_groups),
            ("console.auditor_groups", &self.auditor_groups),
            ("console.helpdesk_groups", &self.helpdesk_groups),
        ] {
            if let Some(g) = list.iter().find(|g| g.trim().is_empty()) {
                return Err(Invalid::new(key, format!("an empty group name {g:?}")));
            }
        }
        if !(60..=MAX_CONSOLE_IDLE_SECS).contains(&self.idle_timeout_secs) {
            return Err(Invalid::new(
                "console.idle_timeout_secs",
                format!(
                    "{} is out of range: 60 to {MAX_CONSOLE_IDLE_SECS}",
                    self.idle_timeout_secs
                ),
            ));
        }
        Ok(())
    }
}
