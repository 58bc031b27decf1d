//! `audit export`: the rows a filter selects, each with its proof, written as an export
//! directory ([`crate::evidence`] owns the format and the offline check).
//!
//! Rows are read in `(gateway, seq)` order and written as they come. Each row needs the
//! signed checkpoint whose interval holds it; for every interval rows fall in, the
//! interval's row hashes are read once (32 bytes per row of that interval) to build the
//! Merkle paths. Rows no signed checkpoint covers yet (the newest, until the next
//! interval; or rows a restart left uncovered) make the export fail, naming them: an
//! export that cannot be verified is not evidence.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use chrono::{DateTime, Utc};
use portcullis_audit::checkpoint::{inclusion_proof, levels, SignedCheckpoint, SigningKey};
use portcullis_audit::{AuditRow, Hash, Store};

use crate::evidence::{self, ExportRow, Format, Manifest, Proof, Segment};
use crate::{filter, AuditorError, Filter};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Auditor(#[from] AuditorError),
    #[error("clickhouse: {0}")]
    Store(#[from] clickhouse::error::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not empty: an export goes into a new directory")]
    NotEmpty { path: String },
    #[error("gateway {gateway} seq {seq}: no signed checkpoint covers this row yet (the newest rows are signed at the next checkpoint interval; or narrow --until)")]
    Unsigned { gateway: String, seq: u64 },
    #[error("gateway {gateway} seq {from}..={to}: the trail has {found} distinct rows where the checkpoint signed {expected}")]
    Interval {
        gateway: String,
        from: u64,
        to: u64,
        found: u64,
        expected: u64,
    },
    #[error("no rows match the filters: nothing to export")]
    Empty,
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    pub rows: u64,
    pub checkpoints: u64,
    pub segments: Vec<Segment>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One checkpoint interval's Merkle levels, for the paths of the rows in it.
struct Interval {
    index: usize,
    from_seq: u64,
    levels: Vec<Vec<Hash>>,
}

/// Writes the export of `filter`'s rows into `out` (created; must be new or empty),
/// signing the manifest with `key`.
pub async fn export(
    store: &Store,
    filter: &Filter,
    format: Format,
    out: &Path,
    key: &SigningKey,
    now: DateTime<Utc>,
) -> Result<ExportSummary, ExportError> {
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(io_err(out))?
            .next()
            .is_some()
    {
        return Err(ExportError::NotEmpty {
            path: out.display().to_string(),
        });
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    store.check_schema().await.map_err(AuditorError::from)?;

    // Every signed checkpoint, per gateway by head seq.
    let mut by_gateway: BTreeMap<String, BTreeMap<u64, SignedCheckpoint>> = BTreeMap::new();
    for s in crate::trail_checkpoints(store, None).await? {
        let cp = s.checkpoint;
        by_gateway
            .entry(cp.checkpoint.node.clone())
            .or_default()
            .insert(cp.checkpoint.seq, cp);
    }

    let sql = export_sql(&store.database, filter, now)?;

    let rows_path = out.join(format.file());
    let proofs_path = out.join("proofs.jsonl");
    let mut rows_file =
        std::io::BufWriter::new(std::fs::File::create(&rows_path).map_err(io_err(&rows_path))?);
    let mut proofs_file =
        std::io::BufWriter::new(std::fs::File::create(&proofs_path).map_err(io_err(&proofs_path))?);
    if format == Format::Csv {
        write!(rows_file, "{}\r\n", evidence::csv_header()).map_err(io_err(&rows_path))?;
    }
    let mut used: Vec<SignedCheckpoint> = Vec::new();
    let mut open: Option<(String, Interval)> = None;
    let mut segments: Vec<Segment> = Vec::new();
    let mut count = 0u64;
    let mut cursor = store.client().query(&sql).fetch::<AuditRow>()?;
    while let Some(row) = cursor.next().await? {
        let in_open = open.as_ref().is_some_and(|(g, iv)| {
            *g == row.gateway
                && row.seq >= iv.from_seq
                && row.seq < iv.from_seq + iv.levels.first().map_or(0, |l| l.len() as u64)
        });
        if !in_open {
            let cp = by_gateway
                .get(&row.gateway)
                .and_then(|cps| cps.range(row.seq..).next())
                .map(|(_, cp)| cp.clone())
                .filter(|cp| cp.checkpoint.from_seq <= row.seq)
                .ok_or_else(|| ExportError::Unsigned {
                    gateway: row.gateway.clone(),
                    seq: row.seq,
                })?;
            let hashes = interval_hashes(store, &cp).await?;
            used.push(cp.clone());
            open = Some((
                row.gateway.clone(),
                Interval {
                    index: used.len() - 1,
                    from_seq: cp.checkpoint.from_seq,
                    levels: levels(&hashes),
                },
            ));
        }
        let Some((_, iv)) = &open else {
            continue;
        };
        let index = row.seq - iv.from_seq;
        let proof = Proof {
            gateway: row.gateway.clone(),
            seq: row.seq,
            checkpoint: iv.index,
            index,
            path: inclusion_proof(&iv.levels, index as usize)
                .iter()
                .map(hex::encode)
                .collect(),
        };
        let export_row = ExportRow::from(&row);
        let line = match format {
            Format::Jsonl => {
                let mut l = serde_json::to_string(&export_row).unwrap_or_default();
                l.push('\n');
                l
            }
            Format::Csv => evidence::csv_line(&export_row),
        };
        rows_file
            .write_all(line.as_bytes())
            .map_err(io_err(&rows_path))?;
        let mut p = serde_json::to_string(&proof).unwrap_or_default();
        p.push('\n');
        proofs_file
            .write_all(p.as_bytes())
            .map_err(io_err(&proofs_path))?;
        match segments.last_mut() {
            Some(s) if s.gateway == row.gateway => {
                s.last_seq = row.seq;
                s.rows += 1;
            }
            _ => segments.push(Segment {
                gateway: row.gateway.clone(),
                first_seq: row.seq,
                last_seq: row.seq,
                rows: 1,
            }),
        }
        count += 1;
    }
    if count == 0 {
        return Err(ExportError::Empty);
    }
    rows_file.flush().map_err(io_err(&rows_path))?;
    proofs_file.flush().map_err(io_err(&proofs_path))?;
    drop((rows_file, proofs_file));

    let cps_path = out.join("checkpoints.jsonl");
    let mut cps = String::new();
    for cp in &used {
        cps.push_str(&serde_json::to_string(cp).unwrap_or_default());
        cps.push('\n');
    }
    std::fs::write(&cps_path, &cps).map_err(io_err(&cps_path))?;

    let mut files = BTreeMap::new();
    for name in [format.file(), "proofs.jsonl", "checkpoints.jsonl"] {
        let path = out.join(name);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        files.insert(name.to_string(), evidence::sha256_hex(&bytes));
    }
    let manifest = Manifest {
        export_version: evidence::EXPORT_VERSION,
        created_at: now.to_rfc3339(),
        filters: serde_json::to_value(filter_json(filter)).unwrap_or_default(),
        format: format.name().into(),
        rows: count,
        files,
        segments: segments.clone(),
        checkpoints: used.len() as u64,
        key_id: key.public().key_id(),
    };
    let mut bytes = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    bytes.push(b'\n');
    let manifest_path = out.join("manifest.json");
    std::fs::write(&manifest_path, &bytes).map_err(io_err(&manifest_path))?;
    let sig_path = out.join("manifest.sig");
    std::fs::write(
        &sig_path,
        format!("{} {}\n", key.public().key_id(), key.sign_bytes(&bytes)),
    )
    .map_err(io_err(&sig_path))?;
    Ok(ExportSummary {
        rows: count,
        checkpoints: used.len() as u64,
        segments,
    })
}

/// The rows an export holds, in chain order.
pub fn export_sql(db: &str, filter: &Filter, now: DateTime<Utc>) -> Result<String, ExportError> {
    let w = filter.where_clause(now).map_err(AuditorError::from)?;
    let w = match filter.dst_keys(db, now).map_err(AuditorError::from)? {
        Some(k) => format!("{k} AND {w}"),
        None => w,
    };
    let limit = filter
        .limit
        .map(|l| format!(" LIMIT {}", l.min(u64::MAX / 2)))
        .unwrap_or_default();
    let cols = portcullis_audit::row::column_list();
    Ok(format!(
        "SELECT {cols} FROM {db}.events FINAL WHERE {w} ORDER BY gateway, seq{limit}"
    ))
}

/// A checkpoint interval's `(seq, hash)` rows (repeats of a retried upload included).
pub fn interval_sql(db: &str, cp: &portcullis_audit::checkpoint::Checkpoint) -> String {
    format!(
        "SELECT seq, hash FROM {db}.events WHERE gateway = {} AND seq >= {} AND seq <= {} ORDER BY seq",
        filter::quote(&cp.node),
        cp.from_seq,
        cp.seq
    )
}

/// The filters as the manifest records them (only those given).
fn filter_json(f: &Filter) -> BTreeMap<&'static str, serde_json::Value> {
    let mut m = BTreeMap::new();
    let mut put = |k: &'static str, v: Option<serde_json::Value>| {
        if let Some(v) = v {
            m.insert(k, v);
        }
    };
    put("user", f.user.clone().map(Into::into));
    put("group", f.group.clone().map(Into::into));
    put("dst", f.dst.clone().map(Into::into));
    put("port", f.port.map(Into::into));
    put("decision", f.decision.clone().map(Into::into));
    put("since", f.since.clone().map(Into::into));
    put("until", f.until.clone().map(Into::into));
    put("session", f.session.map(Into::into));
    put("kind", f.kind.clone().map(Into::into));
    put("limit", f.limit.map(Into::into));
    m
}

/// The row hashes of a checkpoint's interval, in seq order, exactly as many as it signed.
async fn interval_hashes(store: &Store, cp: &SignedCheckpoint) -> Result<Vec<Hash>, ExportError> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct SeqHash {
        seq: u64,
        hash: Hash,
    }
    let c = &cp.checkpoint;
    let sql = interval_sql(&store.database, c);
    let mut cursor = store.client().query(&sql).fetch::<SeqHash>()?;
    let mut out: Vec<Hash> = Vec::with_capacity(c.leaves().min(1 << 24) as usize);
    let mut last_seq = None;
    let mut distinct = 0u64;
    while let Some(r) = cursor.next().await? {
        // Retried uploads repeat rows until merged: one of each.
        if last_seq == Some(r.seq) {
            continue;
        }
        last_seq = Some(r.seq);
        distinct += 1;
        out.push(r.hash);
    }
    if distinct != c.leaves() {
        return Err(ExportError::Interval {
            gateway: c.node.clone(),
            from: c.from_seq,
            to: c.seq,
            found: distinct,
            expected: c.leaves(),
        });
    }
    Ok(out)
}
