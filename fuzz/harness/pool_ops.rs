//! Fuzz harness `pool_ops`: an arbitrary sequence of pool changes, selects, releases,
//! probe results and time steps against the balancer's invariants.
//!
//! Checked after every operation:
//! - each present backend's in-flight count equals the leases outstanding on it, and
//!   `outstanding()` / `summary().in_flight` equal all leases outstanding;
//! - a pick is healthy, not draining and below its cap, and a reject says truly why;
//! - after `handle_timeout(t)`, `poll_timeout()` is `None` or later than `t`, and every
//!   probe's deadline is later than `t`;
//! - health events alternate per backend (each transition once), bump the epoch on
//!   ejection only, agree with the backend's view, and have a cause that can cause them
//!   (a 4xx, 429, cancellation or passing probe never ejects; only a passing probe
//!   restores);
//! - the admission queue (when the setup turns it on): each ticket ends exactly once
//!   (admitted, expired, or cancelled while it could still be), admissions are FIFO, no
//!   wait expires before its deadline nor outlives it past a `handle_timeout`, queue
//!   deadlines are in `poll_timeout()`, and nobody waits while a backend is eligible;
//! - cache-aware routing counts every pick as warm, cold or overflow;
//! - at the end every lease is released, so the debug drop-bomb never fires.
//!
//! Shared by the cargo-fuzz target and by `core/tests/fuzz_corpus.rs`, which replays the
//! corpus on stable.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use lb_core::{
    Action, Admission, AffinityConfig, BackendError, BackendId, BackendSpec, BackendView, Balancer,
    Cause, Config, ErrorKind, Event, HealthConfig, HealthState, Lease, Outcome, OwnedMeta, Policy,
    ProbeId, ProbeOutcome, QueueConfig, Reject, RequestKey, RequestMeta, Ticket, MIN_TICK,
};
use rand::{rngs::SmallRng, SeedableRng};

#[derive(Arbitrary, Debug)]
struct Setup {
    policy: u8,
    seed: u64,
    interval_ms: u8,
    timeout_ms: u8,
    status_ms: Option<u8>,
    fall: u8,
    rise: u8,
    passive_threshold: u8,
    max_passive_ejection_percent: u8,
    queue_timeout_ms: Option<u8>,
    queue_size: u8,
    overflow_percent: u8,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Add {
        url: u8,
        weight: u16,
        max_conns: u8,
    },
    Remove(u8),
    Drain(u8),
    Select(Option<u8>),
    Release {
        lease: u8,
        outcome: u8,
    },
    Probe {
        probe: u8,
        outcome: u8,
    },
    Advance(u8),
    Tick,
    FireDue,
    Enqueue(Option<u8>),
    Cancel(u8),
    /// A release (which may admit a waiter), then a cancel before the admissions are
    /// polled: the admission is withdrawn.
    ReleaseThenCancel {
        lease: u8,
        outcome: u8,
        ticket: u8,
    },
    /// An engine load report (running, waiting, KV percent) for a known backend.
    LoadReport {
        backend: u8,
        running: u8,
        waiting: u8,
        kv: Option<u8>,
    },
}

fn outcome(k: u8) -> Outcome {
    let failed = |status, kind| Outcome::Failed {
        status,
        error: BackendError {
            kind,
            message: "fuzz".into(),
        },
    };
    let kinds = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Io,
        ErrorKind::Protocol,
    ];
    match k % 8 {
        0..=3 => Outcome::Response(100 + u16::from(k) * 2),
        4 => failed(None, kinds[usize::from(k / 8) % 4]),
        5 => failed(Some(200), kinds[usize::from(k / 8) % 4]),
        6 => Outcome::Response(429),
        _ => Outcome::Cancelled,
    }
}

fn probe_outcome(k: u8) -> ProbeOutcome {
    match k % 4 {
        0 | 1 => ProbeOutcome::Status(100 + u16::from(k) * 2),
        2 => ProbeOutcome::Error("fuzz".into()),
        _ => ProbeOutcome::TimedOut,
    }
}

/// Whether a passive outcome may count against a backend.
fn may_eject(o: &Outcome) -> bool {
    match o {
        Outcome::Response(s) => *s >= 500,
        Outcome::Failed {
            status: Some(_),
            error,
        } => error.kind != ErrorKind::Timeout,
        Outcome::Failed { status: None, .. } => true,
        Outcome::Cancelled => false,
    }
}

fn passes(o: &ProbeOutcome) -> bool {
    matches!(o, ProbeOutcome::Status(s) if (200..300).contains(s) || *s == 429)
}

struct State {
    t0: Instant,
    now: Instant,
    bal: Balancer,
    held: Vec<Lease>,
    known: Vec<BackendId>,
    probes: Vec<ProbeId>,
    /// Last known (healthy, epoch) per backend in the pool.
    health: HashMap<BackendId, (bool, u64)>,
    /// Every ticket issued.
    tickets: Vec<Ticket>,
    /// Tickets still waiting, with their deadlines.
    waiting: BTreeMap<Ticket, Instant>,
    last_admitted: Option<Ticket>,
}

/// A request's meta for key `k`: an address or a hashing key, and a cache-aware chain.
fn owned_meta(key: Option<u8>) -> OwnedMeta {
    let Some(k) = key else {
        return OwnedMeta::default();
    };
    OwnedMeta {
        client_ip: (k % 2 == 0).then(|| IpAddr::V4(Ipv4Addr::new(10, 0, k, 1))),
        key: (k % 2 == 1).then(|| vec![k]),
        affinity: Some(match k % 3 {
            0 => RequestKey::User(u64::from(k)),
            1 => RequestKey::Prefix(vec![u64::from(k / 32), u64::from(k / 8), u64::from(k)]),
            _ => RequestKey::None,
        }),
        model: None,
    }
}

impl State {
    fn view(&self, id: BackendId) -> Option<BackendView> {
        self.bal.backend(id)
    }

    fn step(&mut self, op: Op) {
        let now = self.now;
        match op {
            Op::Add {
                url,
                weight,
                max_conns,
            } => {
                let spec = BackendSpec {
                    url: format!("http://b{}", url % 16),
                    weight: u32::from(weight % 1003),
                    max_conns: u32::from(max_conns % 5),
                };
                if let Ok(id) = self.bal.add_backend(now, spec) {
                    assert!(!self.known.contains(&id), "id {id} reused");
                    self.known.push(id);
                    self.health.insert(id, (true, 0));
                }
            }
            Op::Remove(i) => {
                if let Some(&id) = pick(&self.known, i) {
                    let present = self.view(id).is_some();
                    assert_eq!(self.bal.remove_backend(now, id), present);
                }
            }
            Op::Drain(i) => {
                if let Some(&id) = pick(&self.known, i) {
                    let present = self.view(id).is_some();
                    assert_eq!(self.bal.drain_backend(now, id), present);
                }
            }
            Op::Select(key) => self.select(key),
            Op::LoadReport {
                backend,
                running,
                waiting,
                kv,
            } => {
                if let Some(&id) = pick(&self.known, backend) {
                    let present = self.view(id).is_some();
                    let mut r = lb_core::LoadReport::new(running.into(), waiting.into());
                    if let Some(kv) = kv {
                        r = r.with_kv_usage(f64::from(kv) / 100.0);
                    }
                    assert_eq!(self.bal.load_report(now, id, r), present);
                }
            }
            Op::Release { lease, outcome: k } => {
                if !self.held.is_empty() {
                    let l = self.held.swap_remove(usize::from(lease) % self.held.len());
                    self.bal.release(now, l, outcome(k));
                }
            }
            Op::Probe { probe, outcome: k } => {
                if let Some(&p) = pick(&self.probes, probe) {
                    self.bal.probe_result(now, p, probe_outcome(k));
                }
            }
            Op::Advance(ms) => self.now += Duration::from_millis(u64::from(ms)),
            Op::Enqueue(key) => self.enqueue(key),
            Op::Cancel(i) => self.cancel(i),
            Op::ReleaseThenCancel {
                lease,
                outcome: k,
                ticket,
            } => {
                if !self.held.is_empty() {
                    let l = self.held.swap_remove(usize::from(lease) % self.held.len());
                    self.bal.release(now, l, outcome(k));
                }
                self.cancel(ticket);
            }
            Op::Tick => self.tick(),
            Op::FireDue => {
                if let Some(t) = self.bal.poll_timeout() {
                    self.now = self.now.max(t);
                }
                self.tick();
            }
        }
        self.check();
    }

    fn select(&mut self, key: Option<u8>) {
        let before: Vec<BackendView> = self.bal.backends().collect();
        let ready = || serving(&before);
        let below_cap = |v: &&BackendView| v.max_conns == 0 || v.in_flight < v.max_conns;
        let owned = owned_meta(key);
        let meta: RequestMeta<'_> = owned.as_meta();
        match self.bal.select(self.now, &meta) {
            Ok(lease) => {
                let id = lease.backend();
                self.held.push(lease);
                let v = before
                    .iter()
                    .find(|v| v.id == id)
                    .expect("picked a pooled backend");
                assert!(v.healthy && !v.draining, "picked {v:?}");
                assert!(below_cap(&v), "picked a backend at its cap: {v:?}");
            }
            Err(Reject::NoHealthyBackend) => assert_eq!(ready().count(), 0),
            Err(Reject::UnknownModel) => unreachable!("no request names a model"),
            Err(Reject::AllAtCapacity) => {
                assert!(ready().count() > 0);
                assert_eq!(ready().filter(below_cap).count(), 0);
            }
        }
    }

    fn enqueue(&mut self, key: Option<u8>) {
        let q = self.bal.config().queue.clone();
        let ready = self.bal.backends().any(|v| v.healthy && !v.draining);
        let queued = self.bal.queued();
        let got = self.bal.enqueue(self.now, owned_meta(key));
        match q.timeout.filter(|_| q.size > 0) {
            None => assert_eq!(got, Err(Reject::AllAtCapacity), "queue off"),
            Some(_) if !ready => assert_eq!(got, Err(Reject::NoHealthyBackend)),
            Some(_) if queued >= q.size => {
                assert_eq!(got, Err(Reject::AllAtCapacity), "queue full")
            }
            Some(timeout) => {
                let t = got.expect("a request may queue");
                assert!(!self.tickets.contains(&t), "ticket {t} reused");
                self.tickets.push(t);
                self.waiting.insert(t, self.now + timeout.max(MIN_TICK));
            }
        }
    }

    fn cancel(&mut self, i: u8) {
        if let Some(&t) = pick(&self.tickets, i) {
            let waiting = self.waiting.remove(&t).is_some();
            assert_eq!(self.bal.cancel(self.now, t), waiting, "cancel {t}");
        }
    }

    fn tick(&mut self) {
        let now = self.now;
        self.bal.handle_timeout(now);
        while let Some(a) = self.bal.poll_action() {
            let Action::StartProbe {
                probe, deadline, ..
            } = a;
            assert!(deadline > now, "probe deadline not in the future");
            let v = self
                .view(probe.backend())
                .expect("probe of a removed backend");
            assert!(!v.draining, "probe of a draining backend");
            self.probes.push(probe);
        }
        if let Some(t) = self.bal.poll_timeout() {
            assert!(t > now, "poll_timeout() is not after handle_timeout(now)");
        }
        self.admissions();
        for (t, deadline) in &self.waiting {
            assert!(*deadline > now, "{t} still waits past its deadline");
        }
    }

    /// Drains the admissions: each ends a waiting ticket, admitted ones in FIFO order.
    fn admissions(&mut self) {
        while let Some(a) = self.bal.poll_admission() {
            let t = a.ticket();
            let deadline = self.waiting.remove(&t);
            let deadline = deadline.unwrap_or_else(|| panic!("{t} ended twice or unknown"));
            match a {
                Admission::Admitted(t, lease) => {
                    self.held.push(lease);
                    assert!(self.last_admitted < Some(t), "admitted {t} out of order");
                    self.last_admitted = Some(t);
                }
                Admission::Expired(t) => {
                    assert!(deadline <= self.now, "{t} expired before its deadline");
                }
            }
        }
    }

    fn check(&mut self) {
        assert_eq!(self.bal.poll_action(), None);
        self.admissions();
        assert_eq!(self.bal.queued(), self.waiting.len());
        if let Some(first) = self.waiting.values().min() {
            let t = self
                .bal
                .poll_timeout()
                .expect("a queue deadline is pending");
            assert!(t <= *first, "poll_timeout() after a queue deadline");
            // Nobody waits while a slot is free: a waiter would have taken it.
            let views: Vec<BackendView> = self.bal.backends().collect();
            let free = serving(&views).any(|v| v.max_conns == 0 || v.in_flight < v.max_conns);
            assert!(!free, "requests wait while a backend has a free slot");
        }
        if let Some(r) = self.bal.routing_stats() {
            assert_eq!(r.warm + r.cold + r.overflow, r.requests);
        }
        let (mut passive_ejections, mut probe_events) = (0, 0);
        while let Some(e) = self.bal.poll_event() {
            if let Event::Health { cause, .. } = &e {
                match cause {
                    Cause::Passive(_) => passive_ejections += 1,
                    Cause::Probe(_) => probe_events += 1,
                }
            }
            match e {
                Event::Health {
                    backend,
                    state,
                    cause,
                    epoch,
                    ..
                } => {
                    let (healthy, old_epoch) = self.health[&backend];
                    let now_healthy = state == HealthState::Healthy;
                    assert_ne!(
                        healthy, now_healthy,
                        "{backend}: a transition to the same state"
                    );
                    let want_epoch = old_epoch + u64::from(!now_healthy);
                    assert_eq!(epoch, want_epoch, "{backend}: epoch");
                    match (&cause, now_healthy) {
                        (Cause::Probe(o), true) => assert!(passes(o), "restored by {o:?}"),
                        (Cause::Probe(o), false) => assert!(!passes(o), "ejected by {o:?}"),
                        (Cause::Passive(o), false) => assert!(may_eject(o), "ejected by {o:?}"),
                        (Cause::Passive(o), true) => panic!("restored by traffic: {o:?}"),
                    }
                    self.health.insert(backend, (now_healthy, epoch));
                }
                Event::Removed { backend, .. } => {
                    assert!(
                        self.view(backend).is_none(),
                        "{backend} removed but present"
                    );
                    assert!(
                        self.health.remove(&backend).is_some(),
                        "{backend} removed twice"
                    );
                }
                Event::Status(r) => {
                    assert_eq!(r.total, r.backends.len());
                    assert!(r.healthy <= r.total);
                }
            }
        }
        let views: Vec<BackendView> = self.bal.backends().collect();
        assert_eq!(views.len(), self.health.len(), "pool and events disagree");
        if passive_ejections > 0 && probe_events == 0 {
            // Passive health alone never takes the pool below its floor.
            let active = views.iter().filter(|v| !v.draining);
            let total = active.clone().count() as u64;
            let healthy = active.filter(|v| v.healthy).count() as u64;
            let pct = u64::from(
                self.bal
                    .config()
                    .health
                    .max_passive_ejection_percent
                    .min(100),
            );
            let floor = (total * (100 - pct)).div_ceil(100);
            assert!(
                healthy >= floor,
                "{healthy} of {total} healthy, floor {floor}"
            );
        }
        for v in &views {
            let leases = self.held.iter().filter(|l| l.backend() == v.id).count();
            assert_eq!(
                v.in_flight as usize, leases,
                "in-flight != leases on {}",
                v.id
            );
            assert_eq!(self.health[&v.id], (v.healthy, v.epoch), "{}", v.id);
        }
        let outstanding = self.held.len() as u64;
        assert_eq!(self.bal.outstanding(), outstanding);
        assert_eq!(self.bal.summary().in_flight, outstanding);
    }
}

/// The backends a request may go to: healthy, not draining, and proven by a probe if
/// any such is proven.
fn serving(views: &[BackendView]) -> impl Iterator<Item = &BackendView> + Clone {
    let up = |v: &&BackendView| v.healthy && !v.draining;
    let proven = views.iter().filter(up).any(|v| v.proven);
    views.iter().filter(up).filter(move |v| !proven || v.proven)
}

/// The `i`-th item counted from the end (recent items are likelier), if any.
fn pick<T>(items: &[T], i: u8) -> Option<&T> {
    let n = items.len();
    (n > 0).then(|| &items[n - 1 - usize::from(i) % n])
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(setup) = Setup::arbitrary(&mut u) else {
        return;
    };
    let ms = |n: u8| Duration::from_millis(u64::from(n));
    let config = Config {
        policy: Policy::ALL[usize::from(setup.policy) % Policy::ALL.len()],
        health: HealthConfig {
            interval: ms(setup.interval_ms),
            timeout: ms(setup.timeout_ms),
            fall: u32::from(setup.fall % 5),
            rise: u32::from(setup.rise % 5),
            passive_threshold: u32::from(setup.passive_threshold % 4),
            max_passive_ejection_percent: u32::from(setup.max_passive_ejection_percent % 101),
        },
        status_interval: setup.status_ms.map(ms),
        affinity: AffinityConfig {
            overflow_percent: u32::from(setup.overflow_percent % 101),
            ..AffinityConfig::default()
        },
        queue: QueueConfig {
            timeout: setup.queue_timeout_ms.map(ms),
            size: usize::from(setup.queue_size % 5),
        },
        engine: lb_core::EngineLoadConfig {
            interval: ms(setup.timeout_ms),
            ..lb_core::EngineLoadConfig::default()
        },
        ..Config::default()
    };
    let t0 = Instant::now();
    let mut s = State {
        t0,
        now: t0,
        bal: Balancer::new(config, SmallRng::seed_from_u64(setup.seed), t0),
        held: Vec::new(),
        known: Vec::new(),
        probes: Vec::new(),
        health: HashMap::new(),
        tickets: Vec::new(),
        waiting: BTreeMap::new(),
        last_admitted: None,
    };
    while let Ok(op) = Op::arbitrary(&mut u) {
        s.step(op);
        if u.is_empty() {
            break;
        }
    }
    // Every waiter leaves, then every lease goes back.
    let now = s.now;
    for t in std::mem::take(&mut s.waiting).into_keys() {
        assert!(s.bal.cancel(now, t), "cancel {t}");
    }
    while let Some(l) = s.held.pop() {
        s.bal.release(now, l, Outcome::Cancelled);
        s.check();
    }
    assert_eq!(s.bal.queued(), 0);
    assert_eq!(s.bal.poll_admission(), None);
    assert_eq!(s.bal.outstanding(), 0);
    assert!(s.bal.backends().all(|v| v.in_flight == 0));
    assert!(s.now >= s.t0);
}
