//! The audit search, its reports and the chain verification.

use maud::html;
use serde_json::Value;

use super::{layout, Chrome};
use crate::csv::cell_text;

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

/// The canned reports the audit page offers (`portcullis audit query --report`).
pub const REPORTS: [(&str, &str); 7] = [
    ("sessions", "Sessions"),
    ("who-reached", "Who reached (needs a destination)"),
    ("denied", "Denied"),
    ("top-talkers", "Top talkers"),
    ("access-requests", "Access requests"),
    ("revocations", "Revocations"),
    ("policy-changes", "Policy changes"),
];

/// An audit search: the form as filled in, and the answer (a table, or why not).
pub struct AuditSearch<'a> {
    /// `(field, value)` as submitted (the filters and `report`).
    pub fields: &'a [(String, String)],
    pub answer: Option<Result<Rows<'a>, String>>,
    /// The same search as a query string (for the CSV link and the other pages).
    pub query: String,
    /// Rows skipped before this page.
    pub offset: u64,
    /// Rows on a full page: a full page may have a next one.
    pub page_rows: u64,
}

pub fn audit(c: &Chrome, s: &AuditSearch<'_>) -> String {
    let value = |name: &str| {
        s.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    let page_link = |offset: u64| {
        if s.query.is_empty() {
            format!("/console/audit?offset={offset}")
        } else {
            format!("/console/audit?{}&offset={offset}", s.query)
        }
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
                    label for="f-report" { "Report" }
                    select id="f-report" name="report" {
                        option value="" selected[value("report").is_empty()] { "Events (no report)" }
                        @for (name, label) in REPORTS {
                            option value=(name) selected[value("report") == name] { (label) }
                        }
                    }
                    button type="submit" id="search" { "Search" }
                }
            }
            p { a id="verify" href="/console/audit/verify" { "Verify the hash chains" } }
            @match &s.answer {
                None => {}
                Some(Err(e)) => { p class="error" role="alert" id="search-error" { (e) } }
                Some(Ok((columns, rows))) => {
                    p {
                        span id="row-count" { (rows.len()) } " rows"
                        @if s.offset > 0 { " after the first " (s.offset) } ". "
                        a id="csv" href=(format!("/console/audit.csv?{}", s.query)) { "Export CSV" }
                        @if s.offset > 0 {
                            " " a id="previous-page" href=(page_link(s.offset.saturating_sub(s.page_rows))) { "Previous page" }
                        }
                        @if rows.len() as u64 >= s.page_rows {
                            " " a id="next-page" href=(page_link(s.offset + s.page_rows)) { "Next page" }
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

/// The chain verification's answer (`portcullis audit verify`'s report).
pub fn verify(c: &Chrome, report: Result<&Value, String>) -> String {
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    layout(
        Some(c),
        "Audit verification",
        html! {
            @match report {
                Err(e) => { p class="error" role="alert" { (e) } }
                Ok(r) => {
                    @let findings = r.get("findings").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                    p id="verdict" class=(if findings.is_empty() { "ok" } else { "error" }) {
                        (text(r.get("rows").unwrap_or(&Value::Null))) " rows checked, " (findings.len()) " findings"
                    }
                    @if let Some(gws) = r.get("gateways").and_then(Value::as_object) {
                        h2 { "Chains" }
                        ul id="chains" { @for (gw, range) in gws { li { (gw) ": " (text(range)) } } }
                    }
                    @if !findings.is_empty() {
                        h2 { "Findings" }
                        ul id="findings" { @for f in findings { li { (text(f)) } } }
                    }
                }
            }
        },
    )
}
