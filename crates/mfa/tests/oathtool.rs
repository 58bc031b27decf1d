//! Codes and windows against a reference implementation: oathtool (OATH Toolkit, from
//! Debian; `scripts/install-deps.sh` installs it).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use portcullis_mfa::{verify_totp, MfaError, TotpSecret, STEP_SECS};
use rand::Rng as _;

/// oathtool's TOTP code for `secret` at `unix_secs`.
fn oathtool(secret: &TotpSecret, unix_secs: u64) -> String {
    let out = std::process::Command::new("oathtool")
        .args(["--totp", "-b", &secret.base32(), "--now"])
        .arg(format!("@{unix_secs}"))
        .output()
        .unwrap_or_else(|e| {
            panic!("oathtool (apt install oathtool; scripts/install-deps.sh): {e}")
        });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn codes_equal_oathtools_for_random_secrets_and_times() {
    let mut rng = rand::thread_rng();
    for _ in 0..40 {
        let s = TotpSecret::generate();
        let t: u64 = rng.gen_range(0..4_000_000_000);
        assert_eq!(
            s.code_at(t),
            oathtool(&s, t),
            "secret {} at {t}",
            s.base32()
        );
    }
}

#[test]
fn oathtools_codes_pass_within_one_step_once_and_fail_beyond() {
    let mut rng = rand::thread_rng();
    for _ in 0..10 {
        let s = TotpSecret::generate();
        let now: u64 = rng.gen_range(1_000_000_000..3_000_000_000);
        let step = now / STEP_SECS;
        let current = oathtool(&s, now);
        assert_eq!(verify_totp(&s, &current, now, None), Ok(step));
        assert_eq!(
            verify_totp(&s, &current, now, Some(step)),
            Err(MfaError::Replayed)
        );
        let earlier = oathtool(&s, now - STEP_SECS);
        let later = oathtool(&s, now + STEP_SECS);
        assert_eq!(verify_totp(&s, &earlier, now, None), Ok(step - 1));
        assert_eq!(verify_totp(&s, &later, now, None), Ok(step + 1));
        for far in [now - 2 * STEP_SECS, now + 2 * STEP_SECS, now + 3600] {
            let code = oathtool(&s, far);
            // One in 10^6 a far code equals a near one: then it is rightly accepted.
            if ![&current, &earlier, &later].contains(&&code) {
                assert_eq!(verify_totp(&s, &code, now, None), Err(MfaError::Wrong));
            }
        }
    }
}
