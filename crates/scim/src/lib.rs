//! SCIM 2.0 service provider (RFC 7643 / RFC 7644) under `/scim/v2`, over the identity
//! store: how Okta, Entra ID or OneLogin keep the gateway's users and groups current,
//! and how their deactivation or deletion cuts a user's tunnels before the HTTP answer.
//!
//! What it does: Users and Groups (GET with `filter` and paging, POST, PUT, PATCH, DELETE),
//! ServiceProviderConfig, ResourceTypes, Schemas; bearer tokens checked (hashed, constant
//! time, several valid during a rotation) before anything reads the request; errors as
//! SCIM error JSON naming the offending input; bodies over the configured size refused.
//! Every change goes through [`portcullis_identity::Identity::change`], which returns only
//! once the gateway core has applied it.
//!
//! What it deliberately does not: no bulk operations, sorting, ETags or `attributes`
//! projection (advertised as unsupported in ServiceProviderConfig); no password storage
//! (a `password` attribute is accepted and dropped: tunnels authenticate by device key).
//!
//! Wire format: `application/scim+json`; resources carry `meta.version` as `W/"<n>"` and
//! `meta.location` relative to the listener (`/scim/v2/Users/<id>`). Users carry their
//! tags in the extension `urn:ietf:params:scim:schemas:extension:portcullis:2.0:User`.

pub mod error;
pub mod filter;
pub mod resource;
mod schemas;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use portcullis_config::TokenSet;
use portcullis_identity::{Directory, DirectoryError, Group, Identity, User};
use serde_json::{json, Value};
use uuid::Uuid;

pub use error::ScimError;
use resource::{group_from_json, group_json, patch, user_from_json, user_json, LIST_SCHEMA};

/// Largest page a client may ask for.
pub const MAX_PAGE: usize = 1000;

/// What the SCIM routes share.
#[derive(Clone)]
pub struct ScimState {
    pub identity: Arc<Identity>,
    /// Replaced on SIGHUP (token rotation).
    pub tokens: Arc<RwLock<TokenSet>>,
}

/// The SCIM routes, rooted at `/scim/v2`.
pub fn router(state: ScimState) -> Router {
    Router::new()
        .route("/scim/v2/Users", get(list_users).post(create_user))
        .route(
            "/scim/v2/Users/{id}",
            get(get_user)
                .put(replace_user)
                .patch(patch_user)
                .delete(delete_user),
        )
        .route("/scim/v2/Groups", get(list_groups).post(create_group))
        .route(
            "/scim/v2/Groups/{id}",
            get(get_group)
                .put(replace_group)
                .patch(patch_group)
                .delete(delete_group),
        )
        .route(
            "/scim/v2/ServiceProviderConfig",
            get(schemas::service_provider_config),
        )
        .route("/scim/v2/ResourceTypes", get(schemas::resource_types))
        .route("/scim/v2/Schemas", get(schemas::schemas))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .fallback(|| async { ScimError::new(404, None, "no such SCIM endpoint".into()) })
        .with_state(state)
}

/// A JSON response with the SCIM media type.
pub(crate) fn scim_json(status: StatusCode, body: &Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/scim+json"),
    );
    r
}

async fn require_token(State(s): State<ScimState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let ok = presented.is_some_and(|t| {
        s.tokens
            .read()
            .map(|set| set.verify(t.trim()))
            .unwrap_or(false)
    });
    if !ok {
        // Logged (and limited per address) by the listener's bearer-failure layer.
        return ScimError::new(401, None, "missing or invalid bearer token".into()).into_response();
    }
    next.run(req).await
}

fn body_json(body: Result<Bytes, BytesRejection>) -> Result<Value, ScimError> {
    let bytes = body.map_err(|r| ScimError::new(r.status().as_u16(), None, r.body_text()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ScimError::syntax(format!("the body is not valid JSON: {e}")))
}

fn parse_id(id: &str, kind: &str) -> Result<Uuid, ScimError> {
    Uuid::parse_str(id).map_err(|_| ScimError::new(404, None, format!("no {kind} with id {id:?}")))
}

/// A user before a resource's attributes are read into it.
pub(crate) fn blank_user() -> User {
    User {
        id: Uuid::nil(),
        user_name: String::new(),
        external_id: None,
        display_name: None,
        email: String::new(),
        active: true,
        tags: Vec::new(),
        source: "scim".into(),
        created: DateTime::<Utc>::UNIX_EPOCH,
        modified: DateTime::<Utc>::UNIX_EPOCH,
        version: 0,
    }
}

pub(crate) fn blank_group() -> Group {
    Group {
        id: Uuid::nil(),
        display_name: String::new(),
        external_id: None,
        members: BTreeSet::new(),
        source: "scim".into(),
        created: DateTime::<Utc>::UNIX_EPOCH,
        modified: DateTime::<Utc>::UNIX_EPOCH,
        version: 0,
    }
}

/// A page of a list: `startIndex` is 1-based, `count` defaults to 100.
fn page(params: &HashMap<String, String>, total: Vec<Value>) -> Result<Response, ScimError> {
    let number = |name: &str, default: usize| -> Result<usize, ScimError> {
        match params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
            None => Ok(default),
            Some((_, v)) => v
                .parse::<i64>()
                .map(|n| n.max(0) as usize)
                .map_err(|_| ScimError::value(format!("{name}={v:?} is not a number"))),
        }
    };
    let start = number("startIndex", 1)?.max(1);
    let count = number("count", 100)?.min(MAX_PAGE);
    let n = total.len();
    let resources: Vec<Value> = total.into_iter().skip(start - 1).take(count).collect();
    Ok(scim_json(
        StatusCode::OK,
        &json!({
            "schemas": [LIST_SCHEMA],
            "totalResults": n,
            "startIndex": start,
            "itemsPerPage": resources.len(),
            "Resources": resources,
        }),
    ))
}

fn param<'a>(params: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Whether a group's `members` belong in the answer (Entra ID asks without them, with
/// `excludedAttributes=members`).
fn wants_members(params: &HashMap<String, String>) -> bool {
    !param(params, "excludedAttributes").is_some_and(|x| {
        x.split(',')
            .any(|a| a.trim().eq_ignore_ascii_case("members"))
    })
}

fn user_matches(d: &Directory, u: &User, t: &filter::Term) -> Result<bool, ScimError> {
    let ci = |a: &str| a.eq_ignore_ascii_case(&t.value);
    Ok(match t.attr.as_str() {
        "username" => ci(&u.user_name),
        "externalid" => u.external_id.as_deref() == Some(t.value.as_str()),
        "id" => u.id.to_string() == t.value,
        "displayname" => u.display_name.as_deref().is_some_and(ci),
        "emails" | "emails.value" => ci(&u.email),
        "active" => t
            .value
            .eq_ignore_ascii_case(if u.active { "true" } else { "false" }),
        "groups" | "groups.value" => d.groups_of(&u.id).any(|g| g.id.to_string() == t.value),
        other => {
            return Err(ScimError::new(
                400,
                Some("invalidFilter"),
                format!("filtering Users on {other:?} is not supported"),
            ))
        }
    })
}

fn group_matches(g: &Group, t: &filter::Term) -> Result<bool, ScimError> {
    Ok(match t.attr.as_str() {
        "displayname" => g.display_name.eq_ignore_ascii_case(&t.value),
        "externalid" => g.external_id.as_deref() == Some(t.value.as_str()),
        "id" => g.id.to_string() == t.value,
        "members" | "members.value" => g.members.iter().any(|m| m.to_string() == t.value),
        other => {
            return Err(ScimError::new(
                400,
                Some("invalidFilter"),
                format!("filtering Groups on {other:?} is not supported"),
            ))
        }
    })
}

fn terms(params: &HashMap<String, String>) -> Result<Vec<filter::Term>, ScimError> {
    match param(params, "filter") {
        None => Ok(Vec::new()),
        Some(f) => {
            filter::parse(f).map_err(|e| ScimError::new(400, Some("invalidFilter"), e.to_string()))
        }
    }
}

async fn list_users(
    State(s): State<ScimState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ScimError> {
    let terms = terms(&params)?;
    let found = s.identity.read(|d| -> Result<Vec<Value>, ScimError> {
        let mut out = Vec::new();
        for u in d.users() {
            let mut all = true;
            for t in &terms {
                all &= user_matches(d, u, t)?;
            }
            if all {
                out.push(user_json(d, u));
            }
        }
        Ok(out)
    })?;
    page(&params, found)
}

async fn get_user(
    State(s): State<ScimState>,
    Path(id): Path<String>,
) -> Result<Response, ScimError> {
    let id = parse_id(&id, "user")?;
    s.identity
        .read(|d| d.user(&id).map(|u| user_json(d, u)))
        .map(|v| scim_json(StatusCode::OK, &v))
        .ok_or_else(|| DirectoryError::NoSuchUser(id.to_string()).into())
}

/// The resource as stored after a change, with its `Location`. `kind` is `User` or
/// `Group`; `render` reads it from the directory.
fn respond(
    s: &ScimState,
    kind: &str,
    id: Option<&Uuid>,
    status: StatusCode,
    render: impl FnOnce(&Directory, &Uuid) -> Option<Value>,
) -> Result<Response, ScimError> {
    let lower = kind.to_ascii_lowercase();
    let id = id.ok_or_else(|| ScimError::internal(format!("no {lower} written")))?;
    let v = s
        .identity
        .read(|d| render(d, id))
        .ok_or_else(|| ScimError::internal(format!("the {lower} vanished")))?;
    let mut r = scim_json(status, &v);
    if let Ok(loc) = HeaderValue::from_str(&format!("/scim/v2/{kind}s/{id}")) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(r)
}

fn respond_user(
    s: &ScimState,
    id: Option<&Uuid>,
    status: StatusCode,
) -> Result<Response, ScimError> {
    respond(s, "User", id, status, |d, id| {
        d.user(id).map(|u| user_json(d, u))
    })
}

fn respond_group(
    s: &ScimState,
    id: Option<&Uuid>,
    status: StatusCode,
) -> Result<Response, ScimError> {
    respond(s, "Group", id, status, |d, id| {
        d.group(id).map(|g| group_json(d, g, true))
    })
}

async fn create_user(
    State(s): State<ScimState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ScimError> {
    let (requested, at) = (Instant::now(), Utc::now());
    let user = user_from_json(&body_json(body)?, blank_user())?;
    let name = user.user_name.clone();
    let c = s
        .identity
        .change("scim", requested, at, |d, now| {
            Ok::<_, ScimError>(d.plan_create_user(user, now)?)
        })
        .await?;
    tracing::info!(user = %name, "scim: user created");
    respond_user(&s, c.users.first(), StatusCode::CREATED)
}

async fn replace_user(
    State(s): State<ScimState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ScimError> {
    let (requested, at) = (Instant::now(), Utc::now());
    let id = parse_id(&id, "user")?;
    let v = body_json(body)?;
    s.identity
        .change("scim", requested, at, |d, now| {
            let old = d
                .user(&id)
                .ok_or_else(|| DirectoryError::NoSuchUser(id.to_string()))?;
            let user = user_from_json(&v, old.clone())?;
            Ok::<_, ScimError>(d.plan_update_user(user, now)?)
        })
        .await?;
    respond_user(&s, Some(&id), StatusCode::OK)
}

async fn patch_user(
    State(s): State<ScimState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ScimError> {
    let (requested, at) = (Instant::now(), Utc::now());
    let id = parse_id(&id, "user")?;
    let ops = body_json(body)?;
    let c = s
        .identity
        .change("scim", requested, at, |d, now| {
            let old = d
                .user(&id)
                .ok_or_else(|| DirectoryError::NoSuchUser(id.to_string()))?;
            let mut v = user_json(d, old);
            patch(&mut v, &ops)?;
            let user = user_from_json(&v, old.clone())?;
            Ok::<_, ScimError>(d.plan_update_user(user, now)?)
        })
        .await?;
    if c.changes > 0 {
        tracing::info!(%id, "scim: user patched");
    }
    respond_user(&s, Some(&id), StatusCode::OK)
}

async fn delete_user(
    State(s): State<ScimState>,
    Path(id): Path<String>,
) -> Result<Response, ScimError> {
    let (requested, at) = (Instant::now(), Utc::now());
    let id = parse_id(&id, "user")?;
    s.identity
        .change("scim", requested, at, |d, now| {
            Ok::<_, ScimError>(d.plan_delete_user(&id, now)?)
        })
        .await?;
    tracing::info!(%id, "scim: user deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_groups(
    State(s): State<ScimState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ScimError> {
    let terms = terms(&params)?;
    let with_members = wants_members(&params);
    let found = s.identity.read(|d| -> Result<Vec<Value>, ScimError> {
        let mut out = Vec::new();
        for g in d.groups() {
            let mut all = true;
            for t in &terms {
                all &= group_matches(g, t)?;
            }
            if all {
                out.push(group_json(d, g, with_members));
            }
        }
        Ok(out)
    })?;
    page(&params, found)
}

async fn get_group(
    State(s): State<ScimState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ScimError> {
    let id = parse_id(&id, "group")?;
    let with_members = wants_members(&params);
    s.identity
        .read(|d| d.group(&id).map(|g| group_json(d, g, with_members)))
        .map(|v| scim_json(StatusCode::OK, &v))
        .ok_or_else(|| DirectoryError::NoSuchGroup(id.to_string()).into())
}

async fn create_group(
    State(s): State<ScimState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ScimError> {
    let (requested, at) = (Instant::now(), Utc::now());
    let group = group_from_json(&body_json(body)?, blank_group())?;
    let c = s
        .identity
        .change("scim", requested, at, |d, now| {
            Ok::<_, ScimError>(d.plan_create_group(group, now)?)
        })
        .await?;
    respond_group(&s, c.groups.first(), StatusCode::CREATED)
}

async fn replace_group(
    State(s): State<ScimState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ScimError> {
    let (requested, at) = (Instant::now(), Utc::now());
    let id = parse_id(&id, "group")?;
    let v = body_json(body)?;
    s.identity
        .change("scim", requested, at, |d, now| {
            let old = d
                .group(&id)
                .ok_or_else(|| DirectoryError::NoSuchGroup(id.to_string()))?;
            let group = group_from_json(&v, old.clone())?;
            Ok::<_, ScimError>(d.plan_update_group(group, now)?)
        })
        .await?;
    respond_group(&s, Some(&id), StatusCode::OK)
}

async fn patch_group(
    State(s): State<ScimState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ScimError> {
    let (requested, at) = (Instant::now(), Utc::now());
    let id = parse_id(&id, "group")?;
    let ops = body_json(body)?;
    s.identity
        .change("scim", requested, at, |d, now| {
            let old = d
                .group(&id)
                .ok_or_else(|| DirectoryError::NoSuchGroup(id.to_string()))?;
            let mut v = group_json(d, old, true);
            patch(&mut v, &ops)?;
            let group = group_from_json(&v, old.clone())?;
            Ok::<_, ScimError>(d.plan_update_group(group, now)?)
        })
        .await?;
    respond_group(&s, Some(&id), StatusCode::OK)
}

async fn delete_group(
    State(s): State<ScimState>,
    Path(id): Path<String>,
) -> Result<Response, ScimError> {
    let (requested, at) = (Instant::now(), Utc::now());
    let id = parse_id(&id, "group")?;
    s.identity
        .change("scim", requested, at, |d, _| {
            Ok::<_, ScimError>(d.plan_delete_group(&id)?)
        })
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
