//! The OpenAPI document against the router, both ways: every documented operation is
//! routed, and every route in the source is documented.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt as _;

use super::*;

const BEARER: &str = "test-bearer-token-0123456789";

/// (METHOD, path template) of every documented operation.
fn documented() -> BTreeSet<(String, String)> {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.insert((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

/// (METHOD, path template) of every `.route(...)` in the modules that build the router.
fn in_source() -> BTreeSet<(String, String)> {
    let sources = [
        ("", include_str!("../admin.rs")),
        ("", include_str!("../devices.rs")),
        ("", include_str!("../policy_api.rs")),
        ("", include_str!("../access_api.rs")),
        ("/audit", include_str!("../../../auditor/src/http.rs")),
        ("/audit", include_str!("../holds.rs")),
    ];
    let mut ops = BTreeSet::new();
    for (prefix, src) in sources {
        let mut rest = src;
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            // The call's text up to its closing parenthesis.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap();
            let call = &rest[..end];
            let path = call.split('"').nth(1).unwrap();
            if path == "/{*rest}" {
                continue; // the "not configured" catch-all
            }
            for method in ["get", "post", "put", "delete", "patch"] {
                let routed = call.match_indices(&format!("{method}(")).any(|(i, _)| {
                    i == 0
                        || !(call.as_bytes()[i - 1].is_ascii_alphanumeric()
                            || call.as_bytes()[i - 1] == b'_')
                });
                if routed {
                    ops.insert((method.to_uppercase(), format!("{prefix}{path}")));
                }
            }
        }
    }
    ops
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let documented = documented();
    let in_source = in_source();
    assert!(
        in_source.len() >= 20,
        "the scan found too little: {in_source:?}"
    );
    let undocumented: Vec<_> = in_source.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&in_source).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from docs/openapi.json: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "documented but not in the source: {unrouted:?}"
    );
}

#[tokio::test]
async fn every_documented_operation_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{BEARER}\n")).unwrap();
    let tokens =
        TokenSet::load(&dir.path().join("c.toml"), "admin.token_file", &token_file).unwrap();
    // No event loop: handlers that ask it answer 503 with a JSON error, which is still
    // a routed answer.
    let (commands, _) = mpsc::channel(16);
    let router = admin_router(AdminApi {
        tokens: Some(Arc::new(RwLock::new(tokens))),
        api: None,
        nonce_log: None,
        identity: None,
        commands,
        ldap: None,
        profile: None,
        max_body_bytes: 1 << 20,
        policy_dir: dir.path().to_path_buf(),
        profile_scope: crate::devices::ProfileScope::new_fixed(),
        store: None,
        shared: None,
        cluster_policy: None,
        access: None,
        console_links: None,
    })
    .public;
    for (method, template) in documented() {
        let path = template
            .replace("{name}", "alice")
            .replace("{id}", "00000000-0000-4000-8000-000000000000");
        let request = Request::builder()
            .method(method.as_str())
            .uri(format!("/admin/v1{path}"))
            .header("authorization", format!("Bearer {BEARER}"))
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        // An unknown route or method gets the fallbacks' answers; every handler of ours
        // answers with another JSON body.
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {template}"
        );
        let json: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{method} {template}: {status}, not JSON: {e}"));
        let message = json["error"].as_str().unwrap_or_default();
        assert!(
            !message.starts_with("no route"),
            "{method} {template}: not routed"
        );
        if template == "/openapi.json" {
            assert_eq!(json["openapi"], "3.0.3");
        }
    }
    // Unknown routes and methods answer JSON, without needing a token.
    for (method, path, status) in [
        ("GET", "/admin/v1/nope", StatusCode::NOT_FOUND),
        ("DELETE", "/admin/v1/users", StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(json["error"].as_str().unwrap().contains(path), "{json}");
    }
    // Without the bearer token nothing but the document answers.
    let request = Request::builder()
        .uri("/admin/v1/users")
        .body(Body::empty())
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}
