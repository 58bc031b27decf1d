//! The checks of a parsed configuration: every value range, every cross-section rule.
//! Each error names the file, the key and the reason.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;

use crate::toml_error::toml_error;
use crate::*;

/// Parses and checks configuration text (the private key is not read: zeros).
pub fn parse(path: &Path, src: &str) -> Result<Loaded, ConfigError> {
    let config: Config = toml::from_str(src).map_err(|e| toml_error(path, src, &e))?;
    let mut warnings = Vec::new();
    let g = &config.gateway;
    let err = |key: String, reason: String| ConfigError::new(path, key, reason);

    if g.tun_name.is_empty() || g.tun_name.len() > 15 {
        return Err(err(
            "gateway.tun_name".into(),
            format!(
                "{:?} must be 1 to 15 characters (a Linux interface name)",
                g.tun_name
            ),
        ));
    }
    if !g.tunnel_address.addr().is_ipv4() {
        return Err(err(
            "gateway.tunnel_address".into(),
            format!(
                "{} is not IPv4 (use tunnel_address6 for IPv6)",
                g.tunnel_address
            ),
        ));
    }
    if let Some(v6) = g.tunnel_address6 {
        if !v6.addr().is_ipv6() {
            return Err(err(
                "gateway.tunnel_address6".into(),
                format!("{v6} is not IPv6"),
            ));
        }
    }
    let min_mtu = if g.tunnel_address6.is_some() {
        1280
    } else {
        576
    };
    if !(min_mtu..=9000).contains(&g.mtu) {
        return Err(err(
            "gateway.mtu".into(),
            format!("{} is outside {min_mtu}..=9000", g.mtu),
        ));
    }
    let a = &config.audit;
    if a.events_file.is_none() && a.clickhouse.is_none() {
        return Err(err(
            "audit.events_file".into(),
            "required without [audit.clickhouse]: the events would go nowhere".into(),
        ));
    }
    if a.clickhouse.is_some() && a.spool_dir.is_none() {
        return Err(err(
            "audit.spool_dir".into(),
            "required with [audit.clickhouse]: events are spooled on disk before upload".into(),
        ));
    }
    if a.spool_dir.is_some() && a.clickhouse.is_none() {
        return Err(err(
            "audit.spool_dir".into(),
            "set without [audit.clickhouse]: nothing would drain the spool".into(),
        ));
    }
    if a.commit_interval_ms == 0 || a.commit_interval_ms > 1000 {
        return Err(err(
            "audit.commit_interval_ms".into(),
            format!(
                "{} ms: must be between 1 and 1000 (events wait this long for the disk)",
                a.commit_interval_ms
            ),
        ));
    }
    // Every duration: at most MAX_DURATION_SECS (an `Instant + Duration` past the end of
    // time panics), and the ones that must pass at least 1.
    let f = &config.flows;
    let mut durations: Vec<(String, u64)> = vec![
        (
            "gateway.session_idle_timeout_secs".into(),
            g.session_idle_timeout_secs,
        ),
        ("flows.tcp_syn_timeout_secs".into(), f.tcp_syn_timeout_secs),
        (
            "flows.tcp_established_timeout_secs".into(),
            f.tcp_established_timeout_secs,
        ),
        (
            "flows.tcp_closing_timeout_secs".into(),
            f.tcp_closing_timeout_secs,
        ),
        ("flows.udp_timeout_secs".into(), f.udp_timeout_secs),
        ("flows.icmp_timeout_secs".into(), f.icmp_timeout_secs),
        ("flows.other_timeout_secs".into(), f.other_timeout_secs),
        (
            "flows.fragment_timeout_secs".into(),
            f.fragment_timeout_secs,
        ),
    ];
    if let Some(ch) = &a.clickhouse {
        durations.push((
            "audit.clickhouse.batch_interval_ms".into(),
            ch.batch_interval_ms / 1000,
        ));
    }
    if let Some(s) = &config.saml {
        durations.push(("saml.login_max_secs".into(), s.login_max_secs));
        durations.push(("saml.metadata_refresh_secs".into(), s.metadata_refresh_secs));
    }
    if let Some(l) = &config.ldap {
        durations.push((
            "ldap.reconcile_interval_secs".into(),
            l.reconcile_interval_secs,
        ));
        durations.push(("ldap.timeout_secs".into(), l.timeout_secs));
    }
    if let Some(d) = &config.devices {
        durations.push(("devices.rotation_grace_secs".into(), d.rotation_grace_secs));
    }
    if let Some(h) = &config.http {
        for (key, v, max) in [
            ("http.header_timeout_secs", h.header_timeout_secs, 3600),
            ("http.idle_timeout_secs", h.idle_timeout_secs, 86_400),
            ("http.max_connections", h.max_connections as u64, 1 << 20),
            (
                "http.max_connections_per_address",
                h.max_connections_per_address as u64,
                1 << 20,
            ),
        ] {
            if v == 0 || v > max {
                return Err(err(key.into(), format!("{v} is outside 1..={max}")));
            }
        }
    }
    for (key, v) in durations {
        if v > MAX_DURATION_SECS {
            return Err(err(
                key,
                format!("{v} is out of range (at most {MAX_DURATION_SECS} seconds, 10 years)"),
            ));
        }
    }
    if a.segment_bytes < 4096 || a.spool_max_bytes < 2 * a.segment_bytes {
        return Err(err(
            "audit.spool_max_bytes".into(),
            format!(
                "{} must be at least twice segment_bytes ({}, itself at least 4096)",
                a.spool_max_bytes, a.segment_bytes
            ),
        ));
    }
    if let Some(ch) = &a.clickhouse {
        if url_has_credentials(&ch.url) {
            return Err(err(
                "audit.clickhouse.url".into(),
                format!(
                    "{} carries credentials: put the user in audit.clickhouse.user and the password in audit.clickhouse.password_file",
                    redact_url(&ch.url)
                ),
            ));
        }
        if !(ch.url.starts_with("http://") || ch.url.starts_with("https://")) {
            return Err(err(
                "audit.clickhouse.url".into(),
                format!(
                    "{:?} is not an http(s) URL of ClickHouse's HTTP interface",
                    redact_url(&ch.url)
                ),
            ));
        }
        let ident = |v: &str| {
            !v.is_empty()
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !v.starts_with(|c: char| c.is_ascii_digit())
        };
        if !ident(&ch.database) {
            return Err(err(
                "audit.clickhouse.database".into(),
                format!("{:?} must be letters, digits and _", ch.database),
            ));
        }
        if ch.batch_rows == 0 || ch.batch_interval_ms == 0 {
            return Err(err(
                "audit.clickhouse.batch_rows".into(),
                "batch_rows and batch_interval_ms must be at least 1".into(),
            ));
        }
    }
    let f = &config.flows;
    if f.max_flows == 0 || f.max_flows_per_peer == 0 {
        return Err(err(
            "flows.max_flows".into(),
            "limits must be at least 1".into(),
        ));
    }
    for (key, v) in [
        ("tcp_syn_timeout_secs", f.tcp_syn_timeout_secs),
        (
            "tcp_established_timeout_secs",
            f.tcp_established_timeout_secs,
        ),
        ("tcp_closing_timeout_secs", f.tcp_closing_timeout_secs),
        ("udp_timeout_secs", f.udp_timeout_secs),
        ("icmp_timeout_secs", f.icmp_timeout_secs),
        ("other_timeout_secs", f.other_timeout_secs),
        ("fragment_timeout_secs", f.fragment_timeout_secs),
    ] {
        if v == 0 {
            return Err(err(
                format!("flows.{key}"),
                "must be at least 1 second".into(),
            ));
        }
    }

    if (config.scim.is_some() || config.admin.is_some() || config.api.is_some())
        && config.http.is_none()
    {
        let key = if config.scim.is_some() {
            "scim"
        } else if config.admin.is_some() {
            "admin"
        } else {
            "api"
        };
        return Err(err(
            key.into(),
            "needs [http] listen: SCIM and the admin API are served there".into(),
        ));
    }
    if let Some(saml) = &config.saml {
        if config.http.is_none() {
            return Err(err(
                "saml".into(),
                "needs [http] listen: the login and enrollment pages are served there".into(),
            ));
        }
        if config.devices.is_none() {
            return Err(err(
                "saml".into(),
                "needs [devices]: a login enrolls devices".into(),
            ));
        }
        let base = saml.base();
        let scheme_ok = base.starts_with("https://") || base.starts_with("http://");
        if !scheme_ok || base.contains(['?', '#']) || base.len() <= "https://".len() {
            return Err(err(
                "saml.base_url".into(),
                format!("{base:?} must be an http(s):// URL without query or fragment"),
            ));
        }
        if saml.groups_attribute.trim().is_empty() {
            return Err(err(
                "saml.groups_attribute".into(),
                "must not be empty".into(),
            ));
        }
        if !(1..=3600).contains(&saml.max_clock_skew_secs) {
            return Err(err(
                "saml.max_clock_skew_secs".into(),
                format!("{} is outside 1..=3600", saml.max_clock_skew_secs),
            ));
        }
        if saml.login_max_secs < 60 || saml.metadata_refresh_secs < 60 {
            return Err(err(
                "saml.login_max_secs".into(),
                "login_max_secs and metadata_refresh_secs are at least 60".into(),
            ));
        }
    }
    if let Some(a) = &config.api {
        if !(10..=3600).contains(&a.window_secs) {
            return Err(err(
                "api.window_secs".into(),
                format!("{} is outside 10..=3600", a.window_secs),
            ));
        }
    }
    if let Some(h) = &config.http {
        if h.cert_file.is_some() != h.key_file.is_some() {
            return Err(err(
                "http.key_file".into(),
                "cert_file and key_file go together (neither: plain HTTP)".into(),
            ));
        }
        if h.max_body_bytes < 1024 {
            return Err(err(
                "http.max_body_bytes".into(),
                format!("{} is below 1024", h.max_body_bytes),
            ));
        }
    }

    if let Some(l) = &config.ldap {
        if !(l.url.starts_with("ldap://") || l.url.starts_with("ldaps://")) {
            return Err(err(
                "ldap.url".into(),
                format!("{:?} is not an ldap:// or ldaps:// URL", l.url),
            ));
        }
        if l.ca_file.is_some() && !l.url.starts_with("ldaps://") {
            return Err(err(
                "ldap.ca_file".into(),
                "only used with an ldaps:// url".into(),
            ));
        }
        if !(0.0..=1.0).contains(&l.max_removal_share) {
            return Err(err(
                "ldap.max_removal_share".into(),
                format!("{} is outside 0.0..=1.0", l.max_removal_share),
            ));
        }
        if l.bind_dn.is_some() != l.password_file.is_some() {
            return Err(err(
                "ldap.password_file".into(),
                "bind_dn and password_file go together (neither: anonymous bind)".into(),
            ));
        }
        if l.reconcile_interval_secs < 10 {
            return Err(err(
                "ldap.reconcile_interval_secs".into(),
                format!("{} is below 10", l.reconcile_interval_secs),
            ));
        }
        for (key, v) in [
            ("user_filter", &l.user_filter),
            ("group_filter", &l.group_filter),
        ] {
            if !(v.starts_with('(') && v.ends_with(')')) {
                return Err(err(
                    format!("ldap.{key}"),
                    format!("{v:?} is not an LDAP filter in parentheses (RFC 4515)"),
                ));
            }
        }
    }

    if let Some(d) = &config.devices {
        let net = match g.tunnel_address {
            IpNet::V4(n) => n.trunc(),
            IpNet::V6(_) => {
                return Err(err(
                    "gateway.tunnel_address".into(),
                    "must be IPv4 for [devices]".into(),
                ))
            }
        };
        if !net.contains(&d.pool) {
            return Err(err(
                "devices.pool".into(),
                format!("{} is not inside the tunnel network {net}", d.pool),
            ));
        }
        if d.key_lifetime_secs == 0 || d.key_lifetime_secs > MAX_DURATION_SECS {
            return Err(err(
                "devices.key_lifetime_secs".into(),
                format!(
                    "{} is out of range: must be at least 1 second and at most {MAX_DURATION_SECS} (10 years)",
                    d.key_lifetime_secs
                ),
            ));
        }
        if d.rotation_grace_secs > d.key_lifetime_secs {
            return Err(err(
                "devices.rotation_grace_secs".into(),
                format!(
                    "{} is longer than key_lifetime_secs ({})",
                    d.rotation_grace_secs, d.key_lifetime_secs
                ),
            ));
        }
        let endpoint_ok = d.endpoint.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !endpoint_ok {
            return Err(err(
                "devices.endpoint".into(),
                format!("{:?} is not host:port", d.endpoint),
            ));
        }
        if config.admin.is_none() && config.api.is_none() && config.saml.is_none() {
            warnings.push(format!(
                "{}: [devices] is set without [admin], [api] or [saml]: nothing can register a device yet",
                path.display()
            ));
        }
    }

    let mut user_names = HashSet::new();
    for (i, u) in config.users.iter().enumerate() {
        if u.name.is_empty() {
            return Err(err(format!("user[{i}].name"), "must not be empty".into()));
        }
        if !user_names.insert(u.name.as_str()) {
            return Err(err(
                format!("user[{i}].name"),
                format!("duplicate user {:?}", u.name),
            ));
        }
    }

    let mut peer_keys = Vec::new();
    let mut seen_keys = HashSet::new();
    let mut seen_addrs = HashSet::new();
    for (i, p) in config.peers.iter().enumerate() {
        let key = decode_key(&p.public_key).map_err(|r| err(format!("peer[{i}].public_key"), r))?;
        if !seen_keys.insert(key) {
            return Err(err(
                format!("peer[{i}].public_key"),
                "the same public key is configured twice".into(),
            ));
        }
        peer_keys.push(key);
        let nets: [(Option<IpAddr>, Option<IpNet>, &str); 2] = [
            (Some(p.address), Some(g.tunnel_address), "address"),
            (p.address6, g.tunnel_address6, "address6"),
        ];
        for (addr, net, key) in nets {
            let Some(addr) = addr else { continue };
            let Some(net) = net else {
                return Err(err(
                    format!("peer[{i}].{key}"),
                    "gateway.tunnel_address6 is not set".into(),
                ));
            };
            if !net.contains(&addr) || addr == net.addr() || addr == net.network() {
                return Err(err(
                    format!("peer[{i}].{key}"),
                    format!("{addr} is not a usable host address of the tunnel network {net}"),
                ));
            }
            if !seen_addrs.insert(addr) {
                return Err(err(
                    format!("peer[{i}].{key}"),
                    format!("{addr} is assigned to another peer"),
                ));
            }
        }
        if !user_names.contains(p.user.as_str()) {
            warnings.push(format!(
                "{}: peer[{i}] names user {:?}, which no [[user]] defines: it has no access until an identity source provides that user",
                path.display(),
                p.user
            ));
        }
    }
    Ok(Loaded {
        path: path.to_path_buf(),
        config,
        private_key: PrivateKey([0; 32]),
        peer_keys,
        warnings,
    })
}
