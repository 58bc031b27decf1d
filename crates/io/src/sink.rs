//! The events file: one [`Envelope`] per line, appended.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use portcullis_model::{Envelope, Event, EVENT_VERSION};

/// Stamps events (UUID, sequence number, time, gateway id) and appends them as JSON lines.
pub struct EventSink {
    path: PathBuf,
    out: BufWriter<File>,
    gateway: String,
    seq: u64,
}

impl EventSink {
    pub fn open(path: &Path, gateway: &str) -> anyhow::Result<EventSink> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening events file {}", path.display()))?;
        Ok(EventSink {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            gateway: gateway.to_string(),
            seq: 0,
        })
    }

    pub fn write(&mut self, event: Event) -> anyhow::Result<()> {
        self.seq += 1;
        let env = Envelope {
            v: EVENT_VERSION,
            id: uuid::Uuid::new_v4(),
            seq: self.seq,
            time: chrono::Utc::now(),
            gateway: self.gateway.clone(),
            event,
        };
        tracing::debug!(kind = env.event.kind(), seq = env.seq, "event");
        serde_json::to_writer(&mut self.out, &env)?;
        self.out
            .write_all(b"\n")
            .with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}
