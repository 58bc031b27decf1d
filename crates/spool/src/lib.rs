//! A durable, append-only spool for audit events: an event counts as written once it is
//! appended here; the uploader reads from it and the spool is trimmed only after the
//! destination acknowledged.
//!
//! What it does: appends opaque records with a spool-assigned, monotonic sequence number;
//! reads them back from any sequence number; remembers the highest acknowledged sequence
//! number and deletes whole segments below it; recovers after a crash, keeping every valid
//! record and reporting what it had to drop.
//!
//! What it deliberately does not: no serialization of events (records are bytes), no
//! network, no threads or timers (the caller decides when to [`Spool::commit`]).
//!
//! # On-disk format (version 1)
//!
//! A spool is a directory:
//! - `seg-<first seq, 20 digits>.log`: segments. Each starts with a 16-byte header:
//!   `b"PCSPOOL1"`, then `u32` version (1, little endian), then 4 reserved zero bytes. Then
//!   records, each: `u32` payload length, `u32` CRC-32 (IEEE) of the next 8 + length bytes,
//!   `u64` sequence number, then the payload; all little endian. A segment is closed when it
//!   reaches `segment_bytes`; the next one is named after its first sequence number.
//! - `acked`: the highest acknowledged sequence number, as decimal text, replaced atomically
//!   (write to `acked.tmp`, fsync, rename).
//!
//! # Durability
//!
//! Appends are buffered in memory; [`Spool::commit`] writes them to the segment and, with
//! [`FsyncPolicy::OnCommit`] (the default), fsyncs. A record counts as written once the
//! `commit` after its append returned: the gateway's audit writer commits once per batch
//! (group commit: what arrives within 10 ms of a batch's first event), so a crash loses at
//! most the batch in progress (≤ 10 ms of events, none of them reported as written). [`FsyncPolicy::Always`]
//! writes and fsyncs on every append (no loss window, slowest). [`FsyncPolicy::Never`]
//! writes on commit and leaves flushing to the OS: a process crash loses nothing committed,
//! a machine crash up to the kernel's writeback delay (~30 s). Readers see committed
//! records only.
//!
//! # Recovery
//!
//! On open every segment is scanned. A record whose length runs past the end of the last
//! segment, or whose CRC fails at the end of the last segment, is a torn tail: the segment
//! is truncated there and the loss reported ([`Recovery::torn_tail`]). A record whose CRC
//! fails in the middle of a segment while its length still frames a valid next record is
//! skipped and reported ([`Recovery::corrupt`]); if the framing itself is lost, the rest of
//! that segment is reported unreadable and the following segments are still read.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"PCSPOOL1";
const VERSION: u32 = 1;
const HEADER: usize = 16;
const FRAME: usize = 16; // len + crc + seq
/// Largest record accepted (a sanity bound for recovery, far above any event).
pub const MAX_RECORD: usize = 1 << 20;

/// When appended records reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    Always,
    OnCommit,
    Never,
}

/// Spool settings.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    pub segment_bytes: u64,
    /// Total size cap; appends beyond it fail with [`SpoolError::Full`].
    pub max_bytes: u64,
    pub fsync: FsyncPolicy,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            segment_bytes: 64 << 20,
            max_bytes: 4 << 30,
            fsync: FsyncPolicy::OnCommit,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The size cap is reached: the caller must fail closed (deny new work, raise an alarm).
    #[error("spool {dir} is full ({bytes} bytes, cap {cap})")]
    Full { dir: PathBuf, bytes: u64, cap: u64 },
    #[error("record of {0} bytes is over the {MAX_RECORD}-byte limit")]
    TooLarge(usize),
    #[error("spool io on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What recovery found on open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub records: u64,
    /// (segment, offset, bytes dropped) of a torn tail.
    pub torn_tail: Option<(PathBuf, u64, u64)>,
    /// (segment, offset) of records skipped for a bad checksum or lost framing.
    pub corrupt: Vec<(PathBuf, u64)>,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    last_seq: Option<u64>,
    bytes: u64,
    /// Valid records: (seq, offset of the frame).
    index: Vec<(u64, u64)>,
}

/// The spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    config: SpoolConfig,
    segments: Vec<Segment>,
    active: File,
    next_seq: u64,
    acked: u64,
    dirty: bool,
    /// Appended, not yet written to the active segment.
    pending: Vec<u8>,
    /// Records of the active segment at or after this index are only in `pending`.
    committed_seq: u64,
}

/// Committed records read in one go (see [`Spool::read_batch`]).
#[derive(Debug, Default)]
pub struct Batch {
    buf: Vec<u8>,
    records: Vec<(u64, std::ops::Range<usize>)>,
}

impl Batch {
    /// `(sequence number, payload)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.records
            .iter()
            .map(|(seq, r)| (*seq, self.buf.get(r.clone()).unwrap_or_default()))
    }
    pub fn len(&self) -> usize {
        self.records.len()
    }
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
    pub fn last_seq(&self) -> Option<u64> {
        self.records.last().map(|(seq, _)| *seq)
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering after a crash.
    pub fn open(dir: &Path, config: SpoolConfig) -> Result<(Spool, Recovery), SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            // Only when we made it empty-handed: an operator's own mode stays.
            if std::fs::read_dir(dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
            {
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            }
        }
        let acked = read_acked(dir)?;
        let mut paths: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let name = p.file_name()?.to_str()?;
                let seq = name
                    .strip_prefix("seg-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()?;
                Some((seq, p))
            })
            .collect();
        paths.sort();
        let mut recovery = Recovery::default();
        let mut segments = Vec::new();
        let count = paths.len();
        for (i, (_, path)) in paths.into_iter().enumerate() {
            let seg = scan(&path, i + 1 == count, &mut recovery)?;
            segments.push(seg);
        }
        let next_seq = segments
            .iter()
            .filter_map(|s| s.last_seq)
            .max()
            .map(|s| s + 1)
            .unwrap_or(acked + 1)
            .max(acked + 1);
        if segments.is_empty() {
            segments.push(new_segment(dir, next_seq)?);
        }
        let active_path = segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let active = OpenOptions::new()
            .append(true)
            .open(&active_path)
            .map_err(io(&active_path))?;
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            config,
            segments,
            active,
            next_seq,
            acked,
            dirty: false,
            pending: Vec::with_capacity(1 << 16),
            committed_seq: next_seq,
        };
        spool.trim()?;
        Ok((spool, recovery))
    }

    /// The sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The highest acknowledged sequence number (0: none).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Records appended and not yet acknowledged.
    pub fn backlog(&self) -> u64 {
        self.next_seq.saturating_sub(self.acked + 1)
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Appends a record; returns its sequence number. It counts as written once this
    /// returns (and, with [`FsyncPolicy::OnCommit`], once [`Spool::commit`] returns).
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, SpoolError> {
        if payload.len() > MAX_RECORD {
            return Err(SpoolError::TooLarge(payload.len()));
        }
        let size = (FRAME + payload.len()) as u64;
        let total = self.bytes();
        if total + size > self.config.max_bytes {
            return Err(SpoolError::Full {
                dir: self.dir.clone(),
                bytes: total,
                cap: self.config.max_bytes,
            });
        }
        if self
            .segments
            .last()
            .is_some_and(|s| s.bytes + size > self.config.segment_bytes && s.last_seq.is_some())
        {
            self.roll()?;
        }
        let seq = self.next_seq;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&seq.to_le_bytes());
        hasher.update(payload);
        self.pending
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.pending
            .extend_from_slice(&hasher.finalize().to_le_bytes());
        self.pending.extend_from_slice(&seq.to_le_bytes());
        self.pending.extend_from_slice(payload);
        let Some(seg) = self.segments.last_mut() else {
            return Err(SpoolError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other("no active segment"),
            });
        };
        seg.index.push((seq, seg.bytes));
        seg.bytes += size;
        seg.last_seq = Some(seq);
        self.next_seq += 1;
        self.dirty = true;
        if self.config.fsync == FsyncPolicy::Always {
            self.write_pending()?;
            self.sync()?;
        }
        Ok(seq)
    }

    /// Writes appended records and makes them durable according to the policy (see the
    /// crate docs). Records count as written once this returns.
    pub fn commit(&mut self) -> Result<(), SpoolError> {
        self.write_pending()?;
        if self.config.fsync != FsyncPolicy::Never && self.dirty {
            self.sync()?;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> Result<(), SpoolError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self
            .segments
            .last()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        self.active.write_all(&self.pending).map_err(io(&path))?;
        self.pending.clear();
        self.committed_seq = self.next_seq;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), SpoolError> {
        let path = self
            .segments
            .last()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        self.active.sync_data().map_err(io(&path))?;
        self.dirty = false;
        Ok(())
    }

    fn roll(&mut self) -> Result<(), SpoolError> {
        self.write_pending()?;
        self.sync()?;
        let seg = new_segment(&self.dir, self.next_seq)?;
        self.active = OpenOptions::new()
            .append(true)
            .open(&seg.path)
            .map_err(io(&seg.path))?;
        self.segments.push(seg);
        // The new file's directory entry must be durable too.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }

    /// Reads up to `max` committed records with sequence numbers ≥ `from` (skipping
    /// acknowledged ones), each as its own buffer.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        Ok(self
            .read_batch(from, max)?
            .iter()
            .map(|(seq, payload)| (seq, payload.to_vec()))
            .collect())
    }

    /// Reads up to `max` committed records with sequence numbers ≥ `from` (skipping
    /// acknowledged ones) into one buffer: one read per segment, no allocation per record.
    pub fn read_batch(&self, from: u64, max: usize) -> Result<Batch, SpoolError> {
        let from = from.max(self.acked + 1);
        let max = max.min(self.committed_seq.saturating_sub(from) as usize);
        let mut batch = Batch {
            buf: Vec::new(),
            records: Vec::with_capacity(max),
        };
        for seg in &self.segments {
            if batch.records.len() >= max {
                break;
            }
            if seg.last_seq.is_none_or(|l| l < from) {
                continue;
            }
            // One read for the segment's wanted records (they are consecutive on disk
            // apart from corrupt records that recovery skipped): a batch of thousands of
            // records costs one syscall, not three per record.
            let first = seg.index.partition_point(|&(seq, _)| seq < from);
            let wanted = seg.index.get(first..).unwrap_or_default();
            let wanted = wanted
                .get(..wanted.len().min(max - batch.records.len()))
                .unwrap_or_default();
            let (Some(&(_, start)), Some(&(_, last))) = (wanted.first(), wanted.last()) else {
                continue;
            };
            // The last record ends where the next indexed one starts, or at most at the
            // segment's end; its frame says where exactly.
            let end = seg
                .index
                .get(first + wanted.len())
                .map_or(seg.bytes.max(last + FRAME as u64), |&(_, next)| next);
            let mut file = File::open(&seg.path).map_err(io(&seg.path))?;
            file.seek(SeekFrom::Start(start)).map_err(io(&seg.path))?;
            let base = batch.buf.len();
            (&mut file)
                .take(end - start)
                .read_to_end(&mut batch.buf)
                .map_err(io(&seg.path))?;
            for &(seq, offset) in wanted {
                let at = base + (offset - start) as usize;
                let range = batch
                    .buf
                    .get(at..)
                    .and_then(|rest| rest.first_chunk::<4>())
                    .map(|len| at + FRAME..at + FRAME + u32::from_le_bytes(*len) as usize)
                    .filter(|r| r.end <= batch.buf.len())
                    .ok_or_else(|| {
                        io(&seg.path)(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("record {seq} at offset {offset} runs past the end"),
                        ))
                    })?;
                batch.records.push((seq, range));
            }
        }
        Ok(batch)
    }

    /// The newest committed record, acknowledged or not (the audit chain resumes from it
    /// after a restart).
    pub fn last_record(&self) -> Result<Option<(u64, Vec<u8>)>, SpoolError> {
        for seg in self.segments.iter().rev() {
            let Some(&(seq, offset)) = seg
                .index
                .iter()
                .rev()
                .find(|(seq, _)| *seq < self.committed_seq)
            else {
                continue;
            };
            let mut file = File::open(&seg.path).map_err(io(&seg.path))?;
            file.seek(SeekFrom::Start(offset)).map_err(io(&seg.path))?;
            let mut frame = [0u8; FRAME];
            file.read_exact(&mut frame).map_err(io(&seg.path))?;
            let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
            let mut payload = vec![0u8; len];
            file.read_exact(&mut payload).map_err(io(&seg.path))?;
            return Ok(Some((seq, payload)));
        }
        Ok(None)
    }

    /// Records that everything up to `seq` reached its destination; deletes segments that
    /// hold only acknowledged records.
    pub fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        if seq <= self.acked {
            return Ok(());
        }
        self.acked = seq.min(self.committed_seq.saturating_sub(1));
        write_acked(&self.dir, self.acked)?;
        self.trim()
    }

    fn trim(&mut self) -> Result<(), SpoolError> {
        // Keep the active (last) segment even when fully acknowledged.
        while self.segments.len() > 1
            && self
                .segments
                .first()
                .is_some_and(|s| s.last_seq.is_none_or(|l| l <= self.acked))
        {
            let seg = self.segments.remove(0);
            std::fs::remove_file(&seg.path).map_err(io(&seg.path))?;
        }
        Ok(())
    }
}

fn new_segment(dir: &Path, first_seq: u64) -> Result<Segment, SpoolError> {
    let path = dir.join(format!("seg-{first_seq:020}.log"));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    f.write_all(&header).map_err(io(&path))?;
    f.sync_data().map_err(io(&path))?;
    Ok(Segment {
        path,
        last_seq: None,
        bytes: HEADER as u64,
        index: Vec::new(),
    })
}

fn read_acked(dir: &Path) -> Result<u64, SpoolError> {
    let path = dir.join("acked");
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim().parse().unwrap_or(0)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(SpoolError::Io { path, source: e }),
    }
}

fn write_acked(dir: &Path, seq: u64) -> Result<(), SpoolError> {
    let tmp = dir.join("acked.tmp");
    let path = dir.join("acked");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(seq.to_string().as_bytes()).map_err(io(&tmp))?;
    f.sync_data().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(())
}

/// Reads one segment, building its index; repairs a torn tail of the last segment.
fn scan(path: &Path, last: bool, recovery: &mut Recovery) -> Result<Segment, SpoolError> {
    let data = std::fs::read(path).map_err(io(path))?;
    let mut seg = Segment {
        path: path.to_path_buf(),
        last_seq: None,
        bytes: data.len() as u64,
        index: Vec::new(),
    };
    if data.len() < HEADER || data.get(..8) != Some(MAGIC.as_slice()) {
        recovery.corrupt.push((path.to_path_buf(), 0));
        return Ok(seg);
    }
    let frame_at = |off: usize| -> Option<(usize, u32, u64)> {
        let f = data.get(off..off + FRAME)?;
        let len = u32::from_le_bytes(f.get(0..4)?.try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(f.get(4..8)?.try_into().ok()?);
        let seq = u64::from_le_bytes(f.get(8..16)?.try_into().ok()?);
        Some((len, crc, seq))
    };
    let valid = |off: usize| -> Option<(usize, u64)> {
        let (len, crc, seq) = frame_at(off)?;
        if len > MAX_RECORD {
            return None;
        }
        let body = data.get(off + 8..off + FRAME + len)?;
        (crc32fast::hash(body) == crc).then_some((len, seq))
    };
    let mut off = HEADER;
    let mut good_end = HEADER;
    while off < data.len() {
        match valid(off) {
            Some((len, seq)) => {
                seg.index.push((seq, off as u64));
                seg.last_seq = Some(seq);
                off += FRAME + len;
                good_end = off;
            }
            None => {
                // Mid-segment damage with intact framing: skip just this record.
                let next = frame_at(off).map(|(len, _, _)| off + FRAME + len);
                match next {
                    Some(n) if n < data.len() && valid(n).is_some() => {
                        recovery.corrupt.push((path.to_path_buf(), off as u64));
                        off = n;
                    }
                    _ if last => {
                        recovery.torn_tail = Some((
                            path.to_path_buf(),
                            good_end as u64,
                            (data.len() - good_end) as u64,
                        ));
                        let f = OpenOptions::new()
                            .write(true)
                            .open(path)
                            .map_err(io(path))?;
                        f.set_len(good_end as u64).map_err(io(path))?;
                        f.sync_all().map_err(io(path))?;
                        seg.bytes = good_end as u64;
                        break;
                    }
                    _ => {
                        recovery.corrupt.push((path.to_path_buf(), off as u64));
                        break;
                    }
                }
            }
        }
    }
    recovery.records += seg.index.len() as u64;
    Ok(seg)
}

#[cfg(test)]
mod tests;
