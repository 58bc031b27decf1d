//! Hash-chain verification: recompute every gateway's chain from the rows in ClickHouse.

use std::collections::BTreeMap;

use portcullis_audit::{AuditRow, GENESIS};
use serde::Serialize;

/// Something wrong with the trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "finding", rename_all = "snake_case")]
pub enum Finding {
    /// Sequence numbers missing: rows deleted (or lost before upload).
    Gap {
        gateway: String,
        after: u64,
        next: u64,
    },
    /// A row's content does not match its hash: edited.
    Altered {
        gateway: String,
        seq: u64,
        event_id: String,
    },
    /// A row's `prev_hash` is not the previous row's hash: rows replaced or reordered.
    BrokenLink { gateway: String, seq: u64 },
    /// Two different rows claim one sequence number.
    Conflict { gateway: String, seq: u64 },
    /// A gateway started a new chain (its spool was reset): not tampering by itself,
    /// but everything before it can no longer be linked.
    ChainRestart { gateway: String, seq: u64 },
    /// Event time runs backwards along the sequence (a clock step, or reordering).
    TimeBackwards { gateway: String, seq: u64 },
    /// A node the cluster registry knows has no rows at all: its trail is missing.
    MissingChain { gateway: String },
}

/// What verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub rows: u64,
    /// Per gateway: (first seq, last seq) checked.
    pub gateways: BTreeMap<String, (u64, u64)>,
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    /// No findings, and at least one row checked: a verification that checked nothing
    /// proves nothing and is not a pass.
    pub fn ok(&self) -> bool {
        self.findings.is_empty() && self.rows > 0
    }

    /// Adds a finding for each of `gateways` (a cluster's registered nodes) that has no
    /// chain in the report: every node records at least its start.
    pub fn expect_gateways<'a>(&mut self, gateways: impl IntoIterator<Item = &'a str>) {
        for g in gateways {
            if !self.gateways.contains_key(g) {
                self.findings.push(Finding::MissingChain {
                    gateway: g.to_string(),
                });
            }
        }
    }
}

impl Serialize for VerifyReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("VerifyReport", 4)?;
        st.serialize_field("rows", &self.rows)?;
        st.serialize_field("gateways", &self.gateways)?;
        st.serialize_field("findings", &self.findings)?;
        st.serialize_field("ok", &self.ok())?;
        st.end()
    }
}

/// Verifies rows sorted by `(gateway, seq)`. Identical rows (a retried upload before the
/// merge collapsed them) count once. The first row of each gateway is the anchor: its own
/// hash is checked, its link to earlier rows (outside the window) is not.
pub fn verify(rows: &[AuditRow]) -> VerifyReport {
    let mut report = VerifyReport::default();
    let mut prev: Option<&AuditRow> = None;
    for row in rows {
        if let Some(p) = prev.filter(|p| p.gateway == row.gateway && p.seq == row.seq) {
            if p != row {
                report.findings.push(Finding::Conflict {
                    gateway: row.gateway.clone(),
                    seq: row.seq,
                });
            }
            continue;
        }
        report.rows += 1;
        let same_gateway = prev.filter(|p| p.gateway == row.gateway);
        let entry = report
            .gateways
            .entry(row.gateway.clone())
            .or_insert((row.seq, row.seq));
        entry.1 = row.seq;
        if row.expected_hash() != row.hash {
            report.findings.push(Finding::Altered {
                gateway: row.gateway.clone(),
                seq: row.seq,
                event_id: row.event_id.to_string(),
            });
        }
        if let Some(p) = same_gateway {
            if row.prev_hash == GENESIS && row.seq != p.seq + 1 {
                report.findings.push(Finding::ChainRestart {
                    gateway: row.gateway.clone(),
                    seq: row.seq,
                });
            } else if row.seq != p.seq + 1 {
                report.findings.push(Finding::Gap {
                    gateway: row.gateway.clone(),
                    after: p.seq,
                    next: row.seq,
                });
            } else if row.prev_hash != p.hash {
                report.findings.push(Finding::BrokenLink {
                    gateway: row.gateway.clone(),
                    seq: row.seq,
                });
            }
            if row.time_us < p.time_us {
                report.findings.push(Finding::TimeBackwards {
                    gateway: row.gateway.clone(),
                    seq: row.seq,
                });
            }
        }
        prev = Some(row);
    }
    report
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use portcullis_audit::Chain;
    use portcullis_model::{Envelope, Event};

    fn chain(gateway: &str, n: u64) -> Vec<AuditRow> {
        let mut chain = Chain::default();
        (1..=n)
            .map(|seq| {
                let mut r = AuditRow::from_envelope(&Envelope {
                    v: 1,
                    id: uuid_like(seq),
                    seq,
                    time: chrono::DateTime::from_timestamp(1_800_000_000 + seq as i64, 0).unwrap(),
                    gateway: gateway.into(),
                    event: Event::PeerAdded {
                        user: format!("u{seq}"),
                        device: "d".into(),
                    },
                });
                chain.seal(&mut r);
                r
            })
            .collect()
    }

    fn uuid_like(seq: u64) -> uuid::Uuid {
        uuid::Uuid::from_u64_pair(seq, seq)
    }

    #[test]
    fn an_intact_trail_verifies_with_duplicates_collapsed() {
        let mut rows = chain("a", 10);
        rows.insert(3, rows[3].clone());
        rows.extend(chain("b", 5));
        let r = verify(&rows);
        assert!(r.ok(), "{:?}", r.findings);
        assert_eq!(r.rows, 15);
        assert_eq!(r.gateways["a"], (1, 10));
    }

    #[test]
    fn deletion_edit_reorder_and_conflict_are_found() {
        let rows = chain("a", 10);
        let mut deleted = rows.clone();
        deleted.remove(4);
        assert_eq!(
            verify(&deleted).findings,
            vec![Finding::Gap {
                gateway: "a".into(),
                after: 4,
                next: 6
            }]
        );
        let mut edited = rows.clone();
        edited[6].user = "mallory".into();
        assert!(matches!(
            &verify(&edited).findings[..],
            [Finding::Altered { seq: 7, .. }]
        ));
        let mut swapped = rows.clone();
        let (s3, s4) = (swapped[3].seq, swapped[4].seq);
        swapped.swap(3, 4);
        swapped[3].seq = s3;
        swapped[4].seq = s4;
        assert!(verify(&swapped)
            .findings
            .iter()
            .any(|f| matches!(f, Finding::Altered { .. })));
        let mut conflict = rows.clone();
        let mut other = conflict[2].clone();
        other.user = "eve".into();
        conflict.insert(3, other);
        assert!(verify(&conflict).findings.contains(&Finding::Conflict {
            gateway: "a".into(),
            seq: 3
        }));
        // A forged row with a recomputed own hash still breaks the link to the next row.
        let mut forged = rows.clone();
        forged[5].user = "mallory".into();
        forged[5].hash = forged[5].expected_hash();
        assert_eq!(
            verify(&forged).findings,
            vec![Finding::BrokenLink {
                gateway: "a".into(),
                seq: 7
            }]
        );
    }
}
