//! Hash-chain verification: recompute every gateway's chain from the rows in ClickHouse.

use std::collections::BTreeMap;

use portcullis_audit::checkpoint::{Merkle, PublicKey, SignedCheckpoint};
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
    /// A checkpoint whose signature no given key verifies (forged, or signed by a key
    /// not given): it proves nothing and was not used.
    BadSignature {
        gateway: String,
        seq: u64,
        source: String,
    },
    /// The rows a signed checkpoint covers are not the rows it signed (the head's hash or
    /// the interval's Merkle root differ): rows rewritten, even consistently re-hashed.
    CheckpointMismatch {
        gateway: String,
        seq: u64,
        source: String,
    },
    /// The trail ends before a signed checkpoint's head (or its own event): the tail
    /// was cut or the newest rows deleted.
    Truncated {
        gateway: String,
        signed_seq: u64,
        last_seq: u64,
        source: String,
    },
}

/// What verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub rows: u64,
    /// Per gateway: (first seq, last seq) checked.
    pub gateways: BTreeMap<String, (u64, u64)>,
    pub findings: Vec<Finding>,
    /// Signed checkpoints whose rows were all checked against them.
    pub checkpoints_verified: u64,
    /// Per gateway: rows after its newest verified checkpoint (not yet signed).
    pub unsigned_tail: BTreeMap<String, u64>,
    /// Per gateway: row ranges in the chain that no signed root covers (their records
    /// were gone when a node restarted); the chain still links them.
    pub uncovered: BTreeMap<String, Vec<[u64; 2]>>,
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
        let mut st = s.serialize_struct("VerifyReport", 7)?;
        st.serialize_field("rows", &self.rows)?;
        st.serialize_field("gateways", &self.gateways)?;
        st.serialize_field("findings", &self.findings)?;
        st.serialize_field("checkpoints_verified", &self.checkpoints_verified)?;
        st.serialize_field("unsigned_tail", &self.unsigned_tail)?;
        st.serialize_field("uncovered", &self.uncovered)?;
        st.serialize_field("ok", &self.ok())?;
        st.end()
    }
}

/// A signed checkpoint and where it was found (`trail`, a file's path, `cluster`).
#[derive(Clone, Debug)]
pub struct Sourced {
    pub checkpoint: SignedCheckpoint,
    pub source: String,
}

/// What the verifier checks checkpoints with.
#[derive(Clone, Debug, Default)]
pub struct CheckpointInput {
    pub keys: Vec<PublicKey>,
    pub checkpoints: Vec<Sourced>,
    /// Whether the whole trail is read (no time window): only then does a checkpoint
    /// beyond the last row mean a cut tail.
    pub whole_trail: bool,
}

/// One gateway's checkpoints while its rows stream by. Each row costs O(log n) in the
/// number of checkpoints (a year of one-a-minute checkpoints is ~525,000).
#[derive(Debug, Default)]
struct GatewayCheckpoints {
    /// By head seq; several sources of one checkpoint are checked each.
    pending: BTreeMap<u64, Vec<Sourced>>,
    /// Interval starts (`from_seq`) with how many pending checkpoints begin there.
    starts: BTreeMap<u64, usize>,
    /// The intervals being rebuilt: from_seq → tree so far.
    open: BTreeMap<u64, Merkle>,
    newest_verified: Option<u64>,
}

/// Streaming verification: rows in `(gateway, seq)` order, one at a time, in constant
/// memory (the previous row and one Merkle frontier per open checkpoint interval).
/// Identical rows (a retried upload before the merge collapsed them) count once. The
/// first row of each gateway is the anchor: its own hash is checked, its link to earlier
/// rows (outside the window) is not.
#[derive(Debug, Default)]
pub struct Verifier {
    report: VerifyReport,
    prev: Option<AuditRow>,
    by_gateway: BTreeMap<String, GatewayCheckpoints>,
    current: Option<GatewayCheckpoints>,
    whole_trail: bool,
    /// Keys were given: checkpoints are part of the check.
    checking: bool,
}

impl Verifier {
    /// A verifier that also checks `input`'s checkpoints (bad signatures are findings
    /// at once and the checkpoint is not used).
    pub fn new(input: CheckpointInput) -> Verifier {
        let mut v = Verifier {
            whole_trail: input.whole_trail,
            checking: !input.keys.is_empty(),
            ..Verifier::default()
        };
        for s in input.checkpoints {
            let cp = &s.checkpoint.checkpoint;
            if !s.checkpoint.verify(&input.keys) {
                v.report.findings.push(Finding::BadSignature {
                    gateway: cp.node.clone(),
                    seq: cp.seq,
                    source: s.source.clone(),
                });
                continue;
            }
            let g = v.by_gateway.entry(cp.node.clone()).or_default();
            *g.starts.entry(cp.from_seq).or_default() += 1;
            if cp.uncovered != [0, 0] {
                let list = v.report.uncovered.entry(cp.node.clone()).or_default();
                if !list.contains(&cp.uncovered) {
                    list.push(cp.uncovered);
                }
            }
            g.pending.entry(cp.seq).or_default().push(s);
        }
        v
    }

    pub fn push(&mut self, row: AuditRow) {
        if let Some(p) = self
            .prev
            .as_ref()
            .filter(|p| p.gateway == row.gateway && p.seq == row.seq)
        {
            if p != &row {
                self.report.findings.push(Finding::Conflict {
                    gateway: row.gateway.clone(),
                    seq: row.seq,
                });
            }
            return;
        }
        let same_gateway = self.prev.as_ref().is_some_and(|p| p.gateway == row.gateway);
        if !same_gateway {
            self.finish_gateway();
            self.current = Some(self.by_gateway.remove(&row.gateway).unwrap_or_default());
        }
        self.report.rows += 1;
        let entry = self
            .report
            .gateways
            .entry(row.gateway.clone())
            .or_insert((row.seq, row.seq));
        entry.1 = row.seq;
        if row.expected_hash() != row.hash {
            self.report.findings.push(Finding::Altered {
                gateway: row.gateway.clone(),
                seq: row.seq,
                event_id: row.event_id.to_string(),
            });
        }
        if let Some(p) = self.prev.as_ref().filter(|_| same_gateway) {
            if row.prev_hash == GENESIS && row.seq != p.seq + 1 {
                self.report.findings.push(Finding::ChainRestart {
                    gateway: row.gateway.clone(),
                    seq: row.seq,
                });
            } else if row.seq != p.seq + 1 {
                self.report.findings.push(Finding::Gap {
                    gateway: row.gateway.clone(),
                    after: p.seq,
                    next: row.seq,
                });
            } else if row.prev_hash != p.hash {
                self.report.findings.push(Finding::BrokenLink {
                    gateway: row.gateway.clone(),
                    seq: row.seq,
                });
            }
            if row.time_us < p.time_us {
                self.report.findings.push(Finding::TimeBackwards {
                    gateway: row.gateway.clone(),
                    seq: row.seq,
                });
            }
        }
        self.check_checkpoints(&row);
        self.prev = Some(row);
    }

    /// Feeds the row into every open interval, opens the ones starting here, and closes
    /// (compares) the ones whose head it is.
    fn check_checkpoints(&mut self, row: &AuditRow) {
        let Some(g) = self.current.as_mut() else {
            return;
        };
        if g.starts.contains_key(&row.seq) {
            g.open.entry(row.seq).or_default();
        }
        for tree in g.open.values_mut() {
            tree.push(&row.hash);
        }
        let Some(heads) = g.pending.remove(&row.seq) else {
            return;
        };
        for s in heads {
            let cp = &s.checkpoint.checkpoint;
            let tree = g.open.get(&cp.from_seq);
            let matches = cp.hash == row.hash
                && tree.is_some_and(|t| t.len() == cp.leaves() && t.root() == cp.root);
            if matches {
                self.report.checkpoints_verified += 1;
                g.newest_verified = Some(g.newest_verified.map_or(cp.seq, |n| n.max(cp.seq)));
            } else if tree.is_some() || cp.hash != row.hash {
                self.report.findings.push(Finding::CheckpointMismatch {
                    gateway: cp.node.clone(),
                    seq: cp.seq,
                    source: s.source.clone(),
                });
            }
            // Else the interval began before the window: its root cannot be checked.
            if let Some(n) = g.starts.get_mut(&cp.from_seq) {
                *n -= 1;
                if *n == 0 {
                    g.starts.remove(&cp.from_seq);
                    g.open.remove(&cp.from_seq);
                }
            }
        }
    }

    /// The gateway's rows ended: checkpoints past its last row mean a cut tail.
    fn finish_gateway(&mut self) {
        let (Some(g), Some(prev)) = (self.current.take(), self.prev.as_ref()) else {
            return;
        };
        let last = prev.seq;
        for (seq, list) in g.pending {
            for s in list {
                if self.whole_trail && seq > last {
                    self.report.findings.push(Finding::Truncated {
                        gateway: prev.gateway.clone(),
                        signed_seq: seq,
                        last_seq: last,
                        source: s.source,
                    });
                }
            }
        }
        // Each checkpoint's own event follows its head: the head being the last row
        // means that event (at least) was deleted.
        if let Some(newest) = g.newest_verified {
            if self.whole_trail && newest == last {
                self.report.findings.push(Finding::Truncated {
                    gateway: prev.gateway.clone(),
                    signed_seq: newest + 1,
                    last_seq: last,
                    source: "checkpoint event".into(),
                });
            }
            self.report
                .unsigned_tail
                .insert(prev.gateway.clone(), last.saturating_sub(newest));
        } else if self.checking {
            let first = self
                .report
                .gateways
                .get(&prev.gateway)
                .map_or(last, |g| g.0);
            self.report
                .unsigned_tail
                .insert(prev.gateway.clone(), last + 1 - first);
        }
    }

    pub fn finish(mut self) -> VerifyReport {
        self.finish_gateway();
        // Gateways with checkpoints and no rows at all: everything was deleted.
        for (gateway, g) in std::mem::take(&mut self.by_gateway) {
            for (seq, list) in g.pending {
                for s in list {
                    if self.whole_trail {
                        self.report.findings.push(Finding::Truncated {
                            gateway: gateway.clone(),
                            signed_seq: seq,
                            last_seq: 0,
                            source: s.source,
                        });
                    }
                }
            }
        }
        self.report
    }
}

/// Verifies rows sorted by `(gateway, seq)` without checkpoints.
pub fn verify(rows: &[AuditRow]) -> VerifyReport {
    let mut v = Verifier::new(CheckpointInput::default());
    for row in rows {
        v.push(row.clone());
    }
    v.finish()
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

    fn signed_every(
        rows: &[AuditRow],
        every: usize,
        key: &portcullis_audit::checkpoint::SigningKey,
    ) -> Vec<Sourced> {
        let mut out = Vec::new();
        for chunk in rows.chunks(every) {
            let mut tree = Merkle::default();
            for r in chunk {
                tree.push(&r.hash);
            }
            let (first, last) = (&chunk[0], &chunk[chunk.len() - 1]);
            out.push(Sourced {
                checkpoint: key.sign(portcullis_audit::checkpoint::Checkpoint {
                    node: last.gateway.clone(),
                    seq: last.seq,
                    hash: last.hash,
                    time_us: 0,
                    from_seq: first.seq,
                    root: tree.root(),
                    uncovered: [0, 0],
                }),
                source: "file".into(),
            });
        }
        out
    }

    fn run(
        rows: &[AuditRow],
        cps: &[Sourced],
        key: &portcullis_audit::checkpoint::SigningKey,
    ) -> VerifyReport {
        let mut v = Verifier::new(CheckpointInput {
            keys: vec![key.public()],
            checkpoints: cps.to_vec(),
            whole_trail: true,
        });
        for r in rows {
            v.push(r.clone());
        }
        v.finish()
    }

    #[test]
    fn checkpoints_catch_a_rehashed_tail_and_a_cut_one_the_chain_cannot() {
        use portcullis_audit::checkpoint::SigningKey;
        let key = SigningKey::from_pem(&SigningKey::generate_pem().unwrap()).unwrap();
        let rows = chain("a", 100);
        // Signed up to seq 90 (the last 10 rows not yet).
        let cps = signed_every(&rows[..90], 30, &key);
        let r = run(&rows, &cps, &key);
        assert!(r.ok(), "{:?}", r.findings);
        assert_eq!(r.checkpoints_verified, 3);
        assert_eq!(r.unsigned_tail["a"], 10);

        // Rows 51.. rewritten and re-hashed along the chain.
        let mut forged = rows.clone();
        let mut c = Chain {
            last_hash: forged[49].hash,
        };
        for r in &mut forged[50..] {
            r.user = "mallory".into();
            c.seal(r);
        }
        assert!(verify(&forged).ok(), "the chain alone passes");
        let r = run(&forged, &cps, &key);
        assert!(
            matches!(
                &r.findings[..],
                [
                    Finding::CheckpointMismatch { seq: 60, .. },
                    Finding::CheckpointMismatch { seq: 90, .. }
                ]
            ),
            "{:?}",
            r.findings
        );

        // Cut after 75.
        assert!(verify(&rows[..75]).ok(), "the chain alone passes");
        let r = run(&rows[..75], &cps, &key);
        assert!(
            r.findings.contains(&Finding::Truncated {
                gateway: "a".into(),
                signed_seq: 90,
                last_seq: 75,
                source: "file".into()
            }),
            "{:?}",
            r.findings
        );

        // A window that starts mid-interval checks what it can and no more.
        let r = run(&rows[40..], &cps, &key);
        assert!(r.ok(), "{:?}", r.findings);
        assert_eq!(r.checkpoints_verified, 1);
    }
}
