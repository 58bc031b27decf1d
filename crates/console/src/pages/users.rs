//! Users: the search and a user's page.

use maud::{html, PreEscaped};

use super::{layout, percent, Chrome};
use crate::Action;

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
    /// The user's newest audit events, as [`RECENT_COLUMNS`].
    pub recent: Vec<Vec<String>>,
}

/// The columns of a user's recent events on their page.
pub const RECENT_COLUMNS: [&str; 8] = [
    "at",
    "kind",
    "dst_ip",
    "dst_port",
    "protocol",
    "network",
    "decision",
    "policy_ids",
];

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
            h2 { "Recent flows and denies" }
            table id="recent" {
                thead { tr { @for c in RECENT_COLUMNS { th scope="col" { (c) } } } }
                tbody { @for row in &u.recent { tr { @for cell in row { td { (cell) } } } } }
            }
            p { a href=(format!("/console/audit?user={}", percent(&u.line.name))) { "All of " (u.line.name) "'s events" } }
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

/// The live sessions and the registered devices, for IT.
pub fn sessions_devices(
    c: &Chrome,
    sessions: &[(u64, String, String, String, String)],
    devices: &[(String, String, String, String, String)],
) -> String {
    let may_kill = c.roles.may(Action::KillSession);
    let may_manage = c.roles.may(Action::ManageDevices);
    layout(
        Some(c),
        "Sessions and devices",
        html! {
            h2 { "Live sessions" }
            table id="all-sessions" {
                thead { tr { th scope="col" { "Session" } th scope="col" { "User" } th scope="col" { "Device" } th scope="col" { "Endpoint" } th scope="col" { "Started" } @if may_kill { th scope="col" { "Action" } } } }
                tbody {
                    @for (id, user, device, endpoint, started) in sessions {
                        tr {
                            td { (id) } td { a href=(format!("/console/users/{}", percent(user))) { (user) } } td { (device) } td { (endpoint) } td { (started) }
                            @if may_kill {
                                td {
                                    form class="inline" method="post" action=(format!("/console/sessions/{id}/kill")) {
                                        input type="hidden" name="csrf" value=(c.csrf);
                                        input type="hidden" name="user" value=(user);
                                        button type="submit" aria-label=(format!("End session {id} of {user}")) { "End" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Devices" }
            table id="all-devices" {
                thead { tr { th scope="col" { "User" } th scope="col" { "Name" } th scope="col" { "Public key" } th scope="col" { "Expires" } @if may_manage { th scope="col" { "Actions" } } } }
                tbody {
                    @for (id, user, name, key, expires) in devices {
                        tr {
                            td { (user) } td { (name) } td { code { (key) } } td { (expires) }
                            @if may_manage {
                                td {
                                    form class="inline" method="post" action=(format!("/console/devices/{}/rotate", percent(id))) {
                                        input type="hidden" name="csrf" value=(c.csrf);
                                        button type="submit" aria-label=(format!("Rotate {user}'s device {name}")) { "Rotate" }
                                    }
                                    " "
                                    form class="inline" method="post" action=(format!("/console/devices/{}/remove", percent(id))) {
                                        input type="hidden" name="csrf" value=(c.csrf);
                                        button type="submit" aria-label=(format!("Remove {user}'s device {name}")) { "Remove" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// A rotated device's new profile, once: as text and as a QR code (`qr_svg` is the
/// server's own rendering of `profile`).
pub fn rotated(c: &Chrome, user: &str, profile: &str, qr_svg: &str) -> String {
    layout(
        Some(c),
        "Device rotated",
        html! {
            p class="ok" role="status" id="result" { "A new key for " (user) "'s device; the old one stops after its grace period. This profile holds the private key and is shown only now." }
            div id="qr" { (PreEscaped(qr_svg)) }
            label for="profile" { "WireGuard profile" }
            textarea id="profile" rows="12" readonly { (profile) }
            p { a href="/console/devices" { "Back" } }
        },
    )
}
