//! A node's background work in the cluster, on the control plane's runtime:
//! - the listener: `LISTEN portcullis_changes` on a connection of its own; every
//!   notification, and every (re)connection, makes the node catch up from its last
//!   applied change, so a lost connection or a missed notification leaves no gap;
//! - the heartbeat: every [`BEAT`], this node's row with its sessions, flows and applied
//!   change; the same tick catches up too, a safety net under the notifications; every
//!   minute it also forgets expired one-time values and login sessions.
//!
//! Neither ever blocks the data plane: they reach it only through [`Identity`], whose
//! hand-off is the control channel.

use std::sync::Arc;
use std::time::Duration;

use portcullis_identity::Identity;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::AsyncMessage;

use crate::repair::DeadNode;
use crate::store::{Target, CHANNEL, RECONNECT};
use crate::{Beat, Registry};

/// How often a node heartbeats.
pub const BEAT: Duration = Duration::from_secs(1);

/// Expired one-time values and sessions are purged every this many heartbeats.
const PURGE_EVERY: u64 = 60;

/// What the node tells the registry it is.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub node_id: String,
    pub address: String,
    pub version: String,
}

/// Runs the listener and the heartbeat until the runtime stops. `numbers` reports the
/// node's (sessions, flows); `repairs` receives this node's previous run when it ended
/// without a clean exit (see [`crate::repair`]).
pub fn spawn(
    target: Target,
    info: NodeInfo,
    identity: Arc<Identity>,
    numbers: impl Fn() -> (u64, u64) + Send + 'static,
    repairs: mpsc::UnboundedSender<DeadNode>,
) {
    let wake = Arc::new(Notify::new());
    tokio::spawn(listen(target.clone(), wake.clone()));
    tokio::spawn(catch_up(identity.clone(), wake));
    tokio::spawn(heartbeat(target, info, identity, numbers, repairs));
}

/// Marks `node_id` stopped (a clean exit: its sessions ended in its own trail), within
/// `within`; false when the database did not answer in time.
pub async fn leave(target: &Target, node_id: &str, within: Duration) -> bool {
    let work = async {
        let client = target.connect().await?;
        crate::Registry {
            node_id: node_id.to_string(),
        }
        .leave(&client)
        .await
    };
    match tokio::time::timeout(within, work).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!("cluster: not marked stopped: {e}");
            false
        }
        Err(_) => {
            tracing::warn!("cluster: not marked stopped: no answer within {within:?}");
            false
        }
    }
}

/// While this node holds the repair lease: every [`BEAT`], claims the nodes that died
/// and hands them to `repairs` (whoever records them gives a claim back with
/// [`crate::repair::unclaim`] when it cannot).
pub fn spawn_repair(
    target: Target,
    mut lease: tokio::sync::watch::Receiver<bool>,
    repairs: mpsc::UnboundedSender<DeadNode>,
) {
    tokio::spawn(async move {
        let mut client: Option<tokio_postgres::Client> = None;
        loop {
            if !*lease.borrow_and_update() {
                if lease.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if client
                .as_ref()
                .is_none_or(tokio_postgres::Client::is_closed)
            {
                client = target.connect().await.ok();
            }
            if let Some(c) = &client {
                match crate::repair::claim_dead(c).await {
                    Ok(dead) => {
                        for d in dead {
                            tracing::warn!(node = %d.node_id, last_heartbeat = %d.last_heartbeat, sessions = d.sessions, "cluster: a node died; recording its sessions as ended");
                            if repairs.send(d).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => tracing::warn!("cluster: dead nodes not claimed: {e}"),
                }
            }
            tokio::time::sleep(BEAT).await;
        }
    });
}

/// Applies pending changes whenever woken (coalesced: one catch-up covers every
/// notification that arrived while it ran).
async fn catch_up(identity: Arc<Identity>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        match identity.catch_up().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(changes = n, "applied changes from other nodes"),
            Err(e) => tracing::warn!("cluster catch-up: {e}"),
        }
    }
}

async fn listen(target: Target, wake: Arc<Notify>) {
    loop {
        match listen_once(&target, &wake).await {
            Ok(()) => tracing::warn!("cluster listener: the connection closed; reconnecting"),
            Err(e) => tracing::warn!("cluster listener: {e}; reconnecting"),
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

async fn listen_once(target: &Target, wake: &Arc<Notify>) -> Result<(), crate::ClusterError> {
    let mut config: tokio_postgres::Config = target
        .url
        .parse()
        .map_err(|e: tokio_postgres::Error| crate::ClusterError::Url(e.to_string()))?;
    if let Some(p) = &target.password {
        config.password(p);
    }
    config.application_name("portcullis-listener");
    crate::dead_peer_limits(&mut config);
    let (client, mut connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(crate::pg("connecting the listener"))?;
    // The connection is driven here, so its notifications reach us.
    let messages = {
        let wake = wake.clone();
        async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(crate::pg("listening")(e)),
                    None => return Ok(()),
                }
            }
        }
    };
    let subscribe = async {
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(crate::pg("subscribing to changes"))?;
        // Whatever was committed while not listening.
        wake.notify_one();
        std::future::pending::<Result<(), crate::ClusterError>>().await
    };
    tokio::select! {
        r = messages => r,
        r = subscribe => r,
    }
}

async fn heartbeat(
    target: Target,
    info: NodeInfo,
    identity: Arc<Identity>,
    numbers: impl Fn() -> (u64, u64),
    repairs: mpsc::UnboundedSender<DeadNode>,
) {
    let mut tick = tokio::time::interval(BEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut joined: Option<(tokio_postgres::Client, Registry)> = None;
    // The first join of this process; later ones are reconnections.
    let mut fresh = true;
    let mut beats: u64 = 0;
    loop {
        tick.tick().await;
        // The safety net under the notifications.
        if let Err(e) = identity.catch_up().await {
            tracing::debug!("cluster catch-up on the heartbeat: {e}");
        }
        if joined.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            joined = None;
        }
        if joined.is_none() {
            match target.connect().await {
                Ok(mut client) => {
                    match Registry::join(
                        &mut client,
                        &info.node_id,
                        &info.address,
                        &info.version,
                        fresh,
                    )
                    .await
                    {
                        Ok((r, previous)) => {
                            fresh = false;
                            if let Some(p) = previous {
                                tracing::warn!(last_heartbeat = %p.last_heartbeat, "cluster: this node's previous run ended without a clean exit; recording its sessions as ended");
                                let _ = repairs.send(p);
                            }
                            joined = Some((client, r));
                        }
                        Err(e) => tracing::warn!("cluster heartbeat: {e}"),
                    }
                }
                Err(e) => tracing::warn!("cluster heartbeat: {e}"),
            }
        }
        let Some((client, registry)) = &joined else {
            continue;
        };
        let (sessions, flows) = numbers();
        let beat = Beat {
            sessions,
            flows,
            applied_change: identity.applied_change(),
        };
        if let Err(e) = registry.beat(client, beat).await {
            tracing::warn!("cluster heartbeat: {e}");
        }
        beats += 1;
        if beats % PURGE_EVERY == 0 {
            // Idempotent, so any node may do it; the index on expires keeps it cheap.
            if let Err(e) = client
                .batch_execute(
                    "DELETE FROM once WHERE expires <= now(); DELETE FROM web_sessions WHERE expires <= now()",
                )
                .await
            {
                tracing::warn!("cluster: expired one-time values not purged: {e}");
            }
        }
    }
}
