//! The cache-aware pick: the routing rule of [`crate::affinity`] applied to the pool, and
//! the counters of how it went.

use std::time::{Duration, Instant};

use rand::Rng;

use super::table::{Owner, Table};
use super::{AffinityConfig, RoutingStats, UNCAPPED_CONNS};
use crate::backend::Backend;
use crate::policy::{LeastLoaded, Selector};

/// Cache-aware routing state: the affinity table and the routing counters.
#[derive(Debug)]
pub(crate) struct CacheAware {
    table: Table,
    /// Counters since the start (`keys` is filled in when read).
    stats: RoutingStats,
    /// The counters at the last status report.
    reported: RoutingStats,
}

/// How one pick went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Warm,
    Cold,
    Overflow,
}

/// A depth from the table (1-based units), as the lease reports it.
fn depth(d: Option<usize>) -> u32 {
    d.map_or(0, |d| u32::try_from(d).unwrap_or(u32::MAX))
}

impl CacheAware {
    /// An empty table whose hasher is keyed with `secret`.
    pub(crate) fn new(secret: u64) -> Self {
        CacheAware {
            table: Table::new(secret),
            stats: RoutingStats::default(),
            reported: RoutingStats::default(),
        }
    }

    /// Counters since the start, with the table's size now.
    pub(crate) fn stats(&self) -> RoutingStats {
        RoutingStats {
            keys: self.table.len(),
            ..self.stats
        }
    }

    /// Counters since the previous report, for the next one.
    pub(crate) fn report(&mut self) -> RoutingStats {
        let total = self.stats();
        let since = total.since(&self.reported);
        self.reported = total;
        since
    }

    /// Reclaims the entries of backends no longer ready and those idle for `ttl`.
    pub(crate) fn sweep(&mut self, now: Instant, ttl: Duration, slots: &[Option<Backend>]) {
        self.table.sweep(now, ttl, |s| ready_owner(slots, s));
    }

    /// Picks a slot for a request with chain `units`: a backend holding the longest known
    /// prefix unless load says otherwise (see [`crate::affinity`] for the rule); then
    /// records the chain on the pick. `None` when no ready backend is below its cap.
    /// With the slot comes how the pick went.
    pub(crate) fn pick<R: Rng>(
        &mut self,
        now: Instant,
        units: &[u64],
        config: &AffinityConfig,
        slots: &[Option<Backend>],
        selector: &mut Selector,
        rng: &mut R,
    ) -> Option<(u32, crate::lease::Route)> {
        let all_holders = config.all_holders;
        if selector.ready(slots).is_empty() {
            return None;
        }
        let mut held = 0;
        let (slot, route) = if units.is_empty() {
            (selector.least_conn(slots, rng), Route::Cold)
        } else {
            let min = selector.min_load(slots);
            let proven_only = selector.proven_only(slots);
            let allowed = |s: u32| {
                let b = slots[s as usize]
                    .as_ref()
                    .expect("live nodes are on present backends");
                let serves = !proven_only || b.health.is_proven();
                (serves && within_guard(b, min, config.overflow_percent)).then_some(b)
            };
            // One holder per unit: the deepest one, allowed or not; with all holders, the
            // least loaded of the allowed ones.
            let mut deepest_holder: Option<u32> = None;
            let mut pick = LeastLoaded::default();
            let (deepest, accepted) = self.table.lookup(
                now,
                config.ttl,
                units,
                |s| ready_owner(slots, s),
                |s| {
                    if !all_holders {
                        deepest_holder = Some(s);
                        return true;
                    }
                    let Some(b) = allowed(s) else {
                        return false;
                    };
                    pick.offer(s, b, slots, rng);
                    true
                },
            );
            let best = if all_holders {
                pick.best
            } else {
                deepest_holder.filter(|&s| allowed(s).is_some())
            };
            match (deepest, accepted, best) {
                (None, _, _) => (selector.least_conn(slots, rng), Route::Cold),
                (Some(d), Some(a), Some(s)) if a == d => {
                    held = depth(Some(a));
                    (Some(s), Route::Warm)
                }
                (Some(_), Some(a), Some(s)) => {
                    held = depth(Some(a));
                    (Some(s), Route::Overflow)
                }
                (Some(_), _, _) => (selector.least_conn(slots, rng), Route::Overflow),
            }
        };
        let slot = slot?;
        let r = &mut self.stats;
        r.requests += 1;
        match route {
            Route::Warm => r.warm += 1,
            Route::Cold => r.cold += 1,
            Route::Overflow => r.overflow += 1,
        }
        let reported = match route {
            Route::Warm => crate::lease::Route::Hit { depth: held },
            Route::Cold => crate::lease::Route::Miss,
            Route::Overflow => crate::lease::Route::Overflow { depth: held },
        };
        if units.is_empty() {
            r.unkeyed += 1;
        } else {
            let b = slots[slot as usize]
                .as_ref()
                .expect("picked slots are present");
            let cap = conns(b) as usize * config.entries_per_conn as usize;
            self.table.record(
                now,
                units,
                slot,
                (b.id, b.health.epoch()),
                cap,
                !all_holders,
            );
        }
        Some((slot, reported))
    }
}

/// The backend in `slot` and its epoch, if it is ready (healthy, not draining): the owner
/// its affinity entries must match to be live.
fn ready_owner(slots: &[Option<Backend>], slot: u32) -> Option<Owner> {
    slots
        .get(slot as usize)?
        .as_ref()
        .filter(|b| b.health.is_healthy() && !b.draining)
        .map(|b| (b.id, b.health.epoch()))
}

/// The load guard: whether `b` may take a request that belongs to it, being below its cap
/// and at most `overflow_percent` of its `max_conns` ahead of `min` (the least-loaded
/// ready backend's effective load, [`Backend::load`]: in flight, or the engine's own
/// queue when it reports more).
fn within_guard(b: &Backend, min: u32, overflow_percent: u32) -> bool {
    let ahead = u64::from(b.load().saturating_sub(min));
    !b.at_cap() && ahead * 100 <= u64::from(overflow_percent) * u64::from(conns(b))
}

/// A backend's `max_conns` for the guard and the table bound.
fn conns(b: &Backend) -> u32 {
    if b.max_conns == 0 {
        UNCAPPED_CONNS
    } else {
        b.max_conns
    }
}
