//! What the sign-on pages share: the page frame (every value escaped, a strict CSP),
//! the cookie reader, redirects, and the few canned answers.

use std::net::IpAddr;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use chrono::{DateTime, Utc};

use crate::serve::Peer;

pub(super) fn random_b64<const N: usize>() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; N];
    rand::thread_rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// HTML-escapes text for element content and quoted attributes.
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub(super) fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · Portcullis</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;line-height:1.5}}\
         pre{{background:#f4f4f4;padding:1rem;overflow-x:auto}}table{{border-collapse:collapse}}\
         td,th{{padding:.25rem .75rem;border-bottom:1px solid #ddd;text-align:left}}\
         label{{display:block;margin-top:.75rem}}input[type=text]{{width:100%;max-width:34rem}}\
         .error{{color:#a00}}</style></head>\
         <body><main><h1>{t}</h1>\n{body}\n</main></body></html>\n",
        t = esc(title)
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'",
            ),
        ],
        html,
    )
        .into_response()
}

pub(super) fn unavailable() -> Response {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Sign-in unavailable",
        "<p>The identity provider has not answered this gateway yet. Try again in a minute.</p>",
    )
}

pub(super) fn too_many() -> Response {
    page(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many attempts",
        "<p>Too many sign-in attempts from this address. Try again in a minute.</p>",
    )
}

pub(super) fn see_other(location: &str) -> Response {
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, location.to_string())],
    )
        .into_response()
}

/// A return path is local: starts with one `/`, no scheme, no backslash.
pub(super) fn local_path(p: &str) -> Option<&str> {
    let ok = p.starts_with('/')
        && !p.starts_with("//")
        && !p.contains('\\')
        && p.len() <= 512
        && p.chars().all(|c| !c.is_control());
    ok.then_some(p)
}

pub(super) fn remote(ci: ConnectInfo<Peer>) -> IpAddr {
    ci.0 .0.ip()
}

pub(super) fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sso::COOKIE;

    #[test]
    fn return_paths_stay_on_this_site() {
        for ok in ["/enroll", "/enroll?x=1", "/"] {
            assert_eq!(local_path(ok), Some(ok));
        }
        for bad in [
            "//evil.example/",
            "https://evil.example/",
            "/\\evil",
            "enroll",
            "/a\nb",
            "",
        ] {
            assert_eq!(local_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(esc("<b a=\"x\">&'"), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; portcullis_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
