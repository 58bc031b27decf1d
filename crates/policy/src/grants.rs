//! Temporary grants (approved just-in-time access requests) as the engine evaluates them.
//!
//! A [`Grant`] means exactly the Cedar policy [`to_cedar`] renders:
//!
//! ```text
//! @id("<grant id>")
//! permit (principal == User::"<user>", action == Action::"connect",
//!         resource in Network::"<network>")
//! when { context.now >= datetime("<start>") && context.now < datetime("<end>")
//!        [&& context.dst_ip.isInRange(ip("<dst>"))]
//!        [&& context.dst_port == <port>] [&& context.protocol == "<protocol>"] };
//! ```
//!
//! Why an equivalent instead of linking a Cedar template per grant: Cedar templates only
//! fill `?principal` and `?resource` slots, so the window, the address range and the port
//! would still need one policy text per grant; every grant (and every expiry) would then
//! rebuild and revalidate the whole policy set, its index and its decision cache on every
//! node. Here a grant is a row checked after the bundle's own slice: the bundle's forbids
//! still beat it (a deny with forbids is never turned into an allow), and when no forbid
//! fired, a matching grant allows and is named among the deciding policy ids, as a permit
//! would be. A differential test (`tests::grants`) holds the two identical against plain
//! Cedar over the bundle with [`to_cedar`] of every grant appended.
//!
//! What it deliberately does not: no state machine (requests, approvals and expiry are
//! `portcullis-access`'s), no clock (the engine passes `now`).

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use portcullis_model::{Decision, FlowRequest, Grant};
use rustc_hash::FxHashMap;

use crate::networks::Networks;

/// The active and future grants, by user.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    by_user: FxHashMap<String, Vec<Grant>>,
    len: usize,
}

impl Grants {
    pub fn new(grants: impl IntoIterator<Item = Grant>) -> Grants {
        let mut by_user: FxHashMap<String, Vec<Grant>> = FxHashMap::default();
        let mut len = 0;
        for g in grants {
            len += 1;
            by_user.entry(g.user.clone()).or_default().push(g);
        }
        for list in by_user.values_mut() {
            list.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Grants { by_user, len }
    }

    pub fn of(&self, user: &str) -> &[Grant] {
        self.by_user
            .get(user)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &Grant> {
        self.by_user.values().flatten()
    }

    /// Users with a grant, for re-deciding their flows when the set changes.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.by_user.keys().map(String::as_str)
    }
}

/// Whether `g` permits the request to the network at `net` (the destination's resolved
/// network; `None`: the internet, which no grant names) at `now`.
pub fn permits(
    g: &Grant,
    networks: &Networks,
    net: Option<usize>,
    req: &FlowRequest,
    now: DateTime<Utc>,
) -> bool {
    let now_ms = now.timestamp_millis();
    if now_ms < g.start_ms || now_ms >= g.end_ms {
        return false;
    }
    let Some(resolved) = net.and_then(|i| networks.get(i)) else {
        return false;
    };
    if resolved.name != g.network && !networks.is_ancestor(&g.network, &resolved.name) {
        return false;
    }
    if let Some((base, len)) = g.dst {
        if !in_range(req.dst_ip, base, len) {
            return false;
        }
    }
    if g.port.is_some_and(|p| p != req.dst_port) {
        return false;
    }
    if g.protocol.is_some_and(|p| p != req.protocol) {
        return false;
    }
    true
}

/// Cedar's `isInRange`: same family and the first `len` bits equal.
fn in_range(ip: IpAddr, base: IpAddr, len: u8) -> bool {
    match (ip, base) {
        (IpAddr::V4(a), IpAddr::V4(b)) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// Combines the bundle's decision with the user's grants: forbids that fired stay a deny;
/// otherwise every grant that permits the request is added to the deciding permits.
pub(crate) fn combine(
    decision: Decision,
    grants: &[Grant],
    networks: &Networks,
    net: Option<usize>,
    req: &FlowRequest,
    now: DateTime<Utc>,
) -> Decision {
    if !decision.allowed && !decision.policy_ids.is_empty() {
        return decision;
    }
    let mut matched = grants
        .iter()
        .filter(|g| permits(g, networks, net, req, now))
        .map(|g| g.id.clone())
        .peekable();
    if matched.peek().is_none() {
        return decision;
    }
    let mut ids: std::collections::BTreeSet<String> = decision.policy_ids.into_iter().collect();
    ids.extend(matched);
    Decision {
        allowed: true,
        policy_ids: ids.into_iter().collect(),
        network: decision.network,
        errors: decision.errors,
    }
}

/// The Cedar policy a grant means (see the module docs). Names are escaped as Cedar
/// string literals.
pub fn to_cedar(g: &Grant) -> String {
    let at = |ms: i64| {
        DateTime::<Utc>::from_timestamp_millis(ms)
            .unwrap_or_default()
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string()
    };
    let mut when = format!(
        "context.now >= datetime(\"{}\") && context.now < datetime(\"{}\")",
        at(g.start_ms),
        at(g.end_ms)
    );
    if let Some((base, len)) = g.dst {
        when.push_str(&format!(
            " && context.dst_ip.isInRange(ip(\"{base}/{len}\"))"
        ));
    }
    if let Some(p) = g.port {
        when.push_str(&format!(" && context.dst_port == {p}"));
    }
    if let Some(p) = g.protocol {
        when.push_str(&format!(" && context.protocol == {}", quote(&p.name())));
    }
    format!(
        "@id({})\npermit (principal == User::{}, action == Action::\"connect\", resource in Network::{})\nwhen {{ {when} }};\n",
        quote(&g.id),
        quote(&g.user),
        quote(&g.network),
    )
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_as_cedar_is_in_range_does() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_range(v4("10.8.5.7"), v4("10.8.5.0"), 24));
        assert!(!in_range(v4("10.8.6.7"), v4("10.8.5.0"), 24));
        assert!(in_range(v4("10.8.6.7"), v4("0.0.0.0"), 0));
        assert!(in_range(v4("10.8.5.7"), v4("10.8.5.7"), 32));
        assert!(!in_range(v4("fd00::1"), v4("10.8.5.0"), 24));
        assert!(in_range(v4("fd00::1"), v4("fd00::"), 16));
        assert!(!in_range(v4("10.8.5.7"), v4("10.8.5.0"), 33));
    }

    #[test]
    fn names_are_quoted() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
