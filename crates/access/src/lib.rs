//! Just-in-time access requests, sans-IO.
//!
//! What it does:
//! - [`AccessRequest`]: one request and everything that happened to it. States:
//!   `requested` → `approved` | `denied` | `expired` | `revoked`, and `approved` →
//!   `expired` (its end passed) | `revoked` (withdrawn early). Nothing leaves `denied`,
//!   `expired` or `revoked`.
//! - [`Book`]: every request, planned then applied (`plan_*` return the next record of
//!   one request; [`Book::apply`] takes it once the store has it, from this node or any
//!   other). A requester never approves or denies their own request; whether anyone
//!   else may is the caller's Cedar check (`portcullis_policy::approval`), passed in as
//!   the approving policy ids.
//! - [`Book::grants`]: the approved requests in force as [`Grant`]s for the engine, and
//!   [`Book::plan_expiry`]: what lapsed by `now` (ended grants; requests left undecided
//!   for [`PENDING_TTL_SECS`]).
//! - [`parse_duration`] (`2h`, `90m`, `1h30m`, `45s`, `1d`) and [`PortSpec`] (`5432/tcp`).
//!
//! Format it owns (the identity store's `records` of kind [`KIND`], one JSON object per
//! request, see [`AccessRequest`]): field names are stable; `revision` grows by one on
//! every transition, and a record is applied only over an older revision, so a change
//! read twice (this node's own, back from the cluster's log) or late changes nothing.
//!
//! What it deliberately does not: no IO, no clock (callers pass `now`), no policy
//! evaluation, no id generation (callers pass unique ids).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;
use portcullis_model::{Event, Grant, Protocol};
use serde::{Deserialize, Serialize};

/// The record kind in the identity store.
pub const KIND: &str = "access";

/// Shortest grant: long enough to connect, short enough for tests and quick fixes.
pub const MIN_DURATION_SECS: u64 = 10;
/// Longest grant (30 days): anything longer belongs in a policy.
pub const MAX_DURATION_SECS: u64 = 30 * 86_400;
/// A request nobody decided within a day lapses (`expired`, never granted).
pub const PENDING_TTL_SECS: i64 = 86_400;
/// Longest reason, in characters.
pub const MAX_REASON_CHARS: usize = 500;
/// Open (pending or approved) requests one user may hold at once.
pub const MAX_OPEN_PER_USER: usize = 20;

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Requested,
    Approved,
    Denied,
    Expired,
    Revoked,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Requested => "requested",
            State::Approved => "approved",
            State::Denied => "denied",
            State::Expired => "expired",
            State::Revoked => "revoked",
        }
    }

    /// Whether nothing can happen to the request any more.
    pub fn is_final(self) -> bool {
        matches!(self, State::Denied | State::Expired | State::Revoked)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One destination port and its protocol, written `5432/tcp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: Protocol,
}

impl FromStr for PortSpec {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<PortSpec, AccessError> {
        let bad = |why: &str| AccessError::Invalid(format!("port {s:?}: {why} (e.g. 5432/tcp)"));
        let (port, proto) = s.split_once('/').ok_or_else(|| bad("no protocol"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(bad("the port is not a number from 1 to 65535"));
        }
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::TCP,
            "udp" => Protocol::UDP,
            _ => return Err(bad("the protocol is neither tcp nor udp")),
        };
        Ok(PortSpec { port, protocol })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol.name())
    }
}

impl Serialize for PortSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PortSpec, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses `2h`, `90m`, `1h30m`, `45s`, `1d` (units d, h, m, s, each at most once, in that
/// order) into seconds, within [`MIN_DURATION_SECS`]..=[`MAX_DURATION_SECS`].
pub fn parse_duration(s: &str) -> Result<u64, AccessError> {
    let bad = |why: String| AccessError::Invalid(format!("duration {s:?}: {why}"));
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut last_unit = 0usize;
    let units = [('d', 86_400u64), ('h', 3_600), ('m', 60), ('s', 1)];
    if s.is_empty() {
        return Err(bad("empty (e.g. 2h, 90m, 1h30m)".into()));
    }
    for c in s.chars() {
        if c.is_ascii_digit() {
            if digits.len() >= 9 {
                return Err(bad("too long".into()));
            }
            digits.push(c);
            continue;
        }
        let Some(pos) = units.iter().position(|(u, _)| *u == c) else {
            return Err(bad(format!("unknown unit {c:?} (d, h, m, s)")));
        };
        if pos < last_unit || digits.is_empty() {
            return Err(bad("write it like 2h, 90m or 1h30m".into()));
        }
        last_unit = pos + 1;
        let n: u64 = digits.parse().map_err(|_| bad("not a number".into()))?;
        digits.clear();
        let secs = units.get(pos).map_or(0, |(_, s)| *s);
        total = total.saturating_add(n.saturating_mul(secs));
    }
    if !digits.is_empty() {
        return Err(bad("a number without a unit (d, h, m, s)".into()));
    }
    if !(MIN_DURATION_SECS..=MAX_DURATION_SECS).contains(&total) {
        return Err(bad(format!(
            "must be from {MIN_DURATION_SECS} s to 30 days, not {total} s"
        )));
    }
    Ok(total)
}

/// A request and what became of it: the stored record (see the crate docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRequest {
    pub id: String,
    /// The requester: the user the grant would be for.
    pub user: String,
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSpec>,
    pub duration_secs: u64,
    pub reason: String,
    /// Who filed it: the requester, or `admin:<token>` on their behalf.
    pub filed_by: String,
    pub requested_at: DateTime<Utc>,
    pub state: State,
    /// The approver or denier, or whoever revoked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<DateTime<Utc>>,
    /// The denier's or revoker's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_reason: Option<String>,
    /// The `approve_access` permits that allowed the approval.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approval_policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<DateTime<Utc>>,
    /// When it reached `expired` or `revoked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    pub revision: u32,
}

impl AccessRequest {
    /// The grant this request makes, while approved (whether it is in force is the
    /// engine's window check).
    pub fn grant(&self) -> Option<Grant> {
        if self.state != State::Approved {
            return None;
        }
        Some(Grant {
            id: self.id.clone(),
            user: self.user.clone(),
            network: self.network.clone(),
            dst: self.dst.map(|n| (n.network(), n.prefix_len())),
            port: self.port.map(|p| p.port),
            protocol: self.port.map(|p| p.protocol),
            start_ms: self.starts_at?.timestamp_millis(),
            end_ms: self.ends_at?.timestamp_millis(),
        })
    }

    /// The audit event of the request's current state.
    pub fn event(&self) -> Event {
        let actor = self.decided_by.clone().unwrap_or_default();
        let reason = self.decision_reason.clone().unwrap_or_default();
        match self.state {
            State::Requested => Event::AccessRequested {
                request_id: self.id.clone(),
                user: self.user.clone(),
                network: self.network.clone(),
                dst: self.dst.map(|d| d.to_string()),
                port: self.port.map(|p| p.to_string()),
                duration_secs: self.duration_secs,
                reason: self.reason.clone(),
                actor: self.filed_by.clone(),
            },
            State::Approved => Event::AccessApproved {
                request_id: self.id.clone(),
                user: self.user.clone(),
                approver: actor,
                network: self.network.clone(),
                starts_at: self.starts_at.unwrap_or_default(),
                ends_at: self.ends_at.unwrap_or_default(),
                policy_ids: self.approval_policies.clone(),
                reason: self.reason.clone(),
            },
            State::Denied => Event::AccessDenied {
                request_id: self.id.clone(),
                user: self.user.clone(),
                approver: actor,
                network: self.network.clone(),
                reason,
            },
            State::Expired => Event::AccessExpired {
                request_id: self.id.clone(),
                user: self.user.clone(),
                network: self.network.clone(),
                granted: self.starts_at.is_some(),
                ends_at: self.ended_at.unwrap_or_default(),
            },
            State::Revoked => Event::AccessRevoked {
                request_id: self.id.clone(),
                user: self.user.clone(),
                actor,
                network: self.network.clone(),
                reason,
            },
        }
    }

    fn next(&self) -> AccessRequest {
        AccessRequest {
            revision: self.revision.saturating_add(1),
            ..self.clone()
        }
    }
}

/// What a user asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRequest {
    pub user: String,
    pub network: String,
    pub dst: Option<IpNet>,
    pub port: Option<PortSpec>,
    pub duration_secs: u64,
    pub reason: String,
    pub filed_by: String,
}

/// Why a request or a decision was refused. Messages name the request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("{0}")]
    Invalid(String),
    #[error("no access request {0:?}")]
    NotFound(String),
    #[error("access request {id} is {state}: it cannot be {action}")]
    WrongState {
        id: String,
        state: State,
        action: &'static str,
    },
    #[error("{user} cannot {action} their own access request {id}")]
    OwnRequest {
        id: String,
        user: String,
        action: &'static str,
    },
    #[error("{0} already has {MAX_OPEN_PER_USER} open access requests")]
    TooMany(String),
}

/// Every access request, by id.
#[derive(Clone, Debug, Default)]
pub struct Book {
    requests: BTreeMap<String, AccessRequest>,
}

fn check_text(what: &str, text: &str, max: usize) -> Result<(), AccessError> {
    if text.trim().is_empty() {
        return Err(AccessError::Invalid(format!("{what} is empty")));
    }
    if text.chars().count() > max {
        return Err(AccessError::Invalid(format!(
            "{what} is longer than {max} characters"
        )));
    }
    if text.chars().any(char::is_control) {
        return Err(AccessError::Invalid(format!(
            "{what} contains control characters"
        )));
    }
    Ok(())
}

impl Book {
    pub fn from_records(records: impl IntoIterator<Item = AccessRequest>) -> Book {
        let mut book = Book::default();
        for r in records {
            book.apply(r);
        }
        book
    }

    pub fn get(&self, id: &str) -> Option<&AccessRequest> {
        self.requests.get(id)
    }

    /// Every request, newest first.
    pub fn list(&self) -> Vec<&AccessRequest> {
        let mut all: Vec<&AccessRequest> = self.requests.values().collect();
        all.sort_by(|a, b| b.requested_at.cmp(&a.requested_at).then(b.id.cmp(&a.id)));
        all
    }

    /// A new request with id `id` (unique: the caller's), `requested` as of `now`. The
    /// network's existence and `dst`'s place inside it are the caller's checks.
    pub fn plan_request(
        &self,
        new: NewRequest,
        id: String,
        now: DateTime<Utc>,
    ) -> Result<AccessRequest, AccessError> {
        check_text("the reason", &new.reason, MAX_REASON_CHARS)?;
        check_text("the user name", &new.user, 256)?;
        check_text("the network name", &new.network, 256)?;
        if !(MIN_DURATION_SECS..=MAX_DURATION_SECS).contains(&new.duration_secs) {
            return Err(AccessError::Invalid(format!(
                "the duration must be from {MIN_DURATION_SECS} s to 30 days, not {} s",
                new.duration_secs
            )));
        }
        if self.requests.contains_key(&id) {
            return Err(AccessError::Invalid(format!(
                "access request id {id} is taken"
            )));
        }
        let open = self
            .requests
            .values()
            .filter(|r| r.user == new.user && !r.state.is_final())
            .count();
        if open >= MAX_OPEN_PER_USER {
            return Err(AccessError::TooMany(new.user));
        }
        Ok(AccessRequest {
            id,
            user: new.user,
            network: new.network,
            dst: new.dst.map(|d| d.trunc()),
            port: new.port,
            duration_secs: new.duration_secs,
            reason: new.reason,
            filed_by: new.filed_by,
            requested_at: now,
            state: State::Requested,
            decided_by: None,
            decided_at: None,
            decision_reason: None,
            approval_policies: Vec::new(),
            starts_at: None,
            ends_at: None,
            ended_at: None,
            revision: 1,
        })
    }

    fn pending(
        &self,
        id: &str,
        who: &str,
        action: &'static str,
    ) -> Result<&AccessRequest, AccessError> {
        let r = self
            .requests
            .get(id)
            .ok_or_else(|| AccessError::NotFound(id.to_string()))?;
        if r.state != State::Requested {
            return Err(AccessError::WrongState {
                id: id.to_string(),
                state: r.state,
                action,
            });
        }
        if r.user == who {
            return Err(AccessError::OwnRequest {
                id: id.to_string(),
                user: who.to_string(),
                action: if action == "approved" {
                    "approve"
                } else {
                    "deny"
                },
            });
        }
        Ok(r)
    }

    /// Whether `approver` could decide `id` at all (it is pending and not their own),
    /// before the approval policies are asked.
    pub fn check_decidable(&self, id: &str, approver: &str) -> Result<&AccessRequest, AccessError> {
        self.pending(id, approver, "approved")
    }

    /// Approval by `approver`, whom the `approve_access` permits `policy_ids` allowed:
    /// the grant runs from `now` for the requested duration.
    pub fn plan_approve(
        &self,
        id: &str,
        approver: &str,
        policy_ids: Vec<String>,
        now: DateTime<Utc>,
    ) -> Result<AccessRequest, AccessError> {
        let r = self.pending(id, approver, "approved")?;
        let secs = i64::try_from(r.duration_secs.min(MAX_DURATION_SECS)).unwrap_or(0);
        let mut next = r.next();
        next.state = State::Approved;
        next.decided_by = Some(approver.to_string());
        next.decided_at = Some(now);
        next.approval_policies = policy_ids;
        next.starts_at = Some(now);
        next.ends_at = Some(now + TimeDelta::seconds(secs));
        Ok(next)
    }

    /// Refusal by `approver` (who must be allowed to decide it, as for an approval).
    pub fn plan_deny(
        &self,
        id: &str,
        approver: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<AccessRequest, AccessError> {
        check_text("the reason", reason, MAX_REASON_CHARS)?;
        let r = self.pending(id, approver, "denied")?;
        let mut next = r.next();
        next.state = State::Denied;
        next.decided_by = Some(approver.to_string());
        next.decided_at = Some(now);
        next.decision_reason = Some(reason.to_string());
        Ok(next)
    }

    /// Withdraws a pending request or an approved grant before its end.
    pub fn plan_revoke(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<AccessRequest, AccessError> {
        let r = self
            .requests
            .get(id)
            .ok_or_else(|| AccessError::NotFound(id.to_string()))?;
        let ended = r.ends_at.is_some_and(|e| e <= now);
        if r.state.is_final() || ended {
            return Err(AccessError::WrongState {
                id: id.to_string(),
                state: if ended { State::Expired } else { r.state },
                action: "revoked",
            });
        }
        let mut next = r.next();
        next.state = State::Revoked;
        next.decided_by = Some(actor.to_string());
        next.decision_reason = Some(reason.to_string());
        next.ended_at = Some(now);
        Ok(next)
    }

    /// What lapsed by `now`: approved grants past their end, requests undecided for
    /// [`PENDING_TTL_SECS`]; each as its `expired` record.
    pub fn plan_expiry(&self, now: DateTime<Utc>) -> Vec<AccessRequest> {
        self.requests
            .values()
            .filter_map(|r| {
                let ends = match r.state {
                    State::Approved => r.ends_at?,
                    State::Requested => r.requested_at + TimeDelta::seconds(PENDING_TTL_SECS),
                    _ => return None,
                };
                (ends <= now).then(|| {
                    let mut next = r.next();
                    next.state = State::Expired;
                    next.ended_at = Some(ends);
                    next
                })
            })
            .collect()
    }

    /// When the next request lapses, if any is open.
    pub fn next_expiry(&self) -> Option<DateTime<Utc>> {
        self.requests
            .values()
            .filter_map(|r| match r.state {
                State::Approved => r.ends_at,
                State::Requested => Some(r.requested_at + TimeDelta::seconds(PENDING_TTL_SECS)),
                _ => None,
            })
            .min()
    }

    /// Takes a stored record unless the book has this revision or a newer one. Returns
    /// whether the approved set changed (the engine's grants must be replaced).
    pub fn apply(&mut self, r: AccessRequest) -> bool {
        match self.requests.get(&r.id) {
            Some(old) if old.revision >= r.revision => false,
            old => {
                let was = old.is_some_and(|o| o.state == State::Approved);
                let is = r.state == State::Approved;
                self.requests.insert(r.id.clone(), r);
                was || is
            }
        }
    }

    /// The grants of the approved requests whose end is after `now`.
    pub fn grants(&self, now: DateTime<Utc>) -> Vec<Grant> {
        self.requests
            .values()
            .filter(|r| r.ends_at.is_some_and(|e| e > now))
            .filter_map(AccessRequest::grant)
            .collect()
    }
}

/// Whether `dst` lies inside one of `cidrs` (a request may narrow a network, never
/// widen it).
pub fn dst_within(dst: &IpNet, cidrs: &[IpNet]) -> bool {
    cidrs.iter().any(|c| c.contains(dst))
}

/// Parses an address or CIDR (`10.8.5.9` is `10.8.5.9/32`).
pub fn parse_dst(s: &str) -> Result<IpNet, AccessError> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| AccessError::Invalid(format!("destination {s:?} is not an address or CIDR")))
}

#[cfg(test)]
mod tests;
