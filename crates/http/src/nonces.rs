//! `[api] nonce_file`: the signed API's used nonces on disk, so a request captured
//! before a restart cannot be replayed after it. The record format is
//! `portcullis_apiauth::NonceRecord`'s (24 bytes each, append-only).
//!
//! A nonce is appended (one `write`, no fsync: it survives the process dying, which is
//! what a restart is; a power loss may forget the last seconds) before the request is
//! answered; when the file holds many more records than are live, it is rewritten with
//! the live ones (to a temporary file, then renamed).

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use portcullis_apiauth::NonceRecord;

/// The file, open for appending.
#[derive(Debug)]
pub struct NonceLog {
    path: PathBuf,
    file: File,
    /// Records in the file now.
    records: usize,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl NonceLog {
    /// Opens (creating) the file; the records it holds, for `Verifier::restore`.
    pub fn open(path: &Path) -> anyhow::Result<(NonceLog, Vec<NonceRecord>)> {
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)
                    .map_err(|e| anyhow::anyhow!("api.nonce_file {}: {e}", path.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::anyhow!("api.nonce_file {}: {e}", path.display())),
        }
        let records = NonceRecord::decode_all(&bytes);
        let file = open_append(path)
            .map_err(|e| anyhow::anyhow!("api.nonce_file {}: {e}", path.display()))?;
        let log = NonceLog {
            path: path.to_path_buf(),
            file,
            records: records.len(),
        };
        Ok((log, records))
    }

    /// Appends one record.
    pub fn append(&mut self, r: &NonceRecord) -> std::io::Result<()> {
        self.file.write_all(&r.encode())?;
        self.records += 1;
        Ok(())
    }

    /// Whether the file is worth rewriting for `live` records.
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.records > 2 * live + 10_000
    }

    /// Rewrites the file with exactly `live`.
    pub fn compact(&mut self, live: &[NonceRecord]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            let bytes: Vec<u8> = live.iter().flat_map(|r| r.encode()).collect();
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        self.file = open_append(&self.path)?;
        self.records = live.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_compaction_keeps_the_live_ones() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("nonces.bin");
        let (mut log, old) = NonceLog::open(&path)?;
        assert!(old.is_empty());
        let r = |d: u128, t: i64| NonceRecord {
            digest: d,
            forget_at: t,
        };
        for i in 0..5 {
            log.append(&r(i, 100 + i as i64))?;
        }
        let (_, back) = NonceLog::open(&path)?;
        assert_eq!(back.len(), 5);
        assert_eq!(back.get(3), Some(&r(3, 103)));
        log.compact(&[r(4, 104)])?;
        log.append(&r(9, 109))?;
        let (log2, back) = NonceLog::open(&path)?;
        assert_eq!(back, vec![r(4, 104), r(9, 109)]);
        assert!(!log2.wants_compaction(2));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path)?.permissions().mode() & 0o777,
            0o600
        );
        Ok(())
    }
}
