//! Policy test cases (`<policy dir>/tests/*.toml`) and destinations as written on the
//! command line (`10.8.5.4:5432/tcp`, `[fd00:8::2]:443/tcp`, `10.8.0.2/icmp`).
//!
//! Format owned here:
//!
//! ```toml
//! [[case]]
//! name = "SREs reach prod-db"         # optional; defaults to "<file>#<n>"
//! user = "alice"
//! groups = ["sre"]                    # optional
//! tags = ["oncall"]                   # optional
//! dst = "10.8.5.4:5432/tcp"
//! at = "2026-11-22T10:00:00Z"         # optional; defaults to the time of the run
//! mfa = true                          # optional: the sign-on used a second factor
//! auth_age_secs = 3600                # optional: since that sign-on; absent: never
//! expect = "allow"                    # or "deny"
//! policies = ["sre-prod"]             # optional: the exact determining policy ids
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use portcullis_model::{Decision, FlowRequest, Principal, Protocol};
use serde::Deserialize;

use crate::diagnostics::{line_col, SourceError};
use crate::{Engine, PolicyBundle};

/// A destination: address, port (0 when none) and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// Parses `ip:port/proto`, `[v6]:port/proto` or `ip/proto`.
pub fn parse_destination(text: &str) -> Result<Destination, String> {
    let (addr, proto) = text.rsplit_once('/').ok_or_else(|| {
        format!("destination {text:?}: expected ip:port/protocol (e.g. 10.8.5.4:5432/tcp)")
    })?;
    let protocol = Protocol::from_name(proto).ok_or_else(|| {
        format!(
            "destination {text:?}: unknown protocol {proto:?} (tcp, udp, icmp, icmpv6 or a number)"
        )
    })?;
    let (ip, port) = if let Ok(sa) = addr.parse::<SocketAddr>() {
        (sa.ip(), sa.port())
    } else if let Ok(ip) = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        (ip, 0)
    } else {
        return Err(format!(
            "destination {text:?}: {addr:?} is not an address or address:port"
        ));
    };
    if port != 0 && !matches!(protocol, Protocol::TCP | Protocol::UDP) {
        return Err(format!("destination {text:?}: {protocol} has no ports"));
    }
    Ok(Destination { ip, port, protocol })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    case: Vec<RawCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    #[serde(default)]
    name: Option<String>,
    user: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    /// `connect` (the default: needs `dst`) or `approve_access` (needs `network` and
    /// `requester`; `user` is the approver).
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    dst: Option<String>,
    /// The packet's source (`context.src_ip`): a tunnel address, or for a routed peer a
    /// host behind it. Default 100.64.0.2.
    #[serde(default)]
    src: Option<IpAddr>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    requester: Option<String>,
    #[serde(default)]
    requester_groups: Vec<String>,
    #[serde(default)]
    requester_tags: Vec<String>,
    /// How long the grant would last (approval cases); u32 as for `auth_age_secs`.
    #[serde(default)]
    duration_secs: Option<u32>,
    #[serde(default)]
    at: Option<DateTime<Utc>>,
    #[serde(default)]
    mfa: bool,
    /// u32: up to 136 years; a negative or larger number is refused at its line.
    #[serde(default)]
    auth_age_secs: Option<u32>,
    expect: Expect,
    #[serde(default)]
    policies: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allow,
    Deny,
}

/// One test case, located in its file.
#[derive(Clone, Debug)]
pub struct Case {
    pub file: PathBuf,
    pub line: usize,
    pub name: String,
    pub user: Principal,
    pub dst: Destination,
    /// `context.src_ip`.
    pub src: IpAddr,
    pub at: Option<DateTime<Utc>>,
    /// The device's sign-on used a second factor.
    pub mfa: bool,
    /// Seconds since that sign-on; `None`: never signed on (a static peer).
    pub auth_age_secs: Option<u32>,
    pub expect: Expect,
    pub policies: Option<Vec<String>>,
    /// An `approve_access` case: `user` approving this request (`dst` is unused).
    pub approval: Option<ApprovalCase>,
}

/// What an `approve_access` case asks: may the case's user approve `requester`'s
/// request for `network` lasting `duration_secs`?
#[derive(Clone, Debug)]
pub struct ApprovalCase {
    pub network: String,
    pub requester: Principal,
    pub duration_secs: u64,
}

/// The outcome of one case.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub case: Case,
    pub decision: Decision,
    /// Why it failed; `None` when it passed.
    pub failure: Option<String>,
}

/// Reads every `*.toml` under `dir/tests`, sorted by name.
pub fn load_cases(dir: &Path) -> Result<Vec<Case>, Vec<SourceError>> {
    let tests = dir.join("tests");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&tests) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(e) => {
            return Err(vec![SourceError::file(
                &tests,
                format!("cannot read test directory: {e}"),
            )])
        }
    };
    files.sort();
    let mut cases = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let src = match std::fs::read_to_string(&file) {
            Ok(s) => s,
            Err(e) => {
                errors.push(SourceError::file(&file, format!("cannot read: {e}")));
                continue;
            }
        };
        let parsed: CaseFile = match toml::from_str(&src) {
            Ok(p) => p,
            Err(e) => {
                let (line, col) = e.span().map(|s| line_col(&src, s.start)).unwrap_or((1, 1));
                errors.push(SourceError::at(
                    &file,
                    &src,
                    line,
                    col,
                    e.message().to_string(),
                ));
                continue;
            }
        };
        // Each [[case]] header, in order, locates its case.
        let headers: Vec<usize> = src
            .match_indices("[[case]]")
            .map(|(o, _)| line_col(&src, o).0)
            .collect();
        let file_name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (i, raw) in parsed.case.into_iter().enumerate() {
            let line = headers.get(i).copied().unwrap_or(1);
            let mut fail = |e: String| errors.push(SourceError::at(&file, &src, line, 1, e));
            let (dst, approval) = match (raw.action.as_deref().unwrap_or("connect"), &raw.dst) {
                ("connect", Some(dst)) => match parse_destination(dst) {
                    Ok(d) => (d, None),
                    Err(e) => {
                        fail(e);
                        continue;
                    }
                },
                ("connect", None) => {
                    fail("a connect case needs dst".into());
                    continue;
                }
                ("approve_access", None) => match (&raw.network, &raw.requester) {
                    (Some(network), Some(requester)) => (
                        Destination {
                            ip: IpAddr::from([0, 0, 0, 0]),
                            port: 0,
                            protocol: Protocol::TCP,
                        },
                        Some(ApprovalCase {
                            network: network.clone(),
                            requester: Principal {
                                email: format!("{requester}@example.com"),
                                name: requester.clone(),
                                groups: raw.requester_groups.clone(),
                                tags: raw.requester_tags.clone(),
                            },
                            duration_secs: u64::from(raw.duration_secs.unwrap_or(3600)),
                        }),
                    ),
                    _ => {
                        fail("an approve_access case needs network and requester".into());
                        continue;
                    }
                },
                ("approve_access", Some(_)) => {
                    fail("an approve_access case has a network, not a dst".into());
                    continue;
                }
                (other, _) => {
                    fail(format!(
                        "action {other:?}: expected connect or approve_access"
                    ));
                    continue;
                }
            };
            cases.push(Case {
                file: file.clone(),
                line,
                name: raw.name.unwrap_or_else(|| format!("{file_name}#{i}")),
                user: Principal {
                    email: format!("{}@example.com", raw.user),
                    name: raw.user,
                    groups: raw.groups,
                    tags: raw.tags,
                },
                dst,
                src: raw.src.unwrap_or(DEFAULT_SRC),
                at: raw.at,
                mfa: raw.mfa,
                auth_age_secs: raw.auth_age_secs,
                expect: raw.expect,
                policies: raw.policies,
                approval,
            });
        }
    }
    if errors.is_empty() {
        Ok(cases)
    } else {
        Err(errors)
    }
}

/// A case's source unless it names one: a device's tunnel address.
pub const DEFAULT_SRC: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(100, 64, 0, 2));

/// `FlowRequest::authenticated_at` for a sign-on `auth_age_secs` before `at`; `None`:
/// never signed on (0).
pub fn signed_on_at(at: DateTime<Utc>, auth_age_secs: Option<u32>) -> i64 {
    auth_age_secs.map_or(0, |age| at.timestamp().saturating_sub(i64::from(age)))
}

/// Decides `case` with plain Cedar over the whole bundle and compares.
pub fn run_case(bundle: &Arc<PolicyBundle>, case: &Case, now: DateTime<Utc>) -> Outcome {
    let decision = match &case.approval {
        Some(a) => crate::approval::may_approve(
            bundle,
            &case.user,
            &crate::approval::Ask {
                requester: &a.requester,
                network: &a.network,
                dst: None,
                port: None,
                duration_secs: a.duration_secs,
                sign_on: portcullis_model::SignOn {
                    at: signed_on_at(case.at.unwrap_or(now), case.auth_age_secs),
                    mfa: case.mfa,
                },
            },
            case.at.unwrap_or(now),
        ),
        None => connect_decision(bundle, case, now),
    };
    judge(case, decision)
}

fn connect_decision(bundle: &Arc<PolicyBundle>, case: &Case, now: DateTime<Utc>) -> Decision {
    match Engine::new(bundle.clone(), vec![case.user.clone()]) {
        Ok(engine) => engine.decide_plain(
            &case.user.name,
            &FlowRequest {
                src_ip: case.src,
                dst_ip: case.dst.ip,
                dst_port: case.dst.port,
                protocol: case.dst.protocol,
                device: "test".into(),
                mfa: case.mfa,
                authenticated_at: signed_on_at(case.at.unwrap_or(now), case.auth_age_secs),
            },
            case.at.unwrap_or(now),
        ),
        Err(e) => {
            let mut d = Decision::deny_default("-");
            d.errors.push(e.to_string());
            d
        }
    }
}

fn judge(case: &Case, decision: Decision) -> Outcome {
    let got = if decision.allowed {
        Expect::Allow
    } else {
        Expect::Deny
    };
    let mut failure = None;
    if got != case.expect {
        failure = Some(format!("expected {:?}, got {:?}", case.expect, got).to_lowercase());
    } else if let Some(want) = &case.policies {
        let mut want = want.clone();
        want.sort();
        if want != decision.policy_ids {
            failure = Some(format!(
                "expected deciding policies {want:?}, got {:?}",
                decision.policy_ids
            ));
        }
    }
    Outcome {
        case: case.clone(),
        decision,
        failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse() {
        let d = parse_destination("10.8.5.4:5432/tcp").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (d.ip, d.port, d.protocol),
            (IpAddr::from([10, 8, 5, 4]), 5432, Protocol::TCP)
        );
        let d = parse_destination("[fd00:8::2]:443/TCP").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.port, 443);
        let d = parse_destination("10.8.0.2/icmp").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((d.port, d.protocol), (0, Protocol::ICMP));
        let d = parse_destination("fd00:8::2/icmpv6").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.protocol, Protocol::ICMPV6);
        for bad in [
            "10.8.0.2:22",
            "10.8.0.2:22/sctp",
            "10.8.0.300:22/tcp",
            "10.8.0.2:22/icmp",
            "host:22/tcp",
        ] {
            assert!(parse_destination(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_example_cases_all_pass() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        let bundle = Arc::new(PolicyBundle::load(&dir).unwrap_or_else(|e| panic!("{e}")));
        let cases = load_cases(&dir).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(cases.len() >= 12, "every example policy has cases");
        let now: DateTime<Utc> = "2026-11-22T10:00:00Z".parse().unwrap_or_default();
        for c in &cases {
            let o = run_case(&bundle, c, now);
            assert!(
                o.failure.is_none(),
                "{}:{} {}: {:?}",
                c.file.display(),
                c.line,
                c.name,
                o.failure
            );
        }
        // Every policy is exercised by at least one case's deciding set.
        for p in bundle.policies() {
            let decided: bool = cases.iter().any(|c| {
                run_case(&bundle, c, now)
                    .decision
                    .policy_ids
                    .contains(&p.id)
            });
            assert!(decided, "policy {} has no test case that it decides", p.id);
        }
    }

    #[test]
    fn a_wrong_expectation_fails_with_a_reason() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        let bundle = Arc::new(PolicyBundle::load(&dir).unwrap_or_else(|e| panic!("{e}")));
        let case = Case {
            file: PathBuf::from("t.toml"),
            line: 1,
            name: "bob in prod".into(),
            user: Principal {
                name: "bob".into(),
                email: String::new(),
                groups: vec!["developers".into()],
                tags: vec![],
            },
            dst: parse_destination("10.8.0.2:22/tcp").unwrap_or_else(|e| panic!("{e}")),
            src: DEFAULT_SRC,
            at: None,
            mfa: false,
            auth_age_secs: None,
            expect: Expect::Allow,
            policies: None,
            approval: None,
        };
        let o = run_case(&bundle, &case, Utc::now());
        assert_eq!(o.failure.as_deref(), Some("expected allow, got deny"));
    }
}
