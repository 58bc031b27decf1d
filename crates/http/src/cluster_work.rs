//! The control plane's once-per-cluster work that needs more than the cluster crate
//! knows: the LDAP consumer's mirror saved in the database ([`ClusterMirror`]), the
//! dead nodes recorded in the audit trail ([`record_repairs`]), and this node's signed
//! audit checkpoints copied into the database ([`copy_checkpoints`]).

use std::sync::Arc;
use std::time::Duration;

use portcullis_cluster::repair::DeadNode;
use portcullis_cluster::shared::Shared;
use portcullis_cluster::sync_state;
use portcullis_cluster::Target;
use portcullis_control::Command;
use portcullis_ldap::{Kind, MirrorDelta, MirrorState};
use portcullis_ldap_sync::{BoxFuture, MirrorStore};
use portcullis_model::Event;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The LDAP consumer's mirror in `sync_state` / `sync_entries`, on a connection of its
/// own (a save is a transaction).
pub struct ClusterMirror {
    target: Target,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

/// The `cookies` JSON of a saved LDAP mirror.
#[derive(Default, Serialize, Deserialize)]
struct Cookies {
    users: Option<Vec<u8>>,
    groups: Option<Vec<u8>>,
}

/// How long a load or save may take before the consumer goes on without it.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(15);

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Users => "users",
        Kind::Groups => "groups",
    }
}

impl ClusterMirror {
    pub fn new(target: Target) -> ClusterMirror {
        ClusterMirror {
            target,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The connection, opened (again) if needed; held for one load or save.
    async fn connected(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<tokio_postgres::Client>>, String> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            let c = tokio::time::timeout(MIRROR_TIMEOUT, self.target.connect())
                .await
                .map_err(|_| format!("postgresql did not answer within {MIRROR_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())?;
            *slot = Some(c);
        }
        Ok(slot)
    }
}

/// A result after a bounded call: a timeout also drops the connection (it may hang on
/// a server that vanished).
fn settle<T>(
    slot: &mut Option<tokio_postgres::Client>,
    r: Result<Result<T, portcullis_cluster::ClusterError>, tokio::time::error::Elapsed>,
) -> Result<T, String> {
    match r {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => {
            *slot = None;
            Err(format!(
                "postgresql did not answer within {MIRROR_TIMEOUT:?}"
            ))
        }
    }
}

impl MirrorStore for ClusterMirror {
    fn load<'a>(&'a self, source: &'a str) -> BoxFuture<'a, Result<Option<MirrorState>, String>> {
        Box::pin(async move {
            let mut slot = self.connected().await?;
            let Some(c) = slot.as_mut() else {
                return Err("no connection".into());
            };
            let r = tokio::time::timeout(MIRROR_TIMEOUT, sync_state::load(c, source)).await;
            let saved = settle(&mut slot, r)?;
            let Some(saved) = saved else {
                return Ok(None);
            };
            let cookies: Cookies = serde_json::from_value(saved.cookies)
                .map_err(|e| format!("the saved cookies: {e}"))?;
            let mut entries = Vec::with_capacity(saved.entries.len());
            for (kind, uuid, entry) in saved.entries {
                let kind = match kind.as_str() {
                    "users" => Kind::Users,
                    "groups" => Kind::Groups,
                    other => return Err(format!("a saved entry of unknown kind {other:?}")),
                };
                let entry = serde_json::from_value(entry)
                    .map_err(|e| format!("the saved entry {uuid}: {e}"))?;
                entries.push((kind, uuid, entry));
            }
            Ok(Some(MirrorState {
                users_cookie: cookies.users,
                groups_cookie: cookies.groups,
                entries,
            }))
        })
    }

    fn save<'a>(
        &'a self,
        source: &'a str,
        delta: &'a MirrorDelta,
        replace: bool,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let cookies = serde_json::to_value(Cookies {
                users: delta.users_cookie.clone(),
                groups: delta.groups_cookie.clone(),
            })
            .map_err(|e| e.to_string())?;
            let mut upserts = Vec::with_capacity(delta.upserts.len());
            for (k, u, e) in &delta.upserts {
                upserts.push((
                    kind_name(*k).to_string(),
                    u.clone(),
                    serde_json::to_value(e).map_err(|e| e.to_string())?,
                ));
            }
            let d = sync_state::Delta {
                cookies,
                replace,
                upserts,
                removes: delta
                    .removes
                    .iter()
                    .map(|(k, u)| (kind_name(*k).to_string(), u.clone()))
                    .collect(),
            };
            let mut slot = self.connected().await?;
            let Some(c) = slot.as_mut() else {
                return Err("no connection".into());
            };
            let r = tokio::time::timeout(MIRROR_TIMEOUT, sync_state::save(c, source, &d)).await;
            settle(&mut slot, r)
        })
    }
}

/// Records each dead node in this node's audit trail (durably, before the claim
/// stands); a claim whose event could not be written is given back, to be made again.
pub async fn record_repairs(
    mut dead: mpsc::UnboundedReceiver<DeadNode>,
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
) {
    while let Some(d) = dead.recv().await {
        let event = Event::NodeDown {
            node: d.node_id.clone(),
            started: d.started,
            last_heartbeat: d.last_heartbeat,
            sessions: u64::try_from(d.sessions).unwrap_or(0),
            flows: u64::try_from(d.flows).unwrap_or(0),
            reason: d.reason.to_string(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let durable = commands
            .send(Command::Report(event, Some(tx)))
            .await
            .is_ok()
            && matches!(
                tokio::time::timeout(Duration::from_secs(10), rx).await,
                Ok(Ok(true))
            );
        if durable {
            tracing::info!(node = %d.node_id, reason = d.reason, "cluster: node_down recorded");
            continue;
        }
        tracing::error!(node = %d.node_id, "cluster: node_down could not be recorded; giving the claim back");
        match shared.client().await {
            Ok(c) => {
                if let Err(e) = portcullis_cluster::repair::unclaim(&c, &d).await {
                    tracing::error!("cluster: repair claim not given back: {e}");
                }
            }
            Err(e) => tracing::error!("cluster: repair claim not given back: {e}"),
        }
    }
}

/// Copies each signed checkpoint the audit writer hands over into the cluster database
/// (a third copy, beside the trail and `checkpoints.jsonl`). The writer never waits: its
/// channel is bounded and a full one drops the copy (logged there). While the database
/// is unreachable the newest 1,000 wait here and are written once it answers.
pub(crate) fn copy_checkpoints(
    rx: std::sync::mpsc::Receiver<portcullis_audit::checkpoint::SignedCheckpoint>,
    shared: Arc<Shared>,
) {
    let (tx, mut arx) = mpsc::channel(64);
    // The writer's channel is a std one: a thread of its own turns it into a task's.
    let bridged = std::thread::Builder::new()
        .name("checkpoint-copy".into())
        .spawn(move || {
            while let Ok(cp) = rx.recv() {
                if tx.blocking_send(cp).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = bridged {
        tracing::error!("checkpoints are not copied into the cluster database: {e}");
        return;
    }
    tokio::spawn(async move {
        let mut waiting: std::collections::VecDeque<
            portcullis_audit::checkpoint::SignedCheckpoint,
        > = std::collections::VecDeque::new();
        loop {
            if waiting.is_empty() {
                match arx.recv().await {
                    Some(cp) => waiting.push_back(cp),
                    None => return,
                }
            }
            while let Ok(cp) = arx.try_recv() {
                if waiting.len() >= 1000 {
                    waiting.pop_front();
                }
                waiting.push_back(cp);
            }
            let Some(cp) = waiting.front() else { continue };
            let body = serde_json::to_value(cp).unwrap_or_default();
            let written = match shared.client().await {
                Ok(client) => {
                    portcullis_cluster::put_checkpoint(
                        &client,
                        &cp.checkpoint.node,
                        cp.checkpoint.seq,
                        &body,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => {
                    waiting.pop_front();
                }
                Err(e) => {
                    tracing::warn!(
                        waiting = waiting.len(),
                        "audit checkpoint not copied into the cluster database yet: {e}"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}
