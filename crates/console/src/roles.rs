//! Roles from IdP groups, and which role may take which action.

/// The `[console]` groups of each role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleGroups {
    pub admin: Vec<String>,
    pub auditor: Vec<String>,
    pub helpdesk: Vec<String>,
}

/// The roles one signed-in user holds (several at once are possible).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles {
    pub admin: bool,
    pub auditor: bool,
    pub helpdesk: bool,
}

/// Everything the console can do; each page and each form names one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The overview: nodes, live numbers, identity sources.
    ReadOverview,
    /// Audit search, reports, CSV export, chain verification.
    ReadAudit,
    /// Users, their sessions and devices.
    ReadUsers,
    /// Disable a user now (cuts every tunnel).
    DisableUser,
    /// End one live session.
    KillSession,
    /// Rotate or remove a device.
    ManageDevices,
    /// The policy files and their history.
    ReadPolicies,
    /// Validate, test, diff and apply a policy set.
    EditPolicies,
    /// Ask what the policies answer for a user and a destination.
    Explain,
}

impl Roles {
    /// The roles `groups` (the sign-in's IdP groups) give. Group names match exactly:
    /// the IdP's spelling is the one the policies use too.
    pub fn from_groups(groups: &[String], of: &RoleGroups) -> Roles {
        let has = |list: &[String]| groups.iter().any(|g| list.contains(g));
        Roles {
            admin: has(&of.admin),
            auditor: has(&of.auditor),
            helpdesk: has(&of.helpdesk),
        }
    }

    /// Whether the user may use the console at all.
    pub fn any(&self) -> bool {
        self.admin || self.auditor || self.helpdesk
    }

    /// The one table of permissions: admins everything; auditors read (audit, policies,
    /// explain); help desk users, sessions and devices.
    pub fn may(&self, action: Action) -> bool {
        use Action::*;
        self.admin
            || match action {
                ReadOverview | Explain => self.auditor || self.helpdesk,
                ReadAudit | ReadPolicies => self.auditor,
                ReadUsers | DisableUser | KillSession | ManageDevices => self.helpdesk,
                EditPolicies => false,
            }
    }

    /// For the page header: `admin, auditor`.
    pub fn names(&self) -> String {
        [
            (self.admin, "admin"),
            (self.auditor, "auditor"),
            (self.helpdesk, "helpdesk"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups() -> RoleGroups {
        RoleGroups {
            admin: vec!["security".into()],
            auditor: vec!["audit".into()],
            helpdesk: vec!["it".into()],
        }
    }

    const ALL: [Action; 9] = [
        Action::ReadOverview,
        Action::ReadAudit,
        Action::ReadUsers,
        Action::DisableUser,
        Action::KillSession,
        Action::ManageDevices,
        Action::ReadPolicies,
        Action::EditPolicies,
        Action::Explain,
    ];

    #[test]
    fn each_role_may_exactly_its_actions() {
        let of = groups();
        let role = |g: &str| Roles::from_groups(&[g.to_string()], &of);
        let allowed = |r: Roles| -> Vec<Action> { ALL.into_iter().filter(|a| r.may(*a)).collect() };
        assert_eq!(allowed(role("security")), ALL.to_vec());
        assert_eq!(
            allowed(role("audit")),
            [
                Action::ReadOverview,
                Action::ReadAudit,
                Action::ReadPolicies,
                Action::Explain
            ]
        );
        assert_eq!(
            allowed(role("it")),
            [
                Action::ReadOverview,
                Action::ReadUsers,
                Action::DisableUser,
                Action::KillSession,
                Action::ManageDevices,
                Action::Explain
            ]
        );
        let nobody = role("sre");
        assert!(!nobody.any());
        assert!(ALL.iter().all(|a| !nobody.may(*a)), "no role, nothing");
        assert!(!role("Audit").any(), "exact names only");
    }

    #[test]
    fn roles_add_up() {
        let r = Roles::from_groups(&["audit".into(), "it".into()], &groups());
        assert!(r.may(Action::ReadAudit) && r.may(Action::DisableUser));
        assert!(!r.may(Action::EditPolicies));
        assert_eq!(r.names(), "auditor, helpdesk");
    }
}
