//! Planning a pass of a sync source (LDAP): the source's view of its users and groups,
//! keyed by its own ids, against the records it owns in the directory. Sans-IO.
//!
//! A source owns the records whose `source` is its name; it never touches the others. A
//! name another source (or the configuration file) already holds is a conflict: the
//! record is skipped and reported, nothing else in the pass is held back.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::directory::{check_name, check_tags, fold, Directory, Group, Mutation, User};

/// A user as the source sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncedUser {
    /// The source's stable id (LDAP entryUUID).
    pub external_id: String,
    pub user_name: String,
    pub email: String,
    pub display_name: Option<String>,
    pub active: bool,
    pub tags: Vec<String>,
}

/// A group as the source sees it; members are the source's user ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncedGroup {
    pub external_id: String,
    pub display_name: String,
    pub members: BTreeSet<String>,
}

/// Which of the source's records the pass speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncScope {
    /// Everything: a record of the source that the pass does not list is gone.
    Full,
    /// Only these external ids: listed ones are written, unlisted ones removed.
    Only {
        users: BTreeSet<String>,
        groups: BTreeSet<String>,
    },
}

impl SyncScope {
    fn has_user(&self, id: &str) -> bool {
        match self {
            SyncScope::Full => true,
            SyncScope::Only { users, .. } => users.contains(id),
        }
    }

    fn has_group(&self, id: &str) -> bool {
        match self {
            SyncScope::Full => true,
            SyncScope::Only { groups, .. } => groups.contains(id),
        }
    }
}

/// What a pass would do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncPlan {
    pub mutation: Mutation,
    /// How many users the source owned before the pass.
    pub known: usize,
    /// Names of users who would lose access: removed, deactivated, or dropped from a
    /// group. What a mass-removal guard counts.
    pub losing_access: BTreeSet<String>,
    /// Records skipped, with why (a name taken by another source, an invalid name).
    pub conflicts: Vec<String>,
}

impl Directory {
    /// Plans making the records `source` owns match `users` and `groups` within `scope`.
    pub fn plan_sync(
        &self,
        source: &str,
        users: &[SyncedUser],
        groups: &[SyncedGroup],
        scope: &SyncScope,
        now: DateTime<Utc>,
    ) -> SyncPlan {
        let mut plan = SyncPlan::default();
        let owned_users: HashMap<&str, &User> = self
            .users()
            .filter(|u| u.source == source)
            .filter_map(|u| u.external_id.as_deref().map(|x| (x, u)))
            .collect();
        plan.known = owned_users.len();

        // Users.
        let mut id_of: HashMap<&str, Uuid> = owned_users
            .iter()
            .map(|(x, u)| (*x, u.id))
            .collect::<HashMap<_, _>>();
        let mut names_in_pass: BTreeMap<String, Uuid> = BTreeMap::new();
        let listed: BTreeSet<&str> = users.iter().map(|u| u.external_id.as_str()).collect();
        // Owned users that give up their name in this pass (removed or renamed): their
        // name is free for another record of the pass.
        let wanted_name: HashMap<&str, String> = users
            .iter()
            .map(|u| (u.external_id.as_str(), fold(&u.user_name)))
            .collect();
        let leaving: BTreeSet<Uuid> = owned_users
            .iter()
            .filter(|(x, u)| {
                scope.has_user(x) && wanted_name.get(*x).is_none_or(|n| *n != fold(&u.user_name))
            })
            .map(|(_, u)| u.id)
            .collect();
        for want in users.iter().filter(|u| scope.has_user(&u.external_id)) {
            let old = owned_users.get(want.external_id.as_str()).copied();
            let id = old.map_or_else(Uuid::new_v4, |u| u.id);
            let folded = fold(&want.user_name);
            let refuse = |why: String| format!("user {:?}: {why}", want.user_name);
            if let Err(e) =
                check_name("userName", &want.user_name).and_then(|()| check_tags(&want.tags))
            {
                plan.conflicts.push(refuse(e.to_string()));
                id_of.remove(want.external_id.as_str());
                continue;
            }
            if self.is_reserved(&want.user_name) {
                plan.conflicts
                    .push(refuse("defined in the configuration file".into()));
                id_of.remove(want.external_id.as_str());
                continue;
            }
            let holder = self.user_by_name(&want.user_name).map(|u| u.id);
            let taken_here = names_in_pass.get(&folded).is_some_and(|o| *o != id);
            if holder.is_some_and(|h| h != id && !leaving.contains(&h)) || taken_here {
                plan.conflicts
                    .push(refuse("the name is already taken".into()));
                id_of.remove(want.external_id.as_str());
                continue;
            }
            names_in_pass.insert(folded, id);
            let record = User {
                id,
                user_name: want.user_name.clone(),
                external_id: Some(want.external_id.clone()),
                display_name: want.display_name.clone(),
                email: want.email.clone(),
                active: want.active,
                tags: want.tags.clone(),
                source: source.to_string(),
                created: old.map_or(now, |u| u.created),
                modified: old.map_or(now, |u| u.modified),
                version: old.map_or(0, |u| u.version),
            };
            match old {
                Some(old) if *old == record => {}
                _ => {
                    if let Some(o) = old.filter(|o| o.active && !want.active) {
                        plan.losing_access.insert(o.user_name.clone());
                    }
                    plan.mutation.users.push(User {
                        modified: now,
                        version: record.version + 1,
                        ..record
                    });
                }
            }
            id_of.insert(want.external_id.as_str(), id);
        }
        for (x, u) in &owned_users {
            if scope.has_user(x) && !listed.contains(x) {
                plan.mutation.removed_users.push(u.id);
                plan.losing_access.insert(u.user_name.clone());
                id_of.remove(x);
            }
        }
        let removed: BTreeSet<Uuid> = plan.mutation.removed_users.iter().copied().collect();

        // Groups.
        let owned_groups: HashMap<&str, &Group> = self
            .groups()
            .filter(|g| g.source == source)
            .filter_map(|g| g.external_id.as_deref().map(|x| (x, g)))
            .collect();
        let listed: BTreeSet<&str> = groups.iter().map(|g| g.external_id.as_str()).collect();
        let mut written: BTreeMap<Uuid, Group> = BTreeMap::new();
        let mut group_names_in_pass: BTreeSet<String> = BTreeSet::new();
        for want in groups.iter().filter(|g| scope.has_group(&g.external_id)) {
            let old = owned_groups.get(want.external_id.as_str()).copied();
            let id = old.map_or_else(Uuid::new_v4, |g| g.id);
            let refuse = |why: String| format!("group {:?}: {why}", want.display_name);
            if let Err(e) = check_name("displayName", &want.display_name) {
                plan.conflicts.push(refuse(e.to_string()));
                continue;
            }
            let holder = self.group_by_name(&want.display_name).map(|g| g.id);
            if holder.is_some_and(|h| h != id)
                || !group_names_in_pass.insert(fold(&want.display_name))
            {
                plan.conflicts
                    .push(refuse("the name is already taken".into()));
                continue;
            }
            let members = want
                .members
                .iter()
                .filter_map(|m| id_of.get(m.as_str()).copied())
                .collect();
            let record = Group {
                id,
                display_name: want.display_name.clone(),
                external_id: Some(want.external_id.clone()),
                members,
                source: source.to_string(),
                created: old.map_or(now, |g| g.created),
                modified: old.map_or(now, |g| g.modified),
                version: old.map_or(0, |g| g.version),
            };
            if old != Some(&record) {
                written.insert(
                    id,
                    Group {
                        modified: now,
                        version: record.version + 1,
                        ..record
                    },
                );
            }
        }
        for (x, g) in &owned_groups {
            if scope.has_group(x) && !listed.contains(x) {
                plan.mutation.removed_groups.push(g.id);
            }
        }
        // Removed users leave every group they were in (the stored groups must not keep them).
        for g in self.groups() {
            if g.members.iter().any(|m| removed.contains(m))
                && !plan.mutation.removed_groups.contains(&g.id)
            {
                let entry = written.entry(g.id).or_insert_with(|| Group {
                    modified: now,
                    version: g.version + 1,
                    ..g.clone()
                });
                entry.members.retain(|m| !removed.contains(m));
            }
        }

        // Who drops out of a group.
        for g in self.groups() {
            let after: Option<&BTreeSet<Uuid>> = if plan.mutation.removed_groups.contains(&g.id) {
                None
            } else {
                Some(written.get(&g.id).map_or(&g.members, |w| &w.members))
            };
            for m in &g.members {
                if after.is_none_or(|a| !a.contains(m)) {
                    if let Some(u) = self.user(m) {
                        if u.active {
                            plan.losing_access.insert(u.user_name.clone());
                        }
                    }
                }
            }
        }
        plan.mutation.groups = written.into_values().collect();
        plan
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    fn user(x: &str, name: &str, active: bool) -> SyncedUser {
        SyncedUser {
            external_id: x.into(),
            user_name: name.into(),
            email: format!("{name}@example.org"),
            display_name: None,
            active,
            tags: vec![],
        }
    }

    fn group(x: &str, name: &str, members: &[&str]) -> SyncedGroup {
        SyncedGroup {
            external_id: x.into(),
            display_name: name.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn synced(
        d: &mut Directory,
        users: &[SyncedUser],
        groups: &[SyncedGroup],
        scope: &SyncScope,
    ) -> (SyncPlan, Vec<portcullis_model::IdentityChange>) {
        let plan = d.plan_sync("ldap", users, groups, scope, now());
        let changes = d.apply(plan.mutation.clone(), "ldap");
        (plan, changes)
    }

    #[test]
    fn a_full_pass_creates_updates_and_removes_only_its_own_records() {
        let mut d = Directory::default();
        let scim = d
            .plan_create_user(
                User {
                    id: Uuid::nil(),
                    user_name: "dave".into(),
                    external_id: None,
                    display_name: None,
                    email: String::new(),
                    active: true,
                    tags: vec![],
                    source: "scim".into(),
                    created: now(),
                    modified: now(),
                    version: 0,
                },
                now(),
            )
            .unwrap();
        d.apply(scim, "scim");
        let users = [user("u1", "carol", true), user("u2", "erin", true)];
        let groups = [group("g1", "sre", &["u1"])];
        let (plan, changes) = synced(&mut d, &users, &groups, &SyncScope::Full);
        assert_eq!(plan.known, 0);
        assert!(plan.losing_access.is_empty());
        assert_eq!(changes.len(), 2);
        let carol = d.user_by_name("carol").unwrap().clone();
        assert_eq!(d.principal(&carol).unwrap().groups, vec!["sre".to_string()]);

        // The same pass again changes nothing.
        let (plan, changes) = synced(&mut d, &users, &groups, &SyncScope::Full);
        assert!(plan.mutation.is_empty(), "{plan:?}");
        assert!(changes.is_empty());

        // carol leaves sre, erin is gone: both lose access; dave (scim) is untouched.
        let (plan, _) = synced(
            &mut d,
            &[user("u1", "carol", true)],
            &[group("g1", "sre", &[])],
            &SyncScope::Full,
        );
        assert_eq!(plan.known, 2);
        assert_eq!(
            plan.losing_access,
            ["carol".to_string(), "erin".to_string()].into()
        );
        assert!(d.user_by_name("erin").is_none());
        assert!(d.user_by_name("dave").is_some());
        assert_eq!(d.user_by_name("carol").unwrap().id, carol.id);
    }

    #[test]
    fn a_partial_pass_touches_only_its_scope() {
        let mut d = Directory::default();
        let users = [user("u1", "carol", true), user("u2", "erin", true)];
        synced(
            &mut d,
            &users,
            &[group("g1", "sre", &["u1", "u2"])],
            &SyncScope::Full,
        );
        // Only u1 is in scope: u2 missing from the list is not a deletion.
        let scope = SyncScope::Only {
            users: ["u1".to_string()].into(),
            groups: BTreeSet::new(),
        };
        let (plan, changes) = synced(&mut d, &[user("u1", "carol", false)], &[], &scope);
        assert_eq!(plan.losing_access, ["carol".to_string()].into());
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].kind, portcullis_model::ChangeKind::Deactivated);
        assert!(d.user_by_name("erin").is_some());
        assert_eq!(d.groups().next().unwrap().members.len(), 2);
    }

    #[test]
    fn names_held_elsewhere_are_conflicts_not_takeovers() {
        let mut d = Directory::default();
        d.set_reserved(["alice".to_string()]);
        let users = [
            user("u1", "alice", true),
            user("u2", "Bob", true),
            user("u3", "bob", true),
            user("u4", "bad\u{7}name", true),
        ];
        let (plan, _) = synced(&mut d, &users, &[], &SyncScope::Full);
        assert_eq!(plan.conflicts.len(), 3, "{:?}", plan.conflicts);
        assert_eq!(d.users().count(), 1);
    }

    #[test]
    fn a_removed_user_leaves_groups_of_other_sources_in_the_stored_records() {
        let mut d = Directory::default();
        synced(&mut d, &[user("u1", "carol", true)], &[], &SyncScope::Full);
        let carol = d.user_by_name("carol").unwrap().id;
        let g = d
            .plan_create_group(
                Group {
                    id: Uuid::nil(),
                    display_name: "ops".into(),
                    external_id: None,
                    members: [carol].into(),
                    source: "scim".into(),
                    created: now(),
                    modified: now(),
                    version: 0,
                },
                now(),
            )
            .unwrap();
        d.apply(g, "scim");
        let (plan, _) = synced(&mut d, &[], &[], &SyncScope::Full);
        assert_eq!(plan.mutation.removed_users, vec![carol]);
        assert_eq!(plan.mutation.groups.len(), 1);
        assert!(plan.mutation.groups[0].members.is_empty());
    }
}
