//! The second factor, sans-IO: TOTP codes (RFC 6238) and recovery codes checked the way
//! a sign-on must check them, and TOTP secrets sealed for storage.
//!
//! What it does:
//! - [`TotpSecret`]: a new random secret, its base32 form and `otpauth://` URI for the
//!   authenticator app (the enrollment page draws the URI as a QR code);
//! - [`verify_totp`]: a code within ±1 step of `now` is accepted once: a code of a step at
//!   or before the last one accepted is refused ([`MfaError::Replayed`]), so a code seen
//!   over a shoulder or in a log cannot be used again;
//! - [`Failures`]: a user's failed attempts; past [`MAX_FAILURES`] within
//!   [`FAILURE_WINDOW_SECS`] every attempt is refused until the oldest failure ages out,
//!   a right code included (six digits fall to a few hundred thousand guesses);
//! - recovery codes: [`new_recovery_codes`] and [`RecoveryCodes`], kept only as salted
//!   hashes and each usable once;
//! - [`SealingKey`]: the key (from a file) that seals TOTP secrets at rest.
//!
//! What it deliberately does not: no storage, no HTTP, no clock (`now` is passed in, as
//! Unix seconds), no audit events (the caller records `mfa_enrolled` / `mfa_failed`).
//!
//! # Formats this crate owns
//!
//! - **Sealed secret**: `v1.` then base64url (no padding) of `nonce (12 bytes) ‖
//!   ChaCha20-Poly1305 ciphertext ‖ tag (16 bytes)`. The associated data is
//!   `portcullis-totp-v1\0` ‖ the user name, so a sealed secret copied onto another user
//!   does not open.
//! - **Sealing key file**: 32 bytes as base64 (standard) on one line, or 64 hex digits.
//! - **Recovery code**: 16 characters of the base32 alphabet without padding, shown as
//!   four groups of four (`ABCD-EFGH-IJKL-MNOP`, 80 bits); entered case-insensitively,
//!   with or without the dashes and spaces. Stored as hex of SHA-256(`portcullis-recovery-v1\0`
//!   ‖ user ‖ `\0` ‖ the 16 characters upper-cased).
//! - **TOTP**: HMAC-SHA1, 6 digits, 30 s steps, 20-byte secrets: what every authenticator
//!   app reads from an `otpauth://totp/` URI.

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// Seconds per TOTP step.
pub const STEP_SECS: u64 = 30;
/// Digits per code.
pub const DIGITS: usize = 6;
/// Steps accepted on either side of `now` (clock drift, a code typed as it changed).
pub const SKEW_STEPS: u64 = 1;
/// Failed attempts allowed within [`FAILURE_WINDOW_SECS`].
pub const MAX_FAILURES: usize = 5;
pub const FAILURE_WINDOW_SECS: u64 = 15 * 60;
/// Recovery codes handed out at enrollment.
pub const RECOVERY_CODES: usize = 10;

/// Why a code was not accepted. A refusal is a value, not a failure of the check.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MfaError {
    #[error("the code must be {DIGITS} digits")]
    Malformed,
    #[error("the code is wrong or expired")]
    Wrong,
    #[error("the code was already used")]
    Replayed,
    #[error("too many failed codes; try again in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the sealed secret cannot be opened (wrong key, wrong user or damaged)")]
    Unseal,
    #[error("sealing key: {0}")]
    Key(String),
}

/// A TOTP secret (20 random bytes). Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct TotpSecret([u8; 20]);

impl std::fmt::Debug for TotpSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TotpSecret(..)")
    }
}

impl TotpSecret {
    pub fn generate() -> TotpSecret {
        let mut b = [0u8; 20];
        rand::rngs::OsRng.fill_bytes(&mut b);
        TotpSecret(b)
    }

    pub fn from_bytes(b: [u8; 20]) -> TotpSecret {
        TotpSecret(b)
    }

    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// RFC 4648 base32 without padding, what authenticator apps take when typed in.
    pub fn base32(&self) -> String {
        base32_encode(&self.0)
    }

    /// The `otpauth://totp/` URI for a QR code: `issuer:account`, with every parameter
    /// spelled out (apps differ in their defaults).
    pub fn otpauth_uri(&self, issuer: &str, account: &str) -> String {
        let issuer = percent_encode(issuer);
        format!(
            "otpauth://totp/{issuer}:{account}?secret={secret}&issuer={issuer}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
            account = percent_encode(account),
            secret = self.base32(),
        )
    }

    /// The code for the step holding `unix_secs`.
    pub fn code_at(&self, unix_secs: u64) -> String {
        // new_unchecked: the parameters are constants this crate chose (the checked
        // constructor only refuses short secrets and odd digit counts).
        totp_rs::TOTP::new_unchecked(
            totp_rs::Algorithm::SHA1,
            DIGITS,
            0,
            STEP_SECS,
            self.0.to_vec(),
        )
        .generate(unix_secs)
    }
}

/// Checks `code` at `now` (Unix seconds): the step it matched, to store as the user's
/// last accepted step. `last_step`: the step last accepted for this secret.
pub fn verify_totp(
    secret: &TotpSecret,
    code: &str,
    now: u64,
    last_step: Option<u64>,
) -> Result<u64, MfaError> {
    let code = code.trim();
    if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(MfaError::Malformed);
    }
    let now_step = now / STEP_SECS;
    // Every candidate is computed and compared, matched or not: the time taken does not
    // say which step matched.
    let mut matched: Option<u64> = None;
    for step in now_step.saturating_sub(SKEW_STEPS)..=now_step.saturating_add(SKEW_STEPS) {
        let expected = secret.code_at(step.saturating_mul(STEP_SECS));
        if bool::from(expected.as_bytes().ct_eq(code.as_bytes())) {
            matched = Some(matched.map_or(step, |m: u64| m.max(step)));
        }
    }
    match matched {
        None => Err(MfaError::Wrong),
        Some(step) if last_step.is_some_and(|last| step <= last) => Err(MfaError::Replayed),
        Some(step) => Ok(step),
    }
}

/// A user's recent failed attempts (Unix seconds), for the limit in the crate doc. The
/// caller keeps it with the user's authenticator, so the limit holds on every node of a
/// cluster and across restarts; only the last [`MAX_FAILURES`] are kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failures {
    times: Vec<u64>,
}

impl Failures {
    /// From stored times (any order, any count: only the newest [`MAX_FAILURES`] count).
    pub fn from_times(mut times: Vec<u64>) -> Failures {
        times.sort_unstable();
        let extra = times.len().saturating_sub(MAX_FAILURES);
        times.drain(..extra);
        Failures { times }
    }

    /// The times to store, oldest first.
    pub fn times(&self) -> &[u64] {
        &self.times
    }

    /// Whether another attempt is allowed at `now`. A stored time after `now` (another
    /// node's clock ahead) counts as now.
    pub fn check(&self, now: u64) -> Result<(), MfaError> {
        let recent: Vec<u64> = self
            .times
            .iter()
            .map(|t| (*t).min(now))
            .filter(|t| now - t < FAILURE_WINDOW_SECS)
            .collect();
        if recent.len() < MAX_FAILURES {
            return Ok(());
        }
        let oldest = recent.iter().copied().min().unwrap_or(now);
        Err(MfaError::RateLimited {
            retry_after_secs: oldest
                .saturating_add(FAILURE_WINDOW_SECS)
                .saturating_sub(now)
                .max(1),
        })
    }

    /// Records a failed code (wrong, replayed or malformed) at `now`.
    pub fn handle_failure(&mut self, now: u64) {
        self.times
            .retain(|t| now.saturating_sub(*t) < FAILURE_WINDOW_SECS);
        self.times.push(now);
        self.times.sort_unstable();
        let extra = self.times.len().saturating_sub(MAX_FAILURES);
        self.times.drain(..extra);
    }

    /// A right code: the failures are forgotten.
    pub fn handle_success(&mut self) {
        self.times.clear();
    }
}

/// [`RECOVERY_CODES`] new codes, as shown to the user once (see the crate doc).
pub fn new_recovery_codes() -> Vec<String> {
    (0..RECOVERY_CODES)
        .map(|_| {
            let mut b = [0u8; 10];
            rand::rngs::OsRng.fill_bytes(&mut b);
            let s = base32_encode(&b);
            let groups: Vec<&str> = (0..4).filter_map(|i| s.get(i * 4..i * 4 + 4)).collect();
            groups.join("-")
        })
        .collect()
}

/// A user's unused recovery codes, as their hashes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryCodes {
    pub hashes: Vec<String>,
}

impl RecoveryCodes {
    /// The stored form of `codes` for `user`.
    pub fn new(user: &str, codes: &[String]) -> RecoveryCodes {
        RecoveryCodes {
            hashes: codes
                .iter()
                .filter_map(|c| recovery_hash(user, c))
                .collect(),
        }
    }

    /// Uses `code` if it is one of them: true, and it is gone. Compared in constant
    /// time against every stored hash.
    pub fn redeem(&mut self, user: &str, code: &str) -> bool {
        let Some(h) = recovery_hash(user, code) else {
            return false;
        };
        let mut found = None;
        for (i, stored) in self.hashes.iter().enumerate() {
            if bool::from(stored.as_bytes().ct_eq(h.as_bytes())) {
                found = Some(i);
            }
        }
        match found {
            Some(i) => {
                self.hashes.remove(i);
                true
            }
            None => false,
        }
    }
}

fn recovery_hash(user: &str, code: &str) -> Option<String> {
    let normalized: String = code
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if normalized.len() != 16 || !normalized.bytes().all(|b| BASE32.contains(&b)) {
        return None;
    }
    let mut d = Sha256::new();
    d.update(b"portcullis-recovery-v1\0");
    d.update(user.as_bytes());
    d.update(b"\0");
    d.update(normalized.as_bytes());
    Some(hex_lower(&d.finalize()))
}

/// The key that seals TOTP secrets at rest. Its `Debug` does not show it.
#[derive(Clone)]
pub struct SealingKey([u8; 32]);

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(..)")
    }
}

impl SealingKey {
    pub fn generate() -> SealingKey {
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        SealingKey(b)
    }

    /// The file's text (see the crate doc for the format).
    pub fn parse(text: &str) -> Result<SealingKey, MfaError> {
        let t = text.trim();
        let bytes = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| {
                    t.get(i * 2..i * 2 + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                })
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| MfaError::Key("not hex".into()))?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .map_err(|_| MfaError::Key("neither 64 hex digits nor base64".into()))?
        };
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| MfaError::Key(format!("{} bytes, 32 needed", b.len())))?;
        Ok(SealingKey(key))
    }

    /// The key as the file holds it (base64).
    pub fn to_file_text(&self) -> String {
        format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }

    fn aad(user: &str) -> Vec<u8> {
        [b"portcullis-totp-v1\0".as_slice(), user.as_bytes()].concat()
    }

    /// `secret` sealed for `user`.
    pub fn seal(&self, user: &str, secret: &TotpSecret) -> String {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = Self::aad(user);
        let sealed = ChaCha20Poly1305::new((&self.0).into())
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: secret.as_bytes(),
                    aad: &aad,
                },
            )
            // Encryption of 20 bytes cannot fail (only oversized input can).
            .unwrap_or_default();
        format!(
            "v1.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode([nonce.as_slice(), &sealed].concat())
        )
    }

    /// Opens what [`SealingKey::seal`] made for `user`.
    pub fn open(&self, user: &str, sealed: &str) -> Result<TotpSecret, MfaError> {
        let body = sealed.strip_prefix("v1.").ok_or(MfaError::Unseal)?;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| MfaError::Unseal)?;
        if raw.len() != 12 + 20 + 16 {
            return Err(MfaError::Unseal);
        }
        let (nonce, ct) = raw.split_at(12);
        let aad = Self::aad(user);
        let plain = ChaCha20Poly1305::new((&self.0).into())
            .decrypt(nonce.into(), Payload { msg: ct, aad: &aad })
            .map_err(|_| MfaError::Unseal)?;
        let bytes: [u8; 20] = plain.try_into().map_err(|_| MfaError::Unseal)?;
        Ok(TotpSecret(bytes))
    }
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

fn base32_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in data {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(base32_char(buffer >> bits));
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(base32_char(buffer << (5 - bits)));
    }
    out
}

/// The base32 character for the low 5 bits of `v`.
fn base32_char(v: u32) -> char {
    BASE32
        .get((v & 31) as usize)
        .map_or('A', |b| char::from(*b))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests;
