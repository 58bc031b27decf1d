//! The policy set in a cluster. The set lives in the cluster's database; a node's
//! `[policy] dir` is its local copy: at start the node adopts the cluster's set (or, the
//! first node, seeds the cluster with its directory), `PUT /policies` on any node stores
//! the set in the database and every node (this one at once, the others from the change
//! log) writes it into its directory and applies it. SIGHUP does not re-read the
//! directory in a cluster: a local edit would make one node decide differently.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use axum::http::StatusCode;
use portcullis_control::Command;
use portcullis_identity::OtherChange;
use portcullis_policy::Sources;
use tokio::sync::mpsc;

use crate::api::ApiError;
use crate::policy_api::{build, if_match, read_dir, write_files, PolicyFiles};

/// This node's side of the cluster's policy set.
pub struct ClusterPolicy {
    target: portcullis_cluster::Target,
    node_id: String,
    /// The version this node runs.
    running: Mutex<String>,
    /// Serialises replacements on this node (the API's and the log's).
    pub(crate) lock: Arc<tokio::sync::Mutex<()>>,
}

impl ClusterPolicy {
    pub fn new(target: portcullis_cluster::Target, node_id: &str, running: String) -> Self {
        ClusterPolicy {
            target,
            node_id: node_id.to_string(),
            running: Mutex::new(running),
            lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn running(&self) -> String {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn ran(&self, version: &str) {
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = version.to_string();
    }

    /// Stores `files` as the cluster's set (if its version matches `expected`): 412 when
    /// it does not, 503 when the database cannot be reached (nothing changed).
    pub(crate) async fn store(
        &self,
        files: &PolicyFiles,
        expected: Option<&str>,
    ) -> Result<(), ApiError> {
        let unavailable = |e: portcullis_cluster::ClusterError| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the cluster database cannot store the policy set, nothing was changed: {e}"
                ),
            )
        };
        let json = serde_json::to_value(files)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let mut client = self.target.connect().await.map_err(unavailable)?;
        let matches = expected.map(|e| move |v: &str| if_match(e, v));
        let stored = portcullis_cluster::policy::replace(
            &mut client,
            &self.node_id,
            matches
                .as_ref()
                .map(|f| f as &(dyn Fn(&str) -> bool + Sync)),
            &files.version(),
            &json,
        )
        .await
        .map_err(unavailable)?;
        match stored {
            Ok(number) => {
                tracing::info!(version = %files.version(), change = number, "policy set stored in the cluster");
                Ok(())
            }
            Err(portcullis_cluster::policy::Refused::Changed { current }) => Err(ApiError(
                StatusCode::PRECONDITION_FAILED,
                format!(
                    "the cluster's policy set changed: its version is {current}, not {}",
                    expected.unwrap_or_default()
                ),
            )),
        }
    }
}

/// Applies the policy changes of the log, in order, until the identity store stops.
pub(crate) async fn follow(
    policy: Arc<ClusterPolicy>,
    dir: PathBuf,
    commands: mpsc::Sender<Command>,
    mut changes: mpsc::UnboundedReceiver<OtherChange>,
) {
    while let Some(change) = changes.recv().await {
        if change.kind != portcullis_cluster::policy::KIND {
            continue;
        }
        let Some(version) = change
            .body
            .get("version")
            .and_then(|v| v.as_str())
            .map(str::to_string)
        else {
            tracing::error!(
                change = change.number,
                "a policy change without a version: ignored"
            );
            continue;
        };
        let files: PolicyFiles =
            match serde_json::from_value(change.body.get("files").cloned().unwrap_or_default()) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(
                        change = change.number,
                        "a policy change this node cannot read, the previous set stays: {e}"
                    );
                    continue;
                }
            };
        let _guard = policy.lock.lock().await;
        if policy.running() == version {
            continue;
        }
        match apply(&dir, &files, &commands).await {
            Ok(flows_cut) => {
                policy.ran(&version);
                tracing::info!(%version, change = change.number, flows_cut, "policy set from the cluster applied");
            }
            Err(e) => {
                tracing::error!(%version, change = change.number, "the cluster's policy set was not applied here, the previous one stays: {}", e.1)
            }
        }
    }
}

async fn apply(
    dir: &Path,
    files: &PolicyFiles,
    commands: &mpsc::Sender<Command>,
) -> Result<usize, ApiError> {
    // Sites were checked by the node that took the PUT; every node applies the same set
    // (one with a differing [[cluster.sites]] warned at start).
    let bundle = match build(dir, files, Vec::new()).await? {
        Ok(b) => b,
        Err(problems) => {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("it does not validate here: {problems:?}"),
            ))
        }
    };
    let previous = read_dir(dir.to_path_buf()).await?;
    write_files(dir, files, &previous).await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let gone = || {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is stopping".into(),
        )
    };
    commands
        .send(Command::ApplyPolicy(Arc::new(bundle), tx))
        .await
        .map_err(|_| gone())?;
    match rx.await.map_err(|_| gone())? {
        Ok(n) => Ok(n),
        Err(reason) => {
            write_files(dir, &previous, files).await?;
            Err(ApiError(StatusCode::CONFLICT, reason))
        }
    }
}

/// At a node's start, before the policy set is loaded: the first node seeds the cluster
/// with its `[policy] dir`; every node then writes the cluster's set into its directory.
/// Returns the version the directory now holds.
pub fn adopt(
    target: &portcullis_cluster::Target,
    node_id: &str,
    dir: &Path,
) -> anyhow::Result<String> {
    let local = Sources::read(dir)
        .map(|s| PolicyFiles::from_sources(&s))
        .map_err(|e| anyhow!("policy directory {}: {e}", dir.display()))?;
    let (target, node_id, dir) = (target.clone(), node_id.to_string(), dir.to_path_buf());
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> anyhow::Result<String> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let client = target.connect().await?;
                    portcullis_cluster::schema::require_current(&client).await?;
                    let json = serde_json::to_value(&local)?;
                    let held = portcullis_cluster::policy::seed(&client, &node_id, &local.version(), &json).await?;
                    let files: PolicyFiles = serde_json::from_value(held.get("files").cloned().unwrap_or_default())
                        .map_err(|e| anyhow!("the cluster's policy set cannot be read by this gateway: {e}"))?;
                    if files != local {
                        write_files(&dir, &files, &local)
                            .await
                            .map_err(|e| anyhow!("policy directory {}: {}", dir.display(), e.1))?;
                        tracing::info!(dir = %dir.display(), version = %files.version(), "policy directory replaced with the cluster's set");
                    }
                    Ok(files.version())
                })
            })
            .join()
            .map_err(|_| anyhow!("adopting the cluster's policy set: the thread panicked"))?
    })
}
