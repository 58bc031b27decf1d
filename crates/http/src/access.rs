//! Just-in-time access at run time: the [`Book`] of requests this node holds, how each
//! decision is checked (the user exists, the network is declared, the approver is allowed
//! by the `approve_access` policies and is not the requester), stored (the identity
//! store, cluster-wide), audited, and handed to the packet loop as grants.
//!
//! Order of a decision: the record is stored (503 and nothing changed when the store
//! cannot take it), applied here, the loop's grants replaced (a revocation's flows are
//! cut before the answer), then its audit event written; the answer waits for all of it.
//! Other nodes read the record from the change log ([`AccessService::follow`]) and
//! replace their own loop's grants; only the node that decided records the event.
//!
//! A grant's end needs nothing from here: every loop cuts at the end by its own clock.
//! The expiry task ([`AccessService::spawn_expiry`], where the cluster's lease is held)
//! only records `expired` in the store and the trail, and drops the grant from the set.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use portcullis_access::{AccessError, AccessRequest, Book, NewRequest, KIND};
use portcullis_control::{Command, UserRow};
use portcullis_identity::{Identity, OtherChange};
use portcullis_model::Principal;
use tokio::sync::{mpsc, oneshot};

use crate::api::ApiError;

/// This node's access requests and the way to change them.
pub struct AccessService {
    book: Mutex<Book>,
    identity: Arc<Identity>,
    commands: mpsc::Sender<Command>,
    /// Serialises plan → store → apply on this node (two approvals of one request on two
    /// nodes: the second one's plan sees the first once the log brought it; the store's
    /// revision check keeps the older from winning).
    writing: tokio::sync::Mutex<()>,
    /// Woken when a request changes, so the expiry task re-arms.
    changed: tokio::sync::Notify,
}

impl std::fmt::Debug for AccessService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessService").finish_non_exhaustive()
    }
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> ApiError {
        let status = match &e {
            AccessError::Invalid(_) => StatusCode::BAD_REQUEST,
            AccessError::NotFound(_) => StatusCode::NOT_FOUND,
            AccessError::WrongState { .. } | AccessError::TooMany(_) => StatusCode::CONFLICT,
            AccessError::OwnRequest { .. } => StatusCode::FORBIDDEN,
        };
        ApiError(status, e.to_string())
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{what}, nothing was changed: {e}"),
    )
}

fn gone() -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "the packet loop is not running".into(),
    )
}

/// A new request's id: `ar-` and 12 hex digits of a random UUID (unique cluster-wide
/// for any realistic number of requests; the store refuses nothing, the book does).
fn new_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("ar-{}", u.get(..12).unwrap_or(&u))
}

async fn stored(identity: &Identity) -> anyhow::Result<Book> {
    let records = identity
        .records(KIND)
        .await
        .map_err(|e| anyhow::anyhow!("reading the access requests: {e}"))?;
    Ok(parse_book(records))
}

fn parse_book(records: Vec<serde_json::Value>) -> Book {
    let mut parsed = Vec::new();
    for r in records {
        match serde_json::from_value::<AccessRequest>(r) {
            Ok(r) => parsed.push(r),
            // Fail closed: a record this node cannot read grants nothing here.
            Err(e) => {
                tracing::error!("an access request record this node cannot read is ignored: {e}")
            }
        }
    }
    Book::from_records(parsed)
}

/// The grants in force in the identity store, for the packet loop's start (it holds
/// them before its first packet). Runs on the data plane's runtime: a cluster node
/// answers from the snapshot it read at open.
pub async fn stored_grants(identity: &Identity) -> anyhow::Result<Vec<portcullis_model::Grant>> {
    let records = identity
        .startup_records(KIND)
        .await
        .map_err(|e| anyhow::anyhow!("reading the access requests: {e}"))?;
    Ok(parse_book(records).grants(Utc::now()))
}

impl AccessService {
    /// Reads the stored requests (the loop got their grants at its start). Call it
    /// after subscribing to the change log, so that nothing committed in between is
    /// missed (applying a record twice changes nothing).
    pub async fn start(
        identity: Arc<Identity>,
        commands: mpsc::Sender<Command>,
    ) -> anyhow::Result<Arc<AccessService>> {
        Ok(Arc::new(AccessService {
            book: Mutex::new(stored(&identity).await?),
            identity,
            commands,
            writing: tokio::sync::Mutex::new(()),
            changed: tokio::sync::Notify::new(),
        }))
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every request, newest first; only `user`'s (as requester) when given.
    pub fn list(&self, user: Option<&str>) -> Vec<AccessRequest> {
        self.book()
            .list()
            .into_iter()
            .filter(|r| user.is_none_or(|u| r.user == u))
            .cloned()
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<AccessRequest> {
        self.book().get(id).cloned()
    }

    async fn push_grants(&self) -> Result<usize, ApiError> {
        let grants = self.book().grants(Utc::now());
        portcullis_control::ask(&self.commands, |tx| Command::Grants(grants, tx))
            .await
            .map_err(|_| gone())
    }

    async fn users(&self) -> Result<Vec<UserRow>, ApiError> {
        portcullis_control::ask(&self.commands, Command::Users)
            .await
            .map_err(|_| gone())
    }

    async fn principal(&self, name: &str) -> Result<Principal, ApiError> {
        let users = self.users().await?;
        let row = users
            .into_iter()
            .find(|u| u.name == name && u.active)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no active user {name:?}")))?;
        Ok(Principal {
            name: row.name,
            email: String::new(),
            groups: row.groups,
            tags: row.tags,
        })
    }

    async fn bundle(&self) -> Result<Arc<portcullis_policy::PolicyBundle>, ApiError> {
        portcullis_control::ask(&self.commands, Command::Policy)
            .await
            .map_err(|_| gone())
    }

    /// Stores, applies, hands the grants over (when they changed) and audits `next`.
    async fn commit(&self, next: AccessRequest) -> Result<AccessRequest, ApiError> {
        let body = serde_json::to_value(&next)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        self.identity
            .save_record(KIND, &next.id, &body)
            .await
            .map_err(|e| unavailable("the identity store cannot keep the access request", e))?;
        let grants_changed = self.book().apply(next.clone());
        self.changed.notify_one();
        if grants_changed {
            let cut = self.push_grants().await?;
            if cut > 0 {
                tracing::info!(request = %next.id, flows_cut = cut, "access: flows cut");
            }
        }
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Report(next.event(), Some(tx)))
            .await
            .map_err(|_| gone())?;
        if !matches!(rx.await, Ok(true)) {
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "access request {} is {} but the audit trail could not record it",
                    next.id, next.state
                ),
            ));
        }
        tracing::info!(request = %next.id, user = %next.user, network = %next.network, state = %next.state, "access request");
        Ok(next)
    }

    /// Files a request for `new.user`: the user must be active, the network declared and
    /// `dst` inside it.
    pub(crate) async fn request(&self, new: NewRequest) -> Result<AccessRequest, ApiError> {
        self.principal(&new.user).await?;
        let bundle = self.bundle().await?;
        let Some(network) = bundle.networks().iter().find(|n| n.name == new.network) else {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("network {:?} is not declared in networks.toml", new.network),
            ));
        };
        if let Some(dst) = &new.dst {
            if !portcullis_access::dst_within(dst, &network.cidrs) {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "destination {dst} is not inside network {} ({})",
                        network.name,
                        network
                            .cidrs
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        let _w = self.writing.lock().await;
        let next = self.book().plan_request(new, new_id(), Utc::now())?;
        self.commit(next).await
    }

    /// Approval by `approver`: refused for the requester, and unless the
    /// `approve_access` policies allow `approver` for the network.
    pub(crate) async fn approve(
        &self,
        id: &str,
        approver: &str,
        sign_on: portcullis_model::SignOn,
    ) -> Result<AccessRequest, ApiError> {
        let _w = self.writing.lock().await;
        let policy_ids = self.check_approver(id, approver, sign_on).await?;
        let next = self
            .book()
            .plan_approve(id, approver, policy_ids, Utc::now())?;
        self.commit(next).await
    }

    /// Refusal by `approver`, who must be allowed to approve it.
    pub(crate) async fn deny(
        &self,
        id: &str,
        approver: &str,
        reason: &str,
        sign_on: portcullis_model::SignOn,
    ) -> Result<AccessRequest, ApiError> {
        let _w = self.writing.lock().await;
        self.check_approver(id, approver, sign_on).await?;
        let next = self.book().plan_deny(id, approver, reason, Utc::now())?;
        self.commit(next).await
    }

    /// Withdraws a request or a grant (an administrator, or the requester for their own).
    pub(crate) async fn revoke(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<AccessRequest, ApiError> {
        let _w = self.writing.lock().await;
        let next = self.book().plan_revoke(id, actor, reason, Utc::now())?;
        self.commit(next).await
    }

    /// The `approve_access` permits that let `approver` decide `id`, or why not.
    async fn check_approver(
        &self,
        id: &str,
        approver: &str,
        sign_on: portcullis_model::SignOn,
    ) -> Result<Vec<String>, ApiError> {
        let request = self.book().check_decidable(id, approver)?.clone();
        let approver_p = self.principal(approver).await?;
        let requester = match self.principal(&request.user).await {
            Ok(p) => p,
            // A requester who left since gets nothing, whoever approves.
            Err(_) => {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!(
                        "access request {id}: its requester {} is no longer an active user",
                        request.user
                    ),
                ))
            }
        };
        let bundle = self.bundle().await?;
        let d = portcullis_policy::approval::may_approve(
            &bundle,
            &approver_p,
            &portcullis_policy::approval::Ask {
                requester: &requester,
                network: &request.network,
                dst: request.dst.map(|d| (d.network(), d.prefix_len())),
                port: request.port.map(|p| (p.port, p.protocol)),
                duration_secs: request.duration_secs,
                sign_on,
            },
            Utc::now(),
        );
        if d.allowed {
            return Ok(d.policy_ids);
        }
        let why = if !d.errors.is_empty() {
            d.errors.join("; ")
        } else if d.policy_ids.is_empty() {
            "no approve_access policy permits it".to_string()
        } else {
            format!("forbidden by {}", d.policy_ids.join(", "))
        };
        Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "{approver} may not decide access request {id} ({} to {}): {why}",
                request.user, request.network
            ),
        ))
    }

    /// The requests that `approver` could decide now (pending, not their own, allowed by
    /// the approval policies).
    pub(crate) async fn decidable_by(
        &self,
        approver: &str,
        sign_on: portcullis_model::SignOn,
    ) -> Vec<AccessRequest> {
        let pending: Vec<AccessRequest> = self
            .list(None)
            .into_iter()
            .filter(|r| r.state == portcullis_access::State::Requested && r.user != approver)
            .collect();
        let mut out = Vec::new();
        for r in pending {
            if self.check_approver(&r.id, approver, sign_on).await.is_ok() {
                out.push(r);
            }
        }
        out
    }

    /// Applies the access records other nodes stored (and this node's own, read back),
    /// in log order, until the identity store stops.
    pub async fn follow(self: Arc<Self>, mut changes: mpsc::UnboundedReceiver<OtherChange>) {
        while let Some(change) = changes.recv().await {
            if change.kind != KIND {
                continue;
            }
            let r: AccessRequest = match serde_json::from_value(change.body) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(
                        change = change.number,
                        "an access request this node cannot read is ignored: {e}"
                    );
                    continue;
                }
            };
            let changed = self.book().apply(r);
            self.changed.notify_one();
            if changed {
                if let Err(e) = self.push_grants().await {
                    tracing::error!("access grants from the cluster not applied: {}", e.1);
                }
            }
        }
    }

    /// Records what lapsed (`expired`), where `lease` is held (everywhere on a single
    /// node). The loops have cut the grant's flows at its end already.
    pub fn spawn_expiry(self: Arc<Self>, lease: Option<tokio::sync::watch::Receiver<bool>>) {
        tokio::spawn(async move {
            loop {
                let next = self.book().next_expiry();
                let wait = next
                    .map(|t| (t - Utc::now()).to_std().unwrap_or(Duration::ZERO))
                    .unwrap_or(Duration::from_secs(60))
                    .min(Duration::from_secs(60));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.changed.notified() => continue,
                }
                if !lease.as_ref().is_none_or(|held| *held.borrow()) {
                    // Another node records it; this one only drops what ended.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                if let Err(e) = self.expire(Utc::now()).await {
                    tracing::error!("recording expired access requests: {}", e.1);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
    }

    async fn expire(&self, now: DateTime<Utc>) -> Result<(), ApiError> {
        let _w = self.writing.lock().await;
        let lapsed = self.book().plan_expiry(now);
        for r in lapsed {
            self.commit(r).await?;
        }
        Ok(())
    }
}
