//! The policy, network and group routes of the admin API (the caller adds
//! authentication; paths shown under `/api/v1`):
//! - `GET /policies`: the policy directory's files as they are on disk, their `version`
//!   (also the `ETag`), and the set the gateway runs (ids, file:line:col, effect).
//! - `POST /policies/validate` (a [`PolicyFiles`] body): checks a set without applying
//!   it. 200 `{"valid": true, "policies": [...], "warnings": [...]}` or
//!   `{"valid": false, "errors": [{"file","line","col","message"}]}`.
//! - `PUT /policies` (a [`PolicyFiles`] body, optional `If-Match: "<version>"`): replaces
//!   the directory's files and applies the set in one step. 422 with the located errors
//!   when it does not validate (nothing is written); 412 when the directory changed since
//!   `version`; 409 when the running gateway refuses it (the previous files are put back).
//!   Flows the new set denies are cut before the answer, as on a SIGHUP reload.
//! - `GET /networks`: the running set's networks (name, parent, CIDRs, tags).
//! - `GET /groups`: every group an identity source, the configuration or a policy names,
//!   with its active members and whether a policy refers to it.
//!
//! The `policies/tests` directory is not touched: `portcullis policy test` owns it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use portcullis_policy::{PolicyBundle, SourceError, Sources, NETWORKS_FILE, SCHEMA_FILE};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::api::{ask, body, AdminState, ApiError};
use portcullis_control::Command;

/// A policy directory's files, as the API carries them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFiles {
    /// `schema.cedarschema`.
    pub schema: String,
    /// `networks.toml`; absent: no declared networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<String>,
    /// File name (`*.cedar`, no directories) → text.
    pub policies: BTreeMap<String, String>,
}

impl PolicyFiles {
    pub(crate) fn from_sources(s: &Sources) -> PolicyFiles {
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        PolicyFiles {
            schema: s.schema.1.clone(),
            networks: s.networks.as_ref().map(|(_, t)| t.clone()),
            policies: s
                .policies
                .iter()
                .map(|(p, t)| (name(p), t.clone()))
                .collect(),
        }
    }

    fn to_sources(&self, dir: &Path) -> Sources {
        Sources {
            dir: dir.to_path_buf(),
            schema: (dir.join(SCHEMA_FILE), self.schema.clone()),
            networks: self
                .networks
                .as_ref()
                .map(|t| (dir.join(NETWORKS_FILE), t.clone())),
            policies: self
                .policies
                .iter()
                .map(|(n, t)| (dir.join(n), t.clone()))
                .collect(),
        }
    }

    /// A digest of the contents: what `If-Match` compares.
    pub fn version(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |name: &str, text: &str| {
            // Length-prefixed, so no two different sets hash the same input.
            for part in [name, text] {
                h.update((part.len() as u64).to_be_bytes());
                h.update(part.as_bytes());
            }
        };
        field(SCHEMA_FILE, &self.schema);
        if let Some(n) = &self.networks {
            field(NETWORKS_FILE, n);
        }
        for (name, text) in &self.policies {
            field(name, text);
        }
        hex::encode(h.finalize())
    }

    /// File names are plain `*.cedar` names: no path, no hidden files, no surprises.
    fn check_names(&self) -> Result<(), ApiError> {
        if self.policies.is_empty() {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "policies: at least one .cedar file is needed".into(),
            ));
        }
        for (name, text) in &self.policies {
            let stem = name.strip_suffix(".cedar").unwrap_or_default();
            let ok = !stem.is_empty()
                && name.len() <= 100
                && !stem.starts_with(['.', '-'])
                && stem
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("policies: file name {name:?} must be <letters, digits, - _ .>.cedar"),
                ));
            }
            check_size(name, text)?;
        }
        check_size(SCHEMA_FILE, &self.schema)?;
        if let Some(n) = &self.networks {
            check_size(NETWORKS_FILE, n)?;
        }
        Ok(())
    }
}

fn check_size(name: &str, text: &str) -> Result<(), ApiError> {
    if text.len() as u64 > portcullis_policy::MAX_FILE_BYTES {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{name}: {} bytes, over the {}-byte limit",
                text.len(),
                portcullis_policy::MAX_FILE_BYTES
            ),
        ));
    }
    Ok(())
}

/// One located problem; `file` is relative to the policy directory.
#[derive(Debug, Serialize)]
pub(crate) struct Problem {
    pub(crate) file: String,
    pub(crate) line: usize,
    pub(crate) col: usize,
    pub(crate) message: String,
}

fn problems(dir: &Path, errors: &[SourceError]) -> Vec<Problem> {
    errors
        .iter()
        .map(|e| Problem {
            file: e
                .file
                .strip_prefix(dir)
                .unwrap_or(&e.file)
                .display()
                .to_string(),
            line: e.line,
            col: e.col,
            message: e.message.clone(),
        })
        .collect()
}

/// The routes (the caller adds authentication).
pub(crate) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/policies", get(read).put(replace))
        .route("/policies/validate", post(validate))
        .route("/networks", get(networks))
        .route("/groups", get(groups))
}

/// The running bundle, from the event loop.
async fn running(s: &AdminState) -> Result<Arc<PolicyBundle>, ApiError> {
    ask(s, Command::Policy).await.map_err(|_| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down".into(),
        )
    })
}

pub(crate) async fn read_dir(dir: PathBuf) -> Result<PolicyFiles, ApiError> {
    let d = dir.clone();
    match tokio::task::spawn_blocking(move || Sources::read(&d)).await {
        Ok(Ok(sources)) => Ok(PolicyFiles::from_sources(&sources)),
        Ok(Err(e)) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("policy directory {}: {e}", dir.display()),
        )),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn read(State(s): State<AdminState>) -> Result<Response, ApiError> {
    let bundle = running(&s).await?;
    let files = read_dir(s.policy_dir.to_path_buf()).await?;
    let version = files.version();
    let running: Vec<_> = bundle
        .policies()
        .iter()
        .map(|p| {
            json!({
                "id": p.id,
                "file": p.file.strip_prefix(&bundle.dir).unwrap_or(&p.file).display().to_string(),
                "line": p.line,
                "col": p.col,
                "effect": p.effect,
            })
        })
        .collect();
    let etag = format!("\"{version}\"");
    Ok((
        [(header::ETAG, etag)],
        Json(json!({
            "dir": s.policy_dir.display().to_string(),
            "version": version,
            "files": files,
            "running": running,
        })),
    )
        .into_response())
}

/// Validates off the async threads (Cedar validation of a large set takes a while).
/// With `sites` (the cluster's `[[cluster.sites]]`), a network naming another site is
/// refused at its file:line:col: no node would serve it.
pub(crate) async fn build(
    dir: &Path,
    files: &PolicyFiles,
    sites: Vec<String>,
) -> Result<Result<PolicyBundle, Vec<Problem>>, ApiError> {
    let sources = files.to_sources(dir);
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let bundle = PolicyBundle::from_sources(sources).map_err(|e| problems(&dir, &e.errors))?;
        if !sites.is_empty() {
            let known: Vec<&str> = sites.iter().map(String::as_str).collect();
            let unknown = bundle.networks().unknown_sites(&known);
            if !unknown.is_empty() {
                return Err(problems(&dir, &unknown));
            }
        }
        Ok(bundle)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn validate(
    State(s): State<AdminState>,
    b: Result<Json<PolicyFiles>, JsonRejection>,
) -> Result<Response, ApiError> {
    let files = body(b)?;
    files.check_names()?;
    Ok(
        match build(&s.policy_dir, &files, s.scope.site_names()).await? {
            Ok(bundle) => Json(json!({
                "valid": true,
                "version": files.version(),
                "policies": bundle.policies().iter().map(|p| &p.id).collect::<Vec<_>>(),
                "warnings": problems(&s.policy_dir, &bundle.warnings),
            }))
            .into_response(),
            Err(errors) => Json(json!({"valid": false, "errors": errors})).into_response(),
        },
    )
}

async fn replace(
    State(s): State<AdminState>,
    headers: HeaderMap,
    b: Result<Json<PolicyFiles>, JsonRejection>,
) -> Result<Response, ApiError> {
    let files = body(b)?;
    files.check_names()?;
    let bundle = match build(&s.policy_dir, &files, s.scope.site_names()).await? {
        Ok(b) => b,
        Err(errors) => {
            return Ok((
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": "the policy set does not validate; nothing was changed", "errors": errors})),
            )
                .into_response())
        }
    };
    // One replacement at a time: the If-Match check and the write are one step.
    let _guard = s.policy_lock.lock().await;
    let previous = read_dir(s.policy_dir.to_path_buf()).await?;
    let expected = headers
        .get(header::IF_MATCH)
        .map(|v| v.to_str().unwrap_or_default().trim().to_string());
    match &s.cluster_policy {
        // The cluster's set is the one If-Match speaks of; stored first, then applied
        // here (and by every other node from the change log).
        Some(cp) => cp.store(&files, expected.as_deref()).await?,
        None => {
            if let Some(expected) = &expected {
                if !if_match(expected, &previous.version()) {
                    return Err(ApiError(
                        StatusCode::PRECONDITION_FAILED,
                        format!(
                            "the policy directory changed: its version is {}, not {expected}",
                            previous.version()
                        ),
                    ));
                }
            }
        }
    }
    write_files(&s.policy_dir, &files, &previous).await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let applied = match s
        .commands
        .send(Command::ApplyPolicy(Arc::new(bundle), tx))
        .await
    {
        Ok(()) => rx
            .await
            .unwrap_or_else(|_| Err("the gateway is shutting down".into())),
        Err(_) => Err("the gateway is shutting down".into()),
    };
    match applied {
        Ok(flows_cut) => {
            let version = files.version();
            if let Some(cp) = &s.cluster_policy {
                cp.ran(&version);
            }
            Ok((
                [(header::ETAG, format!("\"{version}\""))],
                Json(json!({"version": version, "flows_cut": flows_cut})),
            )
                .into_response())
        }
        Err(reason) => {
            // The files on disk must be the set that runs.
            write_files(&s.policy_dir, &previous, &files).await?;
            Err(ApiError(
                StatusCode::CONFLICT,
                format!("the gateway refused the policy set, the previous one stays: {reason}"),
            ))
        }
    }
}

/// Whether an `If-Match` value names `version`: `*` matches any current version (RFC
/// 9110 13.1.1); a list matches if any entry does; weak tags compare by their value.
pub(crate) fn if_match(expected: &str, version: &str) -> bool {
    expected == "*"
        || expected
            .split(',')
            .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
            .any(|t| t == version)
}

/// Writes `new` over `old`: each file through a temporary and a rename, then removes
/// what `new` no longer has. A reload that runs meanwhile sees a mix and is refused or
/// applies a valid set; the API's own apply follows with the complete set.
pub(crate) async fn write_files(
    dir: &Path,
    new: &PolicyFiles,
    old: &PolicyFiles,
) -> Result<(), ApiError> {
    let dir = dir.to_path_buf();
    let (new, old) = (new.clone(), old.clone());
    let r = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let put = |name: &str, text: &str| -> std::io::Result<()> {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, dir.join(name))
        };
        put(SCHEMA_FILE, &new.schema)?;
        match &new.networks {
            Some(n) => put(NETWORKS_FILE, n)?,
            None if old.networks.is_some() => std::fs::remove_file(dir.join(NETWORKS_FILE))?,
            None => {}
        }
        for (name, text) in &new.policies {
            put(name, text)?;
        }
        for name in old
            .policies
            .keys()
            .filter(|n| !new.policies.contains_key(*n))
        {
            std::fs::remove_file(dir.join(name))?;
        }
        std::fs::File::open(&dir)?.sync_all()
    })
    .await;
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("writing the policy directory: {e}"),
        )),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn networks(State(s): State<AdminState>) -> Result<Response, ApiError> {
    let bundle = running(&s).await?;
    let rows: Vec<_> = bundle
        .networks()
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "parent": n.parent,
                "cidrs": n.cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                "tags": n.tags,
            })
        })
        .collect();
    Ok(Json(rows).into_response())
}

/// A group as `GET /groups` shows it.
#[derive(Debug, Default, Serialize)]
struct GroupRow {
    name: String,
    /// Where the group is defined: `config`, an identity source (`scim`, `ldap`), or
    /// nothing when only a policy names it.
    sources: BTreeSet<String>,
    /// Active users in the group.
    members: BTreeSet<String>,
    /// A policy refers to the group.
    in_policies: bool,
}

fn row<'a>(rows: &'a mut BTreeMap<String, GroupRow>, name: &str) -> &'a mut GroupRow {
    rows.entry(name.to_string()).or_insert_with(|| GroupRow {
        name: name.to_string(),
        ..GroupRow::default()
    })
}

async fn groups(State(s): State<AdminState>) -> Result<Response, ApiError> {
    let bundle = running(&s).await?;
    let users = ask(&s, Command::Users).await.map_err(|_| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down".into(),
        )
    })?;
    let mut rows: BTreeMap<String, GroupRow> = BTreeMap::new();
    for u in &users {
        for g in &u.groups {
            let r = row(&mut rows, g);
            r.members.insert(u.name.clone());
            if u.source == "config" {
                r.sources.insert("config".into());
            }
        }
    }
    if let Some(identity) = &s.identity {
        identity.read(|d| {
            for g in d.groups() {
                row(&mut rows, &g.display_name)
                    .sources
                    .insert(g.source.clone());
            }
        });
    }
    for g in bundle.referenced_groups() {
        row(&mut rows, &g).in_policies = true;
    }
    Ok(Json(rows.into_values().collect::<Vec<_>>()).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    fn files(names: &[&str]) -> PolicyFiles {
        PolicyFiles {
            schema: "entity User;".into(),
            networks: None,
            policies: names
                .iter()
                .map(|n| (n.to_string(), "permit(principal, action, resource);".into()))
                .collect(),
        }
    }

    #[test]
    fn file_names_are_plain_cedar_names() {
        for good in ["access.cedar", "10-base.cedar", "a_b.c.cedar"] {
            assert!(files(&[good]).check_names().is_ok(), "{good}");
        }
        for bad in [
            "../x.cedar",
            "a/b.cedar",
            ".hidden.cedar",
            "x.txt",
            ".cedar",
            "-x.cedar",
            "a b.cedar",
            "x.cedar/",
        ] {
            let e = files(&[bad]).check_names().unwrap_err();
            assert_eq!(e.0, StatusCode::BAD_REQUEST, "{bad}");
            assert!(e.1.contains(bad), "{}", e.1);
        }
        assert!(files(&[]).check_names().is_err());
    }

    #[test]
    fn the_version_changes_with_any_byte_and_not_with_nothing() {
        let a = files(&["a.cedar"]);
        assert_eq!(a.version(), a.clone().version());
        let mut b = a.clone();
        b.networks = Some(String::new());
        assert_ne!(a.version(), b.version());
        let mut c = a.clone();
        c.policies.insert(
            "a.cedar".into(),
            "permit(principal, action, resource); ".into(),
        );
        assert_ne!(a.version(), c.version());
        // Moving text between fields is a different set.
        let d = PolicyFiles {
            schema: "entity User;permit".into(),
            ..files(&[])
        };
        let e = PolicyFiles {
            schema: "entity User;".into(),
            ..files(&[])
        };
        assert_ne!(d.version(), e.version());
    }
}
