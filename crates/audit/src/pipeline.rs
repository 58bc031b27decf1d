//! The gateway's audit pipeline: two threads behind a bounded queue, so the data plane
//! never waits on the disk or on ClickHouse.
//!
//! - [`Pipeline::submit`] (data plane): stamps nothing, blocks never; a full queue refuses
//!   the event, counts it and raises [`Pipeline::blocked`].
//! - writer thread: stamps each event (UUID, per-gateway sequence number = spool sequence
//!   number), links it into the hash chain, appends it to the spool, commits once per
//!   batch (group commit: it polls the queue every commit interval, 50 ms by default, and
//!   takes what is there, up to 8,192 events, so the data plane never wakes it; the fsync
//!   policy decides what commit means), then appends the batch to the
//!   events file: a line there is an event counted as written. When the spool refuses
//!   (full, or an io error) the events are counted, the pipeline reports `blocked`, and
//!   once writing works again an `audit_degraded` event records the interval and the count.
//! - uploader thread: reads committed records from the spool, batches them by count and
//!   age, inserts them into ClickHouse, and acknowledges (trims) only after ClickHouse
//!   answered. Failures back off exponentially (100 ms to 10 s) and reconnect, detecting
//!   the server version again. Every 10 s it records its state in `uploader_metrics`;
//!   every hour it applies retention.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use portcullis_model::{Envelope, Event, EVENT_VERSION};
use portcullis_spool::{Recovery, Spool, SpoolConfig, SpoolError};

use crate::native::NativeBlock;
use crate::row::{AuditRow, Chain};
use crate::signer::{CheckpointSettings, Signer};
use crate::store::{MetricsRow, Store, StoreConfig};

/// Where events go.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub gateway: String,
    /// The local JSON-lines trail; optional with a spool (it costs the writer about 1 µs
    /// of CPU per event), required without one.
    pub events_file: Option<PathBuf>,
    /// The durable spool and the uploader; without it events only reach the events file.
    pub spool: Option<SpoolSettings>,
    /// Events the queue between the data plane and the writer holds.
    pub queue: usize,
    /// Group commit: how often the writer takes what the queue holds (at once when a
    /// full batch waits, or an event from `submit_durable`, which a request waits for).
    /// Events reach the spool at most this long after `submit`.
    pub commit_interval: Duration,
    /// Signed checkpoints of the chain head (needs the spool).
    pub checkpoints: Option<CheckpointSettings>,
}

#[derive(Clone, Debug)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    pub spool: SpoolConfig,
    pub upload: UploadConfig,
}

#[derive(Clone, Debug)]
pub struct UploadConfig {
    pub store: StoreConfig,
    pub batch_rows: usize,
    pub batch_interval: Duration,
    /// Drop partitions older than this (hourly); `None` keeps everything.
    pub retention: Option<Duration>,
    /// In a cluster: set while this node holds the retention lease (one node of the
    /// cluster drops partitions, not all of them at once). `None`: always this node's job.
    pub retention_lease: Option<Arc<AtomicBool>>,
}

impl UploadConfig {
    /// Whether retention is this node's job now.
    pub fn retention_due(&self) -> bool {
        self.retention.is_some()
            && self
                .retention_lease
                .as_ref()
                .is_none_or(|held| held.load(Ordering::Relaxed))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("no events file and no spool: the events would go nowhere")]
    Nowhere,
    #[error("events file {path}: {source}")]
    EventsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting audit thread: {0}")]
    Thread(std::io::Error),
    #[error("checkpoints file {path}: {source}")]
    Checkpoints {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signed checkpoints need the spool ([audit.clickhouse] and spool_dir)")]
    CheckpointsWithoutSpool,
}

/// Counters and gauges, readable from any thread.
#[derive(Debug, Default)]
pub struct PipelineStats {
    /// Events durable in the spool (or, without one, written to the events file).
    pub written: AtomicU64,
    /// Events that could not be written (queue full, spool full, io errors).
    pub refused: AtomicU64,
    pub uploaded: AtomicU64,
    pub batches: AtomicU64,
    pub upload_errors: AtomicU64,
    /// Records the uploader could not decode and skipped (reported, never expected).
    pub undecodable: AtomicU64,
    pub backlog: AtomicU64,
    pub spool_bytes: AtomicU64,
    /// Age of the oldest event not yet in ClickHouse, in milliseconds.
    pub lag_ms: AtomicU64,
    /// Highest sequence number durable in the spool.
    pub written_seq: AtomicU64,
    /// Highest sequence number ClickHouse acknowledged.
    pub acked_seq: AtomicU64,
    /// Spool commits (write and fsync of a batch), each.
    pub commit_latency: portcullis_model::latency::SharedLatency,
    /// ClickHouse inserts that succeeded, each (send to acknowledgement).
    pub upload_latency: portcullis_model::latency::SharedLatency,
}

struct Shared {
    stats: PipelineStats,
    blocked: AtomicBool,
    /// Refusals by `submit` not yet accounted for by the writer.
    queue_refused: AtomicU64,
    stop: AtomicBool,
}

/// An event for the writer, and who waits for it to be durable.
type Item = (Event, DateTime<Utc>, Option<Durable>);

/// Answered `true` once the event is durable (committed to the spool, or without one
/// written to the events file), `false` if it was refused.
pub type Durable = tokio::sync::oneshot::Sender<bool>;

/// The running pipeline.
pub struct Pipeline {
    tx: Option<SyncSender<Item>>,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    uploader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("blocked", &self.blocked())
            .finish()
    }
}

fn lock(spool: &Mutex<Spool>) -> MutexGuard<'_, Spool> {
    // A panic while holding the lock leaves the spool consistent on disk (every mutation
    // is an append or a whole-file replace), so a poisoned lock is still usable.
    spool.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pipeline {
    /// Opens the spool (recovering after a crash) and starts the threads. The recovery
    /// report is returned and, when it dropped anything, also written to the trail.
    pub fn start(config: PipelineConfig) -> Result<(Pipeline, Option<Recovery>), AuditError> {
        let events = match &config.events_file {
            Some(path) => Some((
                BufWriter::with_capacity(
                    1 << 16,
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        // Who reached what is not for every local user to read.
                        .mode(0o600)
                        .open(path)
                        .map_err(|source| AuditError::EventsFile {
                            path: path.clone(),
                            source,
                        })?,
                ),
                path.clone(),
            )),
            None if config.spool.is_none() => return Err(AuditError::Nowhere),
            None => None,
        };
        let shared = Arc::new(Shared {
            stats: PipelineStats::default(),
            blocked: AtomicBool::new(false),
            queue_refused: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let (tx, rx) = sync_channel(config.queue.max(1));
        let commit_interval = config.commit_interval.max(Duration::from_millis(1));
        let mut recovery = None;
        let mut spool = None;
        let mut chain = Chain::default();
        let mut next_seq = 1;
        let mut signer = None;
        let mut last_time = None;
        if config.checkpoints.is_some() && config.spool.is_none() {
            return Err(AuditError::CheckpointsWithoutSpool);
        }
        if let Some(s) = &config.spool {
            let (sp, rec) = Spool::open(&s.dir, s.spool.clone())?;
            if let Some((seq, bytes)) = sp.last_record()? {
                match AuditRow::decode(&bytes) {
                    Ok(row) => {
                        chain.last_hash = row.hash;
                        last_time = i64::try_from(row.time_us)
                            .ok()
                            .and_then(DateTime::from_timestamp_micros);
                    }
                    Err(e) => tracing::error!(seq, "audit chain restarts: last spool record: {e}"),
                }
            }
            next_seq = sp.next_seq();
            if let Some(c) = &config.checkpoints {
                signer = Some(
                    Signer::open(c.clone(), &config.gateway, &sp).map_err(|source| {
                        AuditError::Checkpoints {
                            path: c.file.clone(),
                            source,
                        }
                    })?,
                );
            }
            shared
                .stats
                .written_seq
                .store(next_seq.saturating_sub(1), Ordering::Relaxed);
            shared.stats.acked_seq.store(sp.acked(), Ordering::Relaxed);
            shared.stats.backlog.store(sp.backlog(), Ordering::Relaxed);
            shared
                .stats
                .spool_bytes
                .store(sp.bytes(), Ordering::Relaxed);
            spool = Some(Arc::new(Mutex::new(sp)));
            recovery = Some(rec);
        }
        let mut writer = Writer {
            gateway: config.gateway.clone(),
            events,
            spool: spool.clone(),
            chain,
            next_seq,
            shared: shared.clone(),
            degraded: None,
            interval_refused: 0,
            resume_below: config
                .spool
                .as_ref()
                .map(|s| s.spool.max_bytes / 10 * 9)
                .unwrap_or(u64::MAX),
            buf: Vec::with_capacity(1024),
            ids: rand::SeedableRng::from_entropy(),
            signer,
            final_checkpoint: false,
            last_time,
        };
        if let Some(rec) = &recovery {
            if let Some(reason) = recovery_report(rec) {
                tracing::warn!("audit spool recovery: {reason}");
                let now = Utc::now();
                writer.write_batch(vec![(
                    Event::AuditDegraded {
                        since: now,
                        until: now,
                        events_refused: 0,
                        reason,
                    },
                    now,
                    None,
                )]);
            }
        }
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx, commit_interval))
            .map_err(AuditError::Thread)?;
        let uploader = match (&config.spool, spool) {
            (Some(s), Some(spool)) => {
                let uploader = Uploader {
                    gateway: config.gateway.clone(),
                    config: s.upload.clone(),
                    spool,
                    shared: shared.clone(),
                };
                Some(
                    std::thread::Builder::new()
                        .name("audit-uploader".into())
                        .spawn(move || uploader.run())
                        .map_err(AuditError::Thread)?,
                )
            }
            _ => None,
        };
        Ok((
            Pipeline {
                tx: Some(tx),
                shared,
                writer: Some(writer),
                uploader,
            },
            recovery,
        ))
    }

    /// Hands an event to the writer without blocking. `false`: refused (counted, and
    /// reported later in an `audit_degraded` event).
    pub fn submit(&self, event: Event, time: DateTime<Utc>) -> bool {
        self.submit_item((event, time, None))
    }

    /// [`Pipeline::submit`], and a receiver answered once the event is durable (`true`)
    /// or refused (`false`): what a control-plane request waits for before its answer.
    /// The writer commits in order, so this event being durable means every event
    /// submitted before it is too. Refused at once: the receiver answers `false`.
    pub fn submit_durable(
        &self,
        event: Event,
        time: DateTime<Utc>,
    ) -> tokio::sync::oneshot::Receiver<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // On refusal the sender is dropped with the item, so the receiver sees an error,
        // which callers read as not durable.
        if self.submit_item((event, time, Some(tx))) {
            // Someone waits for this one: the writer takes it now instead of at its next
            // interval (concurrent waiters still share one commit).
            if let Some(w) = &self.writer {
                w.thread().unpark();
            }
        }
        rx
    }

    fn submit_item(&self, item: Item) -> bool {
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(item) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.queue_refused.fetch_add(1, Ordering::Relaxed);
                self.shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.shared.blocked.store(true, Ordering::Relaxed);
                false
            }
        }
    }

    /// True while events cannot be written (the caller fails closed on new flows).
    pub fn blocked(&self) -> bool {
        self.shared.blocked.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &PipelineStats {
        &self.shared.stats
    }

    /// Writes every queued event, then gives the uploader up to `drain` to empty the
    /// backlog, and stops. What is not uploaded stays in the spool for the next start.
    pub fn shutdown(mut self, drain: Duration) {
        self.tx = None;
        if let Some(w) = self.writer.take() {
            // Not a whole interval later: it sees the closed queue now.
            w.thread().unpark();
            let _ = w.join();
        }
        let deadline = Instant::now() + drain;
        while self.shared.stats.backlog.load(Ordering::Relaxed) > 0
            && self.uploader.is_some()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(u) = self.uploader.take() {
            let _ = u.join();
        }
    }
}

fn recovery_report(rec: &Recovery) -> Option<String> {
    let mut parts = Vec::new();
    if let Some((seg, offset, bytes)) = &rec.torn_tail {
        parts.push(format!(
            "torn tail of {bytes} bytes dropped at {}:{offset}",
            seg.display()
        ));
    }
    for (seg, offset) in &rec.corrupt {
        parts.push(format!(
            "corrupt record skipped at {}:{offset}",
            seg.display()
        ));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "spool recovery kept {} records; {}",
            rec.records,
            parts.join("; ")
        )
    })
}

struct Writer {
    gateway: String,
    /// The events file and its path.
    events: Option<(BufWriter<File>, PathBuf)>,
    spool: Option<Arc<Mutex<Spool>>>,
    chain: Chain,
    next_seq: u64,
    shared: Arc<Shared>,
    /// Since when events are refused, with the reason of the first refusal.
    degraded: Option<(DateTime<Utc>, String)>,
    /// Events refused in the current degraded interval.
    interval_refused: u64,
    /// Spool size below which a degraded writer tries again.
    resume_below: u64,
    buf: Vec<u8>,
    /// Event ids: random (v4) UUIDs from a CSPRNG seeded once by the OS, instead of a
    /// `getrandom` syscall per event.
    ids: rand::rngs::StdRng,
    signer: Option<Signer>,
    /// Shutting down: sign the head whatever the interval.
    final_checkpoint: bool,
    /// The time of the chain's last row (see [`monotone_time`]).
    last_time: Option<DateTime<Utc>>,
}

/// How far an event's time may lag the row before it and still be moved up to it.
const REORDER_WINDOW_US: i64 = 1_000_000;

/// The time a row is recorded with: event times are taken by their submitters before
/// the queue, so an event can reach the writer after a later-stamped one (another
/// thread's, or the writer's own checkpoint or alarm at the end of a batch). Such a lag
/// of up to [`REORDER_WINDOW_US`] is moved up to the previous row's time, so the trail's
/// time runs forwards along its sequence; a larger step is a clock step and kept as it
/// is, for `audit verify` to report.
fn monotone_time(last: Option<DateTime<Utc>>, time: DateTime<Utc>) -> DateTime<Utc> {
    match last {
        Some(last)
            if time < last
                && (last - time)
                    .num_microseconds()
                    .is_some_and(|lag| lag <= REORDER_WINDOW_US) =>
        {
            last
        }
        _ => time,
    }
}

/// How often an idle writer retries to report a degraded interval.
const DEGRADED_RETRY: Duration = Duration::from_millis(200);
const WRITE_BATCH: usize = 8192;

impl Writer {
    /// Group commit by polling: drain the queue, write and commit what was there, sleep
    /// the commit interval unless the batch was full. The writer never blocks on the queue, so
    /// `submit` never has a sleeping thread to wake: the data plane makes no syscall per
    /// event, and a trickle of events costs one wake-up (and commit) per interval, not one
    /// per event. Only `submit_durable` (control-plane events a request waits for) wakes
    /// it early.
    fn run(mut self, rx: Receiver<Item>, interval: Duration) {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        let mut last_degraded_try = Instant::now();
        loop {
            let mut disconnected = false;
            while batch.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            let full = batch.len() == WRITE_BATCH;
            if !batch.is_empty() {
                self.write_batch(std::mem::take(&mut batch));
            } else if self.checkpoint_due() {
                self.write_batch(Vec::new());
            } else if (self.degraded.is_some()
                || self.shared.queue_refused.load(Ordering::Relaxed) > 0)
                && last_degraded_try.elapsed() >= DEGRADED_RETRY
            {
                // Nothing to write: still report a degraded interval once writable.
                last_degraded_try = Instant::now();
                self.write_batch(Vec::new());
            }
            if disconnected {
                break;
            }
            if !full {
                // Woken early by `submit_durable` (a request waits); spurious wake-ups
                // only cost an empty drain.
                std::thread::park_timeout(interval);
            }
        }
        if self.signer.is_some() {
            self.final_checkpoint = true;
            self.write_batch(Vec::new());
        }
        if let Some((f, _)) = &mut self.events {
            let _ = f.flush();
        }
    }

    fn checkpoint_due(&self) -> bool {
        self.degraded.is_none()
            && self
                .signer
                .as_ref()
                .is_some_and(|s| s.due(Instant::now(), self.final_checkpoint))
    }

    /// Signs the chain head and appends the checkpoint's event; its copies outside
    /// ClickHouse are written once the spool committed it.
    fn append_checkpoint(&mut self, spool: Option<&mut Spool>, written: &mut Vec<Envelope>) {
        let Some(sp) = spool else {
            return;
        };
        let head = sp.next_seq().saturating_sub(1);
        let now = Utc::now();
        let Some(signer) = &mut self.signer else {
            return;
        };
        let cp = signer.sign(
            head,
            self.chain.last_hash,
            now.timestamp_micros().max(0) as u64,
        );
        let event = cp.to_event();
        signer.hold(cp);
        match self.append(Some(sp), event, now) {
            Some(env) => written.push(env),
            None => {
                if let Some(signer) = &mut self.signer {
                    signer.own_event_refused();
                }
            }
        }
    }

    fn write_batch(&mut self, batch: Vec<Item>) {
        let queue_refused = self.shared.queue_refused.swap(0, Ordering::Relaxed);
        if queue_refused > 0 && self.degraded.is_none() {
            self.degraded = Some((
                Utc::now(),
                "the audit writer fell behind (queue full)".into(),
            ));
        }
        self.interval_refused += queue_refused;
        // Refusals found here (the queue's were counted by `submit`).
        let mut refused = 0;
        let mut written: Vec<Envelope> = Vec::with_capacity(batch.len() + 1);
        let spool = self.spool.clone();
        let mut guard = spool.as_deref().map(lock);
        // The alarm for a degraded interval goes first, once the spool takes events again
        // (for a full spool: once it is below 90% of its cap, so it does not flap).
        let room = guard
            .as_deref()
            .is_none_or(|sp| sp.bytes() <= self.resume_below);
        if let Some((since, reason)) = self.degraded.clone().filter(|_| room) {
            let now = Utc::now();
            let alarm = Event::AuditDegraded {
                since,
                until: now,
                events_refused: self.interval_refused,
                reason,
            };
            self.degraded = None;
            match self.append(guard.as_deref_mut(), alarm, now) {
                Some(env) => {
                    written.push(env);
                    self.interval_refused = 0;
                }
                None => self.degraded = Some((since, self.degraded_reason())),
            }
        }
        // Who waits, and whether their event was appended (durable once committed).
        let mut waiting: Vec<(Durable, bool)> = Vec::new();
        for (event, time, durable) in batch {
            if self.degraded.is_some() {
                refused += 1;
                if let Some(d) = durable {
                    waiting.push((d, false));
                }
                continue;
            }
            let appended = match self.append(guard.as_deref_mut(), event, time) {
                Some(env) => {
                    written.push(env);
                    true
                }
                None => {
                    refused += 1;
                    false
                }
            };
            if let Some(d) = durable {
                waiting.push((d, appended));
            }
        }
        self.interval_refused += refused;
        if self.checkpoint_due() {
            self.append_checkpoint(guard.as_deref_mut(), &mut written);
        }
        let st = &self.shared.stats;
        st.refused.fetch_add(refused, Ordering::Relaxed);
        if let Some(sp) = guard.as_deref_mut() {
            let started = std::time::Instant::now();
            let committed = sp.commit();
            st.commit_latency.observe(started.elapsed());
            if let Err(e) = committed {
                // Appended records stay pending and are written by the next commit;
                // until then they do not count as written.
                tracing::error!("audit spool commit failed: {e}");
                self.degraded
                    .get_or_insert_with(|| (Utc::now(), format!("spool commit failed: {e}")));
                self.shared.blocked.store(true, Ordering::Relaxed);
                for (d, _) in waiting {
                    let _ = d.send(false);
                }
                return;
            }
            st.written_seq
                .store(sp.next_seq().saturating_sub(1), Ordering::Relaxed);
            st.backlog.store(sp.backlog(), Ordering::Relaxed);
            st.spool_bytes.store(sp.bytes(), Ordering::Relaxed);
            if let Some(signer) = &mut self.signer {
                signer.committed();
            }
        }
        drop(guard);
        st.written
            .fetch_add(written.len() as u64, Ordering::Relaxed);
        self.shared
            .blocked
            .store(self.degraded.is_some(), Ordering::Relaxed);
        let spooled = spool.is_some();
        let mut file_ok = true;
        if let Some((file, path)) = &mut self.events {
            for env in &written {
                tracing::debug!(kind = env.event.kind(), seq = env.seq, "event");
                if serde_json::to_writer(&mut *file, env).is_err() || file.write_all(b"\n").is_err()
                {
                    tracing::error!(path = %path.display(), "writing the events file failed");
                    file_ok = false;
                }
            }
            if !written.is_empty() && file.flush().is_err() {
                tracing::error!(path = %path.display(), "writing the events file failed");
                file_ok = false;
            }
        }
        // Durable: committed to the spool; without a spool, in the events file (handed
        // to the kernel, so it survives the process being killed).
        for (d, appended) in waiting {
            let _ = d.send(appended && (spooled || file_ok));
        }
    }

    fn degraded_reason(&self) -> String {
        self.degraded
            .as_ref()
            .map(|d| d.1.clone())
            .unwrap_or_else(|| "the audit spool refused events".into())
    }

    /// Stamps, chains and appends one event; `None` when the spool refused it (then the
    /// pipeline is degraded).
    fn append(
        &mut self,
        spool: Option<&mut Spool>,
        event: Event,
        time: DateTime<Utc>,
    ) -> Option<Envelope> {
        let seq = spool
            .as_ref()
            .map(|s| s.next_seq())
            .unwrap_or(self.next_seq);
        let time = monotone_time(self.last_time, time);
        let env = Envelope {
            v: EVENT_VERSION,
            id: uuid::Builder::from_random_bytes(rand::Rng::gen(&mut self.ids)).into_uuid(),
            seq,
            time,
            gateway: self.gateway.clone(),
            event,
        };
        let Some(spool) = spool else {
            self.next_seq += 1;
            self.last_time = Some(time);
            return Some(env);
        };
        let mut row = AuditRow::from_envelope(&env);
        let before = self.chain.last_hash;
        self.chain.seal_record(&mut row, &mut self.buf);
        match spool.append(&self.buf) {
            Ok(_) => {
                self.last_time = Some(time);
                if let Some(signer) = &mut self.signer {
                    signer.on_row(&row.hash);
                }
                Some(env)
            }
            Err(e) => {
                // The event is not in the chain: the next one links to the last written.
                self.chain.last_hash = before;
                if self.degraded.is_none() {
                    tracing::error!("audit events refused: {e}");
                    self.degraded = Some((Utc::now(), e.to_string()));
                }
                None
            }
        }
    }
}

struct Uploader {
    gateway: String,
    config: UploadConfig,
    spool: Arc<Mutex<Spool>>,
    shared: Arc<Shared>,
}

/// How often an idle uploader looks for committed events (or for a full batch).
const UPLOAD_POLL: Duration = Duration::from_millis(50);
const INSERT_TIMEOUT: Duration = Duration::from_secs(30);
const METRICS_EVERY: Duration = Duration::from_secs(10);
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// How often a node without the retention lease looks whether it holds it now.
const RETENTION_RECHECK: Duration = Duration::from_secs(30);

impl Uploader {
    fn run(self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("audit uploader cannot start a runtime: {e}");
                return;
            }
        };
        rt.block_on(self.main());
    }

    async fn main(self) {
        let st = &self.shared.stats;
        let mut store: Option<Store> = None;
        let mut backoff = Duration::from_millis(100);
        let mut next = lock(&self.spool).acked() + 1;
        // (seq, time in µs) of the oldest event not yet uploaded.
        let mut oldest: Option<(u64, u64)> = None;
        let mut next_metrics = Instant::now();
        let mut next_retention = Instant::now();
        let mut last_error_log: Option<Instant> = None;
        // Which replica to try first: after a failure, the one after the failed one. A
        // batch retried on another replica lands once (the same rows collapse on their
        // key after FINAL; replicated tables also drop a repeated block).
        let mut first_url = 0usize;
        while !self.shared.stop.load(Ordering::Relaxed) {
            let Some(s) = &store else {
                match Store::connect_from(&self.config.store, first_url).await {
                    Ok(s) => match s.check_schema().await {
                        Ok(()) => {
                            tracing::info!(version = ?s.version, database = %s.database, "audit uploader connected");
                            store = Some(s);
                            // Record the state right away (after an outage: its errors).
                            next_metrics = Instant::now();
                        }
                        Err(e) => self.failed(&e, &mut backoff, &mut last_error_log).await,
                    },
                    Err(e) => self.failed(&e, &mut backoff, &mut last_error_log).await,
                }
                continue;
            };
            let now = Instant::now();
            if now >= next_metrics {
                next_metrics = now + METRICS_EVERY;
                let _ = s.insert_metrics(&self.metrics()).await;
            }
            if now >= next_retention {
                // A node without the lease looks again soon: it may take the lease over.
                next_retention = now + RETENTION_EVERY;
                if !self.config.retention_due() {
                    next_retention = now + RETENTION_RECHECK;
                } else if let Some(age) = self.config.retention {
                    match s.apply_retention(age).await {
                        Ok(r) if !r.dropped.is_empty() || !r.held.is_empty() => tracing::info!(
                            dropped = ?r.dropped,
                            kept_under_legal_hold = ?r.held,
                            "audit retention"
                        ),
                        Ok(_) => {}
                        Err(e) => tracing::warn!("audit retention: {e}"),
                    }
                }
            }
            // Wait for a full batch or for the oldest event to reach the batch interval,
            // without touching the spool while waiting: the writer publishes what is
            // committed, and the oldest pending event's time is read once.
            let available = (st.written_seq.load(Ordering::Relaxed) + 1).saturating_sub(next);
            if available == 0 {
                st.lag_ms.store(0, Ordering::Relaxed);
                tokio::time::sleep(UPLOAD_POLL).await;
                continue;
            }
            if oldest.is_none_or(|(seq, _)| seq != next) {
                oldest = self.first_time(next).map(|t| (next, t));
            }
            let age = oldest.map_or(u64::MAX, |(_, time_us)| {
                (Utc::now().timestamp_micros().max(0) as u64).saturating_sub(time_us) / 1000
            });
            st.lag_ms.store(age, Ordering::Relaxed);
            let age = Duration::from_millis(age);
            if (available as usize) < self.config.batch_rows && age < self.config.batch_interval {
                // Until the oldest event is due, looking for a full batch meanwhile.
                tokio::time::sleep((self.config.batch_interval - age).min(UPLOAD_POLL)).await;
                continue;
            }
            let read = lock(&self.spool).read_batch(next, self.config.batch_rows);
            let records = match read {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("audit spool read: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Some(last_seq) = records.last_seq() else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let mut block = records
                .iter()
                .next()
                .map(|(_, sample)| NativeBlock::with_capacity(records.len(), sample))
                .unwrap_or_default();
            for (seq, bytes) in records.iter() {
                if let Err(e) = block.push_record(bytes) {
                    st.undecodable.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(seq, "audit record skipped: {e}");
                }
            }
            drop(records);
            let rows = block.rows();
            // Nothing decodable (reported above): nothing to send, the records are done.
            let result = if rows == 0 {
                Ok(())
            } else {
                let started = std::time::Instant::now();
                let r = match tokio::time::timeout(INSERT_TIMEOUT, s.insert_block(block)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("insert timed out after {INSERT_TIMEOUT:?}")),
                };
                if r.is_ok() {
                    st.upload_latency.observe(started.elapsed());
                }
                r
            };
            match result {
                Ok(()) => {
                    let mut sp = lock(&self.spool);
                    if let Err(e) = sp.ack(last_seq) {
                        // ClickHouse has the rows; a retry after restart is deduplicated.
                        tracing::error!("audit spool ack: {e}");
                    }
                    st.acked_seq.store(sp.acked(), Ordering::Relaxed);
                    st.backlog.store(sp.backlog(), Ordering::Relaxed);
                    st.spool_bytes.store(sp.bytes(), Ordering::Relaxed);
                    drop(sp);
                    next = last_seq + 1;
                    st.uploaded.fetch_add(rows, Ordering::Relaxed);
                    st.batches.fetch_add(1, Ordering::Relaxed);
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    first_url = s.url_index + 1;
                    let e = format!("{}: {e}", s.url());
                    self.failed(&e, &mut backoff, &mut last_error_log).await;
                    store = None;
                }
            }
        }
    }

    async fn failed(
        &self,
        e: &dyn std::fmt::Display,
        backoff: &mut Duration,
        last_log: &mut Option<Instant>,
    ) {
        self.shared
            .stats
            .upload_errors
            .fetch_add(1, Ordering::Relaxed);
        if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            tracing::warn!(
                backlog = self.shared.stats.backlog.load(Ordering::Relaxed),
                retry_in = ?*backoff,
                "audit upload failed, events stay in the spool: {e}"
            );
            *last_log = Some(Instant::now());
        }
        // Sleep in slices so a shutdown is not held up by a long backoff.
        let until = Instant::now() + *backoff;
        while Instant::now() < until && !self.shared.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(10));
    }

    /// The event time (µs) of the first committed record at or after `seq`.
    fn first_time(&self, seq: u64) -> Option<u64> {
        let read = lock(&self.spool).read_from(seq, 1);
        let (_, bytes) = read.ok()?.into_iter().next()?;
        AuditRow::decode(&bytes).ok().map(|r| r.time_us)
    }

    fn metrics(&self) -> MetricsRow {
        let st = &self.shared.stats;
        MetricsRow {
            gateway: self.gateway.clone(),
            time: Utc::now().timestamp().max(0) as u32,
            backlog: st.backlog.load(Ordering::Relaxed),
            lag_ms: st.lag_ms.load(Ordering::Relaxed),
            batches: st.batches.load(Ordering::Relaxed),
            rows: st.uploaded.load(Ordering::Relaxed),
            errors: st.upload_errors.load(Ordering::Relaxed),
            spool_bytes: st.spool_bytes.load(Ordering::Relaxed),
            refused: st.refused.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(retention: Option<Duration>, lease: Option<Arc<AtomicBool>>) -> UploadConfig {
        UploadConfig {
            store: StoreConfig {
                urls: vec!["http://127.0.0.1:1".into()],
                cluster: None,
                database: "audit".into(),
                user: "default".into(),
                password: None,
            },
            batch_rows: 1,
            batch_interval: Duration::from_millis(1),
            retention,
            retention_lease: lease,
        }
    }

    #[test]
    fn retention_runs_only_where_its_lease_is_held() {
        let day = Some(Duration::from_secs(86_400));
        assert!(upload(day, None).retention_due(), "a single node always");
        assert!(
            !upload(None, None).retention_due(),
            "no retention configured"
        );
        let held = Arc::new(AtomicBool::new(false));
        let c = upload(day, Some(held.clone()));
        assert!(!c.retention_due(), "another node holds the lease");
        held.store(true, Ordering::Relaxed);
        assert!(c.retention_due(), "this node took the lease");
        held.store(false, Ordering::Relaxed);
        assert!(!c.retention_due(), "the lease was lost");
    }

    #[test]
    fn a_row_lagging_its_predecessor_by_queueing_is_moved_up_and_a_clock_step_is_kept() {
        let t = |us: i64| DateTime::from_timestamp_micros(1_800_000_000_000_000 + us).unwrap();
        assert_eq!(monotone_time(None, t(0)), t(0));
        assert_eq!(monotone_time(Some(t(0)), t(5)), t(5), "forwards: as it is");
        assert_eq!(
            monotone_time(Some(t(900_000)), t(0)),
            t(900_000),
            "queued behind"
        );
        assert_eq!(
            monotone_time(Some(t(REORDER_WINDOW_US)), t(0)),
            t(REORDER_WINDOW_US)
        );
        assert_eq!(
            monotone_time(Some(t(REORDER_WINDOW_US + 1)), t(0)),
            t(0),
            "a clock step stays visible"
        );
    }
}
