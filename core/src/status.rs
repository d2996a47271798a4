//! Periodic status reports: what the CLI prints as `[STATUS]`.

use crate::affinity::RoutingStats;
use crate::backend::BackendView;
use crate::queue::QueueStats;

/// With more healthy backends than this, [`StatusReport::loads`] keeps only the first and
/// last [`LOADS_KEPT_EACH_END`].
pub const LOADS_ELIDE_ABOVE: usize = 30;
/// How many loads are kept at each end when eliding.
pub const LOADS_KEPT_EACH_END: usize = 15;

/// One status report, emitted every status interval.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusReport {
    /// Requests in flight to healthy backends.
    pub in_flight: u64,
    /// Healthy backends (draining ones excluded).
    pub healthy: usize,
    /// Backends in the pool.
    pub total: usize,
    /// In flight per healthy backend, largest first; with more than
    /// [`LOADS_ELIDE_ABOVE`] healthy backends, the first and last [`LOADS_KEPT_EACH_END`].
    pub loads: Vec<u32>,
    /// How many loads were left out of `loads` (0 when none).
    pub elided: usize,
    /// Every backend, in slot order (for verbose output).
    pub backends: Vec<BackendView>,
    /// Cache-aware routing counters since the previous report, under
    /// [`Policy::CacheAware`](crate::Policy::CacheAware) only; printed as
    /// `Affinity: warm 82% cold 15% ovfl 3% (120 reqs, 5731 keys)` (its `Display`).
    pub routing: Option<RoutingStats>,
    /// Admission queue counters since the previous report, when the queue is on.
    pub queue: Option<QueueStats>,
}

impl StatusReport {
    pub(crate) fn new(backends: Vec<BackendView>) -> Self {
        let healthy: Vec<&BackendView> = backends
            .iter()
            .filter(|b| b.healthy && !b.draining)
            .collect();
        let in_flight = healthy.iter().map(|b| u64::from(b.in_flight)).sum();
        let mut loads: Vec<u32> = healthy.iter().map(|b| b.in_flight).collect();
        loads.sort_unstable_by(|a, b| b.cmp(a));
        let mut elided = 0;
        if loads.len() > LOADS_ELIDE_ABOVE {
            elided = loads.len() - 2 * LOADS_KEPT_EACH_END;
            loads.drain(LOADS_KEPT_EACH_END..loads.len() - LOADS_KEPT_EACH_END);
        }
        StatusReport {
            in_flight,
            healthy: healthy.len(),
            total: backends.len(),
            loads,
            elided,
            backends,
            routing: None,
            queue: None,
        }
    }
}

/// Counts for `/health`: cheap to compute on every call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Summary {
    /// Healthy backends (draining ones excluded).
    pub healthy: usize,
    /// Backends in the pool.
    pub total: usize,
    /// Leases not yet released, on any backend (removed ones included).
    pub in_flight: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendId;

    fn view(slot: u32, in_flight: u32, healthy: bool) -> BackendView {
        BackendView {
            id: BackendId { slot, gen: 0 },
            url: format!("http://b{slot}").into(),
            weight: 1,
            max_conns: 0,
            in_flight,
            healthy,
            proven: true,
            draining: false,
            parked: false,
            epoch: 0,
            engine: None,
            models: None,
        }
    }

    #[test]
    fn sorted_descending_over_healthy_only() {
        let r = StatusReport::new(vec![view(0, 3, true), view(1, 9, false), view(2, 5, true)]);
        assert_eq!(r.loads, vec![5, 3]);
        assert_eq!((r.in_flight, r.healthy, r.total, r.elided), (8, 2, 3, 0));
    }

    #[test]
    fn elides_the_middle_above_thirty() {
        let r = StatusReport::new((0..40).map(|i| view(i, i, true)).collect());
        assert_eq!(r.loads.len(), 30);
        assert_eq!(r.elided, 10);
        assert_eq!(r.loads[0], 39);
        assert_eq!(r.loads[14], 25);
        assert_eq!(r.loads[15], 14);
        assert_eq!(r.loads[29], 0);
        let r = StatusReport::new((0..30).map(|i| view(i, i, true)).collect());
        assert_eq!((r.loads.len(), r.elided), (30, 0));
    }
}
