//! Why a flow is allowed or denied: the decision for one user and destination, the
//! network it resolved to, the deciding policies with file:line:col, and what the
//! answer depends on (the second factor, the sign-on's age, a temporary grant). The one
//! implementation behind `portcullis policy explain` and the console's explain page.
//!
//! The answer's JSON is the CLI's `--json` format: `decision`, `user`, `groups`,
//! `tags`, `destination`, `at`, `network`, `ancestors`, `mfa`, `auth_age_secs`,
//! `reason`, `policies` (`id`, `effect`, `file`, `line`, `col`; a grant's entry is what
//! the caller's `grant_detail` gives), `errors`, `depends_on`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use portcullis_model::{FlowRequest, Grant, Principal};
use serde_json::{json, Value};

use crate::testing::{signed_on_at, Destination};
use crate::{Engine, PolicyBundle};

/// What is asked.
#[derive(Clone, Debug)]
pub struct Question {
    pub principal: Principal,
    pub dst: Destination,
    pub at: DateTime<Utc>,
    pub mfa: bool,
    /// Seconds since the sign-on; `None`: never signed on (a static peer).
    pub auth_age: Option<u32>,
    /// The user's temporary grants.
    pub grants: Vec<Grant>,
}

/// The destination as the answer writes it: `ip:port/proto`, `[v6]:port/proto`,
/// `ip/proto`.
pub fn destination_text(dst: &Destination) -> String {
    match dst.port {
        0 => format!("{}/{}", dst.ip, dst.protocol),
        p if dst.ip.is_ipv6() => format!("[{}]:{p}/{}", dst.ip, dst.protocol),
        p => format!("{}:{p}/{}", dst.ip, dst.protocol),
    }
}

/// Decides `q` and says why. `grant_detail` describes a deciding grant (by its id).
pub fn explain(
    bundle: Arc<PolicyBundle>,
    q: &Question,
    grant_detail: &dyn Fn(&str) -> Option<Value>,
) -> Result<Value, crate::EntitiesError> {
    let user = q.principal.name.clone();
    let mut engine = Engine::new(bundle.clone(), vec![q.principal.clone()])?;
    engine.set_grants(crate::grants::Grants::new(q.grants.iter().cloned()));
    let at = q.at;
    let request = |mfa: bool, auth_age: Option<u32>| FlowRequest {
        src_ip: std::net::IpAddr::from([100, 64, 0, 2]),
        dst_ip: q.dst.ip,
        dst_port: q.dst.port,
        protocol: q.dst.protocol,
        device: "explain".into(),
        mfa,
        authenticated_at: signed_on_at(at, auth_age),
    };
    // The fast path: identical to plain Cedar over the policies with each grant as the
    // permit it means (the differential tests hold them equal).
    let d = (*engine.decide(&user, &request(q.mfa, q.auth_age), at)).clone();
    let without_grants = engine.decide_plain(&user, &request(q.mfa, q.auth_age), at);
    // What the answer depends on: the same request over a grid of sign-ons (with and
    // without a second factor; just now, as asked, never). The second factor matters if
    // flipping it changes the answer at some age; the age, if changing it does for
    // either value of the factor.
    let ages = [Some(0), q.auth_age, None];
    let grid: Vec<[bool; 3]> = [false, true]
        .iter()
        .map(|m| ages.map(|a| engine.decide(&user, &request(*m, a), at).allowed))
        .collect();
    let mut depends_on: Vec<&str> = Vec::new();
    if let [without, with] = grid.as_slice() {
        if without != with {
            depends_on.push("mfa");
        }
        if [without, with]
            .iter()
            .any(|row| row.iter().any(|x| Some(x) != row.first()))
        {
            depends_on.push("auth_age_secs");
        }
    }
    if without_grants.allowed != d.allowed {
        depends_on.push("temporary_grant");
    }
    let ancestors: Vec<String> = bundle
        .networks()
        .ancestors(&d.network)
        .map(str::to_string)
        .collect();
    let policies: Vec<Value> = d
        .policy_ids
        .iter()
        .map(|id| match bundle.policy(id) {
            Some(p) => json!({"id": id, "effect": p.effect, "file": p.file.display().to_string(), "line": p.line, "col": p.col}),
            None => grant_detail(id).unwrap_or_else(|| json!({"id": id})),
        })
        .collect();
    let reason = match (d.allowed, d.policy_ids.is_empty()) {
        (true, _) => "permitted",
        (false, true) => "no permit matched",
        (false, false) => "forbidden",
    };
    Ok(json!({
        "decision": if d.allowed { "allow" } else { "deny" },
        "user": q.principal.name, "groups": q.principal.groups, "tags": q.principal.tags,
        "destination": destination_text(&q.dst), "at": at.to_rfc3339(),
        "network": d.network, "ancestors": ancestors,
        "mfa": q.mfa, "auth_age_secs": q.auth_age,
        "reason": reason, "policies": policies, "errors": d.errors,
        "depends_on": depends_on,
    }))
}
