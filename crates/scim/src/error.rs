//! SCIM error responses (RFC 7644 §3.12).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use portcullis_identity::{DirectoryError, IdentityError};
use serde_json::json;

pub const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";

/// An error as SCIM clients expect it: status, optional `scimType`, and a detail that
/// names the offending input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScimError {
    pub status: u16,
    pub scim_type: Option<&'static str>,
    pub detail: String,
}

impl ScimError {
    pub fn new(status: u16, scim_type: Option<&'static str>, detail: String) -> ScimError {
        ScimError {
            status,
            scim_type,
            detail,
        }
    }
    pub fn syntax(detail: String) -> ScimError {
        ScimError::new(400, Some("invalidSyntax"), detail)
    }
    pub fn value(detail: String) -> ScimError {
        ScimError::new(400, Some("invalidValue"), detail)
    }
    pub fn path(detail: String) -> ScimError {
        ScimError::new(400, Some("invalidPath"), detail)
    }
    pub fn internal(detail: String) -> ScimError {
        ScimError::new(500, None, detail)
    }
}

impl From<IdentityError> for ScimError {
    fn from(e: IdentityError) -> ScimError {
        match e {
            IdentityError::Directory(d) => d.into(),
            // The IdP retries a 503: nothing was changed.
            _ if e.is_unavailable() => {
                tracing::warn!("scim: {e}");
                ScimError::new(503, None, e.to_string())
            }
            IdentityError::Store(_) | IdentityError::Commit(_) => {
                tracing::error!("scim: {e}");
                ScimError::internal("the identity database could not store the change".into())
            }
            IdentityError::CoreGone => ScimError::new(503, None, e.to_string()),
            // SCIM never changes devices itself.
            IdentityError::Device(_) | IdentityError::NoDevices => {
                ScimError::internal(e.to_string())
            }
        }
    }
}

impl From<DirectoryError> for ScimError {
    fn from(e: DirectoryError) -> ScimError {
        let detail = e.to_string();
        match e {
            DirectoryError::UserNameTaken(_)
            | DirectoryError::GroupNameTaken(_)
            | DirectoryError::ReservedName(_) => ScimError::new(409, Some("uniqueness"), detail),
            DirectoryError::NoSuchUser(_) | DirectoryError::NoSuchGroup(_) => {
                ScimError::new(404, None, detail)
            }
            DirectoryError::Invalid(_) => ScimError::value(detail),
            // Only a sign-on login reports this; SCIM never plans one.
            DirectoryError::Disabled(_) => ScimError::new(409, None, detail),
        }
    }
}

impl IntoResponse for ScimError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "schemas": [ERROR_SCHEMA],
            "status": self.status.to_string(),
            "detail": self.detail,
        });
        if let (Some(t), Some(obj)) = (self.scim_type, body.as_object_mut()) {
            obj.insert("scimType".into(), json!(t));
        }
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        crate::scim_json(status, &body)
    }
}
