//! Deadline arithmetic that cannot panic.
//!
//! `Instant + Duration` panics when the sum does not fit ("overflow when adding duration
//! to instant"), and a panic in a request task loses the request. The CLI bounds every
//! duration flag, but whatever a setting holds, a deadline computed with [`deadline`]
//! is a valid instant: exact for any sensible duration, saturated [`FAR`] ahead
//! otherwise.

use std::time::{Duration, Instant};

/// The farthest ahead [`deadline`] puts a deadline: 100 years, "never" for any process.
/// Far below what an [`Instant`] can hold on the platforms `lb` runs on.
pub const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The instant `after` from `now`: `now + after` when `after` is at most [`FAR`], else
/// `now + FAR`. Never panics: should even that not fit in an [`Instant`] (a clock at
/// the end of its range), it is the latest instant reachable by halving the step, and
/// never earlier than `now`.
pub fn deadline(now: Instant, after: Duration) -> Instant {
    let mut step = after.min(FAR);
    loop {
        if let Some(at) = now.checked_add(step) {
            return at;
        }
        // Terminates: the step halves to zero, and `now + 0` always fits.
        step /= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_below_far_saturated_above() {
        let now = Instant::now();
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_secs(4 * 3600),
            Duration::from_secs(30 * 24 * 3600),
            FAR,
        ] {
            assert_eq!(deadline(now, d), now + d, "{d:?}");
        }
        for d in [
            FAR + Duration::from_nanos(1),
            Duration::from_secs(500_000_000_000 * 365 * 24 * 3600),
            Duration::MAX,
        ] {
            assert_eq!(deadline(now, d), now + FAR, "{d:?}");
        }
    }

    #[test]
    fn never_panics_near_the_end_of_the_clock() {
        // An instant near the end of the clock (within a few nanoseconds of it): adding FAR
        // to it overflows, so the helper has to fall back.
        let mut end = Instant::now();
        let mut step = Duration::from_secs(1);
        while let Some(next) = end.checked_add(step) {
            end = next;
            step = step.saturating_mul(2);
        }
        while step > Duration::ZERO {
            if let Some(next) = end.checked_add(step) {
                end = next;
            }
            step /= 2;
        }
        // Near the end, whatever fits: never a panic, never earlier than now.
        let far = deadline(end, Duration::MAX);
        assert!(far >= end && far.checked_add(FAR).is_none());
        assert_eq!(deadline(end, Duration::ZERO), end);
    }
}
