//! The gateway's control inputs: policy bundles, identity changes and revocations,
//! device changes, reports and session kills. Each cuts what it takes away at once
//! (flows with resets, sessions by dropping their keys) and reports it.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use portcullis_model::{DeviceChange, Event, IdentityChange};
use portcullis_policy::PolicyBundle;

use super::{b64, ControlError, Gateway, IdentityOutcome, PeerSpec};
use crate::flow::PeerId;

impl Gateway {
    /// Applies a new, fully validated policy bundle; established flows are re-decided
    /// now and the denied ones cut.
    pub fn handle_policy_bundle(
        &mut self,
        now: Instant,
        bundle: Arc<PolicyBundle>,
    ) -> Result<usize, ControlError> {
        let cut = self.enforcer.handle_policy_bundle(now, bundle)?;
        self.flush_injected();
        self.drain_enforcer_events();
        Ok(cut)
    }

    /// Replaces the temporary grants (approved access requests in force); the flows of
    /// users whose grants changed are decided again now and the denied ones cut, with
    /// resets. Each grant's end is this loop's own timer ([`Gateway::handle_timeout`]):
    /// it cuts on time even when the control plane is busy or its database unreachable.
    pub fn handle_grants(&mut self, now: Instant, grants: Vec<portcullis_model::Grant>) -> usize {
        let cut = self.enforcer.handle_grants(now, grants);
        self.flush_injected();
        self.drain_enforcer_events();
        cut
    }

    /// Reports a policy set that failed validation; the running one stays in force.
    pub fn handle_policy_rejected(&mut self, errors: Vec<String>) {
        self.events.push_back(Event::PolicyRejected { errors });
    }

    /// Applies what an identity source changed, in this one call: a user that exists
    /// and is active gets its devices enabled and its live flows re-decided at once (a lost
    /// group cuts the flows it no longer allows); a user without access any more loses
    /// every session and flow, its devices are disabled (their WireGuard sessions dropped,
    /// handshakes ignored), and a `user_revoked` event records the latency from
    /// `requested` (when the request arrived) to now.
    pub fn handle_identity_change(
        &mut self,
        now: Instant,
        change: IdentityChange,
        requested: Instant,
        requested_at: DateTime<Utc>,
    ) -> Result<IdentityOutcome, ControlError> {
        self.drain_enforcer_events();
        self.events.push_back(Event::IdentityChanged {
            source: change.source.clone(),
            user: change.user.clone(),
            change: change.kind.as_str().into(),
            groups: change
                .principal
                .as_ref()
                .map(|p| p.groups.clone())
                .unwrap_or_default(),
        });
        match change.principal {
            Some(principal) => {
                let name = principal.name.clone();
                match self.enforcer.handle_user_upsert(now, principal) {
                    Ok(cut) => {
                        self.flush_injected();
                        for peer in self.peers.iter_mut().flatten() {
                            if *peer.user == *name {
                                peer.enabled = true;
                            }
                        }
                        Ok(IdentityOutcome {
                            flows_cut: cut as u64,
                            ..IdentityOutcome::default()
                        })
                    }
                    // Fail closed: identity data the policy entities refuse (a schema
                    // that requires attributes the source does not send) revokes the user
                    // rather than leaving the old access in place.
                    Err(e) => {
                        tracing::error!(user = %name, "identity change refused by the policy entities ({e}); revoking the user");
                        let mut outcome =
                            self.revoke_user(now, name, "gateway".into(), requested, requested_at)?;
                        outcome.refused = Some(e.to_string());
                        Ok(outcome)
                    }
                }
            }
            None => self.revoke_user(now, change.user, change.source, requested, requested_at),
        }
    }

    /// Cuts `user` at once, ahead of the identity store's commit of the change that takes
    /// their access away (the commit's fsync is not on the revocation's path). The
    /// committed change that follows records `identity_changed` and finds nothing left
    /// to cut. Fails closed: if the commit then fails, the user stays cut here.
    pub fn handle_revocation(
        &mut self,
        now: Instant,
        user: String,
        source: String,
        requested: Instant,
        requested_at: DateTime<Utc>,
    ) -> Result<IdentityOutcome, ControlError> {
        self.drain_enforcer_events();
        self.revoke_user(now, user, source, requested, requested_at)
    }

    /// The one revocation path (deactivation, deletion, `users disable` of a configuration
    /// user, a refused change): every device of the user disabled, every session and flow
    /// cut (resets injected), the user removed from the policy entities, `user_revoked`
    /// recorded with the latency from `requested`.
    fn revoke_user(
        &mut self,
        now: Instant,
        user: String,
        source: String,
        requested: Instant,
        requested_at: DateTime<Utc>,
    ) -> Result<IdentityOutcome, ControlError> {
        let mut outcome = IdentityOutcome::default();
        let mut enabled = false;
        let slots: Vec<PeerId> = self
            .peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().filter(|p| *p.user == *user).map(|p| (i, p)))
            .map(|(i, p)| {
                enabled |= p.enabled;
                PeerId(i as u32)
            })
            .collect();
        // Already without access (cut early, see `handle_revocation`, or never granted):
        // nothing to cut, and no second `user_revoked`.
        if !enabled && self.enforcer.engine().user(&user).is_none() {
            return Ok(outcome);
        }
        for id in slots {
            let (sessions, flows) = self.disable_peer(now, id, "revoked");
            outcome.sessions_cut += sessions;
            outcome.flows_cut += flows;
        }
        // Removing the user denies its flows even if the entities refuse the removal:
        // the engine forgets the user first.
        let removed = self.enforcer.handle_user_removed(now, &user);
        outcome.flows_cut += *removed.as_ref().unwrap_or(&0) as u64;
        self.flush_injected();
        self.drain_enforcer_events();
        outcome.latency = now.saturating_duration_since(requested);
        self.events.push_back(Event::UserRevoked {
            user,
            source,
            requested_at,
            applied_at: self.enforcer.wall(now),
            latency_us: outcome.latency.as_micros() as u64,
            sessions_cut: outcome.sessions_cut,
            flows_cut: outcome.flows_cut,
        });
        removed?;
        Ok(outcome)
    }

    /// Adds or removes a registered device's peer. A new key is recorded as
    /// `key_rotated` (with the key it replaces, if any) before its `peer_added`; a removed
    /// one cuts its flows and session (`peer_removed` with the reason: `expired`,
    /// `rotated`, `removed`, `user deleted`). Removing an unknown key does nothing. A new
    /// sign-on of a device re-decides its open flows with it at once.
    pub fn handle_device_change(
        &mut self,
        now: Instant,
        change: DeviceChange,
    ) -> Result<(), ControlError> {
        match change {
            DeviceChange::Added {
                user,
                public_key,
                addresses,
                routes,
                persistent_keepalive,
                expires_at,
                previous,
                sign_on,
            } => {
                if let Some(prev) = previous.as_ref().and_then(|k| self.by_key.get(k).copied()) {
                    // The new key takes over the router's subnets (see the registry).
                    self.routes.retain(|(_, owner)| *owner != prev);
                    if let Some(p) = self.peers.get_mut(prev.0 as usize).and_then(Option::as_mut) {
                        p.spec.routes.clear();
                    }
                }
                self.events.push_back(Event::KeyRotated {
                    user: user.clone(),
                    device: b64(&public_key),
                    previous: previous.as_ref().map(b64),
                    expires_at: Some(expires_at),
                });
                self.handle_peer_add(PeerSpec {
                    user,
                    public_key,
                    addresses,
                    routes,
                    persistent_keepalive,
                    sign_on,
                })?;
            }
            DeviceChange::SignedOn {
                public_key,
                sign_on,
            } => {
                if let Some(id) = self.by_key.get(&public_key).copied() {
                    if let Some(peer) = self.peers.get_mut(id.0 as usize).and_then(Option::as_mut) {
                        peer.spec.sign_on = sign_on;
                    }
                    self.enforcer.handle_sign_on(now, id, sign_on);
                    // The resets of the flows it cut go out through the tunnel now.
                    self.flush_injected();
                }
            }
            DeviceChange::Removed { public_key, reason } => {
                self.handle_peer_remove(now, &public_key, &reason);
            }
        }
        Ok(())
    }

    /// Records an event reported by something outside the core (an identity source's
    /// refusal, an administrator's action), in order with the core's own events.
    pub fn handle_report(&mut self, event: Event) {
        self.events.push_back(event);
    }

    /// Ends one session: its flows are cut and its WireGuard keys dropped. The device may
    /// connect again if its user still has access. Returns whether the session existed.
    pub fn handle_session_kill(&mut self, now: Instant, session_id: u64, reason: &str) -> bool {
        let Some(slot) = self.peers.iter().position(|p| {
            p.as_ref()
                .and_then(|p| p.session.as_ref())
                .is_some_and(|s| s.id == session_id)
        }) else {
            return false;
        };
        self.cut_peer(now, PeerId(slot as u32), reason);
        true
    }

    /// Cuts a peer's flows and session and stops it from handshaking. Returns (sessions,
    /// flows) cut.
    fn disable_peer(&mut self, now: Instant, id: PeerId, reason: &str) -> (u64, u64) {
        let cut = self.cut_peer(now, id, reason);
        if let Some(peer) = self.peers.get_mut(id.0 as usize).and_then(Option::as_mut) {
            peer.enabled = false;
        }
        cut
    }

    /// Cuts a peer's flows (resets first, through the tunnel), ends its session and drops
    /// its WireGuard keys. Returns (sessions, flows) cut.
    fn cut_peer(&mut self, now: Instant, id: PeerId, reason: &str) -> (u64, u64) {
        let flows = self.enforcer.handle_peer_removed(now, id) as u64;
        // Resets go out through the tunnel before its keys are dropped.
        self.flush_injected();
        let had_session = self
            .peers
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .is_some_and(|p| p.session.is_some());
        self.end_session(id, now, reason);
        self.reset_tunn(id);
        (u64::from(had_session), flows)
    }

    /// Replaces a peer's WireGuard state with a fresh one: the session keys are gone, so
    /// nothing sent under them is accepted any more.
    fn reset_tunn(&mut self, id: PeerId) {
        let Some((spec, index)) = self
            .peers
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .map(|p| (p.spec.clone(), p.index))
        else {
            return;
        };
        let tunn = self.new_tunn(&spec, index);
        if let Some(peer) = self.peers.get_mut(id.0 as usize).and_then(Option::as_mut) {
            peer.tunn = tunn;
            peer.endpoint = None;
        }
    }
}
