//! Every page of the console, from plain values (what `portcullis-http` gathered).
//!
//! Rules every page keeps: values are escaped by the template engine; a form that
//! changes something is a POST with the session's CSRF token; every control has a
//! `<label>`; a skip link leads to the main content; nothing needs JavaScript; the
//! style sheet is a file (the content security policy allows no inline style or
//! script).

use maud::{html, Markup, DOCTYPE};

use crate::{Action, Roles};

mod audit;
mod policies;
mod users;

pub use audit::{audit, verify, AuditSearch, Rows, AUDIT_FIELDS, REPORTS};
pub use policies::{
    anchor, explain, policies, policy_edit, Checked, ExplainForm, Problem, RunningPolicy,
};
pub use users::{rotated, sessions_devices, user, users, UserLine, UserPage, RECENT_COLUMNS};

/// Who is looking: shown in the header, and what the navigation offers.
#[derive(Clone, Debug)]
pub struct Chrome {
    pub user: String,
    pub roles: Roles,
    /// The session's CSRF token, sent with every form.
    pub csrf: String,
}

/// The style sheet served at `/console/console.css`.
pub const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#111}\
header{background:#1d2733;color:#fff;padding:.5rem 1rem;display:flex;gap:1rem;align-items:center;flex-wrap:wrap}\
header a{color:#fff}nav ul{list-style:none;display:flex;gap:1rem;margin:0;padding:0}\
main{padding:1rem}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .4rem;text-align:left;font-size:.9rem}\
.skip{position:absolute;left:-999px}.skip:focus{left:1rem;top:1rem;background:#fff;color:#000;padding:.5rem}\
.error{color:#a00}.kw{color:#00c;font-weight:bold}.str{color:#070}.cm{color:#777}.ln{display:block}.ln:target,.bad{background:#fdd}.add{background:#dfd}.del{background:#fdd}pre{border:1px solid #ccc;padding:.5rem;overflow:auto}textarea{width:100%;font-family:monospace}.ok{color:#060}form.inline{display:inline}label{margin-right:.3rem}fieldset{margin-bottom:1rem}\
a:focus,button:focus,input:focus,select:focus{outline:3px solid #f90}";

fn nav(c: &Chrome) -> Markup {
    let links = [
        ("/console", "Overview", Action::ReadOverview),
        ("/console/users", "Users", Action::ReadUsers),
        (
            "/console/devices",
            "Sessions and devices",
            Action::ReadUsers,
        ),
        ("/console/audit", "Audit", Action::ReadAudit),
        ("/console/policies", "Policies", Action::ReadPolicies),
        ("/console/explain", "Explain", Action::Explain),
    ];
    html! {
        nav aria-label="console" {
            ul {
                @for (href, name, action) in links {
                    @if c.roles.may(action) {
                        li { a href=(href) { (name) } }
                    }
                }
            }
        }
    }
}

/// A whole page.
pub fn layout(chrome: Option<&Chrome>, title: &str, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Portcullis" }
                link rel="stylesheet" href="/console/console.css";
                script src="/console/console.js" defer {}
                @if let Some(c) = chrome {
                    // For scripts of the user's own (the forms carry it already).
                    meta name="csrf-token" content=(c.csrf);
                }
            }
            body {
                a class="skip" href="#main" { "Skip to content" }
                header {
                    strong { "Portcullis" }
                    @if let Some(c) = chrome {
                        (nav(c))
                        span id="whoami" { "Signed in as " (c.user) " (" (c.roles.names()) ")" }
                        a href="/saml/logout" { "Sign out" }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
    .into_string()
}

/// A page that only says something (refusals, errors).
pub fn message(chrome: Option<&Chrome>, title: &str, text: &str) -> String {
    layout(
        chrome,
        title,
        html! { p class="error" role="alert" { (text) } },
    )
}

/// The sign-in page for a browser without a console session.
pub fn sign_in() -> String {
    layout(
        None,
        "Sign in",
        html! {
            p { "The console signs you in through your company's identity provider." }
            p { a id="sign-in" href="/saml/login?return=/console" { "Sign in" } }
        },
    )
}

/// A break-glass link's page: one button signs in (a GET alone never uses the link).
pub fn link_sign_in(token: &str, name: &str) -> String {
    layout(
        None,
        "Sign in with a link",
        html! {
            p { "This one-time link signs you in to the console as " strong { (name) } ", without the identity provider." }
            form method="post" action="/console/login-link" {
                input type="hidden" name="t" value=(token);
                input type="hidden" name="as" value=(name);
                button type="submit" id="use-link" { "Sign in as " (name) }
            }
        },
    )
}

/// What the overview shows.
#[derive(Clone, Debug, Default)]
pub struct Overview {
    pub users: usize,
    pub disabled_users: usize,
    /// `(key, label, value)`: the numbers the page refreshes from `/console/overview.json`
    /// (by key) while it is open.
    pub live: Vec<(&'static str, &'static str, String)>,
    /// `(when, user, latency)` of the last revocations in the audit trail.
    pub revocations: Vec<(String, String, String)>,
    /// `(source, state)`: the identity sources.
    pub sources: Vec<(String, String)>,
    /// `(node, address, heartbeat age in seconds)` when clustered.
    pub nodes: Vec<(String, String, i64)>,
}

pub fn overview(c: &Chrome, o: &Overview) -> String {
    layout(
        Some(c),
        "Overview",
        html! {
            dl id="live" {
                @for (key, label, value) in &o.live {
                    dt { (label) } dd id=(key.replace('_', "-")) data-live=(key) { (value) }
                }
                dt { "Users" } dd id="users" { (o.users) }
                dt { "Disabled users" } dd id="disabled-users" { (o.disabled_users) }
            }
            h2 { "Last revocations" }
            @if o.revocations.is_empty() {
                p id="no-revocations" { "None in the last day." }
            } @else {
                table id="revocations" {
                    thead { tr { th scope="col" { "When" } th scope="col" { "User" } th scope="col" { "Cut in" } } }
                    tbody { @for (when, user, took) in &o.revocations { tr { td { (when) } td { (user) } td { (took) } } } }
                }
            }
            @if !o.sources.is_empty() {
                h2 { "Identity sources" }
                dl id="sources" { @for (source, state) in &o.sources { dt { (source) } dd { (state) } } }
            }
            @if !o.nodes.is_empty() {
                h2 { "Nodes" }
                table id="nodes" {
                    thead { tr { th scope="col" { "Node" } th scope="col" { "Address" } th scope="col" { "Last heartbeat" } } }
                    tbody {
                        @for (node, address, age) in &o.nodes {
                            tr { td { (node) } td { (address) } td { (age) " s ago" } }
                        }
                    }
                }
            }
        },
    )
}

/// The script served at `/console/console.js` (the CSP allows scripts from the console
/// itself only): while a page with live numbers is open, they are refreshed every 2 s.
/// Without JavaScript the page shows the numbers of its load.
pub const SCRIPT: &str = r#"(() => {
  const live = () => document.querySelectorAll('[data-live]');
  if (live().length === 0) return;
  async function poll() {
    try {
      const r = await fetch('/console/overview.json', { credentials: 'same-origin', cache: 'no-store' });
      if (!r.ok) return;
      const v = await r.json();
      for (const el of live()) {
        const k = el.dataset.live;
        if (k in v) el.textContent = String(v[k]);
      }
      document.body.dataset.refreshed = String(Date.now());
    } catch (e) { /* the next poll tries again */ }
  }
  poll();
  setInterval(poll, 2000);
})();
"#;

/// The answer to a change: what happened, and where to go on.
pub fn done(c: &Chrome, title: &str, text: &str, back: &str) -> String {
    layout(
        Some(c),
        title,
        html! {
            p class="ok" role="status" id="result" { (text) }
            p { a href=(back) { "Back" } }
        },
    )
}

/// A path segment, percent-encoded (user names may hold anything the IdP sends).
pub fn percent(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chrome(roles: Roles) -> Chrome {
        Chrome {
            user: "eve<script>".into(),
            roles,
            csrf: "tok\"en".into(),
        }
    }

    fn page() -> UserPage {
        UserPage {
            line: UserLine {
                name: "bob\"><img src=x>".into(),
                active: true,
                groups: vec!["developers".into()],
                source: "scim".into(),
                sessions: 1,
            },
            tags: vec![],
            sessions: vec![(7, "laptop".into(), "10.0.0.1:1".into(), "now".into())],
            devices: vec![],
            recent: vec![],
        }
    }

    #[test]
    fn values_are_escaped_and_forms_carry_the_token() {
        let html = user(
            &chrome(Roles {
                helpdesk: true,
                ..Roles::default()
            }),
            &page(),
        );
        assert!(
            !html.contains("<script>") && !html.contains("<img"),
            "{html}"
        );
        assert!(html.contains("eve&lt;script&gt;"));
        assert_eq!(
            html.matches("name=\"csrf\" value=\"tok&quot;en\"").count(),
            2
        );
        assert!(html.contains("id=\"disable-now\""));
        assert!(!html.contains("style="), "no inline style (CSP)");
    }

    #[test]
    fn an_auditor_sees_no_edit_control() {
        let html = user(
            &chrome(Roles {
                auditor: true,
                ..Roles::default()
            }),
            &page(),
        );
        assert!(!html.contains("<form method=\"post\""), "{html}");
        assert!(!html.contains("method=\"post\""));
    }

    #[test]
    fn every_input_has_a_label() {
        let fields: Vec<(String, String)> = vec![("user".into(), "bob".into())];
        let html = audit(
            &chrome(Roles {
                auditor: true,
                ..Roles::default()
            }),
            &AuditSearch {
                fields: &fields,
                answer: None,
                query: String::new(),
                offset: 0,
                page_rows: 100,
            },
        );
        for (name, _) in AUDIT_FIELDS {
            assert!(
                html.contains(&format!("<label for=\"f-{name}\">")),
                "{name}"
            );
            assert!(html.contains(&format!("id=\"f-{name}\"")), "{name}");
        }
        assert!(html.contains("value=\"bob\""));
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(percent("a b/c%"), "a%20b%2Fc%25");
        assert_eq!(percent("bob"), "bob");
    }
}
