#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use super::*;
use proptest::prelude::*;

type Alteration = Box<dyn FnOnce(&mut Req)>;

const SECRET: &str = "0123456789abcdef0123456789abcdef-admin";

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

fn verifier() -> Verifier {
    Verifier::new(
        vec![
            ApiToken::new("ops", SECRET, Scope::Admin, None),
            ApiToken::new(
                "audit",
                "0123456789abcdef0123456789abcdef-audit",
                Scope::Auditor,
                Some(t0() + TimeDelta::days(1)),
            ),
        ],
        DEFAULT_WINDOW,
    )
}

struct Req {
    token: String,
    secret: String,
    ts: String,
    nonce: String,
    method: String,
    path: String,
    query: Option<String>,
    body: Vec<u8>,
}

fn req(method: &str, path: &str, query: Option<&str>, body: &[u8]) -> Req {
    Req {
        token: "ops".into(),
        secret: SECRET.into(),
        ts: t0().timestamp().to_string(),
        nonce: "0f8e1c2d3b4a59687766554433221100".into(),
        method: method.into(),
        path: path.into(),
        query: query.map(Into::into),
        body: body.to_vec(),
    }
}

impl Req {
    fn signature(&self) -> String {
        sign(
            self.secret.as_bytes(),
            &string_to_sign(&Parts {
                token: &self.token,
                timestamp: &self.ts,
                nonce: &self.nonce,
                method: &self.method,
                path: &self.path,
                query: self.query.as_deref(),
                body: &self.body,
            }),
        )
    }

    /// Sends the request as signed, optionally altered after signing.
    fn send(
        &self,
        v: &mut Verifier,
        alter: impl FnOnce(&mut Req),
        now: DateTime<Utc>,
    ) -> Result<Authorized, AuthError> {
        let sig = self.signature();
        let mut sent = Req { ..self.clone() };
        alter(&mut sent);
        v.handle_request(
            &Headers {
                token: Some(&sent.token),
                timestamp: Some(&sent.ts),
                nonce: Some(&sent.nonce),
                signature: Some(&sig),
            },
            &Request {
                method: &sent.method,
                path: &sent.path,
                query: sent.query.as_deref(),
                body: &sent.body,
            },
            IpAddr::from([192, 0, 2, 1]),
            now,
        )
    }
}

impl Clone for Req {
    fn clone(&self) -> Req {
        Req {
            token: self.token.clone(),
            secret: self.secret.clone(),
            ts: self.ts.clone(),
            nonce: self.nonce.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            query: self.query.clone(),
            body: self.body.clone(),
        }
    }
}

#[test]
fn a_correct_signature_is_accepted_once() {
    let mut v = verifier();
    let r = req(
        "POST",
        "/api/v1/users/alice/disable",
        Some("b=2&a=1"),
        b"{}",
    );
    let who = r.send(&mut v, |_| {}, t0()).unwrap();
    assert_eq!((who.token.as_str(), who.scope), ("ops", Scope::Admin));
    assert_eq!(who.nonce.forget_at, (t0() + DEFAULT_WINDOW * 2).timestamp());
    assert_eq!(r.send(&mut v, |_| {}, t0()), Err(AuthError::Replayed));
    let mut again = r.clone();
    again.nonce = "another-nonce-0123456789".into();
    assert!(again.send(&mut v, |_| {}, t0()).is_ok());
}

#[test]
fn tampering_with_any_signed_part_is_refused() {
    let r = req(
        "POST",
        "/api/v1/devices",
        Some("user=alice"),
        b"{\"user\":\"alice\"}",
    );
    let cases: Vec<(&str, Alteration)> = vec![
        (
            "body",
            Box::new(|r| r.body = b"{\"user\":\"mallory\"}".to_vec()),
        ),
        ("query", Box::new(|r| r.query = Some("user=mallory".into()))),
        ("path", Box::new(|r| r.path = "/api/v1/devices/x".into())),
        ("method", Box::new(|r| r.method = "DELETE".into())),
        (
            "nonce",
            Box::new(|r| r.nonce = "ffffffffffffffffffffffff".into()),
        ),
        (
            "timestamp",
            Box::new(|r| r.ts = (t0().timestamp() + 1).to_string()),
        ),
        ("token", Box::new(|r| r.token = "audit".into())),
    ];
    for (what, alter) in cases {
        let mut v = verifier();
        assert_eq!(
            r.send(&mut v, alter, t0()),
            Err(AuthError::BadSignature),
            "{what}"
        );
    }
}

#[test]
fn wrong_secret_unknown_or_expired_token_and_stale_time_are_refused() {
    let mut v = verifier();
    let mut r = req("GET", "/api/v1/users", None, b"");
    r.secret = "not-the-secret-0123456789abcdefgh".into();
    assert_eq!(r.send(&mut v, |_| {}, t0()), Err(AuthError::BadSignature));
    let mut r = req("GET", "/api/v1/users", None, b"");
    r.token = "nobody".into();
    assert_eq!(r.send(&mut v, |_| {}, t0()), Err(AuthError::BadToken));
    let mut r = req("GET", "/api/v1/users", None, b"");
    r.token = "audit".into();
    r.secret = "0123456789abcdef0123456789abcdef-audit".into();
    r.ts = (t0() + TimeDelta::days(1)).timestamp().to_string();
    assert_eq!(
        r.send(&mut v, |_| {}, t0() + TimeDelta::days(1)),
        Err(AuthError::BadToken),
        "expired"
    );
    for skew in [-301, 301] {
        let mut r = req("GET", "/api/v1/users", None, b"");
        r.ts = (t0().timestamp() + skew).to_string();
        assert_eq!(r.send(&mut v, |_| {}, t0()), Err(AuthError::Stale(300)));
    }
    for skew in [-299, 299] {
        let mut r = req("GET", "/api/v1/users", None, b"");
        r.ts = (t0().timestamp() + skew).to_string();
        r.nonce = format!("nonce-within-window-{}", skew + 1000);
        assert!(r.send(&mut v, |_| {}, t0()).is_ok(), "{skew}");
    }
}

#[test]
fn an_auditor_token_only_reads() {
    let mut v = verifier();
    let mut r = req("GET", "/api/v1/users", None, b"");
    r.token = "audit".into();
    r.secret = "0123456789abcdef0123456789abcdef-audit".into();
    assert_eq!(r.send(&mut v, |_| {}, t0()).unwrap().scope, Scope::Auditor);
    r.method = "POST".into();
    r.nonce = "a-second-nonce-0123456789".into();
    assert_eq!(
        r.send(&mut v, |_| {}, t0()),
        Err(AuthError::Forbidden("auditor"))
    );
}

#[test]
fn missing_and_malformed_headers_are_named() {
    let mut v = verifier();
    let e = v
        .handle_request(
            &Headers::default(),
            &Request {
                method: "GET",
                path: "/",
                query: None,
                body: b"",
            },
            IpAddr::from([192, 0, 2, 9]),
            t0(),
        )
        .unwrap_err();
    assert_eq!(e, AuthError::Missing("Auth-Token"));
    let mut r = req("GET", "/api/v1/users", None, b"");
    r.nonce = "short".into();
    assert!(
        matches!(r.send(&mut v, |_| {}, t0()), Err(AuthError::Malformed(m)) if m.contains("Auth-Nonce"))
    );
    let mut r = req("GET", "/api/v1/users", None, b"");
    r.ts = "yesterday".into();
    assert!(
        matches!(r.send(&mut v, |_| {}, t0()), Err(AuthError::Malformed(m)) if m.contains("Auth-Timestamp"))
    );
}

#[test]
fn nonces_are_kept_twice_the_window_then_forgotten() {
    let mut v = verifier();
    let r = req("GET", "/api/v1/users", None, b"");
    r.send(&mut v, |_| {}, t0()).unwrap();
    assert_eq!(v.nonces(), 1);
    // Still remembered at the window's far edge (the timestamp is then stale anyway).
    let mut later = r.clone();
    later.nonce = "other-nonce-aaaaaaaaaaaa".into();
    later.ts = (t0() + TimeDelta::minutes(10)).timestamp().to_string();
    later
        .send(&mut v, |_| {}, t0() + TimeDelta::minutes(10))
        .unwrap();
    assert_eq!(v.nonces(), 1, "the first nonce was forgotten after 10 min");
}

#[test]
fn a_full_nonce_cache_refuses_instead_of_forgetting() {
    let mut v = verifier().with_max_nonces(2);
    for i in 0..2 {
        let mut r = req("GET", "/api/v1/users", None, b"");
        r.nonce = format!("nonce-number-{i:012}");
        r.send(&mut v, |_| {}, t0()).unwrap();
    }
    let mut r = req("GET", "/api/v1/users", None, b"");
    r.nonce = "nonce-number-third-000".into();
    assert_eq!(r.send(&mut v, |_| {}, t0()), Err(AuthError::Busy));
}

#[test]
fn repeated_failures_are_limited_without_locking_out_a_valid_signature() {
    let mut v = verifier();
    let mut bad = req("GET", "/api/v1/users", None, b"");
    bad.secret = "guess-guess-guess-guess-guess-guess".into();
    for _ in 0..FAILURES_PER_MINUTE {
        assert_eq!(bad.send(&mut v, |_| {}, t0()), Err(AuthError::BadSignature));
    }
    assert!(v.limited(IpAddr::from([192, 0, 2, 1]), t0()));
    assert_eq!(bad.send(&mut v, |_| {}, t0()), Err(AuthError::RateLimited));
    assert_eq!(AuthError::RateLimited.status(), 429);
    // The same address (a NAT, a proxy) with a correct signature still gets in.
    let good = req("GET", "/api/v1/users", None, b"");
    assert!(good.send(&mut v, |_| {}, t0()).is_ok());
    // A minute later failures are counted afresh.
    let mut bad = bad.clone();
    bad.ts = (t0() + TimeDelta::seconds(61)).timestamp().to_string();
    assert_eq!(
        bad.send(&mut v, |_| {}, t0() + TimeDelta::seconds(61)),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn one_token_cannot_use_up_the_nonces_of_the_others() {
    let mut v = verifier().with_max_per_client(3);
    let mut audit = req("GET", "/api/v1/users", None, b"");
    audit.token = "audit".into();
    audit.secret = "0123456789abcdef0123456789abcdef-audit".into();
    for i in 0..3 {
        let mut r = audit.clone();
        r.nonce = format!("auditor-nonce-{i:010}");
        r.send(&mut v, |_| {}, t0()).unwrap();
    }
    let mut r = audit.clone();
    r.nonce = "auditor-nonce-over-budget".into();
    let e = r.send(&mut v, |_| {}, t0());
    assert_eq!(e, Err(AuthError::ClientBusy));
    assert_eq!(AuthError::ClientBusy.status(), 429);
    // The admin token, from another address, is unaffected.
    let ops = req("GET", "/api/v1/users", None, b"");
    let sig = ops.signature();
    let ok = v.handle_request(
        &Headers {
            token: Some("ops"),
            timestamp: Some(&ops.ts),
            nonce: Some(&ops.nonce),
            signature: Some(&sig),
        },
        &Request {
            method: "GET",
            path: "/api/v1/users",
            query: None,
            body: b"",
        },
        IpAddr::from([192, 0, 2, 99]),
        t0(),
    );
    assert!(ok.is_ok(), "{ok:?}");
    // After the window the auditor's budget is back.
    let mut later = audit.clone();
    later.nonce = "auditor-nonce-much-later".into();
    later.ts = (t0() + TimeDelta::minutes(11)).timestamp().to_string();
    assert!(later
        .send(&mut v, |_| {}, t0() + TimeDelta::minutes(11))
        .is_ok());
}

#[test]
fn restored_nonces_refuse_a_replay_after_a_restart() {
    let mut v = verifier();
    let r = req("GET", "/api/v1/users", None, b"");
    let who = r.send(&mut v, |_| {}, t0()).unwrap();
    let bytes: Vec<u8> = v.live_nonces().iter().flat_map(|n| n.encode()).collect();
    assert_eq!(v.live_nonces(), vec![who.nonce]);
    // A torn tail is ignored.
    let mut torn = bytes.clone();
    torn.extend_from_slice(&[1, 2, 3]);
    let records = NonceRecord::decode_all(&torn);
    assert_eq!(records, vec![who.nonce]);
    let mut fresh = verifier();
    fresh.restore(&records, t0() + TimeDelta::seconds(5));
    assert_eq!(
        r.send(&mut fresh, |_| {}, t0() + TimeDelta::seconds(5)),
        Err(AuthError::Replayed)
    );
    // Expired records are not restored.
    let mut late = verifier();
    late.restore(&records, t0() + TimeDelta::minutes(11));
    assert_eq!(late.nonces(), 0);
}

#[test]
fn canonical_query_sorts_and_normalises_encoding() {
    assert_eq!(canonical_query(None), "");
    assert_eq!(canonical_query(Some("")), "");
    assert_eq!(canonical_query(Some("b=2&a=1&a=0")), "a=0&a=1&b=2");
    assert_eq!(
        canonical_query(Some("user=al%69ce&since=24h&q=a+b&x=%2f&flag")),
        "flag=&q=a%20b&since=24h&user=alice&x=%2F"
    );
    assert_eq!(canonical_query(Some("k=%zz")), "k=%25zz");
}

#[test]
fn tokens_file_errors_name_the_file_and_never_the_secret() {
    let ok = "[[token]]\nid = \"ci\"\nsecret = \"0123456789abcdef0123456789abcdef\"\nscope = \"admin\"\nexpires = \"2027-01-01T00:00:00Z\"\n";
    let t = parse_tokens("api.tokens", ok).unwrap();
    assert_eq!((t[0].id.as_str(), t[0].scope), ("ci", Scope::Admin));
    let short = ok.replace("0123456789abcdef0123456789abcdef", "short-secret");
    let e = parse_tokens("api.tokens", &short).unwrap_err();
    assert!(
        e.to_string().starts_with("api.tokens: ") && e.reason.contains("at least 32"),
        "{e}"
    );
    assert!(!e.to_string().contains("short-secret"));
    let e = parse_tokens("api.tokens", &ok.replace("admin", "root")).unwrap_err();
    assert!(e.line.is_some(), "{e}");
    assert!(!e.to_string().contains("0123456789abcdef"), "{e}");
    let e = parse_tokens("api.tokens", &format!("{ok}{ok}")).unwrap_err();
    assert!(e.reason.contains("used twice"), "{e}");
    let e = parse_tokens("api.tokens", &ok.replace("\"ci\"", "\"c&i\"")).unwrap_err();
    assert!(e.reason.contains("token[0].id"), "{e}");
    assert!(parse_tokens("api.tokens", "").is_err());
    assert!(!format!("{:?}", t[0]).contains("0123456789abcdef"));
    // An unquoted secret: toml's message would echo the number.
    let bare = ok.replace(
        "\"0123456789abcdef0123456789abcdef\"",
        "1234567890123456789",
    );
    let e = parse_tokens("api.tokens", &bare).unwrap_err();
    assert!(!e.to_string().contains("1234567890"), "{e}");
    assert!(e.line.is_some(), "{e}");
    assert_eq!(
        redact_quoted("invalid type: integer `42`, expected \"x\""),
        "invalid type: integer <redacted>, expected <redacted>"
    );
}

proptest! {
    #[test]
    fn arbitrary_headers_never_panic_nor_pass(
        token in ".{0,70}", ts in ".{0,24}", nonce in ".{0,70}", sig in ".{0,100}",
        method in "[A-Z]{0,8}", path in ".{0,40}", query in proptest::option::of(".{0,40}"),
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut v = verifier();
        let r = v.handle_request(
            &Headers { token: Some(&token), timestamp: Some(&ts), nonce: Some(&nonce), signature: Some(&sig) },
            &Request { method: &method, path: &path, query: query.as_deref(), body: &body }, IpAddr::from([192, 0, 2, 7]), t0(),
        );
        prop_assert!(r.is_err());
    }

    #[test]
    fn canonical_query_is_order_independent(pairs in proptest::collection::vec(("[a-z%+=]{0,6}", "[a-z0-9%+ ]{0,6}"), 0..6)) {
        let forward: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut backward = forward.clone();
        backward.reverse();
        prop_assert_eq!(canonical_query(Some(&forward.join("&"))), canonical_query(Some(&backward.join("&"))));
    }
}

#[test]
fn the_rate_limit_counts_per_address_per_minute() {
    let mut l = RateLimit::new(3, 100);
    let (a, b) = (IpAddr::from([192, 0, 2, 1]), IpAddr::from([192, 0, 2, 2]));
    assert!((0..3).all(|_| l.handle_attempt(a, t0())));
    assert!(!l.handle_attempt(a, t0() + TimeDelta::seconds(59)));
    assert!(l.handle_attempt(b, t0()));
    assert!(l.handle_attempt(a, t0() + TimeDelta::seconds(60)));
}
