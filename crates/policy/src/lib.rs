//! The Cedar policy engine of Portcullis.
//!
//! What it does:
//! - loads a policy directory ([`PolicyBundle::load`]): `schema.cedarschema` (required),
//!   every `*.cedar` file (sorted by name), and `networks.toml` (optional); parses and
//!   strictly validates everything, and reports each problem as `file:line:col` with a
//!   caret excerpt ([`SourceError`]). A bundle is complete or it is not built: there is no
//!   half-applied policy set.
//! - resolves a destination address to the most specific declared network (longest
//!   prefix), or `Network::"internet"`;
//! - decides a flow ([`Engine::decide`]): `User::"name"` (in its `Group`s) asking
//!   `Action::"connect"` on the destination's `Network`, with the flow in `context`.
//!
//! Policy ids: a policy's `@id("…")` annotation when it has one (recommended: audit rows
//! carry it), else `<file name>#<index in file>`. Ids are unique across the directory.
//!
//! What it deliberately does not: no IO beyond reading the directory at load time, no
//! clock (callers pass `now`), no caching yet (each call evaluates the whole set).

mod analysis;
pub mod approval;
mod compile;
mod diagnostics;
mod engine;
pub mod explain;
pub mod grants;
pub mod limits;
mod networks;
pub mod synth;
pub mod testing;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use analysis::{ContextReads, PolicyMeta, Scope};
use cedar_policy::{
    Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet, RestrictedExpression, Schema,
    ValidationMode, Validator,
};
pub use diagnostics::{line_col, SourceError};
pub use engine::{Engine, EngineStats, EntitiesError};
pub use networks::{Network, Networks, INTERNET};

/// Largest file read from a policy directory.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// The schema file name inside a policy directory.
pub const SCHEMA_FILE: &str = "schema.cedarschema";
/// The networks file name inside a policy directory.
pub const NETWORKS_FILE: &str = "networks.toml";

/// A policy directory that failed to load: every problem found, located.
#[derive(Debug, thiserror::Error)]
#[error("{}", render(.errors))]
pub struct LoadError {
    pub errors: Vec<SourceError>,
}

fn render(errors: &[SourceError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The contents of a policy directory, read or generated.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub dir: PathBuf,
    /// (path, text) of the schema.
    pub schema: (PathBuf, String),
    pub networks: Option<(PathBuf, String)>,
    /// (path, text) of each `.cedar` file, in load order.
    pub policies: Vec<(PathBuf, String)>,
}

impl Sources {
    /// Reads a policy directory's files (the schema, `networks.toml` if present, every
    /// `*.cedar` sorted by name) without parsing them; any unreadable file is an error.
    pub fn read(dir: &Path) -> Result<Sources, LoadError> {
        match Sources::read_lenient(dir)? {
            (sources, errors) if errors.is_empty() => Ok(sources),
            (_, errors) => Err(LoadError { errors }),
        }
    }

    /// What could be read, and the files that could not (the schema is required).
    fn read_lenient(dir: &Path) -> Result<(Sources, Vec<SourceError>), LoadError> {
        let schema_path = dir.join(SCHEMA_FILE);
        let schema_src = read_capped(&schema_path).map_err(|e| LoadError { errors: vec![e] })?;
        let networks_path = dir.join(NETWORKS_FILE);
        let mut errors = Vec::new();
        let networks_src = if networks_path.exists() {
            match read_capped(&networks_path) {
                Ok(src) => Some(src),
                Err(e) => {
                    errors.push(e);
                    None
                }
            }
        } else {
            None
        };
        let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cedar") && p.is_file())
                .collect(),
            Err(e) => {
                return Err(LoadError {
                    errors: vec![SourceError::file(
                        dir,
                        format!("cannot read directory: {e}"),
                    )],
                })
            }
        };
        paths.sort();
        let mut files = Vec::new();
        for path in paths {
            match read_capped(&path) {
                Ok(src) => files.push((path, src)),
                Err(e) => errors.push(e),
            }
        }
        let sources = Sources {
            dir: dir.to_path_buf(),
            schema: (schema_path, schema_src),
            networks: networks_src.map(|s| (networks_path, s)),
            policies: files,
        };
        Ok((sources, errors))
    }
}

/// Where a policy came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyInfo {
    pub id: String,
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    /// "permit" or "forbid".
    pub effect: String,
}

/// A loaded, validated policy directory. Immutable; a reload builds a new one.
#[derive(Debug)]
pub struct PolicyBundle {
    pub dir: PathBuf,
    schema: Schema,
    policies: PolicySet,
    info: Vec<PolicyInfo>,
    /// What each policy can match and reads, in `info` order.
    pub(crate) metas: Vec<PolicyMeta>,
    /// One single-policy set per policy, built once: slices evaluate these instead of
    /// building a set per slice (building costs ~0.8 µs per policy).
    pub(crate) singles: Vec<PolicySet>,
    /// Conditions compiled to native evaluation, where the policy's shape allows.
    pub(crate) compiled: Vec<Option<compile::Compiled>>,
    networks: Networks,
    /// Non-fatal findings (Cedar validation warnings).
    pub warnings: Vec<SourceError>,
}

impl PolicyBundle {
    /// Loads and validates a policy directory. All errors are collected before failing.
    pub fn load(dir: &Path) -> Result<PolicyBundle, LoadError> {
        let (sources, mut errors) = Sources::read_lenient(dir)?;
        match PolicyBundle::from_sources(sources) {
            Ok(b) if errors.is_empty() => Ok(b),
            Ok(_) => Err(LoadError { errors }),
            Err(mut e) => {
                errors.append(&mut e.errors);
                Err(LoadError { errors })
            }
        }
    }

    /// Builds a bundle from sources in memory (file names are used in errors and ids).
    /// Parsing and validation run on a thread of their own with a large stack, after the
    /// text passed the [`limits`] (see there why).
    pub fn from_sources(sources: Sources) -> Result<PolicyBundle, LoadError> {
        let dir = sources.dir.clone();
        limits::on_parse_stack(move || PolicyBundle::from_sources_here(sources)).unwrap_or_else(
            || {
                Err(LoadError {
                    errors: vec![SourceError::file(
                        &dir,
                        "the policy parser could not run (no thread for it)".into(),
                    )],
                })
            },
        )
    }

    fn from_sources_here(sources: Sources) -> Result<PolicyBundle, LoadError> {
        let mut errors = Vec::new();
        let dir = sources.dir;
        let (schema_path, schema_src) = sources.schema;
        if let Err(e) = limits::lexical(&schema_path, &schema_src, limits::Grammar::Schema) {
            return Err(LoadError { errors: vec![e] });
        }
        let schema = match Schema::from_cedarschema_str(&schema_src) {
            Ok((schema, _warnings)) => schema,
            Err(e) => {
                return Err(LoadError {
                    errors: vec![SourceError::from_diagnostic(
                        &schema_path,
                        &schema_src,
                        &e,
                        0,
                    )],
                })
            }
        };
        let networks = match &sources.networks {
            Some((path, src)) => Networks::parse(path, src).unwrap_or_else(|e| {
                errors.extend(e);
                Networks::default()
            }),
            None => Networks::default(),
        };
        let validator = Validator::new(schema.clone());
        let mut policies = PolicySet::new();
        let mut info: Vec<PolicyInfo> = Vec::new();
        let mut list = Vec::new();
        let mut warnings = Vec::new();
        for (file, src) in &sources.policies {
            let src = src.as_str();
            if let Err(e) = limits::lexical(file, src, limits::Grammar::Policy) {
                errors.push(e);
                continue;
            }
            let set = match PolicySet::from_str(src) {
                Ok(set) => set,
                Err(e) => {
                    for err in e.iter() {
                        errors.push(SourceError::from_diagnostic(file, src, err, 0));
                    }
                    continue;
                }
            };
            if set.templates().next().is_some() {
                errors.push(SourceError::file(
                    file,
                    "policy templates (?principal / ?resource) are not supported".into(),
                ));
                continue;
            }
            let starts = policy_starts(src);
            let file_name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Rename first (to the @id, or file#index), so validation messages name them.
            let mut renamed_here = Vec::new();
            for policy in set.policies() {
                // Cedar numbers a file's policies policy0, policy1, … in source order.
                let index: usize = policy
                    .id()
                    .to_string()
                    .trim_start_matches("policy")
                    .parse()
                    .unwrap_or(0);
                let offset = starts.get(index).copied().unwrap_or(0);
                let (line, col) = line_col(src, offset);
                let id = policy
                    .annotation("id")
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{file_name}#{index}"));
                let earlier = info
                    .iter()
                    .map(|p| (p.id.as_str(), p.file.as_path(), p.line))
                    .chain(renamed_here.iter().map(
                        |(_, i): &(cedar_policy::Policy, PolicyInfo)| {
                            (i.id.as_str(), i.file.as_path(), i.line)
                        },
                    ))
                    .find(|(other, _, _)| *other == id)
                    .map(|(_, f, l)| (f.display().to_string(), l));
                if let Some((prev_file, prev_line)) = earlier {
                    errors.push(SourceError::at(
                        file,
                        src,
                        line,
                        col,
                        format!(
                            "duplicate policy id {id:?} (first defined at {prev_file}:{prev_line})"
                        ),
                    ));
                    continue;
                }
                let depth_error = match policy.to_json() {
                    Ok(j) => limits::expression_depth(file, src, offset, &id, &j),
                    Err(e) => Some(SourceError::at(
                        file,
                        src,
                        line,
                        col,
                        format!("policy {id:?} cannot be analysed: {e}"),
                    )),
                };
                if let Some(e) = depth_error {
                    errors.push(e);
                    continue;
                }
                let effect = match policy.effect() {
                    cedar_policy::Effect::Permit => "permit",
                    cedar_policy::Effect::Forbid => "forbid",
                };
                renamed_here.push((
                    policy.new_id(PolicyId::new(&id)),
                    PolicyInfo {
                        id,
                        file: file.clone(),
                        line,
                        col,
                        effect: effect.into(),
                    },
                ));
            }
            renamed_here.sort_by_key(|(_, i)| (i.line, i.col));
            let file_set =
                match PolicySet::from_policies(renamed_here.iter().map(|(p, _)| p.clone())) {
                    Ok(set) => set,
                    Err(e) => {
                        errors.push(SourceError::file(file, e.to_string()));
                        continue;
                    }
                };
            let result = validator.validate(&file_set, ValidationMode::Strict);
            for e in result.validation_errors() {
                errors.push(SourceError::from_diagnostic(file, src, e, 0));
            }
            for w in result.validation_warnings() {
                warnings.push(SourceError::from_diagnostic(file, src, w, 0));
            }
            for (policy, pinfo) in renamed_here {
                // A permit for every action also grants approving access requests.
                if policy.effect() == cedar_policy::Effect::Permit
                    && matches!(
                        policy.action_constraint(),
                        cedar_policy::ActionConstraint::Any
                    )
                {
                    warnings.push(SourceError::at(
                        file,
                        src,
                        pinfo.line,
                        pinfo.col,
                        format!(
                            "policy {} permits every action: it also lets its principals approve access requests (approve_access); write `action == Action::\"connect\"` if that is not meant",
                            pinfo.id
                        ),
                    ));
                }
                if let Err(e) = policies.add(policy.clone()) {
                    errors.push(SourceError::at(
                        file,
                        src,
                        pinfo.line,
                        pinfo.col,
                        e.to_string(),
                    ));
                    continue;
                }
                list.push(policy);
                info.push(pinfo);
            }
        }
        if !errors.is_empty() {
            return Err(LoadError { errors });
        }
        let metas = list.iter().map(PolicyMeta::of).collect();
        let compiled = list
            .iter()
            .map(|p| p.to_json().ok().and_then(|j| compile::Compiled::of(&j)))
            .collect();
        let singles = list
            .iter()
            .map(|p| PolicySet::from_policies([p.clone()]).unwrap_or_default())
            .collect();
        Ok(PolicyBundle {
            dir,
            schema,
            policies,
            info,
            metas,
            singles,
            compiled,
            networks,
            warnings,
        })
    }

    pub fn networks(&self) -> &Networks {
        &self.networks
    }

    pub fn policies(&self) -> &[PolicyInfo] {
        &self.info
    }

    pub fn policy(&self, id: &str) -> Option<&PolicyInfo> {
        self.info.iter().find(|p| p.id == id)
    }

    pub(crate) fn schema(&self) -> &Schema {
        &self.schema
    }

    pub(crate) fn policy_set(&self) -> &PolicySet {
        &self.policies
    }

    /// The declared networks some `permit` could let `user` (in `groups`) reach, with
    /// conditions ignored: a superset of what the policies allow, for the AllowedIPs of
    /// the user's WireGuard profile (what the tunnel should carry). A `forbid` never
    /// removes a network here: its conditions may not hold.
    pub fn reachable_networks(&self, user: &str, groups: &[String]) -> Vec<&Network> {
        let principal_ancestors = || groups.iter().map(|g| ("Group", g.as_str()));
        let permits: Vec<&PolicyMeta> = self
            .metas
            .iter()
            .filter(|m| {
                !m.forbid && m.connect && m.principal.matches("User", user, principal_ancestors())
            })
            .collect();
        self.networks
            .iter()
            .filter(|n| {
                permits.iter().any(|m| {
                    m.resource.matches(
                        "Network",
                        &n.name,
                        self.networks.ancestors(&n.name).map(|a| ("Network", a)),
                    )
                })
            })
            .collect()
    }

    /// Groups the policies name (scopes and conditions), for "no identity has this group"
    /// warnings.
    pub fn referenced_groups(&self) -> BTreeSet<String> {
        self.metas
            .iter()
            .flat_map(|m| m.groups.iter().cloned())
            .collect()
    }

    /// Groups the policies name that none of `known` is: likely typos, or groups only an
    /// identity source provides.
    pub fn unknown_groups<'a>(&self, known: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let known: BTreeSet<&str> = known.into_iter().collect();
        self.referenced_groups()
            .into_iter()
            .filter(|g| !known.contains(g.as_str()))
            .collect()
    }

    pub(crate) fn network_entities(&self) -> Vec<Entity> {
        let mut out: Vec<Entity> = self
            .networks
            .iter()
            .map(|n| {
                let parents = n
                    .parent
                    .iter()
                    .map(|p| uid("Network", p))
                    .collect::<HashSet<_>>();
                Entity::new(
                    uid("Network", &n.name),
                    HashMap::from([("tags".to_string(), string_set(&n.tags))]),
                    parents,
                )
                .map_err(Box::new)
            })
            .filter_map(|e| e.ok())
            .collect();
        if let Ok(internet) = Entity::new(
            uid("Network", INTERNET),
            HashMap::from([("tags".to_string(), string_set(&[]))]),
            HashSet::new(),
        ) {
            out.push(internet);
        }
        out
    }
}

fn read_capped(path: &Path) -> Result<String, SourceError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| SourceError::file(path, format!("cannot read: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(SourceError::file(
            path,
            format!(
                "file is {} bytes, over the {MAX_FILE_BYTES}-byte limit",
                meta.len()
            ),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| SourceError::file(path, format!("cannot read: {e}")))
}

/// Byte offsets where each top-level Cedar statement starts (annotations included).
/// Cedar has only `//` comments; strings may contain `;` and `//`.
fn policy_starts(src: &str) -> Vec<usize> {
    let b = src.as_bytes();
    let mut starts = Vec::new();
    let mut depth = 0i32;
    let mut in_stmt = false;
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'/' {
            if let Some(next) = limits::skip_comment_or_string(b, i) {
                i = next;
                continue;
            }
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if !in_stmt {
            starts.push(i);
            in_stmt = true;
        }
        match c {
            b'"' => {
                i = limits::skip_comment_or_string(b, i).unwrap_or(b.len());
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b';' if depth == 0 => in_stmt = false,
            _ => {}
        }
        i += 1;
    }
    starts
}

pub(crate) fn uid(kind: &str, id: &str) -> EntityUid {
    // Entity type names used here are fixed identifiers and always parse.
    let ty = EntityTypeName::from_str(kind).unwrap_or_else(|_| unreachable_type());
    EntityUid::from_type_name_and_id(ty, EntityId::new(id))
}

#[allow(clippy::panic)]
fn unreachable_type() -> EntityTypeName {
    panic!("built-in entity type name failed to parse")
}

pub(crate) fn string_set(items: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(
        items
            .iter()
            .map(|s| RestrictedExpression::new_string(s.clone())),
    )
}

#[cfg(test)]
mod tests;
