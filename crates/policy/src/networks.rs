//! `networks.toml`: named networks with CIDRs, tags and an optional parent, and the
//! longest-prefix resolution of a destination address to the most specific network.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;

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
    name: String,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    cidrs: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// One declared network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub parent: Option<String>,
    pub cidrs: Vec<IpNet>,
    pub tags: Vec<String>,
}

/// All declared networks and a prefix table for resolving destinations.
#[derive(Default)]
pub struct Networks {
    networks: Vec<Network>,
    /// (prefix, index into `networks`), longest prefix first (checks and listing).
    prefixes: Vec<(IpNet, usize)>,
    /// Longest-prefix match (tree bitmap): ~tens of ns per lookup.
    table: ip_network_table::IpNetworkTable<usize>,
    /// Indices of each network's ancestors, nearest first.
    ancestors: Vec<Vec<usize>>,
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
        Networks::from_networks(self.networks.clone())
    }
}

impl Networks {
    /// Parses and checks `networks.toml` content. `file` names it in errors.
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
        let mut errors = Vec::new();
        let locate = |needle: &str| -> (usize, usize) {
            src.find(needle).map(|o| line_col(src, o)).unwrap_or((1, 1))
        };
        // An error located at the first occurrence of `needle` in the file.
        let error_at = |needle: &str, message: String| {
            let (line, col) = locate(needle);
            SourceError::at(file, src, line, col, message)
        };
        let mut networks = Vec::new();
        let mut names = HashSet::new();
        for entry in parsed.network {
            let name_needle = format!("\"{}\"", entry.name);
            if entry.name.is_empty() || entry.name == INTERNET {
                errors.push(error_at(
                    &name_needle,
                    format!("network name {:?} is reserved or empty", entry.name),
                ));
                continue;
            }
            if !names.insert(entry.name.clone()) {
                errors.push(error_at(
                    &name_needle,
                    format!("duplicate network {:?}", entry.name),
                ));
                continue;
            }
            let mut cidrs = Vec::new();
            for c in &entry.cidrs {
                let cidr_needle = format!("\"{c}\"");
                match c.parse::<IpNet>() {
                    Ok(net) if net.trunc() == net => cidrs.push(net),
                    Ok(net) => errors.push(error_at(
                        &cidr_needle,
                        format!(
                            "network {:?}: cidr {c:?} has host bits set (did you mean {}?)",
                            entry.name,
                            net.trunc()
                        ),
                    )),
                    Err(e) => errors.push(error_at(
                        &cidr_needle,
                        format!("network {:?}: invalid cidr {c:?}: {e}", entry.name),
                    )),
                }
            }
            networks.push(Network {
                name: entry.name,
                parent: entry.parent,
                cidrs,
                tags: entry.tags,
            });
        }
        let by_name: HashMap<&str, &Network> =
            networks.iter().map(|n| (n.name.as_str(), n)).collect();
        for n in &networks {
            if let Some(p) = &n.parent {
                if !by_name.contains_key(p.as_str()) {
                    let (line, col) = locate(&format!("parent = \"{p}\""));
                    errors.push(SourceError::at(
                        file,
                        src,
                        line,
                        col,
                        format!("network {:?}: unknown parent {p:?}", n.name),
                    ));
                }
            }
            // Walk up; a walk longer than the number of networks is a cycle.
            let mut cur = n.parent.as_deref();
            let mut steps = 0;
            while let Some(p) = cur {
                steps += 1;
                if p == n.name || steps > networks.len() {
                    let (line, col) = locate(&format!("\"{}\"", n.name));
                    errors.push(SourceError::at(
                        file,
                        src,
                        line,
                        col,
                        format!("network {:?}: parent chain is a cycle", n.name),
                    ));
                    break;
                }
                cur = by_name.get(p).and_then(|x| x.parent.as_deref());
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let out = Networks::from_networks(networks);
        // Overlaps are only allowed along the parent chain (prod-db inside prod).
        for (i, (a, ai)) in out.prefixes.iter().enumerate() {
            for (b, bi) in out.prefixes.iter().skip(i + 1) {
                let overlap = a.contains(b) || b.contains(a);
                if !overlap {
                    continue;
                }
                let (Some(na), Some(nb)) = (out.networks.get(*ai), out.networks.get(*bi)) else {
                    continue;
                };
                if ai == bi && a != b {
                    continue;
                }
                let related =
                    out.is_ancestor(&na.name, &nb.name) || out.is_ancestor(&nb.name, &na.name);
                if ai == bi || !related {
                    let (line, col) = locate(&format!("\"{b}\""));
                    errors.push(SourceError::at(
                        file,
                        src,
                        line,
                        col,
                        format!(
                            "cidr {b} of network {:?} overlaps {a} of network {:?}, which is not its ancestor or descendant",
                            nb.name, na.name
                        ),
                    ));
                }
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
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
        let mut table = ip_network_table::IpNetworkTable::new();
        for (net, i) in &prefixes {
            if let Ok(n) = ip_network::IpNetwork::new(net.network(), net.prefix_len()) {
                table.insert(n, *i);
            }
        }
        let index_of = |name: &str| networks.iter().position(|n| n.name == name);
        let ancestors = networks
            .iter()
            .map(|n| {
                std::iter::successors(n.parent.as_deref().and_then(index_of), |i| {
                    networks
                        .get(*i)
                        .and_then(|p| p.parent.as_deref())
                        .and_then(index_of)
                })
                .take(networks.len())
                .collect()
            })
            .collect();
        Networks {
            networks,
            prefixes,
            table,
            ancestors,
        }
    }

    /// Index of the most specific network containing `ip`; `None` is [`INTERNET`].
    #[inline]
    pub fn resolve_index(&self, ip: IpAddr) -> Option<usize> {
        self.table.longest_match(ip).map(|(_, i)| *i)
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
        let start = self
            .networks
            .iter()
            .find(|n| n.name == name)
            .and_then(|n| n.parent.as_deref());
        let limit = self.networks.len();
        std::iter::successors(start, move |cur| {
            self.networks
                .iter()
                .find(|n| n.name == *cur)
                .and_then(|n| n.parent.as_deref())
        })
        .take(limit)
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
                3,
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
