//! `GET /metrics` on the `[http]` listener (no credentials; aggregate numbers only, no
//! user names), in the OpenMetrics text format Prometheus scrapes, encoded by
//! `prometheus-client`.
//!
//! The packet loop owns its counters as plain integers; every 200 ms it copies them into
//! a [`Snapshot`] here (a few dozen integers under a mutex the HTTP thread holds only
//! while encoding), and a scrape encodes the latest snapshot. The revocation latency is a
//! histogram the loop observes from each `user_revoked` event.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// What the packet loop publishes.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub enforce: portcullis_core::EnforceStats,
    pub wireguard: portcullis_core::WgStats,
    pub datapath: crate::datapath::DatapathStats,
    pub audit_written: u64,
    pub audit_refused: u64,
    pub audit_uploaded: u64,
    pub audit_upload_batches: u64,
    pub audit_upload_errors: u64,
    pub audit_backlog: u64,
    pub audit_lag_ms: u64,
    pub audit_spool_bytes: u64,
    pub sessions: u64,
    pub flows: u64,
    pub peers: u64,
}

/// The registry and the loop's latest numbers.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    snapshot: Arc<Mutex<Snapshot>>,
    /// Revocations, request arrival → cut applied, in seconds.
    pub revocation_latency: Histogram,
}

#[derive(Debug)]
struct Published(Arc<Mutex<Snapshot>>);

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        let mut registry = Registry::with_prefix("portcullis");
        // 100 µs .. ~3.3 s.
        let revocation_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "revocation_latency_seconds",
            "user revocations, request arrival to every session and flow cut",
            revocation_latency.clone(),
        );
        registry.register_collector(Box::new(Published(snapshot.clone())));
        Arc::new(Metrics {
            registry,
            snapshot,
            revocation_latency,
        })
    }

    /// The packet loop's numbers now.
    pub fn publish(&self, s: Snapshot) {
        if let Ok(mut slot) = self.snapshot.lock() {
            *slot = s;
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

impl Collector for Published {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = match self.0.lock() {
            Ok(s) => s.clone(),
            Err(_) => return Ok(()),
        };
        let e = s.enforce;
        let w = s.wireguard;
        let d = s.datapath;
        let counters: [(&str, &str, u64); 31] = [
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
        m.publish(s);
        m.revocation_latency.observe(0.002);
        let text = m.encode();
        assert!(text.contains("portcullis_decisions_total 7"), "{text}");
        assert!(text.contains("portcullis_flows 3"), "{text}");
        assert!(
            text.contains("portcullis_revocation_latency_seconds_count 1"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
