//! Property tests of cache-aware routing against a reference model (longest prefix,
//! overflow, recording, TTL, epoch invalidation), of the table's memory bound, and of
//! consistent hashing's minimal disruption.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lb_core::{
    Action, AffinityConfig, BackendId, BackendSpec, Balancer, Config, HealthConfig, Lease, Outcome,
    Policy, ProbeOutcome, Reject, RequestKey, RequestMeta, RoutingStats,
};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::SeedableRng;

const MS: Duration = Duration::from_millis(1);

#[derive(Clone, Debug)]
enum Op {
    /// A request whose chain is the path `digits` in a small tree (shared prefixes).
    Select(Vec<u8>),
    /// Release the held lease at this index (modulo).
    Release(usize),
    /// Advance the clock.
    Advance(u8),
    /// Run `handle_timeout` and answer the probes it starts.
    Tick,
    /// Make a backend fail (true) or pass (false) its next probes.
    SetDown(usize, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec(0u8..3, 1..7).prop_map(Op::Select),
        4 => any::<usize>().prop_map(Op::Release),
        2 => (1u8..40).prop_map(Op::Advance),
        1 => Just(Op::Tick),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(i, d)| Op::SetDown(i, d)),
    ]
}

/// The chain of a tree path: unit i names the path's first i + 1 digits.
fn units(path: &[u8]) -> Vec<u64> {
    let mut h = 0x1234_5678u64;
    path.iter()
        .map(|&d| {
            h = h.wrapping_mul(0x0100_0000_01b3) ^ (u64::from(d) + 1);
            h.rotate_left(17) ^ h.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        })
        .collect()
}

#[derive(Debug)]
struct MBackend {
    id: BackendId,
    max_conns: u32,
    in_flight: u32,
    healthy: bool,
    epoch: u64,
    down: bool,
}

struct Harness {
    bal: Balancer,
    now: Instant,
    ttl: Duration,
    percent: u32,
    all_holders: bool,
    backends: Vec<MBackend>,
    /// (unit, backend index) → (the backend's epoch then, last use)
    entries: HashMap<(u64, usize), (u64, Instant)>,
    held: Vec<(Lease, usize)>,
    expect: RoutingStats,
}

impl Harness {
    fn new(caps: &[u32], ttl_ms: u64, percent: u32, all_holders: bool, seed: u64) -> Self {
        let t0 = Instant::now();
        let config = Config {
            policy: Policy::CacheAware,
            health: HealthConfig {
                interval: MS,
                timeout: MS,
                fall: 1,
                rise: 1,
                passive_threshold: 0,
                ..HealthConfig::default()
            },
            status_interval: None,
            affinity: AffinityConfig {
                ttl: Duration::from_millis(ttl_ms),
                overflow_percent: percent,
                entries_per_conn: 100_000,
                all_holders,
            },
            ..Config::default()
        };
        let mut bal = Balancer::new(config, SmallRng::seed_from_u64(seed), t0);
        let backends = caps
            .iter()
            .enumerate()
            .map(|(i, &max_conns)| MBackend {
                id: bal
                    .add_backend(
                        t0,
                        BackendSpec {
                            max_conns,
                            ..BackendSpec::new(format!("http://b{i}"))
                        },
                    )
                    .unwrap(),
                max_conns,
                in_flight: 0,
                healthy: true,
                epoch: 0,
                down: false,
            })
            .collect();
        Harness {
            bal,
            now: t0,
            ttl: Duration::from_millis(ttl_ms),
            percent,
            all_holders,
            backends,
            entries: HashMap::new(),
            held: Vec::new(),
            expect: RoutingStats::default(),
        }
    }

    fn index(&self, id: BackendId) -> usize {
        self.backends.iter().position(|b| b.id == id).unwrap()
    }

    /// The backends holding `unit` live: used within the TTL, healthy, same epoch.
    fn holders(&self, unit: u64) -> Vec<usize> {
        (0..self.backends.len())
            .filter(|&i| {
                self.entries.get(&(unit, i)).is_some_and(|&(epoch, used)| {
                    let b = &self.backends[i];
                    self.now.duration_since(used) < self.ttl && b.healthy && b.epoch == epoch
                })
            })
            .collect()
    }

    fn select(&mut self, path: &[u8]) {
        let chain = units(path);
        let key = RequestKey::Prefix(chain.clone());
        let ready: Vec<usize> = (0..self.backends.len())
            .filter(|&i| self.backends[i].healthy)
            .collect();
        let open: Vec<usize> = ready
            .iter()
            .copied()
            .filter(|&i| self.backends[i].in_flight < self.backends[i].max_conns)
            .collect();
        let min = ready.iter().map(|&i| self.backends[i].in_flight).min();
        let guard = |b: &MBackend| {
            b.in_flight < b.max_conns
                && u64::from(b.in_flight - min.unwrap()) * 100
                    <= u64::from(self.percent) * u64::from(b.max_conns)
        };
        // The deepest unit with a live holder, and the deepest with one the guard allows.
        let deepest = (0..chain.len())
            .rev()
            .find(|&i| !self.holders(chain[i]).is_empty());
        let allowed = if !self.all_holders {
            // One holder per unit (the last to serve it), considered only at the deepest
            // live unit.
            deepest.and_then(|d| {
                let h = self.holders(chain[d]);
                assert_eq!(h.len(), 1, "re-pointing keeps one holder");
                guard(&self.backends[h[0]]).then_some((d, h))
            })
        } else {
            (0..chain.len()).rev().find_map(|i| {
                let ok: Vec<usize> = self
                    .holders(chain[i])
                    .into_iter()
                    .filter(|&h| guard(&self.backends[h]))
                    .collect();
                (!ok.is_empty()).then_some((i, ok))
            })
        };
        let got = self
            .bal
            .select(self.now, &RequestMeta::default().with_affinity(&key));
        match got {
            Err(r) => {
                if ready.is_empty() {
                    assert_eq!(r, Reject::NoHealthyBackend);
                } else {
                    assert!(open.is_empty(), "refused with free backends");
                    assert_eq!(r, Reject::AllAtCapacity);
                }
            }
            Ok(lease) => {
                let i = self.index(lease.backend());
                let load = self.backends[i].in_flight;
                let (pool, what) = match &allowed {
                    Some((_, ok)) => (ok.clone(), "the least-loaded allowed holder"),
                    None => (open.clone(), "least conn"),
                };
                assert!(
                    pool.contains(&i),
                    "picked {i}, not one of {pool:?} ({what})"
                );
                let least = pool.iter().map(|&o| self.backends[o].in_flight).min();
                assert_eq!(Some(load), least, "{what}");
                match (deepest, &allowed) {
                    (None, _) => self.expect.cold += 1,
                    (Some(d), Some((a, _))) if *a == d => self.expect.warm += 1,
                    (Some(_), _) => self.expect.overflow += 1,
                }
                self.expect.requests += 1;
                let epoch = self.backends[i].epoch;
                for &u in &chain {
                    if !self.all_holders {
                        self.entries.retain(|&(v, _), _| v != u);
                    }
                    self.entries.insert((u, i), (epoch, self.now));
                }
                self.backends[i].in_flight += 1;
                self.held.push((lease, i));
            }
        }
        let s = self.bal.routing_stats().unwrap();
        assert_eq!(
            (s.requests, s.warm, s.cold, s.overflow),
            (
                self.expect.requests,
                self.expect.warm,
                self.expect.cold,
                self.expect.overflow
            )
        );
    }

    fn tick(&mut self) {
        self.bal.handle_timeout(self.now);
        while let Some(Action::StartProbe { probe, .. }) = self.bal.poll_action() {
            let i = self.index(probe.backend());
            let b = &mut self.backends[i];
            let status = if b.down { 500 } else { 200 };
            match (b.healthy, b.down) {
                (true, true) => {
                    b.healthy = false;
                    b.epoch += 1;
                }
                (false, false) => b.healthy = true,
                _ => {}
            }
            self.bal
                .probe_result(self.now, probe, ProbeOutcome::Status(status));
        }
        while self.bal.poll_event().is_some() {}
        for b in &self.backends {
            let v = self.bal.backend(b.id).unwrap();
            assert_eq!((v.healthy, v.epoch), (b.healthy, b.epoch));
        }
    }

    fn run(&mut self, op: Op) {
        match op {
            Op::Select(path) => self.select(&path),
            Op::Release(k) => {
                if !self.held.is_empty() {
                    let (lease, i) = self.held.swap_remove(k % self.held.len());
                    self.backends[i].in_flight -= 1;
                    // Passive health is off: outcomes do not move health.
                    self.bal.release(self.now, lease, Outcome::Response(200));
                }
            }
            Op::Advance(ms) => self.now += u32::from(ms) * MS,
            Op::Tick => self.tick(),
            Op::SetDown(i, down) => {
                let n = self.backends.len();
                self.backends[i % n].down = down;
            }
        }
    }

    fn finish(mut self) {
        for (lease, _) in self.held.drain(..) {
            self.bal.release(self.now, lease, Outcome::Cancelled);
        }
        assert_eq!(self.bal.outstanding(), 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// Every cache-aware pick is the model's. Re-pointing (the default): the last holder
    /// of the longest live prefix if the guard allows it, else a least-loaded open
    /// backend. All holders: the least-loaded holder, among those the guard allows, of
    /// the longest prefix such a holder has; else a least-loaded open backend. Counters
    /// agree (warm: the longest live prefix itself).
    #[test]
    fn cache_aware_matches_the_model(
        caps in proptest::collection::vec(1u32..6, 1..5),
        ttl_ms in 5u64..200,
        percent in prop_oneof![Just(0u32), Just(20), Just(50), 0u32..150],
        all_holders in any::<bool>(),
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let mut h = Harness::new(&caps, ttl_ms, percent, all_holders, seed);
        for op in ops {
            h.run(op);
        }
        h.finish();
    }

    /// Whatever the traffic, the table holds at most Σ max_conns × entries_per_conn.
    #[test]
    fn the_table_stays_within_its_bound(
        caps in proptest::collection::vec(1u32..4, 1..5),
        per_conn in 1u32..5,
        all_holders in any::<bool>(),
        seed in any::<u64>(),
        requests in proptest::collection::vec(
            (proptest::collection::vec(0u64..40, 1..40), any::<bool>()), 1..300),
    ) {
        let now = Instant::now();
        let config = Config {
            policy: Policy::CacheAware,
            status_interval: None,
            affinity: AffinityConfig { entries_per_conn: per_conn, all_holders, ..AffinityConfig::default() },
            ..Config::default()
        };
        let mut bal = Balancer::new(config, SmallRng::seed_from_u64(seed), now);
        for (i, &c) in caps.iter().enumerate() {
            bal.add_backend(now, BackendSpec { max_conns: c, ..BackendSpec::new(format!("http://b{i}")) }).unwrap();
        }
        let bound: usize = caps.iter().map(|&c| (c * per_conn) as usize).sum();
        let mut held = Vec::new();
        for (chain, keep) in requests {
            let key = RequestKey::Prefix(chain.iter().scan(0u64, |h, &u| { *h = h.wrapping_mul(31) ^ u; Some(*h) }).collect());
            if let Ok(l) = bal.select(now, &RequestMeta::default().with_affinity(&key)) {
                if keep { held.push(l) } else { bal.release(now, l, Outcome::Response(200)) }
            } else if let Some(l) = held.pop() {
                bal.release(now, l, Outcome::Response(200));
            }
            prop_assert!(bal.routing_stats().unwrap().keys <= bound);
        }
        for l in held {
            bal.release(now, l, Outcome::Response(200));
        }
    }

    /// Consistent hashing moves only the keys of a backend that leaves, and a backend
    /// that joins takes keys only for itself.
    #[test]
    fn consistent_hash_moves_only_what_it_must(
        weights in proptest::collection::vec(1u32..6, 2..8),
        leaver in any::<usize>(),
        seed in any::<u64>(),
    ) {
        let now = Instant::now();
        let config = Config { policy: Policy::ConsistentHash, status_interval: None, ..Config::default() };
        let mut bal = Balancer::new(config, SmallRng::seed_from_u64(seed), now);
        let ids: Vec<BackendId> = weights.iter().enumerate().map(|(i, &w)| {
            bal.add_backend(now, BackendSpec { weight: w, ..BackendSpec::new(format!("http://b{i}")) }).unwrap()
        }).collect();
        let keys: Vec<Vec<u8>> = (0..400u32).map(|k| format!("user-{k}").into_bytes()).collect();
        let map = |bal: &mut Balancer| -> Vec<BackendId> {
            keys.iter().map(|k| {
                let l = bal.select(now, &RequestMeta::default().with_key(k)).unwrap();
                let id = l.backend();
                bal.release(now, l, Outcome::Response(200));
                id
            }).collect()
        };
        let before = map(&mut bal);
        let gone = ids[leaver % ids.len()];
        bal.remove_backend(now, gone);
        let after = map(&mut bal);
        for (b, a) in before.iter().zip(&after) {
            if *b != gone {
                prop_assert_eq!(a, b, "a key of a staying backend moved");
            } else {
                prop_assert_ne!(*a, gone);
            }
        }
        let new = bal.add_backend(now, BackendSpec::new("http://new")).unwrap();
        let joined = map(&mut bal);
        for (a, j) in after.iter().zip(&joined) {
            prop_assert!(j == a || *j == new, "a key moved between old backends");
        }
        // The same key without a key falls back to the client's address.
        let ip = "10.1.2.3".parse().unwrap();
        let l1 = bal.select(now, &RequestMeta::from_ip(ip)).unwrap();
        let l2 = bal.select(now, &RequestMeta::from_ip(ip)).unwrap();
        prop_assert_eq!(l1.backend(), l2.backend());
        bal.release(now, l1, Outcome::Response(200));
        bal.release(now, l2, Outcome::Response(200));
    }
}

/// Rendezvous shares: with equal weights, removing one of n backends moves about 1/n of
/// the keys (and only those).
#[test]
fn consistent_hash_disruption_is_one_nth() {
    let now = Instant::now();
    let config = Config {
        policy: Policy::ConsistentHash,
        status_interval: None,
        ..Config::default()
    };
    let mut bal = Balancer::new(config, SmallRng::seed_from_u64(1), now);
    let ids: Vec<BackendId> = (0..5)
        .map(|i| {
            bal.add_backend(now, BackendSpec::new(format!("http://b{i}")))
                .unwrap()
        })
        .collect();
    let keys: Vec<Vec<u8>> = (0..10_000u32)
        .map(|k| format!("session-{k}").into_bytes())
        .collect();
    let map = |bal: &mut Balancer| -> Vec<BackendId> {
        keys.iter()
            .map(|k| {
                let l = bal
                    .select(now, &RequestMeta::default().with_key(k))
                    .unwrap();
                let id = l.backend();
                bal.release(now, l, Outcome::Response(200));
                id
            })
            .collect()
    };
    let before = map(&mut bal);
    for id in &ids {
        let share = before.iter().filter(|b| *b == id).count();
        assert!((1600..2400).contains(&share), "{id}: {share} of 10000");
    }
    bal.remove_backend(now, ids[2]);
    let after = map(&mut bal);
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let owned = before.iter().filter(|b| **b == ids[2]).count();
    assert_eq!(moved, owned, "exactly the leaver's keys moved");
}
