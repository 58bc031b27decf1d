//! What a policy can match and what it reads, decided once at load time.
//!
//! - Scope: the principal, action and resource constraints. Cedar evaluates a policy as
//!   `scope && when && !unless` with short-circuiting `&&`, so a policy whose scope cannot
//!   match a request is neither satisfied nor erroring for it: leaving it out of the set
//!   changes neither the decision, nor the determining policies, nor the errors.
//! - Context reads: which `context` attributes the conditions read, found by walking the
//!   policy's JSON form. Any use of `context` other than `context.attr` / `context has attr`
//!   counts as reading everything.

use cedar_policy::{ActionConstraint, EntityUid, Policy, PrincipalConstraint, ResourceConstraint};

/// Bit set over the context attributes of `connect`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ContextReads(pub u8);

impl ContextReads {
    pub const DST_IP: u8 = 1;
    pub const DST_PORT: u8 = 2;
    pub const PROTOCOL: u8 = 4;
    pub const SRC_IP: u8 = 8;
    pub const NOW: u8 = 16;
    pub const DEVICE: u8 = 32;
    pub const MFA: u8 = 64;
    pub const AUTH_AGE: u8 = 128;
    pub const ALL: u8 = 255;

    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    /// Whether a decision depends only on what the decision cache key holds (principal,
    /// network, port, protocol; identities and networks are covered by the epoch).
    pub fn cacheable(self) -> bool {
        self.0 & !(Self::DST_PORT | Self::PROTOCOL) == 0
    }

    fn bit(name: &str) -> u8 {
        match name {
            "dst_ip" => Self::DST_IP,
            "dst_port" => Self::DST_PORT,
            "protocol" => Self::PROTOCOL,
            "src_ip" => Self::SRC_IP,
            "now" => Self::NOW,
            "device" => Self::DEVICE,
            "mfa" => Self::MFA,
            "auth_age_secs" => Self::AUTH_AGE,
            // Unknown attributes fail validation; be conservative anyway.
            _ => Self::ALL,
        }
    }
}

/// One side of a scope, reduced to what matching needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Any,
    /// `== Type::"id"`
    Eq(String, String),
    /// `in Type::"id"` (also `is T in …`, with the type check in `is`)
    In(Option<String>, String, String),
    /// `is Type`
    Is(String),
}

impl Scope {
    /// `== uid`
    fn equal_to(uid: &EntityUid) -> Scope {
        Scope::Eq(
            uid.type_name().to_string(),
            uid.id().unescaped().to_string(),
        )
    }

    /// `in uid`, or `is ty in uid`
    fn within(is: Option<String>, uid: &EntityUid) -> Scope {
        Scope::In(
            is,
            uid.type_name().to_string(),
            uid.id().unescaped().to_string(),
        )
    }

    /// Can an entity of `ty` named `id`, whose ancestors are `ancestors` (type, id), match?
    pub fn matches<'a>(
        &self,
        ty: &str,
        id: &str,
        mut ancestors: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> bool {
        match self {
            Scope::Any => true,
            Scope::Eq(t, i) => t == ty && i == id,
            Scope::Is(t) => t == ty,
            Scope::In(is, t, i) => {
                is.as_deref().is_none_or(|is| is == ty)
                    && ((t == ty && i == id) || ancestors.any(|(at, ai)| at == t && ai == i))
            }
        }
    }
}

/// What one policy can match and reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyMeta {
    pub principal: Scope,
    /// Whether the action scope can match `Action::"connect"`.
    pub connect: bool,
    pub resource: Scope,
    pub reads: ContextReads,
    /// Every `Group::"…"` the policy names, in its scope or its conditions.
    pub groups: Vec<String>,
    /// No `when` / `unless`: the scope alone decides it.
    pub unconditional: bool,
    pub forbid: bool,
}

impl PolicyMeta {
    pub fn of(policy: &Policy) -> PolicyMeta {
        // Principal and resource constraints are distinct types of the same shape.
        let principal = match policy.principal_constraint() {
            PrincipalConstraint::Any => Scope::Any,
            PrincipalConstraint::Eq(u) => Scope::equal_to(&u),
            PrincipalConstraint::In(u) => Scope::within(None, &u),
            PrincipalConstraint::Is(t) => Scope::Is(t.to_string()),
            PrincipalConstraint::IsIn(t, u) => Scope::within(Some(t.to_string()), &u),
        };
        let resource = match policy.resource_constraint() {
            ResourceConstraint::Any => Scope::Any,
            ResourceConstraint::Eq(u) => Scope::equal_to(&u),
            ResourceConstraint::In(u) => Scope::within(None, &u),
            ResourceConstraint::Is(t) => Scope::Is(t.to_string()),
            ResourceConstraint::IsIn(t, u) => Scope::within(Some(t.to_string()), &u),
        };
        let is_connect = |u: &EntityUid| {
            u.type_name().to_string() == "Action" && u.id().unescaped() == "connect"
        };
        let connect = match policy.action_constraint() {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(u) => is_connect(&u),
            ActionConstraint::In(us) => us.iter().any(is_connect),
        };
        let forbid = policy.effect() == cedar_policy::Effect::Forbid;
        let (reads, groups, unconditional) = match policy.to_json() {
            Ok(json) => {
                let unconditional = json
                    .get("conditions")
                    .and_then(|c| c.as_array())
                    .is_some_and(|c| c.is_empty());
                let mut reads = 0u8;
                walk(&json, &mut reads);
                let mut groups = Vec::new();
                entity_literals(&json, "Group", &mut groups);
                groups.sort();
                groups.dedup();
                (ContextReads(reads), groups, unconditional)
            }
            Err(_) => (ContextReads(ContextReads::ALL), Vec::new(), false),
        };
        PolicyMeta {
            principal,
            connect,
            resource,
            reads,
            groups,
            unconditional,
            forbid,
        }
    }
}

/// Collects the ids of entity literals of type `ty` (`{"type": ty, "id": …}` objects).
fn entity_literals(v: &serde_json::Value, ty: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            if let (Some(t), Some(id)) = (
                map.get("type").and_then(|t| t.as_str()),
                map.get("id").and_then(|i| i.as_str()),
            ) {
                if t == ty {
                    out.push(id.to_string());
                }
            }
            map.values().for_each(|c| entity_literals(c, ty, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|c| entity_literals(c, ty, out)),
        _ => {}
    }
}

fn is_context_var(v: &serde_json::Value) -> bool {
    v.get("Var").and_then(serde_json::Value::as_str) == Some("context")
}

fn walk(v: &serde_json::Value, reads: &mut u8) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                if k == "." || k == "has" {
                    if let (Some(left), Some(attr)) = (
                        child.get("left"),
                        child.get("attr").and_then(serde_json::Value::as_str),
                    ) {
                        if is_context_var(left) {
                            *reads |= ContextReads::bit(attr);
                            continue;
                        }
                    }
                }
                if k == "Var" && child.as_str() == Some("context") {
                    *reads |= ContextReads::ALL;
                }
                walk(child, reads);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, reads)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(src: &str) -> PolicyMeta {
        PolicyMeta::of(&Policy::parse(None, src).unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn scopes_are_read() {
        let m = meta(
            r#"permit(principal in Group::"sre", action == Action::"connect", resource in Network::"prod");"#,
        );
        assert_eq!(m.principal, Scope::In(None, "Group".into(), "sre".into()));
        assert_eq!(m.resource, Scope::In(None, "Network".into(), "prod".into()));
        assert!(m.connect);
        let m = meta(
            r#"forbid(principal == User::"bob", action in [Action::"other"], resource is Network);"#,
        );
        assert_eq!(m.principal, Scope::Eq("User".into(), "bob".into()));
        assert_eq!(m.resource, Scope::Is("Network".into()));
        assert!(!m.connect);
    }

    #[test]
    fn context_reads_are_found() {
        let m = meta(
            r#"permit(principal, action, resource) when { context.protocol == "tcp" && [22, 443].contains(context.dst_port) };"#,
        );
        assert_eq!(m.reads.0, ContextReads::PROTOCOL | ContextReads::DST_PORT);
        assert!(m.reads.cacheable());
        let m = meta(
            r#"permit(principal, action, resource) when { context.now < datetime("2026-12-31T00:00:00Z") };"#,
        );
        assert!(m.reads.has(ContextReads::NOW));
        assert!(!m.reads.cacheable());
        let m = meta(
            r#"permit(principal, action, resource) when { context has device && context.dst_ip.isInRange(ip("10.0.0.0/8")) };"#,
        );
        assert_eq!(m.reads.0, ContextReads::DEVICE | ContextReads::DST_IP);
        // Using the whole record reads everything.
        let m = meta(r#"permit(principal, action, resource) when { context == {} };"#);
        assert_eq!(m.reads.0, ContextReads::ALL);
        let m = meta(
            r#"permit(principal in Group::"a", action, resource) when { principal.tags.contains("x") };"#,
        );
        assert_eq!(m.reads.0, 0);
    }

    #[test]
    fn scope_matching_follows_in_semantics() {
        let groups = [("Group", "sre"), ("Group", "dev")];
        let s = Scope::In(None, "Group".into(), "sre".into());
        assert!(s.matches("User", "alice", groups.iter().copied()));
        assert!(!s.matches("User", "alice", [("Group", "dev")].into_iter()));
        let s = Scope::In(None, "User".into(), "alice".into());
        assert!(
            s.matches("User", "alice", std::iter::empty()),
            "an entity is `in` itself"
        );
        let s = Scope::In(Some("User".into()), "Group".into(), "sre".into());
        assert!(s.matches("User", "alice", groups.iter().copied()));
        assert!(!s.matches("Group", "x", groups.iter().copied()));
    }
}
