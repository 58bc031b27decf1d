//! Every page of the console, from plain values (what `portcullis-http` gathered).
//!
//! Rules every page keeps: values are escaped by the template engine; a form that
//! changes something is a POST with the session's CSRF token; every control has a
//! `<label>`; a skip link leads to the main content; nothing needs JavaScript; the
//! style sheet is a file (the content security policy allows no inline style or
//! script).

use maud::{html, Markup, DOCTYPE};
use serde_json::Value;

use crate::csv::cell_text;
use crate::{Action, Roles};

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

/// What the overview shows.
#[derive(Clone, Debug, Default)]
pub struct Overview {
    pub live_sessions: usize,
    pub users: usize,
    pub disabled_users: usize,
    /// `(node, address, heartbeat age in seconds)` when clustered.
    pub nodes: Vec<(String, String, i64)>,
}

pub fn overview(c: &Chrome, o: &Overview) -> String {
    layout(
        Some(c),
        "Overview",
        html! {
            dl {
                dt { "Live sessions" } dd id="live-sessions" { (o.live_sessions) }
                dt { "Users" } dd id="users" { (o.users) }
                dt { "Disabled users" } dd id="disabled-users" { (o.disabled_users) }
            }
            @if !o.nodes.is_empty() {
                h2 { "Nodes" }
                table {
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

/// The audit search form's fields: the CLI's filter names.
pub const AUDIT_FIELDS: [(&str, &str); 8] = [
    ("user", "User"),
    ("group", "Group"),
    ("dst", "Destination (IP or CIDR)"),
    ("port", "Port"),
    ("decision", "Decision (allow or deny)"),
    ("since", "Since (RFC 3339 or 24h, 7d)"),
    ("until", "Until"),
    ("session", "Session id"),
];

/// A query's answer: its columns and rows.
pub type Rows<'a> = (&'a [String], &'a [Vec<Value>]);

/// An audit search: the form as filled in, and the answer (a table, or why not).
pub struct AuditSearch<'a> {
    /// `(field, value)` as submitted.
    pub fields: &'a [(String, String)],
    pub answer: Option<Result<Rows<'a>, String>>,
    /// The same search as a query string (for the CSV link and the next page).
    pub query: String,
    /// The `until` of the next page (the last row's time), when there may be more.
    pub next_until: Option<String>,
}

pub fn audit(c: &Chrome, s: &AuditSearch<'_>) -> String {
    let value = |name: &str| {
        s.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    layout(
        Some(c),
        "Audit",
        html! {
            form method="get" action="/console/audit" {
                fieldset {
                    legend { "Search the audit trail" }
                    @for (name, label) in AUDIT_FIELDS {
                        label for=(format!("f-{name}")) { (label) }
                        input type="text" id=(format!("f-{name}")) name=(name) value=(value(name));
                    }
                    button type="submit" id="search" { "Search" }
                }
            }
            @match &s.answer {
                None => {}
                Some(Err(e)) => { p class="error" role="alert" id="search-error" { (e) } }
                Some(Ok((columns, rows))) => {
                    p {
                        span id="row-count" { (rows.len()) } " rows. "
                        a id="csv" href=(format!("/console/audit.csv?{}", s.query)) { "Export CSV" }
                        @if let Some(until) = &s.next_until {
                            " "
                            a id="next-page" href=(format!("/console/audit?{}&until={}", strip_until(&s.query), until)) { "Older rows" }
                        }
                    }
                    table id="results" {
                        thead { tr { @for col in *columns { th scope="col" { (col) } } } }
                        tbody {
                            @for row in *rows {
                                tr { @for v in row { td { (cell_text(v)) } } }
                            }
                        }
                    }
                }
            }
        },
    )
}

fn strip_until(query: &str) -> String {
    query
        .split('&')
        .filter(|p| !p.starts_with("until="))
        .collect::<Vec<_>>()
        .join("&")
}

/// The explain form as filled in: `(user, destination, at, mfa, auth_age)`.
#[derive(Clone, Debug, Default)]
pub struct ExplainForm {
    pub user: String,
    pub dst: String,
    pub at: String,
    pub mfa: bool,
    pub auth_age: String,
}

/// The explain page: the form, and the answer (`portcullis_policy::explain`'s JSON) or
/// why there is none.
pub fn explain(c: &Chrome, f: &ExplainForm, answer: Option<Result<&Value, String>>) -> String {
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    let list = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    layout(
        Some(c),
        "Explain",
        html! {
            form method="get" action="/console/explain" {
                fieldset {
                    legend { "Why is a flow allowed or denied?" }
                    label for="x-user" { "User" }
                    input type="text" id="x-user" name="user" value=(f.user) required;
                    label for="x-dst" { "Destination (ip:port/proto)" }
                    input type="text" id="x-dst" name="dst" value=(f.dst) required;
                    label for="x-at" { "At (RFC 3339, empty: now)" }
                    input type="text" id="x-at" name="at" value=(f.at);
                    label for="x-auth-age" { "Seconds since sign-on (empty: never)" }
                    input type="text" id="x-auth-age" name="auth_age" value=(f.auth_age);
                    input type="checkbox" id="x-mfa" name="mfa" value="yes" checked[f.mfa];
                    label for="x-mfa" { "With a second factor" }
                    button type="submit" id="explain" { "Explain" }
                }
            }
            @match answer {
                None => {}
                Some(Err(e)) => { p class="error" role="alert" id="explain-error" { (e) } }
                Some(Ok(a)) => {
                    dl id="answer" {
                        dt { "Decision" } dd id="decision" { (text(&a["decision"])) }
                        dt { "Reason" } dd id="reason" { (text(&a["reason"])) }
                        dt { "User" } dd { (text(&a["user"])) " (groups " (list(&a["groups"])) ")" }
                        dt { "Destination" } dd id="destination" { (text(&a["destination"])) }
                        dt { "Network" } dd id="network" {
                            (text(&a["network"]))
                            @if a["ancestors"].as_array().is_some_and(|x| !x.is_empty()) {
                                " (inside " (list(&a["ancestors"])) ")"
                            }
                        }
                        dt { "Depends on" } dd id="depends-on" { (list(&a["depends_on"])) }
                    }
                    h2 { "Deciding policies" }
                    ul id="policies" {
                        @for p in a["policies"].as_array().map(Vec::as_slice).unwrap_or_default() {
                            li {
                                @if p["temporary_grant"] == true {
                                    (text(&p["id"])) " — temporary grant approved by " (text(&p["approved_by"])) " until " (text(&p["ends_at"]))
                                } @else {
                                    a href=(format!("/console/policies#{}", anchor(&text(&p["file"]), p["line"].as_u64().unwrap_or(0)))) {
                                        (text(&p["id"]))
                                    }
                                    " (" (text(&p["effect"])) ", " (text(&p["file"])) ":" (text(&p["line"])) ")"
                                }
                            }
                        }
                    }
                    @for e in a["errors"].as_array().map(Vec::as_slice).unwrap_or_default() {
                        p class="error" { (text(e)) " (the policy was skipped, as Cedar does)" }
                    }
                }
            }
        },
    )
}

/// The id of a policy file's line on the policies page.
pub fn anchor(file: &str, line: u64) -> String {
    let base = std::path::Path::new(file)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{}-L{line}", percent(&base))
}

const CEDAR_KEYWORDS: [&str; 16] = [
    "permit",
    "forbid",
    "when",
    "unless",
    "principal",
    "action",
    "resource",
    "context",
    "in",
    "has",
    "like",
    "is",
    "if",
    "then",
    "else",
    "true",
];

/// One line of a policy file, highlighted (keywords, strings, comments).
fn highlight(line: &str) -> Markup {
    let mut parts: Vec<(&'static str, String)> = Vec::new();
    let mut rest = line;
    while !rest.is_empty() {
        if rest.starts_with("//") {
            parts.push(("cm", rest.to_string()));
            break;
        }
        if let Some(after) = rest.strip_prefix('"') {
            // To the closing quote (a backslash escapes the next character).
            let mut end = None;
            let mut escaped = false;
            for (i, ch) in after.char_indices() {
                match (escaped, ch) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let len = end.map_or(rest.len(), |i| i + 2);
            let (lit, tail) = rest.split_at(len.min(rest.len()));
            parts.push(("str", lit.to_string()));
            rest = tail;
            continue;
        }
        let word_len = rest
            .char_indices()
            .find(|(_, c)| !(c.is_alphanumeric() || *c == '_'))
            .map_or(rest.len(), |(i, _)| i);
        if word_len > 0 {
            let (word, tail) = rest.split_at(word_len);
            let class = if CEDAR_KEYWORDS.contains(&word) || word == "false" {
                "kw"
            } else {
                ""
            };
            parts.push((class, word.to_string()));
            rest = tail;
        } else {
            let n = rest.chars().next().map_or(1, char::len_utf8);
            let (ch, tail) = rest.split_at(n);
            parts.push(("", ch.to_string()));
            rest = tail;
        }
    }
    html! {
        @for (class, text) in parts {
            @if class.is_empty() { (text) } @else { span class=(class) { (text) } }
        }
    }
}

/// A file's text with numbered, highlighted lines; `bad` lines are marked.
fn numbered(file: &str, text: &str, bad: &[usize]) -> Markup {
    html! {
        pre {
            @for (i, line) in text.lines().enumerate() {
                @let n = i + 1;
                span class=(if bad.contains(&n) { "ln bad" } else { "ln" }) id=(anchor(file, n as u64)) {
                    (format!("{n:>4}  ")) (highlight(line))
                }
            }
        }
    }
}

/// A running policy, as the policies page lists it.
#[derive(Clone, Debug)]
pub struct RunningPolicy {
    pub id: String,
    pub effect: String,
    pub file: String,
    pub line: u64,
}

/// The policies page: every file, the running set, and (for admins) edit links.
pub fn policies(
    c: &Chrome,
    version: &str,
    files: &[(String, String)],
    running: &[RunningPolicy],
) -> String {
    let may_edit = c.roles.may(Action::EditPolicies);
    layout(
        Some(c),
        "Policies",
        html! {
            p { "Version " code id="version" { (version) } }
            h2 { "Running policies" }
            table id="running" {
                thead { tr { th scope="col" { "Policy" } th scope="col" { "Effect" } th scope="col" { "Where" } } }
                tbody {
                    @for p in running {
                        tr {
                            td { (p.id) } td { (p.effect) }
                            td { a href=(format!("#{}", anchor(&p.file, p.line))) { (p.file) ":" (p.line) } }
                        }
                    }
                }
            }
            @for (name, text) in files {
                h2 id=(format!("file-{}", percent(name))) { (name) }
                @if may_edit {
                    p { a href=(format!("/console/policies/edit?file={}", percent(name))) { "Edit " (name) } }
                }
                (numbered(name, text, &[]))
            }
        },
    )
}

/// A located problem with an edited set.
#[derive(Clone, Debug)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// What the editor shows after "check": the problems, or the tests and the diff.
#[derive(Clone, Debug, Default)]
pub struct Checked {
    pub problems: Vec<Problem>,
    /// `(case, failure)`: every policy test, `None` when it passed.
    pub tests: Vec<(String, Option<String>)>,
    /// The diff against the running file, as (`+`, `-` or ` `, line).
    pub diff: Vec<(char, String)>,
    /// An outcome to show (applied, refused as stale, ...).
    pub note: Option<(bool, String)>,
}

/// The editor for one file of the set, at `version`.
pub fn policy_edit(
    c: &Chrome,
    file: &str,
    version: &str,
    text: &str,
    checked: Option<&Checked>,
) -> String {
    let bad: Vec<usize> = checked
        .map(|ch| {
            ch.problems
                .iter()
                .filter(|p| p.file.ends_with(file))
                .map(|p| p.line)
                .collect()
        })
        .unwrap_or_default();
    layout(
        Some(c),
        &format!("Edit {file}"),
        html! {
            @if let Some(ch) = checked {
                @if let Some((ok, note)) = &ch.note {
                    p class=(if *ok { "ok" } else { "error" }) role="status" id="note" { (note) }
                }
                @if !ch.problems.is_empty() {
                    h2 { "Errors" }
                    ul id="problems" role="alert" {
                        @for p in &ch.problems {
                            li { a href=(format!("#{}", anchor(&p.file, p.line as u64))) { (p.file) ":" (p.line) ":" (p.col) } ": " (p.message) }
                        }
                    }
                    (numbered(file, text, &bad))
                }
                @if !ch.tests.is_empty() {
                    h2 { "Policy tests" }
                    ul id="tests" {
                        @for (name, failure) in &ch.tests {
                            li class=(if failure.is_some() { "error" } else { "ok" }) {
                                (name) ": " @match failure { Some(f) => { "FAIL " (f) } None => { "pass" } }
                            }
                        }
                    }
                }
                @if !ch.diff.is_empty() {
                    h2 { "Changes against the running set" }
                    pre id="diff" {
                        @for (mark, line) in &ch.diff {
                            span class=(match mark { '+' => "ln add", '-' => "ln del", _ => "ln" }) { (mark) " " (line) }
                        }
                    }
                }
            }
            form method="post" action="/console/policies/edit" id="editor" {
                input type="hidden" name="csrf" value=(c.csrf);
                input type="hidden" name="file" value=(file);
                input type="hidden" name="version" value=(version);
                label for="text" { "Contents of " (file) " (version " (version) ")" }
                textarea id="text" name="text" rows="24" spellcheck="false" { (text) }
                p {
                    button type="submit" name="step" value="check" id="check" { "Validate, test and show changes" }
                    " "
                    button type="submit" name="step" value="apply" id="apply" { "Apply" }
                }
            }
        },
    )
}

/// One line of the user list.
#[derive(Clone, Debug)]
pub struct UserLine {
    pub name: String,
    pub active: bool,
    pub groups: Vec<String>,
    pub source: String,
    pub sessions: usize,
}

pub fn users(c: &Chrome, q: &str, lines: &[UserLine]) -> String {
    layout(
        Some(c),
        "Users",
        html! {
            form method="get" action="/console/users" role="search" {
                label for="q" { "Find a user (name or group)" }
                input type="search" id="q" name="q" value=(q);
                button type="submit" { "Find" }
            }
            table id="users" {
                thead { tr { th scope="col" { "User" } th scope="col" { "State" } th scope="col" { "Groups" } th scope="col" { "Source" } th scope="col" { "Live sessions" } } }
                tbody {
                    @for u in lines {
                        tr {
                            td { a href=(format!("/console/users/{}", percent(&u.name))) { (u.name) } }
                            td { @if u.active { "active" } @else { "disabled" } }
                            td { (u.groups.join(", ")) }
                            td { (u.source) }
                            td { (u.sessions) }
                        }
                    }
                }
            }
        },
    )
}

/// A user's page.
#[derive(Clone, Debug)]
pub struct UserPage {
    pub line: UserLine,
    pub tags: Vec<String>,
    /// `(id, device, endpoint, started)`.
    pub sessions: Vec<(u64, String, String, String)>,
    /// `(id, name, public key, expires)`.
    pub devices: Vec<(String, String, String, String)>,
}

pub fn user(c: &Chrome, u: &UserPage) -> String {
    let may_disable = c.roles.may(Action::DisableUser) && u.line.active;
    let may_kill = c.roles.may(Action::KillSession);
    layout(
        Some(c),
        &format!("User {}", u.line.name),
        html! {
            dl {
                dt { "State" } dd id="state" { @if u.line.active { "active" } @else { "disabled" } }
                dt { "Groups" } dd id="groups" { (u.line.groups.join(", ")) }
                dt { "Source" } dd { (u.line.source) }
                dt { "Tags" } dd id="tags" { (u.tags.join(", ")) }
            }
            h2 { "Live sessions" }
            table id="sessions" {
                thead { tr { th scope="col" { "Session" } th scope="col" { "Device" } th scope="col" { "Endpoint" } th scope="col" { "Started" } @if may_kill { th scope="col" { "Action" } } } }
                tbody {
                    @for (id, device, endpoint, started) in &u.sessions {
                        tr {
                            td { (id) } td { (device) } td { (endpoint) } td { (started) }
                            @if may_kill {
                                td {
                                    form class="inline" method="post" action=(format!("/console/sessions/{id}/kill")) {
                                        input type="hidden" name="csrf" value=(c.csrf);
                                        input type="hidden" name="user" value=(u.line.name);
                                        button type="submit" aria-label=(format!("End session {id}")) { "End" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Devices" }
            table id="devices" {
                thead { tr { th scope="col" { "Device" } th scope="col" { "Name" } th scope="col" { "Public key" } th scope="col" { "Expires" } } }
                tbody {
                    @for (id, name, key, expires) in &u.devices {
                        tr { td { (id) } td { (name) } td { code { (key) } } td { (expires) } }
                    }
                }
            }
            @if may_disable {
                h2 { "Disable" }
                form method="post" action=(format!("/console/users/{}/disable", percent(&u.line.name))) id="disable" {
                    input type="hidden" name="csrf" value=(c.csrf);
                    p {
                        input type="checkbox" id="confirm" name="confirm" value="yes" required;
                        label for="confirm" { "Yes, disable " (u.line.name) " now and cut every tunnel" }
                    }
                    button type="submit" id="disable-now" { "Disable now" }
                }
            }
        },
    )
}

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
                next_until: None,
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
