//! Revocations a cluster node accepted while its database was unreachable: in effect on
//! this node at once, kept in a local file until they are committed to the cluster (then
//! every other node applies them), so neither an outage nor a `kill -9` in between loses
//! one.
//!
//! Format (owned here): JSON lines, one [`PendingChange`] each, appended and fsynced
//! before the caller answers; a torn last line (a crash mid-append) is ignored. Once
//! entries are committed the file is rewritten with the rest (a temporary file, fsync,
//! rename, fsync of the directory).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::devices::DeviceMutation;
use crate::directory::Mutation;
use crate::store::StoreError;

/// A change to commit when the database is back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingChange {
    pub source: String,
    pub requested_at: DateTime<Utc>,
    pub mutation: Mutation,
    pub devices: DeviceMutation,
}

/// The file and what it holds.
#[derive(Debug)]
pub struct PendingFile {
    path: PathBuf,
    entries: Vec<PendingChange>,
}

fn err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Lost {
        reason: format!("pending revocations file {}: {e}", path.display()),
    }
}

impl PendingFile {
    /// Opens (not creating) the file and reads what it holds.
    pub fn open(path: &Path) -> Result<PendingFile, StoreError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(err(path, e)),
        };
        let mut entries = Vec::new();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<PendingChange>(line) {
                Ok(p) => entries.push(p),
                // Only the last line can be torn by a crash; anything else is damage.
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {
                    tracing::warn!(file = %path.display(), "a torn last pending revocation ignored");
                }
                Err(e) => return Err(err(path, format!("line {}: {e}", i + 1))),
            }
        }
        Ok(PendingFile {
            path: path.to_path_buf(),
            entries,
        })
    }

    pub fn entries(&self) -> &[PendingChange] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends `p` and fsyncs it.
    pub fn push(&mut self, p: PendingChange) -> Result<(), StoreError> {
        let mut line = serde_json::to_string(&p).map_err(|e| err(&self.path, e))?;
        line.push('\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| err(&self.path, e))?;
        f.write_all(line.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| err(&self.path, e))?;
        self.entries.push(p);
        Ok(())
    }

    /// Forgets the first `n` entries (committed).
    pub fn committed(&mut self, n: usize) -> Result<(), StoreError> {
        let n = n.min(self.entries.len());
        let rest = self.entries.split_off(n);
        let tmp = self.path.with_extension("tmp");
        let mut text = String::new();
        for p in &rest {
            text.push_str(&serde_json::to_string(p).map_err(|e| err(&self.path, e))?);
            text.push('\n');
        }
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| err(&self.path, e))?;
        self.entries = rest;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(source: &str) -> PendingChange {
        PendingChange {
            source: source.into(),
            requested_at: Utc::now(),
            mutation: Mutation {
                removed_users: vec![uuid::Uuid::new_v4()],
                ..Mutation::default()
            },
            devices: DeviceMutation::default(),
        }
    }

    #[test]
    fn entries_survive_reopening_a_torn_tail_is_ignored_and_committed_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pending.jsonl");
        let mut f = PendingFile::open(&path).unwrap();
        assert!(f.is_empty());
        let (a, b, c) = (change("a"), change("b"), change("c"));
        for p in [&a, &b, &c] {
            f.push(p.clone()).unwrap();
        }
        // A crash mid-append leaves half a line.
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(b"{\"source\":\"d\",\"requ").unwrap();
        let mut f = PendingFile::open(&path).unwrap();
        assert_eq!(f.entries(), [a.clone(), b.clone(), c.clone()]);
        f.committed(2).unwrap();
        assert_eq!(PendingFile::open(&path).unwrap().entries(), [c]);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Damage before the last line is an error naming the file and line.
        std::fs::write(&path, "garbage\n{}\n").unwrap();
        let e = PendingFile::open(&path).unwrap_err().to_string();
        assert!(e.contains("pending.jsonl") && e.contains("line 1"), "{e}");
    }
}
