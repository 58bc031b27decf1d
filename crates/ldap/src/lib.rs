//! LDAP sync, sans-IO: users and groups pushed from an LDAP directory into the identity
//! store.
//!
//! What it does:
//! - [`proto`]: decodes the RFC 4533 content-sync messages (Sync State and Sync Done
//!   controls, Sync Info intermediate messages) and search result entries without
//!   panicking on a malformed message.
//! - [`mirror::LdapSync`]: the directory as two refreshAndPersist searches (users,
//!   groups) have shown it, keyed by entryUUID; the cookies to resume from after a
//!   reconnect; the passes to apply: a full one when a refresh ends (guarded against
//!   mass removal by [`mirror::guard`]), a scoped one for each pushed change. Group
//!   membership comes from the groups' member attribute (DNs), not from memberOf.
//!   In a cluster the mirror is saved as it changes ([`mirror::LdapSync::poll_saved`]),
//!   so a consumer taking over on another node resumes from the saved cookies
//!   ([`mirror::LdapSync::handle_restored`]) instead of reading everything again.
//! - the attribute mapping (`[ldap.attributes]`, `[ldap.disabled]`) and the escaped
//!   lookup filter ([`mirror::user_lookup_filter`], RFC 4515).
//!
//! What it deliberately does not: open connections or bind (the io layer drives ldap3),
//! write LDAP, or decide policy. While either search is disconnected or refreshing no
//! pass is produced: an unreachable directory never deprovisions anyone.

pub mod mirror;
pub mod proto;

pub use mirror::{
    guard, normalize_dn, user_lookup_filter, Kind, LdapSync, MirrorDelta, MirrorState, Pass,
    Refusal,
};
pub use proto::{Entry, EntryState, ProtoError, SyncInfo, SyncState};
