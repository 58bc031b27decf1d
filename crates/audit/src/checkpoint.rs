//! Signed checkpoints: tamper evidence a plain hash chain cannot give.
//!
//! A hash chain shows that rows were edited, removed or reordered *inside* it, but an
//! attacker who rewrites every row after some point (re-hashing each) or cuts the tail
//! leaves a chain that verifies. So each node signs its chain head every
//! `checkpoint_interval_secs` and at shutdown, with Ed25519 (`[audit]
//! checkpoint_key_file`), and keeps the signed checkpoint in two places: in the trail
//! itself (an `audit_checkpoint` event) and outside ClickHouse (a JSON line in
//! `checkpoints.jsonl` beside the spool; in a cluster also the cluster database).
//!
//! A checkpoint signs (node, seq, hash, time, from_seq, root): the event at `seq` has
//! `hash`, and the row hashes of `from_seq..=seq` (the interval since the previous
//! checkpoint) have the Merkle root `root` ([`Merkle`], RFC 6962's tree hash: leaves
//! `SHA-256(0x00 ‖ row hash)`, nodes `SHA-256(0x01 ‖ left ‖ right)`). The root lets an
//! export prove single rows with a short path ([`inclusion_proof`]) instead of shipping
//! the whole interval.
//!
//! Signed message (UTF-8, `\n` after every line), the format this module owns:
//! ```text
//! portcullis audit checkpoint v1
//! node=<node>
//! seq=<seq>
//! hash=<64 hex>
//! time_us=<µs since 1970>
//! from_seq=<first seq of the interval>
//! root=<64 hex>
//! uncovered=<from>-<to>        (0-0: none)
//! ```
//! Public keys print as `ed25519:<base64 of the 32 bytes>`; the key id is the first 8
//! bytes of SHA-256 of them, as hex. Private keys are PKCS#8 (PEM, as `openssl genpkey
//! -algorithm ed25519` or `portcullis audit keygen` write them).
//!
//! What this module deliberately does not do: read ClickHouse or files (the pipeline
//! writes checkpoints, the auditor crate checks them).

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::row::Hash;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a PEM private key (expected -----BEGIN PRIVATE KEY-----)")]
    NotPem,
    #[error("not an Ed25519 PKCS#8 private key: {0}")]
    Rejected(String),
    #[error("public key {0:?}: expected ed25519:<base64 of 32 bytes> or a PEM public key")]
    Public(String),
}

/// The signing half, held by the writer thread.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.public().key_id())
            .finish()
    }
}

fn pem_body(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = text.get(start..)?.find(&end)? + start;
    let b64: String = text
        .get(start..stop)?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

impl SigningKey {
    /// Reads a PKCS#8 PEM private key.
    pub fn from_pem(text: &str) -> Result<SigningKey, KeyError> {
        let der = pem_body(text, "PRIVATE KEY").ok_or(KeyError::NotPem)?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| KeyError::Rejected(e.to_string()))?;
        Ok(SigningKey { pair })
    }

    /// A new key as PKCS#8 PEM (for `portcullis audit keygen`).
    pub fn generate_pem() -> Result<String, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let der =
            Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| KeyError::Rejected(e.to_string()))?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(chunk));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        Ok(pem)
    }

    pub fn public(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(k)
    }

    /// Signs a checkpoint.
    pub fn sign(&self, cp: Checkpoint) -> SignedCheckpoint {
        let sig = self.pair.sign(&cp.message());
        SignedCheckpoint {
            key_id: self.public().key_id(),
            signature: base64::engine::general_purpose::STANDARD.encode(sig.as_ref()),
            checkpoint: cp,
        }
    }

    /// Signs any message (an export's manifest).
    pub fn sign_bytes(&self, message: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.pair.sign(message).as_ref())
    }
}

/// A published verification key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// `ed25519:<base64>` or a PEM `PUBLIC KEY` (SubjectPublicKeyInfo, as `openssl pkey
    /// -pubout` writes it).
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let t = text.trim();
        let bytes = if let Some(b64) = t.strip_prefix("ed25519:") {
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| KeyError::Public(t.chars().take(80).collect()))?
        } else if let Some(der) = pem_body(t, "PUBLIC KEY") {
            // SPKI for Ed25519 is a fixed 12-byte prefix and the 32 key bytes.
            const PREFIX: [u8; 12] = [
                0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
            ];
            match der.strip_prefix(&PREFIX[..]) {
                Some(k) => k.to_vec(),
                None => return Err(KeyError::Public("a PEM key that is not Ed25519".into())),
            }
        } else {
            return Err(KeyError::Public(t.chars().take(80).collect()));
        };
        let k: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::Public(t.chars().take(80).collect()))?;
        Ok(PublicKey(k))
    }

    pub fn key_id(&self) -> String {
        let d = Sha256::digest(self.0);
        hex::encode(d.get(..8).unwrap_or_default())
    }

    /// Whether `signature` (base64) signs `message` under this key.
    pub fn verifies(&self, message: &[u8], signature: &str) -> bool {
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(signature) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, self.0)
            .verify(message, &sig)
            .is_ok()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ed25519:{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }
}

/// What a node signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub node: String,
    pub seq: u64,
    #[serde(with = "hex_hash")]
    pub hash: Hash,
    pub time_us: u64,
    pub from_seq: u64,
    #[serde(with = "hex_hash")]
    pub root: Hash,
    /// Rows `[from, to]` of the chain no signed root covers; `[0, 0]`: none.
    pub uncovered: [u64; 2],
}

impl Checkpoint {
    /// The signed bytes (see the module docs).
    pub fn message(&self) -> Vec<u8> {
        format!(
            "portcullis audit checkpoint v1\nnode={}\nseq={}\nhash={}\ntime_us={}\nfrom_seq={}\nroot={}\nuncovered={}-{}\n",
            self.node,
            self.seq,
            hex::encode(self.hash),
            self.time_us,
            self.from_seq,
            hex::encode(self.root),
            self.uncovered[0],
            self.uncovered[1],
        )
        .into_bytes()
    }

    /// Rows the root covers.
    pub fn leaves(&self) -> u64 {
        (self.seq + 1).saturating_sub(self.from_seq)
    }
}

/// A checkpoint with its signature: one line of `checkpoints.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCheckpoint {
    #[serde(flatten)]
    pub checkpoint: Checkpoint,
    pub key_id: String,
    pub signature: String,
}

impl SignedCheckpoint {
    /// Whether one of `keys` (picked by key id) signed it.
    pub fn verify(&self, keys: &[PublicKey]) -> bool {
        keys.iter()
            .filter(|k| k.key_id() == self.key_id)
            .any(|k| k.verifies(&self.checkpoint.message(), &self.signature))
    }

    /// As the `audit_checkpoint` event carries it.
    pub fn to_event(&self) -> portcullis_model::Event {
        let c = &self.checkpoint;
        portcullis_model::Event::AuditCheckpoint {
            node: c.node.clone(),
            head_seq: c.seq,
            head_hash: hex::encode(c.hash),
            time_us: c.time_us,
            from_seq: c.from_seq,
            root: hex::encode(c.root),
            uncovered: c.uncovered,
            key_id: self.key_id.clone(),
            signature: self.signature.clone(),
        }
    }

    /// From an `audit_checkpoint` row's `detail` (the event's fields as JSON).
    pub fn from_detail(detail: &str) -> Option<SignedCheckpoint> {
        #[derive(Deserialize)]
        struct Detail {
            node: String,
            head_seq: u64,
            #[serde(with = "hex_hash")]
            head_hash: Hash,
            time_us: u64,
            from_seq: u64,
            #[serde(with = "hex_hash")]
            root: Hash,
            uncovered: [u64; 2],
            key_id: String,
            signature: String,
        }
        let d: Detail = serde_json::from_str(detail).ok()?;
        Some(SignedCheckpoint {
            checkpoint: Checkpoint {
                node: d.node,
                seq: d.head_seq,
                hash: d.head_hash,
                time_us: d.time_us,
                from_seq: d.from_seq,
                root: d.root,
                uncovered: d.uncovered,
            },
            key_id: d.key_id,
            signature: d.signature,
        })
    }
}

mod hex_hash {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// RFC 6962 leaf hash of a row hash.
pub fn leaf(row_hash: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(row_hash);
    h.finalize().into()
}

fn node(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of a tree with no leaves (SHA-256 of nothing, as RFC 6962 defines it).
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// A Merkle tree built leaf by leaf in O(log n) memory: the roots of its complete
/// subtrees, largest first (what the writer keeps between checkpoints).
#[derive(Clone, Debug, Default)]
pub struct Merkle {
    /// (subtree root, leaves under it), sizes strictly decreasing powers of two.
    frontier: Vec<(Hash, u64)>,
    len: u64,
}

impl Merkle {
    pub fn push(&mut self, row_hash: &Hash) {
        let mut cur = (leaf(row_hash), 1u64);
        while let Some(&(top, size)) = self.frontier.last() {
            if size != cur.1 {
                break;
            }
            self.frontier.pop();
            cur = (node(&top, &cur.0), size * 2);
        }
        self.frontier.push(cur);
        self.len += 1;
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The frontier as hex (subtree root, size) pairs, for the writer's state file.
    pub fn to_state(&self) -> Vec<(String, u64)> {
        self.frontier
            .iter()
            .map(|(h, n)| (hex::encode(h), *n))
            .collect()
    }

    /// Back from [`Merkle::to_state`]; `None` unless it is a well-formed frontier
    /// (sizes strictly decreasing powers of two).
    pub fn from_state(state: &[(String, u64)]) -> Option<Merkle> {
        let mut frontier = Vec::with_capacity(state.len());
        let mut len = 0u64;
        for (h, n) in state {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(h, &mut hash).ok()?;
            if !n.is_power_of_two()
                || frontier
                    .last()
                    .is_some_and(|(_, prev): &(Hash, u64)| prev <= n)
            {
                return None;
            }
            len = len.checked_add(*n)?;
            frontier.push((hash, *n));
        }
        Some(Merkle { frontier, len })
    }

    /// RFC 6962's tree hash of the leaves so far.
    pub fn root(&self) -> Hash {
        let mut it = self.frontier.iter().rev();
        let Some(&(mut acc, _)) = it.next() else {
            return empty_root();
        };
        for (h, _) in it {
            acc = node(h, &acc);
        }
        acc
    }
}

/// Every level of the tree over `row_hashes` (level 0: the leaves); an odd last node is
/// carried up unchanged, which gives RFC 6962's shape.
pub fn levels(row_hashes: &[Hash]) -> Vec<Vec<Hash>> {
    let mut levels = vec![row_hashes.iter().map(leaf).collect::<Vec<_>>()];
    while levels.last().is_some_and(|l| l.len() > 1) {
        let prev = levels.last().map(Vec::as_slice).unwrap_or_default();
        let next = prev
            .chunks(2)
            .map(|pair| match pair {
                [l, r] => node(l, r),
                [only] => *only,
                _ => empty_root(),
            })
            .collect();
        levels.push(next);
    }
    levels
}

/// The sibling path of leaf `index` (bottom up) from [`levels`].
pub fn inclusion_proof(levels: &[Vec<Hash>], mut index: usize) -> Vec<Hash> {
    let mut path = Vec::new();
    for level in levels.iter().take(levels.len().saturating_sub(1)) {
        let sibling = index ^ 1;
        if let Some(h) = level.get(sibling) {
            path.push(*h);
        }
        index /= 2;
    }
    path
}

/// Whether `row_hash` is leaf `index` of a tree of `size` leaves with root `root`, by
/// its sibling `path` (RFC 9162's inclusion verification).
pub fn verify_inclusion(
    row_hash: &Hash,
    index: u64,
    size: u64,
    path: &[Hash],
    root: &Hash,
) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = leaf(row_hash);
    for p in path {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && &r == root
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use proptest::prelude::*;

    fn hashes(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| Sha256::digest((i as u64).to_le_bytes()).into())
            .collect()
    }

    /// RFC 6962's recursive definition, to hold the incremental and level forms to.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaf(&leaves[0]),
            n => {
                // The largest power of two below n.
                let mut k = 1;
                while k * 2 < n {
                    k *= 2;
                }
                node(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    proptest! {
        #[test]
        fn incremental_level_and_recursive_roots_agree_and_every_proof_verifies(n in 0usize..70) {
            let hs = hashes(n);
            let mut m = Merkle::default();
            for h in &hs {
                m.push(h);
            }
            let lv = levels(&hs);
            let root = m.root();
            prop_assert_eq!(root, mth(&hs));
            if n > 0 {
                prop_assert_eq!(lv.last().unwrap()[0], root);
            }
            for (i, h) in hs.iter().enumerate() {
                let path = inclusion_proof(&lv, i);
                prop_assert!(verify_inclusion(h, i as u64, n as u64, &path, &root));
                // Another leaf, index or size does not verify.
                let other: Hash = Sha256::digest(b"forged").into();
                prop_assert!(!verify_inclusion(&other, i as u64, n as u64, &path, &root));
                if n > 1 {
                    let j = (i + 1) % n;
                    prop_assert!(!verify_inclusion(h, j as u64, n as u64, &path, &root));
                }
            }
        }
    }

    #[test]
    fn signatures_verify_under_their_key_only_and_any_changed_field_fails() {
        let key = SigningKey::from_pem(&SigningKey::generate_pem().unwrap()).unwrap();
        let other = SigningKey::from_pem(&SigningKey::generate_pem().unwrap()).unwrap();
        let cp = Checkpoint {
            node: "gw-a".into(),
            seq: 41,
            hash: [7; 32],
            time_us: 1_800_000_000_000_000,
            from_seq: 1,
            root: [9; 32],
            uncovered: [0, 0],
        };
        let signed = key.sign(cp.clone());
        assert!(signed.verify(&[other.public(), key.public()]));
        assert!(!signed.verify(&[other.public()]));
        let line = serde_json::to_string(&signed).unwrap();
        assert_eq!(
            serde_json::from_str::<SignedCheckpoint>(&line).unwrap(),
            signed
        );
        let mut forged = signed.clone();
        forged.checkpoint.seq = 40;
        assert!(!forged.verify(&[key.public()]));
        let mut forged = signed.clone();
        forged.checkpoint.hash[0] ^= 1;
        assert!(!forged.verify(&[key.public()]));
        // The event carries the same fields, so the trail's copy parses back.
        let env = portcullis_model::Envelope {
            v: 1,
            id: uuid::Uuid::nil(),
            seq: 42,
            time: chrono::Utc::now(),
            gateway: "gw-a".into(),
            event: signed.to_event(),
        };
        let row = crate::AuditRow::from_envelope(&env);
        assert_eq!(row.kind, "audit_checkpoint");
        // The events file's line names `seq` once: the envelope's.
        let line = serde_json::to_string(&env).unwrap();
        assert_eq!(line.matches("\"seq\":").count(), 1, "{line}");
        assert_eq!(row.seq, 42);
        let hold = portcullis_model::Envelope {
            event: portcullis_model::Event::LegalHold {
                hold_id: "lh-1".into(),
                action: "add".into(),
                user: "bob".into(),
                since: chrono::Utc::now(),
                until: chrono::Utc::now(),
                reason: "case".into(),
                actor: "admin".into(),
            },
            ..env
        };
        let line = serde_json::to_string(&hold).unwrap();
        assert_eq!(line.matches("\"id\":").count(), 1, "{line}");
        assert_eq!(SignedCheckpoint::from_detail(&row.detail).unwrap(), signed);
        // Public keys round-trip through their printed form.
        let printed = key.public().to_string();
        assert_eq!(PublicKey::parse(&printed).unwrap(), key.public());
        assert!(PublicKey::parse("ed25519:AAAA").is_err());
        assert!(SigningKey::from_pem("not a key").is_err());
    }
}
