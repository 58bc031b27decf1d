//! `[mfa]`: the second factor at sign-on.
//! The schema, its defaults, and the checks the section makes of itself.

use std::path::PathBuf;

use serde::Deserialize;

use super::Invalid;

/// `[mfa]`: TOTP enrollment on the sign-on pages, and whether a sign-on needs a second
/// factor. The policies see the result as `context.mfa` and `context.auth_age_secs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MfaConfig {
    /// Users may enroll a TOTP authenticator on the enrollment pages (QR code).
    #[serde(default)]
    pub totp: bool,
    /// A sign-on needs a second factor when the IdP did not assert one: a TOTP code (or a
    /// recovery code) after the IdP's answer, else no device is enrolled or renewed.
    #[serde(default)]
    pub required: bool,
    /// The issuer authenticator apps show next to the account.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// The key that seals TOTP secrets at rest: 32 bytes as base64 or 64 hex digits
    /// (`head -c 32 /dev/urandom | base64 > mfa.key`). Required with `totp`.
    #[serde(default)]
    pub secret_key_file: Option<PathBuf>,
    /// SAML `AuthnContextClassRef` values that mean the IdP itself used a second factor.
    #[serde(default = "default_authn_contexts")]
    pub saml_authn_contexts: Vec<String>,
    /// Or a SAML attribute meaning it when its value is `true` (or `1`).
    #[serde(default)]
    pub saml_attribute: Option<String>,
}

impl Default for MfaConfig {
    /// No `[mfa]`: no TOTP, nothing required, the IdP's own second factor still counts.
    fn default() -> Self {
        MfaConfig {
            totp: false,
            required: false,
            issuer: default_issuer(),
            secret_key_file: None,
            saml_authn_contexts: default_authn_contexts(),
            saml_attribute: None,
        }
    }
}

impl MfaConfig {
    /// Whether a sign-on used a second factor by the IdP's word: one of the listed
    /// `AuthnContextClassRef`s, or the attribute `true`/`1`.
    pub fn idp_asserted(&self, class_refs: &[String], attribute_values: &[String]) -> bool {
        class_refs
            .iter()
            .any(|c| self.saml_authn_contexts.iter().any(|m| m == c))
            || attribute_values
                .iter()
                .any(|v| v.trim().eq_ignore_ascii_case("true") || v.trim() == "1")
    }
}

fn default_issuer() -> String {
    "Portcullis".into()
}

/// The values IdPs commonly send for a sign-on with a second factor.
fn default_authn_contexts() -> Vec<String> {
    [
        "https://refeds.org/profile/mfa",
        "http://schemas.microsoft.com/claims/multipleauthn",
        "urn:oasis:names:tc:SAML:2.0:ac:classes:MobileTwoFactorContract",
        "urn:oasis:names:tc:SAML:2.0:ac:classes:TimeSyncToken",
    ]
    .map(String::from)
    .into()
}

impl MfaConfig {
    pub(crate) fn check(&self) -> Result<(), Invalid> {
        let issuer = self.issuer.trim();
        if issuer.is_empty()
            || issuer.len() > 64
            || issuer.contains(':')
            || issuer.chars().any(char::is_control)
        {
            return Err(Invalid::new(
                "mfa.issuer",
                format!(
                    "{:?} must be 1-64 characters without ':' or control characters (apps split the label at ':')",
                    self.issuer
                ),
            ));
        }
        if self.totp && self.secret_key_file.is_none() {
            return Err(Invalid::new(
                "mfa.secret_key_file",
                "needed with totp = true: TOTP secrets are stored sealed with this key",
            ));
        }
        if let Some(i) = self
            .saml_authn_contexts
            .iter()
            .position(|c| c.trim().is_empty())
        {
            return Err(Invalid::new(
                format!("mfa.saml_authn_contexts[{i}]"),
                "must not be empty",
            ));
        }
        if self
            .saml_attribute
            .as_deref()
            .is_some_and(|a| a.trim().is_empty())
        {
            return Err(Invalid::new("mfa.saml_attribute", "must not be empty"));
        }
        if self.required
            && !self.totp
            && self.saml_authn_contexts.is_empty()
            && self.saml_attribute.is_none()
        {
            return Err(Invalid::new(
                "mfa.required",
                "no second factor is possible: enable totp, or list saml_authn_contexts or a saml_attribute",
            ));
        }
        Ok(())
    }
}
