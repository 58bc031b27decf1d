//! HMAC-SHA256 request signing for the admin API under `/api/v1`, sans-IO.
//!
//! What it does: parses the API tokens file, builds and checks request signatures, keeps
//! the nonces seen within the replay window, limits failed authentications per client
//! address ([`RateLimit`], which the sign-on pages use too), and says whether a token's scope allows the call. The caller (the HTTP
//! layer) passes the request's parts and `now`; nothing here reads a clock or a socket.
//!
//! What it deliberately does not: no HTTP types (the io layer maps requests and
//! [`AuthError::status`]), no token storage beyond the file it is given.
//!
//! # The signing recipe (the wire format this crate owns)
//!
//! The header names are Pritunl's, so its clients need only the stronger string:
//!
//! | header | value |
//! | --- | --- |
//! | `Auth-Token` | the token's id |
//! | `Auth-Timestamp` | Unix time in seconds; accepted within ±`window` (5 min) |
//! | `Auth-Nonce` | 16–64 characters of `A-Z a-z 0-9 - _`, new for every request |
//! | `Auth-Signature` | base64 (standard, padded) of HMAC-SHA256(secret, string to sign) |
//!
//! The string to sign joins seven fields with `&`:
//! `token & timestamp & nonce & METHOD & path & canonical query & hex(SHA-256(body))`.
//! - METHOD is upper case; path is exactly as sent in the request line (percent-encoded,
//!   without the query).
//! - The canonical query: split the query on `&`, split each pair at the first `=`,
//!   percent-decode both sides (`+` is a space), percent-encode them again keeping only
//!   `A-Z a-z 0-9 - . _ ~` (upper-case hex), sort the encoded pairs by key then value
//!   (bytewise), and join
//!   them as `k=v` with `&`. No query: the empty string.
//! - The body hash is of the raw body bytes (for no body, of the empty string).
//!
//! A nonce is refused if seen with the same token within twice the window; a request is
//! refused as stale outside the window; comparisons are constant-time. Tokens carry a
//! scope: `auditor` (GET and HEAD only) or `admin`; and may expire.
//!
//! In Python (`requests`):
//!
//! ```python
//! import base64, hashlib, hmac, time, uuid, urllib.parse, requests
//! def signed(method, url, token, secret, body=b""):
//!     u = urllib.parse.urlsplit(url)
//!     pairs = urllib.parse.parse_qsl(u.query, keep_blank_values=True)
//!     enc = lambda s: urllib.parse.quote(s, safe="-._~")
//!     q = "&".join(f"{k}={v}" for k, v in sorted((enc(k), enc(v)) for k, v in pairs))
//!     ts, nonce = str(int(time.time())), uuid.uuid4().hex
//!     msg = "&".join([token, ts, nonce, method.upper(), u.path, q, hashlib.sha256(body).hexdigest()])
//!     sig = base64.b64encode(hmac.new(secret.encode(), msg.encode(), hashlib.sha256).digest()).decode()
//!     headers = {"Auth-Token": token, "Auth-Timestamp": ts, "Auth-Nonce": nonce, "Auth-Signature": sig}
//!     return requests.request(method, url, data=body, headers=headers)
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;

use base64::Engine as _;
use chrono::{DateTime, TimeDelta, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

pub const HEADER_TOKEN: &str = "Auth-Token";
pub const HEADER_TIMESTAMP: &str = "Auth-Timestamp";
pub const HEADER_NONCE: &str = "Auth-Nonce";
pub const HEADER_SIGNATURE: &str = "Auth-Signature";

/// The default timestamp window (±).
pub const DEFAULT_WINDOW: TimeDelta = TimeDelta::minutes(5);
/// Failed authentications per client address per minute; past it, further failures get
/// 429 (and are no longer logged one by one), while correctly signed requests from the
/// same address still pass: a neighbour behind the same NAT cannot lock a client out.
/// Guessing is not what this stops: secrets are at least 32 characters.
pub const FAILURES_PER_MINUTE: u32 = 20;
/// Nonces remembered at most, all tokens together; past that, new requests are refused
/// (503) rather than forgetting nonces still inside the window.
pub const MAX_NONCES: usize = 1_000_000;
/// Nonces one token may hold within the replay window (~330 signed requests a second
/// sustained over the default 10 minutes); past it that token gets 429, others do not.
pub const NONCES_PER_TOKEN: usize = 200_000;
/// Nonces requests from one address may hold, whatever their tokens.
pub const NONCES_PER_ADDRESS: usize = 200_000;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Read-only: GET and HEAD.
    Auditor,
    /// Everything.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Auditor => "auditor",
            Scope::Admin => "admin",
        }
    }
}

/// An API token: a public id and a shared secret.
#[derive(Clone)]
pub struct ApiToken {
    pub id: String,
    secret: Vec<u8>,
    pub scope: Scope,
    pub expires: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("id", &self.id)
            .field("scope", &self.scope)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl ApiToken {
    pub fn new(id: &str, secret: &str, scope: Scope, expires: Option<DateTime<Utc>>) -> Self {
        ApiToken {
            id: id.to_string(),
            secret: secret.as_bytes().to_vec(),
            scope,
            expires,
        }
    }

    /// Signs a request as a client would (tests, the CLI).
    pub fn sign(&self, parts: &Parts<'_>) -> String {
        sign(&self.secret, &string_to_sign(parts))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    id: String,
    secret: String,
    scope: Scope,
    #[serde(default)]
    expires: Option<DateTime<Utc>>,
}

/// A problem in the tokens file; names the file, where, and why (never a secret).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}{at}: {reason}", at = .line.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct TokensError {
    pub file: String,
    pub line: Option<(usize, usize)>,
    pub reason: String,
}

/// Parses the tokens file:
///
/// ```toml
/// [[token]]
/// id = "ci-deploy"                   # what clients send in Auth-Token
/// secret = "at least 32 characters of randomness"
/// scope = "admin"                    # or "auditor" (GET and HEAD only)
/// expires = "2027-06-30T00:00:00Z"   # optional
/// ```
/// `message` without the parts a parser quoted (`` `…` `` and `"…"`): in a secrets file
/// those may be the secret.
pub fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quote: Option<char> = None;
    for c in message.chars() {
        match quote {
            Some(q) if c == q => {
                quote = None;
                out.push_str("<redacted>");
            }
            Some(_) => {}
            None if c == '`' || c == '"' => quote = Some(c),
            None => out.push(c),
        }
    }
    if quote.is_some() {
        out.push_str("<redacted>");
    }
    out.trim().to_string()
}

pub fn parse_tokens(file: &str, src: &str) -> Result<Vec<ApiToken>, TokensError> {
    let parsed: TokensFile = toml::from_str(src).map_err(|e| {
        let line = e.span().map(|s| {
            let before = src.get(..s.start).unwrap_or_default();
            let l = before.matches('\n').count() + 1;
            let c = before.rsplit('\n').next().map_or(0, str::len) + 1;
            (l, c)
        });
        TokensError {
            file: file.to_string(),
            line,
            // toml's message may quote the offending value, which may be a secret.
            reason: redact_quoted(e.message()),
        }
    })?;
    let err = |reason: String| TokensError {
        file: file.to_string(),
        line: None,
        reason,
    };
    let mut tokens: Vec<ApiToken> = Vec::new();
    for (i, t) in parsed.token.into_iter().enumerate() {
        let ok_id = !t.id.is_empty()
            && t.id.len() <= 64
            && t.id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok_id {
            return Err(err(format!(
                "token[{i}].id {:?} must be 1-64 characters of A-Z a-z 0-9 - _ .",
                t.id
            )));
        }
        if t.secret.len() < 32 {
            return Err(err(format!(
                "token[{i}] ({}): the secret must be at least 32 characters",
                t.id
            )));
        }
        if tokens.iter().any(|o| o.id == t.id) {
            return Err(err(format!("token[{i}]: id {:?} is used twice", t.id)));
        }
        tokens.push(ApiToken::new(&t.id, &t.secret, t.scope, t.expires));
    }
    if tokens.is_empty() {
        return Err(err("holds no [[token]]".into()));
    }
    Ok(tokens)
}

/// The parts of a request that are signed.
#[derive(Clone, Copy, Debug)]
pub struct Parts<'a> {
    pub token: &'a str,
    pub timestamp: &'a str,
    pub nonce: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// The raw query (without `?`), if any.
    pub query: Option<&'a str>,
    pub body: &'a [u8],
}

/// The query in canonical form (see the crate docs).
pub fn canonical_query(query: Option<&str>) -> String {
    let Some(q) = query.filter(|q| !q.is_empty()) else {
        return String::new();
    };
    let mut pairs: Vec<(String, String)> = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (encode(&decode(k)), encode(&decode(v)))
        })
        .collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-decoding with `+` as a space; an invalid escape is kept as is.
fn decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            _ => out.push(c),
        }
        i += 1;
    }
    out
}

fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The string to sign (see the crate docs).
pub fn string_to_sign(p: &Parts<'_>) -> String {
    [
        p.token.to_string(),
        p.timestamp.to_string(),
        p.nonce.to_string(),
        p.method.to_ascii_uppercase(),
        p.path.to_string(),
        canonical_query(p.query),
        hex::encode(Sha256::digest(p.body)),
    ]
    .join("&")
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; the error type exists for fixed-size MACs only.
    match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    }
}

#[allow(clippy::panic)]
fn unreachable_hmac() -> ! {
    panic!("hmac-sha256 accepts keys of every length")
}

/// base64(HMAC-SHA256(secret, message)).
pub fn sign(secret: &[u8], message: &str) -> String {
    let mut m = mac(secret);
    m.update(message.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
}

/// Why a request was refused. Messages never include a secret or a signature.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("{0}")]
    Malformed(String),
    #[error("unknown or expired token")]
    BadToken,
    #[error("timestamp outside the accepted window of ±{0} s")]
    Stale(i64),
    #[error("signature does not match the request")]
    BadSignature,
    #[error("nonce already used")]
    Replayed,
    #[error("a {0} token may only read (GET, HEAD)")]
    Forbidden(&'static str),
    #[error("too many failed authentications from this address; retry in a minute")]
    RateLimited,
    #[error("too many requests within the replay window")]
    Busy,
    #[error("too many requests from this token or address within the replay window; slow down")]
    ClientBusy,
}

impl AuthError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Forbidden(_) => 403,
            AuthError::RateLimited | AuthError::ClientBusy => 429,
            AuthError::Busy => 503,
            _ => 401,
        }
    }
}

/// The request line and body, as received.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Exactly as sent (percent-encoded, without the query).
    pub path: &'a str,
    /// The raw query (without `?`), if any.
    pub query: Option<&'a str>,
    pub body: &'a [u8],
}

/// Who a verified request came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorized {
    pub token: String,
    pub scope: Scope,
    /// The nonce now remembered, for the caller to persist before answering (a replay
    /// after a restart must fail too).
    pub nonce: NonceRecord,
}

/// A remembered nonce as persisted: a 128-bit digest of (token, nonce) and when it may
/// be forgotten. The file format is a sequence of 24-byte records, each the digest
/// (16 bytes, big-endian) then the forget time (Unix seconds, i64 big-endian); a torn
/// last record is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NonceRecord {
    pub digest: u128,
    pub forget_at: i64,
}

impl NonceRecord {
    pub const BYTES: usize = 24;

    pub fn encode(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        let (d, t) = out.split_at_mut(16);
        d.copy_from_slice(&self.digest.to_be_bytes());
        t.copy_from_slice(&self.forget_at.to_be_bytes());
        out
    }

    /// Every whole record in `bytes`.
    pub fn decode_all(bytes: &[u8]) -> Vec<NonceRecord> {
        bytes
            .chunks_exact(Self::BYTES)
            .filter_map(|c| {
                let (d, t) = c.split_at(16);
                Some(NonceRecord {
                    digest: u128::from_be_bytes(d.try_into().ok()?),
                    forget_at: i64::from_be_bytes(t.try_into().ok()?),
                })
            })
            .collect()
    }
}

fn nonce_digest(token: &str, nonce: &str) -> u128 {
    let mut h = Sha256::new();
    h.update(token.as_bytes());
    h.update([0]);
    h.update(nonce.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(d.get(..16).unwrap_or(&[0; 16]));
    u128::from_be_bytes(first)
}

/// The header values of a request, as received.
#[derive(Clone, Copy, Debug, Default)]
pub struct Headers<'a> {
    pub token: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// Events per client address per minute (a fixed window); past the limit the address is
/// refused until its minute is over. Sans-IO: `now` is passed in. Used for failed API
/// authentications here and for sign-on attempts in the io layer.
#[derive(Debug)]
pub struct RateLimit {
    per_minute: u32,
    /// Past this many tracked addresses, those whose minute is over are forgotten.
    max_tracked: usize,
    windows: HashMap<IpAddr, (DateTime<Utc>, u32)>,
}

impl RateLimit {
    pub fn new(per_minute: u32, max_tracked: usize) -> RateLimit {
        RateLimit {
            per_minute,
            max_tracked,
            windows: HashMap::new(),
        }
    }

    /// Whether `ip` has used up its minute.
    pub fn exhausted(&self, ip: IpAddr, now: DateTime<Utc>) -> bool {
        self.windows
            .get(&ip)
            .is_some_and(|(since, n)| now - *since < TimeDelta::minutes(1) && *n >= self.per_minute)
    }

    /// Counts one event from `ip`.
    pub fn record(&mut self, ip: IpAddr, now: DateTime<Utc>) {
        if self.windows.len() > self.max_tracked {
            self.windows
                .retain(|_, (since, _)| now - *since < TimeDelta::minutes(1));
        }
        let w = self.windows.entry(ip).or_insert((now, 0));
        if now - w.0 >= TimeDelta::minutes(1) {
            *w = (now, 0);
        }
        w.1 = w.1.saturating_add(1);
    }

    /// Counts an attempt from `ip`; false when it is over the limit.
    pub fn handle_attempt(&mut self, ip: IpAddr, now: DateTime<Utc>) -> bool {
        let allowed = !self.exhausted(ip, now);
        self.record(ip, now);
        allowed
    }
}

/// Checks signed requests; remembers nonces and failures.
#[derive(Debug)]
pub struct Verifier {
    tokens: HashMap<String, ApiToken>,
    window: TimeDelta,
    seen: HashSet<u128>,
    /// In insertion order (forget times only grow).
    seen_order: VecDeque<Seen>,
    per_token: HashMap<String, usize>,
    per_address: HashMap<IpAddr, usize>,
    max_nonces: usize,
    max_per_client: usize,
    failures: RateLimit,
}

#[derive(Debug)]
struct Seen {
    forget_at: DateTime<Utc>,
    digest: u128,
    /// Whom it counts against (none for nonces restored from disk).
    owner: Option<(String, IpAddr)>,
}

impl Verifier {
    pub fn new(tokens: Vec<ApiToken>, window: TimeDelta) -> Verifier {
        let mut v = Verifier {
            tokens: HashMap::new(),
            window,
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            per_token: HashMap::new(),
            per_address: HashMap::new(),
            max_nonces: MAX_NONCES,
            max_per_client: NONCES_PER_TOKEN.min(NONCES_PER_ADDRESS),
            failures: RateLimit::new(FAILURES_PER_MINUTE, 10_000),
        };
        v.set_tokens(tokens);
        v
    }

    /// Replaces the tokens (a reload); nonces stay remembered.
    pub fn set_tokens(&mut self, tokens: Vec<ApiToken>) {
        self.tokens = tokens.into_iter().map(|t| (t.id.clone(), t)).collect();
    }

    /// Remembers nonces persisted by an earlier run (those not yet due to be forgotten),
    /// so a request captured before a restart cannot be replayed after it.
    pub fn restore(&mut self, records: &[NonceRecord], now: DateTime<Utc>) {
        let mut live: Vec<&NonceRecord> = records
            .iter()
            .filter(|r| r.forget_at > now.timestamp())
            .collect();
        live.sort_by_key(|r| r.forget_at);
        for r in live {
            if self.seen.len() >= self.max_nonces {
                break;
            }
            let Some(at) = DateTime::from_timestamp(r.forget_at, 0) else {
                continue;
            };
            if self.seen.insert(r.digest) {
                self.seen_order.push_back(Seen {
                    forget_at: at,
                    digest: r.digest,
                    owner: None,
                });
            }
        }
    }

    /// The nonces to keep on disk now (a compaction writes exactly these).
    pub fn live_nonces(&self) -> Vec<NonceRecord> {
        self.seen_order
            .iter()
            .map(|s| NonceRecord {
                digest: s.digest,
                forget_at: s.forget_at.timestamp(),
            })
            .collect()
    }

    #[cfg(test)]
    fn with_max_nonces(mut self, n: usize) -> Verifier {
        self.max_nonces = n;
        self
    }

    #[cfg(test)]
    fn with_max_per_client(mut self, n: usize) -> Verifier {
        self.max_per_client = n;
        self
    }

    /// Checks one request: headers, token, expiry, timestamp, signature, nonce, scope.
    /// A failure counts against `remote`; past [`FAILURES_PER_MINUTE`] failures are
    /// answered 429, but a correctly signed request still passes.
    pub fn handle_request(
        &mut self,
        headers: &Headers<'_>,
        request: &Request<'_>,
        remote: IpAddr,
        now: DateTime<Utc>,
    ) -> Result<Authorized, AuthError> {
        let Request {
            method,
            path,
            query,
            body,
        } = *request;
        let r = self.check(headers, method, path, query, body, remote, now);
        if let Err(e) = &r {
            if !matches!(
                e,
                AuthError::Forbidden(_) | AuthError::Busy | AuthError::ClientBusy
            ) {
                if self.failures.exhausted(remote, now) {
                    return Err(AuthError::RateLimited);
                }
                self.failures.record(remote, now);
            }
        }
        r
    }

    /// Whether failures from `remote` are over the limit now (the caller logs less).
    pub fn limited(&self, remote: IpAddr, now: DateTime<Utc>) -> bool {
        self.failures.exhausted(remote, now)
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        &mut self,
        h: &Headers<'_>,
        method: &str,
        path: &str,
        query: Option<&str>,
        body: &[u8],
        remote: IpAddr,
        now: DateTime<Utc>,
    ) -> Result<Authorized, AuthError> {
        let token = h.token.ok_or(AuthError::Missing(HEADER_TOKEN))?;
        let timestamp = h.timestamp.ok_or(AuthError::Missing(HEADER_TIMESTAMP))?;
        let nonce = h.nonce.ok_or(AuthError::Missing(HEADER_NONCE))?;
        let signature = h.signature.ok_or(AuthError::Missing(HEADER_SIGNATURE))?;
        let nonce_ok = (16..=64).contains(&nonce.len())
            && nonce
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !nonce_ok {
            return Err(AuthError::Malformed(format!(
                "{HEADER_NONCE} must be 16-64 characters of A-Z a-z 0-9 - _"
            )));
        }
        let secs: i64 = timestamp.parse().map_err(|_| {
            AuthError::Malformed(format!("{HEADER_TIMESTAMP} must be Unix time in seconds"))
        })?;
        let provided = base64::engine::general_purpose::STANDARD
            .decode(signature)
            .map_err(|_| AuthError::Malformed(format!("{HEADER_SIGNATURE} is not base64")))?;
        let t = self.tokens.get(token).ok_or(AuthError::BadToken)?;
        if t.expires.is_some_and(|e| e <= now) {
            return Err(AuthError::BadToken);
        }
        let at =
            DateTime::from_timestamp(secs, 0).ok_or(AuthError::Stale(self.window.num_seconds()))?;
        if (now - at).abs() > self.window {
            return Err(AuthError::Stale(self.window.num_seconds()));
        }
        let parts = Parts {
            token,
            timestamp,
            nonce,
            method,
            path,
            query,
            body,
        };
        let mut m = mac(&t.secret);
        m.update(string_to_sign(&parts).as_bytes());
        // Constant time (hmac's verify uses subtle).
        m.verify_slice(&provided)
            .map_err(|_| AuthError::BadSignature)?;
        let scope = t.scope;
        let read_only = matches!(method, "GET" | "HEAD");
        // Only signed requests reach the nonce cache: nobody else can fill it, and each
        // token and address has a budget of its own, so one client cannot lock out
        // the others.
        self.forget_nonces(now);
        let digest = nonce_digest(token, nonce);
        if self.seen.contains(&digest) {
            return Err(AuthError::Replayed);
        }
        let token_count = self.per_token.get(token).copied().unwrap_or(0);
        let address_count = self.per_address.get(&remote).copied().unwrap_or(0);
        if token_count >= self.max_per_client || address_count >= self.max_per_client {
            return Err(AuthError::ClientBusy);
        }
        if self.seen.len() >= self.max_nonces {
            return Err(AuthError::Busy);
        }
        // Kept for twice the window: a timestamp may be up to one window in the future.
        let forget_at = now + self.window * 2;
        self.seen.insert(digest);
        *self.per_token.entry(token.to_string()).or_insert(0) += 1;
        *self.per_address.entry(remote).or_insert(0) += 1;
        self.seen_order.push_back(Seen {
            forget_at,
            digest,
            owner: Some((token.to_string(), remote)),
        });
        if scope == Scope::Auditor && !read_only {
            return Err(AuthError::Forbidden(scope.as_str()));
        }
        Ok(Authorized {
            token: token.to_string(),
            scope,
            nonce: NonceRecord {
                digest,
                forget_at: forget_at.timestamp(),
            },
        })
    }

    fn forget_nonces(&mut self, now: DateTime<Utc>) {
        while self.seen_order.front().is_some_and(|s| s.forget_at <= now) {
            let Some(s) = self.seen_order.pop_front() else {
                break;
            };
            self.seen.remove(&s.digest);
            if let Some((token, addr)) = s.owner {
                decrement(&mut self.per_token, &token);
                decrement(&mut self.per_address, &addr);
            }
        }
    }

    /// Nonces remembered now.
    pub fn nonces(&self) -> usize {
        self.seen.len()
    }
}

fn decrement<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests;
