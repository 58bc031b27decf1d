//! The RFC 4533 content-sync messages and search result entries, decoded from BER
//! without panicking: the directory is a remote peer, and a malformed message must end
//! the session with an error, not the gateway.

use std::collections::BTreeMap;

use ldap3::asn1::{parse_tag, StructureTag, TagClass, Types, PL};

pub const SYNC_STATE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.2";
pub const SYNC_DONE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.3";
pub const SYNC_INFO_OID: &str = "1.3.6.1.4.1.4203.1.9.1.4";

/// A message the decoder could not make sense of.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} from the directory: {why}")]
pub struct ProtoError {
    pub what: &'static str,
    pub why: String,
}

fn bad(what: &'static str, why: impl Into<String>) -> ProtoError {
    ProtoError {
        what,
        why: why.into(),
    }
}

/// What a Sync State control says of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    Present,
    Add,
    Modify,
    Delete,
}

/// The Sync State control of a search result entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncState {
    pub state: EntryState,
    /// entryUUID, in its usual hyphenated text form.
    pub uuid: String,
    pub cookie: Option<Vec<u8>>,
}

/// The Sync Info intermediate message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncInfo {
    NewCookie(Vec<u8>),
    /// The refresh continues or ends (`done`) in delete mode: deletions were listed.
    RefreshDelete {
        cookie: Option<Vec<u8>>,
        done: bool,
    },
    /// The refresh continues or ends (`done`) in present mode: what was not listed as
    /// present is gone.
    RefreshPresent {
        cookie: Option<Vec<u8>>,
        done: bool,
    },
    /// Many entries at once: deleted ones (`deletes`) or present ones.
    IdSet {
        cookie: Option<Vec<u8>>,
        deletes: bool,
        uuids: Vec<String>,
    },
}

/// A search result entry: its DN and attributes (names lower-cased, values as text;
/// values that are not UTF-8 are dropped).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub dn: String,
    pub attrs: BTreeMap<String, Vec<String>>,
}

fn one_tag(what: &'static str, bytes: &[u8]) -> Result<StructureTag, ProtoError> {
    match parse_tag(bytes) {
        Ok(([], tag)) => Ok(tag),
        Ok(_) => Err(bad(what, "trailing bytes")),
        Err(_) => Err(bad(what, "not BER")),
    }
}

fn seq(what: &'static str, tag: StructureTag) -> Result<Vec<StructureTag>, ProtoError> {
    tag.expect_constructed()
        .ok_or_else(|| bad(what, "expected a sequence"))
}

fn prim(what: &'static str, tag: StructureTag) -> Result<Vec<u8>, ProtoError> {
    tag.expect_primitive()
        .ok_or_else(|| bad(what, "expected a primitive value"))
}

fn is_universal(tag: &StructureTag, t: Types) -> bool {
    tag.class == TagClass::Universal && tag.id == t as u64
}

fn boolean(what: &'static str, tag: StructureTag) -> Result<bool, ProtoError> {
    let v = prim(what, tag)?;
    match v.as_slice() {
        [b] => Ok(*b != 0),
        _ => Err(bad(what, "a boolean is one byte")),
    }
}

fn uuid_text(what: &'static str, bytes: &[u8]) -> Result<String, ProtoError> {
    uuid::Uuid::from_slice(bytes)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| bad(what, format!("a syncUUID is 16 bytes, got {}", bytes.len())))
}

/// Decodes a Sync State control value.
pub fn sync_state(value: &[u8]) -> Result<SyncState, ProtoError> {
    const W: &str = "sync state control";
    let mut parts = seq(W, one_tag(W, value)?)?.into_iter();
    let state = parts.next().ok_or_else(|| bad(W, "no state"))?;
    if !is_universal(&state, Types::Enumerated) {
        return Err(bad(W, "state is not an enumeration"));
    }
    let state = match prim(W, state)?.as_slice() {
        [0] => EntryState::Present,
        [1] => EntryState::Add,
        [2] => EntryState::Modify,
        [3] => EntryState::Delete,
        other => return Err(bad(W, format!("unknown state {other:?}"))),
    };
    let uuid = parts.next().ok_or_else(|| bad(W, "no entryUUID"))?;
    let uuid = uuid_text(W, &prim(W, uuid)?)?;
    let cookie = parts.next().map(|c| prim(W, c)).transpose()?;
    Ok(SyncState {
        state,
        uuid,
        cookie,
    })
}

/// Decodes a Sync Done control value: the cookie and whether deletions were listed.
pub fn sync_done(value: &[u8]) -> Result<(Option<Vec<u8>>, bool), ProtoError> {
    const W: &str = "sync done control";
    let mut cookie = None;
    let mut deletes = false;
    for part in seq(W, one_tag(W, value)?)? {
        if is_universal(&part, Types::OctetString) {
            cookie = Some(prim(W, part)?);
        } else if is_universal(&part, Types::Boolean) {
            deletes = boolean(W, part)?;
        } else {
            return Err(bad(W, "unexpected component"));
        }
    }
    Ok((cookie, deletes))
}

/// Decodes the value of a Sync Info intermediate message.
pub fn sync_info_value(value: &[u8]) -> Result<SyncInfo, ProtoError> {
    const W: &str = "sync info message";
    let tag = one_tag(W, value)?;
    if tag.class != TagClass::Context {
        return Err(bad(W, "not a context-specific choice"));
    }
    let id = tag.id;
    if id == 0 {
        return Ok(SyncInfo::NewCookie(prim(W, tag)?));
    }
    if id > 3 {
        return Err(bad(W, format!("unknown choice [{id}]")));
    }
    let mut cookie = None;
    // refreshDone defaults to TRUE, refreshDeletes to FALSE.
    let mut flag = id != 3;
    let mut uuids = Vec::new();
    for part in seq(W, tag)? {
        if is_universal(&part, Types::OctetString) {
            cookie = Some(prim(W, part)?);
        } else if is_universal(&part, Types::Boolean) {
            flag = boolean(W, part)?;
        } else if id == 3 && is_universal(&part, Types::Set) {
            for u in seq(W, part)? {
                uuids.push(uuid_text(W, &prim(W, u)?)?);
            }
        } else {
            return Err(bad(W, "unexpected component"));
        }
    }
    Ok(match id {
        1 => SyncInfo::RefreshDelete { cookie, done: flag },
        2 => SyncInfo::RefreshPresent { cookie, done: flag },
        _ => SyncInfo::IdSet {
            cookie,
            deletes: flag,
            uuids,
        },
    })
}

/// Decodes an IntermediateResponse protocol op ([APPLICATION 25]) carrying Sync Info.
pub fn sync_info(op: StructureTag) -> Result<SyncInfo, ProtoError> {
    const W: &str = "intermediate response";
    if op.class != TagClass::Application || op.id != 25 {
        return Err(bad(W, "not an intermediate response"));
    }
    let mut value = None;
    for part in seq(W, op)? {
        match (part.class, part.id) {
            (TagClass::Context, 0) => {
                let oid = prim(W, part)?;
                if oid != SYNC_INFO_OID.as_bytes() {
                    return Err(bad(W, "not a sync info message"));
                }
            }
            (TagClass::Context, 1) => value = Some(prim(W, part)?),
            _ => return Err(bad(W, "unexpected component")),
        }
    }
    sync_info_value(&value.ok_or_else(|| bad(W, "no value"))?)
}

/// Decodes a SearchResultEntry protocol op ([APPLICATION 4]).
pub fn entry(op: StructureTag) -> Result<Entry, ProtoError> {
    const W: &str = "search result entry";
    if op.class != TagClass::Application || op.id != 4 {
        return Err(bad(W, "not a search result entry"));
    }
    let mut parts = seq(W, op)?.into_iter();
    let dn = parts.next().ok_or_else(|| bad(W, "no DN"))?;
    let dn = String::from_utf8(prim(W, dn)?).map_err(|_| bad(W, "the DN is not UTF-8"))?;
    let mut attrs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Some(list) = parts.next() {
        for attr in seq(W, list)? {
            let mut a = seq(W, attr)?.into_iter();
            let name = a.next().ok_or_else(|| bad(W, "attribute without a name"))?;
            let name = String::from_utf8(prim(W, name)?)
                .map_err(|_| bad(W, "an attribute name is not UTF-8"))?
                .to_ascii_lowercase();
            let values = match a.next() {
                Some(set) => seq(W, set)?,
                None => Vec::new(),
            };
            let slot = attrs.entry(name).or_default();
            for v in values {
                if let PL::P(bytes) = v.payload {
                    if let Ok(text) = String::from_utf8(bytes) {
                        slot.push(text);
                    }
                }
            }
        }
    }
    Ok(Entry { dn, attrs })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;
    use ldap3::asn1::{write, ASNTag, Boolean, Enumerated, OctetString, Sequence, Set, Tag};
    use proptest::prelude::*;

    fn encode(tag: Tag) -> Vec<u8> {
        let mut b = bytes::BytesMut::new();
        write::encode_into(&mut b, tag.into_structure()).unwrap();
        b.to_vec()
    }

    fn octets(v: &[u8]) -> Tag {
        Tag::OctetString(OctetString {
            inner: v.to_vec(),
            ..Default::default()
        })
    }

    const UUID: [u8; 16] = [
        0xba, 0x44, 0xc1, 0x36, 0x7a, 0x9d, 0x10, 0x41, 0x8f, 0xc1, 0x7b, 0x95, 0x81, 0x39, 0, 0x5a,
    ];

    #[test]
    fn a_sync_state_decodes() {
        let v = encode(Tag::Sequence(Sequence {
            inner: vec![
                Tag::Enumerated(Enumerated {
                    inner: 2,
                    ..Default::default()
                }),
                octets(&UUID),
                octets(b"rid=000,csn=1"),
            ],
            ..Default::default()
        }));
        let s = sync_state(&v).unwrap();
        assert_eq!(s.state, EntryState::Modify);
        assert_eq!(s.uuid, "ba44c136-7a9d-1041-8fc1-7b958139005a");
        assert_eq!(s.cookie.as_deref(), Some(&b"rid=000,csn=1"[..]));
    }

    #[test]
    fn sync_info_choices_decode_with_their_defaults() {
        let present = encode(Tag::Sequence(Sequence {
            id: 2,
            class: TagClass::Context,
            inner: vec![octets(b"c")],
        }));
        assert_eq!(
            sync_info_value(&present).unwrap(),
            SyncInfo::RefreshPresent {
                cookie: Some(b"c".to_vec()),
                done: true
            }
        );
        let ids = encode(Tag::Sequence(Sequence {
            id: 3,
            class: TagClass::Context,
            inner: vec![
                Tag::Boolean(Boolean {
                    inner: true,
                    ..Default::default()
                }),
                Tag::Set(Set {
                    inner: vec![octets(&UUID)],
                    ..Default::default()
                }),
            ],
        }));
        assert_eq!(
            sync_info_value(&ids).unwrap(),
            SyncInfo::IdSet {
                cookie: None,
                deletes: true,
                uuids: vec!["ba44c136-7a9d-1041-8fc1-7b958139005a".into()]
            }
        );
    }

    #[test]
    fn a_short_uuid_is_an_error_not_a_panic() {
        let v = encode(Tag::Sequence(Sequence {
            inner: vec![
                Tag::Enumerated(Enumerated {
                    inner: 1,
                    ..Default::default()
                }),
                octets(&[1, 2, 3]),
            ],
            ..Default::default()
        }));
        assert!(sync_state(&v).unwrap_err().to_string().contains("16 bytes"));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = sync_state(&bytes);
            let _ = sync_done(&bytes);
            let _ = sync_info_value(&bytes);
            if let Ok((_, tag)) = parse_tag(&bytes) {
                let _ = entry(tag.clone());
                let _ = sync_info(tag);
            }
        }

        #[test]
        fn states_round_trip(state in 0i64..4, uuid in any::<[u8; 16]>(), cookie in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))) {
            let mut inner = vec![Tag::Enumerated(Enumerated { inner: state, ..Default::default() }), octets(&uuid)];
            if let Some(c) = &cookie {
                inner.push(octets(c));
            }
            let s = sync_state(&encode(Tag::Sequence(Sequence { inner, ..Default::default() }))).unwrap();
            prop_assert_eq!(s.uuid, uuid::Uuid::from_bytes(uuid).hyphenated().to_string());
            prop_assert_eq!(s.cookie, cookie);
        }
    }
}
