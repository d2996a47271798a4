//! Engine load signals: what an inference engine (vLLM, SGLang) says about its own load,
//! and how the balancer uses it.
//!
//! The adapter polls each backend's metrics and hands the figures in with
//! [`Balancer::load_report`](crate::Balancer::load_report). A report counts for
//! [`EngineLoadConfig::stale_after`] (three poll intervals); an older one is ignored, as
//! is a backend that never reported: it behaves exactly as without engine signals.
//!
//! # The effective load
//!
//! ```text
//! load(b) = max(in_flight(b), running(b) + waiting(b) + in_flight(b) - in_flight_then(b))
//!           (fresh report; else in_flight; in_flight_then: in_flight when it came)
//! ```
//!
//! `in_flight` is what this `lb` has sent and not yet seen answered; `running + waiting`
//! is what the engine holds, from every client and every `lb` replica. Each alone is
//! wrong in a common case: with several replicas (or clients that reach the engine
//! directly) `in_flight` sees only a share of the load; a report is up to one poll
//! interval old, so right after a burst `running + waiting` has not yet counted the
//! requests this `lb` just sent. So the report is brought forward by what this `lb`
//! sent (or saw finish) since it came: without that, every `lb` replica reading the same
//! report sends all its requests to the one engine that reported least until the next
//! report (herding; `simulate_prefix` showed least-conn's p99 time to first token
//! doubling at 2 to 8 replicas). Both figures are lower bounds of the true queue, so the
//! larger is the better estimate; the sum would count this `lb`'s requests twice once
//! the engine reports them. p2c ranks by `load / weight`; cache-aware's overflow guard
//! compares it with the least-loaded backend's; consistent hashing (and its bounded-load
//! walk) reads the same figure, through `Backend::load`. least-conn, which sends to the
//! minimum, ranks by the estimate below instead.
//!
//! # Ranking with several replicas (least-conn)
//!
//! The effective load above is the right figure for one `lb`, and for every use that
//! compares a backend with a bound (cache-aware's guard, the bounded-load walk). But
//! least-conn sends each request to the *minimum*, and several `lb` replicas reading the
//! same report agree on the minimum: each counts its own sends since the report, none
//! sees the others', so all of them herd onto the engine that reported least until the
//! next report (`simulate_prefix`: p99 time to first token 1.97 s at 4 replicas against
//! 1.26 s at one). So while some backend has a fresh report, least-conn ranks by
//!
//! ```text
//! own + shrink(foreign - mean foreign) / R + (R - 1) (own - own_then)
//! shrink(d) = sign(d) max(0, |d| - √(mean foreign))
//! ```
//!
//! (relative to weight; ties uniformly at random; a backend without a fresh report
//! ranks by `own`, as if it carried the mean foreign load), where `own` is in flight
//! through this `lb`, `own_then` that when the report came, `foreign = max(0, running +
//! waiting - own_then)` what the engine holds for others, and `R = Σ (running + waiting)
//! / Σ own_then` over the fresh backends (clamped to 1 to 16; 1 when this `lb` had
//! nothing in flight at the reports): how many balancers' worth of load
//! the engines carry for one of this `lb`'s, R replicas when they share the traffic.
//!
//! - `own` is exact and fresh, and each replica's differs: it keeps the replicas' choices
//!   apart, as without signals.
//! - The *others' deviation* from the mean is what the report adds. Another replica's
//!   share of it is that replica's own imbalance, which it corrects itself; every replica
//!   acting on all of it at once is the herd. So each takes `1/R` of it (R balancers share
//!   the correction), and none of the part within one Poisson standard deviation of the
//!   mean (`√(mean foreign)`), the churn the other replicas' own balancing makes. A
//!   large, lasting deviation, load that no `lb` placed (clients reaching the engine
//!   directly, a slow engine holding its requests), still steers requests away, by
//!   `1/R` of what exceeds the band; the saturation skip handles an engine that queues.
//! - *Sent since the report* counts `R` times: each other replica, reading the same
//!   report, likely sent what this one did.
//!
//! With one `lb` and no other client, `R = 1` and `mean foreign` is 0: the rank is
//! `own`, least-conn as without signals, save for the engine's lag in counting
//! finished requests. In the simulator (8 engines, 500 ms polls, 50 ms old) this brings
//! least-conn's p99 time to first token at 4 replicas to within 10% of one replica's.
//! Without a fresh report anywhere least-conn is exactly as without engine signals
//! (same picks, same random draws); p2c, cache-aware and prefix-hash keep using the
//! effective load.
//!
//! # Saturation
//!
//! A backend whose fresh report shows `waiting > saturation_waiting` or KV cache usage
//! above `saturation_kv` is saturated: the engine is queueing, and a new request would
//! wait there however the policy ranks it. Saturated backends get no new request while
//! an unsaturated one can take it; when every backend that can take it is saturated,
//! the policy picks among them as usual, so the skip never turns a request away.
//!
//! `max_conns` still counts only this `lb`'s own requests: engine figures change the
//! ranking and the saturation skip, never the cap, so the cap stays exact.

use std::time::{Duration, Instant};

/// What an engine's metrics said about its load at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LoadReport {
    /// Requests the engine is decoding now.
    pub running: u32,
    /// Requests queued in the engine.
    pub waiting: u32,
    /// KV cache usage in parts per million (`1_000_000` = full); `None` when the engine
    /// did not say.
    pub kv_ppm: Option<u32>,
}

/// Parts per million of a whole.
pub const PPM: u32 = 1_000_000;

impl LoadReport {
    /// `running` and `waiting`, no KV figure.
    pub fn new(running: u32, waiting: u32) -> Self {
        LoadReport {
            running,
            waiting,
            kv_ppm: None,
        }
    }

    /// With KV cache usage `fraction` (`0.0..=1.0`; clamped, NaN means none).
    pub fn with_kv_usage(mut self, fraction: f64) -> Self {
        self.kv_ppm = (!fraction.is_nan())
            .then(|| (fraction.clamp(0.0, 1.0) * f64::from(PPM)).round() as u32);
        self
    }

    /// KV cache usage as a fraction, `0.0..=1.0`.
    pub fn kv_usage(&self) -> Option<f64> {
        self.kv_ppm.map(|p| f64::from(p) / f64::from(PPM))
    }

    /// `running + waiting` (saturating): the engine's share of the effective load.
    pub fn queued(&self) -> u32 {
        self.running.saturating_add(self.waiting)
    }
}

/// A report and when it arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EngineReport {
    /// When [`Balancer::load_report`](crate::Balancer::load_report) received it.
    pub at: Instant,
    /// The figures.
    pub report: LoadReport,
}

/// How engine reports are used (`--load-interval`, `--saturation-waiting`,
/// `--saturation-kv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineLoadConfig {
    /// Time between polls of a backend's metrics.
    pub interval: Duration,
    /// A backend with more waiting requests than this is saturated.
    pub saturation_waiting: u32,
    /// A backend with KV cache usage above this (parts per million) is saturated.
    pub saturation_kv_ppm: u32,
}

/// How many poll intervals a report counts for.
pub const STALE_AFTER_INTERVALS: u32 = 3;

impl Default for EngineLoadConfig {
    fn default() -> Self {
        EngineLoadConfig {
            interval: Duration::from_millis(500),
            saturation_waiting: 5,
            saturation_kv_ppm: 950_000,
        }
    }
}

impl EngineLoadConfig {
    /// How long a report counts: [`STALE_AFTER_INTERVALS`] intervals.
    pub fn stale_after(&self) -> Duration {
        self.interval.saturating_mul(STALE_AFTER_INTERVALS)
    }

    /// Whether a report received at `at` still counts at `now` (it is not older than
    /// [`stale_after`](Self::stale_after)).
    pub fn is_fresh(&self, at: Instant, now: Instant) -> bool {
        now.saturating_duration_since(at) <= self.stale_after()
    }

    /// Whether `report` says the engine is saturated.
    pub fn is_saturated(&self, report: &LoadReport) -> bool {
        report.waiting > self.saturation_waiting
            || report.kv_ppm.is_some_and(|k| k > self.saturation_kv_ppm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_fractions_round_trip_and_clamp() {
        let r = LoadReport::new(1, 2).with_kv_usage(0.25);
        assert_eq!(r.kv_ppm, Some(250_000));
        assert_eq!(r.kv_usage(), Some(0.25));
        assert_eq!(LoadReport::new(0, 0).with_kv_usage(7.0).kv_ppm, Some(PPM));
        assert_eq!(LoadReport::new(0, 0).with_kv_usage(-1.0).kv_ppm, Some(0));
        assert_eq!(LoadReport::new(0, 0).with_kv_usage(f64::NAN).kv_ppm, None);
        assert_eq!(LoadReport::new(u32::MAX, 9).queued(), u32::MAX);
    }

    #[test]
    fn saturation_and_staleness_thresholds() {
        let c = EngineLoadConfig::default();
        assert!(!c.is_saturated(&LoadReport::new(100, 5).with_kv_usage(0.95)));
        assert!(c.is_saturated(&LoadReport::new(0, 6)));
        assert!(c.is_saturated(&LoadReport::new(0, 0).with_kv_usage(0.951)));
        let t = Instant::now();
        assert!(c.is_fresh(t, t + Duration::from_millis(1500)));
        assert!(!c.is_fresh(t, t + Duration::from_millis(1501)));
        assert!(
            c.is_fresh(t + Duration::from_secs(1), t),
            "a clock step back"
        );
    }
}
