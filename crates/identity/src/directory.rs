//! The directory in memory: users and groups with stable ids, and the principals and
//! changes they imply. Sans-IO: every change is first planned (`&self`, returns a
//! [`Mutation`]), then persisted by the caller, then applied ([`Directory::apply`]), which
//! returns the [`IdentityChange`]s for the gateway core.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use portcullis_model::{ChangeKind, IdentityChange, Principal};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A user as an identity source describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Ours, stable, never reused: a user deleted and created again under the same name
    /// gets a new id (and none of the old memberships or devices).
    pub id: Uuid,
    /// The login name; what policies see as `User::"<user_name>"`. Unique, compared
    /// without case (RFC 7643 §4.1.1).
    pub user_name: String,
    /// The source's own id for the user (SCIM `externalId`, LDAP entryUUID or DN).
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    /// Primary email.
    #[serde(default)]
    pub email: String,
    pub active: bool,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Which source owns the record: `scim`, `ldap`, `admin`.
    pub source: String,
    pub created: DateTime<Utc>,
    pub modified: DateTime<Utc>,
    /// Bumped on every change (SCIM `meta.version`).
    pub version: u64,
}

/// A group; its display name is what policies see as `Group::"<display_name>"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub id: Uuid,
    pub display_name: String,
    #[serde(default)]
    pub external_id: Option<String>,
    pub members: BTreeSet<Uuid>,
    pub source: String,
    pub created: DateTime<Utc>,
    pub modified: DateTime<Utc>,
    pub version: u64,
}

/// Records to write (insert or replace) and to delete, as one transaction. Its JSON is
/// the body of a cluster change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mutation {
    pub users: Vec<User>,
    pub removed_users: Vec<Uuid>,
    pub groups: Vec<Group>,
    pub removed_groups: Vec<Uuid>,
}

impl Mutation {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
            && self.removed_users.is_empty()
            && self.groups.is_empty()
            && self.removed_groups.is_empty()
    }
}

/// Why a planned change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("user name {0:?} is already taken")]
    UserNameTaken(String),
    #[error("user name {0:?} is defined in the gateway's configuration file")]
    ReservedName(String),
    #[error("group name {0:?} is already taken")]
    GroupNameTaken(String),
    #[error("no user with id {0}")]
    NoSuchUser(String),
    #[error("no group with id {0}")]
    NoSuchGroup(String),
    #[error("user {0:?} is disabled")]
    Disabled(String),
    #[error("{0}")]
    Invalid(String),
}

/// Users and groups, indexed by id and by (case-folded) name.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    users: BTreeMap<Uuid, User>,
    groups: BTreeMap<Uuid, Group>,
    user_by_name: HashMap<String, Uuid>,
    group_by_name: HashMap<String, Uuid>,
    /// Names the configuration file defines; no source may create them.
    reserved: BTreeSet<String>,
}

pub(crate) fn fold(name: &str) -> String {
    name.to_lowercase()
}

/// A user name policies can use: non-empty, no control characters, at most 256 bytes.
pub fn check_name(what: &str, name: &str) -> Result<(), DirectoryError> {
    if name.trim().is_empty() {
        return Err(DirectoryError::Invalid(format!("{what} must not be empty")));
    }
    if name.len() > 256 {
        return Err(DirectoryError::Invalid(format!(
            "{what} is longer than 256 bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(DirectoryError::Invalid(format!(
            "{what} {name:?} contains control characters"
        )));
    }
    // A name that looks like another: "alice " or "al\u{200b}ice" for alice,
    // "admin\u{202e}gnp.exe" shown reversed.
    if name.trim() != name {
        return Err(DirectoryError::Invalid(format!(
            "{what} {name:?} has leading or trailing spaces"
        )));
    }
    if let Some(c) = name.chars().find(|c| is_invisible(*c)) {
        return Err(DirectoryError::Invalid(format!(
            "{what} {name:?} contains the invisible or direction-changing character U+{:04X}",
            u32::from(c)
        )));
    }
    Ok(())
}

/// Zero-width, joiner, bidirectional-control and other format characters (Unicode
/// category Cf, the ranges that occur in practice), and non-characters.
pub fn is_invisible(c: char) -> bool {
    matches!(u32::from(c),
        0x00AD | 0x034F | 0x061C | 0x115F | 0x1160 | 0x17B4 | 0x17B5 | 0x180B..=0x180F
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F
        | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFFB | 0xFFFE | 0xFFFF | 0x1D173..=0x1D17A
        | 0xE0000..=0xE0FFF)
}

/// Most tags a user may carry, and the longest tag (bytes).
pub const MAX_TAGS: usize = 64;
pub const MAX_TAG_BYTES: usize = 128;

/// Tags: at most [`MAX_TAGS`], each 1..=[`MAX_TAG_BYTES`] bytes of visible characters.
pub fn check_tags(tags: &[String]) -> Result<(), DirectoryError> {
    if tags.len() > MAX_TAGS {
        return Err(DirectoryError::Invalid(format!(
            "{} tags, more than the {MAX_TAGS} allowed",
            tags.len()
        )));
    }
    for t in tags {
        if t.is_empty() || t.len() > MAX_TAG_BYTES {
            return Err(DirectoryError::Invalid(format!(
                "tag {t:?} must be 1 to {MAX_TAG_BYTES} bytes"
            )));
        }
        if t.chars().any(|c| c.is_control() || is_invisible(c)) || t.trim() != t {
            return Err(DirectoryError::Invalid(format!(
                "tag {t:?} contains control, invisible or surrounding space characters"
            )));
        }
    }
    Ok(())
}

impl Directory {
    /// Builds the directory from stored records.
    pub fn from_records(
        users: impl IntoIterator<Item = User>,
        groups: impl IntoIterator<Item = Group>,
    ) -> Directory {
        let mut d = Directory::default();
        for u in users {
            d.user_by_name.insert(fold(&u.user_name), u.id);
            d.users.insert(u.id, u);
        }
        for g in groups {
            d.group_by_name.insert(fold(&g.display_name), g.id);
            d.groups.insert(g.id, g);
        }
        d
    }

    /// Plans making the directory exactly `users` and `groups` (a cluster node that fell
    /// behind a trimmed change log reloads this way): differing records are written,
    /// missing ones removed, so applying it yields the access changes of the difference.
    pub fn plan_replace(&self, users: Vec<User>, groups: Vec<Group>) -> Mutation {
        let keep_users: BTreeSet<Uuid> = users.iter().map(|u| u.id).collect();
        let keep_groups: BTreeSet<Uuid> = groups.iter().map(|g| g.id).collect();
        Mutation {
            removed_users: self
                .users
                .keys()
                .filter(|id| !keep_users.contains(id))
                .copied()
                .collect(),
            removed_groups: self
                .groups
                .keys()
                .filter(|id| !keep_groups.contains(id))
                .copied()
                .collect(),
            users: users
                .into_iter()
                .filter(|u| self.users.get(&u.id) != Some(u))
                .collect(),
            groups: groups
                .into_iter()
                .filter(|g| self.groups.get(&g.id) != Some(g))
                .collect(),
        }
    }

    /// Names of users the configuration file defines (case-folded on compare).
    pub fn set_reserved(&mut self, names: impl IntoIterator<Item = String>) {
        self.reserved = names.into_iter().map(|n| fold(&n)).collect();
    }

    /// Whether the configuration file defines this user name.
    pub fn is_reserved(&self, name: &str) -> bool {
        self.reserved.contains(&fold(name))
    }

    pub fn user(&self, id: &Uuid) -> Option<&User> {
        self.users.get(id)
    }

    pub fn user_by_name(&self, name: &str) -> Option<&User> {
        self.user_by_name
            .get(&fold(name))
            .and_then(|id| self.users.get(id))
    }

    pub fn user_by_external_id(&self, external_id: &str) -> Option<&User> {
        self.users
            .values()
            .find(|u| u.external_id.as_deref() == Some(external_id))
    }

    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }

    pub fn group(&self, id: &Uuid) -> Option<&Group> {
        self.groups.get(id)
    }

    pub fn group_by_name(&self, name: &str) -> Option<&Group> {
        self.group_by_name
            .get(&fold(name))
            .and_then(|id| self.groups.get(id))
    }

    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    /// Groups a user is a member of.
    pub fn groups_of(&self, user: &Uuid) -> impl Iterator<Item = &Group> {
        let user = *user;
        self.groups
            .values()
            .filter(move |g| g.members.contains(&user))
    }

    /// The principal policies see for a user; `None` when it is inactive.
    pub fn principal(&self, user: &User) -> Option<Principal> {
        if !user.active {
            return None;
        }
        let mut groups: Vec<String> = self
            .groups_of(&user.id)
            .map(|g| g.display_name.clone())
            .collect();
        groups.sort();
        Some(Principal {
            name: user.user_name.clone(),
            email: user.email.clone(),
            groups,
            tags: user.tags.clone(),
        })
    }

    /// Every active user's principal (to seed the policy engine at start).
    pub fn principals(&self) -> Vec<Principal> {
        self.users
            .values()
            .filter_map(|u| self.principal(u))
            .collect()
    }

    /// Plans a new user. The caller sets everything but id, times and version.
    pub fn plan_create_user(
        &self,
        mut user: User,
        now: DateTime<Utc>,
    ) -> Result<Mutation, DirectoryError> {
        check_name("userName", &user.user_name)?;
        check_tags(&user.tags)?;
        if self.reserved.contains(&fold(&user.user_name)) {
            return Err(DirectoryError::ReservedName(user.user_name));
        }
        if self.user_by_name.contains_key(&fold(&user.user_name)) {
            return Err(DirectoryError::UserNameTaken(user.user_name));
        }
        user.id = Uuid::new_v4();
        user.created = now;
        user.modified = now;
        user.version = 1;
        Ok(Mutation {
            users: vec![user],
            ..Mutation::default()
        })
    }

    /// Plans replacing a user's attributes (id, creation time and source are kept).
    pub fn plan_update_user(
        &self,
        mut user: User,
        now: DateTime<Utc>,
    ) -> Result<Mutation, DirectoryError> {
        check_name("userName", &user.user_name)?;
        check_tags(&user.tags)?;
        let old = self
            .users
            .get(&user.id)
            .ok_or_else(|| DirectoryError::NoSuchUser(user.id.to_string()))?;
        let folded = fold(&user.user_name);
        if self.reserved.contains(&folded) {
            return Err(DirectoryError::ReservedName(user.user_name));
        }
        if self
            .user_by_name
            .get(&folded)
            .is_some_and(|other| *other != user.id)
        {
            return Err(DirectoryError::UserNameTaken(user.user_name));
        }
        user.created = old.created;
        user.source = old.source.clone();
        user.version = old.version;
        user.modified = old.modified;
        if *old == user {
            return Ok(Mutation::default());
        }
        user.version = old.version + 1;
        user.modified = now;
        Ok(Mutation {
            users: vec![user],
            ..Mutation::default()
        })
    }

    /// Plans deleting a user; its memberships go with it.
    pub fn plan_delete_user(
        &self,
        id: &Uuid,
        now: DateTime<Utc>,
    ) -> Result<Mutation, DirectoryError> {
        if !self.users.contains_key(id) {
            return Err(DirectoryError::NoSuchUser(id.to_string()));
        }
        let groups = self
            .groups_of(id)
            .map(|g| {
                let mut g = g.clone();
                g.members.remove(id);
                g.modified = now;
                g.version += 1;
                g
            })
            .collect();
        Ok(Mutation {
            removed_users: vec![*id],
            groups,
            ..Mutation::default()
        })
    }

    /// Plans what a single sign-on login means for the directory:
    /// - a user the configuration file defines, or one another source (SCIM, LDAP, an
    ///   administrator) owns: nothing changes (that source owns the groups); a disabled
    ///   user is refused;
    /// - a user `source` owns (or a new one, created with `source`): group membership
    ///   becomes exactly `groups`: added to the groups of those names (created with
    ///   `source` when missing), removed from the others.
    pub fn plan_login(
        &self,
        user_name: &str,
        groups: &[String],
        source: &str,
        now: DateTime<Utc>,
    ) -> Result<Mutation, DirectoryError> {
        if self.is_reserved(user_name) {
            return Ok(Mutation::default());
        }
        let mut m = Mutation::default();
        let id = match self.user_by_name(user_name) {
            Some(u) if !u.active => return Err(DirectoryError::Disabled(u.user_name.clone())),
            Some(u) if u.source != source => return Ok(Mutation::default()),
            Some(u) => u.id,
            None => {
                let created = self.plan_create_user(
                    User {
                        id: Uuid::nil(),
                        user_name: user_name.to_string(),
                        external_id: None,
                        display_name: None,
                        email: String::new(),
                        active: true,
                        tags: Vec::new(),
                        source: source.to_string(),
                        created: now,
                        modified: now,
                        version: 0,
                    },
                    now,
                )?;
                let id = created.users.first().map(|u| u.id).unwrap_or_default();
                m.users = created.users;
                id
            }
        };
        let wanted: BTreeSet<String> = groups.iter().map(|g| fold(g)).collect();
        for name in groups {
            check_name("group", name)?;
        }
        // Existing groups: add or remove the member as asserted.
        for g in self.groups.values() {
            let should = wanted.contains(&fold(&g.display_name));
            if should != g.members.contains(&id) {
                let mut g = g.clone();
                if should {
                    g.members.insert(id);
                } else {
                    g.members.remove(&id);
                }
                g.version += 1;
                g.modified = now;
                m.groups.push(g);
            }
        }
        // Missing groups: created, with the user as their member.
        let mut created = BTreeSet::new();
        for name in groups {
            let folded = fold(name);
            if self.group_by_name.contains_key(&folded) || !created.insert(folded) {
                continue;
            }
            m.groups.push(Group {
                id: Uuid::new_v4(),
                display_name: name.clone(),
                external_id: None,
                members: BTreeSet::from([id]),
                source: source.to_string(),
                created: now,
                modified: now,
                version: 1,
            });
        }
        Ok(m)
    }

    /// Plans a new group. Unknown member ids are refused.
    pub fn plan_create_group(
        &self,
        mut group: Group,
        now: DateTime<Utc>,
    ) -> Result<Mutation, DirectoryError> {
        check_name("displayName", &group.display_name)?;
        if self.group_by_name.contains_key(&fold(&group.display_name)) {
            return Err(DirectoryError::GroupNameTaken(group.display_name));
        }
        self.check_members(&group)?;
        group.id = Uuid::new_v4();
        group.created = now;
        group.modified = now;
        group.version = 1;
        Ok(Mutation {
            groups: vec![group],
            ..Mutation::default()
        })
    }

    /// Plans replacing a group (name, external id, members).
    pub fn plan_update_group(
        &self,
        mut group: Group,
        now: DateTime<Utc>,
    ) -> Result<Mutation, DirectoryError> {
        check_name("displayName", &group.display_name)?;
        let old = self
            .groups
            .get(&group.id)
            .ok_or_else(|| DirectoryError::NoSuchGroup(group.id.to_string()))?;
        if self
            .group_by_name
            .get(&fold(&group.display_name))
            .is_some_and(|other| *other != group.id)
        {
            return Err(DirectoryError::GroupNameTaken(group.display_name));
        }
        self.check_members(&group)?;
        group.created = old.created;
        group.source = old.source.clone();
        group.version = old.version;
        group.modified = old.modified;
        if *old == group {
            return Ok(Mutation::default());
        }
        group.version = old.version + 1;
        group.modified = now;
        Ok(Mutation {
            groups: vec![group],
            ..Mutation::default()
        })
    }

    pub fn plan_delete_group(&self, id: &Uuid) -> Result<Mutation, DirectoryError> {
        if !self.groups.contains_key(id) {
            return Err(DirectoryError::NoSuchGroup(id.to_string()));
        }
        Ok(Mutation {
            removed_groups: vec![*id],
            ..Mutation::default()
        })
    }

    fn check_members(&self, group: &Group) -> Result<(), DirectoryError> {
        match group.members.iter().find(|m| !self.users.contains_key(m)) {
            Some(m) => Err(DirectoryError::Invalid(format!(
                "member {m} is not a known user"
            ))),
            None => Ok(()),
        }
    }

    /// Applies a persisted mutation. Returns one change per user whose principal changed
    /// (created, updated, deactivated, deleted), attributed to `source`.
    pub fn apply(&mut self, m: Mutation, source: &str) -> Vec<IdentityChange> {
        // Users whose principal may change: the written and removed ones, and every member
        // (before and after) of a written or removed group.
        let mut affected: BTreeSet<Uuid> = m.users.iter().map(|u| u.id).collect();
        affected.extend(m.removed_users.iter().copied());
        for g in &m.groups {
            affected.extend(g.members.iter().copied());
            if let Some(old) = self.groups.get(&g.id) {
                affected.extend(old.members.iter().copied());
            }
        }
        for id in &m.removed_groups {
            if let Some(old) = self.groups.get(id) {
                affected.extend(old.members.iter().copied());
            }
        }
        let before: Vec<(Uuid, Option<String>, Option<Principal>)> = affected
            .iter()
            .map(|id| {
                let user = self.users.get(id);
                (
                    *id,
                    user.map(|u| u.user_name.clone()),
                    user.and_then(|u| self.principal(u)),
                )
            })
            .collect();

        // A name index entry is dropped only while it still points at the record: in one
        // mutation a name may move from one record to another (a rename, a re-creation).
        fn unindex(index: &mut HashMap<String, Uuid>, name: &str, id: &Uuid) {
            let key = fold(name);
            if index.get(&key) == Some(id) {
                index.remove(&key);
            }
        }
        let removed_names: Vec<(Uuid, String)> = m
            .removed_users
            .iter()
            .filter_map(|id| self.users.get(id).map(|u| (*id, u.user_name.clone())))
            .collect();
        for (id, name) in &removed_names {
            unindex(&mut self.user_by_name, name, id);
        }
        for u in m.users {
            if let Some(old) = self.users.get(&u.id) {
                unindex(&mut self.user_by_name, &old.user_name, &u.id);
            }
            self.user_by_name.insert(fold(&u.user_name), u.id);
            self.users.insert(u.id, u);
        }
        for id in &m.removed_users {
            self.users.remove(id);
            for g in self.groups.values_mut() {
                g.members.remove(id);
            }
        }
        for id in &m.removed_groups {
            if let Some(old) = self.groups.remove(id) {
                unindex(&mut self.group_by_name, &old.display_name, id);
            }
        }
        for g in m.groups {
            if let Some(old) = self.groups.get(&g.id) {
                unindex(&mut self.group_by_name, &old.display_name, &g.id);
            }
            self.group_by_name.insert(fold(&g.display_name), g.id);
            self.groups.insert(g.id, g);
        }

        let mut changes = Vec::new();
        for (id, old_name, old_principal) in before {
            let user = self.users.get(&id);
            let new_principal = user.and_then(|u| self.principal(u));
            let change = |user: String, kind, principal| IdentityChange {
                source: source.to_string(),
                user,
                kind,
                principal,
            };
            match (old_name, user) {
                (None, Some(u)) => changes.push(change(
                    u.user_name.clone(),
                    ChangeKind::Created,
                    new_principal,
                )),
                (Some(old), None) => changes.push(change(old, ChangeKind::Deleted, None)),
                (Some(old), Some(u)) => {
                    if old != u.user_name {
                        // A rename: the old name loses everything, the new one starts.
                        changes.push(change(old, ChangeKind::Deleted, None));
                        changes.push(change(
                            u.user_name.clone(),
                            ChangeKind::Created,
                            new_principal,
                        ));
                    } else if old_principal != new_principal {
                        let kind = if new_principal.is_none() {
                            ChangeKind::Deactivated
                        } else {
                            ChangeKind::Updated
                        };
                        changes.push(change(old, kind, new_principal));
                    }
                }
                (None, None) => {}
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    pub(crate) fn user(name: &str) -> User {
        User {
            id: Uuid::nil(),
            user_name: name.into(),
            external_id: None,
            display_name: None,
            email: format!("{name}@example.com"),
            active: true,
            tags: vec![],
            source: "scim".into(),
            created: DateTime::<Utc>::UNIX_EPOCH,
            modified: DateTime::<Utc>::UNIX_EPOCH,
            version: 0,
        }
    }

    fn group(name: &str, members: &[Uuid]) -> Group {
        Group {
            id: Uuid::nil(),
            display_name: name.into(),
            external_id: None,
            members: members.iter().copied().collect(),
            source: "scim".into(),
            created: DateTime::<Utc>::UNIX_EPOCH,
            modified: DateTime::<Utc>::UNIX_EPOCH,
            version: 0,
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    fn run(
        d: &mut Directory,
        plan: impl FnOnce(&Directory) -> Result<Mutation, DirectoryError>,
    ) -> Vec<IdentityChange> {
        let m = plan(d).unwrap();
        d.apply(m, "scim")
    }

    #[test]
    fn look_alike_names_and_unbounded_tags_are_refused() {
        let d = Directory::default();
        for bad in [
            "alice ",
            " alice",
            "al\u{200b}ice",
            "admin\u{202e}gnp.exe",
            "\u{feff}bob",
            "x\u{2066}y",
            "a\u{e0041}",
        ] {
            let e = d
                .plan_create_user(user(bad), now())
                .err()
                .map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("userName")),
                "{bad:?}: {e:?}"
            );
        }
        assert!(d.plan_create_user(user("josé.müller"), now()).is_ok());
        let mut many = user("t");
        many.tags = (0..65).map(|i| format!("t{i}")).collect();
        assert!(d.plan_create_user(many, now()).is_err());
        for tag in ["", "a\u{0}b", "line\nbreak", &"x".repeat(129), " pad"] {
            let mut u = user("t");
            u.tags = vec![tag.to_string()];
            assert!(d.plan_create_user(u, now()).is_err(), "{tag:?}");
        }
        let mut ok = user("t");
        ok.tags = vec!["oncall".into(), "pci-admin".into()];
        assert!(d.plan_create_user(ok, now()).is_ok());
    }

    #[test]
    fn a_login_creates_its_user_and_follows_the_asserted_groups() {
        let mut d = Directory::default();
        d.set_reserved(["carol".to_string()]);
        let sso = |d: &mut Directory, name: &str, groups: &[&str]| {
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            let m = d.plan_login(name, &groups, "saml", now())?;
            Ok::<_, DirectoryError>(d.apply(m, "saml"))
        };
        // A new user, two new groups.
        let c = sso(&mut d, "alice", &["sre", "staff"]).unwrap();
        assert_eq!(c[0].kind, ChangeKind::Created);
        assert_eq!(c[0].principal.as_ref().unwrap().groups, ["sre", "staff"]);
        let alice = d.user_by_name("alice").unwrap().id;
        assert_eq!(d.user_by_name("alice").unwrap().source, "saml");
        // Next login: out of staff, into an existing group of another source.
        run(&mut d, |d| d.plan_create_group(group("ops", &[]), now()));
        sso(&mut d, "Alice", &["SRE", "ops"]).unwrap();
        let mut groups: Vec<String> = d
            .groups_of(&alice)
            .map(|g| g.display_name.clone())
            .collect();
        groups.sort();
        assert_eq!(groups, ["ops", "sre"]);
        assert_eq!(d.group_by_name("staff").unwrap().members.len(), 0);
        // The same login again changes nothing.
        assert!(d
            .plan_login("alice", &["sre".into(), "ops".into()], "saml", now())
            .unwrap()
            .is_empty());
        // Another source's user: authenticated, its groups left to that source.
        run(&mut d, |d| d.plan_create_user(user("bob"), now()));
        assert!(d
            .plan_login("bob", &["sre".into()], "saml", now())
            .unwrap()
            .is_empty());
        // A configuration user: nothing to do.
        assert!(d
            .plan_login("carol", &["sre".into()], "saml", now())
            .unwrap()
            .is_empty());
        // A disabled user may not log in.
        let mut off = d.user_by_name("alice").unwrap().clone();
        off.active = false;
        run(&mut d, |d| d.plan_update_user(off, now()));
        assert_eq!(
            d.plan_login("alice", &[], "saml", now()),
            Err(DirectoryError::Disabled("alice".into()))
        );
        // Group names are checked like any other.
        assert!(d
            .plan_login("dave", &["bad\u{7}".into()], "saml", now())
            .is_err());
    }

    #[test]
    fn create_group_membership_deactivate_delete_and_recreate() {
        let mut d = Directory::default();
        let c = run(&mut d, |d| d.plan_create_user(user("alice"), now()));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].kind, ChangeKind::Created);
        assert_eq!(
            c[0].principal.as_ref().unwrap().groups,
            Vec::<String>::new()
        );
        let alice = d.user_by_name("ALICE").unwrap().clone();
        assert_eq!(alice.version, 1);

        let c = run(&mut d, |d| {
            d.plan_create_group(group("sre", &[alice.id]), now())
        });
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].kind, ChangeKind::Updated);
        assert_eq!(c[0].principal.as_ref().unwrap().groups, ["sre"]);

        let mut off = alice.clone();
        off.active = false;
        let c = run(&mut d, |d| d.plan_update_user(off, now()));
        assert_eq!(
            (c[0].kind, c[0].principal.is_none()),
            (ChangeKind::Deactivated, true)
        );

        let c = run(&mut d, |d| d.plan_delete_user(&alice.id, now()));
        assert_eq!(
            (c[0].kind, c[0].user.as_str()),
            (ChangeKind::Deleted, "alice")
        );
        assert!(d.group_by_name("sre").unwrap().members.is_empty());

        // Same name again: a new id, no memberships.
        let c = run(&mut d, |d| d.plan_create_user(user("alice"), now()));
        assert_eq!(
            c[0].principal.as_ref().unwrap().groups,
            Vec::<String>::new()
        );
        assert_ne!(d.user_by_name("alice").unwrap().id, alice.id);
    }

    #[test]
    fn names_are_unique_without_case_and_reserved_names_are_refused() {
        let mut d = Directory::default();
        d.set_reserved(["Bob".to_string()]);
        run(&mut d, |d| d.plan_create_user(user("alice"), now()));
        assert_eq!(
            d.plan_create_user(user("Alice"), now()),
            Err(DirectoryError::UserNameTaken("Alice".into()))
        );
        assert_eq!(
            d.plan_create_user(user("bob"), now()),
            Err(DirectoryError::ReservedName("bob".into()))
        );
        assert!(matches!(
            d.plan_create_user(user("a\u{0}b"), now()),
            Err(DirectoryError::Invalid(_))
        ));
        assert!(matches!(
            d.plan_create_group(group("g", &[Uuid::new_v4()]), now()),
            Err(DirectoryError::Invalid(_))
        ));
    }

    #[test]
    fn an_unchanged_update_is_empty_and_a_rename_revokes_the_old_name() {
        let mut d = Directory::default();
        run(&mut d, |d| d.plan_create_user(user("alice"), now()));
        let alice = d.user_by_name("alice").unwrap().clone();
        assert!(d.plan_update_user(alice.clone(), now()).unwrap().is_empty());
        let mut renamed = alice;
        renamed.user_name = "alice2".into();
        let c = run(&mut d, |d| d.plan_update_user(renamed, now()));
        assert_eq!(
            c.iter()
                .map(|c| (c.user.as_str(), c.kind))
                .collect::<Vec<_>>(),
            [
                ("alice", ChangeKind::Deleted),
                ("alice2", ChangeKind::Created)
            ]
        );
        assert!(d.user_by_name("alice").is_none());
    }

    #[test]
    fn deleting_a_group_updates_every_member() {
        let mut d = Directory::default();
        run(&mut d, |d| d.plan_create_user(user("a"), now()));
        run(&mut d, |d| d.plan_create_user(user("b"), now()));
        let ids: Vec<Uuid> = d.users().map(|u| u.id).collect();
        run(&mut d, |d| d.plan_create_group(group("sre", &ids), now()));
        let sre = d.group_by_name("sre").unwrap().id;
        let c = run(&mut d, |d| d.plan_delete_group(&sre));
        assert_eq!(c.len(), 2);
        assert!(c
            .iter()
            .all(|c| c.kind == ChangeKind::Updated
                && c.principal.as_ref().unwrap().groups.is_empty()));
    }
}
