//! Break-glass sign-in for when the IdP is down: `portcullis console login-link --as
//! NAME` (the admin API's `POST /console/login-links`, so minting one is an
//! `admin_action`) gives a link valid for [`LINK_LIFETIME`] that signs its holder in
//! once as NAME, with NAME's groups as the gateway holds them.
//!
//! The link carries a random token and the name; only SHA-256 of both is kept (in
//! memory, or in a cluster in the shared one-time table, so a link minted through one
//! node works on any), and using it removes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use chrono::{DateTime, TimeDelta, Utc};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

/// How long a link is valid.
pub const LINK_LIFETIME: TimeDelta = TimeDelta::minutes(10);
/// How long the console session it opens lasts.
pub const LINK_SESSION: TimeDelta = TimeDelta::hours(1);
/// The kind of the cluster's one-time values.
const KIND: &str = "console-link";
/// Unused links kept at most on one node (the oldest go first).
const MAX_LINKS: usize = 1_000;

pub struct Links {
    base: String,
    local: Mutex<HashMap<String, DateTime<Utc>>>,
    shared: Option<Arc<portcullis_cluster::shared::Shared>>,
}

fn digest(token: &str, name: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"portcullis-console-link\0");
    h.update(token.as_bytes());
    h.update(b"\0");
    h.update(name.as_bytes());
    hex::encode(h.finalize())
}

impl Links {
    pub(crate) fn new(
        base_url: &str,
        shared: Option<Arc<portcullis_cluster::shared::Shared>>,
    ) -> Arc<Links> {
        Arc::new(Links {
            base: base_url.trim_end_matches('/').to_string(),
            local: Mutex::new(HashMap::new()),
            shared,
        })
    }

    /// A new link for `name`: its URL and when it stops working.
    pub(crate) async fn mint(&self, name: &str) -> Result<(String, DateTime<Utc>), String> {
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let expires = Utc::now() + LINK_LIFETIME;
        let key = digest(&token, name);
        match &self.shared {
            Some(shared) => shared
                .offer(KIND, &key, "", expires)
                .await
                .map_err(|e| format!("the link could not be stored in the cluster: {e}"))?,
            None => {
                let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
                let now = Utc::now();
                local.retain(|_, t| *t > now);
                if local.len() >= MAX_LINKS {
                    return Err(format!(
                        "{MAX_LINKS} unused links exist; wait until they expire"
                    ));
                }
                local.insert(key, expires);
            }
        }
        let query = serde_urlencoded::to_string([("t", token.as_str()), ("as", name)])
            .map_err(|e| e.to_string())?;
        Ok((format!("{}/console/login-link?{query}", self.base), expires))
    }

    /// Uses up the link (`token`, `name`): whether it was valid.
    pub(crate) async fn redeem(&self, token: &str, name: &str) -> Result<bool, String> {
        let key = digest(token, name);
        match &self.shared {
            Some(shared) => shared
                .take(KIND, &key)
                .await
                .map_err(|e| format!("the link cannot be checked against the cluster now: {e}")),
            None => {
                let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
                Ok(local.remove(&key).is_some_and(|t| t > Utc::now()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn token_of(url: &str) -> (String, String) {
        let q = url.split_once('?').unwrap().1;
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).unwrap();
        (pairs[0].1.clone(), pairs[1].1.clone())
    }

    #[tokio::test]
    async fn a_link_works_once_and_only_for_its_name() {
        let links = Links::new("https://vpn.example.com/", None);
        let (url, expires) = links.mint("sam").await.unwrap();
        assert!(
            url.starts_with("https://vpn.example.com/console/login-link?t="),
            "{url}"
        );
        assert!(expires > Utc::now() + TimeDelta::minutes(9));
        let (token, name) = token_of(&url);
        assert_eq!(name, "sam");
        assert!(!links.redeem(&token, "eve").await.unwrap(), "another name");
        assert!(!links.redeem("forged", "sam").await.unwrap());
        assert!(links.redeem(&token, "sam").await.unwrap());
        assert!(!links.redeem(&token, "sam").await.unwrap(), "once");
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MintBody {
    #[serde(rename = "as")]
    name: String,
}

/// `POST /console/login-links` `{"as": NAME}` (admin API): a break-glass link. 404
/// without `[console]`; 404 for a user the gateway does not know.
pub(crate) async fn mint(
    axum::extract::State(s): axum::extract::State<crate::api::AdminState>,
    b: Result<axum::Json<MintBody>, axum::extract::rejection::JsonRejection>,
) -> Result<axum::response::Response, crate::api::ApiError> {
    use axum::http::StatusCode;
    use axum::response::IntoResponse as _;
    let Some(links) = &s.console_links else {
        return Err(crate::api::ApiError(
            StatusCode::NOT_FOUND,
            "no [console] section is configured".into(),
        ));
    };
    let MintBody { name } = crate::api::body(b)?;
    let known = crate::api::ask(&s, portcullis_control::Command::Users)
        .await
        .map_err(|_| {
            crate::api::ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the packet loop is not running".into(),
            )
        })?
        .iter()
        .any(|u| u.name == name && u.active)
        || s.identity
            .as_ref()
            .is_some_and(|i| i.read(|d| d.user_by_name(&name).is_some_and(|u| u.active)));
    if !known {
        return Err(crate::api::ApiError(
            StatusCode::NOT_FOUND,
            format!("no active user {name:?}"),
        ));
    }
    let (url, expires) = links
        .mint(&name)
        .await
        .map_err(|e| crate::api::ApiError(StatusCode::SERVICE_UNAVAILABLE, e))?;
    tracing::warn!(user = %name, "console: a break-glass sign-in link was issued");
    Ok(
        axum::Json(serde_json::json!({"as": name, "url": url, "expires_at": expires}))
            .into_response(),
    )
}
