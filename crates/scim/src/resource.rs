//! SCIM resources as JSON (RFC 7643) and PATCH (RFC 7644 §3.5.2), mapped onto the
//! identity store's [`User`] and [`Group`].
//!
//! Leniency where IdPs need it: `"active": "False"` (Entra ID sends booleans as strings),
//! operation names in any case (`"Replace"`), PATCH operations without `path` whose value
//! is an object of attributes (Okta, Entra), removing members by a `value` list (Entra) or
//! by a `members[value eq "id"]` path (Okta). Strictness where it protects: an attribute
//! that no schema defines is an `invalidSyntax` error naming it, instead of being dropped
//! without a word.

use std::collections::BTreeSet;

use chrono::{DateTime, SecondsFormat, Utc};
use portcullis_identity::{Directory, Group, User};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::error::ScimError;

pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
pub const ENTERPRISE_SCHEMA: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
/// Our extension: `tags`, which policies see as `principal.tags`.
pub const PORTCULLIS_SCHEMA: &str = "urn:ietf:params:scim:schemas:extension:portcullis:2.0:User";
pub const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
pub const PATCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

/// Every attribute RFC 7643 §4.1 defines for a User (lower case); we store some and accept
/// the others so that IdPs can send their usual payloads.
const USER_ATTRIBUTES: &[&str] = &[
    "schemas",
    "id",
    "externalid",
    "meta",
    "username",
    "name",
    "displayname",
    "nickname",
    "profileurl",
    "title",
    "usertype",
    "preferredlanguage",
    "locale",
    "timezone",
    "active",
    "password",
    "emails",
    "phonenumbers",
    "ims",
    "photos",
    "addresses",
    "groups",
    "entitlements",
    "roles",
    "x509certificates",
];
const GROUP_ATTRIBUTES: &[&str] = &[
    "schemas",
    "id",
    "externalid",
    "meta",
    "displayname",
    "members",
];

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn meta(
    kind: &str,
    id: &Uuid,
    created: DateTime<Utc>,
    modified: DateTime<Utc>,
    version: u64,
) -> Value {
    json!({
        "resourceType": kind,
        "created": time(created),
        "lastModified": time(modified),
        "version": format!("W/\"{version}\""),
        "location": format!("/scim/v2/{kind}s/{id}"),
    })
}

/// The JSON of a user, with its groups (read-only) from the directory.
pub fn user_json(d: &Directory, u: &User) -> Value {
    let groups: Vec<Value> = d
        .groups_of(&u.id)
        .map(|g| json!({"value": g.id, "display": g.display_name, "$ref": format!("/scim/v2/Groups/{}", g.id)}))
        .collect();
    let mut v = json!({
        "schemas": [USER_SCHEMA, PORTCULLIS_SCHEMA],
        "id": u.id,
        "userName": u.user_name,
        "active": u.active,
        "groups": groups,
        PORTCULLIS_SCHEMA: {"tags": u.tags},
        "meta": meta("User", &u.id, u.created, u.modified, u.version),
    });
    if let Some(obj) = v.as_object_mut() {
        if let Some(x) = &u.external_id {
            obj.insert("externalId".into(), json!(x));
        }
        if let Some(x) = &u.display_name {
            obj.insert("displayName".into(), json!(x));
        }
        if !u.email.is_empty() {
            obj.insert(
                "emails".into(),
                json!([{"value": u.email, "type": "work", "primary": true}]),
            );
        }
    }
    v
}

/// The JSON of a group; `members` left out when `with_members` is false (Entra ID asks
/// with `excludedAttributes=members`).
pub fn group_json(d: &Directory, g: &Group, with_members: bool) -> Value {
    let mut v = json!({
        "schemas": [GROUP_SCHEMA],
        "id": g.id,
        "displayName": g.display_name,
        "meta": meta("Group", &g.id, g.created, g.modified, g.version),
    });
    if let Some(obj) = v.as_object_mut() {
        if let Some(x) = &g.external_id {
            obj.insert("externalId".into(), json!(x));
        }
        if with_members {
            let members: Vec<Value> = g
                .members
                .iter()
                .map(|m| {
                    let display = d.user(m).map(|u| u.user_name.clone()).unwrap_or_default();
                    json!({"value": m, "display": display, "$ref": format!("/scim/v2/Users/{m}")})
                })
                .collect();
            obj.insert("members".into(), Value::Array(members));
        }
    }
    v
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, ScimError> {
    v.as_object()
        .ok_or_else(|| ScimError::syntax(format!("{what} must be a JSON object")))
}

fn check_attributes(obj: &Map<String, Value>, known: &[&str], kind: &str) -> Result<(), ScimError> {
    for k in obj.keys() {
        let lower = k.to_ascii_lowercase();
        if !known.contains(&lower.as_str()) && !lower.starts_with("urn:") {
            return Err(ScimError::syntax(format!(
                "unknown attribute {k:?} for a {kind} (see /scim/v2/Schemas)"
            )));
        }
    }
    Ok(())
}

/// Looks an attribute up without case (RFC 7643 §2.1).
fn get<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

fn string(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, ScimError> {
    match get(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ScimError::value(format!(
            "{name} must be a string, not {other}"
        ))),
    }
}

/// A boolean, or a string "true"/"false" in any case (Entra ID).
fn boolean(v: &Value, name: &str) -> Result<bool, ScimError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        other => Err(ScimError::value(format!(
            "{name} must be true or false, not {other}"
        ))),
    }
}

/// Reads a User resource into `base` (its id and times are kept).
pub fn user_from_json(v: &Value, mut base: User) -> Result<User, ScimError> {
    let obj = object(v, "a User")?;
    check_attributes(obj, USER_ATTRIBUTES, "User")?;
    base.user_name =
        string(obj, "userName")?.ok_or_else(|| ScimError::value("userName is required".into()))?;
    base.external_id = string(obj, "externalId")?;
    base.display_name = string(obj, "displayName")?;
    if base.display_name.is_none() {
        if let Some(Value::Object(name)) = get(obj, "name") {
            base.display_name = string(name, "formatted")?;
        }
    }
    base.active = match get(obj, "active") {
        Some(a) => boolean(a, "active")?,
        None => true,
    };
    base.email = String::new();
    if let Some(emails) = get(obj, "emails") {
        let list = emails
            .as_array()
            .ok_or_else(|| ScimError::value("emails must be an array".into()))?;
        let primary = list
            .iter()
            .find(|e| {
                e.get("primary")
                    .is_some_and(|p| boolean(p, "primary").unwrap_or(false))
            })
            .or_else(|| list.first());
        if let Some(e) = primary {
            base.email = e
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| ScimError::value("emails[].value must be a string".into()))?
                .to_string();
        }
    }
    base.tags = Vec::new();
    if let Some(ext) = get(obj, PORTCULLIS_SCHEMA) {
        let ext = object(ext, PORTCULLIS_SCHEMA)?;
        for k in ext.keys() {
            if !k.eq_ignore_ascii_case("tags") {
                return Err(ScimError::syntax(format!(
                    "unknown attribute {k:?} in {PORTCULLIS_SCHEMA}"
                )));
            }
        }
        if let Some(tags) = get(ext, "tags") {
            let tags = tags
                .as_array()
                .ok_or_else(|| ScimError::value("tags must be an array of strings".into()))?;
            let mut set = BTreeSet::new();
            for t in tags {
                let t = t
                    .as_str()
                    .ok_or_else(|| ScimError::value(format!("tag {t} is not a string")))?;
                set.insert(t.to_string());
            }
            base.tags = set.into_iter().collect();
        }
    }
    Ok(base)
}

/// Reads a Group resource into `base`. Member ids must be users of the directory.
pub fn group_from_json(v: &Value, mut base: Group) -> Result<Group, ScimError> {
    let obj = object(v, "a Group")?;
    check_attributes(obj, GROUP_ATTRIBUTES, "Group")?;
    base.display_name = string(obj, "displayName")?
        .ok_or_else(|| ScimError::value("displayName is required".into()))?;
    base.external_id = string(obj, "externalId")?;
    base.members = BTreeSet::new();
    if let Some(members) = get(obj, "members") {
        let list = members
            .as_array()
            .ok_or_else(|| ScimError::value("members must be an array".into()))?;
        for m in list {
            base.members.insert(member_id(m)?);
        }
    }
    Ok(base)
}

fn member_id(m: &Value) -> Result<Uuid, ScimError> {
    let id = m
        .get("value")
        .and_then(Value::as_str)
        .ok_or_else(|| ScimError::value(format!("member {m} has no string value")))?;
    Uuid::parse_str(id).map_err(|_| ScimError::value(format!("member {id:?} is not a user id")))
}

/// Applies a PatchOp request to a resource's JSON.
pub fn patch(resource: &mut Value, request: &Value) -> Result<(), ScimError> {
    let req = object(request, "a PatchOp")?;
    let ops = get(req, "Operations")
        .and_then(Value::as_array)
        .ok_or_else(|| ScimError::syntax("a PatchOp needs an Operations array".into()))?;
    for (i, op) in ops.iter().enumerate() {
        let o = object(op, "an operation")?;
        let kind = string(o, "op")?
            .ok_or_else(|| ScimError::syntax(format!("Operations[{i}] has no op")))?
            .to_ascii_lowercase();
        let path = string(o, "path")?;
        let value = get(o, "value").cloned();
        let target = resource
            .as_object_mut()
            .ok_or_else(|| ScimError::internal("resource is not an object".into()))?;
        refuse_read_only(target, &kind, path.as_deref(), value.as_ref(), i)?;
        match (kind.as_str(), path) {
            ("add" | "replace", None) => {
                let Some(Value::Object(attrs)) = value else {
                    return Err(ScimError::value(format!(
                        "Operations[{i}]: without a path the value must be an object of attributes"
                    )));
                };
                for (k, v) in attrs {
                    set_path(target, &parse_path(&k)?, v, kind == "add")?;
                }
            }
            ("add" | "replace", Some(p)) => {
                let v = value.ok_or_else(|| {
                    ScimError::value(format!("Operations[{i}] ({kind} {p}) has no value"))
                })?;
                set_path(target, &parse_path(&p)?, v, kind == "add")?;
            }
            ("remove", Some(p)) => remove_path(target, &parse_path(&p)?, value.as_ref())?,
            ("remove", None) => {
                return Err(ScimError::new(
                    400,
                    Some("noTarget"),
                    format!("Operations[{i}]: remove needs a path"),
                ))
            }
            (other, _) => {
                return Err(ScimError::syntax(format!(
                    "Operations[{i}]: op {other:?} is not add, replace or remove"
                )))
            }
        }
    }
    Ok(())
}

/// `id` and `meta` are read-only (RFC 7643 3.1): a PATCH that would change them is a 400
/// `mutability` error instead of a 200 that silently ignores it. Setting `id` to its own
/// value (some IdPs echo it) is accepted.
fn refuse_read_only(
    target: &Map<String, Value>,
    kind: &str,
    path: Option<&str>,
    value: Option<&Value>,
    i: usize,
) -> Result<(), ScimError> {
    let touches: Vec<(&str, Option<&Value>)> = match (path, value) {
        (Some(p), v) => {
            let attr = p.split(['.', '[']).next().unwrap_or(p);
            vec![(attr, v)]
        }
        (None, Some(Value::Object(attrs))) => attrs
            .iter()
            .map(|(k, v)| (k.split(['.', '[']).next().unwrap_or(k), Some(v)))
            .collect(),
        _ => Vec::new(),
    };
    for (attr, v) in touches {
        let read_only = attr.eq_ignore_ascii_case("id") || attr.eq_ignore_ascii_case("meta");
        let same = attr.eq_ignore_ascii_case("id")
            && kind != "remove"
            && v.is_some_and(|v| Some(v) == target.get("id"));
        if read_only && !same {
            return Err(ScimError::new(
                400,
                Some("mutability"),
                format!("Operations[{i}]: {attr} is read-only"),
            ));
        }
    }
    Ok(())
}

/// `attr`, `attr.sub`, `attr[filter]`, `attr[filter].sub`, or `urn:...:attr`.
#[derive(Debug, PartialEq, Eq)]
struct Path {
    attr: String,
    filter: Option<crate::filter::Term>,
    sub: Option<String>,
}

fn parse_path(p: &str) -> Result<Path, ScimError> {
    // Extension attributes: the schema URN is the object's key.
    let lower = p.to_ascii_lowercase();
    for schema in [PORTCULLIS_SCHEMA, ENTERPRISE_SCHEMA] {
        if lower.starts_with(&schema.to_ascii_lowercase()) && lower.len() > schema.len() + 1 {
            return Ok(Path {
                attr: schema.to_string(),
                filter: None,
                sub: p.get(schema.len() + 1..).map(str::to_string),
            });
        }
    }
    let (head, sub) = match p.find('[') {
        Some(open) => {
            let close = p
                .rfind(']')
                .filter(|c| *c > open)
                .ok_or_else(|| ScimError::path(format!("unbalanced [ in path {p:?}")))?;
            let inner = p.get(open + 1..close).unwrap_or("");
            let mut terms = crate::filter::parse(inner)
                .map_err(|e| ScimError::path(format!("path {p:?}: {e}")))?;
            if terms.len() != 1 {
                return Err(ScimError::path(format!(
                    "path {p:?}: one eq term supported"
                )));
            }
            let rest = p.get(close + 1..).unwrap_or("");
            let sub = rest.strip_prefix('.').map(str::to_string);
            return Ok(Path {
                attr: p.get(..open).unwrap_or("").to_string(),
                filter: terms.pop(),
                sub,
            });
        }
        None => match p.split_once('.') {
            Some((a, s)) => (a.to_string(), Some(s.to_string())),
            None => (p.to_string(), None),
        },
    };
    if head.is_empty() {
        return Err(ScimError::path(format!("empty attribute in path {p:?}")));
    }
    Ok(Path {
        attr: head,
        filter: None,
        sub,
    })
}

/// The key of `name` in `obj` (without case), or `name` itself for a new attribute.
fn key_of(obj: &Map<String, Value>, name: &str) -> String {
    obj.keys()
        .find(|k| k.eq_ignore_ascii_case(name))
        .cloned()
        .unwrap_or_else(|| name.to_string())
}

fn matches(elem: &Value, term: &crate::filter::Term) -> bool {
    elem.as_object()
        .and_then(|o| get(o, &term.attr))
        .and_then(Value::as_str)
        .is_some_and(|v| v.eq_ignore_ascii_case(&term.value))
}

fn set_path(obj: &mut Map<String, Value>, p: &Path, v: Value, add: bool) -> Result<(), ScimError> {
    let key = key_of(obj, &p.attr);
    match (&p.filter, &p.sub) {
        (None, None) => {
            match (obj.get_mut(&key), v) {
                // add to a multi-valued attribute appends (RFC 7644 §3.5.2.1).
                (Some(Value::Array(existing)), Value::Array(new)) if add => {
                    for n in new {
                        if !existing.contains(&n) {
                            existing.push(n);
                        }
                    }
                }
                (Some(Value::Object(existing)), Value::Object(new)) if add => existing.extend(new),
                (_, v) => {
                    obj.insert(key, v);
                }
            }
            Ok(())
        }
        (None, Some(sub)) => {
            let entry = obj.entry(key).or_insert_with(|| json!({}));
            let inner = entry
                .as_object_mut()
                .ok_or_else(|| ScimError::path(format!("{} is not complex", p.attr)))?;
            let k = key_of(inner, sub);
            inner.insert(k, v);
            Ok(())
        }
        (Some(term), sub) => {
            let list = obj.entry(key).or_insert_with(|| json!([]));
            let list = list
                .as_array_mut()
                .ok_or_else(|| ScimError::path(format!("{} is not multi-valued", p.attr)))?;
            let mut found = false;
            for elem in list.iter_mut().filter(|e| matches(e, term)) {
                found = true;
                match (sub, elem.as_object_mut()) {
                    (Some(sub), Some(o)) => {
                        let k = key_of(o, sub);
                        o.insert(k, v.clone());
                    }
                    _ => *elem = v.clone(),
                }
            }
            if !found {
                // e.g. replace emails[type eq "work"].value on a user without one.
                let mut elem = Map::new();
                elem.insert(term.attr.clone(), json!(term.value));
                if let Some(sub) = sub {
                    elem.insert(sub.clone(), v);
                    list.push(Value::Object(elem));
                } else {
                    list.push(v);
                }
            }
            Ok(())
        }
    }
}

fn remove_path(
    obj: &mut Map<String, Value>,
    p: &Path,
    value: Option<&Value>,
) -> Result<(), ScimError> {
    let key = key_of(obj, &p.attr);
    match (&p.filter, &p.sub) {
        (None, None) => {
            match (obj.get_mut(&key), value) {
                // Entra ID: remove members listed in the value.
                (Some(Value::Array(list)), Some(Value::Array(gone))) => {
                    let gone: Vec<&str> = gone
                        .iter()
                        .filter_map(|g| g.get("value").and_then(Value::as_str))
                        .collect();
                    list.retain(|e| {
                        !e.get("value")
                            .and_then(Value::as_str)
                            .is_some_and(|v| gone.iter().any(|g| g.eq_ignore_ascii_case(v)))
                    });
                }
                _ => {
                    obj.remove(&key);
                }
            }
            Ok(())
        }
        (None, Some(sub)) => {
            if let Some(Value::Object(inner)) = obj.get_mut(&key) {
                let k = key_of(inner, sub);
                inner.remove(&k);
            }
            Ok(())
        }
        (Some(term), sub) => {
            if let Some(Value::Array(list)) = obj.get_mut(&key) {
                match sub {
                    None => list.retain(|e| !matches(e, term)),
                    Some(sub) => {
                        for e in list.iter_mut().filter(|e| matches(e, term)) {
                            if let Some(o) = e.as_object_mut() {
                                let k = key_of(o, sub);
                                o.remove(&k);
                            }
                        }
                    }
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn alice() -> Value {
        json!({"schemas": [USER_SCHEMA], "userName": "alice", "active": true,
               "emails": [{"value": "a@x", "type": "work", "primary": true}],
               "members": [{"value": "1"}, {"value": "2"}]})
    }

    fn ops(v: Value) -> Value {
        json!({"schemas": [PATCH_SCHEMA], "Operations": v})
    }

    #[test]
    fn entra_replace_without_path_and_string_booleans() {
        let mut r = alice();
        patch(
            &mut r,
            &ops(json!([{"op": "Replace", "value": {"active": "False"}}])),
        )
        .unwrap();
        assert_eq!(r["active"], "False");
        r.as_object_mut().unwrap().remove("members");
        let u = user_from_json(&r, crate::blank_user()).unwrap();
        assert!(!u.active);
        assert_eq!(u.email, "a@x");
    }

    #[test]
    fn okta_and_entra_member_removal() {
        let mut r = alice();
        patch(
            &mut r,
            &ops(json!([{"op": "remove", "path": "members[value eq \"1\"]"}])),
        )
        .unwrap();
        assert_eq!(r["members"], json!([{"value": "2"}]));
        let mut r = alice();
        patch(
            &mut r,
            &ops(json!([{"op": "Remove", "path": "members", "value": [{"value": "2"}]}])),
        )
        .unwrap();
        assert_eq!(r["members"], json!([{"value": "1"}]));
        patch(&mut r, &ops(json!([{"op": "add", "path": "members", "value": [{"value": "3"}, {"value": "1"}]}]))).unwrap();
        assert_eq!(r["members"], json!([{"value": "1"}, {"value": "3"}]));
    }

    #[test]
    fn paths_with_filters_and_extensions() {
        let mut r = alice();
        patch(
            &mut r,
            &ops(json!([
                {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "new@x"},
                {"op": "add", "path": format!("{PORTCULLIS_SCHEMA}:tags"), "value": ["oncall"]},
                {"op": "replace", "path": "name.givenName", "value": "Alice"},
            ])),
        )
        .unwrap();
        assert_eq!(r["emails"][0]["value"], "new@x");
        assert_eq!(r[PORTCULLIS_SCHEMA]["tags"], json!(["oncall"]));
        assert_eq!(r["name"]["givenName"], "Alice");
    }

    #[test]
    fn bad_operations_are_named() {
        let mut r = alice();
        for (op, needle) in [
            (json!([{"op": "move", "path": "x"}]), "move"),
            (json!([{"op": "remove"}]), "path"),
            (
                json!([{"op": "add", "path": "emails[type sw \"w\"]", "value": 1}]),
                "sw",
            ),
            (json!([{"op": "replace", "value": 3}]), "object"),
            (
                json!([{"op": "replace", "path": "id", "value": "other"}]),
                "read-only",
            ),
            (
                json!([{"op": "replace", "value": {"id": "other", "active": false}}]),
                "read-only",
            ),
            (json!([{"op": "remove", "path": "meta"}]), "read-only"),
        ] {
            let e = patch(&mut r, &ops(op)).unwrap_err();
            assert!(e.detail.contains(needle), "{}", e.detail);
        }
        assert!(patch(&mut r, &json!({"Operations": 1})).is_err());
    }

    #[test]
    fn unknown_attributes_are_refused_by_name() {
        let e = group_from_json(
            &json!({"displayName": "sre", "colour": "red"}),
            crate::blank_group(),
        )
        .unwrap_err();
        assert!(e.detail.contains("colour"), "{}", e.detail);
    }
}
