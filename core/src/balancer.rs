//! The [`Balancer`]: the pool, its policy, health and status, driven by the adapter.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::Rng;

use crate::affinity::select::CacheAware;
use crate::affinity::RoutingStats;
use crate::backend::{Backend, BackendId, BackendSpec, BackendView, PoolError, MAX_WEIGHT};
use crate::config::Config;
use crate::engine::{EngineReport, LoadReport};
use crate::event::{Action, Cause, Event, ProbeId};
use crate::hash::hash_bytes;
use crate::health::{Health, HealthState, ProbeOutcome, PASSIVE_REPROBE};
use crate::lease::{Lease, Outcome, Reject, Route};
use crate::policy::{Policy, Selector};
use crate::queue::{Admission, OwnedMeta, Queue, QueueStats, Ticket};
use crate::request::RequestMeta;
use crate::status::{StatusReport, Summary};

/// The sans-IO load balancer.
///
/// See the crate documentation for the driving contract. `R` is the injected random number
/// generator; seed it to replay a run exactly.
#[derive(Debug)]
pub struct Balancer<R = SmallRng> {
    config: Config,
    rng: R,
    slots: Vec<Option<Backend>>,
    /// The generation the next backend placed in each slot gets.
    gens: Vec<u32>,
    free: Vec<u32>,
    selector: Selector,
    outstanding: u64,
    next_status: Option<Instant>,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    /// The affinity table and its counters (cache-aware routing only).
    cache_aware: Option<CacheAware>,
    /// Requests waiting for a slot.
    queue: Queue,
    admissions: VecDeque<Admission>,
    /// The earliest instant a fresh engine report turns stale, if any is fresh.
    report_expiry: Option<Instant>,
    /// Backends whose fresh report says saturated.
    saturated: usize,
    /// Backends with a fresh report (least-conn then ranks by [`crate::engine`]'s
    /// estimate).
    fresh: usize,
}

impl<R> Drop for Balancer<R> {
    fn drop(&mut self) {
        // Leases in admissions nobody polled die with the balancer: nothing to release
        // them to.
        for a in self.admissions.drain(..) {
            if let Admission::Admitted(_, lease) = a {
                let _ = lease.end();
            }
        }
    }
}

impl<R: Rng> Balancer<R> {
    /// An empty balancer. Intervals and timeouts below [`MIN_TICK`](crate::MIN_TICK) are
    /// raised to it.
    pub fn new(config: Config, rng: R, now: Instant) -> Self {
        let config = config.clamped();
        let mut rng = rng;
        // Only cache-aware routing draws from the RNG here, so the other policies' pick
        // sequences for a given seed are unchanged.
        let cache_aware =
            (config.policy == Policy::CacheAware).then(|| CacheAware::new(rng.random()));
        Balancer {
            next_status: config.status_interval.map(|d| now + d),
            config,
            rng,
            cache_aware,
            queue: Queue::default(),
            admissions: VecDeque::new(),
            slots: Vec::new(),
            gens: Vec::new(),
            free: Vec::new(),
            selector: Selector::new(),
            outstanding: 0,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            report_expiry: None,
            saturated: 0,
            fresh: 0,
        }
    }

    // ------------------------------------------------------------------ getters

    /// The configuration in force (after clamping).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counts for `/health`.
    pub fn summary(&self) -> Summary {
        let mut s = Summary {
            in_flight: self.outstanding,
            ..Summary::default()
        };
        for b in self.slots.iter().flatten() {
            s.total += 1;
            s.healthy += usize::from(b.health.is_healthy() && !b.draining);
        }
        s
    }

    /// One backend, if it is in the pool.
    pub fn backend(&self, id: BackendId) -> Option<BackendView> {
        self.get(id).map(BackendView::from)
    }

    /// Every backend, in slot order.
    pub fn backends(&self) -> impl Iterator<Item = BackendView> + '_ {
        self.slots.iter().flatten().map(BackendView::from)
    }

    /// Leases handed out and not yet released (those in unpolled admissions included).
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Cache-aware routing counters since the start (`None` under other policies).
    pub fn routing_stats(&self) -> Option<RoutingStats> {
        self.cache_aware.as_ref().map(CacheAware::stats)
    }

    /// Requests waiting in the admission queue.
    pub fn queued(&self) -> usize {
        self.queue.waiting.len()
    }

    /// Admission queue counters since the start (`None` when the queue is off).
    pub fn queue_stats(&self) -> Option<QueueStats> {
        self.config.queue.enabled().then(|| self.queue.snapshot())
    }

    // ------------------------------------------------------------------ pool changes

    /// Adds a backend. It starts healthy and is probed at the next [`handle_timeout`].
    ///
    /// [`handle_timeout`]: Balancer::handle_timeout
    pub fn add_backend(&mut self, now: Instant, spec: BackendSpec) -> Result<BackendId, PoolError> {
        if spec.weight == 0 || spec.weight > MAX_WEIGHT {
            return Err(PoolError::InvalidWeight {
                url: spec.url,
                weight: spec.weight,
            });
        }
        if self.slots.iter().flatten().any(|b| *b.url == *spec.url) {
            return Err(PoolError::Duplicate { url: spec.url });
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.gens.push(0);
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 backends")
            }
        };
        let id = BackendId {
            slot,
            gen: self.gens[slot as usize],
        };
        self.slots[slot as usize] = Some(Backend {
            id,
            name_hash: hash_bytes(spec.url.as_bytes()),
            url: spec.url.into(),
            weight: spec.weight,
            max_conns: spec.max_conns,
            in_flight: 0,
            draining: false,
            parked: false,
            health: Health::new(),
            next_probe: now,
            probe: None,
            probe_seq: 0,
            backoff: None,
            excluded: false,
            engine: None,
            engine_load: 0,
            fresh: false,
            in_flight_at_report: 0,
            saturated: false,
            shunned: false,
            models: None,
            off_model: false,
        });
        self.selector.invalidate();
        self.admit(now);
        Ok(id)
    }

    /// Removes a backend at once. Its outstanding leases stay valid and are released as
    /// usual; their outcomes are ignored. Returns false if it was not in the pool.
    pub fn remove_backend(&mut self, _now: Instant, id: BackendId) -> bool {
        if self.get(id).is_none() {
            return false;
        }
        let b = self.slots[id.slot as usize].take().expect("checked above");
        self.saturated -= usize::from(b.saturated);
        self.fresh -= usize::from(b.fresh);
        self.gens[id.slot as usize] = id.gen.wrapping_add(1);
        self.free.push(id.slot);
        self.selector.invalidate();
        self.events.push_back(Event::Removed {
            backend: id,
            url: b.url,
        });
        true
    }

    /// Stops sending new requests to a backend; it is removed once its in-flight requests
    /// finish (at once if it has none). Returns false if it was not in the pool.
    pub fn drain_backend(&mut self, now: Instant, id: BackendId) -> bool {
        let Some(b) = self.get_mut(id) else {
            return false;
        };
        b.draining = true;
        b.parked = false;
        b.probe = None;
        let idle = b.in_flight == 0;
        self.selector.invalidate();
        if idle {
            self.remove_backend(now, id);
        }
        true
    }

    /// Stops sending new requests to a backend and keeps it in the pool once its
    /// in-flight requests finish (listed, `parked`, taking nothing, not probed) until
    /// [`remove_backend`](Self::remove_backend). Returns false if it was not in the pool.
    pub fn park_backend(&mut self, _now: Instant, id: BackendId) -> bool {
        let Some(b) = self.get_mut(id) else {
            return false;
        };
        b.draining = true;
        b.parked = true;
        b.probe = None;
        self.selector.invalidate();
        true
    }

    /// Changes a backend's weight (`1..=MAX_WEIGHT`). `Ok(false)` if it was not in the
    /// pool.
    pub fn set_weight(
        &mut self,
        _now: Instant,
        id: BackendId,
        weight: u32,
    ) -> Result<bool, PoolError> {
        let Some(b) = self.get_mut(id) else {
            return Ok(false);
        };
        if weight == 0 || weight > MAX_WEIGHT {
            return Err(PoolError::InvalidWeight {
                url: b.url.to_string(),
                weight,
            });
        }
        b.weight = weight;
        self.selector.invalidate();
        Ok(true)
    }

    /// Sets the models a backend serves, as its `/v1/models` lists them (the proxy learns
    /// them with each probe): a request that names a model ([`RequestMeta::model`]) goes
    /// only to backends that serve it. `None` or an empty list: the backend serves every
    /// model. When no backend in the pool (draining ones aside) lists a request's model,
    /// the request is routed among all of them as if it named none; under
    /// [`Config::strict_models`](crate::Config) only among those without a list, and
    /// with none of those it is refused with [`Reject::UnknownModel`]. Returns false if
    /// the backend was not in the pool.
    pub fn set_models(&mut self, now: Instant, id: BackendId, models: Option<Vec<String>>) -> bool {
        let Some(b) = self.get_mut(id) else {
            return false;
        };
        let models = models.filter(|l| !l.is_empty()).map(|mut l| {
            l.sort_unstable();
            l.dedup();
            l.into_iter().map(String::into_boxed_str).collect()
        });
        if b.models != models {
            b.models = models;
            // Queued requests for a model may fit now.
            self.admit(now);
        }
        true
    }

    /// Lets a backend take traffic at once, as if a probe had passed (it joined healthy
    /// but unproven). Returns false if it was not in the pool.
    pub fn trust_backend(&mut self, id: BackendId) -> bool {
        let Some(b) = self.get_mut(id) else {
            return false;
        };
        if !b.health.is_proven() {
            b.health = Health::trusted();
            self.selector.invalidate();
        }
        true
    }

    // ------------------------------------------------------------------ requests

    /// Picks a backend for one request and reserves a slot on it (its in-flight count goes
    /// up by one). Never allocates, except that [`Policy::CacheAware`] records the
    /// request's chain in its table (amortised growth up to the table's bound).
    ///
    /// A backend at its `max_conns` is never picked, whatever the policy. When every
    /// healthy backend is full the answer is [`Reject::AllAtCapacity`]; with a queue
    /// configured, hand the request to [`Balancer::enqueue`] then.
    pub fn select(&mut self, now: Instant, meta: &RequestMeta<'_>) -> Result<Lease, Reject> {
        self.select_excluding(now, meta, &[])
    }

    /// [`select`](Balancer::select), avoiding the backends in `exclude` (they count as
    /// full): a failover away from backends that could not be reached. With nothing else
    /// eligible the answer is [`Reject::AllAtCapacity`].
    pub fn select_excluding(
        &mut self,
        now: Instant,
        meta: &RequestMeta<'_>,
        exclude: &[BackendId],
    ) -> Result<Lease, Reject> {
        let pooled = match meta.model {
            Some(model) => self.mark_off_model(model)?,
            None => false,
        };
        self.set_excluded(exclude, true);
        let picked = self.pick(now, meta);
        self.set_excluded(exclude, false);
        if pooled {
            // Nothing of the model's pool is healthy: that is a 503, not a full pool.
            let none_ready = picked.is_err()
                && self
                    .selector
                    .ready(&self.slots)
                    .iter()
                    .all(|&s| self.slots[s as usize].as_ref().is_none_or(|b| b.off_model));
            for b in self.slots.iter_mut().flatten() {
                b.off_model = false;
            }
            if none_ready {
                return Err(Reject::NoHealthyBackend);
            }
        }
        picked
    }

    /// Whether some backend has a model list (then requests naming a model are routed
    /// among the backends that serve it).
    fn models_known(&self) -> bool {
        self.slots.iter().flatten().any(|b| b.models.is_some())
    }

    /// For one pick of a request naming `model`: marks the backends that do not serve it
    /// `off_model` and says whether it did.
    ///
    /// - Some backend in the pool (draining ones aside) lists `model`: the pool is those
    ///   that list it and those without a list.
    /// - None lists it: every backend may take it (nothing is marked), as if the request
    ///   named no model; under `strict_models`, only those without a list, and with none
    ///   of those, [`Reject::UnknownModel`].
    fn mark_off_model(&mut self, model: &str) -> Result<bool, Reject> {
        if !self.models_known() {
            return Ok(false);
        }
        let pool = self.slots.iter().flatten().filter(|b| !b.draining);
        let listed = pool.clone().any(|b| b.models.is_some() && b.serves(model));
        if listed {
            for b in self.slots.iter_mut().flatten() {
                b.off_model = !b.serves(model);
            }
            return Ok(true);
        }
        if !self.config.strict_models {
            return Ok(false);
        }
        if !pool.clone().any(|b| b.models.is_none()) {
            return Err(Reject::UnknownModel);
        }
        for b in self.slots.iter_mut().flatten() {
            b.off_model = b.models.is_some();
        }
        Ok(true)
    }

    fn set_excluded(&mut self, exclude: &[BackendId], on: bool) {
        for &id in exclude {
            if let Some(b) = self.get_mut(id) {
                b.excluded = on;
            }
        }
    }

    /// The pick under the saturation skip: saturated backends count as full for a first
    /// pick; only when that finds nothing may they take the request (see
    /// [`crate::engine`]), so the skip never rejects a request another pick would place.
    fn pick(&mut self, now: Instant, meta: &RequestMeta<'_>) -> Result<Lease, Reject> {
        self.expire_reports(now);
        if self.saturated > 0 {
            self.set_shunned(true);
            let picked = self.pick_once(now, meta);
            self.set_shunned(false);
            match picked {
                Err(Reject::AllAtCapacity) => {}
                done => return done,
            }
        }
        self.pick_once(now, meta)
    }

    fn set_shunned(&mut self, on: bool) {
        for b in self.slots.iter_mut().flatten() {
            b.shunned = on && b.saturated;
        }
    }

    fn pick_once(&mut self, now: Instant, meta: &RequestMeta<'_>) -> Result<Lease, Reject> {
        let policy = self.config.policy;
        let picked = match policy {
            Policy::PrefixHash => {
                let p = &self.config.prefix_hash;
                match meta.prefix_key(p.units) {
                    (Some(key), depth) => self
                        .selector
                        .bounded_rendezvous(&self.slots, key, p.balance_factor)
                        .map(|(s, first)| {
                            let route = if first {
                                Route::Hit { depth }
                            } else {
                                Route::Overflow { depth: 0 }
                            };
                            (s, route)
                        }),
                    (None, _) => self
                        .selector
                        .least_conn(&self.slots, &mut self.rng)
                        .map(|s| (s, Route::Miss)),
                }
            }
            // With fresh engine reports, least-conn ranks by the replica-aware estimate
            // of `crate::engine`; without, exactly as it always did.
            Policy::LeastConn if self.fresh > 0 => self
                .selector
                .least_conn_signals(&self.slots, &mut self.rng)
                .map(|s| (s, Route::Plain)),
            Policy::CacheAware => self.cache_aware.as_mut().and_then(|c| {
                c.pick(
                    now,
                    meta.units(),
                    &self.config.affinity,
                    &self.slots,
                    &mut self.selector,
                    &mut self.rng,
                )
            }),
            _ => {
                let key = match policy {
                    Policy::IpHash | Policy::ConsistentHash => meta.affinity_hash(),
                    _ => None,
                };
                self.selector.pick(policy, &self.slots, &mut self.rng, key)
            }
        };
        // Every proven backend is full: one still waiting for its first probe (healthy
        // until then) takes the request rather than a 429.
        let picked = picked.or_else(|| {
            self.selector
                .unproven_with_room(&self.slots, &mut self.rng)
                .map(|s| (s, Route::Plain))
        });
        match picked {
            Some((slot, route)) => {
                let b = self.slots[slot as usize]
                    .as_mut()
                    .expect("the selector only returns present slots");
                b.in_flight += 1;
                self.outstanding += 1;
                Ok(Lease::new(b.id, b.health.epoch()).routed(route))
            }
            None if self.selector.ready(&self.slots).is_empty() => Err(Reject::NoHealthyBackend),
            None => Err(Reject::AllAtCapacity),
        }
    }

    /// Gives a lease back with how its exchange ended. Frees its slot and feeds passive
    /// health (only if the backend has not been ejected since the lease was taken). If
    /// requests are queued, the freed slot goes to the oldest ([`Balancer::poll_admission`]).
    pub fn release(&mut self, now: Instant, lease: Lease, outcome: Outcome) {
        self.release_inner(now, lease, outcome);
        self.admit(now);
    }

    fn release_inner(&mut self, now: Instant, lease: Lease, outcome: Outcome) {
        let (id, epoch) = lease.end();
        self.outstanding -= 1;
        let health = self.config.health.clone();
        let Some(b) = self.get_mut(id) else {
            return; // removed while in flight
        };
        debug_assert!(b.in_flight > 0, "in-flight underflow on {id}");
        b.in_flight = b.in_flight.saturating_sub(1);
        if b.draining {
            if b.in_flight == 0 && !b.parked {
                self.remove_backend(now, id);
            }
            return;
        }
        if epoch != b.health.epoch() {
            return;
        }
        let Some(failed) = outcome.passive_failure() else {
            return;
        };
        let may_eject = self.may_eject_passively();
        let b = self.get_mut(id).expect("looked up above");
        if let Some(state) = b.health.on_passive(failed, may_eject, &health) {
            // Probed again soon, then less and less often (PASSIVE_REPROBE).
            b.backoff = Some(PASSIVE_REPROBE);
            b.next_probe = b.next_probe.min(now + PASSIVE_REPROBE);
            self.transition(id, state, Cause::Passive(outcome));
        }
    }

    /// Whether passive health may eject one more backend: not if that would leave fewer
    /// than `100 - max_passive_ejection_percent` percent of the backends (rounded up)
    /// healthy.
    fn may_eject_passively(&self) -> bool {
        let (mut total, mut healthy) = (0u64, 0u64);
        for b in self.slots.iter().flatten().filter(|b| !b.draining) {
            total += 1;
            healthy += u64::from(b.health.is_healthy());
        }
        let kept = 100 - u64::from(self.config.health.max_passive_ejection_percent.min(100));
        let min_healthy = (total * kept).div_ceil(100);
        healthy > min_healthy
    }

    // ------------------------------------------------------------------ engine load

    /// What backend `id`'s engine says about its load now (from its metrics). It counts
    /// in the backend's effective load and for the saturation skip until it is older
    /// than [`EngineLoadConfig::stale_after`](crate::EngineLoadConfig::stale_after), or
    /// a newer report replaces it; see [`crate::engine`]. Returns false if the backend
    /// is not in the pool.
    pub fn load_report(&mut self, now: Instant, id: BackendId, report: LoadReport) -> bool {
        let engine = self.config.engine;
        let Some(b) = self.get_mut(id) else {
            return false;
        };
        let was = b.saturated;
        let was_fresh = b.fresh;
        b.engine = Some(EngineReport { at: now, report });
        b.engine_load = report.queued();
        b.fresh = true;
        b.in_flight_at_report = b.in_flight;
        b.saturated = engine.is_saturated(&report);
        let is = b.saturated;
        self.saturated = self.saturated + usize::from(is) - usize::from(was);
        self.fresh += usize::from(!was_fresh);
        let expiry = now + engine.stale_after();
        if self.report_expiry.is_none_or(|e| expiry < e) {
            self.report_expiry = Some(expiry);
        }
        // Nothing to admit: a report changes rankings, never the room under a cap.
        true
    }

    /// Stops counting the reports that are stale at `now`. Cheap unless one is due.
    fn expire_reports(&mut self, now: Instant) {
        if self.report_expiry.is_none_or(|e| now <= e) {
            return;
        }
        let engine = self.config.engine;
        let mut next: Option<Instant> = None;
        for b in self.slots.iter_mut().flatten() {
            let Some(r) = b.engine else { continue };
            if engine.is_fresh(r.at, now) {
                let expiry = r.at + engine.stale_after();
                if next.is_none_or(|n| expiry < n) {
                    next = Some(expiry);
                }
            } else {
                self.saturated -= usize::from(b.saturated);
                self.fresh -= usize::from(b.fresh);
                b.engine_load = 0;
                b.fresh = false;
                b.saturated = false;
            }
        }
        self.report_expiry = next;
    }

    // ------------------------------------------------------------------ time and probes

    /// Handles every deadline at or before `now`: probe deadlines (as timeouts), due
    /// sweeps (queuing [`Action::StartProbe`]) and the status report. Afterwards
    /// [`poll_timeout`](Balancer::poll_timeout) is later than `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let interval = self.config.health.interval;
        let timeout = self.config.health.timeout;
        for slot in 0..self.slots.len() {
            let Some(b) = self.slots[slot].as_mut() else {
                continue;
            };
            let id = b.id;
            if let Some((_, deadline)) = b.probe {
                if deadline <= now {
                    b.probe = None;
                    self.apply_probe(id, ProbeOutcome::TimedOut);
                }
            }
            let Some(b) = self.slots[slot].as_mut() else {
                continue;
            };
            if !b.draining && b.next_probe <= now {
                b.probe_seq += 1;
                b.next_probe = match b.backoff {
                    // A passively ejected backend: the wait doubles, and once it reaches
                    // the interval the sweeps' schedule takes over.
                    Some(wait) if !b.health.is_healthy() && wait < interval => {
                        let wait = (wait * 2).min(interval);
                        b.backoff = (wait < interval).then_some(wait);
                        now + wait
                    }
                    _ => {
                        b.backoff = None;
                        next_after(b.next_probe, interval, now)
                    }
                };
                let deadline = (now + timeout).min(b.next_probe);
                b.probe = Some((b.probe_seq, deadline));
                self.actions.push_back(Action::StartProbe {
                    probe: ProbeId {
                        backend: id,
                        seq: b.probe_seq,
                    },
                    url: b.url.clone(),
                    deadline,
                });
            }
        }
        self.expire_reports(now);
        if let Some(c) = self.cache_aware.as_mut() {
            c.sweep(now, self.config.affinity.ttl, &self.slots);
        }
        let admissions = &mut self.admissions;
        self.queue
            .expire(now, |t| admissions.push_back(Admission::Expired(t)));
        self.admit(now);
        if let (Some(due), Some(every)) = (self.next_status, self.config.status_interval) {
            if due <= now {
                self.next_status = Some(next_after(due, every, now));
                let mut report = StatusReport::new(self.backends().collect());
                report.routing = self.cache_aware.as_mut().map(CacheAware::report);
                if let Some(total) = self.queue_stats() {
                    report.queue = Some(total.since(&self.queue.reported));
                    self.queue.reported = total;
                }
                self.events.push_back(Event::Status(report));
            }
        }
    }

    /// The next instant [`handle_timeout`](Balancer::handle_timeout) must be called at, or
    /// `None` when nothing is scheduled. Queue deadlines are included.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.next_status;
        if let Some(d) = self.queue.next_deadline() {
            if next.is_none_or(|n| d < n) {
                next = Some(d);
            }
        }
        let mut earliest = |t: Instant| {
            if next.is_none_or(|n| t < n) {
                next = Some(t);
            }
        };
        for b in self.slots.iter().flatten() {
            if let Some((_, deadline)) = b.probe {
                earliest(deadline);
            }
            if !b.draining {
                earliest(b.next_probe);
            }
        }
        next
    }

    /// Reports a probe's result. Results of superseded probes, of probes already timed out
    /// and of removed backends are ignored; a result at or after the probe's deadline
    /// counts as a timeout.
    pub fn probe_result(&mut self, now: Instant, probe: ProbeId, outcome: ProbeOutcome) {
        let Some(b) = self.get_mut(probe.backend) else {
            return;
        };
        match b.probe {
            Some((seq, deadline)) if seq == probe.seq => {
                b.probe = None;
                let outcome = if now >= deadline {
                    ProbeOutcome::TimedOut
                } else {
                    outcome
                };
                self.apply_probe(probe.backend, outcome);
                self.admit(now);
            }
            _ => {}
        }
    }

    /// The next action to carry out, if any.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next event to report, if any.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ------------------------------------------------------------------ admission queue

    /// Puts a request that found every backend full (`select` returned
    /// [`Reject::AllAtCapacity`]) in the admission queue. Its wait ends with exactly one
    /// [`Admission`] from [`poll_admission`](Balancer::poll_admission), unless it is
    /// [cancelled](Balancer::cancel) first: `Admitted` with a lease as soon as a slot
    /// frees (at once if one is free now), or `Expired` at `now + timeout`.
    ///
    /// Refuses with [`Reject::AllAtCapacity`] (429) when the queue is off or full, and
    /// with [`Reject::NoHealthyBackend`] (503) when no backend is healthy.
    pub fn enqueue(&mut self, now: Instant, meta: OwnedMeta) -> Result<Ticket, Reject> {
        let Some(timeout) = self
            .config
            .queue
            .timeout
            .filter(|_| self.config.queue.enabled())
        else {
            return Err(Reject::AllAtCapacity);
        };
        if self.selector.ready(&self.slots).is_empty() {
            return Err(Reject::NoHealthyBackend);
        }
        if self.queue.waiting.len() >= self.config.queue.size {
            self.queue.stats.full += 1;
            return Err(Reject::AllAtCapacity);
        }
        let ticket = self.queue.push(now + timeout, meta);
        self.admit(now);
        Ok(ticket)
    }

    /// The client of a queued request went away: frees its place. If it was already
    /// admitted but the admission not yet polled, the lease is released (as
    /// [`Outcome::Cancelled`]) and the admission withdrawn. Returns false when the ticket
    /// is unknown or its admission was already polled (then the adapter holds the lease
    /// and releases it itself).
    pub fn cancel(&mut self, now: Instant, ticket: Ticket) -> bool {
        if self.queue.remove(ticket).is_some() {
            self.queue.stats.cancelled += 1;
            return true;
        }
        let Some(i) = self.admissions.iter().position(|a| a.ticket() == ticket) else {
            return false;
        };
        // Not delivered: counted as cancelled instead.
        self.queue.stats.cancelled += 1;
        match self.admissions.remove(i) {
            Some(Admission::Admitted(_, lease)) => {
                self.release_inner(now, lease, Outcome::Cancelled);
                self.admit(now);
            }
            Some(Admission::Expired(_)) | None => {}
        }
        true
    }

    /// The next end of a wait in the queue, if any. Drain it after every input, like
    /// [`poll_event`](Balancer::poll_event): admissions are produced by `release`,
    /// `enqueue`, `cancel`, `add_backend`, `probe_result` and `handle_timeout`.
    pub fn poll_admission(&mut self) -> Option<Admission> {
        // Counted when handed over, not when decided: an admission withdrawn by `cancel`
        // before this point counts as cancelled only, and a status report taken in between
        // never sees a count that later shrinks.
        let a = self.admissions.pop_front()?;
        match a {
            Admission::Admitted(..) => self.queue.stats.admitted += 1,
            Admission::Expired(_) => self.queue.stats.expired += 1,
        }
        Some(a)
    }

    /// Hands every pending admission to `deliver`, oldest first. An admission it gives
    /// back (its request has gone meanwhile) is withdrawn: its lease is released as
    /// [`Outcome::Cancelled`], which may admit the next waiter, whose admission is then
    /// delivered in turn. So no lease is ever lost between the core and a waiter.
    /// `deliver` must not block: it runs wherever the caller holds the balancer.
    pub fn deliver_admissions(
        &mut self,
        now: Instant,
        mut deliver: impl FnMut(Admission) -> Result<(), Admission>,
    ) {
        while let Some(admission) = self.poll_admission() {
            if let Err(Admission::Admitted(_, lease)) = deliver(admission) {
                self.release(now, lease, Outcome::Cancelled);
            }
        }
    }

    // ------------------------------------------------------------------ internals

    /// Hands free slots to the queue, oldest first; drops waiters past their deadline.
    /// Stops at the first waiter no backend can take: then no slot is free for anyone;
    /// except that a waiter for a model whose backends are full is passed over (a slot
    /// may be free in another model's pool), keeping its place.
    fn admit(&mut self, now: Instant) {
        let mut passed: Vec<crate::queue::Waiter> = Vec::new();
        while let Some(w) = self.queue.waiting.pop_front() {
            if w.deadline <= now {
                self.admissions.push_back(Admission::Expired(w.ticket));
                continue;
            }
            match self.select(now, &w.meta.as_meta()) {
                Ok(lease) => {
                    self.admissions
                        .push_back(Admission::Admitted(w.ticket, lease));
                }
                Err(_) if w.meta.model.is_some() && self.models_known() => passed.push(w),
                Err(_) => {
                    self.queue.waiting.push_front(w);
                    break;
                }
            }
        }
        for w in passed.into_iter().rev() {
            self.queue.waiting.push_front(w);
        }
    }

    fn get(&self, id: BackendId) -> Option<&Backend> {
        self.slots
            .get(id.slot as usize)?
            .as_ref()
            .filter(|b| b.id == id)
    }

    fn get_mut(&mut self, id: BackendId) -> Option<&mut Backend> {
        self.slots
            .get_mut(id.slot as usize)?
            .as_mut()
            .filter(|b| b.id == id)
    }

    fn apply_probe(&mut self, id: BackendId, outcome: ProbeOutcome) {
        let health = &self.config.health;
        let Some(b) = self.slots[id.slot as usize].as_mut() else {
            return;
        };
        let proven = b.health.is_proven();
        if let Some(state) = b.health.on_probe(outcome.passed(), health) {
            self.transition(id, state, Cause::Probe(outcome));
        } else if !proven && b.health.is_proven() {
            // Proven now: it may take the place of backends not yet probed.
            self.selector.invalidate();
        }
    }

    fn transition(&mut self, id: BackendId, state: HealthState, cause: Cause) {
        let b = self
            .get(id)
            .expect("transitions happen on present backends");
        let event = Event::Health {
            backend: id,
            url: b.url.clone(),
            state,
            cause,
            epoch: b.health.epoch(),
        };
        self.events.push_back(event);
        self.selector.invalidate();
    }
}

/// The first instant of the series `from + k·every` (k ≥ 1) that is after `now`.
fn next_after(from: Instant, every: Duration, now: Instant) -> Instant {
    let next = from + every;
    if next > now {
        return next;
    }
    // Late by more than one period (the adapter was stalled): skip the missed ticks rather
    // than firing them back to back. Remainder arithmetic in nanoseconds, so no step count
    // can saturate however long the stall.
    let every_ns = every.as_nanos().max(1);
    let late_ns = now.duration_since(from).as_nanos() % every_ns;
    now + Duration::from_nanos(u64::try_from(every_ns - late_ns).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn lb(policy: Policy) -> (Balancer, Instant) {
        let now = Instant::now();
        let config = Config {
            policy,
            ..Config::default()
        };
        (Balancer::new(config, SmallRng::seed_from_u64(1), now), now)
    }

    /// `n` backends `http://b0..`, round robin, no status reports.
    fn pool(n: usize) -> (Balancer, Instant, Vec<BackendId>) {
        let now = Instant::now();
        let config = Config {
            policy: Policy::RoundRobin,
            status_interval: None,
            ..Config::default()
        };
        let mut b = Balancer::new(config, SmallRng::seed_from_u64(1), now);
        let ids = (0..n)
            .map(|i| {
                b.add_backend(now, BackendSpec::new(format!("http://b{i}")))
                    .unwrap()
            })
            .collect();
        (b, now, ids)
    }

    /// Runs the due sweep; each probe of a backend in `failing` fails, the others pass.
    fn sweep(b: &mut Balancer, now: Instant, failing: &[BackendId]) -> Vec<BackendId> {
        b.handle_timeout(now);
        let mut probed = Vec::new();
        while let Some(Action::StartProbe { probe, .. }) = b.poll_action() {
            let status = if failing.contains(&probe.backend()) {
                503
            } else {
                200
            };
            b.probe_result(now, probe, ProbeOutcome::Status(status));
            probed.push(probe.backend());
        }
        probed
    }

    fn fail(b: &mut Balancer, now: Instant, id: BackendId) {
        let lease = b
            .select_excluding(now, &RequestMeta::default(), &[])
            .unwrap();
        assert_eq!(lease.backend(), id, "the test picks round robin");
        let error = crate::lease::BackendError {
            kind: crate::lease::ErrorKind::Connect,
            message: "refused".into(),
        };
        b.release(
            now,
            lease,
            Outcome::Failed {
                status: None,
                error,
            },
        );
    }

    #[test]
    fn passive_errors_never_eject_a_lone_backend() {
        let (mut b, now, ids) = pool(1);
        for _ in 0..5 {
            fail(&mut b, now, ids[0]);
        }
        assert!(b.backend(ids[0]).unwrap().healthy);
        // A probe still can.
        sweep(&mut b, now, &ids);
        assert!(!b.backend(ids[0]).unwrap().healthy);
    }

    #[test]
    fn passive_errors_keep_half_of_the_pool() {
        let (mut b, now, ids) = pool(2);
        fail(&mut b, now, ids[0]);
        assert!(!b.backend(ids[0]).unwrap().healthy, "one of two may go");
        fail(&mut b, now, ids[1]);
        fail(&mut b, now, ids[1]);
        assert!(b.backend(ids[1]).unwrap().healthy, "the last one stays");
    }

    #[test]
    fn a_passively_ejected_backend_is_reprobed_soon_then_less_often() {
        let (mut b, t0, ids) = pool(2);
        sweep(&mut b, t0, &[]);
        fail(&mut b, t0, ids[0]);
        assert!(!b.backend(ids[0]).unwrap().healthy);
        // Re-probes at 1 s, then 2 s later, 4 s later, ... while it keeps failing, up to
        // the interval (30 s); the other backend stays on the 30 s sweeps.
        let mut probed_at = Vec::new();
        let mut now = t0;
        while probed_at.len() < 7 {
            now = b.poll_timeout().unwrap();
            if sweep(&mut b, now, &ids[..1]).contains(&ids[0]) {
                probed_at.push(now);
            }
        }
        let gaps: Vec<u64> = probed_at
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs())
            .collect();
        assert_eq!(probed_at[0] - t0, Duration::from_secs(1));
        assert_eq!(gaps, [2, 4, 8, 16, 30, 30]);
        // Two passes in a row (rise 2) bring it back.
        let mut passes = 0;
        while passes < 2 {
            assert!(!b.backend(ids[0]).unwrap().healthy);
            let next = b.poll_timeout().unwrap();
            assert!(next > now);
            now = next;
            passes += usize::from(sweep(&mut b, now, &[]).contains(&ids[0]));
        }
        assert!(b.backend(ids[0]).unwrap().healthy);
    }

    #[test]
    fn backends_not_yet_probed_wait_while_a_proven_one_serves() {
        let (mut b, now, ids) = pool(3);
        // Before any probe answers, all serve: start-up never answers 503.
        let picks: Vec<_> = (0..3)
            .map(|_| {
                let l = b.select(now, &RequestMeta::default()).unwrap();
                let id = l.backend();
                b.release(now, l, Outcome::Response(200));
                id
            })
            .collect();
        assert_eq!(picks.len(), 3);
        assert!(ids.iter().all(|id| picks.contains(id)));
        // b0's probe passes; the others' have not answered yet: only b0 serves.
        b.handle_timeout(now);
        while let Some(Action::StartProbe { probe, .. }) = b.poll_action() {
            if probe.backend() == ids[0] {
                b.probe_result(now, probe, ProbeOutcome::Status(200));
            }
        }
        for _ in 0..6 {
            let l = b.select(now, &RequestMeta::default()).unwrap();
            assert_eq!(l.backend(), ids[0]);
            b.release(now, l, Outcome::Response(200));
        }
    }

    #[test]
    fn parked_backends_stay_listed_and_weights_change() {
        let (mut b, now, ids) = pool(2);
        let l = b.select(now, &RequestMeta::default()).unwrap();
        let busy = l.backend();
        assert!(b.park_backend(now, busy));
        // Draining: no new request reaches it.
        for _ in 0..4 {
            let o = b.select(now, &RequestMeta::default()).unwrap();
            assert_ne!(o.backend(), busy);
            b.release(now, o, Outcome::Response(200));
        }
        b.release(now, l, Outcome::Response(200));
        // Idle and parked: still listed, taking nothing.
        let v = b.backend(busy).expect("a parked backend stays");
        assert!(v.draining && v.parked && v.in_flight == 0);
        // A drain to remove it takes it out at once (idle).
        assert!(b.drain_backend(now, busy));
        assert!(b.backend(busy).is_none());
        let other = *ids.iter().find(|&&i| i != busy).unwrap();
        assert_eq!(b.set_weight(now, other, 7), Ok(true));
        assert_eq!(b.backend(other).unwrap().weight, 7);
        assert!(b.set_weight(now, other, 0).is_err());
        assert_eq!(b.set_weight(now, busy, 2), Ok(false));
    }

    #[test]
    fn a_hash_pick_says_hit_overflow_or_miss() {
        let (mut b, now) = lb(Policy::ConsistentHash);
        for i in 0..3 {
            let spec = BackendSpec {
                max_conns: 1,
                ..BackendSpec::new(format!("http://b{i}"))
            };
            b.add_backend(now, spec).unwrap();
        }
        let key = RequestMeta::default().with_key(b"alice");
        let first = b.select(now, &key).unwrap();
        assert_eq!(first.route(), Route::Hit { depth: 0 });
        // Its backend is full: the next in the key's ranking takes it.
        let second = b.select(now, &key).unwrap();
        assert_eq!(second.route(), Route::Overflow { depth: 0 });
        assert_ne!(second.backend(), first.backend());
        let keyless = b.select(now, &RequestMeta::default()).unwrap();
        assert_eq!(keyless.route(), Route::Miss);
        for l in [first, second, keyless] {
            b.release(now, l, Outcome::Response(200));
        }
        // Room again: the key's own backend, a hit.
        let again = b.select(now, &key).unwrap();
        assert_eq!(again.route(), Route::Hit { depth: 0 });
        b.release(now, again, Outcome::Response(200));
        // Policies without affinity say nothing.
        let (mut rr, now) = lb(Policy::RoundRobin);
        rr.add_backend(now, BackendSpec::new("http://x")).unwrap();
        let l = rr.select(now, &key).unwrap();
        assert_eq!(l.route(), Route::Plain);
        rr.release(now, l, Outcome::Response(200));
    }

    #[test]
    fn an_unproven_backend_takes_what_a_full_proven_one_cannot() {
        let (mut b, now) = lb(Policy::LeastConn);
        let ids: Vec<_> = (0..2)
            .map(|i| {
                let spec = BackendSpec {
                    max_conns: 1,
                    ..BackendSpec::new(format!("http://b{i}"))
                };
                b.add_backend(now, spec).unwrap()
            })
            .collect();
        // b0's first probe passes; b1's has not answered yet.
        b.handle_timeout(now);
        while let Some(Action::StartProbe { probe, .. }) = b.poll_action() {
            if probe.backend() == ids[0] {
                b.probe_result(now, probe, ProbeOutcome::Status(200));
            }
        }
        let first = b.select(now, &RequestMeta::default()).unwrap();
        assert_eq!(first.backend(), ids[0], "the proven backend first");
        let second = b.select(now, &RequestMeta::default()).unwrap();
        assert_eq!(second.backend(), ids[1], "then the unproven one, not a 429");
        assert_eq!(
            b.select(now, &RequestMeta::default()).unwrap_err(),
            Reject::AllAtCapacity
        );
        b.release(now, first, Outcome::Response(200));
        b.release(now, second, Outcome::Response(200));
    }

    #[test]
    fn a_failover_avoids_the_backends_it_left() {
        let (mut b, now, ids) = pool(3);
        for _ in 0..10 {
            let l = b
                .select_excluding(now, &RequestMeta::default(), &ids[..2])
                .unwrap();
            assert_eq!(l.backend(), ids[2]);
            b.release(now, l, Outcome::Response(200));
        }
        assert_eq!(
            b.select_excluding(now, &RequestMeta::default(), &ids),
            Err(Reject::AllAtCapacity)
        );
        // The exclusion lasts one selection.
        let l = b.select(now, &RequestMeta::default()).unwrap();
        b.release(now, l, Outcome::Response(200));
    }

    #[test]
    fn next_after_skips_missed_ticks() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        assert_eq!(next_after(t, s, t), t + s);
        assert_eq!(next_after(t, s, t + s), t + 2 * s);
        assert_eq!(
            next_after(t, s, t + s * 5 + Duration::from_millis(1)),
            t + 6 * s
        );
    }

    #[test]
    fn select_and_release_count() {
        let (mut b, now) = lb(Policy::LeastConn);
        let id = b.add_backend(now, BackendSpec::new("http://a")).unwrap();
        let l = b.select(now, &RequestMeta::default()).unwrap();
        assert_eq!(l.backend(), id);
        assert_eq!(b.backend(id).unwrap().in_flight, 1);
        assert_eq!(b.summary().in_flight, 1);
        b.release(now, l, Outcome::Response(200));
        assert_eq!(b.backend(id).unwrap().in_flight, 0);
        assert_eq!(b.outstanding(), 0);
    }

    #[test]
    fn rejects_tell_empty_from_full() {
        let (mut b, now) = lb(Policy::RoundRobin);
        assert_eq!(
            b.select(now, &RequestMeta::default()),
            Err(Reject::NoHealthyBackend)
        );
        let spec = BackendSpec {
            max_conns: 1,
            ..BackendSpec::new("http://a")
        };
        b.add_backend(now, spec).unwrap();
        let l = b.select(now, &RequestMeta::default()).unwrap();
        assert_eq!(
            b.select(now, &RequestMeta::default()),
            Err(Reject::AllAtCapacity)
        );
        b.release(now, l, Outcome::Cancelled);
        let l = b.select(now, &RequestMeta::default()).unwrap();
        b.release(now, l, Outcome::Cancelled);
    }

    #[test]
    fn pool_errors() {
        let (mut b, now) = lb(Policy::RoundRobin);
        b.add_backend(now, BackendSpec::new("http://a")).unwrap();
        assert!(matches!(
            b.add_backend(now, BackendSpec::new("http://a")),
            Err(PoolError::Duplicate { .. })
        ));
        let heavy = BackendSpec {
            weight: MAX_WEIGHT + 1,
            ..BackendSpec::new("http://b")
        };
        assert!(matches!(
            b.add_backend(now, heavy),
            Err(PoolError::InvalidWeight { .. })
        ));
    }

    #[test]
    fn removed_slot_is_reused_with_a_new_generation() {
        let (mut b, now) = lb(Policy::RoundRobin);
        let a = b.add_backend(now, BackendSpec::new("http://a")).unwrap();
        let lease = b.select(now, &RequestMeta::default()).unwrap();
        assert!(b.remove_backend(now, a));
        let c = b.add_backend(now, BackendSpec::new("http://c")).unwrap();
        assert_eq!(a.slot(), c.slot());
        assert_ne!(a, c);
        b.release(now, lease, Outcome::Response(500));
        assert_eq!(b.backend(c).unwrap().in_flight, 0);
        assert!(
            b.backend(c).unwrap().healthy,
            "a stale lease's outcome is ignored"
        );
        assert_eq!(b.outstanding(), 0);
    }

    #[test]
    fn first_sweep_is_immediate_and_deadline_bounded() {
        let (mut b, now) = lb(Policy::RoundRobin);
        let a = b.add_backend(now, BackendSpec::new("http://a")).unwrap();
        assert_eq!(b.poll_timeout(), Some(now));
        b.handle_timeout(now);
        let Some(Action::StartProbe {
            probe, deadline, ..
        }) = b.poll_action()
        else {
            panic!("expected a probe");
        };
        assert_eq!(probe.backend(), a);
        assert_eq!(deadline, now + b.config().health.timeout);
        assert!(b.poll_timeout().unwrap() > now);
        b.probe_result(deadline, probe, ProbeOutcome::Status(200));
        let Some(Event::Health { state, cause, .. }) = b.poll_event() else {
            panic!("a result at the deadline is a timeout");
        };
        assert_eq!(state, HealthState::Unhealthy);
        assert_eq!(cause, Cause::Probe(ProbeOutcome::TimedOut));
    }

    #[test]
    fn drain_removes_once_idle() {
        let (mut b, now) = lb(Policy::RoundRobin);
        let a = b.add_backend(now, BackendSpec::new("http://a")).unwrap();
        let l = b.select(now, &RequestMeta::default()).unwrap();
        assert!(b.drain_backend(now, a));
        assert_eq!(
            b.select(now, &RequestMeta::default()),
            Err(Reject::NoHealthyBackend)
        );
        assert!(b.backend(a).is_some());
        b.release(now, l, Outcome::Response(200));
        assert!(b.backend(a).is_none());
        assert!(matches!(b.poll_event(), Some(Event::Removed { backend, .. }) if backend == a));
    }
}
