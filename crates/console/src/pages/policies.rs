//! The policy files, the editor, and explain.

use maud::{html, Markup};
use serde_json::Value;

use super::{layout, percent, Chrome};
use crate::Action;

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
    history: &[(String, String, String, String)],
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
            h2 { "History" }
            @if history.is_empty() {
                p id="no-history" { "No replacement in the audit trail." }
            } @else {
                table id="history" {
                    thead { tr { th scope="col" { "When" } th scope="col" { "By" } th scope="col" { "Outcome" } th scope="col" { "Version" } } }
                    tbody { @for (when, by, outcome, version) in history { tr { td { (when) } td { (by) } td { (outcome) } td { code { (version) } } } } }
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
