//! The decision engine: a policy bundle plus the identities it decides for, with a fast
//! path that keeps Cedar's exact meaning.
//!
//! Fast path, per new flow (see `analysis` for why each step cannot change the answer):
//! 1. resolve the destination to its network (longest prefix, tree bitmap);
//! 2. decision cache: keyed by (user, network, port, protocol) — everything a cacheable
//!    decision can depend on besides identities and networks, which bump the epoch and
//!    clear the cache. A slice is cacheable only when none of its policies reads
//!    `context.now`, `dst_ip`, `src_ip`, `device`, `mfa` or `auth_age_secs` (per device,
//!    and the age changes by the second: a cached answer would go stale); other slices
//!    are always evaluated;
//! 3. the slice for (user, network): only policies whose scopes can match, found through
//!    an index by principal (any / user / group) and filtered by action and resource;
//! 4. a policy without `when`/`unless` in the slice is satisfied: its scope, which we
//!    matched exactly against the same hierarchy Cedar sees, is all it says;
//! 5. each conditional policy of the slice is evaluated by Cedar (its prebuilt
//!    single-policy set), with only the context attributes the slice reads; the results
//!    combine as Cedar combines them: any satisfied forbid denies (those forbids decide),
//!    else any satisfied permit allows (those permits decide), else the default deny;
//!    errors of every policy are reported, and an erroring policy counts as not satisfied.
//!
//! [`Engine::decide_plain`] is the reference: plain `Authorizer::is_authorized` over the
//! whole set with the full context. A differential test holds the two identical.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityUid, PolicySet, Request, RestrictedExpression,
};
use chrono::{DateTime, Utc};
use portcullis_model::{Decision, FlowRequest, Principal};
use rustc_hash::FxHashMap;

use crate::analysis::{ContextReads, Scope};
use crate::grants::{self, Grants};
use crate::{string_set, uid, PolicyBundle, INTERNET};

/// Bound on cached decisions; the cache is cleared when it is reached.
const MAX_CACHED_DECISIONS: usize = 1 << 20;
/// Bound on cached slices.
const MAX_CACHED_SLICES: usize = 1 << 18;

/// Identity data that Cedar rejected (wrong attribute types for the schema).
#[derive(Debug, thiserror::Error)]
#[error("identity data does not match the policy schema: {0}")]
pub struct EntitiesError(pub(crate) String);

/// Counters of the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub cache_hits: u64,
    pub evaluations: u64,
    pub empty_slices: u64,
    pub slice_builds: u64,
    /// Decisions in which a policy errored (a forbid that errors denies).
    pub policy_errors: u64,
}

#[derive(Debug)]
struct UserEntry {
    id: u32,
    principal: Principal,
    uid: EntityUid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DecisionKey {
    user: u32,
    network: u32,
    port: u16,
    protocol: u8,
}

struct Slice {
    permits: Vec<u32>,
    forbids: Vec<u32>,
    conditional: Vec<u32>,
    /// Context read by the conditional policies.
    reads: ContextReads,
}

impl Slice {
    fn empty() -> Slice {
        Slice {
            permits: Vec::new(),
            forbids: Vec::new(),
            conditional: Vec::new(),
            reads: ContextReads(0),
        }
    }
}

/// Policies indexed by what their principal scope names.
#[derive(Default)]
struct PrincipalIndex {
    any: Vec<u32>,
    by_user: FxHashMap<String, Vec<u32>>,
    by_group: FxHashMap<String, Vec<u32>>,
}

impl PrincipalIndex {
    fn build(bundle: &PolicyBundle) -> Self {
        let mut idx = PrincipalIndex::default();
        for (i, m) in bundle.metas.iter().enumerate() {
            let i = i as u32;
            if !m.connect {
                continue;
            }
            match &m.principal {
                Scope::Eq(t, u) | Scope::In(_, t, u) if t == "User" => {
                    idx.by_user.entry(u.clone()).or_default().push(i)
                }
                Scope::Eq(t, g) | Scope::In(_, t, g) if t == "Group" => {
                    idx.by_group.entry(g.clone()).or_default().push(i)
                }
                // `== Group::…` never matches a User, and other types never do either;
                // keep them as candidates anyway: the scope filter below is exact.
                _ => idx.any.push(i),
            }
        }
        idx
    }
}

/// A decision engine: a policy bundle plus the identities it decides for.
pub struct Engine {
    bundle: Arc<PolicyBundle>,
    index: PrincipalIndex,
    users: FxHashMap<String, UserEntry>,
    next_user_id: u32,
    entities: Entities,
    epoch: u64,
    authorizer: Authorizer,
    action: EntityUid,
    network_uids: Vec<EntityUid>,
    internet_uid: EntityUid,
    slices: FxHashMap<(u32, u32), Arc<Slice>>,
    /// Per user: the policies whose principal and action scopes match (network-independent).
    user_candidates: FxHashMap<u32, Arc<Vec<u32>>>,
    decisions: FxHashMap<DecisionKey, Arc<Decision>>,
    /// Temporary grants (see `grants`); a user with any is never served from the cache.
    grants: Grants,
    pub stats: EngineStats,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dir", &self.bundle.dir)
            .field("policies", &self.bundle.policies().len())
            .field("users", &self.users.len())
            .field("epoch", &self.epoch)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Engine {
    pub fn new(bundle: Arc<PolicyBundle>, users: Vec<Principal>) -> Result<Engine, EntitiesError> {
        let mut engine = Engine {
            index: PrincipalIndex::build(&bundle),
            network_uids: bundle
                .networks()
                .iter()
                .map(|n| uid("Network", &n.name))
                .collect(),
            internet_uid: uid("Network", INTERNET),
            bundle,
            users: FxHashMap::default(),
            next_user_id: 0,
            entities: Entities::empty(),
            epoch: 1,
            authorizer: Authorizer::new(),
            action: uid("Action", "connect"),
            slices: FxHashMap::default(),
            user_candidates: FxHashMap::default(),
            decisions: FxHashMap::default(),
            grants: Grants::default(),
            stats: EngineStats::default(),
        };
        for u in users {
            engine.insert_user_entry(u);
        }
        engine.entities = engine.build_entities()?;
        Ok(engine)
    }

    /// Bumped on every policy or identity change; flows decided under an older epoch
    /// must be re-decided.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn bundle(&self) -> &Arc<PolicyBundle> {
        &self.bundle
    }

    pub fn user(&self, name: &str) -> Option<&Principal> {
        self.users.get(name).map(|u| &u.principal)
    }

    pub fn users(&self) -> impl Iterator<Item = &Principal> {
        self.users.values().map(|u| &u.principal)
    }

    fn insert_user_entry(&mut self, p: Principal) {
        let id = self.next_user_id;
        self.next_user_id = self.next_user_id.wrapping_add(1);
        let uid = uid("User", &p.name);
        self.users.insert(
            p.name.clone(),
            UserEntry {
                id,
                principal: p,
                uid,
            },
        );
    }

    fn bump(&mut self) {
        self.epoch += 1;
        self.slices.clear();
        self.user_candidates.clear();
        self.decisions.clear();
    }

    /// Replaces the policy bundle (already fully validated). Bumps the epoch.
    pub fn set_bundle(&mut self, bundle: Arc<PolicyBundle>) -> Result<(), EntitiesError> {
        let old = std::mem::replace(&mut self.bundle, bundle);
        match self.build_entities() {
            Ok(entities) => {
                self.entities = entities;
                self.index = PrincipalIndex::build(&self.bundle);
                self.network_uids = self
                    .bundle
                    .networks()
                    .iter()
                    .map(|n| uid("Network", &n.name))
                    .collect();
                self.bump();
                Ok(())
            }
            Err(e) => {
                self.bundle = old;
                Err(e)
            }
        }
    }

    /// Adds or replaces a user, updating the entities incrementally. Bumps the epoch.
    pub fn upsert_user(&mut self, user: Principal) -> Result<(), EntitiesError> {
        let mut update = vec![user_entity(&user)?];
        update.extend(
            user.groups
                .iter()
                .map(|g| Entity::new_no_attrs(uid("Group", g), HashSet::new())),
        );
        let entities = self
            .entities
            .clone()
            .upsert_entities(update, Some(self.bundle.schema()))
            .map_err(|e| EntitiesError(e.to_string()))?;
        self.entities = entities;
        match self.users.get_mut(&user.name) {
            Some(entry) => entry.principal = user,
            None => self.insert_user_entry(user),
        }
        self.bump();
        Ok(())
    }

    /// Removes a user; its flows decide to deny from now on. Bumps the epoch.
    pub fn remove_user(&mut self, name: &str) -> Result<(), EntitiesError> {
        if let Some(entry) = self.users.remove(name) {
            self.entities = self
                .entities
                .clone()
                .remove_entities([entry.uid])
                .map_err(|e| EntitiesError(e.to_string()))?;
        }
        self.bump();
        Ok(())
    }

    fn build_entities(&self) -> Result<Entities, EntitiesError> {
        let mut all = self.bundle.network_entities();
        let mut groups = BTreeSet::new();
        for u in self.users.values() {
            groups.extend(u.principal.groups.iter().cloned());
            all.push(user_entity(&u.principal)?);
        }
        all.extend(
            groups
                .iter()
                .map(|g| Entity::new_no_attrs(uid("Group", g), HashSet::new())),
        );
        Entities::from_entities(all, Some(self.bundle.schema()))
            .map_err(|e| EntitiesError(e.to_string()))
    }

    /// Decides one new flow of `user` (fast path). Unknown users are denied.
    /// IPv4-mapped IPv6 addresses (`::ffff:10.8.0.9`) are decided as the IPv4 address
    /// they carry, on both paths (Cedar refuses them as `ipaddr`).
    pub fn decide(&mut self, user: &str, req: &FlowRequest, now: DateTime<Utc>) -> Arc<Decision> {
        if let Some(req) = canonical(req) {
            return self.decide(user, &req, now);
        }
        let net = self.bundle.networks().resolve_index(req.dst_ip);
        let net_key = net.map(|i| i as u32).unwrap_or(u32::MAX);
        let Some(entry) = self.users.get(user) else {
            return Arc::new(unknown_user(self.network_name(net), user));
        };
        let key = DecisionKey {
            user: entry.id,
            network: net_key,
            port: req.dst_port,
            protocol: req.protocol.0,
        };
        // A grant's window makes the answer depend on the time: never cached.
        let granted = !self.grants.of(user).is_empty();
        if !granted {
            if let Some(d) = self.decisions.get(&key) {
                self.stats.cache_hits += 1;
                return d.clone();
            }
        }
        let user_id = entry.id;
        let slice = match self.slices.get(&(user_id, net_key)) {
            Some(s) => s.clone(),
            None => self.build_slice(user, net),
        };
        let decision =
            if slice.permits.is_empty() && slice.forbids.is_empty() && slice.conditional.is_empty()
            {
                self.stats.empty_slices += 1;
                Decision::deny_default(self.network_name(net))
            } else {
                self.stats.evaluations += 1;
                self.evaluate_slice(user, net, req, now, &slice)
            };
        let decision = if granted {
            grants::combine(
                decision,
                self.grants.of(user),
                self.bundle.networks(),
                net,
                req,
                now,
            )
        } else {
            decision
        };
        if !decision.errors.is_empty() {
            self.stats.policy_errors += 1;
        }
        let decision = Arc::new(decision);
        if slice.reads.cacheable() && !granted {
            if self.decisions.len() >= MAX_CACHED_DECISIONS {
                self.decisions.clear();
            }
            self.decisions.insert(key, decision.clone());
        }
        decision
    }

    /// Replaces the temporary grants. Cached decisions are dropped (a cached deny of a
    /// user who now has a grant would be stale); the epoch stays, so the caller
    /// re-decides the flows of the users whose grants changed.
    pub fn set_grants(&mut self, grants: Grants) {
        self.grants = grants;
        self.decisions.clear();
    }

    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// The reference decision: plain Cedar over the whole policy set, full context.
    pub fn decide_plain(&self, user: &str, req: &FlowRequest, now: DateTime<Utc>) -> Decision {
        if let Some(req) = canonical(req) {
            return self.decide_plain(user, &req, now);
        }
        let net = self.bundle.networks().resolve_index(req.dst_ip);
        if !self.users.contains_key(user) {
            return unknown_user(self.network_name(net), user);
        }
        self.evaluate(
            user,
            net,
            req,
            now,
            self.bundle.policy_set(),
            ContextReads(ContextReads::ALL),
        )
    }

    fn network_name(&self, net: Option<usize>) -> String {
        net.and_then(|i| self.bundle.networks().get(i))
            .map(|n| n.name.clone())
            .unwrap_or_else(|| INTERNET.to_string())
    }

    fn build_slice(&mut self, user: &str, net: Option<usize>) -> Arc<Slice> {
        self.stats.slice_builds += 1;
        let net_key = net.map(|i| i as u32).unwrap_or(u32::MAX);
        let Some(entry) = self.users.get(user) else {
            return Arc::new(Slice::empty());
        };
        let p = &entry.principal;
        let networks = self.bundle.networks();
        let (net_name, ancestors): (&str, Vec<&str>) =
            match net.and_then(|i| networks.get(i).map(|n| (i, n))) {
                Some((i, n)) => (
                    n.name.as_str(),
                    networks
                        .ancestor_indices(i)
                        .iter()
                        .filter_map(|a| networks.get(*a).map(|x| x.name.as_str()))
                        .collect(),
                ),
                None => (INTERNET, Vec::new()),
            };
        let candidates = match self.user_candidates.get(&entry.id) {
            Some(c) => c.clone(),
            None => {
                let mut c: Vec<u32> = self.index.any.clone();
                c.extend(self.index.by_user.get(&p.name).into_iter().flatten());
                for g in &p.groups {
                    c.extend(self.index.by_group.get(g).into_iter().flatten());
                }
                c.sort_unstable();
                c.dedup();
                let metas = &self.bundle.metas;
                c.retain(|i| {
                    metas.get(*i as usize).is_some_and(|m| {
                        m.connect
                            && m.principal.matches(
                                "User",
                                &p.name,
                                p.groups.iter().map(|g| ("Group", g.as_str())),
                            )
                    })
                });
                let c = Arc::new(c);
                if self.user_candidates.len() >= MAX_CACHED_SLICES {
                    self.user_candidates.clear();
                }
                self.user_candidates.insert(entry.id, c.clone());
                c
            }
        };
        let mut slice = Slice::empty();
        for &i in candidates.iter() {
            let Some(m) = self.bundle.metas.get(i as usize) else {
                continue;
            };
            if !m.resource.matches(
                "Network",
                net_name,
                ancestors.iter().map(|a| ("Network", *a)),
            ) {
                continue;
            }
            if !m.unconditional {
                slice.conditional.push(i);
                slice.reads = ContextReads(slice.reads.0 | m.reads.0);
            } else if m.forbid {
                slice.forbids.push(i);
            } else {
                slice.permits.push(i);
            }
        }
        let slice = Arc::new(slice);
        if self.slices.len() >= MAX_CACHED_SLICES {
            self.slices.clear();
        }
        self.slices.insert((entry.id, net_key), slice.clone());
        slice
    }

    fn evaluate_slice(
        &self,
        user: &str,
        net: Option<usize>,
        req: &FlowRequest,
        now: DateTime<Utc>,
        slice: &Slice,
    ) -> Decision {
        let network = self.network_name(net);
        let id_of = |i: &u32| {
            self.bundle
                .policies()
                .get(*i as usize)
                .map(|p| p.id.clone())
        };
        let mut forbids: BTreeSet<String> = slice.forbids.iter().filter_map(id_of).collect();
        let mut permits: BTreeSet<String> = slice.permits.iter().filter_map(id_of).collect();
        let mut errors = Vec::new();
        let mut request: Option<Result<Request, String>> = None;
        let protocol = req.protocol.name();
        let network_tags: &[String] = net
            .and_then(|i| self.bundle.networks().get(i))
            .map(|n| n.tags.as_slice())
            .unwrap_or_default();
        let Some(entry) = self.users.get(user) else {
            return unknown_user(network, user);
        };
        let env = crate::compile::Env {
            user: &entry.principal,
            network_tags,
            dst_ip: req.dst_ip,
            src_ip: req.src_ip,
            dst_port: i64::from(req.dst_port),
            protocol: &protocol,
            device: &req.device,
            now_ms: now.timestamp_millis(),
            mfa: req.mfa,
            auth_age_secs: auth_age_secs(req, now),
        };
        for i in &slice.conditional {
            let Some(meta) = self.bundle.metas.get(*i as usize) else {
                continue;
            };
            let satisfied = match self
                .bundle
                .compiled
                .get(*i as usize)
                .and_then(Option::as_ref)
            {
                Some(compiled) => compiled.satisfied(&env),
                None => {
                    let Some(set) = self.bundle.singles.get(*i as usize) else {
                        continue;
                    };
                    let request = match request
                        .get_or_insert_with(|| self.request(user, net, req, now, slice.reads))
                    {
                        Ok(r) => r,
                        Err(e) => return deny_with_error(network, e.clone()),
                    };
                    let response = self.authorizer.is_authorized(request, set, &self.entities);
                    let diagnostics = response.diagnostics();
                    let before = errors.len();
                    errors.extend(diagnostics.errors().map(|e| e.to_string()));
                    // Fail closed: a forbid that errors counts as satisfied (plain Cedar
                    // skips it, which would let through what it exists to block).
                    let satisfied = diagnostics.reason().next().is_some()
                        || (meta.forbid && errors.len() > before);
                    satisfied
                }
            };
            if satisfied {
                if let Some(id) = id_of(i) {
                    if meta.forbid {
                        forbids.insert(id);
                    } else {
                        permits.insert(id);
                    }
                }
            }
        }
        errors.sort();
        let allowed = forbids.is_empty() && !permits.is_empty();
        let policy_ids = if !forbids.is_empty() {
            forbids.into_iter().collect()
        } else if allowed {
            permits.into_iter().collect()
        } else {
            Vec::new()
        };
        Decision {
            allowed,
            policy_ids,
            network,
            errors,
        }
    }

    fn request(
        &self,
        user: &str,
        net: Option<usize>,
        req: &FlowRequest,
        now: DateTime<Utc>,
        reads: ContextReads,
    ) -> Result<Request, String> {
        let entry = self
            .users
            .get(user)
            .ok_or_else(|| format!("unknown user {user:?}"))?;
        let mut pairs: Vec<(String, RestrictedExpression)> = Vec::with_capacity(8);
        if reads.has(ContextReads::DST_IP) {
            pairs.push((
                "dst_ip".into(),
                RestrictedExpression::new_ip(req.dst_ip.to_string()),
            ));
        }
        if reads.has(ContextReads::DST_PORT) {
            pairs.push((
                "dst_port".into(),
                RestrictedExpression::new_long(i64::from(req.dst_port)),
            ));
        }
        if reads.has(ContextReads::PROTOCOL) {
            pairs.push((
                "protocol".into(),
                RestrictedExpression::new_string(req.protocol.name().into_owned()),
            ));
        }
        if reads.has(ContextReads::SRC_IP) {
            pairs.push((
                "src_ip".into(),
                RestrictedExpression::new_ip(req.src_ip.to_string()),
            ));
        }
        if reads.has(ContextReads::NOW) {
            pairs.push((
                "now".into(),
                RestrictedExpression::new_datetime(
                    now.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
                ),
            ));
        }
        if reads.has(ContextReads::DEVICE) {
            pairs.push((
                "device".into(),
                RestrictedExpression::new_string(req.device.clone()),
            ));
        }
        if reads.has(ContextReads::MFA) {
            pairs.push(("mfa".into(), RestrictedExpression::new_bool(req.mfa)));
        }
        if reads.has(ContextReads::AUTH_AGE) {
            pairs.push((
                "auth_age_secs".into(),
                RestrictedExpression::new_long(auth_age_secs(req, now)),
            ));
        }
        let context =
            Context::from_pairs(pairs).map_err(|e| format!("cannot build request context: {e}"))?;
        let resource = net
            .and_then(|i| self.network_uids.get(i))
            .unwrap_or(&self.internet_uid)
            .clone();
        Request::new(
            entry.uid.clone(),
            self.action.clone(),
            resource,
            context,
            None,
        )
        .map_err(|e| format!("cannot build request: {e}"))
    }

    fn evaluate(
        &self,
        user: &str,
        net: Option<usize>,
        req: &FlowRequest,
        now: DateTime<Utc>,
        set: &PolicySet,
        reads: ContextReads,
    ) -> Decision {
        let network = self.network_name(net);
        let request = match self.request(user, net, req, now, reads) {
            Ok(r) => r,
            Err(e) => return deny_with_error(network, e),
        };
        let response = self.authorizer.is_authorized(&request, set, &self.entities);
        let diagnostics = response.diagnostics();
        let mut errors: Vec<String> = diagnostics.errors().map(|e| e.to_string()).collect();
        errors.sort();
        // The one deliberate difference from plain Cedar: a forbid that errored denies,
        // and is named among the deciding policies.
        let failed_forbids: BTreeSet<String> = diagnostics
            .errors()
            .map(|e| match e {
                cedar_policy::AuthorizationError::PolicyEvaluationError(e) => {
                    e.policy_id().to_string()
                }
            })
            .filter(|id| self.bundle.policy(id).is_some_and(|p| p.effect == "forbid"))
            .collect();
        if !failed_forbids.is_empty() {
            let forbids: BTreeSet<String> = if response.decision() == cedar_policy::Decision::Deny {
                diagnostics.reason().map(|id| id.to_string()).collect()
            } else {
                BTreeSet::new()
            };
            return Decision {
                allowed: false,
                policy_ids: forbids.union(&failed_forbids).cloned().collect(),
                network,
                errors,
            };
        }
        Decision {
            allowed: response.decision() == cedar_policy::Decision::Allow,
            policy_ids: diagnostics
                .reason()
                .map(|id| id.to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            network,
            errors,
        }
    }
}

pub(crate) fn user_entity(u: &Principal) -> Result<Entity, EntitiesError> {
    let parents: HashSet<EntityUid> = u.groups.iter().map(|g| uid("Group", g)).collect();
    Entity::new(
        uid("User", &u.name),
        std::collections::HashMap::from([
            (
                "email".to_string(),
                RestrictedExpression::new_string(u.email.clone()),
            ),
            ("tags".to_string(), string_set(&u.tags)),
        ]),
        parents,
    )
    .map_err(|e| EntitiesError(format!("user {:?}: {e}", u.name)))
}

/// The request with IPv4-mapped addresses unmapped, when it has any.
fn canonical(req: &FlowRequest) -> Option<FlowRequest> {
    let (dst, src) = (req.dst_ip.to_canonical(), req.src_ip.to_canonical());
    (dst != req.dst_ip || src != req.src_ip).then(|| FlowRequest {
        dst_ip: dst,
        src_ip: src,
        ..req.clone()
    })
}

/// `context.auth_age_secs`: seconds from the device's last sign-on to `now`, never
/// negative (a sign-on "in the future" by clock skew is age 0).
fn auth_age_secs(req: &FlowRequest, now: DateTime<Utc>) -> i64 {
    now.timestamp()
        .saturating_sub(req.authenticated_at.max(0))
        .max(0)
}

fn unknown_user(network: String, user: &str) -> Decision {
    deny_with_error(network, format!("unknown user {user:?}"))
}

fn deny_with_error(network: String, error: String) -> Decision {
    let mut d = Decision::deny_default(network);
    d.errors.push(error);
    d
}
