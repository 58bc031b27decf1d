//! Seeded generator of realistic policy sets, users and flow requests: for the
//! differential test (fast path vs plain Cedar), `portcullis policy bench` and benches.
//!
//! A generated company has `groups` groups, nested networks (top-level /16s with /24
//! children), and `policies` policies mixing: group and user grants to networks, port and
//! protocol conditions, forbids with `unless`, tag conditions on principals and resources,
//! expiring grants (`context.now`), destination-range conditions (`context.dst_ip`), source
//! ranges of sites behind routed peers (`context.src_ip`, with a quarter of the requests
//! from such a LAN), second
//! factors within a number of hours (`context.mfa`, `context.auth_age_secs`), and a
//! policy that errors on some inputs (integer overflow), so every path of the engine runs.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use chrono::{DateTime, TimeZone, Utc};
use portcullis_model::{FlowRequest, Grant, Principal, Protocol};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{PolicyBundle, Sources};

/// Sizes of a generated company.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub policies: usize,
    pub users: usize,
    pub groups: usize,
    pub networks: usize,
    pub seed: u64,
}

/// A generated company: its policy bundle, users and a request generator.
pub struct Company {
    pub bundle: PolicyBundle,
    /// What `bundle` was built from (to build it again with more policies).
    pub sources: Sources,
    pub users: Vec<Principal>,
    shape: Shape,
    rng: StdRng,
}

const SCHEMA: &str = include_str!("../../../policies/schema.cedarschema");
const TAGS: [&str; 4] = ["oncall", "pci", "contractor", "prod"];
const PORTS: [u16; 8] = [22, 53, 80, 443, 5432, 6379, 8080, 9000];

fn network_name(i: usize, shape: &Shape) -> String {
    let top = top_level(shape);
    if i < top {
        format!("n{i}")
    } else {
        format!("n{}-{}", (i - top) % top, (i - top) / top)
    }
}

fn top_level(shape: &Shape) -> usize {
    shape.networks.div_ceil(3).max(1)
}

impl Company {
    pub fn generate(shape: Shape) -> Company {
        let mut rng = StdRng::seed_from_u64(shape.seed);
        let top = top_level(&shape);
        // Networks: n{i} = 10.{i}.0.0/16 (+ fd00:{i}::/32), children n{p}-{k} = 10.{p}.{k+1}.0/24.
        let mut networks = String::new();
        for i in 0..shape.networks {
            let name = network_name(i, &shape);
            let tags: Vec<&str> = TAGS.iter().copied().filter(|_| rng.gen_bool(0.3)).collect();
            let tags = tags
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            if i < top {
                let _ = writeln!(
                    networks,
                    "[[network]]\nname = {name:?}\ncidrs = [\"10.{i}.0.0/16\", \"fd00:{i:x}::/32\"]\ntags = [{tags}]\n"
                );
            } else {
                let parent = (i - top) % top;
                let k = (i - top) / top + 1;
                let _ = writeln!(
                    networks,
                    "[[network]]\nname = {name:?}\nparent = \"n{parent}\"\ncidrs = [\"10.{parent}.{k}.0/24\"]\ntags = [{tags}]\n"
                );
            }
        }
        let mut cedar = String::new();
        for p in 0..shape.policies {
            let g = rng.gen_range(0..shape.groups);
            let n = network_name(rng.gen_range(0..shape.networks), &shape);
            let port = pick(&mut rng, &PORTS);
            let port2 = pick(&mut rng, &PORTS);
            let u = rng.gen_range(0..shape.users);
            let tag = pick(&mut rng, &TAGS);
            let body = match rng.gen_range(0..100) {
                0..=34 => format!("permit (principal in Group::\"g{g}\", action == Action::\"connect\", resource in Network::\"{n}\");"),
                35..=50 => format!(
                    "permit (principal in Group::\"g{g}\", action == Action::\"connect\", resource in Network::\"{n}\")\nwhen {{ context.protocol == \"tcp\" && [{port}, {port2}].contains(context.dst_port) }};"
                ),
                // A second factor within some hours: compiled natively.
                51..=52 => format!(
                    "forbid (principal in Group::\"g{g}\", action == Action::\"connect\", resource in Network::\"{n}\")\nunless {{ context.mfa && context.auth_age_secs < {} }};",
                    3600 * rng.gen_range(1..=24)
                ),
                53 => format!(
                    "permit (principal in Group::\"g{g}\", action == Action::\"connect\", resource in Network::\"{n}\")\nwhen {{ context.mfa == true && {} > context.auth_age_secs }};",
                    3600 * rng.gen_range(1..=24)
                ),
                // The same inputs through Cedar (arithmetic is outside the native subset).
                54 => format!(
                    "permit (principal in Group::\"g{g}\", action == Action::\"connect\", resource in Network::\"{n}\")\nwhen {{ context.mfa != false && context.auth_age_secs - 60 < {} }};",
                    3600 * rng.gen_range(1..=24)
                ),
                55..=62 => format!("permit (principal == User::\"u{u}\", action == Action::\"connect\", resource in Network::\"{n}\");"),
                63..=72 => format!(
                    "forbid (principal in Group::\"g{g}\", action == Action::\"connect\", resource in Network::\"{n}\")\nwhen {{ context.dst_port == {port} }};"
                ),
                73..=78 => format!(
                    "forbid (principal, action == Action::\"connect\", resource in Network::\"{n}\")\nunless {{ principal.tags.contains(\"{tag}\") }};"
                ),
                79..=84 => {
                    let month = rng.gen_range(1..=12);
                    format!(
                        "permit (principal in Group::\"g{g}\", action == Action::\"connect\", resource in Network::\"{n}\")\nwhen {{ context.now < datetime(\"2026-{month:02}-15T00:00:00Z\") }};"
                    )
                }
                85..=89 => format!(
                    "permit (principal in Group::\"g{g}\", action == Action::\"connect\", resource)\nwhen {{ principal.tags.contains(\"{tag}\") && resource.tags.contains(\"{tag}\") }};"
                ),
                // A site's subnet behind a routed peer (`context.src_ip`: the LAN host).
                92..=93 => {
                    let third = rng.gen_range(0..4);
                    format!(
                        "permit (principal in Group::\"g{g}\", action == Action::\"connect\", resource in Network::\"{n}\")\nwhen {{ context.src_ip.isInRange(ip(\"192.168.{third}.0/{}\")) }};",
                        pick(&mut rng, &[24, 26, 28])
                    )
                }
                90..=91 => {
                    let third = rng.gen_range(0..4);
                    format!(
                        "permit (principal in Group::\"g{g}\", action == Action::\"connect\", resource)\nwhen {{ context.dst_ip.isInRange(ip(\"10.{}.{third}.0/24\")) }};",
                        rng.gen_range(0..top)
                    )
                }
                96..=97 => format!(
                    "forbid (principal in Group::\"g{g}\", action == Action::\"connect\", resource in Network::\"{n}\");"
                ),
                94..=95 => format!(
                    "permit (principal, action == Action::\"connect\", resource in Network::\"{n}\")\nwhen {{ context.protocol == \"udp\" && context.dst_port == 53 }};"
                ),
                // A forbid that errors (overflow) for ports above 1: it must deny
                // (fail closed), where plain Cedar would skip it.
                98 => format!(
                    "forbid (principal in Group::\"g{g}\", action == Action::\"connect\", resource in Network::\"{n}\")\nwhen {{ context.dst_port * 4611686018427387904 < 0 }};"
                ),
                // Errors (overflow) for ports above 1: exercises error reporting.
                _ => format!(
                    "permit (principal in Group::\"g{g}\", action == Action::\"connect\", resource)\nwhen {{ context.dst_port * 9223372036854775807 > 0 }};"
                ),
            };
            let _ = writeln!(cedar, "@id(\"p{p}\")\n{body}\n");
        }
        let sources = Sources {
            dir: PathBuf::from("generated"),
            schema: (PathBuf::from("schema.cedarschema"), SCHEMA.to_string()),
            networks: Some((PathBuf::from("networks.toml"), networks)),
            policies: vec![(PathBuf::from("generated.cedar"), cedar)],
        };
        let bundle = match PolicyBundle::from_sources(sources.clone()) {
            Ok(b) => b,
            Err(e) => unreachable_generated(&e.to_string()),
        };
        let users = (0..shape.users)
            .map(|i| Company::user(&mut rng, &shape, i))
            .collect();
        Company {
            bundle,
            sources,
            users,
            shape,
            rng,
        }
    }

    fn user(rng: &mut StdRng, shape: &Shape, i: usize) -> Principal {
        let n = rng.gen_range(1..=4);
        let mut groups: Vec<String> = (0..n)
            .map(|_| format!("g{}", rng.gen_range(0..shape.groups)))
            .collect();
        groups.sort();
        groups.dedup();
        Principal {
            name: format!("u{i}"),
            email: format!("u{i}@example.com"),
            groups,
            tags: TAGS
                .iter()
                .filter(|_| rng.gen_bool(0.25))
                .map(|t| t.to_string())
                .collect(),
        }
    }

    /// A user with new random groups and tags (for identity-change interleaving).
    pub fn reshuffled_user(&mut self, i: usize) -> Principal {
        let shape = self.shape;
        Company::user(&mut self.rng, &shape, i)
    }

    /// `n` random temporary grants (ids `grant-<i>`): random users and networks, half
    /// narrowed to an address range, a third to one port and protocol, windows of one
    /// to sixty days across the year the requests fall in.
    pub fn grants(&mut self, n: usize) -> Vec<Grant> {
        let shape = self.shape;
        let rng = &mut self.rng;
        (0..n)
            .map(|i| {
                let net = rng.gen_range(0..shape.networks);
                let top = top_level(&shape) as u8;
                let dst = rng.gen_bool(0.5).then(|| {
                    let a = IpAddr::from([10, rng.gen_range(0..top), rng.gen_range(0..5), 0]);
                    (a, pick(rng, &[16u8, 24, 32]))
                });
                let (port, protocol) = if rng.gen_bool(0.33) {
                    (
                        Some(pick(rng, &PORTS)),
                        Some(pick(rng, &[Protocol::TCP, Protocol::UDP])),
                    )
                } else {
                    (None, None)
                };
                let start = Utc
                    .with_ymd_and_hms(2026, rng.gen_range(1..=12), rng.gen_range(1..=28), 0, 0, 0)
                    .single()
                    .unwrap_or_default()
                    .timestamp_millis()
                    + rng.gen_range(0..1000);
                Grant {
                    id: format!("grant-{i}"),
                    user: format!("u{}", rng.gen_range(0..shape.users)),
                    network: network_name(net, &shape),
                    dst,
                    port,
                    protocol,
                    start_ms: start,
                    end_ms: start + rng.gen_range(1..=60) * 86_400_000,
                }
            })
            .collect()
    }

    /// A random request: (user name, request, time). 1 in 50 names an unknown user.
    pub fn request(&mut self) -> (String, FlowRequest, DateTime<Utc>) {
        let rng = &mut self.rng;
        let user = if rng.gen_ratio(1, 50) {
            "nobody".to_string()
        } else {
            format!("u{}", rng.gen_range(0..self.shape.users))
        };
        let top = top_level(&self.shape) as u8;
        let dst = match rng.gen_range(0..11) {
            0 => IpAddr::from([192, 0, 2, rng.gen()]),
            // IPv4-mapped IPv6: decided as the IPv4 address.
            10 => IpAddr::V6(
                std::net::Ipv4Addr::from([
                    10,
                    rng.gen_range(0..top),
                    rng.gen_range(0..5),
                    rng.gen(),
                ])
                .to_ipv6_mapped(),
            ),
            1 => IpAddr::from([
                0xfd00,
                u16::from(rng.gen_range(0..top)),
                0,
                0,
                0,
                0,
                0,
                rng.gen(),
            ]),
            _ => IpAddr::from([10, rng.gen_range(0..top), rng.gen_range(0..5), rng.gen()]),
        };
        let protocol = pick(
            rng,
            &[Protocol::TCP, Protocol::TCP, Protocol::UDP, Protocol::ICMP],
        );
        let dst_port = if protocol == Protocol::ICMP {
            0
        } else {
            pick(rng, &PORTS)
        };
        let month = rng.gen_range(1..=12);
        let now = Utc
            .with_ymd_and_hms(2026, month, rng.gen_range(1..=28), 12, 0, 0)
            .single()
            .unwrap_or_default();
        let req = FlowRequest {
            // A device's tunnel address, or a host behind a routed peer (a site's LAN).
            src_ip: if rng.gen_ratio(1, 4) {
                IpAddr::from([192, 168, rng.gen_range(0..5), rng.gen()])
            } else {
                IpAddr::from([100, 64, 0, rng.gen_range(2..250)])
            },
            dst_ip: dst,
            dst_port,
            protocol,
            device: format!("dev{}", rng.gen_range(0..3)),
            mfa: rng.gen_bool(0.5),
            // Signed on up to a day before `now`, or never.
            authenticated_at: if rng.gen_bool(0.1) {
                0
            } else {
                now.timestamp() - rng.gen_range(0..86_400)
            },
        };
        (user, req, now)
    }
}

fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    use rand::seq::SliceRandom;
    // Callers pass non-empty constant tables.
    match items.choose(rng) {
        Some(x) => *x,
        None => unreachable_generated("empty table"),
    }
}

#[allow(clippy::panic)]
fn unreachable_generated<T>(errors: &str) -> T {
    panic!("generated policy set does not validate (generator bug):\n{errors}")
}
