//! The SAML 2.0 service provider behind the login pages, on samael (xmlsec).
//!
//! What it does: builds the SP metadata, starts SP-initiated logins (an HTTP-Redirect
//! AuthnRequest with a one-time, 128-bit request id) and checks what the IdP posts to the
//! ACS, strictly:
//! - the IdP metadata must carry a signing certificate (samael would otherwise skip the
//!   signature check); several are accepted during an IdP key rollover;
//! - a valid signature over the response or the assertion, RSA-SHA256 or stronger (or
//!   ECDSA-SHA256 or stronger); only the signed part is read (samael reduces the
//!   document to what the signature covers, which defeats signature wrapping);
//! - Destination, Recipient, Issuer, and an Audience naming this SP are required;
//! - InResponseTo must be a request id this SP issued and has not seen answered yet;
//! - NotBefore / NotOnOrAfter with a bounded clock skew;
//! - an assertion id is remembered until the assertion expires: a replay is refused;
//! - documents with a DOCTYPE or an XML comment are refused before parsing (comments
//!   inside a NameID are the classic truncation attack; no IdP sends either);
//! - IdP-initiated logins are refused unless configured.
//!
//! The user name comes from a configured attribute (or the NameID), the groups from
//! another; the login's end is the AuthnStatement's SessionNotOnOrAfter.
//!
//! Sans-IO: no sockets, no clock of its own for the caches (`now` is passed in). samael
//! itself compares the document's times with the system clock.
//!
//! What it deliberately does not: encrypted assertions, single logout, signed
//! AuthnRequests, fetching the IdP metadata (the io layer reads the file or URL).

use std::collections::HashMap;

use base64::Engine as _;
use chrono::{DateTime, TimeDelta, Utc};
use samael::crypto::AllowedSignatureAlgorithm;
use samael::metadata::EntityDescriptor;
use samael::schema::Assertion;
use samael::service_provider::{ServiceProvider, ServiceProviderBuilder};

/// Largest SAMLResponse accepted (base64 text).
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// Logins started and not finished, at most; older ones are dropped first.
pub const MAX_PENDING: usize = 10_000;

const HTTP_REDIRECT: &str = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect";

/// Why a login was refused, or the SP could not be set up. Messages name the check.
#[derive(Debug, thiserror::Error)]
pub enum SamlError {
    #[error("idp metadata: {0}")]
    Metadata(String),
    #[error("idp metadata has no signing certificate: refusing to accept unsigned logins")]
    NoSigningCertificate,
    #[error("idp metadata has no HTTP-Redirect SingleSignOnService")]
    NoSsoEndpoint,
    #[error("SAMLResponse is over {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("SAMLResponse is not base64 UTF-8")]
    Encoding,
    #[error("SAMLResponse holds a {0}; refused")]
    Forbidden(&'static str),
    #[error("response refused: {0}")]
    Invalid(String),
    #[error("the assertion has no audience naming this service provider")]
    Audience,
    #[error("the assertion {0:?} was already used")]
    Replayed(String),
    #[error("the assertion has no user name ({0})")]
    NoUser(String),
    #[error("building the request: {0}")]
    Request(String),
}

/// The SP's settings.
#[derive(Clone, Debug)]
pub struct SpConfig {
    /// This SP's entity id (defaults to the metadata URL in the caller).
    pub entity_id: String,
    /// `https://host/saml/metadata`.
    pub metadata_url: String,
    /// `https://host/saml/acs`.
    pub acs_url: String,
    /// `https://host/saml/logout`: the metadata must name one (it ends the local session).
    pub logout_url: String,
    /// The attribute holding the user name; `None`: the NameID.
    pub user_attribute: Option<String>,
    /// The attribute holding the groups.
    pub groups_attribute: String,
    /// Tolerated clock difference with the IdP.
    pub max_clock_skew: TimeDelta,
    /// How long a started login may take.
    pub request_lifetime: TimeDelta,
    pub allow_idp_initiated: bool,
    /// An attribute saying the IdP used a second factor (`[mfa] saml_attribute`).
    pub mfa_attribute: Option<String>,
}

/// A successful login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub groups: Vec<String>,
    /// The IdP's end of this login session, if it said.
    pub session_not_on_or_after: Option<DateTime<Utc>>,
    /// When the IdP authenticated the user (its `AuthnInstant`, never after now): an IdP
    /// session reused hours later is that old.
    pub authn_instant: Option<DateTime<Utc>>,
    /// Every `AuthnContextClassRef` the assertion states.
    pub authn_context_class_refs: Vec<String>,
    /// The values of `mfa_attribute`, if configured.
    pub mfa_attribute_values: Vec<String>,
    pub assertion_id: String,
    /// Until when the assertion id must be remembered (nothing accepts it after).
    pub assertion_forget_at: DateTime<Utc>,
    /// The request this answers (`None`: IdP-initiated).
    pub request_id: Option<String>,
    /// What the browser asked to return to.
    pub relay_state: Option<String>,
}

/// The request id [`Sp::handle_login_start`] gives a login started with `random`.
pub fn request_id(random: &[u8; 16]) -> String {
    format!("_{}", hex_encode(random))
}

/// The service provider with its one-time request ids and replay cache.
pub struct Sp {
    config: SpConfig,
    sp: ServiceProvider,
    sso_url: String,
    /// Request id → (expires, relay state).
    pending: HashMap<String, (DateTime<Utc>, String)>,
    /// Assertion id → forget after.
    seen: HashMap<String, DateTime<Utc>>,
}

impl std::fmt::Debug for Sp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sp")
            .field("entity_id", &self.config.entity_id)
            .field("sso_url", &self.sso_url)
            .field("pending", &self.pending.len())
            .field("seen", &self.seen.len())
            .finish_non_exhaustive()
    }
}

fn build(config: &SpConfig, idp_metadata: &str) -> Result<(ServiceProvider, String), SamlError> {
    let idp: EntityDescriptor = idp_metadata
        .parse()
        .map_err(|e| SamlError::Metadata(format!("{e}")))?;
    let sso_url = idp
        .idp_sso_descriptors
        .iter()
        .flatten()
        .flat_map(|d| d.single_sign_on_services.iter())
        .find(|s| s.binding == HTTP_REDIRECT)
        .map(|s| s.location.clone())
        .ok_or(SamlError::NoSsoEndpoint)?;
    let sp = ServiceProviderBuilder::default()
        .entity_id(Some(config.entity_id.clone()))
        .metadata_url(Some(config.metadata_url.clone()))
        .acs_url(Some(config.acs_url.clone()))
        .slo_url(Some(config.logout_url.clone()))
        .idp_metadata(idp)
        .allow_idp_initiated(config.allow_idp_initiated)
        .max_clock_skew(config.max_clock_skew)
        .allowed_signature_algorithms(Some(vec![
            AllowedSignatureAlgorithm::RsaSha256,
            AllowedSignatureAlgorithm::RsaSha384,
            AllowedSignatureAlgorithm::RsaSha512,
            AllowedSignatureAlgorithm::EcdsaSha256,
            AllowedSignatureAlgorithm::EcdsaSha384,
            AllowedSignatureAlgorithm::EcdsaSha512,
        ]))
        .build()
        .map_err(|e| SamlError::Metadata(e.to_string()))?;
    match sp.idp_signing_certs() {
        Ok(Some(certs)) if !certs.is_empty() => {}
        Ok(_) => return Err(SamlError::NoSigningCertificate),
        Err(e) => return Err(SamlError::Metadata(e.to_string())),
    }
    Ok((sp, sso_url))
}

impl Sp {
    /// Sets up the SP; refuses IdP metadata without a signing certificate.
    pub fn new(config: SpConfig, idp_metadata: &str) -> Result<Sp, SamlError> {
        let (sp, sso_url) = build(&config, idp_metadata)?;
        Ok(Sp {
            config,
            sp,
            sso_url,
            pending: HashMap::new(),
            seen: HashMap::new(),
        })
    }

    /// Replaces the IdP metadata (a refresh); a refused document keeps the current one.
    /// Started logins and the replay cache stay.
    pub fn handle_idp_metadata(&mut self, idp_metadata: &str) -> Result<(), SamlError> {
        let (sp, sso_url) = build(&self.config, idp_metadata)?;
        self.sp = sp;
        self.sso_url = sso_url;
        Ok(())
    }

    pub fn config(&self) -> &SpConfig {
        &self.config
    }

    /// The SP metadata document.
    pub fn metadata_xml(&self) -> Result<String, SamlError> {
        let md = self
            .sp
            .metadata()
            .map_err(|e| SamlError::Request(e.to_string()))?;
        samael::traits::ToXml::to_string(&md).map_err(|e| SamlError::Request(format!("{e:?}")))
    }

    /// Starts a login: the URL to redirect the browser to. `relay_state` comes back
    /// with the [`Login`]. `random` is 16 fresh random bytes (the request id).
    pub fn handle_login_start(
        &mut self,
        relay_state: &str,
        random: [u8; 16],
        now: DateTime<Utc>,
    ) -> Result<String, SamlError> {
        let mut req = self
            .sp
            .make_authentication_request(&self.sso_url)
            .map_err(|e| SamlError::Request(e.to_string()))?;
        // samael's ids carry 32 random bits; ours 128.
        req.id = request_id(&random);
        let url = req
            .redirect("")
            .map_err(|e| SamlError::Request(e.to_string()))?
            .ok_or_else(|| SamlError::Request("no destination".into()))?;
        self.forget(now);
        if self.pending.len() >= MAX_PENDING {
            // Drop the oldest: a flood of started logins cannot grow memory.
            if let Some(oldest) = self
                .pending
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone())
            {
                self.pending.remove(&oldest);
            }
        }
        self.pending.insert(
            req.id.clone(),
            (now + self.config.request_lifetime, relay_state.to_string()),
        );
        Ok(url.to_string())
    }

    /// Accepts answers to a login another node of a cluster started (its id, expiry and
    /// relay state, from the shared store); a known id is left as it is.
    pub fn add_pending(&mut self, id: String, expires: DateTime<Utc>, relay_state: String) {
        if self.pending.len() < MAX_PENDING {
            self.pending.entry(id).or_insert((expires, relay_state));
        }
    }

    /// Checks a posted SAMLResponse; on success the request id is used up and the
    /// assertion id remembered.
    pub fn handle_acs(
        &mut self,
        saml_response: &str,
        now: DateTime<Utc>,
    ) -> Result<Login, SamlError> {
        if saml_response.len() > MAX_RESPONSE_BYTES {
            return Err(SamlError::TooLarge);
        }
        let compact: String = saml_response.split_whitespace().collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|_| SamlError::Encoding)?;
        let xml = String::from_utf8(bytes).map_err(|_| SamlError::Encoding)?;
        if xml.contains("<!DOCTYPE") || xml.contains("<!ENTITY") {
            return Err(SamlError::Forbidden("DOCTYPE"));
        }
        if xml.contains("<!--") {
            return Err(SamlError::Forbidden("XML comment"));
        }
        // Exactly one assertion, wherever it is: a second one (signed or not, moved into
        // an Object or an Extensions) is a wrapping attempt.
        match count_elements(&xml, "Assertion") {
            1 => {}
            0 if count_elements(&xml, "EncryptedAssertion") > 0 => {
                return Err(SamlError::Invalid(
                    "encrypted assertions are not supported".into(),
                ))
            }
            n => {
                return Err(SamlError::Invalid(format!(
                    "the response holds {n} assertions; exactly one is accepted"
                )))
            }
        }
        self.forget(now);
        let ids: Vec<&str> = self.pending.keys().map(String::as_str).collect();
        let assertion = self
            .sp
            .parse_xml_response(&xml, Some(&ids))
            .map_err(|e| SamlError::Invalid(e.to_string()))?;
        let audience_ok = assertion
            .conditions
            .as_ref()
            .and_then(|c| c.audience_restrictions.as_ref())
            .is_some_and(|rs| {
                !rs.is_empty()
                    && rs
                        .iter()
                        .all(|r| r.audience.contains(&self.config.entity_id))
            });
        if !audience_ok {
            return Err(SamlError::Audience);
        }
        if self.seen.contains_key(&assertion.id) {
            return Err(SamlError::Replayed(assertion.id.clone()));
        }
        let in_response_to = in_response_to(&assertion);
        let request_id = in_response_to
            .as_deref()
            .filter(|id| self.pending.contains_key(*id))
            .map(str::to_string);
        let relay_state = match in_response_to
            .as_deref()
            .and_then(|id| self.pending.remove(id))
        {
            Some((_, relay)) => Some(relay),
            None if self.config.allow_idp_initiated => None,
            None => {
                return Err(SamlError::Invalid(
                    "InResponseTo names no login this service provider started".into(),
                ))
            }
        };
        let user = match &self.config.user_attribute {
            Some(attr) => attribute(&assertion, attr).into_iter().next(),
            None => assertion
                .subject
                .as_ref()
                .and_then(|s| s.name_id.as_ref())
                .map(|n| n.value.trim().to_string()),
        }
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            SamlError::NoUser(
                self.config
                    .user_attribute
                    .as_ref()
                    .map_or("no NameID".into(), |a| format!("no {a:?} attribute")),
            )
        })?;
        let groups = attribute(&assertion, &self.config.groups_attribute);
        let session_not_on_or_after = assertion
            .authn_statements
            .iter()
            .flatten()
            .filter_map(|s| s.session_not_on_or_after)
            .min();
        let statements = || assertion.authn_statements.iter().flatten();
        let authn_instant = statements()
            .filter_map(|s| s.authn_instant)
            .max()
            .map(|t| t.min(now));
        let authn_context_class_refs = statements()
            .filter_map(|s| s.authn_context.as_ref()?.value.as_ref()?.value.clone())
            .map(|v| v.trim().to_string())
            .collect();
        let mfa_attribute_values = self
            .config
            .mfa_attribute
            .as_deref()
            .map(|a| attribute(&assertion, a))
            .unwrap_or_default();
        // Remember the id until nothing could accept it any more.
        let expires = assertion_expiry(&assertion).unwrap_or(now + TimeDelta::hours(1));
        let assertion_forget_at = expires + self.config.max_clock_skew;
        self.seen.insert(assertion.id.clone(), assertion_forget_at);
        Ok(Login {
            user,
            groups,
            session_not_on_or_after,
            authn_instant,
            authn_context_class_refs,
            mfa_attribute_values,
            assertion_id: assertion.id,
            assertion_forget_at,
            request_id,
            relay_state,
        })
    }

    fn forget(&mut self, now: DateTime<Utc>) {
        self.pending.retain(|_, (t, _)| *t > now);
        self.seen.retain(|_, t| *t > now);
    }

    /// Logins started and not finished.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

fn in_response_to(a: &Assertion) -> Option<String> {
    a.subject
        .as_ref()?
        .subject_confirmations
        .iter()
        .flatten()
        .filter_map(|c| c.subject_confirmation_data.as_ref())
        .find_map(|d| d.in_response_to.clone())
}

fn assertion_expiry(a: &Assertion) -> Option<DateTime<Utc>> {
    let conditions = a.conditions.as_ref().and_then(|c| c.not_on_or_after);
    let confirmations = a
        .subject
        .as_ref()
        .and_then(|s| s.subject_confirmations.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.subject_confirmation_data.as_ref()?.not_on_or_after);
    conditions.into_iter().chain(confirmations).max()
}

/// The values of an attribute, by Name or FriendlyName.
fn attribute(a: &Assertion, name: &str) -> Vec<String> {
    a.attribute_statements
        .iter()
        .flatten()
        .flat_map(|s| s.attributes.iter())
        .filter(|at| at.name.as_deref() == Some(name) || at.friendly_name.as_deref() == Some(name))
        .flat_map(|at| at.values.iter())
        .filter_map(|v| v.value.as_ref())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Start tags with this local name, any namespace prefix.
fn count_elements(xml: &str, local: &str) -> usize {
    xml.match_indices('<')
        .filter(|&(i, _)| {
            let tag = xml.get(i + 1..).unwrap_or_default();
            let name_end = tag
                .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
                .unwrap_or(tag.len());
            let name = tag.get(..name_end).unwrap_or_default();
            let local_name = name.rsplit(':').next().unwrap_or_default();
            !name.starts_with(['/', '?', '!']) && local_name == local
        })
        .count()
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::count_elements;

    #[test]
    fn assertions_are_counted_under_any_prefix_and_only_as_start_tags() {
        let xml = r#"<samlp:Response><saml:Assertion ID="a"><x/></saml:Assertion><Assertion>
            </Assertion><saml2:Assertion/><saml:AssertionX/><saml:EncryptedAssertion/></samlp:Response>"#;
        assert_eq!(count_elements(xml, "Assertion"), 3);
        assert_eq!(count_elements(xml, "EncryptedAssertion"), 1);
        assert_eq!(count_elements("<a><b", "b"), 1);
        assert_eq!(count_elements("", "b"), 0);
    }
}
