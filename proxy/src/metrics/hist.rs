//! A histogram of durations with fixed buckets: recording is two atomic adds and a
//! search of a constant table; nothing allocates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds: from a quarter of a millisecond (a
/// proxied request on a LAN) to an hour (a long generation), roughly 1-2.5-5 per decade
/// and then the minutes that streams last.
pub(crate) const BOUNDS_US: [u64; 22] = [
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
    600_000_000,
    1_800_000_000,
    3_600_000_000,
];

/// Counts per bucket (the last one past every bound) and the sum, in microseconds.
#[derive(Debug)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    #[inline]
    pub(crate) fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Adds this histogram's counts into `into`.
    pub(crate) fn add_to(&self, into: &mut Sums) {
        for (t, b) in into.buckets.iter_mut().zip(&self.buckets) {
            *t += b.load(Ordering::Relaxed);
        }
        into.sum_us += self.sum_us.load(Ordering::Relaxed);
    }
}

/// A histogram's counts, summed over cells.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sums {
    pub(crate) buckets: [u64; BOUNDS_US.len() + 1],
    pub(crate) sum_us: u64,
}

impl Sums {
    /// Observations in all.
    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The buckets as the encoder takes them: each bucket's own count (the encoder
    /// makes them cumulative), with its upper bound in seconds (`+Inf` last).
    pub(crate) fn per_bucket(&self) -> Vec<(f64, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let bound = BOUNDS_US.get(i).map_or(f64::INFINITY, |&b| b as f64 / 1e6);
                (bound, n)
            })
            .collect()
    }

    /// The sum in seconds.
    pub(crate) fn sum_seconds(&self) -> f64 {
        self.sum_us as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_duration_lands_in_the_first_bucket_that_holds_it() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(250)); // on a bound: that bucket (le)
        h.observe(Duration::from_micros(251));
        h.observe(Duration::from_secs(7200)); // past every bound
        let mut s = Sums::default();
        h.add_to(&mut s);
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets[BOUNDS_US.len()], 1);
        assert_eq!(s.count(), 3);
        let c = s.per_bucket();
        assert_eq!(c[0], (0.00025, 1));
        assert_eq!(c[1], (0.0005, 1));
        assert_eq!(c.last().unwrap().1, 1);
        assert!(c.last().unwrap().0.is_infinite());
        assert_eq!(s.sum_us, 250 + 251 + 7_200_000_000);
    }

    #[test]
    fn bounds_rise() {
        assert!(BOUNDS_US.windows(2).all(|w| w[0] < w[1]));
    }
}
