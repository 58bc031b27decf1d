//! The gateway's audit pipeline: every event the core emits becomes a durable, hash-chained
//! row in ClickHouse, without the data plane ever waiting.
//!
//! ```text
//! core events ──submit──▶ bounded queue ──▶ writer thread: stamp (uuid, seq), chain,
//!   spool append, commit (fsync policy) ──▶ events file line (= counted as written)
//!                                       └──▶ uploader thread: batch ─▶ ClickHouse ─▶ ack ─▶ trim
//! ```
//!
//! What it does: [`row`] maps events to the flat `events` row, its canonical encoding, the
//! spool record format and the per-gateway hash chain; [`native`] turns spool records into
//! the columnar block the uploader inserts; [`pipeline`] runs the writer and the uploader;
//! [`store`] owns the ClickHouse schema (migrations), inserts, and retention;
//! [`checkpoint`] the signed checkpoints of a chain head (format, Merkle tree, Ed25519)
//! and [`signer`] how the writer makes and keeps them.
//!
//! What it deliberately does not: no queries or chain verification for auditors (the
//! `portcullis-auditor` crate), no policy or packet logic, no fsync tuning of its own (the
//! spool's policy applies).
//!
//! Guarantees: an event counts as written once its line is in the events file (the spool
//! commit before it made it durable under the fsync policy). Nothing is lost while
//! ClickHouse is down (the spool holds it, up to its cap), and nothing is doubled by a
//! retry: rows are keyed on `(user, time, gateway, seq)` in a `ReplacingMergeTree`, so a
//! batch retried after a crash collapses onto the rows that landed (counting queries read
//! `FINAL`). When events cannot be written the pipeline reports
//! [`pipeline::Pipeline::blocked`] and the gateway fails closed on new flows (configurable).

pub mod checkpoint;
pub mod native;
pub mod pipeline;
pub mod row;
pub mod signer;
pub mod store;

pub use native::NativeBlock;
pub use pipeline::{Pipeline, PipelineConfig, PipelineStats, SpoolSettings, UploadConfig};
pub use row::{AuditRow, Chain, Hash, GENESIS};
pub use signer::CheckpointSettings;
pub use store::{Store, StoreConfig, StoreError, SCHEMA_VERSION};
