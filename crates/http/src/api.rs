//! What the admin API's route modules share (`admin`, `devices`, `policy_api`): the
//! state every handler gets, the error type and its JSON shape, the body reader, and the
//! way to ask the packet loop. The route modules import this one, never each other.

use std::sync::{Arc, RwLock};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use portcullis_config::TokenSet;
use portcullis_control::Command;
use portcullis_identity::Identity;
use portcullis_ldap_sync::LdapHandle;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

/// Who made an admin call, for the audit trail: `admin:cli` or `api:<token id>`.
#[derive(Clone, Debug)]
pub(crate) struct Actor(pub String);

#[derive(Clone)]
pub(crate) struct AdminState {
    pub(crate) tokens: Option<Arc<RwLock<TokenSet>>>,
    /// The `/api/v1` request verifier (`[api]` configured).
    pub(crate) api: Option<Arc<std::sync::Mutex<portcullis_apiauth::Verifier>>>,
    pub(crate) nonce_log: Option<Arc<std::sync::Mutex<crate::nonces::NonceLog>>>,
    pub(crate) max_body_bytes: usize,
    pub(crate) identity: Option<Arc<Identity>>,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) ldap: Option<LdapHandle>,
    /// What device profiles carry (`[devices]` configured).
    pub(crate) profile: Option<Arc<portcullis_identity::ProfileSettings>>,
    pub(crate) policy_dir: Arc<std::path::Path>,
    /// How profiles' AllowedIPs are chosen.
    pub(crate) scope: Arc<crate::devices::ProfileScope>,
    /// Serialises policy replacements.
    pub(crate) policy_lock: Arc<tokio::sync::Mutex<()>>,
    /// `[cluster]`'s database: `GET /cluster` and the cluster-wide API nonces.
    pub(crate) shared: Option<Arc<portcullis_cluster::shared::Shared>>,
    /// `[cluster]`: the shared policy set `PUT /policies` stores.
    pub(crate) cluster_policy: Option<Arc<crate::policy_cluster::ClusterPolicy>>,
    /// Just-in-time access requests (with the identity store).
    pub(crate) access: Option<Arc<crate::access::AccessService>>,
    /// `[console]`: break-glass sign-in links.
    pub(crate) console_links: Option<Arc<crate::console::Links>>,
    /// `[audit.clickhouse]`: legal holds are kept there.
    pub(crate) audit_store: Option<Arc<portcullis_auditor::http::StoreHandle>>,
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// An API error: status and message, answered as `{"error": message}`.
pub(crate) struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

/// A JSON body into its typed struct (`deny_unknown_fields` on each); a refusal names
/// what is wrong with it.
pub(crate) fn body<T>(
    b: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    // 413 for a body over the limit (as the README says); any other refusal of the body
    // (syntax, types, content type) is a 400, as documented.
    b.map(|Json(v)| v).map_err(|r| {
        let status = match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, format!("request body: {}", r.body_text()))
    })
}

pub(crate) async fn ask<T>(
    s: &AdminState,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Result<T, Response> {
    portcullis_control::ask(&s.commands, make)
        .await
        .map_err(|gone| error(StatusCode::SERVICE_UNAVAILABLE, gone.to_string()))
}
