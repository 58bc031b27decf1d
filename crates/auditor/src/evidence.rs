//! The format of a verifiable export, and its offline check (no ClickHouse, no trust in
//! whoever made the export: only the published checkpoint key).
//!
//! An export directory holds:
//! - `events.jsonl` or `events.csv`: the rows, every column of `events` (hashes and
//!   `dst_addr` as hex, arrays as JSON in CSV), in `(gateway, seq)` order. CSV is RFC 4180;
//!   a cell starting with `= + - @ ' \t \r` gets one `'` in front, so a spreadsheet shows
//!   it as text, and the check takes it off again.
//! - `proofs.jsonl`: per row, in the same order, the signed checkpoint that covers it
//!   (an index into `checkpoints.jsonl`), its leaf index in that checkpoint's interval
//!   and the Merkle sibling path (hex), so each row is proven on its own.
//! - `checkpoints.jsonl`: those signed checkpoints, as the nodes wrote them.
//! - `manifest.json`: format version, when, the filters, the row count, SHA-256 of every
//!   file above, the chain segments covered per gateway (first and last seq, rows), the
//!   key id. `manifest.sig`: `<key id> <base64 Ed25519 signature of manifest.json's bytes>`.
//!
//! [`verify_export`] checks the manifest's signature, every file's digest, every
//! checkpoint's signature, and each row: its content against its own hash, and its hash
//! against the signed Merkle root through its path, in strictly increasing `(gateway,
//! seq)` order. A changed row fails its hash or its proof; an added row has no valid
//! proof; a removed or reordered row changes the file's digest (and the order check);
//! a changed manifest fails its signature.

use std::collections::BTreeMap;
use std::path::Path;

use portcullis_audit::checkpoint::{verify_inclusion, PublicKey, SignedCheckpoint};
use portcullis_audit::AuditRow;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The export format this build writes and checks.
pub const EXPORT_VERSION: u32 = 1;

/// `events` columns as an export row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRow {
    pub event_id: String,
    pub gateway: String,
    pub seq: u64,
    pub time: u32,
    pub time_us: u64,
    pub v: u32,
    pub kind: String,
    pub user: String,
    pub groups: Vec<String>,
    pub device: String,
    pub session_id: u64,
    pub flow_id: u64,
    pub protocol: String,
    pub src_ip: String,
    pub src_port: u16,
    pub dst_ip: String,
    pub dst_addr: String,
    pub dst_port: u16,
    pub network: String,
    pub decision: String,
    pub policy_ids: Vec<String>,
    pub policy_epoch: u64,
    pub reason: String,
    pub duration_ms: u64,
    pub bytes_out: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub packets_in: u64,
    pub latency_us: u64,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

impl From<&AuditRow> for ExportRow {
    fn from(r: &AuditRow) -> ExportRow {
        ExportRow {
            event_id: r.event_id.to_string(),
            gateway: r.gateway.clone(),
            seq: r.seq,
            time: r.time,
            time_us: r.time_us,
            v: r.v,
            kind: r.kind.clone(),
            user: r.user.clone(),
            groups: r.groups.clone(),
            device: r.device.clone(),
            session_id: r.session_id,
            flow_id: r.flow_id,
            protocol: r.protocol.clone(),
            src_ip: r.src_ip.clone(),
            src_port: r.src_port,
            dst_ip: r.dst_ip.clone(),
            dst_addr: hex::encode(r.dst_addr),
            dst_port: r.dst_port,
            network: r.network.clone(),
            decision: r.decision.clone(),
            policy_ids: r.policy_ids.clone(),
            policy_epoch: r.policy_epoch,
            reason: r.reason.clone(),
            duration_ms: r.duration_ms,
            bytes_out: r.bytes_out,
            packets_out: r.packets_out,
            bytes_in: r.bytes_in,
            packets_in: r.packets_in,
            latency_us: r.latency_us,
            detail: r.detail.clone(),
            prev_hash: hex::encode(r.prev_hash),
            hash: hex::encode(r.hash),
        }
    }
}

fn hex_array<const N: usize>(s: &str, field: &str) -> Result<[u8; N], String> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| format!("{field}: not {N} bytes of hex"))?;
    Ok(out)
}

impl TryFrom<ExportRow> for AuditRow {
    type Error = String;
    fn try_from(r: ExportRow) -> Result<AuditRow, String> {
        Ok(AuditRow {
            event_id: r
                .event_id
                .parse()
                .map_err(|_| "event_id: not a UUID".to_string())?,
            dst_addr: hex_array(&r.dst_addr, "dst_addr")?,
            prev_hash: hex_array(&r.prev_hash, "prev_hash")?,
            hash: hex_array(&r.hash, "hash")?,
            gateway: r.gateway,
            seq: r.seq,
            time: r.time,
            time_us: r.time_us,
            v: r.v,
            kind: r.kind,
            user: r.user,
            groups: r.groups,
            device: r.device,
            session_id: r.session_id,
            flow_id: r.flow_id,
            protocol: r.protocol,
            src_ip: r.src_ip,
            src_port: r.src_port,
            dst_ip: r.dst_ip,
            dst_port: r.dst_port,
            network: r.network,
            decision: r.decision,
            policy_ids: r.policy_ids,
            policy_epoch: r.policy_epoch,
            reason: r.reason,
            duration_ms: r.duration_ms,
            bytes_out: r.bytes_out,
            packets_out: r.packets_out,
            bytes_in: r.bytes_in,
            packets_in: r.packets_in,
            latency_us: r.latency_us,
            detail: r.detail,
        })
    }
}

/// How a row proves it is in a signed interval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proof {
    pub gateway: String,
    pub seq: u64,
    /// Index into `checkpoints.jsonl`.
    pub checkpoint: usize,
    /// Leaf index in the checkpoint's interval (`seq - from_seq`).
    pub index: u64,
    pub path: Vec<String>,
}

/// Part of one gateway's chain an export covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub gateway: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub rows: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub export_version: u32,
    pub created_at: String,
    /// The filters as given (`audit query`'s).
    pub filters: serde_json::Value,
    /// `csv` or `jsonl`.
    pub format: String,
    pub rows: u64,
    /// File name → SHA-256 (hex).
    pub files: BTreeMap<String, String>,
    pub segments: Vec<Segment>,
    pub checkpoints: u64,
    pub key_id: String,
}

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "csv" => Some(Format::Csv),
            "jsonl" => Some(Format::Jsonl),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }

    pub fn file(self) -> &'static str {
        match self {
            Format::Csv => "events.csv",
            Format::Jsonl => "events.jsonl",
        }
    }
}

/// The CSV header (the column names).
pub fn csv_header() -> String {
    portcullis_audit::row::COLUMNS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(",")
}

fn csv_cell(out: &mut String, text: &str) {
    let guarded = text.starts_with(['=', '+', '-', '@', '\'', '\t', '\r']);
    let quote = guarded || text.contains([',', '"', '\n', '\r']);
    if quote {
        out.push('"');
    }
    if guarded {
        out.push('\'');
    }
    for c in text.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    if quote {
        out.push('"');
    }
}

/// One CSV record (with its `\r\n`).
pub fn csv_line(row: &ExportRow) -> String {
    let value = serde_json::to_value(row).unwrap_or_default();
    let mut out = String::with_capacity(512);
    for (i, (name, _)) in portcullis_audit::row::COLUMNS.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let cell = match value.get(*name) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        };
        csv_cell(&mut out, &cell);
    }
    out.push_str("\r\n");
    out
}

/// Splits CSV text into records of cells (RFC 4180), taking off the spreadsheet guard.
pub fn parse_csv(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut was_quoted = false;
    let mut chars = text.chars().peekable();
    let finish = |cell: &mut String, was_quoted: bool| {
        let c = std::mem::take(cell);
        match c.strip_prefix('\'') {
            Some(rest)
                if was_quoted && rest.starts_with(['=', '+', '-', '@', '\'', '\t', '\r']) =>
            {
                rest.to_string()
            }
            _ => c,
        }
    };
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cell.push('"');
                } else {
                    quoted = false;
                }
            } else {
                cell.push(c);
            }
            continue;
        }
        match c {
            '"' if cell.is_empty() => {
                quoted = true;
                was_quoted = true;
            }
            ',' => {
                record.push(finish(&mut cell, was_quoted));
                was_quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(finish(&mut cell, was_quoted));
                was_quoted = false;
                records.push(std::mem::take(&mut record));
            }
            c => cell.push(c),
        }
    }
    if quoted {
        return Err("an unterminated quoted cell".into());
    }
    if !cell.is_empty() || !record.is_empty() {
        record.push(finish(&mut cell, was_quoted));
        records.push(record);
    }
    Ok(records)
}

/// A CSV record back into a row (by the header's column types).
pub fn csv_row(cells: &[String]) -> Result<ExportRow, String> {
    let cols = portcullis_audit::row::COLUMNS;
    if cells.len() != cols.len() {
        return Err(format!("{} cells, expected {}", cells.len(), cols.len()));
    }
    let mut obj = serde_json::Map::new();
    for ((name, ty), cell) in cols.iter().zip(cells) {
        let v = if ty.starts_with("UInt") || *ty == "DateTime" {
            serde_json::Value::Number(
                cell.parse::<u64>()
                    .map_err(|_| format!("{name}: {cell:?} is not a number"))?
                    .into(),
            )
        } else if ty.starts_with("Array") {
            serde_json::from_str(cell).map_err(|_| format!("{name}: not a JSON array"))?
        } else {
            serde_json::Value::String(cell.clone())
        };
        obj.insert((*name).to_string(), v);
    }
    serde_json::from_value(serde_json::Value::Object(obj)).map_err(|e| e.to_string())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Something an export check found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "finding", rename_all = "snake_case")]
pub enum ExportFinding {
    /// The manifest's signature does not verify (or no given key has its id).
    ManifestSignature,
    /// A file's digest differs from the manifest's, or it is missing.
    FileDigest { file: String },
    /// A checkpoint's signature does not verify.
    CheckpointSignature { index: usize },
    /// A line that does not parse.
    Malformed {
        file: String,
        line: u64,
        reason: String,
    },
    /// A row's content does not match its hash.
    Altered {
        line: u64,
        gateway: String,
        seq: u64,
    },
    /// A row's hash is not in the signed interval its proof names.
    Unproven {
        line: u64,
        gateway: String,
        seq: u64,
    },
    /// Rows out of `(gateway, seq)` order, or one seq twice.
    Order {
        line: u64,
        gateway: String,
        seq: u64,
    },
    /// Row count or segments differ from the manifest.
    Count { manifest: u64, found: u64 },
}

/// What checking an export found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExportReport {
    pub rows: u64,
    pub checkpoints: u64,
    pub findings: Vec<ExportFinding>,
    pub ok: bool,
}

/// Checks the export in `dir` against `keys` (see the module docs). Io errors reading
/// the directory are errors; everything wrong with its content is a finding.
pub fn verify_export(dir: &Path, keys: &[PublicKey]) -> std::io::Result<ExportReport> {
    let mut report = ExportReport::default();
    let manifest_bytes = std::fs::read(dir.join("manifest.json"))?;
    let sig = std::fs::read_to_string(dir.join("manifest.sig")).unwrap_or_default();
    let signed = sig.trim().split_once(' ').is_some_and(|(id, s)| {
        keys.iter()
            .filter(|k| k.key_id() == id)
            .any(|k| k.verifies(&manifest_bytes, s))
    });
    if !signed {
        report.findings.push(ExportFinding::ManifestSignature);
    }
    let manifest: Manifest = match serde_json::from_slice(&manifest_bytes) {
        Ok(m) => m,
        Err(e) => {
            report.findings.push(ExportFinding::Malformed {
                file: "manifest.json".into(),
                line: 1,
                reason: e.to_string(),
            });
            return Ok(report);
        }
    };
    let format = Format::parse(&manifest.format).unwrap_or(Format::Jsonl);
    for name in [format.file(), "proofs.jsonl", "checkpoints.jsonl"] {
        if !manifest.files.contains_key(name) {
            report
                .findings
                .push(ExportFinding::FileDigest { file: name.into() });
        }
    }
    let mut contents: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (name, digest) in &manifest.files {
        // Only plain names: a manifest cannot point outside the directory.
        let plain = !name.contains('/') && !name.contains('\\') && !name.starts_with('.');
        let bytes = if plain {
            std::fs::read(dir.join(name)).ok()
        } else {
            None
        };
        match bytes {
            Some(b) if sha256_hex(&b) == *digest => {
                contents.insert(name.clone(), b);
            }
            Some(b) => {
                report
                    .findings
                    .push(ExportFinding::FileDigest { file: name.clone() });
                contents.insert(name.clone(), b);
            }
            None => report
                .findings
                .push(ExportFinding::FileDigest { file: name.clone() }),
        }
    }
    let text =
        |name: &str| String::from_utf8_lossy(contents.get(name).map_or(&[][..], |v| v)).to_string();
    let mut checkpoints: Vec<Option<SignedCheckpoint>> = Vec::new();
    for (i, line) in text("checkpoints.jsonl").lines().enumerate() {
        match serde_json::from_str::<SignedCheckpoint>(line) {
            Ok(cp) if cp.verify(keys) => checkpoints.push(Some(cp)),
            Ok(_) => {
                report
                    .findings
                    .push(ExportFinding::CheckpointSignature { index: i });
                checkpoints.push(None);
            }
            Err(e) => {
                report.findings.push(ExportFinding::Malformed {
                    file: "checkpoints.jsonl".into(),
                    line: i as u64 + 1,
                    reason: e.to_string(),
                });
                checkpoints.push(None);
            }
        }
    }
    report.checkpoints = checkpoints.iter().flatten().count() as u64;
    let rows_text = text(format.file());
    let rows: Vec<Result<ExportRow, String>> = match format {
        Format::Jsonl => rows_text
            .lines()
            .map(|l| serde_json::from_str(l).map_err(|e| e.to_string()))
            .collect(),
        Format::Csv => match parse_csv(&rows_text) {
            Ok(records) => records.iter().skip(1).map(|cells| csv_row(cells)).collect(),
            Err(e) => vec![Err(e)],
        },
    };
    let proofs_text = text("proofs.jsonl");
    let mut proof_lines = proofs_text.lines();
    let mut last: Option<(String, u64)> = None;
    for (i, row) in rows.into_iter().enumerate() {
        let line = i as u64 + 1;
        let proof: Option<Proof> = proof_lines
            .next()
            .and_then(|l| serde_json::from_str(l).ok());
        let row = match row.and_then(AuditRow::try_from) {
            Ok(r) => r,
            Err(reason) => {
                report.findings.push(ExportFinding::Malformed {
                    file: format.file().into(),
                    line,
                    reason,
                });
                continue;
            }
        };
        report.rows += 1;
        let key = (row.gateway.clone(), row.seq);
        if last.as_ref().is_some_and(|l| *l >= key) {
            report.findings.push(ExportFinding::Order {
                line,
                gateway: row.gateway.clone(),
                seq: row.seq,
            });
        }
        last = Some(key);
        if row.expected_hash() != row.hash {
            report.findings.push(ExportFinding::Altered {
                line,
                gateway: row.gateway.clone(),
                seq: row.seq,
            });
            continue;
        }
        let proven = proof.is_some_and(|p| {
            let Some(Some(cp)) = checkpoints.get(p.checkpoint) else {
                return false;
            };
            let c = &cp.checkpoint;
            let path: Option<Vec<[u8; 32]>> = p
                .path
                .iter()
                .map(|h| hex_array::<32>(h, "path").ok())
                .collect();
            p.gateway == row.gateway
                && p.seq == row.seq
                && c.node == row.gateway
                && row.seq >= c.from_seq
                && p.index == row.seq - c.from_seq
                && path.is_some_and(|path| {
                    verify_inclusion(&row.hash, p.index, c.leaves(), &path, &c.root)
                })
        });
        if !proven {
            report.findings.push(ExportFinding::Unproven {
                line,
                gateway: row.gateway.clone(),
                seq: row.seq,
            });
        }
    }
    if report.rows != manifest.rows {
        report.findings.push(ExportFinding::Count {
            manifest: manifest.rows,
            found: report.rows,
        });
    }
    report.ok = report.findings.is_empty() && report.rows > 0;
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn csv_cells_round_trip_any_text_and_never_start_a_formula(cells in proptest::collection::vec(".{0,12}", 1..6)) {
            let mut line = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i > 0 { line.push(','); }
                csv_cell(&mut line, c);
            }
            line.push_str("\r\n");
            let back = parse_csv(&line).unwrap();
            prop_assert_eq!(&back, &vec![cells.clone()]);
        }
    }

    #[test]
    fn formula_cells_are_shown_as_text() {
        let mut out = String::new();
        csv_cell(&mut out, "=HYPERLINK(\"x\")");
        assert_eq!(out, "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(
            parse_csv(&out).unwrap(),
            vec![vec!["=HYPERLINK(\"x\")".to_string()]]
        );
        // A text that merely starts with a quote keeps it.
        let mut out = String::new();
        csv_cell(&mut out, "'plain");
        assert_eq!(parse_csv(&out).unwrap(), vec![vec!["'plain".to_string()]]);
    }
}
