//! `[saml]`: single sign-on through the company IdP.
//! The schema, its defaults, and the checks the section makes of itself.

use serde::Deserialize;

use super::{at_most_max, Invalid};

/// `[saml]`: users log in through the company IdP (SP-initiated, HTTP-Redirect then
/// HTTP-POST) and enroll devices on the pages under `/enroll`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamlConfig {
    /// The IdP's metadata: a file, or an `https://` (or `http://`) URL fetched at start
    /// and every `metadata_refresh_secs`.
    pub idp_metadata: String,
    /// How browsers reach `[http] listen`, e.g. `https://vpn.example.com`; the SP's
    /// URLs are `<base_url>/saml/metadata`, `/saml/acs`, `/saml/logout`.
    pub base_url: String,
    /// This SP's entity id; default `<base_url>/saml/metadata`.
    #[serde(default)]
    pub entity_id: Option<String>,
    /// The attribute holding the user name; absent: the NameID.
    #[serde(default)]
    pub user_attribute: Option<String>,
    /// The attribute holding the user's groups.
    #[serde(default = "default_groups_attribute")]
    pub groups_attribute: String,
    /// Tolerated clock difference with the IdP.
    #[serde(default = "default_saml_skew")]
    pub max_clock_skew_secs: u64,
    /// A login lasts until the IdP's SessionNotOnOrAfter, at most this long; devices
    /// enrolled or renewed by it expire then (also capped by `[devices]`).
    #[serde(default = "default_login_max")]
    pub login_max_secs: u64,
    #[serde(default = "default_metadata_refresh")]
    pub metadata_refresh_secs: u64,
    /// Accept logins the IdP starts (no InResponseTo). Off: only logins started here.
    #[serde(default)]
    pub allow_idp_initiated: bool,
}

fn default_groups_attribute() -> String {
    "groups".into()
}
fn default_saml_skew() -> u64 {
    60
}
fn default_login_max() -> u64 {
    12 * 3600
}
fn default_metadata_refresh() -> u64 {
    3600
}

impl SamlConfig {
    /// `base_url` without a trailing slash.
    pub fn base(&self) -> &str {
        self.base_url.trim_end_matches('/')
    }

    pub fn metadata_url(&self) -> String {
        format!("{}/saml/metadata", self.base())
    }

    pub fn entity_id(&self) -> String {
        self.entity_id
            .clone()
            .unwrap_or_else(|| self.metadata_url())
    }

    /// Whether `idp_metadata` is a URL (else a file).
    pub fn idp_metadata_is_url(&self) -> bool {
        self.idp_metadata.starts_with("https://") || self.idp_metadata.starts_with("http://")
    }
}

impl SamlConfig {
    /// The base URL, the groups attribute, the clock skew and the lifetimes.
    pub(crate) fn check(&self) -> Result<(), Invalid> {
        at_most_max("saml.login_max_secs", self.login_max_secs)?;
        at_most_max("saml.metadata_refresh_secs", self.metadata_refresh_secs)?;
        let base = self.base();
        let scheme_ok = base.starts_with("https://") || base.starts_with("http://");
        if !scheme_ok || base.contains(['?', '#']) || base.len() <= "https://".len() {
            return Err(Invalid::new(
                "saml.base_url",
                format!("{base:?} must be an http(s):// URL without query or fragment"),
            ));
        }
        if self.groups_attribute.trim().is_empty() {
            return Err(Invalid::new("saml.groups_attribute", "must not be empty"));
        }
        if !(1..=3600).contains(&self.max_clock_skew_secs) {
            return Err(Invalid::new(
                "saml.max_clock_skew_secs",
                format!("{} is outside 1..=3600", self.max_clock_skew_secs),
            ));
        }
        if self.login_max_secs < 60 || self.metadata_refresh_secs < 60 {
            return Err(Invalid::new(
                "saml.login_max_secs",
                "login_max_secs and metadata_refresh_secs are at least 60",
            ));
        }
        Ok(())
    }
}
