//! What a browser posts to the ACS is attacker-controlled: arbitrary text, arbitrary
//! base64, XML-shaped garbage and mangled SAML are refused with an error, never a panic,
//! and never a login. The IdP metadata is a fixture (SimpleSAMLphp's, with its
//! certificate): nothing here is signed by it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine as _;
use chrono::{TimeDelta, Utc};
use portcullis_saml::{Sp, SpConfig};
use proptest::prelude::*;

const METADATA: &str = include_str!("fixtures/idp-metadata.xml");

fn sp() -> Sp {
    Sp::new(
        SpConfig {
            entity_id: "https://gw.test/saml/metadata".into(),
            metadata_url: "https://gw.test/saml/metadata".into(),
            acs_url: "https://gw.test/saml/acs".into(),
            logout_url: "https://gw.test/saml/logout".into(),
            user_attribute: None,
            groups_attribute: "groups".into(),
            max_clock_skew: TimeDelta::seconds(60),
            request_lifetime: TimeDelta::minutes(10),
            allow_idp_initiated: false,
            mfa_attribute: None,
        },
        METADATA,
    )
    .unwrap()
}

/// XML-ish text built from SAML's own vocabulary.
fn samlish() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "<samlp:Response xmlns:samlp=\"urn:oasis:names:tc:SAML:2.0:protocol\" ID=\"_r\" Version=\"2.0\" IssueInstant=\"2026-11-29T10:00:00Z\" Destination=\"https://gw.test/saml/acs\" InResponseTo=\"_x\">",
        "</samlp:Response>",
        "<saml:Assertion xmlns:saml=\"urn:oasis:names:tc:SAML:2.0:assertion\" ID=\"_a\" Version=\"2.0\" IssueInstant=\"2026-11-29T10:00:00Z\">",
        "</saml:Assertion>",
        "<saml:Issuer>http://127.0.0.1:18999/saml2/idp/metadata.php</saml:Issuer>",
        "<ds:Signature xmlns:ds=\"http://www.w3.org/2000/09/xmldsig#\"><ds:SignedInfo/></ds:Signature>",
        "<saml:NameID>alice</saml:NameID>",
        "<saml:Subject>", "</saml:Subject>",
        "<saml:AttributeValue>sre</saml:AttributeValue>",
        "<", ">", "/>", "&amp;", "&#0;", "]]>", "<![CDATA[", "\"", "'", "=", " ", "\u{feff}", "é",
    ]);
    prop::collection::vec(pieces, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_is_refused(text in ".{0,400}") {
        let mut sp = sp();
        prop_assert!(sp.handle_acs(&text, Utc::now()).is_err());
    }

    #[test]
    fn arbitrary_bytes_in_base64_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut sp = sp();
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        prop_assert!(sp.handle_acs(&b64, Utc::now()).is_err());
    }

    /// Garbage inside one Response with one Assertion: past the cheap checks, into
    /// samael and xmlsec.
    #[test]
    fn garbage_inside_a_response_skeleton_is_refused(inner in samlish()) {
        let inner = inner.replace("saml:Assertion", "saml:Statement");
        let xml = format!(
            "<samlp:Response xmlns:samlp=\"urn:oasis:names:tc:SAML:2.0:protocol\" ID=\"_r\" Version=\"2.0\" IssueInstant=\"2026-11-29T10:00:00Z\">\
             <saml:Assertion xmlns:saml=\"urn:oasis:names:tc:SAML:2.0:assertion\" ID=\"_a\" Version=\"2.0\" IssueInstant=\"2026-11-29T10:00:00Z\">{inner}</saml:Assertion></samlp:Response>"
        );
        let mut sp = sp();
        let _ = sp.handle_login_start("/", [7; 16], Utc::now());
        let b64 = base64::engine::general_purpose::STANDARD.encode(xml);
        prop_assert!(sp.handle_acs(&b64, Utc::now()).is_err());
    }

    #[test]
    fn saml_shaped_garbage_is_refused(xml in samlish()) {
        let mut sp = sp();
        let _ = sp.handle_login_start("/", [7; 16], Utc::now());
        let b64 = base64::engine::general_purpose::STANDARD.encode(xml);
        prop_assert!(sp.handle_acs(&b64, Utc::now()).is_err());
    }
}

#[test]
fn an_oversized_response_is_refused_before_decoding() {
    let mut sp = sp();
    let huge = "A".repeat(portcullis_saml::MAX_RESPONSE_BYTES + 4);
    assert!(matches!(
        sp.handle_acs(&huge, Utc::now()),
        Err(portcullis_saml::SamlError::TooLarge)
    ));
}
