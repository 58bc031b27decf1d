//! The web console under `/console`, sans-IO: who may do what, and what every page
//! looks like.
//!
//! What it does:
//! - [`roles`]: the roles a user has from the IdP groups of the sign-in
//!   (`[console] admin_groups`, `auditor_groups`, `helpdesk_groups`) and the one table
//!   of which role may take which [`Action`]; the server checks it on every request,
//!   whatever the page showed;
//! - [`pages`]: the HTML of every page, from plain values; every interpolated value is
//!   escaped by the template engine, every form carries the session's CSRF token, every
//!   control has a label, and no page needs JavaScript to read;
//! - [`csv`]: an audit search as CSV; [`diff`]: a line diff for the policy editor.
//!
//! What it deliberately does not: no HTTP, no sessions, no queries, no clock (the
//! control plane's `portcullis-http` serves the pages, keeps the sessions and runs the
//! admin API's own routes for every action, so the console can do nothing the API
//! cannot and every change is the API's `admin_action`).
//!
//! # Format this crate owns
//!
//! **Audit CSV**: RFC 4180 (comma, CRLF line ends, fields with a comma, quote, CR or LF
//! quoted, quotes doubled); the first line is the column names of the search. A cell is
//! the JSON value as the CLI's table prints it: a string as is, an array joined with
//! `,`, anything else as JSON. A cell beginning with `=`, `+`, `-`, `@`, TAB or CR gets
//! a leading `'` so a spreadsheet never runs it as a formula (user names come from the
//! IdP).

pub mod csv;
pub mod diff;
pub mod pages;
pub mod roles;

pub use roles::{Action, RoleGroups, Roles};
