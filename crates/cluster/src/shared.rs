//! The one-time values and web sessions every node must see: a connection the control
//! plane's request handlers share ([`Shared`]), with
//! - [`Shared::claim`]: a value accepted at most once cluster-wide until it expires (an
//!   API nonce, a SAML assertion id); `false` when any node already took it;
//! - [`Shared::offer`] / [`Shared::take`]: a value one node issues and any node uses up
//!   once (a SAML request id, with its relay state);
//! - [`Shared::put_session`] / [`Shared::session`] / [`Shared::end_session`]: login
//!   sessions by the SHA-256 of their cookie, so a cookie set by one node works on all;
//! - [`Shared::meta`] / [`Shared::set_meta`]: a value one node fetched for all (the
//!   IdP's SAML metadata).
//!
//! Every call fails (an error, never a guess) when the database cannot be reached: the
//! callers refuse the request then, they do not accept it on one node's word.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_postgres::types::Json;
use tokio_postgres::Client;

use crate::store::Target;
use crate::{pg, ClusterError};

/// A connection shared by concurrent requests (tokio-postgres pipelines them), opened
/// on first use and again after it is lost.
#[derive(Debug)]
pub struct Shared {
    target: Target,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl Shared {
    pub fn new(target: Target) -> Shared {
        Shared {
            target,
            client: tokio::sync::Mutex::new(None),
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The connection (reconnecting if it was lost).
    pub async fn client(&self) -> Result<Arc<Client>, ClusterError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(self.target.connect().await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Takes `value` of `kind` until `expires`; false when it was already taken.
    pub async fn claim(
        &self,
        kind: &str,
        value: &str,
        expires: DateTime<Utc>,
    ) -> Result<bool, ClusterError> {
        let c = self.client().await?;
        // An expired claim of the same value is replaced: it could not be accepted again
        // anyway (the caller checks freshness first).
        let n = c
            .execute(
                "INSERT INTO once (kind, value, expires) VALUES ($1, $2, $3)
                 ON CONFLICT (kind, value) DO UPDATE SET expires = EXCLUDED.expires, data = ''
                 WHERE once.expires <= now()",
                &[&kind, &value, &expires],
            )
            .await
            .map_err(pg("claiming a one-time value"))?;
        Ok(n == 1)
    }

    /// Issues `value` of `kind` with `data`, for any node to [`Shared::take`] once.
    pub async fn offer(
        &self,
        kind: &str,
        value: &str,
        data: &str,
        expires: DateTime<Utc>,
    ) -> Result<(), ClusterError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO once (kind, value, data, expires) VALUES ($1, $2, $3, $4)
             ON CONFLICT (kind, value) DO NOTHING",
            &[&kind, &value, &data, &expires],
        )
        .await
        .map_err(pg("issuing a one-time value"))?;
        Ok(())
    }

    /// The unexpired offered values of `kind` with their data and expiry (at most
    /// `limit`, newest first).
    pub async fn offered(
        &self,
        kind: &str,
        limit: i64,
    ) -> Result<Vec<(String, String, DateTime<Utc>)>, ClusterError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT value, data, expires FROM once WHERE kind = $1 AND expires > now()
                 ORDER BY expires DESC LIMIT $2",
                &[&kind, &limit],
            )
            .await
            .map_err(pg("reading one-time values"))?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(pg("a one-time value"))?,
                    r.try_get(1).map_err(pg("a one-time value"))?,
                    r.try_get(2).map_err(pg("a one-time value"))?,
                ))
            })
            .collect()
    }

    /// Uses up an offered value; false when it is unknown, expired or already used.
    pub async fn take(&self, kind: &str, value: &str) -> Result<bool, ClusterError> {
        let c = self.client().await?;
        let n = c
            .execute(
                "DELETE FROM once WHERE kind = $1 AND value = $2 AND expires > now()",
                &[&kind, &value],
            )
            .await
            .map_err(pg("using up a one-time value"))?;
        Ok(n == 1)
    }

    /// Stores a login session under `id` (the cookie's digest) until `expires`.
    pub async fn put_session(
        &self,
        id: &str,
        body: &serde_json::Value,
        expires: DateTime<Utc>,
    ) -> Result<(), ClusterError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO web_sessions (id, body, expires) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body, expires = EXCLUDED.expires",
            &[&id, &Json(body), &expires],
        )
        .await
        .map_err(pg("storing a login session"))?;
        Ok(())
    }

    /// The unexpired session `id`.
    pub async fn session(&self, id: &str) -> Result<Option<serde_json::Value>, ClusterError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT body FROM web_sessions WHERE id = $1 AND expires > now()",
                &[&id],
            )
            .await
            .map_err(pg("reading a login session"))?;
        row.map(|r| {
            r.try_get::<_, Json<serde_json::Value>>(0)
                .map(|j| j.0)
                .map_err(pg("reading a login session"))
        })
        .transpose()
    }

    pub async fn end_session(&self, id: &str) -> Result<(), ClusterError> {
        let c = self.client().await?;
        c.execute("DELETE FROM web_sessions WHERE id = $1", &[&id])
            .await
            .map_err(pg("ending a login session"))?;
        Ok(())
    }

    /// The shared value `key` of `meta` (e.g. the IdP metadata the refresh lease's
    /// holder fetched).
    pub async fn meta(&self, key: &str) -> Result<Option<String>, ClusterError> {
        let c = self.client().await?;
        let row = c
            .query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
            .await
            .map_err(pg("reading a shared value"))?;
        row.map(|r| r.try_get(0).map_err(pg("reading a shared value")))
            .transpose()
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), ClusterError> {
        let c = self.client().await?;
        crate::write_meta(&c, key, value).await
    }

    /// Forgets expired one-time values and sessions; returns how many rows went.
    pub async fn purge(&self) -> Result<u64, ClusterError> {
        let c = self.client().await?;
        let a = c
            .execute("DELETE FROM once WHERE expires <= now()", &[])
            .await
            .map_err(pg("forgetting expired one-time values"))?;
        let b = c
            .execute("DELETE FROM web_sessions WHERE expires <= now()", &[])
            .await
            .map_err(pg("forgetting expired sessions"))?;
        Ok(a + b)
    }
}
