//! The directory as the two sync searches (users, groups) have shown it, and the passes
//! it asks of the identity store. Sans-IO: the io driver feeds decoded messages in
//! (`handle_*`) and applies what [`LdapSync::poll_pass`] returns.

use std::collections::{BTreeMap, BTreeSet};

use portcullis_config::{LdapAttributes, LdapDisabled};
use portcullis_identity::{SyncPlan, SyncScope, SyncedGroup, SyncedUser};
use serde::{Deserialize, Serialize};

use crate::proto::{Entry, EntryState, SyncInfo};

/// Which of the two searches a message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Users,
    Groups,
}

/// What the identity store should do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pass {
    /// A refresh ended: the mirror is the whole directory. Guarded against mass removal.
    Full,
    /// Pushed changes: only these records (external ids).
    Scoped(SyncScope),
}

#[derive(Debug, Default)]
struct Side {
    entries: BTreeMap<String, Entry>,
    cookie: Option<Vec<u8>>,
    /// Set while a refresh runs: the entries it has named so far, and whether it started
    /// without a cookie (then everything it does not name is gone).
    refresh: Option<(BTreeSet<String>, bool)>,
    /// The search is in its persist stage.
    live: bool,
}

/// The mirror and its pending work.
#[derive(Debug)]
pub struct LdapSync {
    attributes: LdapAttributes,
    disabled: Option<LdapDisabled>,
    users: Side,
    groups: Side,
    touched_users: BTreeSet<String>,
    touched_groups: BTreeSet<String>,
    /// DNs (normalised) of touched users, before and after: groups naming them are
    /// re-read too.
    touched_dns: BTreeSet<String>,
    full_pending: bool,
    /// Entries changed (or gone) since the last [`LdapSync::poll_saved`].
    unsaved: BTreeSet<(Kind, String)>,
    /// The cookies moved since the last [`LdapSync::poll_saved`].
    cookies_unsaved: bool,
}

/// What changed in the mirror since it was last saved: applied to a saved
/// [`MirrorState`] it gives the mirror as it is now. A consumer on another node resumes
/// from the saved state (its cookies) instead of reading the whole directory again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorDelta {
    pub users_cookie: Option<Vec<u8>>,
    pub groups_cookie: Option<Vec<u8>>,
    /// Entries to write (by kind and entryUUID).
    pub upserts: Vec<(Kind, String, Entry)>,
    /// Entries to forget.
    pub removes: Vec<(Kind, String)>,
}

/// A saved mirror: every entry and the two cookies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorState {
    pub users_cookie: Option<Vec<u8>>,
    pub groups_cookie: Option<Vec<u8>>,
    pub entries: Vec<(Kind, String, Entry)>,
}

impl MirrorState {
    /// Applies `delta` (what a store does with it, for tests and in-memory stores).
    pub fn apply(&mut self, delta: &MirrorDelta) {
        let mut by_key: BTreeMap<(Kind, String), Entry> = std::mem::take(&mut self.entries)
            .into_iter()
            .map(|(k, u, e)| ((k, u), e))
            .collect();
        for (k, u) in &delta.removes {
            by_key.remove(&(*k, u.clone()));
        }
        for (k, u, e) in &delta.upserts {
            by_key.insert((*k, u.clone()), e.clone());
        }
        self.entries = by_key.into_iter().map(|((k, u), e)| (k, u, e)).collect();
        self.users_cookie.clone_from(&delta.users_cookie);
        self.groups_cookie.clone_from(&delta.groups_cookie);
    }
}

/// Normalises a DN for comparison: lower case, no spaces around separators.
pub fn normalize_dn(dn: &str) -> String {
    dn.split(',')
        .map(|rdn| rdn.split('=').map(str::trim).collect::<Vec<_>>().join("="))
        .collect::<Vec<_>>()
        .join(",")
        .to_lowercase()
}

impl LdapSync {
    pub fn new(attributes: LdapAttributes, disabled: Option<LdapDisabled>) -> LdapSync {
        LdapSync {
            attributes,
            disabled,
            users: Side::default(),
            groups: Side::default(),
            touched_users: BTreeSet::new(),
            touched_groups: BTreeSet::new(),
            touched_dns: BTreeSet::new(),
            full_pending: false,
            unsaved: BTreeSet::new(),
            cookies_unsaved: false,
        }
    }

    /// Seeds an empty mirror with a saved state (a consumer taking over on another
    /// node): the next searches resume from its cookies. Refused (false) once the mirror
    /// holds anything: it would mix two views of the directory.
    pub fn handle_restored(&mut self, state: MirrorState) -> bool {
        if !self.users.entries.is_empty()
            || !self.groups.entries.is_empty()
            || self.users.cookie.is_some()
            || self.groups.cookie.is_some()
        {
            return false;
        }
        for (kind, uuid, entry) in state.entries {
            self.side(kind).entries.insert(uuid, entry);
        }
        self.users.cookie = state.users_cookie;
        self.groups.cookie = state.groups_cookie;
        true
    }

    /// What changed since the last call, once both searches are live (so the delta
    /// ends at a point the directory was consistent); call it after the passes were
    /// applied, so a saved state never claims more than the identity store holds.
    #[must_use]
    pub fn poll_saved(&mut self) -> Option<MirrorDelta> {
        if !self.is_live() || (self.unsaved.is_empty() && !self.cookies_unsaved) {
            return None;
        }
        self.cookies_unsaved = false;
        let mut delta = MirrorDelta {
            users_cookie: self.users.cookie.clone(),
            groups_cookie: self.groups.cookie.clone(),
            ..MirrorDelta::default()
        };
        for (kind, uuid) in std::mem::take(&mut self.unsaved) {
            let side = match kind {
                Kind::Users => &self.users,
                Kind::Groups => &self.groups,
            };
            match side.entries.get(&uuid) {
                Some(e) => delta.upserts.push((kind, uuid, e.clone())),
                None => delta.removes.push((kind, uuid)),
            }
        }
        Some(delta)
    }

    /// The whole mirror as a saved state (what [`LdapSync::handle_restored`] takes).
    pub fn state(&self) -> MirrorState {
        let entries = |kind: Kind, side: &Side| {
            side.entries
                .iter()
                .map(move |(u, e)| (kind, u.clone(), e.clone()))
                .collect::<Vec<_>>()
        };
        let mut all = entries(Kind::Users, &self.users);
        all.extend(entries(Kind::Groups, &self.groups));
        MirrorState {
            users_cookie: self.users.cookie.clone(),
            groups_cookie: self.groups.cookie.clone(),
            entries: all,
        }
    }

    fn set_cookie(&mut self, kind: Kind, cookie: Option<Vec<u8>>) {
        if cookie.is_some() {
            let side = self.side(kind);
            if side.cookie != cookie {
                side.cookie = cookie;
                self.cookies_unsaved = true;
            }
        }
    }

    /// The attributes the searches must ask for.
    pub fn wanted_attributes(&self, kind: Kind) -> Vec<String> {
        let a = &self.attributes;
        match kind {
            Kind::Users => {
                let mut v = vec![a.user_name.clone(), a.email.clone(), a.display_name.clone()];
                v.extend(a.tags.clone());
                v.extend(self.disabled.as_ref().map(|d| d.attribute.clone()));
                v
            }
            Kind::Groups => vec![a.group_name.clone(), a.member.clone()],
        }
    }

    fn side(&mut self, kind: Kind) -> &mut Side {
        match kind {
            Kind::Users => &mut self.users,
            Kind::Groups => &mut self.groups,
        }
    }

    /// A search starts (after a connect or a reconcile); returns the cookie to resume from.
    pub fn handle_search_started(&mut self, kind: Kind) -> Option<Vec<u8>> {
        let side = self.side(kind);
        side.live = false;
        side.refresh = Some((BTreeSet::new(), side.cookie.is_none()));
        side.cookie.clone()
    }

    /// The search ended or the connection dropped: nothing is assumed about what it did
    /// not say.
    pub fn handle_search_lost(&mut self, kind: Kind) {
        let side = self.side(kind);
        side.live = false;
        side.refresh = None;
    }

    /// Forget the cookies: the next searches re-read everything (the periodic
    /// reconciliation, or the server asked for it with e-syncRefreshRequired).
    pub fn request_full_refresh(&mut self) {
        self.users.cookie = None;
        self.groups.cookie = None;
    }

    fn touch(&mut self, kind: Kind, uuid: &str, dn: Option<&str>) {
        self.unsaved.insert((kind, uuid.to_string()));
        match kind {
            Kind::Users => {
                self.touched_users.insert(uuid.to_string());
                if let Some(dn) = dn {
                    self.touched_dns.insert(normalize_dn(dn));
                }
                if let Some(old) = self.users.entries.get(uuid) {
                    self.touched_dns.insert(normalize_dn(&old.dn));
                }
            }
            Kind::Groups => {
                self.touched_groups.insert(uuid.to_string());
            }
        }
    }

    /// An entry with its Sync State.
    pub fn handle_entry(
        &mut self,
        kind: Kind,
        state: EntryState,
        uuid: String,
        entry: Entry,
        cookie: Option<Vec<u8>>,
    ) {
        match state {
            EntryState::Delete => {
                self.touch(kind, &uuid, Some(&entry.dn));
                self.side(kind).entries.remove(&uuid);
            }
            // A present entry in a refresh carries no attributes: only "still there".
            EntryState::Present if entry.attrs.is_empty() => {}
            EntryState::Present | EntryState::Add | EntryState::Modify => {
                self.touch(kind, &uuid, Some(&entry.dn));
                self.side(kind).entries.insert(uuid.clone(), entry);
            }
        }
        if let Some((seen, _)) = &mut self.side(kind).refresh {
            seen.insert(uuid);
        }
        self.set_cookie(kind, cookie);
    }

    /// A Sync Info message.
    pub fn handle_info(&mut self, kind: Kind, info: SyncInfo) {
        let (cookie, end) = match info {
            SyncInfo::NewCookie(c) => (Some(c), None),
            SyncInfo::RefreshDelete { cookie, done } => (cookie, done.then_some(false)),
            SyncInfo::RefreshPresent { cookie, done } => (cookie, done.then_some(true)),
            SyncInfo::IdSet {
                cookie,
                deletes,
                uuids,
            } => {
                for uuid in uuids {
                    if deletes {
                        let dn = self.side(kind).entries.get(&uuid).map(|e| e.dn.clone());
                        self.touch(kind, &uuid, dn.as_deref());
                        self.side(kind).entries.remove(&uuid);
                    } else if let Some((seen, _)) = &mut self.side(kind).refresh {
                        seen.insert(uuid);
                    }
                }
                (cookie, None)
            }
        };
        self.set_cookie(kind, cookie);
        if let Some(present_mode) = end {
            self.end_refresh(kind, present_mode);
        }
    }

    fn end_refresh(&mut self, kind: Kind, present_mode: bool) {
        let side = self.side(kind);
        let Some((seen, full)) = side.refresh.take() else {
            return;
        };
        side.live = true;
        if present_mode || full {
            let gone: Vec<String> = side
                .entries
                .keys()
                .filter(|uuid| !seen.contains(*uuid))
                .cloned()
                .collect();
            side.entries.retain(|uuid, _| seen.contains(uuid));
            self.unsaved.extend(gone.into_iter().map(|u| (kind, u)));
        }
        self.full_pending = true;
    }

    /// Both searches are in their persist stage.
    pub fn is_live(&self) -> bool {
        self.users.live && self.groups.live
    }

    /// The next pass to apply, once both searches have refreshed.
    pub fn poll_pass(&mut self) -> Option<Pass> {
        if !self.is_live() {
            return None;
        }
        if self.full_pending {
            self.full_pending = false;
            self.touched_users.clear();
            self.touched_groups.clear();
            self.touched_dns.clear();
            return Some(Pass::Full);
        }
        if self.touched_users.is_empty() && self.touched_groups.is_empty() {
            return None;
        }
        let users = std::mem::take(&mut self.touched_users);
        let mut groups = std::mem::take(&mut self.touched_groups);
        let dns = std::mem::take(&mut self.touched_dns);
        let member = self.attributes.member.to_ascii_lowercase();
        for (uuid, g) in &self.groups.entries {
            if g.attrs
                .get(&member)
                .is_some_and(|ms| ms.iter().any(|m| dns.contains(&normalize_dn(m))))
            {
                groups.insert(uuid.clone());
            }
        }
        Some(Pass::Scoped(SyncScope::Only { users, groups }))
    }

    /// How many users and groups the mirror holds.
    pub fn counts(&self) -> (usize, usize) {
        (self.users.entries.len(), self.groups.entries.len())
    }

    fn first(entry: &Entry, attr: &str) -> Option<String> {
        entry
            .attrs
            .get(&attr.to_ascii_lowercase())
            .and_then(|v| v.first())
            .cloned()
    }

    fn is_disabled(&self, entry: &Entry) -> bool {
        let Some(rule) = &self.disabled else {
            return false;
        };
        let Some(values) = entry.attrs.get(&rule.attribute.to_ascii_lowercase()) else {
            return false;
        };
        if let Some(mask) = rule.bitmask {
            return values
                .iter()
                .any(|v| v.trim().parse::<u64>().is_ok_and(|n| n & mask != 0));
        }
        rule.values.is_empty()
            || values
                .iter()
                .any(|v| rule.values.iter().any(|r| r.eq_ignore_ascii_case(v)))
    }

    /// One user entry as an identity record.
    pub fn user(&self, uuid: &str, entry: &Entry) -> Result<SyncedUser, String> {
        let a = &self.attributes;
        let user_name = Self::first(entry, &a.user_name)
            .ok_or_else(|| format!("{}: no {} attribute", entry.dn, a.user_name))?;
        Ok(SyncedUser {
            external_id: uuid.to_string(),
            user_name,
            email: Self::first(entry, &a.email).unwrap_or_default(),
            display_name: Self::first(entry, &a.display_name),
            active: !self.is_disabled(entry),
            tags: a
                .tags
                .as_ref()
                .and_then(|t| entry.attrs.get(&t.to_ascii_lowercase()).cloned())
                .unwrap_or_default(),
        })
    }

    /// The whole mirror as identity records, with the entries that could not be mapped.
    pub fn desired(&self) -> (Vec<SyncedUser>, Vec<SyncedGroup>, Vec<String>) {
        let mut problems = Vec::new();
        let mut users = Vec::new();
        let mut by_dn: BTreeMap<String, String> = BTreeMap::new();
        for (uuid, e) in &self.users.entries {
            match self.user(uuid, e) {
                Ok(u) => {
                    by_dn.insert(normalize_dn(&e.dn), uuid.clone());
                    users.push(u);
                }
                Err(p) => problems.push(p),
            }
        }
        let a = &self.attributes;
        let mut groups = Vec::new();
        for (uuid, e) in &self.groups.entries {
            let Some(name) = Self::first(e, &a.group_name) else {
                problems.push(format!("{}: no {} attribute", e.dn, a.group_name));
                continue;
            };
            let members = e
                .attrs
                .get(&a.member.to_ascii_lowercase())
                .into_iter()
                .flatten()
                .filter_map(|m| by_dn.get(&normalize_dn(m)).cloned())
                .collect();
            groups.push(SyncedGroup {
                external_id: uuid.clone(),
                display_name: name,
                members,
            });
        }
        (users, groups, problems)
    }
}

/// Why a full pass was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("refused: the pass would take access from {would_remove} of {known} users ({reason}); nothing was changed. Approve it with `portcullis ldap approve-removal` if the directory is right")]
pub struct Refusal {
    pub known: usize,
    pub would_remove: usize,
    pub sample: Vec<String>,
    pub reason: String,
}

/// The mass-removal guard: a full pass may take access from at most `max_share` of the
/// users the source owns (rounded up), and may never leave it with none.
pub fn guard(plan: &SyncPlan, users_after: usize, max_share: f64) -> Result<(), Refusal> {
    let would_remove = plan.losing_access.len();
    let refusal = |reason: String| Refusal {
        known: plan.known,
        would_remove,
        sample: plan.losing_access.iter().take(20).cloned().collect(),
        reason,
    };
    if plan.known > 0 && users_after == 0 {
        return Err(refusal("the directory answered with no users".into()));
    }
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let allowed = (plan.known as f64 * max_share).ceil() as usize;
    if would_remove > allowed {
        return Err(refusal(format!(
            "more than max_removal_share = {max_share}, i.e. {allowed}"
        )));
    }
    Ok(())
}

/// The filter for looking one user up by name: `(&<user_filter>(<attr>=<escaped name>))`.
/// The name is escaped (RFC 4515), so `*`, `(`, `)`, `\` and NUL in it match themselves.
pub fn user_lookup_filter(user_filter: &str, attr: &str, name: &str) -> String {
    format!("(&{user_filter}({attr}={}))", ldap3::ldap_escape(name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    fn entry(dn: &str, attrs: &[(&str, &[&str])]) -> Entry {
        Entry {
            dn: dn.into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect(),
        }
    }

    fn sync() -> LdapSync {
        LdapSync::new(
            LdapAttributes::default(),
            Some(LdapDisabled {
                attribute: "employeeType".into(),
                values: vec!["disabled".into()],
                bitmask: None,
            }),
        )
    }

    fn carol() -> Entry {
        entry(
            "uid=carol,ou=people,dc=x",
            &[("uid", &["carol"]), ("mail", &["c@x"])],
        )
    }

    fn sre(members: &[&str]) -> Entry {
        entry(
            "cn=sre,ou=groups,dc=x",
            &[("cn", &["sre"]), ("member", members)],
        )
    }

    fn refreshed(s: &mut LdapSync) {
        for k in [Kind::Users, Kind::Groups] {
            s.handle_info(
                k,
                SyncInfo::RefreshDelete {
                    cookie: Some(b"c1".to_vec()),
                    done: true,
                },
            );
        }
    }

    #[test]
    fn no_pass_before_both_refreshes_end_then_one_full_pass() {
        let mut s = sync();
        assert_eq!(s.handle_search_started(Kind::Users), None);
        s.handle_search_started(Kind::Groups);
        s.handle_entry(Kind::Users, EntryState::Add, "u1".into(), carol(), None);
        s.handle_entry(
            Kind::Groups,
            EntryState::Add,
            "g1".into(),
            sre(&["UID=carol, ou=people,dc=x"]),
            None,
        );
        s.handle_info(
            Kind::Users,
            SyncInfo::RefreshPresent {
                cookie: None,
                done: true,
            },
        );
        assert_eq!(s.poll_pass(), None, "groups still refreshing");
        s.handle_info(
            Kind::Groups,
            SyncInfo::RefreshPresent {
                cookie: Some(b"c".to_vec()),
                done: true,
            },
        );
        assert_eq!(s.poll_pass(), Some(Pass::Full));
        assert_eq!(s.poll_pass(), None);
        let (users, groups, problems) = s.desired();
        assert!(problems.is_empty());
        assert_eq!(users[0].user_name, "carol");
        assert!(users[0].active);
        assert_eq!(groups[0].members, ["u1".to_string()].into());
        // The next search resumes from the cookie.
        assert_eq!(s.handle_search_started(Kind::Groups), Some(b"c".to_vec()));
    }

    /// Both searches refreshed with these entries, the first full pass taken.
    fn live(users: Vec<(&str, Entry)>, groups: Vec<(&str, Entry)>) -> LdapSync {
        let mut s = sync();
        s.handle_search_started(Kind::Users);
        s.handle_search_started(Kind::Groups);
        for (kind, list) in [(Kind::Users, users), (Kind::Groups, groups)] {
            for (uuid, e) in list {
                s.handle_entry(kind, EntryState::Add, uuid.into(), e, None);
            }
        }
        refreshed(&mut s);
        assert_eq!(s.poll_pass(), Some(Pass::Full));
        s
    }

    #[test]
    fn a_pushed_user_change_scopes_the_groups_naming_it() {
        let mut s = live(
            vec![("u1", carol())],
            vec![("g1", sre(&["uid=carol,ou=people,dc=x"]))],
        );
        let mut disabled = carol();
        disabled
            .attrs
            .insert("employeetype".into(), vec!["Disabled".into()]);
        s.handle_entry(
            Kind::Users,
            EntryState::Modify,
            "u1".into(),
            disabled,
            Some(b"c2".to_vec()),
        );
        assert_eq!(
            s.poll_pass(),
            Some(Pass::Scoped(SyncScope::Only {
                users: ["u1".to_string()].into(),
                groups: ["g1".to_string()].into()
            }))
        );
        assert!(!s.desired().0[0].active);
        assert_eq!(s.handle_search_started(Kind::Users), Some(b"c2".to_vec()));
    }

    #[test]
    fn a_resumed_refresh_in_present_mode_drops_what_it_did_not_name() {
        let mut s = live(
            vec![
                ("u1", carol()),
                ("u2", entry("uid=erin,dc=x", &[("uid", &["erin"])])),
            ],
            vec![],
        );
        // Reconnect with the cookie: only u1 is named present; u2 was deleted meanwhile.
        assert!(s.handle_search_started(Kind::Users).is_some());
        s.handle_search_started(Kind::Groups);
        s.handle_info(
            Kind::Users,
            SyncInfo::IdSet {
                cookie: None,
                deletes: false,
                uuids: vec!["u1".into()],
            },
        );
        s.handle_info(
            Kind::Users,
            SyncInfo::RefreshPresent {
                cookie: None,
                done: true,
            },
        );
        s.handle_info(
            Kind::Groups,
            SyncInfo::RefreshDelete {
                cookie: None,
                done: true,
            },
        );
        assert_eq!(s.poll_pass(), Some(Pass::Full));
        assert_eq!(s.counts(), (1, 0));
        // A delete-mode resume keeps what it did not name.
        s.handle_search_started(Kind::Users);
        s.handle_info(
            Kind::Users,
            SyncInfo::RefreshDelete {
                cookie: None,
                done: true,
            },
        );
        assert_eq!(s.counts(), (1, 0));
    }

    #[test]
    fn a_lost_search_holds_every_pass() {
        let mut s = live(vec![("u1", carol())], vec![]);
        s.handle_search_lost(Kind::Groups);
        s.handle_entry(Kind::Users, EntryState::Delete, "u1".into(), carol(), None);
        assert_eq!(s.poll_pass(), None);
    }

    #[test]
    fn the_guard_counts_against_the_share_and_refuses_an_empty_directory() {
        let plan = |known, losing: &[&str]| SyncPlan {
            known,
            losing_access: losing.iter().map(|s| s.to_string()).collect(),
            ..SyncPlan::default()
        };
        assert!(guard(&plan(10, &["a", "b"]), 8, 0.2).is_ok());
        let r = guard(&plan(10, &["a", "b", "c"]), 7, 0.2).unwrap_err();
        assert_eq!((r.known, r.would_remove), (10, 3));
        assert!(r.to_string().contains("3 of 10"));
        assert!(guard(&plan(1, &["a"]), 0, 1.0).is_err());
        assert!(guard(&plan(0, &[]), 0, 0.2).is_ok());
    }

    #[test]
    fn lookup_filters_escape_the_name() {
        assert_eq!(
            user_lookup_filter("(objectClass=inetOrgPerson)", "uid", "*)(uid=*"),
            "(&(objectClass=inetOrgPerson)(uid=\\2a\\29\\28uid=\\2a))"
        );
        assert_eq!(
            user_lookup_filter("(o=x)", "uid", "a\\b\0"),
            "(&(o=x)(uid=a\\5cb\\00))"
        );
    }

    #[test]
    fn disabled_rules() {
        let mut s = LdapSync::new(
            LdapAttributes::default(),
            Some(LdapDisabled {
                attribute: "userAccountControl".into(),
                values: vec![],
                bitmask: Some(2),
            }),
        );
        let mut e = carol();
        e.attrs
            .insert("useraccountcontrol".into(), vec!["514".into()]);
        assert!(!s.user("u", &e).unwrap().active);
        e.attrs
            .insert("useraccountcontrol".into(), vec!["512".into()]);
        assert!(s.user("u", &e).unwrap().active);
        s.disabled = Some(LdapDisabled {
            attribute: "pwdAccountLockedTime".into(),
            values: vec![],
            bitmask: None,
        });
        e.attrs
            .insert("pwdaccountlockedtime".into(), vec!["000001010000Z".into()]);
        assert!(!s.user("u", &e).unwrap().active);
        let nameless = entry("cn=x", &[("mail", &["m"])]);
        assert!(s.user("u", &nameless).unwrap_err().contains("no uid"));
    }

    /// One message of a sync session, for the saved-state property.
    #[derive(Clone, Debug)]
    enum Msg {
        Entry(Kind, EntryState, u8, u8),
        IdSetDelete(Kind, u8),
        NewCookie(Kind, u8),
        /// A reconnect (resume from the cookie) or a reconciliation (no cookie).
        Restart {
            full: bool,
            present: bool,
        },
        Save,
    }

    fn msg() -> impl proptest::strategy::Strategy<Value = Msg> {
        use proptest::prelude::*;
        let kind = prop_oneof![Just(Kind::Users), Just(Kind::Groups)];
        let state = prop_oneof![
            Just(EntryState::Add),
            Just(EntryState::Modify),
            Just(EntryState::Delete),
            Just(EntryState::Present)
        ];
        prop_oneof![
            6 => (kind.clone(), state, 0u8..6, 0u8..4).prop_map(|(k, s, u, v)| Msg::Entry(k, s, u, v)),
            1 => (kind.clone(), 0u8..6).prop_map(|(k, u)| Msg::IdSetDelete(k, u)),
            1 => (kind, any::<u8>()).prop_map(|(k, c)| Msg::NewCookie(k, c)),
            1 => (any::<bool>(), any::<bool>()).prop_map(|(full, present)| Msg::Restart { full, present }),
            2 => Just(Msg::Save),
        ]
    }

    fn numbered(kind: Kind, u: u8, v: u8) -> Entry {
        match kind {
            Kind::Users => entry(
                &format!("uid=u{u},ou=people,dc=x"),
                &[
                    ("uid", &[&format!("u{u}")]),
                    ("mail", &[&format!("v{v}@x")]),
                ],
            ),
            Kind::Groups => entry(
                &format!("cn=g{u},ou=groups,dc=x"),
                &[
                    ("cn", &[&format!("g{u}")]),
                    ("member", &[&format!("uid=u{v},ou=people,dc=x")]),
                ],
            ),
        }
    }

    fn end_refreshes(s: &mut LdapSync, present: bool, cookie: u8) {
        for k in [Kind::Users, Kind::Groups] {
            let c = Some(vec![cookie]);
            s.handle_info(
                k,
                if present {
                    SyncInfo::RefreshPresent {
                        cookie: c,
                        done: true,
                    }
                } else {
                    SyncInfo::RefreshDelete {
                        cookie: c,
                        done: true,
                    }
                },
            );
        }
    }

    proptest::proptest! {
        /// Saving every delta and restoring the saved state on a fresh mirror gives the
        /// same mirror (entries, cookies) and the same directory as the one that saved.
        #[test]
        fn a_restored_mirror_equals_the_one_that_saved(msgs in proptest::collection::vec(msg(), 0..60)) {
            let mut s = sync();
            s.handle_search_started(Kind::Users);
            s.handle_search_started(Kind::Groups);
            end_refreshes(&mut s, false, 0);
            let mut saved = MirrorState::default();
            if let Some(d) = s.poll_saved() {
                saved.apply(&d);
            }
            let mut n = 1u8;
            for m in msgs {
                match m {
                    Msg::Entry(k, st, u, v) => {
                        let e = if st == EntryState::Present && v == 0 { Entry::default() } else { numbered(k, u, v) };
                        s.handle_entry(k, st, format!("{k:?}{u}"), e, None);
                    }
                    Msg::IdSetDelete(k, u) => s.handle_info(k, SyncInfo::IdSet { cookie: None, deletes: true, uuids: vec![format!("{k:?}{u}")] }),
                    Msg::NewCookie(k, c) => s.handle_info(k, SyncInfo::NewCookie(vec![c])),
                    Msg::Restart { full, present } => {
                        s.handle_search_lost(Kind::Users);
                        s.handle_search_lost(Kind::Groups);
                        if full {
                            s.request_full_refresh();
                        }
                        s.handle_search_started(Kind::Users);
                        s.handle_search_started(Kind::Groups);
                        n = n.wrapping_add(1);
                        end_refreshes(&mut s, present, n);
                    }
                    Msg::Save => {}
                }
                while s.poll_pass().is_some() {}
                if let Some(d) = s.poll_saved() {
                    saved.apply(&d);
                }
            }
            let mut restored = sync();
            proptest::prop_assert!(restored.handle_restored(saved.clone()));
            let mut want = s.state();
            want.entries.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            let mut got = restored.state();
            got.entries.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            proptest::prop_assert_eq!(&got, &want);
            // A restored mirror resumes: its searches start from the saved cookies.
            proptest::prop_assert_eq!(restored.handle_search_started(Kind::Users), want.users_cookie.clone());
            proptest::prop_assert_eq!(restored.handle_search_started(Kind::Groups), want.groups_cookie.clone());
            // And it is not seeded twice.
            proptest::prop_assert!(!restored.handle_restored(saved));
        }
    }
}
