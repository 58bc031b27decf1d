//! `GET /metrics` on the `[http]` listener (no credentials; aggregate numbers only, no
//! user names), in the OpenMetrics text format Prometheus scrapes, encoded by
//! `prometheus-client`.
//!
//! The packet loop owns its counters as plain integers; about every 200 ms it sends a
//! [`Snapshot`] over the status channel, the control plane keeps the latest here, and a
//! scrape encodes it. The four latency histograms (first-packet decision, revocation,
//! audit commit, upload batch) travel in the snapshot as bucket counts
//! ([`portcullis_model::latency`]) and are encoded as Prometheus histograms.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use portcullis_control::Snapshot;
use portcullis_model::latency::{upper_bound_secs, Latency, FINITE_BUCKETS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The registry and the loop's latest numbers.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    snapshot: Arc<Mutex<Snapshot>>,
    /// `(when, flows opened, denied)` over the last [`RATE_WINDOW`], for the console's
    /// live rates.
    history: Mutex<VecDeque<(Instant, u64, u64)>>,
}

/// How far back the live rates look.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Live rates from the loop's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    /// New flows per second over the last 10 s.
    pub flows_per_sec: f64,
    /// Denied packets per minute over the last minute.
    pub denies_per_min: f64,
}

#[derive(Debug)]
struct Published(Arc<Mutex<Snapshot>>);

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        let mut registry = Registry::with_prefix("portcullis");
        registry.register_collector(Box::new(Published(snapshot.clone())));
        Arc::new(Metrics {
            registry,
            snapshot,
            history: Mutex::new(VecDeque::new()),
        })
    }

    /// The packet loop's numbers now.
    pub fn publish(&self, s: Snapshot) {
        let now = Instant::now();
        if let Ok(mut h) = self.history.lock() {
            h.push_back((now, s.enforce.flows_opened, s.enforce.denied));
            while h
                .front()
                .is_some_and(|(t, _, _)| now.duration_since(*t) > RATE_WINDOW)
            {
                h.pop_front();
            }
        }
        if let Ok(mut slot) = self.snapshot.lock() {
            *slot = s;
        }
    }

    /// The latest numbers.
    pub fn latest(&self) -> Snapshot {
        self.snapshot.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The rates over the recent history (zero until there are two samples).
    pub fn rates(&self) -> Rates {
        let Ok(h) = self.history.lock() else {
            return Rates::default();
        };
        let Some(&(now, opened, denied)) = h.back() else {
            return Rates::default();
        };
        let since = |window: Duration| {
            h.iter()
                .find(|(t, _, _)| now.duration_since(*t) <= window)
                .copied()
        };
        let per = |then: Option<(Instant, u64, u64)>,
                   pick: fn(&(Instant, u64, u64)) -> u64,
                   unit: f64| {
            match then {
                Some(t) if now > t.0 => {
                    let secs = now.duration_since(t.0).as_secs_f64();
                    pick(&(now, opened, denied)).saturating_sub(pick(&t)) as f64 / secs * unit
                }
                _ => 0.0,
            }
        };
        Rates {
            flows_per_sec: per(since(Duration::from_secs(10)), |s| s.1, 1.0),
            denies_per_min: per(since(RATE_WINDOW), |s| s.2, 60.0),
        }
    }

    /// The text a scrape gets.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// A histogram whose counts were taken elsewhere (the loop's snapshot).
#[derive(Debug)]
struct ConstHistogram(Latency);

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let l = &self.0;
        // The last count is the +Inf bucket.
        let buckets: Vec<(f64, u64)> = l
            .counts
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let bound = if k < FINITE_BUCKETS {
                    upper_bound_secs(k)
                } else {
                    f64::INFINITY
                };
                (bound, *c)
            })
            .collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            l.sum_nanos as f64 / 1e9,
            l.count(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Collector for Published {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = match self.0.lock() {
            Ok(s) => s.clone(),
            Err(_) => return Ok(()),
        };
        let e = s.enforce;
        let w = s.wireguard;
        let d = s.datapath;
        let counters: [(&str, &str, u64); 33] = [
            (
                "forwarded_out_packets",
                "packets forwarded from devices to the networks",
                e.forwarded_out,
            ),
            (
                "forwarded_in_packets",
                "packets forwarded from the networks to devices",
                e.forwarded_in,
            ),
            (
                "denied_packets",
                "packets of denied flows dropped",
                e.denied,
            ),
            (
                "spoofed_packets",
                "packets with a source other than the device's address",
                e.spoofed,
            ),
            (
                "malformed_packets",
                "decrypted packets that did not parse",
                e.malformed,
            ),
            (
                "fragments_dropped",
                "fragments without their first fragment",
                e.fragments_dropped,
            ),
            (
                "inbound_no_flow_packets",
                "packets from the networks matching no flow",
                e.inbound_no_flow,
            ),
            (
                "inbound_multicast_packets",
                "multicast from the private side",
                e.inbound_multicast,
            ),
            (
                "decisions",
                "new flows decided by the policies",
                e.decisions,
            ),
            (
                "policy_errors",
                "decisions in which a policy errored (a forbid that errors denies)",
                e.policy_errors,
            ),
            ("flows_opened", "flows allowed and opened", e.flows_opened),
            ("flows_closed", "flows closed", e.flows_closed),
            (
                "flows_evicted",
                "flows evicted from a full table",
                e.flows_evicted,
            ),
            (
                "flows_revoked",
                "flows cut by a policy or identity change",
                e.flows_revoked,
            ),
            ("wg_datagrams", "udp datagrams received", w.datagrams),
            (
                "wg_malformed_datagrams",
                "datagrams that are not wireguard",
                w.malformed_datagrams,
            ),
            (
                "wg_unknown_peer",
                "datagrams from no configured device",
                w.unknown_peer,
            ),
            ("wg_errors", "wireguard decapsulation errors", w.wg_errors),
            (
                "wg_cookie_replies",
                "cookie replies sent under handshake load",
                w.cookie_replies,
            ),
            ("wg_handshakes", "completed handshakes", w.handshakes),
            (
                "wg_resume_handshakes",
                "handshakes this node initiated to take over another node's session",
                w.resume_handshakes,
            ),
            (
                "wg_resume_limited",
                "takeover handshakes not sent (per-device interval or the node's budget)",
                w.resume_limited,
            ),
            (
                "wg_inactive_peer",
                "datagrams from a device whose user is unknown or revoked",
                w.inactive_peer,
            ),
            ("udp_batches", "udp receive batches", d.udp_batches),
            ("udp_sends", "udp send calls", d.udp_sends),
            ("tun_reads", "tun reads", d.tun_reads),
            ("tun_writes", "tun writes", d.tun_writes),
            ("send_errors", "udp or tun send errors", d.send_errors),
            (
                "audit_written",
                "audit events durable in the spool or events file",
                s.audit_written,
            ),
            (
                "audit_refused",
                "audit events that could not be written",
                s.audit_refused,
            ),
            (
                "audit_uploaded",
                "audit events uploaded to clickhouse",
                s.audit_uploaded,
            ),
            (
                "audit_upload_batches",
                "uploads to clickhouse",
                s.audit_upload_batches,
            ),
            (
                "audit_upload_errors",
                "failed uploads to clickhouse",
                s.audit_upload_errors,
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let gauges: [(&str, &str, u64); 7] = [
            ("sessions", "live sessions", s.sessions),
            ("flows", "flows in the flow table", s.flows),
            ("peers", "configured devices", s.peers),
            (
                "audit_backlog",
                "audit events not yet in clickhouse",
                s.audit_backlog,
            ),
            (
                "audit_upload_lag_milliseconds",
                "age of the oldest event not yet in clickhouse",
                s.audit_lag_ms,
            ),
            (
                "audit_spool_bytes",
                "bytes in the audit spool",
                s.audit_spool_bytes,
            ),
            (
                "wg_datagrams_per_batch_x1000",
                "average datagrams per receive batch, times 1000",
                d.udp_datagrams.saturating_mul(1000) / d.udp_batches.max(1),
            ),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let histograms = [
            (
                "decision_latency_seconds",
                "first-packet policy decisions of new flows",
                e.decision_latency,
            ),
            (
                "revocation_latency_seconds",
                "user revocations, request arrival to every session and flow cut",
                s.revocation_latency,
            ),
            (
                "audit_commit_latency_seconds",
                "audit spool commits (write and fsync of a batch)",
                s.audit_commit_latency,
            ),
            (
                "audit_upload_latency_seconds",
                "audit batches inserted into clickhouse (send to acknowledgement)",
                s.upload_latency,
            ),
        ];
        for (name, help, l) in histograms {
            let h = ConstHistogram(l);
            h.encode(encoder.encode_descriptor(name, help, None, h.metric_type())?)?;
        }
        Ok(())
    }
}

/// `GET /metrics`.
pub fn routes(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

async fn scrape(State(m): State<Arc<Metrics>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series the Prometheus dashboard queries is one this endpoint exports.
    #[test]
    fn the_dashboard_queries_only_exported_series() {
        let text = Metrics::new().encode();
        let exported: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split([' ', '{']).next())
            .collect();
        let dashboard: serde_json::Value = serde_json::from_str(include_str!(
            "../../../dashboards/portcullis-gateway-metrics.json"
        ))
        .unwrap_or_default();
        let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
        assert!(panels.len() >= 10);
        for p in panels {
            let expr = p["targets"][0]["expr"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("portcullis_"))
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for n in names {
                assert!(
                    exported.contains(n),
                    "{n} (in {:?}) is not exported",
                    p["title"]
                );
            }
        }
    }

    #[test]
    fn the_snapshot_is_what_a_scrape_reads() {
        let m = Metrics::new();
        let mut s = Snapshot::default();
        s.enforce.decisions = 7;
        s.flows = 3;
        s.revocation_latency
            .observe(std::time::Duration::from_millis(2));
        s.enforce
            .decision_latency
            .observe(std::time::Duration::from_micros(3));
        m.publish(s);
        let text = m.encode();
        assert!(text.contains("portcullis_decisions_total 7"), "{text}");
        assert!(text.contains("portcullis_flows 3"), "{text}");
        assert!(
            text.contains("portcullis_revocation_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_decision_latency_seconds_bucket{le=\"0.000004\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_revocation_latency_seconds_bucket{le=\"0.001024\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_revocation_latency_seconds_bucket{le=\"+Inf\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_audit_commit_latency_seconds_count 0"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
