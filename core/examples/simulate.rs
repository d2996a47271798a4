//! A deterministic discrete-event simulation of the balancer in front of a fleet of
//! unequal backends, to compare policies:
//!
//! ```text
//! cargo run --release -p lb-core --example simulate
//! ```
//!
//! - 8 backends whose speeds differ up to 4x (mean service time 1 s on the fastest, 4 s
//!   on the slowest). Each serves up to `SLOTS` requests at full speed at once (an
//!   inference server's batch); beyond that its requests share it (processor sharing).
//! - Poisson arrivals at `LOAD` of the fleet's capacity, from `CLIENTS` clients. Two
//!   workloads: exponential request sizes (pure balancing), and an LLM-like one:
//!   heavy-tailed (lognormal, σ = 1.5) sizes, and a prompt cache per backend (an LRU of
//!   the last `CACHE` clients served) that saves `PREFILL` of a request's work when its
//!   client's prefix is still cached there, which sticky policies can exploit.
//! - Time jumps from event to event (arrival, completion, the core's timer); nothing
//!   sleeps. Arrivals, sizes and clients are the same for every policy (common random
//!   numbers); every RNG is seeded, so the output is the same on every run.
//! - The core is driven as an adapter drives it: `select` on arrival, `release` on
//!   completion, `handle_timeout` when `poll_timeout` is due (probes answered 200).
//!
//! Reported per policy: mean, median and p99 latency (arrival to completion) of all but
//! the first 10% of requests, the in-flight imbalance (max / mean of the backends'
//! in-flight counts, averaged over arrivals) and, for the LLM workload, the prompt-cache
//! hit rate. Cache-aware routing gets each client's key (`RequestKey::User`), hashing
//! policies the client id as their key; no backend has a connection cap. Policies marked "w = speed" give each backend
//! a weight proportional to its speed; the others use weight 1 (the operator does not
//! know the speeds). "unstable" marks a run whose backlog kept growing (some backend gets
//! more than it can serve): its numbers grow with the length of the run.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use lb_core::{
    Action, BackendId, BackendSpec, Balancer, Config, Lease, Outcome, Policy, ProbeOutcome,
    RequestKey, RequestMeta,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// Work per second of one slot of each backend (the fastest: 1, mean service 1 s).
const SPEEDS: [f64; 8] = [0.25, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0];
/// Requests each backend serves at full speed at once.
const SLOTS: f64 = 8.0;
/// Offered load, as a fraction of the fleet's capacity.
const LOAD: f64 = 0.85;
/// Requests per run.
const REQUESTS: usize = 300_000;
/// Distinct clients (conversations): the key of hashing and cache-aware policies.
const CLIENTS: u64 = 1000;
/// Clients whose prompt prefix each backend keeps cached (LLM workload).
const CACHE: usize = 64;
/// Share of a request's work saved when its prefix is cached (LLM workload).
const PREFILL: f64 = 0.4;

/// An `f64` ordered by `total_cmp`, for the heaps.
#[derive(Clone, Copy)]
struct F(f64);
impl PartialEq for F {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for F {}
impl PartialOrd for F {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for F {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// One backend: processor sharing over `SLOTS` slots, tracked in virtual work.
struct Server {
    speed: f64,
    /// Work each active request has received since the start (virtual time).
    virt: f64,
    /// Active requests by finish tag (virtual work at which each completes).
    active: BinaryHeap<Reverse<(F, usize)>>,
    /// Clients whose prefix is cached, least recently used first.
    cache: VecDeque<u64>,
}

impl Server {
    /// Whether `client`'s prefix was cached; it is now (the most recent).
    fn cached(&mut self, client: u64) -> bool {
        let hit = match self.cache.iter().position(|&c| c == client) {
            Some(i) => {
                self.cache.remove(i);
                true
            }
            None => false,
        };
        self.cache.push_back(client);
        if self.cache.len() > CACHE {
            self.cache.pop_front();
        }
        hit
    }
}

impl Server {
    /// Work per second each active request gets.
    fn rate(&self) -> f64 {
        let k = self.active.len() as f64;
        self.speed * (SLOTS / k).min(1.0)
    }

    fn next_completion(&self, now: f64) -> Option<f64> {
        let Reverse((F(tag), _)) = self.active.peek()?;
        Some(now + (tag - self.virt).max(0.0) / self.rate())
    }

    fn advance(&mut self, dt: f64) {
        if !self.active.is_empty() {
            self.virt += dt * self.rate();
        }
    }
}

struct Request {
    arrival: f64,
    size: f64,
    client: u64,
}

enum Workload {
    Exponential,
    Llm,
}

impl Workload {
    fn name(&self) -> &'static str {
        match self {
            Workload::Exponential => "exponential request sizes, no cache",
            Workload::Llm => "LLM-like: lognormal sizes (σ = 1.5), prompt cache per backend",
        }
    }

    /// The arrivals, with mean size 1 (work units; 1 s on the fastest backend).
    fn requests(&self, seed: u64) -> Vec<Request> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let capacity: f64 = SPEEDS.iter().sum::<f64>() * SLOTS;
        let lambda = LOAD * capacity;
        let mut t = 0.0;
        (0..REQUESTS)
            .map(|_| {
                t += exp(&mut rng) / lambda;
                let size = match self {
                    Workload::Exponential => exp(&mut rng),
                    Workload::Llm => {
                        // lognormal(μ, σ) with mean e^(μ + σ²/2) = 1.
                        let sigma = 1.5;
                        (sigma * normal(&mut rng) - sigma * sigma / 2.0).exp()
                    }
                };
                Request {
                    arrival: t,
                    size,
                    client: rng.random_range(0..CLIENTS),
                }
            })
            .collect()
    }
}

fn exp(rng: &mut SmallRng) -> f64 {
    -(1.0 - rng.random::<f64>()).ln()
}

fn normal(rng: &mut SmallRng) -> f64 {
    let (u, v) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

struct Stats {
    mean: f64,
    p50: f64,
    p99: f64,
    imbalance: f64,
    hits: f64,
    unstable: bool,
}

fn simulate(policy: Policy, weighted: bool, workload: &Workload, requests: &[Request]) -> Stats {
    let t0 = Instant::now();
    let at = |t: f64| t0 + Duration::from_secs_f64(t);
    let config = Config {
        policy,
        status_interval: None,
        ..Config::default()
    };
    let mut bal = Balancer::new(config, SmallRng::seed_from_u64(7), t0);
    let mut servers: Vec<Server> = Vec::new();
    let mut ids: Vec<BackendId> = Vec::new();
    for (i, &speed) in SPEEDS.iter().enumerate() {
        let spec = BackendSpec {
            weight: if weighted { (speed * 8.0) as u32 } else { 1 },
            ..BackendSpec::new(format!("http://10.0.0.{i}:8000"))
        };
        ids.push(bal.add_backend(t0, spec).unwrap());
        servers.push(Server {
            speed,
            virt: 0.0,
            active: BinaryHeap::new(),
            cache: VecDeque::new(),
        });
    }
    let mut leases: Vec<Option<Lease>> = (0..requests.len()).map(|_| None).collect();
    let mut latency = vec![0.0f64; requests.len()];
    let mut imbalance = (0.0, 0usize);
    let mut hits = 0usize;
    let mut backlog = [0.0f64; 4]; // in flight summed over arrivals, per quarter of the run
    let mut next = 0;
    let mut now = 0.0f64;
    loop {
        let arrival = requests.get(next).map(|r| r.arrival);
        let completion = servers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.next_completion(now).map(|t| (t, i)))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let timer = bal
            .poll_timeout()
            .map(|t| t.saturating_duration_since(t0).as_secs_f64());
        let t = match (arrival, completion) {
            (None, None) => break,
            (Some(a), Some((c, _))) => a.min(c),
            (Some(a), None) => a,
            (None, Some((c, _))) => c,
        };
        if let Some(tt) = timer.filter(|&tt| tt <= t) {
            // The core's timer first: sweeps; every probe passes.
            for s in &mut servers {
                s.advance(tt - now);
            }
            now = tt.max(now);
            bal.handle_timeout(at(now));
            while let Some(Action::StartProbe { probe, .. }) = bal.poll_action() {
                bal.probe_result(at(now), probe, ProbeOutcome::Status(200));
            }
            while bal.poll_event().is_some() {}
            continue;
        }
        for s in &mut servers {
            s.advance(t - now);
        }
        now = t;
        match completion {
            Some((c, i)) if arrival.is_none_or(|a| c <= a) => {
                let Reverse((_, r)) = servers[i].active.pop().unwrap();
                latency[r] = now - requests[r].arrival;
                let lease = leases[r].take().unwrap();
                bal.release(at(now), lease, Outcome::Response(200));
            }
            _ => {
                let r = next;
                next += 1;
                let req = &requests[r];
                let n: Vec<f64> = servers.iter().map(|s| s.active.len() as f64).collect();
                let total: f64 = n.iter().sum();
                backlog[r * 4 / requests.len()] += total;
                if total > 0.0 {
                    let max = n.iter().cloned().fold(0.0, f64::max);
                    imbalance.0 += max / (total / n.len() as f64);
                    imbalance.1 += 1;
                }
                let key = req.client.to_le_bytes();
                let user = RequestKey::User(req.client);
                let meta = RequestMeta::default().with_key(&key).with_affinity(&user);
                let lease = bal
                    .select(at(now), &meta)
                    .expect("no caps, every backend healthy");
                let i = ids.iter().position(|&id| id == lease.backend()).unwrap();
                let s = &mut servers[i];
                let mut work = req.size;
                if matches!(workload, Workload::Llm) && s.cached(req.client) {
                    work *= 1.0 - PREFILL;
                    hits += usize::from(r >= requests.len() / 10);
                }
                s.active.push(Reverse((F(s.virt + work), r)));
                leases[r] = Some(lease);
            }
        }
    }
    assert_eq!(bal.outstanding(), 0);
    let mut l = latency[requests.len() / 10..].to_vec();
    l.sort_by(f64::total_cmp);
    let q = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)];
    Stats {
        mean: l.iter().sum::<f64>() / l.len() as f64,
        p50: q(0.5),
        p99: q(0.99),
        imbalance: imbalance.0 / imbalance.1.max(1) as f64,
        hits: hits as f64 / l.len() as f64,
        unstable: backlog[3] > 1.5 * backlog[1],
    }
}

fn main() {
    let started = Instant::now();
    let capacity: f64 = SPEEDS.iter().sum::<f64>() * SLOTS;
    println!(
        "{} backends, speeds {:?} (mean service {:.0}–{:.0} s), {} slots each, \
         Poisson arrivals at {:.0}% of capacity ({:.1} req/s), {} requests per run.\n",
        SPEEDS.len(),
        SPEEDS,
        1.0 / SPEEDS[SPEEDS.len() - 1],
        1.0 / SPEEDS[0],
        SLOTS,
        LOAD * 100.0,
        LOAD * capacity,
        REQUESTS
    );
    // Unweighted, smooth WRR is round robin; weighted, round robin ignores the weights.
    let mut rows: Vec<(Policy, bool)> = Policy::ALL
        .iter()
        .filter(|&&p| p != Policy::WeightedRoundRobin)
        .map(|&p| (p, false))
        .collect();
    rows.extend(
        Policy::ALL
            .iter()
            .filter(|&&p| p != Policy::RoundRobin)
            .map(|&p| (p, true)),
    );
    for (n, workload) in [Workload::Exponential, Workload::Llm].iter().enumerate() {
        let requests = workload.requests(42 + n as u64);
        println!("### {}\n", workload.name());
        let llm = matches!(workload, Workload::Llm);
        println!(
            "| policy | weights | mean (s) | p50 (s) | p99 (s) | max/mean in-flight |{}",
            if llm { " cache hits |" } else { "" }
        );
        println!(
            "|---|---|---:|---:|---:|---:|{}",
            if llm { "---:|" } else { "" }
        );
        for &(policy, weighted) in &rows {
            let s = simulate(policy, weighted, workload, &requests);
            let mark = if s.unstable { " (unstable)" } else { "" };
            let hits = if llm {
                format!(" {:.0}% |", s.hits * 100.0)
            } else {
                String::new()
            };
            println!(
                "| {}{} | {} | {:.2} | {:.2} | {:.2} | {:.2} |{}",
                policy.name(),
                mark,
                if weighted { "w = speed" } else { "1" },
                s.mean,
                s.p50,
                s.p99,
                s.imbalance,
                hits
            );
        }
        println!();
    }
    eprintln!("simulated in {:.1} s", started.elapsed().as_secs_f64());
}
