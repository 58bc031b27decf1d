#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use super::*;
use proptest::prelude::*;

/// RFC 6238 appendix B's SHA-1 key, "12345678901234567890".
fn rfc_secret() -> TotpSecret {
    TotpSecret::from_bytes(*b"12345678901234567890")
}

#[test]
fn codes_match_rfc_6238_appendix_b() {
    // The RFC lists 8 digits; 6 digits are the same number mod 10^6.
    for (t, code8) in [
        (59u64, "94287082"),
        (1_111_111_109, "07081804"),
        (1_111_111_111, "14050471"),
        (1_234_567_890, "89005924"),
        (2_000_000_000, "69279037"),
        (20_000_000_000, "65353130"),
    ] {
        assert_eq!(rfc_secret().code_at(t), code8[2..], "T = {t}");
    }
}

#[test]
fn a_code_is_accepted_within_one_step_once() {
    let s = rfc_secret();
    let now = 1_234_567_890;
    let code = s.code_at(now);
    let step = verify_totp(&s, &code, now, None).unwrap();
    assert_eq!(step, now / STEP_SECS);
    assert_eq!(
        verify_totp(&s, &code, now, Some(step)),
        Err(MfaError::Replayed)
    );
    // The previous and the next step's codes pass (drift), two steps away do not.
    let prev = s.code_at(now - STEP_SECS);
    assert_eq!(verify_totp(&s, &prev, now, None), Ok(step - 1));
    assert_eq!(
        verify_totp(&s, &prev, now, Some(step)),
        Err(MfaError::Replayed),
        "an older step after a newer one was used"
    );
    let next = s.code_at(now + STEP_SECS);
    assert_eq!(verify_totp(&s, &next, now, Some(step)), Ok(step + 1));
    for far in [now - 2 * STEP_SECS, now + 2 * STEP_SECS] {
        let c = s.code_at(far);
        if c != code && c != prev && c != next {
            assert_eq!(verify_totp(&s, &c, now, None), Err(MfaError::Wrong));
        }
    }
    for bad in ["", "12345", "1234567", "12345a", "١٢٣٤٥٦", " 12 34 "] {
        assert_eq!(
            verify_totp(&s, bad, now, None),
            Err(MfaError::Malformed),
            "{bad:?}"
        );
    }
    // Surrounding whitespace (a paste) is fine.
    assert!(verify_totp(&s, &format!(" {code}\n"), now, None).is_ok());
}

#[test]
fn the_uri_names_every_parameter_and_the_secret_in_base32() {
    let s = rfc_secret();
    assert_eq!(s.base32(), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
    assert_eq!(
        s.otpauth_uri("Portcullis VPN", "alice@example.com"),
        "otpauth://totp/Portcullis%20VPN:alice@example.com?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Portcullis%20VPN&algorithm=SHA1&digits=6&period=30"
    );
    assert_eq!(format!("{s:?}"), "TotpSecret(..)");
    assert_ne!(TotpSecret::generate(), TotpSecret::generate());
}

#[test]
fn failures_lock_a_user_out_for_the_window_and_a_success_clears_them() {
    let mut f = Failures::default();
    let t0 = 1_000_000;
    for i in 0..MAX_FAILURES as u64 {
        assert!(f.check(t0 + i).is_ok());
        f.handle_failure(t0 + i);
    }
    assert_eq!(
        f.check(t0 + 10),
        Err(MfaError::RateLimited {
            retry_after_secs: FAILURE_WINDOW_SECS - 10
        })
    );
    // Stored and read back (another node, a restart): the same limit.
    let stored = Failures::from_times(f.times().iter().rev().copied().collect());
    assert_eq!(stored.check(t0 + 10), f.check(t0 + 10));
    // The oldest failure ages out: one more try.
    assert!(f.check(t0 + FAILURE_WINDOW_SECS).is_ok());
    f.handle_failure(t0 + FAILURE_WINDOW_SECS);
    assert!(f.check(t0 + FAILURE_WINDOW_SECS).is_err());
    f.handle_success();
    assert!(f.check(t0 + FAILURE_WINDOW_SECS).is_ok());
}

proptest! {
    /// Whatever the store holds (a hostile or skewed list): bounded, never a panic, and
    /// never more than MAX_FAILURES tries in any window after it.
    #[test]
    fn stored_failures_are_bounded_and_the_limit_holds(
        times in proptest::collection::vec(any::<u64>(), 0..50),
        now in any::<u64>(),
    ) {
        let mut f = Failures::from_times(times);
        prop_assert!(f.times().len() <= MAX_FAILURES);
        let _ = f.check(now);
        let mut tries = 0;
        for i in 0..(MAX_FAILURES as u64 * 2) {
            let t = now.saturating_add(i);
            if f.check(t).is_ok() {
                tries += 1;
                f.handle_failure(t);
            }
        }
        prop_assert!(tries <= MAX_FAILURES);
        prop_assert!(f.times().len() <= MAX_FAILURES);
    }
}

#[test]
fn recovery_codes_work_once_in_any_spelling_and_only_for_their_user() {
    let codes = new_recovery_codes();
    assert_eq!(codes.len(), RECOVERY_CODES);
    for c in &codes {
        assert_eq!(c.len(), 19, "{c}");
        assert_eq!(c.matches('-').count(), 3, "{c}");
    }
    let mut stored = RecoveryCodes::new("alice", &codes);
    assert_eq!(stored.hashes.len(), RECOVERY_CODES);
    assert!(!stored.clone().redeem("bob", &codes[0]), "another user's");
    let sloppy = codes[0].to_lowercase().replace('-', " ");
    assert!(stored.redeem("alice", &sloppy));
    assert!(!stored.redeem("alice", &codes[0]), "used once");
    assert_eq!(stored.hashes.len(), RECOVERY_CODES - 1);
    assert!(!stored.redeem("alice", "not-a-code"));
    assert!(stored.redeem("alice", &codes[9]));
}

#[test]
fn a_sealed_secret_opens_only_with_its_key_for_its_user() {
    let key = SealingKey::generate();
    let s = TotpSecret::generate();
    let sealed = key.seal("alice", &s);
    assert!(sealed.starts_with("v1."), "{sealed}");
    assert!(!sealed.contains(&s.base32()));
    assert_eq!(key.open("alice", &sealed).unwrap(), s);
    assert_ne!(key.seal("alice", &s), sealed, "a new nonce each time");
    assert_eq!(key.open("bob", &sealed), Err(MfaError::Unseal));
    assert_eq!(
        SealingKey::generate().open("alice", &sealed),
        Err(MfaError::Unseal)
    );
    let mut damaged = sealed.clone().into_bytes();
    let last = damaged.len() - 2;
    damaged[last] = if damaged[last] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        key.open("alice", &String::from_utf8(damaged).unwrap()),
        Err(MfaError::Unseal)
    );
    // The key file round-trips, in base64 or hex; anything else names the problem.
    let again = SealingKey::parse(&key.to_file_text()).unwrap();
    assert_eq!(again.open("alice", &sealed).unwrap(), s);
    let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        SealingKey::parse(&hex)
            .unwrap()
            .open("alice", &sealed)
            .unwrap(),
        s
    );
    assert_eq!(
        SealingKey::parse("c2hvcnQ=").unwrap_err(),
        MfaError::Key("5 bytes, 32 needed".into())
    );
    assert!(SealingKey::parse("not a key!").is_err());
    assert_eq!(format!("{key:?}"), "SealingKey(..)");
}

proptest! {
    #[test]
    fn the_code_of_now_is_accepted_and_never_twice(bytes in any::<[u8; 20]>(), now in 60u64..4_000_000_000) {
        let s = TotpSecret::from_bytes(bytes);
        let code = s.code_at(now);
        let step = verify_totp(&s, &code, now, None).unwrap();
        prop_assert!(step >= now / STEP_SECS);
        prop_assert_eq!(verify_totp(&s, &code, now, Some(step)), Err(MfaError::Replayed));
    }

    #[test]
    fn any_input_is_refused_or_accepted_without_panicking(code in ".{0,40}", now in any::<u64>(), last in any::<Option<u64>>()) {
        let _ = verify_totp(&rfc_secret(), &code, now, last);
        let mut r = RecoveryCodes::new("alice", std::slice::from_ref(&code));
        let _ = r.redeem("alice", &code);
        let _ = SealingKey::parse(&code);
        let _ = SealingKey::generate().open("alice", &code);
    }

    #[test]
    fn base32_matches_a_bitwise_reference(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
        let bits: Vec<u8> = bytes.iter().flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1)).collect();
        let expected: String = bits
            .chunks(5)
            .map(|c| {
                let v = c.iter().chain(std::iter::repeat(&0)).take(5).fold(0u32, |a, b| a << 1 | u32::from(*b));
                char::from(BASE32[v as usize])
            })
            .collect();
        prop_assert_eq!(base32_encode(&bytes), expected);
    }
}
