//! `networks.toml`: named networks with CIDRs, tags and an optional parent, and the
//! longest-prefix resolution of a destination address to the most specific network.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::diagnostics::{line_col, SourceError};

/// The network every destination outside all declared networks resolves to.
pub const INTERNET: &str = "internet";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworksFile {
    #[serde(default)]
    network: Vec<NetworkEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkEntry {
    name: Spanned<String>,
    #[serde(default)]
    parent: Option<Spanned<String>>,
    #[serde(default)]
    cidrs: Vec<Spanned<String>>,
    #[serde(default)]
    tags: Vec<String>,
    /// The cluster site that serves it; none: every site (a child inherits its parent's).
    #[serde(default)]
    site: Option<Spanned<String>>,
}

/// Deepest `parent` chain accepted (prod ⊃ prod-eu ⊃ prod-eu-db needs 3).
pub const MAX_NETWORK_DEPTH: usize = 32;
/// Errors reported for one file; past this a count of the rest.
const MAX_ERRORS: usize = 100;

/// One declared network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub parent: Option<String>,
    pub cidrs: Vec<IpNet>,
    pub tags: Vec<String>,
    /// The site as declared (see [`Networks::site_of`] for the inherited one).
    pub site: Option<String>,
}

/// All declared networks and a prefix table for resolving destinations.
#[derive(Default)]
pub struct Networks {
    networks: Vec<Network>,
    by_name: HashMap<String, usize>,
    /// (prefix, index into `networks`), longest prefix first (checks and listing).
    prefixes: Vec<(IpNet, usize)>,
    /// Longest-prefix match (tree bitmap): ~tens of ns per lookup.
    table: ip_network_table::IpNetworkTable<usize>,
    /// Indices of each network's ancestors, nearest first.
    ancestors: Vec<Vec<usize>>,
    /// Each network's site: its own, else its nearest ancestor's.
    sites: Vec<Option<usize>>,
    /// Where each declared `site` is (network index, location; empty message), so a
    /// later check against the cluster's sites can name file:line:col.
    site_decls: Vec<(usize, SourceError)>,
}

impl std::fmt::Debug for Networks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Networks")
            .field("networks", &self.networks)
            .finish()
    }
}

impl Clone for Networks {
    fn clone(&self) -> Self {
        Networks {
            networks: self.networks.clone(),
            by_name: self.by_name.clone(),
            prefixes: self.prefixes.clone(),
            table: build_table(&self.prefixes),
            ancestors: self.ancestors.clone(),
            sites: self.sites.clone(),
            site_decls: self.site_decls.clone(),
        }
    }
}

fn build_table(prefixes: &[(IpNet, usize)]) -> ip_network_table::IpNetworkTable<usize> {
    let mut table = ip_network_table::IpNetworkTable::new();
    for (net, i) in prefixes {
        if let Ok(n) = ip_network::IpNetwork::new(net.network(), net.prefix_len()) {
            table.insert(n, *i);
        }
    }
    table
}

impl Networks {
    /// Parses and checks `networks.toml` content. `file` names it in errors. Every check
    /// is near-linear (a sort and a sweep), so a large file cannot stall a reload.
    pub fn parse(file: &Path, src: &str) -> Result<Networks, Vec<SourceError>> {
        let parsed: NetworksFile = toml::from_str(src).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(src, s.start)).unwrap_or((1, 1));
            vec![SourceError::at(
                file,
                src,
                line,
                col,
                e.message().to_string(),
            )]
        })?;
        let mut errors = Errors {
            file,
            src,
            list: Vec::new(),
            more: 0,
        };
        let mut networks = Vec::new();
        // Where each kept network's name and cidrs are, for errors.
        let mut spans: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut parent_spans: Vec<usize> = Vec::new();
        let mut site_spans: Vec<usize> = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for entry in parsed.network {
            let name_at = entry.name.span().start;
            let name = entry.name.into_inner();
            if name.is_empty() || name == INTERNET {
                errors.push(
                    name_at,
                    format!("network name {name:?} is reserved or empty"),
                );
                continue;
            }
            if names.contains_key(&name) {
                errors.push(name_at, format!("duplicate network {name:?}"));
                continue;
            }
            let mut cidrs = Vec::new();
            let mut cidr_spans = Vec::new();
            for c in &entry.cidrs {
                let at = c.span().start;
                let text = c.get_ref();
                match text.parse::<IpNet>() {
                    Ok(net) if net.trunc() == net => {
                        cidrs.push(net);
                        cidr_spans.push(at);
                    }
                    Ok(net) => errors.push(
                        at,
                        format!(
                            "network {name:?}: cidr {text:?} has host bits set (did you mean {}?)",
                            net.trunc()
                        ),
                    ),
                    Err(e) => {
                        errors.push(at, format!("network {name:?}: invalid cidr {text:?}: {e}"))
                    }
                }
            }
            names.insert(name.clone(), networks.len());
            spans.push((name_at, cidr_spans));
            parent_spans.push(entry.parent.as_ref().map_or(name_at, |p| p.span().start));
            site_spans.push(entry.site.as_ref().map_or(name_at, |s| s.span().start));
            let site = entry.site.map(Spanned::into_inner);
            if site.as_deref().is_some_and(str::is_empty) {
                errors.push(
                    site_spans.last().copied().unwrap_or(name_at),
                    format!("network {name:?}: empty site"),
                );
            }
            networks.push(Network {
                name,
                parent: entry.parent.map(Spanned::into_inner),
                cidrs,
                tags: entry.tags,
                site,
            });
        }
        // Parents: known, acyclic, at most MAX_NETWORK_DEPTH deep. Depths are memoised,
        // so each network is walked once.
        let parent_of: Vec<Option<usize>> = networks
            .iter()
            .zip(&parent_spans)
            .map(|(n, at)| {
                let p = n.parent.as_ref()?;
                let found = names.get(p).copied();
                if found.is_none() {
                    errors.push(*at, format!("network {:?}: unknown parent {p:?}", n.name));
                }
                found
            })
            .collect();
        let mut depth: Vec<Option<usize>> = vec![None; networks.len()];
        for start in 0..networks.len() {
            let mut path = Vec::new();
            let mut cur = Some(start);
            let base = loop {
                match cur {
                    None => break 0,
                    Some(i) if depth.get(i).copied().flatten().is_some() => {
                        break depth.get(i).copied().flatten().unwrap_or(0)
                    }
                    Some(i) if path.contains(&i) || path.len() > MAX_NETWORK_DEPTH => {
                        break usize::MAX
                    }
                    Some(i) => {
                        path.push(i);
                        cur = parent_of.get(i).copied().flatten();
                    }
                }
            };
            for (k, i) in path.iter().rev().enumerate() {
                let d = base.saturating_add(k + 1);
                if let Some(slot) = depth.get_mut(*i) {
                    *slot = Some(d);
                }
            }
            let d = depth.get(start).copied().flatten().unwrap_or(0);
            if d > MAX_NETWORK_DEPTH + 1 {
                if let (Some(n), Some((at, _))) = (networks.get(start), spans.get(start)) {
                    let message = if base == usize::MAX && path.len() <= MAX_NETWORK_DEPTH {
                        format!("network {:?}: parent chain is a cycle", n.name)
                    } else {
                        format!(
                            "network {:?}: parent chain is a cycle or deeper than {MAX_NETWORK_DEPTH} levels",
                            n.name
                        )
                    };
                    errors.push(*at, message);
                }
            }
        }
        if !errors.list.is_empty() {
            return Err(errors.finish());
        }
        let mut out = Networks::from_networks(networks);
        out.site_decls = out
            .networks
            .iter()
            .enumerate()
            .filter(|(_, n)| n.site.is_some())
            .map(|(i, _)| {
                let (line, col) = line_col(src, site_spans.get(i).copied().unwrap_or(0));
                (i, SourceError::at(file, src, line, col, String::new()))
            })
            .collect();
        // A network inside a site-bound one cannot be served by another site.
        for (i, n) in out.networks.iter().enumerate() {
            let (Some(own), Some(inherited)) = (
                n.site.as_deref(),
                out.ancestor_indices(i)
                    .iter()
                    .find_map(|a| out.networks.get(*a).and_then(|p| p.site.as_deref())),
            ) else {
                continue;
            };
            if own != inherited {
                errors.push(
                    site_spans.get(i).copied().unwrap_or(0),
                    format!(
                        "network {:?}: site {own:?} differs from {inherited:?}, the site of the network it is inside",
                        n.name
                    ),
                );
            }
        }
        // Overlaps are only allowed along the parent chain (prod-db inside prod). CIDRs
        // either nest or are disjoint, so after sorting by (family, address, length) the
        // prefixes that contain one are exactly those on a stack (at most 129 deep).
        let mut order: Vec<(IpNet, usize, usize)> = out
            .networks
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.cidrs.iter().enumerate().map(move |(k, c)| (*c, i, k)))
            .collect();
        order.sort_by_key(|(c, _, _)| (c.addr().is_ipv6(), addr_bits(c), c.prefix_len()));
        let mut stack: Vec<(IpNet, usize, usize)> = Vec::new();
        for (b, bi, bk) in order {
            while stack.last().is_some_and(|(a, _, _)| !a.contains(&b)) {
                stack.pop();
            }
            for (a, ai, ak) in stack.iter().rev() {
                if *ai == bi && *a != b {
                    continue;
                }
                let related = out.is_ancestor_index(*ai, bi) || out.is_ancestor_index(bi, *ai);
                if *ai == bi || !related {
                    let (Some(na), Some(nb)) = (out.networks.get(*ai), out.networks.get(bi)) else {
                        continue;
                    };
                    // Point at whichever was declared later: that is the one being added.
                    let (later, later_k, later_net, earlier_net, later_cidr, earlier_cidr) =
                        if (bi, bk) > (*ai, *ak) {
                            (bi, bk, nb, na, b, *a)
                        } else {
                            (*ai, *ak, na, nb, *a, b)
                        };
                    let at = spans
                        .get(later)
                        .and_then(|(_, c)| c.get(later_k))
                        .copied()
                        .unwrap_or(0);
                    errors.push(
                        at,
                        format!(
                            "cidr {later_cidr} of network {:?} overlaps {earlier_cidr} of network {:?}, which is not its ancestor or descendant",
                            later_net.name, earlier_net.name
                        ),
                    );
                    break;
                }
            }
            stack.push((b, bi, bk));
        }
        if errors.list.is_empty() {
            Ok(out)
        } else {
            Err(errors.finish())
        }
    }

    /// Builds the prefix table from already checked networks.
    pub fn from_networks(networks: Vec<Network>) -> Networks {
        let mut prefixes: Vec<(IpNet, usize)> = networks
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.cidrs.iter().map(move |c| (*c, i)))
            .collect();
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.prefix_len()));
        let table = build_table(&prefixes);
        let by_name: HashMap<String, usize> = networks
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let index_of = |name: &str| by_name.get(name).copied();
        let ancestors: Vec<Vec<usize>> = networks
            .iter()
            .map(|n| {
                std::iter::successors(n.parent.as_deref().and_then(index_of), |i| {
                    networks
                        .get(*i)
                        .and_then(|p| p.parent.as_deref())
                        .and_then(index_of)
                })
                .take(networks.len().min(MAX_NETWORK_DEPTH + 1))
                .collect()
            })
            .collect();
        let sites = networks
            .iter()
            .enumerate()
            .map(|(i, n)| {
                n.site.as_ref().map(|_| i).or_else(|| {
                    ancestors.get(i).and_then(|a| {
                        a.iter()
                            .copied()
                            .find(|p| networks.get(*p).is_some_and(|p| p.site.is_some()))
                    })
                })
            })
            .collect();
        Networks {
            networks,
            by_name,
            prefixes,
            table,
            ancestors,
            sites,
            site_decls: Vec::new(),
        }
    }

    /// An error at each declared `site` that is none of `known` (the cluster's
    /// `[[cluster.sites]]`). In a cluster with sites such a network is served by no node:
    /// a typo that would deny everyone silently. (Without sites every node serves every
    /// network and the key is ignored: callers check only when there are sites.)
    pub fn unknown_sites(&self, known: &[&str]) -> Vec<SourceError> {
        self.site_decls
            .iter()
            .filter_map(|(i, at)| {
                let n = self.networks.get(*i)?;
                let site = n.site.as_deref()?;
                if known.contains(&site) {
                    return None;
                }
                let message = format!(
                    "network {:?}: site {site:?} is not one of [[cluster.sites]] ({}): no node would serve it",
                    n.name,
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                );
                Some(SourceError {
                    message,
                    ..at.clone()
                })
            })
            .collect()
    }

    /// The site serving the network at `index`: its own, else its nearest ancestor's;
    /// `None`: every site.
    pub fn site_of(&self, index: usize) -> Option<&str> {
        let owner = self.sites.get(index).copied().flatten()?;
        self.networks.get(owner)?.site.as_deref()
    }

    /// The site serving the network called `name`.
    pub fn site_of_name(&self, name: &str) -> Option<&str> {
        self.site_of(*self.by_name.get(name)?)
    }

    /// The site serving `ip`'s network (`None`: every site, the internet included).
    pub fn site_for(&self, ip: IpAddr) -> Option<&str> {
        self.site_of(self.resolve_index(ip)?)
    }

    fn is_ancestor_index(&self, ancestor: usize, of: usize) -> bool {
        self.ancestor_indices(of).contains(&ancestor)
    }

    /// Index of the most specific network containing `ip`; `None` is [`INTERNET`].
    #[inline]
    /// An IPv4-mapped IPv6 address resolves as the IPv4 address it carries.
    pub fn resolve_index(&self, ip: IpAddr) -> Option<usize> {
        self.table.longest_match(ip.to_canonical()).map(|(_, i)| *i)
    }

    /// The network at `index` (from [`Networks::resolve_index`]).
    pub fn get(&self, index: usize) -> Option<&Network> {
        self.networks.get(index)
    }

    /// Ancestor indices of the network at `index`, nearest first.
    pub fn ancestor_indices(&self, index: usize) -> &[usize] {
        self.ancestors
            .get(index)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Network> {
        self.networks.iter()
    }

    pub fn len(&self) -> usize {
        self.networks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// The most specific network containing `ip`, or [`INTERNET`].
    pub fn resolve(&self, ip: IpAddr) -> &str {
        self.resolve_index(ip)
            .and_then(|i| self.networks.get(i))
            .map(|n| n.name.as_str())
            .unwrap_or(INTERNET)
    }

    /// `ancestor` is a strict ancestor of `name`.
    pub fn is_ancestor(&self, ancestor: &str, name: &str) -> bool {
        self.ancestors(name).any(|a| a == ancestor)
    }

    /// Parents of `name`, nearest first.
    pub fn ancestors<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> + 'a {
        let indices = self
            .by_name
            .get(name)
            .map(|i| self.ancestor_indices(*i))
            .unwrap_or_default();
        indices
            .iter()
            .filter_map(|i| self.networks.get(*i).map(|n| n.name.as_str()))
    }
}

/// A CIDR's address as a number, for sorting.
fn addr_bits(c: &IpNet) -> u128 {
    match c.addr() {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Errors located by byte offset, capped at [`MAX_ERRORS`].
struct Errors<'a> {
    file: &'a Path,
    src: &'a str,
    list: Vec<SourceError>,
    more: usize,
}

impl Errors<'_> {
    fn push(&mut self, offset: usize, message: String) {
        if self.list.len() >= MAX_ERRORS {
            self.more += 1;
            return;
        }
        let (line, col) = line_col(self.src, offset);
        self.list
            .push(SourceError::at(self.file, self.src, line, col, message));
    }

    fn finish(mut self) -> Vec<SourceError> {
        if self.more > 0 {
            self.list.push(SourceError::file(
                self.file,
                format!("{} more errors not shown", self.more),
            ));
        }
        self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Networks, Vec<SourceError>> {
        Networks::parse(Path::new("networks.toml"), src)
    }

    const GOOD: &str = r#"
[[network]]
name = "prod"
cidrs = ["10.8.0.0/16", "fd00:8::/32"]
tags = ["prod"]

[[network]]
name = "prod-db"
parent = "prod"
cidrs = ["10.8.5.0/24"]
"#;

    #[test]
    fn longest_prefix_wins_and_falls_back_to_internet() -> Result<(), Vec<SourceError>> {
        let n = parse(GOOD)?;
        let ip = |s: &str| s.parse::<IpAddr>().map_err(|_| Vec::new());
        assert_eq!(n.resolve(ip("10.8.5.4")?), "prod-db");
        assert_eq!(n.resolve(ip("10.8.6.4")?), "prod");
        assert_eq!(n.resolve(ip("fd00:8::1")?), "prod");
        assert_eq!(n.resolve(ip("192.0.2.1")?), INTERNET);
        assert_eq!(n.ancestors("prod-db").collect::<Vec<_>>(), vec!["prod"]);
        Ok(())
    }

    #[test]
    fn a_network_is_served_by_its_site_or_its_parents_and_a_child_cannot_move() {
        let src = r#"
[[network]]
name = "prod"
cidrs = ["10.8.0.0/16"]

[[network]]
name = "prod-eu"
parent = "prod"
site = "eu-1"
cidrs = ["10.8.1.0/24"]

[[network]]
name = "prod-eu-db"
parent = "prod-eu"
cidrs = ["10.8.1.128/25"]

[[network]]
name = "prod-us"
parent = "prod"
site = "us-1"
cidrs = ["10.8.2.0/24"]
"#;
        let n = parse(src).unwrap_or_else(|e| panic!("{e:?}"));
        let site = |ip: [u8; 4]| n.site_for(IpAddr::from(ip));
        assert_eq!(site([10, 8, 1, 5]), Some("eu-1"));
        assert_eq!(
            site([10, 8, 1, 200]),
            Some("eu-1"),
            "inherited from prod-eu"
        );
        assert_eq!(site([10, 8, 2, 5]), Some("us-1"));
        assert_eq!(site([10, 8, 9, 9]), None, "prod: every site");
        assert_eq!(site([192, 0, 2, 1]), None, "the internet: every site");
        let moved = src.replace(
            "parent = \"prod-eu\"\ncidrs",
            "parent = \"prod-eu\"\nsite = \"us-1\"\ncidrs",
        );
        let e = parse(&moved).err().unwrap_or_default();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].to_string().contains("differs from \"eu-1\""),
            "{}",
            e[0]
        );
        assert!(e[0].to_string().contains("networks.toml:15:8"), "{}", e[0]);
    }

    #[test]
    fn a_site_the_cluster_does_not_have_is_named_at_its_line_and_column() {
        let src = "[[network]]\nname = \"prod\"\nsite = \"eu1\"\ncidrs = [\"10.8.0.0/16\"]\n\n\
                   [[network]]\nname = \"dev\"\nsite = \"us-1\"\ncidrs = [\"10.9.0.0/16\"]\n";
        let n = parse(src).unwrap_or_else(|e| panic!("{e:?}"));
        let e = n.unknown_sites(&["eu-1", "us-1"]);
        assert_eq!(e.len(), 1, "{e:?}");
        let text = e[0].to_string();
        assert!(text.contains("networks.toml:3:8"), "{text}");
        assert!(
            text.contains(
                "network \"prod\": site \"eu1\" is not one of [[cluster.sites]] (eu-1, us-1)"
            ),
            "{text}"
        );
        assert!(n.unknown_sites(&["eu1", "us-1"]).is_empty());
        let e = n.unknown_sites(&["eu-2"]);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[1].to_string().contains("networks.toml:8:8"), "{}", e[1]);
        // A clone keeps the locations.
        assert_eq!(n.clone().unknown_sites(&["eu-2"]), e);
    }

    proptest::proptest! {
        #[test]
        fn table_lookup_equals_a_linear_longest_prefix_scan(a in 0u8..=255, b in 0u8..=255, c in 0u8..=255) {
            let n = parse(GOOD).map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{e:?}")))?;
            let ip = IpAddr::from([10, a, b, c]);
            let linear = n.prefixes.iter().find(|(net, _)| net.contains(&ip)).map(|(_, i)| *i);
            proptest::prop_assert_eq!(n.resolve_index(ip), linear);
            let ip = IpAddr::from([0xfd00, 8, u16::from(a), 0, 0, 0, 0, u16::from(c)]);
            let linear = n.prefixes.iter().find(|(net, _)| net.contains(&ip)).map(|(_, i)| *i);
            proptest::prop_assert_eq!(n.resolve_index(ip), linear);
        }
    }

    #[test]
    fn errors_name_line_and_reason() {
        let cases = [
            ("[[network]]\nname = \"a\"\ncidrs = [\"10.0.0.0/33\"]\n", "invalid cidr", 3),
            ("[[network]]\nname = \"a\"\ncidrs = [\"10.0.0.1/8\"]\n", "host bits", 3),
            ("[[network]]\nname = \"a\"\nparent = \"zz\"\n", "unknown parent", 3),
            ("[[network]]\nname = \"a\"\nbogus = 1\n", "unknown field", 3),
            (
                "[[network]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\n[[network]]\nname = \"b\"\ncidrs = [\"10.1.0.0/16\"]\n",
                "overlaps",
                6,
            ),
            (
                "[[network]]\nname = \"a\"\nparent = \"b\"\n[[network]]\nname = \"b\"\nparent = \"a\"\n",
                "cycle",
                2,
            ),
            ("[[network]]\nname = \"internet\"\n", "reserved", 2),
        ];
        for (src, what, line) in cases {
            match parse(src) {
                Ok(_) => panic!("accepted {src}"),
                Err(errs) => {
                    let e = &errs[0];
                    assert!(e.message.contains(what), "{what}: {e}");
                    assert_eq!(e.line, line, "{what}: {e}");
                    assert!(e.to_string().starts_with("networks.toml:"), "{e}");
                }
            }
        }
    }
}
