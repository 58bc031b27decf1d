//! Leases: work that runs on exactly one node of the cluster at a time (the device-expiry
//! sweep, the LDAP consumer, audit retention, the SAML metadata refresh, repairing what
//! a dead node left). A lease is a row of `leases` (name, holder, expires) taken
//! with one conditional upsert: free, expired or already ours. The holder renews it every
//! [`RENEW`] for [`TTL`]; a node that is not the holder tries again after a random delay
//! (so nodes started together do not all ask at once), and takes it over once the holder
//! stopped renewing: within `TTL + RENEW + 1 s` of its death.
//!
//! A holder that cannot renew (the database is away) gives the lease up on its own clock
//! [`MARGIN`] before the database would, so two nodes never both believe they hold it.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::store::Target;
use crate::{pg, ClusterError};

/// How long a taken or renewed lease lasts.
pub const TTL: Duration = Duration::from_secs(5);
/// How often the holder renews.
pub const RENEW: Duration = Duration::from_secs(1);
/// How much earlier than the database a holder that cannot renew lets go.
pub const MARGIN: Duration = Duration::from_secs(2);

/// The device-expiry sweep's lease.
pub const DEVICE_EXPIRY: &str = "device-expiry";
/// The LDAP consumer's lease.
pub const LDAP: &str = "ldap-sync";
/// Audit retention (dropping old ClickHouse partitions).
pub const AUDIT_RETENTION: &str = "audit-retention";
/// Fetching the IdP's SAML metadata from its URL (the holder shares what it fetched).
pub const SAML_METADATA: &str = "saml-metadata";
/// Repairing what a dead node left: its sessions marked ended in the audit trail.
pub const NODE_REPAIR: &str = "node-repair";
/// Recording lapsed access requests and grants (`access_expired`) once.
pub const ACCESS_EXPIRY: &str = "access-expiry";

/// Takes or renews `name` for `holder`; whether it is held now.
pub async fn take(client: &Client, name: &str, holder: &str) -> Result<bool, ClusterError> {
    let ttl_ms = i64::try_from(TTL.as_millis()).unwrap_or(i64::MAX) as f64;
    let n = client
        .execute(
            "INSERT INTO leases (name, holder, expires)
             VALUES ($1, $2, now() + $3 * interval '1 millisecond')
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires = EXCLUDED.expires
             WHERE leases.holder = EXCLUDED.holder OR leases.expires <= now()",
            &[&name, &holder, &ttl_ms],
        )
        .await
        .map_err(pg("taking a lease"))?;
    Ok(n == 1)
}

/// Gives `name` up, if `holder` holds it (a clean exit: the next node need not wait).
pub async fn release(client: &Client, name: &str, holder: &str) -> Result<(), ClusterError> {
    client
        .execute(
            "DELETE FROM leases WHERE name = $1 AND holder = $2",
            &[&name, &holder],
        )
        .await
        .map_err(pg("releasing a lease"))?;
    Ok(())
}

/// A delay in `0..max`, different on every call and node (no rand dependency for this).
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    let ms = u64::try_from(max.as_millis()).unwrap_or(1).max(1);
    Duration::from_millis(h.finish() % ms)
}

/// Keeps trying to hold `name` for `holder`; the receiver says whether it is held.
pub fn spawn(target: Target, name: &'static str, holder: String) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut client: Option<Client> = None;
        let mut renewed: Option<Instant> = None;
        loop {
            if renewed.is_none() {
                tokio::time::sleep(jitter(Duration::from_secs(1))).await;
            }
            if client.as_ref().is_none_or(Client::is_closed) {
                client = tokio::time::timeout(RENEW, target.connect())
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
            let asked = Instant::now();
            // Bounded, so a hanging connection cannot keep us believing we hold it.
            let asked_db = async {
                match &client {
                    Some(c) => tokio::time::timeout(RENEW, take(c, name, &holder))
                        .await
                        .unwrap_or(Err(ClusterError::Timeout(RENEW)))
                        .map(Some),
                    None => Ok(None),
                }
            };
            let answer = asked_db.await;
            if matches!(answer, Err(ClusterError::Timeout(_))) {
                client = None;
            }
            let held = match answer.transpose() {
                Some(r) => match r {
                    Ok(true) => {
                        // Counted from before the request: the database's expiry is later.
                        renewed = Some(asked);
                        true
                    }
                    Ok(false) => {
                        renewed = None;
                        false
                    }
                    Err(e) => {
                        tracing::warn!(lease = name, "lease not renewed: {e}");
                        renewed.is_some_and(|t| t.elapsed() + MARGIN < TTL)
                    }
                },
                None => renewed.is_some_and(|t| t.elapsed() + MARGIN < TTL),
            };
            if !held {
                renewed = None;
            }
            tx.send_if_modified(|was| {
                if *was != held {
                    tracing::info!(
                        lease = name,
                        held,
                        "lease {}",
                        if held { "taken" } else { "lost" }
                    );
                    *was = held;
                    true
                } else {
                    false
                }
            });
            if tx.is_closed() {
                if let (true, Some(c)) = (held, &client) {
                    let _ = release(c, name, &holder).await;
                }
                return;
            }
            tokio::time::sleep(RENEW).await;
        }
    });
    rx
}
