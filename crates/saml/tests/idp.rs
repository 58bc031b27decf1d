//! The service provider against a real IdP (SimpleSAMLphp under `php -S`), driven
//! without a browser by `tests/clients/saml_login.py`: a login is accepted; every forged,
//! altered, misaddressed, replayed or late response is refused.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use base64::Engine as _;
use chrono::{TimeDelta, Utc};
use portcullis_saml::{SamlError, Sp, SpConfig};
use portcullis_testkit::{IdpOptions, IdpUser, SamlIdp, SpEntry};

const SP: &str = "https://gw.test/saml/metadata";
const ACS: &str = "https://gw.test/saml/acs";
/// Known to the IdP with the right ACS, but not this SP (the audience is wrong).
const OTHER_SP: &str = "https://other.test/saml/metadata";
/// Known to the IdP with another ACS (the destination is wrong).
const ELSEWHERE_SP: &str = "https://elsewhere.test/saml/metadata";

fn config() -> SpConfig {
    SpConfig {
        entity_id: SP.into(),
        metadata_url: SP.into(),
        acs_url: ACS.into(),
        logout_url: "https://gw.test/saml/logout".into(),
        user_attribute: Some("uid".into()),
        groups_attribute: "groups".into(),
        max_clock_skew: TimeDelta::seconds(1),
        request_lifetime: TimeDelta::minutes(10),
        allow_idp_initiated: false,
        mfa_attribute: None,
    }
}

fn idp(options: IdpOptions) -> SamlIdp {
    SamlIdp::start(
        None,
        &[
            SpEntry {
                entity_id: SP.into(),
                acs_url: ACS.into(),
            },
            SpEntry {
                entity_id: OTHER_SP.into(),
                acs_url: ACS.into(),
            },
            SpEntry {
                entity_id: ELSEWHERE_SP.into(),
                acs_url: "https://elsewhere.test/saml/acs".into(),
            },
        ],
        &[IdpUser {
            name: "alice".into(),
            password: "alice-password".into(),
            groups: vec!["sre".into(), "staff".into()],
            authn_context: None,
        }],
        &options,
    )
    .unwrap()
}

/// Logs alice in at the IdP from `url`; the SAMLResponse as posted.
fn login(url: &str, issuer: Option<&str>) -> String {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/clients/saml_login.py"
    );
    let mut cmd = std::process::Command::new("python3");
    cmd.args([script, url, "alice", "alice-password"]);
    if let Some(i) = issuer {
        cmd.args(["--issuer", i]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["SAMLResponse"].as_str().unwrap().to_string()
}

fn decode(b64: &str) -> String {
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

fn encode(xml: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(xml)
}

/// The `<prefix:name ...>...</prefix:name>` element starting at the first `<prefix:name`.
fn element<'a>(xml: &'a str, qname: &str) -> &'a str {
    let start = xml.find(&format!("<{qname}")).unwrap();
    let close = format!("</{qname}>");
    let end = xml[start..].find(&close).unwrap() + start + close.len();
    &xml[start..end]
}

fn strip_signatures(xml: &str) -> String {
    let mut out = xml.to_string();
    while let Some(start) = out.find("<ds:Signature") {
        let end = out[start..].find("</ds:Signature>").unwrap() + start + "</ds:Signature>".len();
        out.replace_range(start..end, "");
    }
    out
}

fn refused(r: Result<portcullis_saml::Login, SamlError>, what: &str) -> SamlError {
    match r {
        Ok(l) => panic!("{what}: accepted as {l:?}"),
        Err(e) => e,
    }
}

/// A running IdP and an SP that trusts it.
struct Fixture {
    idp: SamlIdp,
    sp: Sp,
}

impl Fixture {
    fn new() -> Fixture {
        assert!(
            SamlIdp::available(),
            "SimpleSAMLphp is missing: run scripts/install-deps.sh"
        );
        let idp = idp(IdpOptions::default());
        let sp = Sp::new(config(), &idp.metadata().unwrap()).unwrap();
        Fixture { idp, sp }
    }

    /// A genuine response (decoded XML) to a login this SP started.
    fn fresh(&mut self) -> String {
        let url = self
            .sp
            .handle_login_start("/", rand16(2), Utc::now())
            .unwrap();
        decode(&login(&url, None))
    }

    fn post(&mut self, xml: &str) -> Result<portcullis_saml::Login, SamlError> {
        self.sp.handle_acs(&encode(xml), Utc::now())
    }
}

#[test]
fn a_real_idp_login_is_accepted_once() {
    let mut f = Fixture::new();
    // User and groups from the attributes, the relay state back.
    let url =
        f.sp.handle_login_start("/devices", rand16(1), Utc::now())
            .unwrap();
    assert!(url.starts_with(&f.idp.url()), "{url}");
    let response = login(&url, None);
    let good = f.sp.handle_acs(&response, Utc::now()).unwrap();
    assert_eq!(good.user, "alice");
    assert_eq!(good.groups, ["sre", "staff"]);
    assert_eq!(good.relay_state.as_deref(), Some("/devices"));
    assert!(good.session_not_on_or_after.is_some_and(|t| t > Utc::now()));
    // The same response again: refused (its request id is used up, its id remembered).
    refused(f.sp.handle_acs(&response, Utc::now()), "replayed response");
    assert_eq!(f.sp.pending(), 0);
}

#[test]
fn a_tampered_attribute_is_refused() {
    let mut f = Fixture::new();
    let xml = f.fresh();
    let tampered = xml.replacen(">sre<", ">admins<", 1);
    assert_ne!(tampered, xml);
    let e = refused(f.post(&tampered), "tampered attribute");
    assert!(e.to_string().contains("sign"), "{e}");
}

#[test]
fn a_stripped_signature_is_refused() {
    let mut f = Fixture::new();
    let xml = f.fresh();
    let e = refused(f.post(&strip_signatures(&xml)), "stripped signature");
    assert!(e.to_string().contains("sign"), "{e}");
}

/// The truncation attack: exc-c14n drops comments, so the signature alone would still
/// verify.
#[test]
fn a_comment_inside_the_name_id_is_refused() {
    let mut f = Fixture::new();
    let xml = f.fresh();
    let name_id = element(&xml, "saml:NameID");
    let value_at = name_id.find('>').unwrap() + 1;
    let commented_id = format!("{}<!---->{}", &name_id[..value_at], &name_id[value_at..]);
    let commented = xml.replacen(name_id, &commented_id, 1);
    assert_ne!(commented, xml);
    let e = refused(f.post(&commented), "comment");
    assert!(matches!(e, SamlError::Forbidden("XML comment")), "{e}");
}

/// Signature wrapping: a second, unsigned assertion for another user beside the signed
/// one.
#[test]
fn a_second_unsigned_assertion_is_refused() {
    let mut f = Fixture::new();
    let xml = f.fresh();
    let signed = element(&xml, "saml:Assertion").to_string();
    let forged = strip_signatures(&signed)
        .replace(">alice<", ">mallory<")
        .replacen(" ID=\"", " ID=\"forged", 1);
    let wrapped = xml.replacen(&signed, &format!("{forged}{signed}"), 1);
    let e = refused(f.post(&wrapped), "second assertion");
    assert!(e.to_string().contains("assertion"), "{e}");
}

/// Signature wrapping: the signed assertion moved into the response's signature (an
/// Object), a forged one with its id in its place.
#[test]
fn a_moved_signed_assertion_is_refused() {
    let mut f = Fixture::new();
    let xml = f.fresh();
    let signed = element(&xml, "saml:Assertion").to_string();
    let forged = strip_signatures(&signed).replace(">alice<", ">mallory<");
    let moved = xml.replacen(&signed, &forged, 1).replacen(
        "</ds:Signature>",
        &format!("<ds:Object>{signed}</ds:Object></ds:Signature>"),
        1,
    );
    refused(f.post(&moved), "moved signed element");
}

#[test]
fn an_unknown_in_response_to_is_refused() {
    let mut f = Fixture::new();
    let xml = f.fresh();
    // Another SP instance never started that login.
    let mut stranger = Sp::new(config(), &f.idp.metadata().unwrap()).unwrap();
    let e = refused(
        stranger.handle_acs(&encode(&xml), Utc::now()),
        "unknown InResponseTo",
    );
    assert!(e.to_string().contains("InResponseTo"), "{e}");
}

/// The IdP answered a request that named another SP (the same ACS).
#[test]
fn a_wrong_audience_is_refused() {
    let mut f = Fixture::new();
    let url = f.sp.handle_login_start("/", rand16(3), Utc::now()).unwrap();
    let other = login(&url, Some(OTHER_SP));
    let e = refused(f.sp.handle_acs(&other, Utc::now()), "wrong audience");
    assert!(e.to_string().to_lowercase().contains("audience"), "{e}");
}

/// Addressed to another SP's ACS.
#[test]
fn a_wrong_destination_is_refused() {
    let mut f = Fixture::new();
    let url = f.sp.handle_login_start("/", rand16(4), Utc::now()).unwrap();
    let elsewhere = login(&url, Some(ELSEWHERE_SP));
    let e = refused(f.sp.handle_acs(&elsewhere, Utc::now()), "wrong destination");
    assert!(e.to_string().to_lowercase().contains("destination"), "{e}");
}

/// A second IdP with its own key and the same users.
#[test]
fn a_response_signed_by_another_key_is_refused() {
    let mut f = Fixture::new();
    let impostor = idp(IdpOptions::default());
    let url = f.sp.handle_login_start("/", rand16(5), Utc::now()).unwrap();
    let url = url.replace(&f.idp.url(), &impostor.url());
    let e = refused(
        f.sp.handle_acs(&login(&url, None), Utc::now()),
        "another key",
    );
    assert!(e.to_string().contains("sign"), "{e}");
}

#[test]
fn a_doctype_is_refused_before_parsing() {
    let mut f = Fixture::new();
    let xml = f.fresh();
    let doctype = format!("<!DOCTYPE r [<!ENTITY x \"y\">]>{xml}");
    let e = refused(f.post(&doctype), "doctype");
    assert!(matches!(e, SamlError::Forbidden("DOCTYPE")), "{e}");
}

#[test]
fn an_expired_assertion_is_refused() {
    let idp = idp(IdpOptions {
        assertion_lifetime: Duration::from_secs(1),
        ..IdpOptions::default()
    });
    let mut sp = Sp::new(config(), &idp.metadata().unwrap()).unwrap();
    let url = sp.handle_login_start("/", rand16(7), Utc::now()).unwrap();
    let response = login(&url, None);
    // Lifetime 1 s, skew 1 s: 3 s later nothing may accept it.
    std::thread::sleep(Duration::from_secs(3));
    let e = refused(sp.handle_acs(&response, Utc::now()), "expired");
    assert!(e.to_string().contains("expired"), "{e}");
}

#[test]
fn metadata_without_a_signing_certificate_is_refused() {
    let idp = idp(IdpOptions::default());
    let metadata = idp.metadata().unwrap();
    // Drop every KeyDescriptor.
    let mut bare = metadata.clone();
    while let Some(start) = bare.find("<md:KeyDescriptor") {
        let end = bare[start..].find("</md:KeyDescriptor>").unwrap()
            + start
            + "</md:KeyDescriptor>".len();
        bare.replace_range(start..end, "");
    }
    let e = Sp::new(config(), &bare).unwrap_err();
    assert!(matches!(e, SamlError::NoSigningCertificate), "{e}");
    // The SP's own metadata names its ACS and entity id.
    let sp = Sp::new(config(), &metadata).unwrap();
    let md = sp.metadata_xml().unwrap();
    assert!(md.contains(SP) && md.contains(ACS), "{md}");
}

fn rand16(seed: u8) -> [u8; 16] {
    let mut r = [0u8; 16];
    let t = Utc::now()
        .timestamp_nanos_opt()
        .unwrap_or_default()
        .to_le_bytes();
    r[..8].copy_from_slice(&t);
    r[8] = seed;
    r
}

/// An IdP key rollover: the metadata lists the next key and the current one; responses
/// signed with the current key are accepted.
#[test]
fn during_a_key_rollover_either_listed_key_is_accepted() {
    let idp = idp(IdpOptions::default());
    let metadata = idp.metadata().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_, cert) = portcullis_testkit::generate_key(dir.path(), "next").unwrap();
    let next = std::fs::read_to_string(cert).unwrap();
    let next_b64: String = next.lines().filter(|l| !l.starts_with("-----")).collect();
    let descriptor = format!(
        "<md:KeyDescriptor use=\"signing\"><ds:KeyInfo xmlns:ds=\"http://www.w3.org/2000/09/xmldsig#\"><ds:X509Data><ds:X509Certificate>{next_b64}</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor>"
    );
    let rolled = metadata.replacen(
        "<md:KeyDescriptor",
        &format!("{descriptor}<md:KeyDescriptor"),
        1,
    );
    assert_eq!(rolled.matches("use=\"signing\"").count(), 2);
    let mut sp = Sp::new(config(), &rolled).unwrap();
    let url = sp.handle_login_start("/", rand16(9), Utc::now()).unwrap();
    let login = sp.handle_acs(&self::login(&url, None), Utc::now()).unwrap();
    assert_eq!(login.user, "alice");
}

/// A response signed with RSA-SHA1 (by the trusted key) is refused: the algorithm is
/// not on the allowed list.
#[test]
fn a_sha1_signature_is_refused() {
    let idp = idp(IdpOptions {
        signature_algorithm: "http://www.w3.org/2000/09/xmldsig#rsa-sha1".into(),
        ..IdpOptions::default()
    });
    let mut sp = Sp::new(config(), &idp.metadata().unwrap()).unwrap();
    let url = sp.handle_login_start("/", rand16(10), Utc::now()).unwrap();
    let response = login(&url, None);
    assert!(decode(&response).contains("xmldsig#rsa-sha1"));
    let e = refused(sp.handle_acs(&response, Utc::now()), "rsa-sha1");
    assert!(e.to_string().contains("sign"), "{e}");
}

/// A metadata refresh: a document without a signing certificate is refused and the
/// current one stays; a new IdP's document replaces it, with started logins kept.
#[test]
fn a_metadata_refresh_replaces_the_trusted_idp_and_a_bad_one_is_refused() {
    let old = idp(IdpOptions::default());
    let new = idp(IdpOptions::default());
    let mut sp = Sp::new(config(), &old.metadata().unwrap()).unwrap();
    let started_before = sp.handle_login_start("/", rand16(11), Utc::now()).unwrap();
    let bare = {
        let mut md = new.metadata().unwrap();
        while let Some(start) = md.find("<md:KeyDescriptor") {
            let end = md[start..].find("</md:KeyDescriptor>").unwrap()
                + start
                + "</md:KeyDescriptor>".len();
            md.replace_range(start..end, "");
        }
        md
    };
    assert!(matches!(
        sp.handle_idp_metadata(&bare),
        Err(SamlError::NoSigningCertificate)
    ));
    sp.handle_idp_metadata(&new.metadata().unwrap()).unwrap();
    // The old IdP is no longer trusted, even for a login started before the refresh.
    let e = refused(
        sp.handle_acs(&login(&started_before, None), Utc::now()),
        "the replaced IdP",
    );
    assert!(
        e.to_string().contains("sign") || e.to_string().contains("ssuer"),
        "{e}"
    );
    let url = sp.handle_login_start("/", rand16(12), Utc::now()).unwrap();
    assert!(url.starts_with(&new.url()), "{url}");
    assert_eq!(
        sp.handle_acs(&login(&url, None), Utc::now()).unwrap().user,
        "alice"
    );
}
