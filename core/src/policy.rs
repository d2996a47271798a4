//! Balancing policies: which eligible backend serves the next request.
//!
//! The [`Selector`] keeps, per pool membership, the list of selectable backends (healthy,
//! not draining) and the tables weighted policies need. Membership changes mark it stale;
//! the next pick rebuilds it. A pick never allocates.

use std::fmt;
use std::str::FromStr;

use rand::Rng;

use crate::backend::Backend;
use crate::hash;
use crate::lease::Route;

/// A balancing policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Strict rotation over healthy backends.
    RoundRobin,
    /// nginx's smooth weighted round robin.
    WeightedRoundRobin,
    /// Least loaded relative to weight; ties broken uniformly at random. The load is the
    /// number in flight; while some backend has a fresh engine report, the replica-aware
    /// rank of [`crate::engine`] ("Ranking with several replicas"), which keeps several
    /// `lb` replicas from herding onto the engine that reported least.
    LeastConn,
    /// Uniform at random, weighted by weight.
    Random,
    /// Client IP (or the request's key) → backend by weighted rendezvous hashing.
    IpHash,
    /// Power of two choices: two distinct backends at random, the less loaded (effective
    /// load relative to weight, as least-conn) wins.
    P2c,
    /// LLM prefix-cache affinity: the least-loaded backend that served the request's
    /// longest known prompt prefix, unless every such backend is full or too far ahead of
    /// the least-loaded one; then a holder of a shorter prefix, or least connections. See
    /// [`crate::affinity`].
    CacheAware,
    /// Session affinity: the request's key (a header, the OpenAI `user` field, else the
    /// client IP) → backend by weighted rendezvous hashing, like [`Policy::IpHash`]: only
    /// the keys of a backend that leaves move. A key whose backend is full goes to its
    /// runner-up.
    ConsistentHash,
    /// Replica-consistent prefix affinity, with no table: the chain hash of the request's
    /// first [`PrefixHashConfig::units`](crate::PrefixHashConfig::units) prompt units (else
    /// its `user` field, else the client IP) ranks the backends by weighted rendezvous
    /// hashing, and the first in that order whose load is at most
    /// [`PrefixHashConfig::balance_factor`](crate::PrefixHashConfig::balance_factor) times
    /// the average takes it (consistent hashing with bounded loads). Deterministic: two
    /// balancers with the same settings, healthy set and loads pick the same backend.
    PrefixHash,
}

impl Policy {
    /// Every policy with its CLI name, in the order the help text lists them.
    pub const ALL: [Policy; 9] = [
        Policy::LeastConn,
        Policy::RoundRobin,
        Policy::WeightedRoundRobin,
        Policy::Random,
        Policy::IpHash,
        Policy::P2c,
        Policy::CacheAware,
        Policy::ConsistentHash,
        Policy::PrefixHash,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::WeightedRoundRobin => "weighted-round-robin",
            Policy::LeastConn => "least-conn",
            Policy::Random => "random",
            Policy::IpHash => "ip-hash",
            Policy::P2c => "p2c",
            Policy::CacheAware => "cache-aware",
            Policy::ConsistentHash => "consistent-hash",
            Policy::PrefixHash => "prefix-hash",
        }
    }

    /// All accepted names, aliases included, comma-separated (for error messages).
    pub fn names() -> String {
        let mut names: Vec<&str> = Policy::ALL.iter().map(|p| p.name()).collect();
        names.push("random-two-least");
        names.join(", ")
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown policy name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownPolicy(pub String);

impl fmt::Display for UnknownPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown routing policy '{}' (valid: {})",
            self.0,
            Policy::names()
        )
    }
}

impl std::error::Error for UnknownPolicy {}

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "round-robin" | "rr" => Policy::RoundRobin,
            "weighted-round-robin" | "wrr" => Policy::WeightedRoundRobin,
            "least-conn" | "least-connections" => Policy::LeastConn,
            "random" => Policy::Random,
            "ip-hash" => Policy::IpHash,
            "p2c" | "random-two-least" => Policy::P2c,
            "cache-aware" => Policy::CacheAware,
            "consistent-hash" => Policy::ConsistentHash,
            "prefix-hash" => Policy::PrefixHash,
            other => return Err(UnknownPolicy(other.to_string())),
        })
    }
}

/// Above this many steps (sum of reduced weights × backends) the smooth WRR schedule is not
/// precomputed and each pick runs nginx's algorithm over the backends directly.
const MAX_SCHEDULE_WORK: usize = 1 << 24;

/// Selection state derived from the pool's membership.
#[derive(Debug, Default)]
pub(crate) struct Selector {
    stale: bool,
    /// Slots of selectable backends (healthy, not draining, and proven if any is),
    /// ascending.
    ready: Vec<u32>,
    /// Whether some ready backend is proven by a probe (then only proven ones are ready).
    proven_only: bool,
    /// With `proven_only`: the serving backends not yet proven, which take a request
    /// only when every proven one is at its cap (a probe still under way at start must
    /// not turn room into `429`s).
    unproven: Vec<u32>,
    /// Whether every ready backend has the same weight.
    uniform: bool,
    /// Each ready slot repeated weight/gcd times: uniform picks from it are weighted picks.
    expanded: Vec<u32>,
    /// One period of the smooth WRR sequence over `ready`, if small enough to precompute.
    schedule: Vec<u32>,
    /// Live smooth WRR state (current weight per ready index), when `schedule` is empty.
    current: Vec<i64>,
    /// Next position in `ready` (round robin) or `schedule` (smooth WRR).
    cursor: usize,
}

impl Selector {
    pub(crate) fn new() -> Self {
        Selector {
            stale: true,
            ..Selector::default()
        }
    }

    /// Marks the derived state stale (membership, health or weights changed).
    pub(crate) fn invalidate(&mut self) {
        self.stale = true;
    }

    /// Whether only backends proven by a probe serve now (some is): a backend picked by
    /// other means (an affinity holder) must then be proven too.
    pub(crate) fn proven_only(&mut self, slots: &[Option<Backend>]) -> bool {
        self.refresh(slots);
        self.proven_only
    }

    /// Number of selectable backends (after a rebuild).
    pub(crate) fn ready(&mut self, slots: &[Option<Backend>]) -> &[u32] {
        self.refresh(slots);
        &self.ready
    }

    fn refresh(&mut self, slots: &[Option<Backend>]) {
        if !self.stale {
            return;
        }
        self.stale = false;
        self.ready.clear();
        // Backends not yet proven by a probe take traffic only while no proven one is
        // there (at start, before the first probes answer).
        let serving = |b: &&Backend| b.health.is_healthy() && !b.draining;
        let proven = slots
            .iter()
            .flatten()
            .filter(serving)
            .any(|b| b.health.is_proven());
        self.proven_only = proven;
        self.unproven.clear();
        if proven {
            self.unproven.extend(
                slots
                    .iter()
                    .flatten()
                    .filter(serving)
                    .filter(|b| !b.health.is_proven())
                    .map(|b| b.id.slot),
            );
        }
        self.ready.extend(
            slots
                .iter()
                .flatten()
                .filter(serving)
                .filter(|b| !proven || b.health.is_proven())
                .map(|b| b.id.slot),
        );
        let weight = |s: u32| backend(slots, s).weight;
        let g = self.ready.iter().fold(0, |g, &s| gcd(g, weight(s)));
        self.uniform = self.ready.windows(2).all(|w| weight(w[0]) == weight(w[1]));
        self.expanded.clear();
        for &s in &self.ready {
            for _ in 0..weight(s) / g.max(1) {
                self.expanded.push(s);
            }
        }
        self.schedule.clear();
        self.current.clear();
        self.current.resize(self.ready.len(), 0);
        if self.expanded.len().saturating_mul(self.ready.len()) <= MAX_SCHEDULE_WORK {
            let mut current = vec![0i64; self.ready.len()];
            for _ in 0..self.expanded.len() {
                let i = swrr_step(&self.ready, &mut current, slots, |_| true)
                    .expect("the ready set is not empty when expanded is not");
                self.schedule.push(self.ready[i]);
            }
        }
        self.cursor = 0;
    }

    /// Picks a backend slot for `policy`, or `None` when every ready backend is at its cap
    /// (or none is ready: check `ready` first to tell the two apart).
    pub(crate) fn pick<R: Rng>(
        &mut self,
        policy: Policy,
        slots: &[Option<Backend>],
        rng: &mut R,
        key: Option<u64>,
    ) -> Option<(u32, Route)> {
        self.refresh(slots);
        if self.ready.is_empty() {
            return None;
        }
        let plain = |s| (s, Route::Plain);
        match policy {
            Policy::RoundRobin => self.round_robin(slots).map(plain),
            Policy::WeightedRoundRobin => self.smooth_wrr(slots).map(plain),
            Policy::LeastConn => least_conn(&self.ready, slots, rng).map(plain),
            Policy::Random => self.random(slots, rng).map(plain),
            // Hit: the key's own backend; overflow: it was full, the next in the key's
            // ranking took it; miss: no key, least connections.
            Policy::IpHash | Policy::ConsistentHash => match key {
                Some(k) => self.rendezvous(slots, k).map(|(s, first)| {
                    let route = if first {
                        Route::Hit { depth: 0 }
                    } else {
                        Route::Overflow { depth: 0 }
                    };
                    (s, route)
                }),
                None => least_conn(&self.ready, slots, rng).map(|s| (s, Route::Miss)),
            },
            Policy::P2c => self.p2c(slots, rng).map(plain),
            // The balancer routes cache-aware requests itself (with its table), and
            // prefix-hash ones with their settings; a pick without them is least
            // connections.
            Policy::CacheAware | Policy::PrefixHash => {
                least_conn(&self.ready, slots, rng).map(plain)
            }
        }
    }

    /// A least-connections pick among the serving backends not yet proven by a probe,
    /// for when every proven one is at its cap (`None` when there are none, or all are
    /// full too).
    pub(crate) fn unproven_with_room<R: Rng>(
        &mut self,
        slots: &[Option<Backend>],
        rng: &mut R,
    ) -> Option<u32> {
        self.refresh(slots);
        least_conn(&self.unproven, slots, rng)
    }

    /// The least effective load ([`Backend::load`]) among ready backends (0 when none is
    /// ready).
    pub(crate) fn min_load(&mut self, slots: &[Option<Backend>]) -> u32 {
        self.refresh(slots);
        self.ready
            .iter()
            .map(|&s| backend(slots, s))
            .filter(|b| !b.off_model)
            .map(|b| b.load())
            .min()
            .unwrap_or(0)
    }

    /// least-conn's pick while some backend has a fresh engine report: the least
    /// [`signal_rank`](SignalRanks) relative to weight among ready backends below their
    /// cap, ties uniformly at random (see [`crate::engine`]).
    pub(crate) fn least_conn_signals<R: Rng>(
        &mut self,
        slots: &[Option<Backend>],
        rng: &mut R,
    ) -> Option<u32> {
        self.refresh(slots);
        let ranks = SignalRanks::of(&self.ready, slots);
        let mut best: Option<(u32, i128)> = None;
        let mut ties = 0u32;
        for &s in &self.ready {
            let b = backend(slots, s);
            if b.at_cap() {
                continue;
            }
            let rank = ranks.rank(b);
            let order = best.map(|(bs, br)| {
                (rank * i128::from(backend(slots, bs).weight)).cmp(&(br * i128::from(b.weight)))
            });
            match order {
                None | Some(std::cmp::Ordering::Less) => {
                    best = Some((s, rank));
                    ties = 1;
                }
                Some(std::cmp::Ordering::Equal) => {
                    ties += 1;
                    if rng.random_range(0..ties) == 0 {
                        best = Some((s, rank));
                    }
                }
                Some(std::cmp::Ordering::Greater) => {}
            }
        }
        best.map(|(s, _)| s)
    }

    /// A least-connections pick among ready backends below their cap.
    pub(crate) fn least_conn<R: Rng>(
        &mut self,
        slots: &[Option<Backend>],
        rng: &mut R,
    ) -> Option<u32> {
        self.refresh(slots);
        least_conn(&self.ready, slots, rng)
    }

    fn round_robin(&mut self, slots: &[Option<Backend>]) -> Option<u32> {
        let n = self.ready.len();
        for i in 0..n {
            let at = (self.cursor + i) % n;
            let s = self.ready[at];
            if !backend(slots, s).at_cap() {
                self.cursor = (at + 1) % n;
                return Some(s);
            }
        }
        None
    }

    fn smooth_wrr(&mut self, slots: &[Option<Backend>]) -> Option<u32> {
        if self.schedule.is_empty() {
            let ready = &self.ready;
            return swrr_step(ready, &mut self.current, slots, |s| {
                !backend(slots, s).at_cap()
            })
            .map(|i| ready[i]);
        }
        let n = self.schedule.len();
        for i in 0..n {
            let at = (self.cursor + i) % n;
            let s = self.schedule[at];
            if !backend(slots, s).at_cap() {
                self.cursor = (at + 1) % n;
                return Some(s);
            }
        }
        None
    }

    fn random<R: Rng>(&mut self, slots: &[Option<Backend>], rng: &mut R) -> Option<u32> {
        // A few tries at the weighted table, then an exact weighted draw among the
        // backends below their cap.
        for _ in 0..4 {
            let s = self.expanded[rng.random_range(0..self.expanded.len())];
            if !backend(slots, s).at_cap() {
                return Some(s);
            }
        }
        let mut total = 0u64;
        let mut chosen = None;
        for &s in &self.ready {
            let b = backend(slots, s);
            if b.at_cap() {
                continue;
            }
            total += u64::from(b.weight);
            if rng.random_range(0..total) < u64::from(b.weight) {
                chosen = Some(s);
            }
        }
        chosen
    }

    fn p2c<R: Rng>(&mut self, slots: &[Option<Backend>], rng: &mut R) -> Option<u32> {
        let n = self.ready.len();
        if n == 1 {
            let s = self.ready[0];
            return (!backend(slots, s).at_cap()).then_some(s);
        }
        // One 64-bit draw for both indices: each 32-bit half is mapped onto its range by
        // multiply-shift (bias below n / 2^32, far under the statistical tests' ±1%).
        let r = rng.next_u64();
        let i = scale(r as u32, n);
        let mut j = scale((r >> 32) as u32, n - 1);
        if j >= i {
            j += 1;
        }
        let (a, b) = (self.ready[i], self.ready[j]);
        let (ba, bb) = (backend(slots, a), backend(slots, b));
        match (ba.at_cap(), bb.at_cap()) {
            (false, false) => Some(match load_cmp(ba, bb) {
                std::cmp::Ordering::Less => a,
                std::cmp::Ordering::Greater => b,
                std::cmp::Ordering::Equal => {
                    if rng.random::<bool>() {
                        a
                    } else {
                        b
                    }
                }
            }),
            (false, true) => Some(a),
            (true, false) => Some(b),
            (true, true) => least_conn(&self.ready, slots, rng),
        }
    }

    /// Weighted rendezvous (highest random weight) hashing: the backend with the highest
    /// score for `key` wins, so a departing backend moves only its own keys. Backends at
    /// their cap are skipped (their keys overflow to their runner-up).
    /// The highest-ranked backend for `key` below its cap, and whether it is the key's
    /// first choice (the highest-ranked of all ready backends that serve the request's
    /// model, full or not).
    fn rendezvous(&self, slots: &[Option<Backend>], key: u64) -> Option<(u32, bool)> {
        // The best below its cap, and the best of all (full ones included).
        let mut best: Option<Rank> = None;
        let mut best_any: Option<Rank> = None;
        for &s in &self.ready {
            let b = backend(slots, s);
            if b.off_model {
                continue;
            }
            let r = Rank::of(b, s, key, self.uniform);
            if best_any.is_none_or(|a| r.above(&a)) {
                best_any = Some(r);
            }
            if !b.at_cap() && best.is_none_or(|a| r.above(&a)) {
                best = Some(r);
            }
        }
        let first = best_any.map(|r| r.slot);
        best.map(|r| (r.slot, Some(r.slot) == first))
    }

    /// The prefix-hash pick (consistent hashing with bounded loads, Mirrokni, Thorup and
    /// Zadimoghaddam 2018): the ready backends in `key`'s rendezvous order, and the first
    /// below its cap whose load relative to its weight is at most `factor_milli / 1000`
    /// times the average (`Σ load / Σ weight` over the ready backends that serve the
    /// request's model). When none is (every one within the bound is at its cap), the
    /// least loaded below its cap, the highest-ranked among equals. No randomness: the
    /// same pool, loads and key always give the same backend. With the backend comes
    /// whether it is the key's first choice.
    pub(crate) fn bounded_rendezvous(
        &mut self,
        slots: &[Option<Backend>],
        key: u64,
        factor_milli: u32,
    ) -> Option<(u32, bool)> {
        self.refresh(slots);
        let (mut total_load, mut total_weight) = (0u128, 0u128);
        for &s in &self.ready {
            let b = backend(slots, s);
            if !b.off_model {
                total_load += u128::from(b.load());
                total_weight += u128::from(b.weight);
            }
        }
        // load / weight ≤ factor × total_load / total_weight, without division.
        let within = |b: &Backend| {
            u128::from(b.load()) * total_weight * 1000
                <= u128::from(factor_milli) * total_load * u128::from(b.weight)
        };
        let mut first: Option<Rank> = None;
        let mut best: Option<Rank> = None;
        // The fallback: the least loaded below its cap, the highest-ranked among equals.
        let mut lightest: Option<Rank> = None;
        for &s in &self.ready {
            let b = backend(slots, s);
            if b.off_model {
                continue;
            }
            let r = Rank::of(b, s, key, self.uniform);
            if first.is_none_or(|a| r.above(&a)) {
                first = Some(r);
            }
            if b.at_cap() {
                continue;
            }
            if within(b) && best.is_none_or(|a| r.above(&a)) {
                best = Some(r);
            }
            let lighter = lightest.is_none_or(|l| match load_cmp(b, backend(slots, l.slot)) {
                std::cmp::Ordering::Less => true,
                std::cmp::Ordering::Equal => r.above(&l),
                std::cmp::Ordering::Greater => false,
            });
            if lighter {
                lightest = Some(r);
            }
        }
        let chosen = best.or(lightest)?;
        Some((chosen.slot, first.is_some_and(|f| f.slot == chosen.slot)))
    }
}

/// A backend's place in one key's weighted rendezvous order: higher scores first, the
/// hash breaking ties.
#[derive(Clone, Copy, Debug)]
struct Rank {
    score: f64,
    hash: u64,
    slot: u32,
}

impl Rank {
    fn of(b: &Backend, slot: u32, key: u64, uniform: bool) -> Rank {
        let hash = hash::mix64(key ^ b.name_hash);
        let score = if uniform {
            0.0
        } else {
            // -w / ln(u), u uniform in (0, 1): the weighted HRW score. `libm::log`
            // rather than `f64::ln` (the platform's libm): identical results everywhere.
            let u = ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            -f64::from(b.weight) / libm::log(u)
        };
        Rank { score, hash, slot }
    }

    fn above(&self, other: &Rank) -> bool {
        self.score > other.score || (self.score == other.score && self.hash > other.hash)
    }
}

/// The largest replica count [`SignalRanks`] estimates: a bound on how much one of this
/// `lb`'s sends since a report can weigh.
pub(crate) const MAX_REPLICA_ESTIMATE: i128 = 16;

/// What least-conn ranks by while engine reports are fresh ([`crate::engine`], "Ranking
/// with several replicas"), in thousandths of a request: for a backend with a fresh
/// report
///
/// ```text
/// own + shrink(foreign - mean foreign) / R + (R - 1) (own - own_then)
/// shrink(d) = sign(d) max(0, |d| - √(mean foreign))
/// ```
///
/// and `own` for one without. `own`: in flight through this `lb`; `own_then`: that when
/// the report came; `foreign = max(0, running + waiting - own_then)`, the load the engine
/// holds for others; `mean foreign` over the ready backends with a fresh report; `R = Σ
/// (running + waiting) / Σ own_then` over them, clamped to `1..=MAX_REPLICA_ESTIMATE`
/// (1 when this `lb` had nothing in flight at the reports: no evidence of peers): how many balancers' worth of load the engines carry for one of this `lb`'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SignalRanks {
    /// `R`, in thousandths.
    replicas_milli: i128,
    /// The mean foreign load over the fresh backends, in thousandths.
    mean_foreign_milli: i128,
    /// `√(mean foreign)`, in thousandths.
    dead_zone_milli: i128,
}

impl SignalRanks {
    /// The figures of `ready`'s fresh reports.
    pub(crate) fn of(ready: &[u32], slots: &[Option<Backend>]) -> SignalRanks {
        let (mut engine, mut own, mut foreign, mut n) = (0i128, 0i128, 0i128, 0i128);
        for &s in ready {
            let b = backend(slots, s);
            if b.fresh {
                engine += i128::from(b.engine_load);
                own += i128::from(b.in_flight_at_report);
                foreign += i128::from(b.engine_load.saturating_sub(b.in_flight_at_report));
                n += 1;
            }
        }
        // Nothing of this `lb`'s in flight at the reports: no evidence of peers, R = 1.
        let replicas_milli = if own == 0 {
            1000
        } else {
            (1000 * engine / own).clamp(1000, 1000 * MAX_REPLICA_ESTIMATE)
        };
        let mean_foreign_milli = 1000 * foreign / n.max(1);
        SignalRanks {
            replicas_milli,
            mean_foreign_milli,
            dead_zone_milli: isqrt(mean_foreign_milli * 1000),
        }
    }

    /// Backend `b`'s rank, in thousandths of a request (lower is preferred).
    #[inline]
    pub(crate) fn rank(&self, b: &Backend) -> i128 {
        let own = 1000 * i128::from(b.in_flight);
        if !b.fresh {
            return own;
        }
        let foreign = 1000 * i128::from(b.engine_load.saturating_sub(b.in_flight_at_report));
        let d = foreign - self.mean_foreign_milli;
        let past = (d.abs() - self.dead_zone_milli).max(0) * d.signum();
        let deviation = past * 1000 / self.replicas_milli;
        let sent_since = i128::from(b.in_flight) - i128::from(b.in_flight_at_report);
        own + deviation + (self.replicas_milli - 1000) * sent_since
    }
}

/// The integer square root (`⌊√x⌋`, 0 for negatives).
fn isqrt(x: i128) -> i128 {
    if x <= 0 {
        return 0;
    }
    let mut r = (x as f64).sqrt() as i128;
    while r * r > x {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= x {
        r += 1;
    }
    r
}

/// Fewest in flight relative to weight among backends below their cap; ties uniformly at
/// random.
fn least_conn<R: Rng>(ready: &[u32], slots: &[Option<Backend>], rng: &mut R) -> Option<u32> {
    let mut pick = LeastLoaded::default();
    for &s in ready {
        let b = backend(slots, s);
        if !b.at_cap() {
            pick.offer(s, b, slots, rng);
        }
    }
    pick.best
}

/// The least-loaded of the backends offered to it ([`load_cmp`]), ties broken uniformly
/// at random by reservoir sampling, so no allocation.
#[derive(Default)]
pub(crate) struct LeastLoaded {
    /// The slot chosen so far.
    pub(crate) best: Option<u32>,
    ties: u32,
}

impl LeastLoaded {
    /// Considers backend `b`, in `slot`. Inlined: least-conn's scan is this call per
    /// backend, and an out-of-line call measured 20 to 70% slower.
    #[inline(always)]
    pub(crate) fn offer<R: Rng>(
        &mut self,
        slot: u32,
        b: &Backend,
        slots: &[Option<Backend>],
        rng: &mut R,
    ) {
        match self.best.map(|cur| load_cmp(b, backend(slots, cur))) {
            None | Some(std::cmp::Ordering::Less) => {
                self.best = Some(slot);
                self.ties = 1;
            }
            Some(std::cmp::Ordering::Equal) => {
                self.ties += 1;
                if rng.random_range(0..self.ties) == 0 {
                    self.best = Some(slot);
                }
            }
            Some(std::cmp::Ordering::Greater) => {}
        }
    }
}

/// Maps a uniform 32-bit value onto `0..n` (Lemire's multiply-shift).
#[inline]
fn scale(x: u32, n: usize) -> usize {
    ((u64::from(x) * n as u64) >> 32) as usize
}

/// Compares `load / weight` of two backends without division, the load being the
/// effective one ([`Backend::load`]: in flight, or the engine's queue when it reports
/// more).
#[inline]
pub(crate) fn load_cmp(a: &Backend, b: &Backend) -> std::cmp::Ordering {
    (u64::from(a.load()) * u64::from(b.weight)).cmp(&(u64::from(b.load()) * u64::from(a.weight)))
}

/// One step of nginx's smooth weighted round robin over `ready` (indices into it are
/// returned): every eligible backend's current weight grows by its weight, the largest
/// wins (the first on ties) and gives back the total.
fn swrr_step(
    ready: &[u32],
    current: &mut [i64],
    slots: &[Option<Backend>],
    eligible: impl Fn(u32) -> bool,
) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (i, &s) in ready.iter().enumerate() {
        if !eligible(s) {
            continue;
        }
        let w = i64::from(backend(slots, s).weight);
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}

#[inline]
fn backend(slots: &[Option<Backend>], slot: u32) -> &Backend {
    slots[slot as usize]
        .as_ref()
        .expect("the selector is rebuilt whenever a backend is removed")
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Policy::ALL {
            assert_eq!(p.name().parse::<Policy>(), Ok(p));
        }
        assert_eq!("random-two-least".parse::<Policy>(), Ok(Policy::P2c));
        assert_eq!("cache-aware".parse::<Policy>(), Ok(Policy::CacheAware));
        assert_eq!(
            "consistent-hash".parse::<Policy>(),
            Ok(Policy::ConsistentHash)
        );
        assert!(Policy::names().contains("cache-aware, consistent-hash, prefix-hash"));
        assert_eq!("prefix-hash".parse::<Policy>(), Ok(Policy::PrefixHash));
        let err = "fastest".parse::<Policy>().unwrap_err().to_string();
        assert!(
            err.contains("fastest") && err.contains("least-conn") && err.contains("p2c"),
            "{err}"
        );
    }

    #[test]
    fn isqrt_is_the_floor() {
        for x in 0..10_000i128 {
            let r = isqrt(x);
            assert!(r * r <= x && (r + 1) * (r + 1) > x, "{x}");
        }
        assert_eq!(isqrt(-5), 0);
        let big = (1i128 << 90) + 12345;
        let r = isqrt(big);
        assert!(r * r <= big && (r + 1) * (r + 1) > big);
    }

    #[test]
    fn gcd_works() {
        assert_eq!(gcd(0, 4), 4);
        assert_eq!(gcd(6, 4), 2);
        assert_eq!(gcd(5, 1), 1);
    }
}
