//! The writer's side of signed checkpoints ([`crate::checkpoint`]): the Merkle tree of
//! the rows since the last checkpoint, when the next one is due, and the copy outside
//! ClickHouse (`checkpoints.jsonl`, one JSON line per checkpoint, fsynced; optionally a
//! channel to the cluster database).
//!
//! After every spool commit the open interval's tree (its frontier: at most 64 hashes)
//! is written to `<checkpoints file>.state` (write and rename; no fsync: it survives a
//! killed process, and after a power loss it is merely older). After a restart the
//! interval is taken from there and completed from the spool's records. Records gone
//! from the spool by then (uploaded and trimmed) cannot be added, and the first
//! checkpoint names them as `uncovered` instead of leaving them out silently. The first
//! checkpoint after a start is due at once.

use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_spool::Spool;

use crate::checkpoint::{Checkpoint, Merkle, SignedCheckpoint, SigningKey};
use crate::row::{AuditRow, Hash};

/// How a pipeline signs its chain head.
#[derive(Clone, Debug)]
pub struct CheckpointSettings {
    pub key: Arc<SigningKey>,
    pub interval: Duration,
    /// The copy outside ClickHouse.
    pub file: PathBuf,
    /// Another copy (the cluster database), handed over without waiting: a full channel
    /// drops this copy (logged; the file and the trail have it).
    pub sink: Option<SyncSender<SignedCheckpoint>>,
}

pub(crate) struct Signer {
    settings: CheckpointSettings,
    node: String,
    file: File,
    merkle: Merkle,
    from_seq: u64,
    uncovered: [u64; 2],
    next_due: Instant,
    /// Rows in the interval other than the last checkpoint's own event: an idle node
    /// does not sign again only to cover that event.
    others: u64,
    /// The next row is the checkpoint event of the checkpoint just signed.
    own_event_next: bool,
    /// Signed, their event appended, waiting for the spool commit before the copies.
    pending: Vec<SignedCheckpoint>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("from_seq", &self.from_seq)
            .field("leaves", &self.merkle.len())
            .finish()
    }
}

/// The open interval as the state file keeps it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct State {
    node: String,
    from_seq: u64,
    frontier: Vec<(String, u64)>,
    uncovered: [u64; 2],
    others: u64,
}

fn state_path(file: &std::path::Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".state");
    PathBuf::from(p)
}

/// The last checkpoint in the file (a torn last line from a crash is skipped).
fn last_in_file(path: &std::path::Path) -> std::io::Result<Option<SignedCheckpoint>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut last = None;
    for line in BufReader::new(f).lines() {
        if let Ok(cp) = serde_json::from_str::<SignedCheckpoint>(&line?) {
            last = Some(cp);
        }
    }
    Ok(last)
}

/// Every checkpoint in a `checkpoints.jsonl` (for verification), with the lines that do
/// not parse counted.
pub fn read_checkpoints(path: &std::path::Path) -> std::io::Result<(Vec<SignedCheckpoint>, usize)> {
    let f = File::open(path)?;
    let (mut out, mut bad) = (Vec::new(), 0);
    for line in BufReader::new(f).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<SignedCheckpoint>(&line) {
            Ok(cp) => out.push(cp),
            Err(_) => bad += 1,
        }
    }
    Ok((out, bad))
}

impl Signer {
    /// Opens the file and rebuilds the open interval from the spool.
    pub(crate) fn open(
        settings: CheckpointSettings,
        node: &str,
        spool: &Spool,
    ) -> std::io::Result<Signer> {
        let next_seq = spool.next_seq();
        let last = last_in_file(&settings.file)?
            .filter(|cp| cp.checkpoint.node == node && cp.checkpoint.seq < next_seq);
        // The interval starts after the last checkpoint's head (its own event is the
        // interval's first row), or at the chain's start.
        let start = last.as_ref().map_or(1, |cp| cp.checkpoint.seq + 1);
        // The state file, if it continues that interval and the spool has not lost it.
        let saved = std::fs::read(state_path(&settings.file))
            .ok()
            .and_then(|b| serde_json::from_slice::<State>(&b).ok())
            .filter(|st| st.node == node && st.from_seq == start)
            .and_then(|st| Merkle::from_state(&st.frontier).map(|m| (st, m)))
            .filter(|(st, m)| st.from_seq + m.len() <= next_seq);
        let (mut merkle, mut from_seq, mut uncovered, mut others) = match saved {
            Some((st, m)) => (m, st.from_seq, st.uncovered, st.others),
            None => (Merkle::default(), start, [0, 0], 0),
        };
        let resume_at = from_seq + merkle.len();
        let mut at = resume_at;
        let mut first = true;
        let mut read = 0u64;
        while at < next_seq {
            let records = spool
                .read_from(at, 4096)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let Some(&(first_seq, _)) = records.first() else {
                break;
            };
            if first && first_seq > resume_at {
                // Trimmed before the restart: in the chain, under no signed root. The
                // tree restarts after them (a root cannot skip leaves).
                uncovered = [from_seq.min(resume_at), first_seq - 1];
                merkle = Merkle::default();
                from_seq = first_seq;
                others = 0;
            }
            first = false;
            for (seq, bytes) in &records {
                match AuditRow::decode(bytes) {
                    Ok(row) => merkle.push(&row.hash),
                    Err(e) => {
                        tracing::error!(seq, "checkpoint interval: undecodable record: {e}");
                        merkle.push(&[0; 32]);
                    }
                }
                read += 1;
                at = seq + 1;
            }
        }
        if first && next_seq > resume_at {
            // Nothing readable at all: everything since the tree's end is gone.
            uncovered = [from_seq.min(resume_at), next_seq - 1];
            merkle = Merkle::default();
            from_seq = next_seq;
            others = 0;
        }
        // Only the last checkpoint's own event since it (a clean stop): nothing to sign.
        let only_own_event = last.is_some() && from_seq == start && merkle.len() == 1;
        if !only_own_event {
            others += read;
        }
        if merkle.len() > 1 && others == 0 {
            others = merkle.len() - 1;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&settings.file)?;
        Ok(Signer {
            settings,
            node: node.to_string(),
            file,
            merkle,
            from_seq,
            uncovered,
            next_due: Instant::now(),
            others,
            own_event_next: false,
            pending: Vec::new(),
        })
    }

    /// A row entered the chain.
    pub(crate) fn on_row(&mut self, hash: &Hash) {
        self.merkle.push(hash);
        if std::mem::take(&mut self.own_event_next) {
            return;
        }
        self.others += 1;
    }

    /// Whether a checkpoint is due (there is something to sign and its time has come,
    /// or `force`: at shutdown).
    pub(crate) fn due(&self, now: Instant, force: bool) -> bool {
        let something = self.others > 0 || self.uncovered != [0, 0];
        something && (force || now >= self.next_due)
    }

    /// Signs the head `(seq, hash)` over the interval so far and starts the next one at
    /// `seq + 1` (where the checkpoint's own event goes).
    pub(crate) fn sign(&mut self, seq: u64, hash: Hash, time_us: u64) -> SignedCheckpoint {
        let cp = Checkpoint {
            node: self.node.clone(),
            seq,
            hash,
            time_us,
            from_seq: self.from_seq,
            root: self.merkle.root(),
            uncovered: self.uncovered,
        };
        if cp.leaves() != self.merkle.len() {
            tracing::error!(
                from = cp.from_seq,
                seq,
                leaves = self.merkle.len(),
                "checkpoint interval does not match the chain"
            );
        }
        self.merkle = Merkle::default();
        self.others = 0;
        self.own_event_next = true;
        self.from_seq = seq + 1;
        self.uncovered = [0, 0];
        self.next_due = Instant::now() + self.settings.interval;
        self.settings.key.sign(cp)
    }

    /// The checkpoint's own event was refused (spool full): the next row is a real one.
    pub(crate) fn own_event_refused(&mut self) {
        self.own_event_next = false;
    }

    pub(crate) fn hold(&mut self, cp: SignedCheckpoint) {
        self.pending.push(cp);
    }

    /// Writes the open interval's tree for the next start (see the module docs).
    fn save_state(&self) {
        let st = State {
            node: self.node.clone(),
            from_seq: self.from_seq,
            frontier: self.merkle.to_state(),
            uncovered: self.uncovered,
            others: self.others,
        };
        let path = state_path(&self.settings.file);
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let written = serde_json::to_vec(&st)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), "checkpoint state not saved: {e}");
        }
    }

    /// The spool committed: the held checkpoints' rows are durable, write their copies.
    pub(crate) fn committed(&mut self) {
        self.save_state();
        for cp in std::mem::take(&mut self.pending) {
            let written = serde_json::to_string(&cp)
                .map_err(std::io::Error::other)
                .and_then(|line| {
                    self.file.write_all(format!("{line}\n").as_bytes())?;
                    self.file.sync_data()
                });
            if let Err(e) = written {
                tracing::error!(path = %self.settings.file.display(), "checkpoint copy not written: {e}");
            }
            if let Some(sink) = &self.settings.sink {
                if sink.try_send(cp).is_err() {
                    tracing::warn!("checkpoint not handed to the cluster database (busy); the file and the trail have it");
                }
            }
        }
    }
}
