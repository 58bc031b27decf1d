//! `GET /healthz` and `GET /readyz` on the `[http]` listener, without credentials (load
//! balancers and keepalived's `vrrp_script` ask them).
//!
//! - `/healthz`: 200 while the process answers HTTP at all.
//! - `/readyz`: 200 only when the TUN device is up, the UDP socket is bound, a policy set
//!   is loaded, the audit trail takes events, and the packet loop itself made progress
//!   within the last second; else 503 naming what is not ready. The packet loop sends a
//!   status every 200 ms from its own select loop (the status channel of
//!   `portcullis-control`), and the HTTP listener runs on a thread of its own, so a stuck
//!   data plane fails readiness while HTTP still answers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

/// How stale the packet loop's heartbeat may be.
pub const MAX_BEAT_AGE: Duration = Duration::from_secs(1);

/// What readiness is made of, as the packet loop last reported it.
#[derive(Debug)]
pub struct Health {
    start: Instant,
    /// Milliseconds since `start` at the loop's last beat (0: never).
    beat_ms: AtomicU64,
    pub tun_up: AtomicBool,
    pub udp_bound: AtomicBool,
    pub policy_loaded: AtomicBool,
    pub audit_writable: AtomicBool,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health {
            start: Instant::now(),
            beat_ms: AtomicU64::new(0),
            tun_up: AtomicBool::new(false),
            udp_bound: AtomicBool::new(false),
            policy_loaded: AtomicBool::new(false),
            audit_writable: AtomicBool::new(false),
        })
    }

    /// A status from the packet loop: its readiness, and that it was alive when it sent it.
    pub fn update(&self, at: Instant, ready: portcullis_control::Readiness) {
        let r = Ordering::Relaxed;
        self.tun_up.store(ready.tun_up, r);
        self.udp_bound.store(ready.udp_bound, r);
        self.policy_loaded.store(ready.policy_loaded, r);
        self.audit_writable.store(ready.audit_writable, r);
        self.beat(at);
    }

    /// The packet loop is alive at `now`.
    pub fn beat(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.start).as_millis() as u64;
        self.beat_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// What is not ready at `now` (empty: ready).
    pub fn not_ready(&self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        let r = Ordering::Relaxed;
        for (ok, what) in [
            (self.tun_up.load(r), "tun device not up"),
            (self.udp_bound.load(r), "udp socket not bound"),
            (self.policy_loaded.load(r), "no policy set loaded"),
            (self.audit_writable.load(r), "audit trail not writable"),
        ] {
            if !ok {
                out.push(what.to_string());
            }
        }
        let beat = self.beat_ms.load(r);
        let age = now
            .saturating_duration_since(self.start)
            .saturating_sub(Duration::from_millis(beat));
        if beat == 0 {
            out.push("packet loop has not started".into());
        } else if age > MAX_BEAT_AGE {
            out.push(format!(
                "packet loop made no progress for {} ms",
                age.as_millis()
            ));
        }
        out
    }
}

/// The two routes.
pub fn routes(health: Arc<Health>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .with_state(health)
}

async fn readyz(State(h): State<Arc<Health>>) -> Response {
    let not_ready = h.not_ready(Instant::now());
    if not_ready.is_empty() {
        Json(serde_json::json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "not_ready": not_ready})),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_part_and_a_fresh_heartbeat() {
        let h = Health::new();
        let t = Instant::now();
        assert_eq!(h.not_ready(t).len(), 5);
        for flag in [&h.tun_up, &h.udp_bound, &h.policy_loaded, &h.audit_writable] {
            flag.store(true, Ordering::Relaxed);
        }
        h.beat(t);
        assert!(h.not_ready(t + Duration::from_millis(900)).is_empty());
        let stale = h.not_ready(t + Duration::from_millis(1500));
        assert!(
            stale.len() == 1 && stale[0].contains("no progress"),
            "{stale:?}"
        );
        h.audit_writable.store(false, Ordering::Relaxed);
        h.beat(t + Duration::from_millis(1500));
        assert_eq!(
            h.not_ready(t + Duration::from_millis(1600)),
            vec!["audit trail not writable".to_string()]
        );
    }
}
