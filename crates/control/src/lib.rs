//! The seam between the two programs in the gateway binary: the data plane
//! (`portcullis-io`: the packet loop driving the core) and the control plane
//! (`portcullis-http`, `portcullis-ldap-sync`, the identity store: everything that waits on
//! HTTP, TLS, SQL or LDAP).
//!
//! What it does: defines the messages and the two channels they travel on, both bounded:
//! - control → data: [`Command`] ([`COMMAND_QUEUE`] deep). A full queue makes the
//!   control plane wait on its own thread; the packet loop never waits for the control
//!   plane. A command that needs an answer carries its `oneshot` sender; the loop answers
//!   a command that changed something only once its audit events are durable (audit
//!   before answer).
//! - data → control: [`Status`] ([`STATUS_QUEUE`] deep), about every 200 ms: the loop's
//!   counters and readiness. The loop `try_send`s: a slow reader misses a status, the
//!   loop never blocks; a missing status is itself the sign of a stuck loop.
//!
//! What it deliberately does not: no IO, no tasks, no policy or identity logic.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use portcullis_core::SessionInfo;
use portcullis_model::latency::Latency;
use portcullis_model::{DeviceChange, Event, IdentityChange};
use portcullis_policy::PolicyBundle;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// Commands the control plane may have queued for the packet loop at once.
pub const COMMAND_QUEUE: usize = 1024;

/// Statuses the control plane may not have read yet (the loop drops newer ones).
pub const STATUS_QUEUE: usize = 4;

/// What the control plane asks of the packet loop (which owns the core).
#[derive(Debug)]
pub enum Command {
    /// Identity changes committed to the identity store, in commit order.
    Apply(Apply),
    /// Users whose access a change being committed takes away: cut now, before the
    /// commit (its `Apply` follows).
    Revoke(Revoke),
    /// The users the policies know, as the loop sees them (`source` is `"config"` for a
    /// configuration-file user and empty otherwise: the identity store fills it in).
    Users(oneshot::Sender<Vec<UserRow>>),
    Sessions(oneshot::Sender<Vec<SessionInfo>>),
    KillSession(u64, oneshot::Sender<bool>),
    /// Revokes a user the configuration file defines (until the gateway restarts).
    /// Answers whether the user was known.
    DisableConfigUser {
        name: String,
        actor: String,
        requested: Instant,
        requested_at: DateTime<Utc>,
        done: oneshot::Sender<bool>,
    },
    /// An event to record in the audit stream (an identity source's report, an admin
    /// action, a login). With a sender: answered once the event is durable (`true`) or
    /// refused (`false`), for a request that must not be answered before its record.
    Report(Event, Option<oneshot::Sender<bool>>),
    /// The running policy bundle.
    Policy(oneshot::Sender<Arc<PolicyBundle>>),
    /// The running policy bundle and a user's groups as the policies see them (empty for
    /// a user they do not know): what a profile's AllowedIPs are made of.
    Access(String, oneshot::Sender<(Arc<PolicyBundle>, Vec<String>)>),
    /// Applies a validated bundle (the API wrote its files); flows cut, or why the core
    /// refused it.
    ApplyPolicy(Arc<PolicyBundle>, oneshot::Sender<Result<usize, String>>),
    /// Replaces the temporary grants (every approved access request in force); answers
    /// how many flows were cut, once their events are durable.
    Grants(Vec<portcullis_model::Grant>, oneshot::Sender<usize>),
}

/// Identity changes for the core to apply, with when their request arrived; `done` is
/// answered once the core has applied them all and their events are durable.
#[derive(Debug)]
pub struct Apply {
    pub changes: Vec<IdentityChange>,
    /// Peers to add or remove, after `changes`.
    pub devices: Vec<DeviceChange>,
    pub requested: Instant,
    pub requested_at: DateTime<Utc>,
    pub done: oneshot::Sender<()>,
}

/// Users to cut ahead of their change's commit, with when the request arrived.
#[derive(Debug)]
pub struct Revoke {
    pub users: Vec<String>,
    pub source: String,
    pub requested: Instant,
    pub requested_at: DateTime<Utc>,
}

/// A user as `users list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct UserRow {
    pub name: String,
    pub source: String,
    pub active: bool,
    pub groups: Vec<String>,
    pub tags: Vec<String>,
    pub devices: Vec<String>,
    pub sessions: usize,
}

/// What the packet loop reports about itself.
#[derive(Clone, Debug)]
pub struct Status {
    /// When the loop made it (a stale status means a stuck loop).
    pub at: Instant,
    pub ready: Readiness,
    pub snapshot: Snapshot,
}

/// What readiness is made of on the data-plane side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    pub tun_up: bool,
    pub udp_bound: bool,
    pub policy_loaded: bool,
    pub audit_writable: bool,
}

/// Counters of the batched UDP/TUN path.
#[derive(Clone, Copy, Debug, Default)]
pub struct DatapathStats {
    pub udp_batches: u64,
    pub udp_datagrams: u64,
    pub tun_writes: u64,
    pub tun_reads: u64,
    pub udp_sends: u64,
    pub send_errors: u64,
}

/// The loop's numbers, as `/metrics` and the minute's log line show them.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub enforce: portcullis_core::EnforceStats,
    pub wireguard: portcullis_core::WgStats,
    pub datapath: DatapathStats,
    pub audit_written: u64,
    pub audit_refused: u64,
    pub audit_uploaded: u64,
    pub audit_upload_batches: u64,
    pub audit_upload_errors: u64,
    pub audit_backlog: u64,
    pub audit_lag_ms: u64,
    pub audit_spool_bytes: u64,
    pub sessions: u64,
    pub flows: u64,
    pub peers: u64,
    /// User revocations, request arrival → every session and flow cut.
    pub revocation_latency: Latency,
    /// Spool commits (write and fsync).
    pub audit_commit_latency: Latency,
    /// ClickHouse inserts.
    pub upload_latency: Latency,
}

/// The control plane's ends.
#[derive(Debug)]
pub struct ControlSide {
    pub commands: mpsc::Sender<Command>,
    pub status: mpsc::Receiver<Status>,
}

/// The data plane's ends.
#[derive(Debug)]
pub struct DataSide {
    pub commands: mpsc::Receiver<Command>,
    pub status: mpsc::Sender<Status>,
}

/// The two channels, bounded.
pub fn channels() -> (ControlSide, DataSide) {
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let (status_tx, status_rx) = mpsc::channel(STATUS_QUEUE);
    (
        ControlSide {
            commands: commands_tx,
            status: status_rx,
        },
        DataSide {
            commands: commands_rx,
            status: status_tx,
        },
    )
}

/// The packet loop has stopped (it dropped its end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the gateway is shutting down")]
pub struct Gone;

/// Sends the command `make` builds and waits for its answer.
pub async fn ask<T>(
    commands: &mpsc::Sender<Command>,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Result<T, Gone> {
    let (tx, rx) = oneshot::channel();
    commands.send(make(tx)).await.map_err(|_| Gone)?;
    rx.await.map_err(|_| Gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ask_returns_the_answer_or_gone_when_the_loop_is_gone() {
        let (control, mut data) = channels();
        let answer = tokio::spawn(async move {
            match data.commands.recv().await {
                Some(Command::KillSession(id, tx)) => {
                    let _ = tx.send(id == 7);
                }
                other => panic!("unexpected {other:?}"),
            }
            data
        });
        let killed = ask(&control.commands, |tx| Command::KillSession(7, tx)).await;
        assert_eq!(killed, Ok(true));
        // The loop takes the command and drops its answer, then its end.
        let mut data = answer.await.unwrap();
        let dropper = tokio::spawn(async move {
            let _ = data.commands.recv().await;
        });
        assert_eq!(
            ask(&control.commands, |tx| Command::KillSession(1, tx)).await,
            Err(Gone)
        );
        dropper.await.unwrap();
        assert_eq!(
            ask(&control.commands, |tx| Command::KillSession(1, tx)).await,
            Err(Gone)
        );
    }

    #[test]
    fn the_status_channel_drops_instead_of_blocking_the_loop() {
        let (_control, data) = channels();
        let status = Status {
            at: Instant::now(),
            ready: Readiness::default(),
            snapshot: Snapshot::default(),
        };
        for _ in 0..STATUS_QUEUE {
            assert!(data.status.try_send(status.clone()).is_ok());
        }
        assert!(matches!(
            data.status.try_send(status),
            Err(mpsc::error::TrySendError::Full(_))
        ));
    }
}
