//! Latency histograms with one fixed bucket layout: upper bounds 1 µs × 2^k for
//! k = 0..=23 (1 µs to ~8.4 s) and +Inf. Plain integers ([`Latency`], `Copy`, for
//! single-threaded owners such as the core) or atomics ([`SharedLatency`], for threads
//! that observe while another reads). `/metrics` encodes them as Prometheus histograms.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Finite buckets; one more counts everything above the last bound.
pub const FINITE_BUCKETS: usize = 24;

/// The bucket an observation of `nanos` falls in (0..=FINITE_BUCKETS).
fn bucket(nanos: u64) -> usize {
    // Bucket k holds (2^(k-1) µs, 2^k µs]; bucket 0 holds ≤ 1 µs.
    let micros = nanos.div_ceil(1_000);
    if micros <= 1 {
        return 0;
    }
    let k = (64 - (micros - 1).leading_zeros()) as usize;
    k.min(FINITE_BUCKETS)
}

/// The upper bound of finite bucket `k`, in seconds.
pub fn upper_bound_secs(k: usize) -> f64 {
    (1u64 << k.min(63)) as f64 / 1_000_000.0
}

/// A histogram's counts (per bucket, not cumulative) and sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    pub counts: [u64; FINITE_BUCKETS + 1],
    pub sum_nanos: u64,
}

impl Latency {
    pub fn observe(&mut self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if let Some(c) = self.counts.get_mut(bucket(nanos)) {
            *c += 1;
        }
        self.sum_nanos = self.sum_nanos.saturating_add(nanos);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(upper bound in seconds, cumulative count)` for each finite bucket, as
    /// Prometheus wants them (the +Inf bucket is [`Latency::count`]).
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        self.counts
            .iter()
            .take(FINITE_BUCKETS)
            .enumerate()
            .map(|(k, c)| {
                total += c;
                (upper_bound_secs(k), total)
            })
            .collect()
    }

    /// The smallest bucket bound below which at least `q` (0..=1) of the observations
    /// fall, in seconds (None: empty, or the quantile is beyond the last bound).
    pub fn quantile_bound_secs(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let want = ((n as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        self.cumulative()
            .into_iter()
            .find(|(_, c)| *c >= want)
            .map(|(b, _)| b)
    }
}

/// [`Latency`] for observers on other threads (relaxed atomics: a reader may see a
/// count without its sum for an instant, which a scrape tolerates).
#[derive(Debug, Default)]
pub struct SharedLatency {
    counts: [AtomicU64; FINITE_BUCKETS + 1],
    sum_nanos: AtomicU64,
}

impl SharedLatency {
    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if let Some(c) = self.counts.get(bucket(nanos)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Latency {
        let mut out = Latency::default();
        for (o, c) in out.counts.iter_mut().zip(&self.counts) {
            *o = c.load(Ordering::Relaxed);
        }
        out.sum_nanos = self.sum_nanos.load(Ordering::Relaxed);
        out
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bounds_are_inclusive_powers_of_two_microseconds() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1_000), 0);
        assert_eq!(bucket(1_001), 1);
        assert_eq!(bucket(2_000), 1);
        assert_eq!(bucket(2_001), 2);
        assert_eq!(bucket(1_000_000), 10); // 1 ms ≤ 1024 µs
        assert_eq!(bucket(u64::MAX), FINITE_BUCKETS);
        assert!((upper_bound_secs(10) - 0.001024).abs() < 1e-12);
    }

    #[test]
    fn quantile_names_the_bucket_holding_it() {
        let mut l = Latency::default();
        for _ in 0..99 {
            l.observe(Duration::from_micros(3));
        }
        l.observe(Duration::from_millis(5));
        assert_eq!(l.count(), 100);
        assert_eq!(l.quantile_bound_secs(0.5), Some(upper_bound_secs(2)));
        assert_eq!(l.quantile_bound_secs(1.0), Some(upper_bound_secs(13)));
        assert_eq!(Latency::default().quantile_bound_secs(0.5), None);
    }

    proptest! {
        #[test]
        fn every_observation_lands_in_the_bucket_that_bounds_it(nanos in any::<u64>()) {
            let k = bucket(nanos);
            let micros = nanos.div_ceil(1_000);
            if k < FINITE_BUCKETS {
                prop_assert!(micros <= 1u64 << k);
                if k > 0 {
                    prop_assert!(micros > 1u64 << (k - 1));
                }
            } else {
                prop_assert!(micros > 1u64 << (FINITE_BUCKETS - 1));
            }
            let shared = SharedLatency::default();
            shared.observe(Duration::from_nanos(nanos));
            let mut plain = Latency::default();
            plain.observe(Duration::from_nanos(nanos));
            prop_assert_eq!(shared.snapshot(), plain);
            prop_assert_eq!(*plain.cumulative().last().unwrap_or(&(0.0, 0)), (upper_bound_secs(FINITE_BUCKETS - 1), u64::from(k < FINITE_BUCKETS)));
        }
    }
}
