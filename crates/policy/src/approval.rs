//! Who may approve a just-in-time access request: the Cedar action `approve_access`.
//!
//! The approver is the principal, the requested network the resource (so `resource in
//! Network::"prod"` covers prod's sub-networks), and the context holds the `requester`
//! (a `User`, in their groups), the asked `duration_secs`, `now`, and connect's
//! attributes describing the grant asked for (see the shipped schema), so that a policy
//! written for every action (`forbid (principal, action, resource) when { … }`) still
//! validates and applies:
//!
//! ```cedar
//! @id("sre-leads-approve-prod")
//! permit (principal in Group::"sre-leads", action == Action::"approve_access",
//!         resource in Network::"prod")
//! when { context.duration_secs <= 28800 };
//! ```
//!
//! Evaluated by plain Cedar over the whole set (an approval is rare; no fast path). A
//! requester approving their own request is refused before the policies are asked
//! (`portcullis-access`), whatever they say. A schema without the action denies
//! everything, with a reason.
//!
//! What it deliberately does not: no state (requests are `portcullis-access`'s).

use std::collections::{BTreeSet, HashSet};

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityUid, Request, RestrictedExpression,
};
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use portcullis_model::{Decision, Principal, Protocol, SignOn};

use crate::engine::user_entity;
use crate::{uid, PolicyBundle};

/// The action name in policies.
pub const ACTION: &str = "approve_access";

/// The request being decided, as the approval policies see it.
#[derive(Clone, Debug)]
pub struct Ask<'a> {
    pub requester: &'a Principal,
    pub network: &'a str,
    /// The narrower range asked for (base address, prefix length).
    pub dst: Option<(IpAddr, u8)>,
    pub port: Option<(u16, Protocol)>,
    pub duration_secs: u64,
    /// The approver's sign-on (none for an administrator's CLI call).
    pub sign_on: SignOn,
}

/// Whether `approver` may approve the request `ask`. A deny names the forbids that fired
/// (empty: no permit matched); `errors` says why nothing could be evaluated.
pub fn may_approve(
    bundle: &PolicyBundle,
    approver: &Principal,
    ask: &Ask<'_>,
    now: DateTime<Utc>,
) -> Decision {
    let (requester, network, duration_secs) = (ask.requester, ask.network, ask.duration_secs);
    let refuse = |error: String| Decision {
        allowed: false,
        policy_ids: Vec::new(),
        network: network.to_string(),
        errors: vec![error],
    };
    let action = uid("Action", ACTION);
    if !bundle.schema().actions().any(|a| *a == action) {
        return refuse(format!(
            "the policy schema declares no action {ACTION:?}: nobody may approve access requests"
        ));
    }
    let mut all: Vec<Entity> = bundle.network_entities();
    let mut groups: BTreeSet<&str> = BTreeSet::new();
    for p in [approver, requester] {
        match user_entity(p) {
            Ok(e) => all.push(e),
            Err(e) => return refuse(e.to_string()),
        }
        groups.extend(p.groups.iter().map(String::as_str));
    }
    if approver.name == requester.name {
        all.pop();
    }
    all.extend(
        groups
            .iter()
            .map(|g| Entity::new_no_attrs(uid("Group", g), HashSet::new())),
    );
    let entities = match Entities::from_entities(all, Some(bundle.schema())) {
        Ok(e) => e,
        Err(e) => {
            return refuse(format!(
                "identity data does not match the policy schema: {e}"
            ))
        }
    };
    let requester_uid: EntityUid = uid("User", &requester.name);
    let dst_ip = ask
        .dst
        .map(|(ip, _)| ip)
        .or_else(|| {
            bundle
                .networks()
                .iter()
                .find(|n| n.name == network)
                .and_then(|n| n.cidrs.first())
                .map(|c| c.network())
        })
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let auth_age = if ask.sign_on.at == 0 {
        now.timestamp()
    } else {
        now.timestamp().saturating_sub(ask.sign_on.at)
    };
    let context = Context::from_pairs([
        (
            "dst_ip".to_string(),
            RestrictedExpression::new_ip(dst_ip.to_string()),
        ),
        (
            "dst_port".to_string(),
            RestrictedExpression::new_long(ask.port.map_or(0, |(p, _)| i64::from(p))),
        ),
        (
            "protocol".to_string(),
            RestrictedExpression::new_string(
                ask.port
                    .map_or_else(|| "any".to_string(), |(_, p)| p.name().into_owned()),
            ),
        ),
        (
            "src_ip".to_string(),
            RestrictedExpression::new_ip("0.0.0.0"),
        ),
        (
            "device".to_string(),
            RestrictedExpression::new_string(String::new()),
        ),
        (
            "mfa".to_string(),
            RestrictedExpression::new_bool(ask.sign_on.mfa),
        ),
        (
            "auth_age_secs".to_string(),
            RestrictedExpression::new_long(auth_age),
        ),
        (
            "requester".to_string(),
            RestrictedExpression::new_entity_uid(requester_uid),
        ),
        (
            "duration_secs".to_string(),
            RestrictedExpression::new_long(i64::try_from(duration_secs).unwrap_or(i64::MAX)),
        ),
        (
            "now".to_string(),
            RestrictedExpression::new_datetime(now.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()),
        ),
    ]);
    let context = match context {
        Ok(c) => c,
        Err(e) => return refuse(format!("cannot build the approval context: {e}")),
    };
    let request = match Request::new(
        uid("User", &approver.name),
        action,
        uid("Network", network),
        context,
        Some(bundle.schema()),
    ) {
        Ok(r) => r,
        Err(e) => return refuse(format!("cannot build the approval request: {e}")),
    };
    let response = Authorizer::new().is_authorized(&request, bundle.policy_set(), &entities);
    let diagnostics = response.diagnostics();
    let mut errors: Vec<String> = diagnostics.errors().map(|e| e.to_string()).collect();
    errors.sort();
    // Fail closed as for flows: a forbid that errored denies.
    let failed_forbids: BTreeSet<String> = diagnostics
        .errors()
        .map(|e| match e {
            cedar_policy::AuthorizationError::PolicyEvaluationError(e) => e.policy_id().to_string(),
        })
        .filter(|id| bundle.policy(id).is_some_and(|p| p.effect == "forbid"))
        .collect();
    let reasons: BTreeSet<String> = diagnostics.reason().map(|id| id.to_string()).collect();
    if !failed_forbids.is_empty() {
        let mut ids = failed_forbids;
        if response.decision() == cedar_policy::Decision::Deny {
            ids.extend(reasons);
        }
        return Decision {
            allowed: false,
            policy_ids: ids.into_iter().collect(),
            network: network.to_string(),
            errors,
        };
    }
    Decision {
        allowed: response.decision() == cedar_policy::Decision::Allow,
        policy_ids: reasons.into_iter().collect(),
        network: network.to_string(),
        errors,
    }
}
