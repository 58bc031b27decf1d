//! Auditor filters and reports as SQL over the `events` table. A destination filter first
//! finds the flows' keys in the narrow `flows_by_dst_idx` (ordered by destination) and
//! reads those rows from `events` by its primary key (`user, time, gateway, seq`).

use std::net::IpAddr;
use std::str::FromStr;

use chrono::{DateTime, Duration, Utc};
use ipnet::IpNet;
use serde::Deserialize;

/// A filter or report argument that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("time {0:?}: expected RFC 3339 (2026-11-22T10:00:00Z) or a duration ago (90s, 15m, 24h, 7d)")]
    Time(String),
    #[error("dst {0:?}: expected an address or a CIDR (10.8.0.0/16)")]
    Cidr(String),
    #[error("decision {0:?}: expected allow or deny")]
    Decision(String),
    #[error(
        "report {0:?}: expected sessions, who-reached, denied, top-talkers, access-requests, revocations or policy-changes"
    )]
    Report(String),
    #[error("order {0:?}: expected asc or desc")]
    Order(String),
    #[error("source_prefix {0}: expected 1 to 32 (IPv4 sources; IPv6 sources are grouped by /64)")]
    SourcePrefix(u8),
    #[error("source_prefix groups the who-reached and top-talkers reports only")]
    SourcePrefixReport,
}

/// Which rows an auditor asks about. Every field narrows.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub user: Option<String>,
    pub group: Option<String>,
    pub dst: Option<String>,
    pub port: Option<u16>,
    pub decision: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub session: Option<u64>,
    pub kind: Option<String>,
    pub limit: Option<u64>,
    /// Rows to skip first (the next page: the order is fixed, `time, gateway, seq`).
    pub offset: Option<u64>,
    /// A listing's order: `asc` (oldest first, the default) or `desc` (newest first).
    pub order: Option<String>,
    /// `who-reached` and `top-talkers` also by source subnet: IPv4 sources by this
    /// prefix length, IPv6 ones by /64 (a site's LAN behind a routed peer).
    pub source_prefix: Option<u8>,
}

/// The SQL of a row's source subnet (`192.168.10.0/24`, `fd10::/64`). ClickHouse 18.16
/// has no IPv4CIDRToRange: the mask is applied to the number.
fn source_subnet_sql(prefix: u8) -> Result<String, FilterError> {
    if !(1..=32).contains(&prefix) {
        return Err(FilterError::SourcePrefix(prefix));
    }
    let mask = u32::MAX << (32 - u32::from(prefix));
    // Current releases throw on an unparsable address in either branch (every branch is
    // evaluated), so each parser only ever sees its own family (or a harmless zero).
    Ok(format!(
        "multiIf(src_ip = '', '', position(src_ip, ':') = 0, \
         concat(IPv4NumToString(bitAnd(IPv4StringToNum(if(position(src_ip, ':') = 0 AND src_ip != '', src_ip, '0.0.0.0')), \
           toUInt32({mask}))), '/{prefix}'), \
         concat(cutIPv6(IPv6StringToNum(if(position(src_ip, ':') > 0, src_ip, '::')), 8, 0), '/64'))"
    ))
}

/// Parses `2026-11-22T10:00:00Z` or a duration before `now` (`90s`, `15m`, `24h`, `7d`).
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, FilterError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.to_utc());
    }
    let err = || FilterError::Time(text.to_string());
    let split = text.len().checked_sub(1).ok_or_else(err)?;
    let (n, unit) = (
        text.get(..split).ok_or_else(err)?,
        text.get(split..).ok_or_else(err)?,
    );
    let n: i64 = n.parse().map_err(|_| err())?;
    let d = match unit {
        "s" => Duration::try_seconds(n),
        "m" => Duration::try_minutes(n),
        "h" => Duration::try_hours(n),
        "d" => Duration::try_days(n),
        _ => None,
    }
    .ok_or_else(err)?;
    now.checked_sub_signed(d).ok_or_else(err)
}

/// The range ClickHouse's `DateTime` holds (Unix seconds as a UInt32): a bound outside
/// it would wrap around (a `--since` before 1970 selected nothing), so bounds are
/// clamped into it, which keeps their meaning (before 1970 = since the beginning).
pub const DB_TIME_MAX: i64 = u32::MAX as i64;

/// `t` as Unix seconds clamped into `0..=DB_TIME_MAX`.
pub fn db_seconds(t: DateTime<Utc>) -> i64 {
    t.timestamp().clamp(0, DB_TIME_MAX)
}

/// The 16-byte (IPv4-mapped) bounds of a CIDR, as hex for `unhex`.
pub fn cidr_bounds(text: &str) -> Result<(String, String), FilterError> {
    let net = IpNet::from_str(text)
        .or_else(|_| IpAddr::from_str(text).map(IpNet::from))
        .map_err(|_| FilterError::Cidr(text.to_string()))?;
    let sixteen = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    Ok((
        hex::encode(sixteen(net.network())),
        hex::encode(sixteen(net.broadcast())),
    ))
}

/// SQL string literal (ClickHouse escaping: backslash and quote).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\0' => out.push_str("\\0"),
            // The client library reads `?` as a bind placeholder; `??` is a literal `?`.
            '?' => out.push_str("??"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

impl Filter {
    /// The `WHERE` clause (always valid; `1` when nothing narrows).
    pub fn where_clause(&self, now: DateTime<Utc>) -> Result<String, FilterError> {
        let mut c = vec!["1".to_string()];
        if let Some(u) = &self.user {
            c.push(format!("user = {}", quote(u)));
        }
        if let Some(g) = &self.group {
            c.push(format!("has(groups, {})", quote(g)));
        }
        if let Some(d) = &self.dst {
            let (lo, hi) = cidr_bounds(d)?;
            c.push(format!(
                "dst_addr >= unhex('{lo}') AND dst_addr <= unhex('{hi}') AND dst_ip != ''"
            ));
        }
        if let Some(p) = self.port {
            c.push(format!("dst_port = {p}"));
        }
        if let Some(d) = &self.decision {
            match d.as_str() {
                "allow" | "deny" => c.push(format!("decision = '{d}'")),
                _ => return Err(FilterError::Decision(d.clone())),
            }
        }
        if let Some(s) = &self.since {
            c.push(format!(
                "time >= toDateTime({})",
                db_seconds(parse_time(s, now)?)
            ));
        }
        if let Some(u) = &self.until {
            c.push(format!(
                "time <= toDateTime({})",
                db_seconds(parse_time(u, now)?)
            ));
        }
        if let Some(s) = self.session {
            c.push(format!("session_id = {s}"));
        }
        if let Some(k) = &self.kind {
            c.push(format!("kind = {}", quote(k)));
        }
        Ok(c.join(" AND "))
    }

    /// With a destination: `(user, time, gateway, seq) IN (…)` over `flows_by_dst_idx`,
    /// narrowed by everything the index holds (destination, time, user).
    pub fn dst_keys(&self, db: &str, now: DateTime<Utc>) -> Result<Option<String>, FilterError> {
        let Some(d) = &self.dst else {
            return Ok(None);
        };
        let (lo, hi) = cidr_bounds(d)?;
        let mut c = vec![format!(
            "dst_addr >= unhex('{lo}') AND dst_addr <= unhex('{hi}')"
        )];
        if let Some(u) = &self.user {
            c.push(format!("user = {}", quote(u)));
        }
        if let Some(s) = &self.since {
            c.push(format!(
                "time >= toDateTime({})",
                db_seconds(parse_time(s, now)?)
            ));
        }
        if let Some(u) = &self.until {
            c.push(format!(
                "time <= toDateTime({})",
                db_seconds(parse_time(u, now)?)
            ));
        }
        Ok(Some(format!(
            "(user, time, gateway, seq) IN (SELECT user, time, gateway, seq FROM {db}.flows_by_dst_idx WHERE {})",
            c.join(" AND ")
        )))
    }

    fn limit(&self) -> u64 {
        self.limit.unwrap_or(1000).min(1_000_000)
    }

    /// The listing's `ORDER BY`.
    fn listing_order(&self) -> Result<&'static str, FilterError> {
        match self.order.as_deref() {
            None | Some("asc") => Ok("time, gateway, seq"),
            Some("desc") => Ok("time DESC, gateway DESC, seq DESC"),
            Some(other) => Err(FilterError::Order(other.to_string())),
        }
    }

    /// `LIMIT offset, limit` (the form ClickHouse 18.16 reads too).
    fn limit_clause(&self) -> String {
        format!(
            "{}, {}",
            self.offset.unwrap_or(0).min(MAX_OFFSET),
            self.limit()
        )
    }
}

/// The largest `offset` taken (past it, the answer is empty anyway on any real trail).
pub const MAX_OFFSET: u64 = 1_000_000_000;

/// Canned reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// One line per session: gateway, user, device, start, last event, how it ended
    /// (`node_down` when its node died with it open), bytes, flows, denies.
    Sessions,
    /// Who had allowed flows to the filtered destinations, with first/last time.
    WhoReached,
    /// Denied attempts grouped by user and destination, with the deciding policies.
    Denied,
    /// Users by bytes moved.
    TopTalkers,
    /// One line per just-in-time access request: requester, network, reason, who
    /// decided and with which approval policies, the window, how it ended, and what
    /// the grant was used for (flows whose deciding ids name it, their bytes).
    AccessRequests,
    /// User revocations, newest first: who, asked by whom, the measured time until every
    /// session and flow was cut, and how many.
    Revocations,
    /// Policy set replacements (`PUT /policies`, from the API or the console), newest
    /// first: when, by whom, the outcome (`ok`, or the status and why not), the version
    /// applied.
    PolicyChanges,
}

impl FromStr for Report {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self, FilterError> {
        match s {
            "sessions" => Ok(Report::Sessions),
            "who-reached" => Ok(Report::WhoReached),
            "denied" => Ok(Report::Denied),
            "top-talkers" => Ok(Report::TopTalkers),
            "revocations" => Ok(Report::Revocations),
            "policy-changes" => Ok(Report::PolicyChanges),
            "access-requests" => Ok(Report::AccessRequests),
            _ => Err(FilterError::Report(s.to_string())),
        }
    }
}

/// The SQL for a listing of events (no report) or a report.
pub fn sql(
    db: &str,
    filter: &Filter,
    report: Option<Report>,
    now: DateTime<Utc>,
) -> Result<String, FilterError> {
    let w = filter.where_clause(now)?;
    let limit = filter.limit_clause();
    let order = filter.listing_order()?;
    // Destination questions find their rows' keys in the index ordered by destination.
    let keys = filter.dst_keys(db, now)?;
    let w = match &keys {
        Some(k) => format!("{k} AND {w}"),
        None => w,
    };
    // By source subnet too: a column, a grouping key and a tie-break of the order.
    let (by_src, by_src_key) = match (filter.source_prefix, report) {
        (None, _) => (String::new(), String::new()),
        (Some(p), Some(Report::WhoReached | Report::TopTalkers)) => (
            format!("{} AS source_subnet, ", source_subnet_sql(p)?),
            ", source_subnet".to_string(),
        ),
        (Some(_), _) => return Err(FilterError::SourcePrefixReport),
    };
    Ok(match report {
        None => format!(
            "SELECT toString(time) AS at, kind, user, device, protocol, src_ip, src_port, dst_ip, dst_port, \
             network, decision, policy_ids, reason, bytes_out, bytes_in, session_id, gateway, seq \
             FROM {db}.events FINAL WHERE {w} ORDER BY {order} LIMIT {limit}"
        ),
        // Session ids are per node: a session is (gateway, session_id).
        Some(Report::Sessions) => format!(
            "SELECT session_id, gateway, user, device, \
             toString(min(time)) AS started, toString(max(time)) AS last_event, \
             anyIf(reason, kind = 'session_ended') AS ended, \
             sumIf(bytes_out, kind = 'session_ended') AS received, \
             sumIf(bytes_in, kind = 'session_ended') AS sent, \
             countIf(kind = 'flow_opened') AS flows, countIf(kind = 'flow_denied') AS denied \
             FROM {db}.events FINAL WHERE {w} AND session_id != 0 \
             GROUP BY session_id, gateway, user, device ORDER BY started, gateway, session_id LIMIT {limit}"
        ),
        Some(Report::WhoReached) => format!(
            "SELECT user, {by_src}countIf(kind = 'flow_opened') AS flows, \
             toString(min(time)) AS first_seen, toString(max(time)) AS last_seen, \
             groupUniqArray(dst_ip) AS destinations, \
             sumIf(bytes_out + bytes_in, kind = 'flow_closed') AS bytes \
             FROM {db}.events FINAL WHERE {w} AND decision = 'allow' \
             GROUP BY user{by_src_key} ORDER BY flows DESC, user{by_src_key} LIMIT {limit}"
        ),
        Some(Report::Denied) => format!(
            "SELECT user, network, dst_ip, dst_port, protocol, count() AS attempts, \
             toString(max(time)) AS last_attempt, groupUniqArray(arrayStringConcat(policy_ids, ',')) AS policies, \
             any(reason) AS deny_reason \
             FROM {db}.events FINAL WHERE {w} AND kind = 'flow_denied' \
             GROUP BY user, network, dst_ip, dst_port, protocol \
             ORDER BY attempts DESC, user, network, dst_ip, dst_port, protocol LIMIT {limit}"
        ),
        // Every report's order is total (ties broken by the grouping keys), so a page
        // (`offset`, `limit`) is the same on every server version and every run.
        // Aliases never reuse a column's name (ClickHouse aliases are query-wide: the
        // filter's WHERE would read them). Access events carry the request id in `detail`; flows name a grant among their
        // policy ids (`ar-…`, the ids the gateway gives requests). visitParam* reads flat
        // JSON as the rows write it (ClickHouse 18.16 has no JSONExtract).
        Some(Report::Revocations) => format!(
            "SELECT toString(time) AS at, user, visitParamExtractString(detail, 'source') AS revoked_by, \
             latency_us AS cut_latency_us, visitParamExtractUInt(detail, 'sessions_cut') AS sessions_cut, \
             visitParamExtractUInt(detail, 'flows_cut') AS flows_cut, gateway \
             FROM {db}.events FINAL WHERE {w} AND kind = 'user_revoked' \
             ORDER BY time_us DESC, gateway, seq DESC LIMIT {limit}"
        ),
        Some(Report::PolicyChanges) => format!(
            "SELECT toString(time) AS at, visitParamExtractString(detail, 'actor') AS changed_by, \
             visitParamExtractString(detail, 'outcome') AS outcome, \
             visitParamExtractString(detail, 'version') AS version, gateway \
             FROM {db}.events FINAL WHERE {w} AND kind = 'admin_action' \
             AND visitParamExtractString(detail, 'action') = 'PUT /policies' \
             ORDER BY time_us DESC, gateway, seq DESC LIMIT {limit}"
        ),
        Some(Report::AccessRequests) => format!(
            "SELECT if(startsWith(kind, 'access_'), visitParamExtractString(detail, 'request_id'), \
               arrayFirst(p -> startsWith(p, 'ar-'), policy_ids)) AS request_id, \
             anyIf(user, startsWith(kind, 'access_')) AS requester, \
             anyIf(network, startsWith(kind, 'access_')) AS target_network, \
             anyIf(reason, kind = 'access_requested') AS request_reason, \
             if(countIf(kind = 'access_requested') > 0, toString(minIf(time, kind = 'access_requested')), '') AS requested, \
             replaceOne(argMaxIf(kind, time_us, startsWith(kind, 'access_')), 'access_', '') AS state, \
             anyIf(visitParamExtractString(detail, 'approver'), kind IN ('access_approved', 'access_denied')) AS decided_by, \
             anyIf(arrayStringConcat(policy_ids, ','), kind = 'access_approved') AS approval_policies, \
             anyIf(visitParamExtractString(detail, 'starts_at'), kind = 'access_approved') AS starts_at, \
             anyIf(visitParamExtractString(detail, 'ends_at'), kind = 'access_approved') AS ends_at, \
             anyIf(reason, kind IN ('access_denied', 'access_revoked')) AS decision_reason, \
             anyIf(visitParamExtractString(detail, 'actor'), kind = 'access_revoked') AS revoked_by, \
             countIf(kind = 'flow_opened') AS flows, \
             sumIf(bytes_out + bytes_in, kind = 'flow_closed') AS bytes \
             FROM {db}.events FINAL WHERE {w} AND (startsWith(kind, 'access_') OR \
               (kind IN ('flow_opened', 'flow_closed') AND arrayExists(p -> startsWith(p, 'ar-'), policy_ids))) \
             GROUP BY request_id ORDER BY requested, request_id LIMIT {limit}"
        ),
        Some(Report::TopTalkers) => format!(
            "SELECT user, {by_src}sum(bytes_out + bytes_in) AS bytes, sum(bytes_out) AS uploaded, \
             sum(bytes_in) AS downloaded, count() AS flows \
             FROM {db}.events FINAL WHERE {w} AND kind = 'flow_closed' \
             GROUP BY user{by_src_key} ORDER BY bytes DESC, user{by_src_key} LIMIT {limit}"
        ),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn source_subnets_group_two_reports_and_nothing_else() {
        let now = Utc::now();
        let by = |p: u8| Filter {
            source_prefix: Some(p),
            ..Filter::default()
        };
        let q = sql("db", &by(24), Some(Report::TopTalkers), now).unwrap();
        assert!(
            q.contains("AS source_subnet") && q.contains("GROUP BY user, source_subnet"),
            "{q}"
        );
        assert!(q.contains(&format!("toUInt32({})", 0xffff_ff00u32)), "{q}");
        assert_eq!(
            sql("db", &by(0), Some(Report::WhoReached), now),
            Err(FilterError::SourcePrefix(0))
        );
        assert_eq!(
            sql("db", &by(33), Some(Report::WhoReached), now),
            Err(FilterError::SourcePrefix(33))
        );
        assert_eq!(
            sql("db", &by(24), Some(Report::Denied), now),
            Err(FilterError::SourcePrefixReport)
        );
        assert_eq!(
            sql("db", &by(24), None, now),
            Err(FilterError::SourcePrefixReport)
        );
        // Without it, the reports are as before.
        let plain = sql("db", &Filter::default(), Some(Report::TopTalkers), now).unwrap();
        assert!(!plain.contains("source_subnet"), "{plain}");
    }

    #[test]
    fn bounds_outside_clickhouse_datetime_are_clamped_and_errors_name_parameters() {
        let early = Filter {
            since: Some("1969-12-31T23:59:59Z".into()),
            until: Some("2200-01-01T00:00:00Z".into()),
            ..Filter::default()
        };
        let w = early.where_clause(now()).unwrap();
        assert!(w.contains("time >= toDateTime(0)"), "{w}");
        assert!(
            w.contains(&format!("time <= toDateTime({DB_TIME_MAX})")),
            "{w}"
        );
        // The same messages serve the CLI and the HTTP API: no CLI flag names.
        for e in [
            FilterError::Cidr("x".into()),
            FilterError::Decision("x".into()),
            FilterError::Time("x".into()),
        ] {
            assert!(!e.to_string().starts_with("--"), "{e}");
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-22T12:00:00Z")
            .unwrap()
            .to_utc()
    }

    #[test]
    fn times_parse_absolute_and_relative() {
        assert_eq!(
            parse_time("24h", now()).unwrap().to_rfc3339(),
            "2026-11-21T12:00:00+00:00"
        );
        assert_eq!(
            parse_time("7d", now()).unwrap().to_rfc3339(),
            "2026-11-15T12:00:00+00:00"
        );
        assert_eq!(
            parse_time("90s", now()).unwrap().to_rfc3339(),
            "2026-11-22T11:58:30+00:00"
        );
        assert_eq!(
            parse_time("2026-01-02T03:04:05Z", now())
                .unwrap()
                .to_rfc3339(),
            "2026-01-02T03:04:05+00:00"
        );
        for bad in ["", "h", "7w", "yesterday", "-", "99999999999999999d"] {
            assert!(parse_time(bad, now()).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_become_mapped_ranges() {
        let (lo, hi) = cidr_bounds("10.8.0.0/16").unwrap();
        assert_eq!(lo, "00000000000000000000ffff0a080000");
        assert_eq!(hi, "00000000000000000000ffff0a08ffff");
        let (lo, hi) = cidr_bounds("10.8.0.2").unwrap();
        assert_eq!(lo, hi);
        assert!(cidr_bounds("10.8.0.0/33").is_err());
        assert_eq!(
            cidr_bounds("fd00::/8").unwrap().0,
            "fd000000000000000000000000000000"
        );
    }

    #[test]
    fn filters_quote_what_users_type() {
        let f = Filter {
            user: Some("o'brien\\".into()),
            decision: Some("deny".into()),
            ..Filter::default()
        };
        let w = f.where_clause(now()).unwrap();
        assert!(w.contains(r"user = 'o\'brien\\'"), "{w}");
        let bad = Filter {
            decision: Some("maybe".into()),
            ..Filter::default()
        };
        assert!(bad.where_clause(now()).is_err());
    }

    proptest! {
        #[test]
        fn quoting_keeps_any_text_inside_one_literal(s in ".*") {
            let q = quote(&s);
            // Unescaped quotes only at the ends.
            let inner = &q[1..q.len() - 1];
            let mut escaped = false;
            for c in inner.chars() {
                if escaped { escaped = false; continue; }
                if c == '\\' { escaped = true; continue; }
                prop_assert_ne!(c, '\'');
            }
            prop_assert!(!escaped);
        }
    }
}
