//! Property tests of the sans-IO core against small reference models.
//!
//! The main property, [`pool_matches_model`], drives a [`Balancer`] with a generated
//! sequence of pool changes, selects, releases (every [`Outcome`] kind), probe results
//! (pass, fail, 429, 4xx, errors, timeouts, stale and superseded probes) and time steps,
//! and checks after every step that the balancer agrees with a reference model written
//! independently of the implementation:
//!
//! - health is modelled declaratively, from the history of signals since the last
//!   transition ("the last `fall` probes all failed"), not with counters;
//! - every [`Event`] (health transitions, removals, status reports) and every
//!   [`Action::StartProbe`] must match the model's, in order, exactly once;
//! - in-flight counts equal the leases outstanding, per backend and in total;
//! - a pick is always eligible (healthy, not draining, below its cap), and obeys its
//!   policy where that is observable (least-conn: a minimum of `in_flight / weight`;
//!   p2c: never the unique most loaded; ip-hash and consistent-hash: stable while the
//!   eligible set is; cache-aware: least-loaded, or a holder within its load guard);
//! - `poll_timeout()` equals the model's next deadline, and after `handle_timeout(t)` it
//!   is `None` or later than `t`.
//!
//! Focused properties follow for round robin cycles, smooth WRR windows, p2c with two
//! backends, rendezvous hashing under departures, 4xx never ejecting, `rise`, the bare
//! [`Health`] machine and the timer rule with arbitrary (clamped) durations.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_core::{
    Action, BackendError, BackendId, BackendSpec, Balancer, Cause, Config, ErrorKind, Event,
    Health, HealthConfig, HealthState, Lease, Outcome, Policy, PoolError, ProbeId, ProbeOutcome,
    Reject, RequestKey, RequestMeta, MAX_WEIGHT,
};
use proptest::prelude::*;
use rand::{rngs::SmallRng, SeedableRng};

// ---------------------------------------------------------------------------- tables

/// Every kind of [`Outcome`] a release can carry.
fn outcome(k: u8) -> Outcome {
    let failed = |status, kind| Outcome::Failed {
        status,
        error: BackendError {
            kind,
            message: "simulated".into(),
        },
    };
    match k % 15 {
        0 => Outcome::Response(200),
        1 => Outcome::Response(204),
        2 => Outcome::Response(404),
        3 => Outcome::Response(429),
        4 => Outcome::Response(400),
        5 => Outcome::Response(499),
        6 => Outcome::Response(500),
        7 => Outcome::Response(503),
        8 => failed(None, ErrorKind::Connect),
        9 => failed(None, ErrorKind::Timeout),
        10 => failed(None, ErrorKind::Io),
        11 => failed(None, ErrorKind::Protocol),
        12 => failed(Some(200), ErrorKind::Timeout),
        13 => failed(Some(200), ErrorKind::Io),
        _ => Outcome::Cancelled,
    }
}

/// The reference reading of an outcome: `Some(true)` counts against the backend,
/// `Some(false)` is a success, `None` says nothing about it.
fn model_passive(o: &Outcome) -> Option<bool> {
    match o {
        Outcome::Response(s) => Some(*s >= 500),
        Outcome::Failed { status: None, .. } => Some(true),
        Outcome::Failed {
            status: Some(_),
            error,
        } => (error.kind != ErrorKind::Timeout).then_some(true),
        Outcome::Cancelled => None,
    }
}

/// Every kind of probe result.
fn probe_outcome(k: u8) -> ProbeOutcome {
    match k % 10 {
        0 => ProbeOutcome::Status(200),
        1 => ProbeOutcome::Status(204),
        2 => ProbeOutcome::Status(429),
        3 => ProbeOutcome::Status(404),
        4 => ProbeOutcome::Status(400),
        5 => ProbeOutcome::Status(500),
        6 => ProbeOutcome::Status(503),
        7 => ProbeOutcome::Status(301),
        8 => ProbeOutcome::Error("connection refused".into()),
        _ => ProbeOutcome::TimedOut,
    }
}

fn model_probe_passed(o: &ProbeOutcome) -> bool {
    matches!(o, ProbeOutcome::Status(s) if (200..=299).contains(s) || *s == 429)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Whether the last `n` entries of `h` exist and all equal `v`.
fn last_n_all(h: &[bool], n: u32, v: bool) -> bool {
    let n = n.max(1) as usize;
    h.len() >= n && h[h.len() - n..].iter().all(|&x| x == v)
}

/// `a.in_flight / a.weight <= b.in_flight / b.weight`, without division.
fn load_le(a: (u32, u32), b: (u32, u32)) -> bool {
    u64::from(a.0) * u64::from(b.1) <= u64::from(b.0) * u64::from(a.1)
}

/// The first `from + k·every` (k ≥ 1) after `now`.
fn next_after(from: u64, every: u64, now: u64) -> u64 {
    let mut t = from + every;
    while t <= now {
        t += every;
    }
    t
}

// ---------------------------------------------------------------------------- the model

const INTERVAL: u64 = 100;
const TIMEOUT: u64 = 30;
const STATUS: u64 = 250;

#[derive(Debug)]
struct MBackend {
    id: BackendId,
    url: Arc<str>,
    weight: u32,
    max_conns: u32,
    in_flight: u32,
    draining: bool,
    healthy: bool,
    epoch: u64,
    /// Probe results (true = pass) since the last transition.
    probes: Vec<bool>,
    /// Passive signals (true = failure) since the last transition, while healthy.
    passive: Vec<bool>,
    /// A probe has passed since it joined.
    proven: bool,
    next_probe: u64,
    probe: Option<(ProbeId, u64)>,
}

impl MBackend {
    fn ready(&self) -> bool {
        self.healthy && !self.draining
    }
    fn capped(&self) -> bool {
        self.max_conns != 0 && self.in_flight >= self.max_conns
    }
    fn eligible(&self) -> bool {
        self.ready() && !self.capped()
    }
    fn load(&self) -> (u32, u32) {
        (self.in_flight, self.weight)
    }
}

#[derive(Debug)]
enum Expected {
    Event(Event),
    Status {
        healthy: usize,
        total: usize,
        in_flight: u64,
    },
}

#[derive(Debug)]
struct Model {
    fall: u32,
    rise: u32,
    passive_threshold: u32,
    /// `max_passive_ejection_percent`.
    ejectable: u32,
    now: u64,
    next_status: u64,
    /// Present backends by slot.
    backends: BTreeMap<usize, MBackend>,
    events: Vec<Expected>,
}

impl Model {
    fn get(&mut self, id: BackendId) -> Option<&mut MBackend> {
        self.backends.get_mut(&id.slot()).filter(|b| b.id == id)
    }

    fn transition(&mut self, slot: usize, healthy: bool, cause: Cause) {
        let b = self.backends.get_mut(&slot).unwrap();
        b.healthy = healthy;
        if !healthy {
            b.epoch += 1;
        }
        b.probes.clear();
        b.passive.clear();
        self.events.push(Expected::Event(Event::Health {
            backend: b.id,
            url: b.url.clone(),
            state: if healthy {
                HealthState::Healthy
            } else {
                HealthState::Unhealthy
            },
            cause,
            epoch: b.epoch,
        }));
    }

    fn probe(&mut self, slot: usize, o: ProbeOutcome) {
        let (fall, rise) = (self.fall, self.rise);
        let b = self.backends.get_mut(&slot).unwrap();
        b.proven |= model_probe_passed(&o);
        b.probes.push(model_probe_passed(&o));
        if b.healthy && last_n_all(&b.probes, fall, false) {
            self.transition(slot, false, Cause::Probe(o));
        } else if !b.healthy && last_n_all(&b.probes, rise, true) {
            self.transition(slot, true, Cause::Probe(o));
        }
    }

    fn passive(&mut self, slot: usize, failed: bool, o: Outcome) {
        let threshold = self.passive_threshold;
        // The floor passive health keeps: ceil(total * (100 - ejectable) / 100) healthy.
        let active = self.backends.values().filter(|b| !b.draining);
        let total = active.clone().count() as u64;
        let healthy = active.filter(|b| b.healthy).count() as u64;
        let floor = (total * u64::from(100 - self.ejectable.min(100))).div_ceil(100);
        let b = self.backends.get_mut(&slot).unwrap();
        if !b.healthy || threshold == 0 {
            return;
        }
        b.passive.push(failed);
        if last_n_all(&b.passive, threshold, true) && healthy > floor {
            self.transition(slot, false, Cause::Passive(o));
        }
    }

    fn remove(&mut self, slot: usize) {
        let b = self.backends.remove(&slot).unwrap();
        self.events.push(Expected::Event(Event::Removed {
            backend: b.id,
            url: b.url,
        }));
    }

    /// Returns the probes the balancer must start, in order: (backend, deadline).
    fn handle_timeout(&mut self) -> Vec<(BackendId, u64)> {
        let now = self.now;
        let mut starts = Vec::new();
        let slots: Vec<usize> = self.backends.keys().copied().collect();
        for slot in slots {
            let b = self.backends.get_mut(&slot).unwrap();
            if let Some((_, deadline)) = b.probe {
                if deadline <= now {
                    b.probe = None;
                    self.probe(slot, ProbeOutcome::TimedOut);
                }
            }
            let b = self.backends.get_mut(&slot).unwrap();
            if !b.draining && b.next_probe <= now {
                b.next_probe = next_after(b.next_probe, INTERVAL, now);
                starts.push((b.id, (now + TIMEOUT).min(b.next_probe)));
            }
        }
        if self.next_status <= now {
            self.next_status = next_after(self.next_status, STATUS, now);
            let ready = self.backends.values().filter(|b| b.ready());
            self.events.push(Expected::Status {
                healthy: ready.clone().count(),
                total: self.backends.len(),
                in_flight: ready.map(|b| u64::from(b.in_flight)).sum(),
            });
        }
        starts
    }

    fn poll_timeout(&self) -> u64 {
        let mut t = self.next_status;
        for b in self.backends.values() {
            if let Some((_, d)) = b.probe {
                t = t.min(d);
            }
            if !b.draining {
                t = t.min(b.next_probe);
            }
        }
        t
    }
}

// ---------------------------------------------------------------------------- operations

#[derive(Clone, Debug)]
enum Op {
    Add {
        url: u8,
        weight: u32,
        max_conns: u32,
    },
    Remove(usize),
    Drain(usize),
    Select(Option<u8>),
    Release(usize, u8),
    Probe(usize, u8),
    Advance(u64),
    Tick,
    FireDue,
}

fn op() -> impl Strategy<Value = Op> {
    let weight = prop_oneof![
        8 => 1u32..=4,
        1 => Just(0u32),
        1 => Just(MAX_WEIGHT + 1),
        1 => Just(MAX_WEIGHT),
    ];
    prop_oneof![
        3 => (0u8..10, weight, prop_oneof![2 => Just(0u32), 1 => 1u32..=3])
            .prop_map(|(url, weight, max_conns)| Op::Add { url, weight, max_conns }),
        1 => any::<usize>().prop_map(Op::Remove),
        1 => any::<usize>().prop_map(Op::Drain),
        7 => proptest::option::of(any::<u8>()).prop_map(Op::Select),
        5 => (any::<usize>(), any::<u8>()).prop_map(|(i, k)| Op::Release(i, k)),
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, k)| Op::Probe(i, k)),
        3 => (0u64..150).prop_map(Op::Advance),
        2 => Just(Op::Tick),
        3 => Just(Op::FireDue),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    proptest::sample::select(Policy::ALL.to_vec())
}

struct Harness {
    t0: Instant,
    bal: Balancer,
    model: Model,
    held: Vec<(Lease, u64)>,
    known: Vec<BackendId>,
    probes: Vec<ProbeId>,
    /// ip-hash: the eligible set and the pick of each key's last request.
    affinity: HashMap<u8, (Vec<BackendId>, BackendId)>,
}

impl Harness {
    fn new(
        policy: Policy,
        seed: u64,
        fall: u32,
        rise: u32,
        passive_threshold: u32,
        ejectable: u32,
    ) -> Self {
        let t0 = Instant::now();
        let config = Config {
            policy,
            health: HealthConfig {
                interval: ms(INTERVAL),
                timeout: ms(TIMEOUT),
                fall,
                rise,
                passive_threshold,
                max_passive_ejection_percent: ejectable,
            },
            status_interval: Some(ms(STATUS)),
            ..Config::default()
        };
        Harness {
            t0,
            bal: Balancer::new(config, SmallRng::seed_from_u64(seed), t0),
            model: Model {
                fall,
                rise,
                passive_threshold,
                ejectable,
                now: 0,
                next_status: STATUS,
                backends: BTreeMap::new(),
                events: Vec::new(),
            },
            held: Vec::new(),
            known: Vec::new(),
            probes: Vec::new(),
            affinity: HashMap::new(),
        }
    }

    fn at(&self, t: u64) -> Instant {
        self.t0 + ms(t)
    }

    fn now(&self) -> Instant {
        self.at(self.model.now)
    }

    fn apply(&mut self, op: &Op) {
        let now = self.now();
        match *op {
            Op::Add {
                url,
                weight,
                max_conns,
            } => {
                let url = format!("http://b{url}");
                let spec = BackendSpec {
                    url: url.clone(),
                    weight,
                    max_conns,
                };
                let got = self.bal.add_backend(now, spec);
                if weight == 0 || weight > MAX_WEIGHT {
                    assert_eq!(got, Err(PoolError::InvalidWeight { url, weight }));
                } else if self.model.backends.values().any(|b| *b.url == *url) {
                    assert_eq!(got, Err(PoolError::Duplicate { url }));
                } else {
                    let id = got.expect("a valid, new backend is accepted");
                    assert!(!self.model.backends.contains_key(&id.slot()), "slot in use");
                    assert!(!self.known.contains(&id), "id {id} reused");
                    self.known.push(id);
                    self.model.backends.insert(
                        id.slot(),
                        MBackend {
                            id,
                            url: url.into(),
                            weight,
                            max_conns,
                            in_flight: 0,
                            draining: false,
                            healthy: true,
                            epoch: 0,
                            probes: Vec::new(),
                            passive: Vec::new(),
                            proven: false,
                            next_probe: self.model.now,
                            probe: None,
                        },
                    );
                }
            }
            Op::Remove(i) => {
                if self.known.is_empty() {
                    return;
                }
                let id = self.known[i % self.known.len()];
                let present = self.model.get(id).is_some();
                if present {
                    self.model.remove(id.slot());
                }
                assert_eq!(self.bal.remove_backend(now, id), present);
            }
            Op::Drain(i) => {
                if self.known.is_empty() {
                    return;
                }
                let id = self.known[i % self.known.len()];
                let present = match self.model.get(id) {
                    Some(b) => {
                        b.draining = true;
                        b.probe = None;
                        if b.in_flight == 0 {
                            self.model.remove(id.slot());
                        }
                        true
                    }
                    None => false,
                };
                assert_eq!(self.bal.drain_backend(now, id), present);
            }
            Op::Select(key) => self.select(key),
            Op::Release(i, k) => {
                if self.held.is_empty() {
                    return;
                }
                let (lease, epoch) = self.held.swap_remove(i % self.held.len());
                self.release(lease, epoch, outcome(k));
            }
            Op::Probe(i, k) => {
                if self.probes.is_empty() {
                    return;
                }
                // Mostly recent probes, sometimes stale or superseded ones.
                let n = self.probes.len();
                let p = self.probes[n - 1 - (i % n.min(if i % 4 == 0 { n } else { 3 }))];
                let o = probe_outcome(k);
                let t = self.model.now;
                if let Some(b) = self.model.get(p.backend()) {
                    if let Some((current, deadline)) = b.probe {
                        if current == p {
                            b.probe = None;
                            let o = if t >= deadline {
                                ProbeOutcome::TimedOut
                            } else {
                                o.clone()
                            };
                            self.model.probe(p.backend().slot(), o);
                        }
                    }
                }
                self.bal.probe_result(now, p, o);
            }
            Op::Advance(d) => self.model.now += d,
            Op::Tick => self.tick(),
            Op::FireDue => {
                if let Some(t) = self.bal.poll_timeout() {
                    let t = u64::try_from((t - self.t0).as_millis()).unwrap();
                    self.model.now = self.model.now.max(t);
                }
                self.tick();
            }
        }
    }

    fn select(&mut self, key: Option<u8>) {
        let now = self.now();
        let kb = key.map(|k| [k]);
        // Cache-aware keys: chains sharing their first unit by sixteens.
        let rk = key.map(|k| RequestKey::Prefix(vec![u64::from(k / 16), u64::from(k)]));
        let mut meta = match (key, &kb) {
            (Some(k), _) if k % 2 == 0 => {
                RequestMeta::from_ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, k)))
            }
            (Some(_), Some(b)) => RequestMeta::default().with_key(b),
            _ => RequestMeta::default(),
        };
        if let Some(rk) = &rk {
            meta = meta.with_affinity(rk);
        }
        // Healthy and not draining; and proven by a probe, if any such backend is.
        let up: Vec<&MBackend> = self.model.backends.values().filter(|b| b.ready()).collect();
        let any_proven = up.iter().any(|b| b.proven);
        // When every proven one is full, one not yet proven (with room) takes the request,
        // by least connections.
        let unproven: Vec<&MBackend> = up
            .iter()
            .copied()
            .filter(|b| any_proven && !b.proven && !b.capped())
            .collect();
        let ready: Vec<&MBackend> = up.into_iter().filter(|b| !any_proven || b.proven).collect();
        let eligible: Vec<&MBackend> = ready.iter().copied().filter(|b| !b.capped()).collect();
        let fallback = eligible.is_empty() && !unproven.is_empty();
        let policy = self.bal.config().policy;
        match self.bal.select(now, &meta) {
            Err(r) => {
                if ready.is_empty() {
                    assert_eq!(r, Reject::NoHealthyBackend);
                } else {
                    assert!(eligible.is_empty(), "rejected ({r}) with eligible backends");
                    assert!(unproven.is_empty(), "rejected ({r}) with unproven room");
                    assert_eq!(r, Reject::AllAtCapacity);
                }
            }
            Ok(lease) => {
                let id = lease.backend();
                let b = self.model.backends.get(&id.slot()).filter(|b| b.id == id);
                let b = b.unwrap_or_else(|| panic!("picked {id}, not in the pool"));
                assert!(b.eligible(), "picked an ineligible backend: {b:?}");
                if fallback {
                    assert!(!b.proven, "a proven pick when every proven one is full");
                    assert_min_load(b, &unproven);
                } else {
                    assert!(!any_proven || b.proven, "an unproven pick with proven room");
                }
                match policy {
                    _ if fallback => {}
                    Policy::LeastConn => assert_min_load(b, &eligible),
                    Policy::IpHash | Policy::ConsistentHash if key.is_none() => {
                        assert_min_load(b, &eligible)
                    }
                    Policy::IpHash | Policy::ConsistentHash => {
                        let set: Vec<BackendId> = eligible.iter().map(|b| b.id).collect();
                        let k = key.unwrap();
                        if let Some((prev_set, prev)) = self.affinity.get(&k) {
                            if *prev_set == set {
                                assert_eq!(*prev, id, "key {k} moved within an unchanged set");
                            }
                        }
                        self.affinity.insert(k, (set, id));
                    }
                    Policy::P2c if ready.len() >= 2 && ready.len() == eligible.len() => {
                        // The pick is no more loaded than the other sampled backend, so
                        // it is never strictly more loaded than every other one.
                        assert!(
                            eligible
                                .iter()
                                .any(|o| o.id != id && load_le(b.load(), o.load())),
                            "p2c picked the unique most loaded backend {b:?} of {eligible:?}"
                        );
                    }
                    Policy::CacheAware => {
                        // Least connections, or a warm holder within the load guard:
                        // at most overflow_percent of its cap ahead of the least-loaded
                        // ready backend.
                        let least = eligible.iter().all(|o| load_le(b.load(), o.load()));
                        let min = ready.iter().map(|o| o.in_flight).min().unwrap();
                        let conns = if b.max_conns == 0 { 64 } else { b.max_conns };
                        let pct = self.bal.config().affinity.overflow_percent;
                        let within = (b.in_flight - min) * 100 <= pct * conns;
                        assert!(least || within, "cache-aware pick {b:?} of {ready:?}");
                        let r = self.bal.routing_stats().unwrap();
                        assert_eq!(r.warm + r.cold + r.overflow, r.requests);
                    }
                    _ => {}
                }
                let b = self.model.get(id).unwrap();
                b.in_flight += 1;
                let epoch = b.epoch;
                self.held.push((lease, epoch));
            }
        }
    }

    fn release(&mut self, lease: Lease, epoch: u64, o: Outcome) {
        let id = lease.backend();
        if let Some(b) = self.model.get(id) {
            b.in_flight -= 1;
            if b.draining {
                if b.in_flight == 0 {
                    self.model.remove(id.slot());
                }
            } else if b.epoch == epoch {
                if let Some(failed) = model_passive(&o) {
                    self.model.passive(id.slot(), failed, o.clone());
                }
            }
        }
        let now = self.now();
        self.bal.release(now, lease, o);
    }

    fn tick(&mut self) {
        let now = self.now();
        let starts = self.model.handle_timeout();
        self.bal.handle_timeout(now);
        let mut actions = Vec::new();
        while let Some(a) = self.bal.poll_action() {
            actions.push(a);
        }
        assert_eq!(actions.len(), starts.len(), "{actions:?} vs {starts:?}");
        for (a, (id, deadline)) in actions.into_iter().zip(starts) {
            let Action::StartProbe {
                probe,
                url,
                deadline: d,
            } = a;
            assert_eq!(probe.backend(), id);
            assert_eq!(d, self.at(deadline));
            let b = self.model.get(id).unwrap();
            assert_eq!(url, b.url);
            b.probe = Some((probe, deadline));
            assert!(!self.probes.contains(&probe), "probe id reused");
            self.probes.push(probe);
        }
        if let Some(t) = self.bal.poll_timeout() {
            assert!(t > now, "poll_timeout() not after handle_timeout(now)");
        }
    }

    /// Compares everything observable with the model.
    fn check(&mut self) {
        // Outputs.
        assert_eq!(
            self.bal.poll_action(),
            None,
            "actions come only from handle_timeout"
        );
        let mut got = Vec::new();
        while let Some(e) = self.bal.poll_event() {
            got.push(e);
        }
        let want = std::mem::take(&mut self.model.events);
        assert_eq!(got.len(), want.len(), "events {got:#?}\nexpected {want:#?}");
        for (g, w) in got.iter().zip(&want) {
            match (g, w) {
                (
                    Event::Status(r),
                    &Expected::Status {
                        healthy,
                        total,
                        in_flight,
                    },
                ) => {
                    assert_eq!(
                        (r.healthy, r.total, r.in_flight),
                        (healthy, total, in_flight)
                    );
                    assert_eq!(r.backends.len(), total);
                }
                (g, Expected::Event(w)) => assert_eq!(g, w),
                _ => panic!("event {g:?}, expected {w:?}"),
            }
        }
        // Timer.
        assert_eq!(
            self.bal.poll_timeout(),
            Some(self.at(self.model.poll_timeout()))
        );
        // Pool and counts.
        let views: Vec<_> = self.bal.backends().collect();
        assert_eq!(views.len(), self.model.backends.len());
        for v in &views {
            let b = &self.model.backends[&v.id.slot()];
            assert_eq!(v.id, b.id);
            assert_eq!(*v.url, *b.url);
            assert_eq!((v.weight, v.max_conns), (b.weight, b.max_conns));
            assert_eq!(v.in_flight, b.in_flight, "in-flight of {}", v.id);
            assert_eq!(
                (v.healthy, v.draining, v.epoch),
                (b.healthy, b.draining, b.epoch)
            );
            let leases = self
                .held
                .iter()
                .filter(|(l, _)| l.backend() == v.id)
                .count();
            assert_eq!(
                v.in_flight as usize, leases,
                "in-flight != leases on {}",
                v.id
            );
        }
        let s = self.bal.summary();
        assert_eq!(self.bal.outstanding(), self.held.len() as u64);
        assert_eq!(s.in_flight, self.held.len() as u64);
        assert_eq!(s.total, self.model.backends.len());
        assert_eq!(
            s.healthy,
            self.model.backends.values().filter(|b| b.ready()).count()
        );
    }

    fn finish(mut self) {
        while let Some((lease, epoch)) = self.held.pop() {
            self.release(lease, epoch, Outcome::Cancelled);
            self.check();
        }
        assert_eq!(self.bal.outstanding(), 0);
        assert!(self.bal.backends().all(|v| v.in_flight == 0));
    }
}

fn assert_min_load(b: &MBackend, eligible: &[&MBackend]) {
    for o in eligible {
        assert!(
            load_le(b.load(), o.load()),
            "picked {b:?}, but {o:?} is less loaded"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_model(
        policy in policy(),
        seed in any::<u64>(),
        fall in 1u32..4,
        rise in 1u32..4,
        passive_threshold in 0u32..4,
        ejectable in prop_oneof![Just(0u32), Just(50), Just(100), 0u32..=100],
        ops in proptest::collection::vec(op(), 1..150),
    ) {
        let mut h = Harness::new(policy, seed, fall, rise, passive_threshold, ejectable);
        h.check();
        for op in &ops {
            h.apply(op);
            h.check();
        }
        h.finish();
    }
}

// ---------------------------------------------------------------------------- focused

/// A balancer over `n` backends `http://b0..`, with the given weights, whose health
/// follows `healthy` after the first sweep (fall = 1).
fn pool(
    policy: Policy,
    weights: &[u32],
    healthy: &[bool],
    seed: u64,
) -> (Balancer, Instant, Vec<BackendId>) {
    let t0 = Instant::now();
    let config = Config {
        policy,
        health: HealthConfig {
            fall: 1,
            rise: 1,
            ..HealthConfig::default()
        },
        status_interval: None,
        ..Config::default()
    };
    let mut bal = Balancer::new(config, SmallRng::seed_from_u64(seed), t0);
    let ids: Vec<BackendId> = weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| {
            let spec = BackendSpec {
                weight,
                ..BackendSpec::new(format!("http://b{i}"))
            };
            bal.add_backend(t0, spec).unwrap()
        })
        .collect();
    bal.handle_timeout(t0);
    while let Some(Action::StartProbe { probe, .. }) = bal.poll_action() {
        let i = ids.iter().position(|&id| id == probe.backend()).unwrap();
        let status = if healthy.get(i).copied().unwrap_or(true) {
            200
        } else {
            503
        };
        bal.probe_result(t0, probe, ProbeOutcome::Status(status));
    }
    while bal.poll_event().is_some() {}
    (bal, t0, ids)
}

fn pick(bal: &mut Balancer, now: Instant, meta: &RequestMeta<'_>) -> BackendId {
    let lease = bal.select(now, meta).expect("a backend is eligible");
    let id = lease.backend();
    bal.release(now, lease, Outcome::Response(200));
    id
}

/// nginx's smooth weighted round robin, as published: the reference for WRR.
fn nginx_swrr(weights: &[u32], picks: usize) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    (0..picks)
        .map(|_| {
            let mut best = 0;
            for (i, &w) in weights.iter().enumerate() {
                current[i] += i64::from(w);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            best
        })
        .collect()
}

/// Drives one probe cycle: jumps to the next sweep and answers every probe with `o`.
fn probe_cycle(bal: &mut Balancer, now: &mut Instant, o: &ProbeOutcome) -> Vec<Event> {
    *now = bal.poll_timeout().expect("sweeps are scheduled").max(*now);
    bal.handle_timeout(*now);
    while let Some(Action::StartProbe { probe, .. }) = bal.poll_action() {
        bal.probe_result(*now + ms(1), probe, o.clone());
    }
    let mut events = Vec::new();
    while let Some(e) = bal.poll_event() {
        events.push(e);
    }
    events
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Round robin visits every healthy backend once per cycle, in a fixed order.
    #[test]
    fn round_robin_visits_each_healthy_backend_once_per_cycle(
        healthy in proptest::collection::vec(any::<bool>(), 1..9),
        hold in any::<bool>(),
    ) {
        let weights = vec![1; healthy.len()];
        let (mut bal, now, ids) = pool(Policy::RoundRobin, &weights, &healthy, 0);
        let want: BTreeSet<BackendId> =
            ids.iter().zip(&healthy).filter(|(_, &h)| h).map(|(&id, _)| id).collect();
        let h = want.len();
        if h == 0 {
            prop_assert_eq!(bal.select(now, &RequestMeta::default()), Err(Reject::NoHealthyBackend));
            return Ok(());
        }
        let mut picks = Vec::new();
        let mut held = Vec::new();
        for _ in 0..3 * h {
            let lease = bal.select(now, &RequestMeta::default()).unwrap();
            picks.push(lease.backend());
            if hold {
                held.push(lease);
            } else {
                bal.release(now, lease, Outcome::Response(200));
            }
        }
        for l in held {
            bal.release(now, l, Outcome::Response(200));
        }
        for w in picks.windows(h) {
            let seen: BTreeSet<BackendId> = w.iter().copied().collect();
            prop_assert_eq!(&seen, &want, "window {:?}", w);
        }
    }

    /// Smooth WRR is nginx's sequence, so every window of sum(weights) picks holds each
    /// backend exactly weight times (nothing capped), ejected backends excluded.
    #[test]
    fn smooth_wrr_gives_exact_weights_in_every_window(
        wh in proptest::collection::vec((1u32..=10, prop::bool::weighted(0.8)), 1..7),
    ) {
        let weights: Vec<u32> = wh.iter().map(|x| x.0).collect();
        let healthy: Vec<bool> = wh.iter().map(|x| x.1).collect();
        let (mut bal, now, ids) = pool(Policy::WeightedRoundRobin, &weights, &healthy, 0);
        let live: Vec<usize> = (0..ids.len()).filter(|&i| healthy[i]).collect();
        if live.is_empty() {
            prop_assert_eq!(bal.select(now, &RequestMeta::default()), Err(Reject::NoHealthyBackend));
            return Ok(());
        }
        let live_w: Vec<u32> = live.iter().map(|&i| weights[i]).collect();
        let s: usize = live_w.iter().map(|&w| w as usize).sum();
        let picks: Vec<BackendId> =
            (0..3 * s).map(|_| pick(&mut bal, now, &RequestMeta::default())).collect();
        // Exactly nginx's sequence.
        let want: Vec<BackendId> =
            nginx_swrr(&live_w, 3 * s).into_iter().map(|i| ids[live[i]]).collect();
        prop_assert_eq!(&picks, &want);
        for w in picks.windows(s) {
            for &i in &live {
                let n = w.iter().filter(|&&p| p == ids[i]).count();
                prop_assert_eq!(n, weights[i] as usize);
            }
        }
    }

    /// p2c over two backends always picks the less loaded one (by in_flight / weight).
    #[test]
    fn p2c_with_two_backends_picks_the_less_loaded(
        w in (1u32..=5, 1u32..=5),
        ops in proptest::collection::vec(any::<(bool, usize)>(), 1..200),
        seed in any::<u64>(),
    ) {
        let (mut bal, now, ids) = pool(Policy::P2c, &[w.0, w.1], &[true, true], seed);
        let mut held: Vec<Lease> = Vec::new();
        for (sel, i) in ops {
            if sel || held.is_empty() {
                let load = |bal: &Balancer, id| {
                    let v = bal.backend(id).unwrap();
                    (v.in_flight, v.weight)
                };
                let (a, b) = (load(&bal, ids[0]), load(&bal, ids[1]));
                let lease = bal.select(now, &RequestMeta::default()).unwrap();
                let (mine, other) = if lease.backend() == ids[0] { (a, b) } else { (b, a) };
                held.push(lease);
                prop_assert!(load_le(mine, other), "picked {:?} over {:?}", mine, other);
            } else {
                let l = held.swap_remove(i % held.len());
                bal.release(now, l, Outcome::Response(200));
            }
        }
        for l in held {
            bal.release(now, l, Outcome::Response(200));
        }
    }

    /// Weighted rendezvous hashing (ip-hash, consistent-hash): stable for an unchanged set; when one backend leaves
    /// (removed, drained or ejected) only its keys move; when it comes back they return.
    #[test]
    fn ip_hash_moves_only_the_departed_backends_keys(
        policy in prop_oneof![Just(Policy::IpHash), Just(Policy::ConsistentHash)],
        weights in proptest::collection::vec(1u32..=5, 2..8),
        leave in any::<usize>(),
        how in 0u8..3,
    ) {
        let n = weights.len();
        let healthy = vec![true; n];
        let (mut bal, mut now, ids) = pool(policy, &weights, &healthy, 0);
        let keys: Vec<[u8; 2]> = (0u16..400).map(|k| k.to_le_bytes()).collect();
        let map = |bal: &mut Balancer, now| -> Vec<BackendId> {
            keys.iter().map(|k| pick(bal, now, &RequestMeta::default().with_key(k))).collect()
        };
        let before = map(&mut bal, now);
        prop_assert_eq!(&map(&mut bal, now), &before, "not stable");
        let gone = ids[leave % n];
        match how {
            0 => prop_assert!(bal.remove_backend(now, gone)),
            1 => prop_assert!(bal.drain_backend(now, gone)),
            _ => {
                // Eject it through a failing probe (fall = 1).
                now = bal.poll_timeout().unwrap();
                bal.handle_timeout(now);
                while let Some(Action::StartProbe { probe, .. }) = bal.poll_action() {
                    let s = if probe.backend() == gone { 500 } else { 200 };
                    bal.probe_result(now, probe, ProbeOutcome::Status(s));
                }
                prop_assert!(!bal.backend(gone).unwrap().healthy);
            }
        }
        let after = map(&mut bal, now);
        for (k, (b, a)) in before.iter().zip(&after).enumerate() {
            if *b == gone {
                prop_assert_ne!(*a, gone);
            } else {
                prop_assert_eq!(a, b, "key {} moved though its backend stayed", k);
            }
        }
        // Back again: every key returns to where it was.
        let back = match how {
            2 => {
                now = bal.poll_timeout().unwrap();
                bal.handle_timeout(now);
                while let Some(Action::StartProbe { probe, .. }) = bal.poll_action() {
                    bal.probe_result(now, probe, ProbeOutcome::Status(200));
                }
                gone
            }
            _ => {
                let i = leave % n;
                let spec = BackendSpec { weight: weights[i], ..BackendSpec::new(format!("http://b{i}")) };
                let id = bal.add_backend(now, spec).unwrap();
                // A newcomer takes traffic once a probe has proven it (its first one is due
                // at once).
                bal.handle_timeout(now);
                while let Some(Action::StartProbe { probe, .. }) = bal.poll_action() {
                    bal.probe_result(now, probe, ProbeOutcome::Status(200));
                }
                id
            }
        };
        let again = map(&mut bal, now);
        for (b, a) in before.iter().zip(&again) {
            let b = if *b == gone { back } else { *b };
            prop_assert_eq!(*a, b);
        }
    }

    /// 4xx (429 included), cancellations and timeouts after the head never eject, with
    /// any passive threshold; 429 probes pass.
    #[test]
    fn client_errors_never_eject(
        threshold in 0u32..4,
        statuses in proptest::collection::vec(prop_oneof![400u16..500, Just(429u16), Just(404u16)], 1..60),
        others in proptest::collection::vec(prop_oneof![Just(12u8), Just(14u8)], 0..10),
    ) {
        let t0 = Instant::now();
        let config = Config {
            policy: Policy::RoundRobin,
            health: HealthConfig { passive_threshold: threshold, fall: 1, ..HealthConfig::default() },
            status_interval: None,
            ..Config::default()
        };
        let mut bal = Balancer::new(config, SmallRng::seed_from_u64(1), t0);
        let id = bal.add_backend(t0, BackendSpec::new("http://a")).unwrap();
        let mut now = t0;
        for s in statuses {
            let lease = bal.select(now, &RequestMeta::default()).unwrap();
            bal.release(now, lease, Outcome::Response(s));
            // and a 429 (or 4xx) probe now and then
            if s % 3 == 0 {
                let o = ProbeOutcome::Status(if s == 429 { 429 } else { 200 });
                prop_assert!(probe_cycle(&mut bal, &mut now, &o).is_empty());
            }
        }
        for k in others {
            // A timeout after the head, and a cancellation: nothing said about the backend.
            let o = outcome(k);
            prop_assert_eq!(model_passive(&o), None);
            let lease = bal.select(now, &RequestMeta::default()).unwrap();
            bal.release(now, lease, o);
        }
        prop_assert_eq!(bal.poll_event(), None);
        prop_assert!(bal.backend(id).unwrap().healthy);
        prop_assert_eq!(bal.backend(id).unwrap().epoch, 0);
    }

    /// An ejected backend needs exactly `rise` passing probes in a row: a failure in
    /// between starts the count again; one event per transition.
    #[test]
    fn recovery_needs_exactly_rise_consecutive_passes(
        fall in 1u32..5,
        rise in 1u32..6,
        interruptions in proptest::collection::vec(0u32..6, 0..4),
    ) {
        let t0 = Instant::now();
        let config = Config {
            policy: Policy::RoundRobin,
            health: HealthConfig { fall, rise, passive_threshold: 0, ..HealthConfig::default() },
            status_interval: None,
            ..Config::default()
        };
        let mut bal = Balancer::new(config, SmallRng::seed_from_u64(1), t0);
        let id = bal.add_backend(t0, BackendSpec::new("http://a")).unwrap();
        let mut now = t0;
        let fail = ProbeOutcome::Status(503);
        let pass = ProbeOutcome::Status(200);
        for i in 0..fall {
            let ev = probe_cycle(&mut bal, &mut now, &fail);
            if i + 1 < fall {
                prop_assert!(ev.is_empty());
                prop_assert!(bal.backend(id).unwrap().healthy);
            } else {
                prop_assert_eq!(ev.len(), 1);
                let is_unhealthy = matches!(ev[0], Event::Health { state: HealthState::Unhealthy, epoch: 1, .. });
                prop_assert!(is_unhealthy);
            }
        }
        for k in interruptions {
            for _ in 0..k.min(rise - 1) {
                prop_assert!(probe_cycle(&mut bal, &mut now, &pass).is_empty());
            }
            prop_assert!(probe_cycle(&mut bal, &mut now, &fail).is_empty());
            prop_assert!(!bal.backend(id).unwrap().healthy);
        }
        for i in 0..rise {
            let ev = probe_cycle(&mut bal, &mut now, &pass);
            if i + 1 < rise {
                prop_assert!(ev.is_empty());
                prop_assert!(!bal.backend(id).unwrap().healthy);
            } else {
                prop_assert_eq!(ev.len(), 1);
                let is_healthy = matches!(ev[0], Event::Health { state: HealthState::Healthy, epoch: 1, .. });
                prop_assert!(is_healthy);
            }
        }
        prop_assert!(probe_cycle(&mut bal, &mut now, &pass).is_empty());
    }

    /// The bare [`Health`] machine against the history model.
    #[test]
    fn health_machine_matches_model(
        fall in 0u32..5,
        rise in 0u32..5,
        passive_threshold in 0u32..4,
        inputs in proptest::collection::vec(any::<(bool, bool)>(), 0..200),
    ) {
        let config = HealthConfig { fall, rise, passive_threshold, ..HealthConfig::default() };
        let mut h = Health::new();
        let (mut healthy, mut epoch) = (true, 0u64);
        let (mut probes, mut passive) = (Vec::<bool>::new(), Vec::<bool>::new());
        for (is_probe, ok) in inputs {
            let got = if is_probe { h.on_probe(ok, &config) } else { h.on_passive(!ok, true, &config) };
            let mut want = None;
            if is_probe {
                probes.push(ok);
                if healthy && last_n_all(&probes, fall, false) {
                    want = Some(HealthState::Unhealthy);
                } else if !healthy && last_n_all(&probes, rise, true) {
                    want = Some(HealthState::Healthy);
                }
            } else if healthy && passive_threshold > 0 {
                passive.push(!ok);
                if last_n_all(&passive, passive_threshold, true) {
                    want = Some(HealthState::Unhealthy);
                }
            }
            if let Some(s) = want {
                healthy = s == HealthState::Healthy;
                epoch += u64::from(!healthy);
                probes.clear();
                passive.clear();
            }
            prop_assert_eq!(got, want);
            prop_assert_eq!(h.is_healthy(), healthy);
            prop_assert_eq!(h.state(), if healthy { HealthState::Healthy } else { HealthState::Unhealthy });
            prop_assert_eq!(h.epoch(), epoch);
            let passes = if healthy { 0 } else { probes.iter().rev().take_while(|&&p| p).count() };
            prop_assert_eq!(h.passes() as usize, passes);
        }
    }

    /// The timer rule with arbitrary, possibly zero (clamped) durations and arbitrary
    /// jumps of time: after `handle_timeout(t)`, `poll_timeout()` is `None` or after `t`.
    #[test]
    fn poll_timeout_is_after_handle_timeout(
        interval_us in 0u64..5_000,
        timeout_us in 0u64..5_000,
        status_us in proptest::option::of(0u64..5_000),
        steps in proptest::collection::vec((0u64..20_000, 0u8..4, any::<u8>()), 1..80),
    ) {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let config = Config {
            policy: Policy::P2c,
            health: HealthConfig {
                interval: us(interval_us),
                timeout: us(timeout_us),
                ..HealthConfig::default()
            },
            status_interval: status_us.map(us),
            ..Config::default()
        };
        let mut bal = Balancer::new(config, SmallRng::seed_from_u64(3), t0);
        let mut now = t0;
        let mut pending: Vec<ProbeId> = Vec::new();
        let mut n = 0;
        for (dt, what, k) in steps {
            now += us(dt);
            match what {
                0 => {
                    n += 1;
                    let _ = bal.add_backend(now, BackendSpec::new(format!("http://b{n}")));
                }
                1 if !pending.is_empty() => {
                    let p = pending.remove(k as usize % pending.len());
                    bal.probe_result(now, p, probe_outcome(k));
                }
                2 => {
                    let ids: Vec<BackendId> = bal.backends().map(|v| v.id).collect();
                    if !ids.is_empty() {
                        bal.drain_backend(now, ids[k as usize % ids.len()]);
                    }
                }
                _ => {}
            }
            bal.handle_timeout(now);
            while let Some(Action::StartProbe { probe, deadline, .. }) = bal.poll_action() {
                prop_assert!(deadline > now);
                pending.push(probe);
            }
            while bal.poll_event().is_some() {}
            if let Some(t) = bal.poll_timeout() {
                prop_assert!(t > now, "poll_timeout {:?} <= now {:?}", t - t0, now - t0);
            }
        }
    }
}

/// A waiter whose admission (here: its expiry) is counted in a status report, then
/// cancelled before the admission is polled, must not break the next report's counts.
#[test]
fn queue_counts_survive_a_cancel_after_a_status_report() {
    use lb_core::{OwnedMeta, QueueConfig};
    let t0 = Instant::now();
    let config = Config {
        policy: Policy::LeastConn,
        status_interval: Some(ms(10)),
        queue: QueueConfig {
            timeout: Some(ms(5)),
            size: 4,
        },
        ..Config::default()
    };
    let mut bal = Balancer::new(config, SmallRng::seed_from_u64(1), t0);
    let spec = BackendSpec {
        max_conns: 1,
        ..BackendSpec::new("http://a")
    };
    bal.add_backend(t0, spec).unwrap();
    let lease = bal.select(t0, &RequestMeta::default()).unwrap();
    let ticket = bal.enqueue(t0, OwnedMeta::default()).unwrap();
    // The wait expires and a status report is due in the same handle_timeout.
    bal.handle_timeout(t0 + ms(10));
    // The client leaves before the adapter polls the admission.
    assert!(bal.cancel(t0 + ms(10), ticket));
    assert_eq!(bal.poll_admission(), None);
    bal.handle_timeout(t0 + ms(20));
    let mut reports = Vec::new();
    while let Some(e) = bal.poll_event() {
        if let Event::Status(r) = e {
            reports.push(r.queue.expect("the queue is on"));
        }
    }
    assert_eq!(reports.len(), 2);
    let total = bal.queue_stats().unwrap();
    assert_eq!(
        total.enqueued,
        total.admitted + total.expired + total.cancelled
    );
    bal.release(t0 + ms(20), lease, Outcome::Response(200));
}

/// The timer rule holds across a very long jump of time (an adapter stalled for days
/// with the shortest interval): `poll_timeout()` is still after `now`.
#[test]
fn poll_timeout_is_after_a_jump_of_sixty_days() {
    let t0 = Instant::now();
    let config = Config {
        health: HealthConfig {
            interval: Duration::ZERO, // raised to MIN_TICK
            ..HealthConfig::default()
        },
        status_interval: Some(Duration::ZERO),
        ..Config::default()
    };
    let mut bal = Balancer::new(config, SmallRng::seed_from_u64(1), t0);
    bal.add_backend(t0, BackendSpec::new("http://a")).unwrap();
    bal.handle_timeout(t0);
    let later = t0 + Duration::from_secs(60 * 24 * 3600);
    bal.handle_timeout(later);
    while bal.poll_action().is_some() {}
    while bal.poll_event().is_some() {}
    let next = bal.poll_timeout().unwrap();
    assert!(next > later, "poll_timeout {:?} before now", later - next);
}
