//! The discovery endpoints (RFC 7644 §4): what this service provider supports.

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use crate::resource::{GROUP_SCHEMA, LIST_SCHEMA, PORTCULLIS_SCHEMA, USER_SCHEMA};
use crate::{scim_json, MAX_PAGE};

pub async fn service_provider_config() -> Response {
    scim_json(
        StatusCode::OK,
        &json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
            "patch": {"supported": true},
            "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
            "filter": {"supported": true, "maxResults": MAX_PAGE},
            "changePassword": {"supported": false},
            "sort": {"supported": false},
            "etag": {"supported": false},
            "authenticationSchemes": [{
                "type": "oauthbearertoken",
                "name": "Bearer token",
                "description": "Authorization: Bearer <token from [scim] token_file>",
                "primary": true
            }],
            "meta": {"resourceType": "ServiceProviderConfig", "location": "/scim/v2/ServiceProviderConfig"}
        }),
    )
}

fn list(resources: Vec<Value>) -> Response {
    scim_json(
        StatusCode::OK,
        &json!({
            "schemas": [LIST_SCHEMA],
            "totalResults": resources.len(),
            "startIndex": 1,
            "itemsPerPage": resources.len(),
            "Resources": resources,
        }),
    )
}

pub async fn resource_types() -> Response {
    list(vec![
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
            "id": "User", "name": "User", "endpoint": "/Users", "schema": USER_SCHEMA,
            "schemaExtensions": [{"schema": PORTCULLIS_SCHEMA, "required": false}],
            "meta": {"resourceType": "ResourceType", "location": "/scim/v2/ResourceTypes/User"}
        }),
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
            "id": "Group", "name": "Group", "endpoint": "/Groups", "schema": GROUP_SCHEMA,
            "meta": {"resourceType": "ResourceType", "location": "/scim/v2/ResourceTypes/Group"}
        }),
    ])
}

fn attr(
    name: &str,
    kind: &str,
    multi: bool,
    required: bool,
    mutability: &str,
    desc: &str,
) -> Value {
    json!({
        "name": name, "type": kind, "multiValued": multi, "required": required,
        "caseExact": false, "mutability": mutability, "returned": "default",
        "uniqueness": if name == "userName" || name == "displayName" && kind == "string" && required { "server" } else { "none" },
        "description": desc,
    })
}

pub async fn schemas() -> Response {
    let schema = |id: &str, name: &str, attributes: Vec<Value>| {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"],
            "id": id, "name": name, "attributes": attributes,
            "meta": {"resourceType": "Schema", "location": format!("/scim/v2/Schemas/{id}")}
        })
    };
    list(vec![
        schema(
            USER_SCHEMA,
            "User",
            vec![
                attr(
                    "userName",
                    "string",
                    false,
                    true,
                    "readWrite",
                    "The login name; policies see User::\"<userName>\".",
                ),
                attr(
                    "externalId",
                    "string",
                    false,
                    false,
                    "readWrite",
                    "The IdP's id.",
                ),
                attr(
                    "displayName",
                    "string",
                    false,
                    false,
                    "readWrite",
                    "Shown in audit views.",
                ),
                attr(
                    "active",
                    "boolean",
                    false,
                    false,
                    "readWrite",
                    "false cuts every tunnel of the user at once.",
                ),
                attr(
                    "emails",
                    "complex",
                    true,
                    false,
                    "readWrite",
                    "The primary (or first) value is kept.",
                ),
                attr(
                    "groups",
                    "complex",
                    true,
                    false,
                    "readOnly",
                    "Groups the user is a member of.",
                ),
            ],
        ),
        schema(
            GROUP_SCHEMA,
            "Group",
            vec![
                attr(
                    "displayName",
                    "string",
                    false,
                    true,
                    "readWrite",
                    "Policies see Group::\"<displayName>\".",
                ),
                attr(
                    "externalId",
                    "string",
                    false,
                    false,
                    "readWrite",
                    "The IdP's id.",
                ),
                attr(
                    "members",
                    "complex",
                    true,
                    false,
                    "readWrite",
                    "Users, by id.",
                ),
            ],
        ),
        schema(
            PORTCULLIS_SCHEMA,
            "Portcullis user extension",
            vec![attr(
                "tags",
                "string",
                true,
                false,
                "readWrite",
                "Policies see them as principal.tags.",
            )],
        ),
    ])
}
