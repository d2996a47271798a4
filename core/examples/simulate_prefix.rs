//! A deterministic discrete-event simulation of LLM chat traffic, to compare how much of
//! each prompt a backend finds already in its prefix cache under each policy:
//!
//! ```text
//! cargo run --release -p lb-core --example simulate_prefix [-- --minutes 60 --seed 1]
//! ```
//!
//! Workload (defaults; every knob is a flag, see `params`):
//!
//! - 8 backends, `max_conns` 32 each. Each backend has a prefix cache of 400 k tokens
//!   (about what an 8 B model leaves for KV on one 80 GB GPU), kept in LRU order at the
//!   granularity of chain units (as vLLM and SGLang do with their blocks); it finds the
//!   longest cached prefix of a prompt from its start.
//! - Sessions arrive as a Poisson process (3.9 a second); each picks one of 24 shared
//!   system prompts (Zipf popularity, 1-4 k tokens) and has 2-16 turns. Turn `t` sends
//!   the system prompt, every earlier message and a new user message (20-400 tokens); its
//!   answer (100-700 tokens) joins the conversation, and the next turn comes after a think
//!   time (exponential, mean 15 s). Service time is 1 s + 10 ms per answer token, the same
//!   under every policy, so every policy carries the same load (about 70 % of the fleet's
//!   `max_conns`).
//! - Keys are chains shaped as [`RequestKey::from_body`](lb_core::RequestKey::from_body)
//!   builds them: one unit per 256-token block (1 KiB of text) of each message,
//!   cumulative hashes. Consistent hashing keys by session (the OpenAI `user` field).
//! - A request that finds every backend full waits in FIFO order for the next free slot.
//! - The oracle knows every backend's cache: it sends each request to the backend with
//!   the longest cached prefix among those the same load guard allows (below the cap and
//!   at most 20 % of `max_conns` above the least loaded), ties to the least loaded.
//!
//! Reported per policy, over all but the first `warmup` minutes: prefix reuse (cached
//! prompt tokens / prompt tokens), the share of the oracle's reuse, and the in-flight
//! imbalance (max / mean over backends of their time-averaged in-flight count). The goal
//! for cache-aware routing is at least 90 % of the oracle's reuse with max/mean ≤ 1.2.
//!
//! Cache-aware runs twice: with the default table (re-pointing: one holder per unit)
//! and with `all_holders` (every backend that served a unit; "cache-aware/all").
//!
//! `--sweep 1` instead runs both cache-aware variants and the oracle over cache sizes
//! (80 k-1 M tokens) and two loads, with the default table size and with one sized to
//! the cache (32 entries per connection), to show how cache pressure affects the table.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use lb_core::{
    BackendId, BackendSpec, Balancer, Config, Lease, Outcome, Policy, RequestKey, RequestMeta,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// Tokens per chain block (1 KiB of text at about 4 bytes a token).
const BLOCK_TOKENS: u32 = 256;

#[derive(Clone, Debug)]
struct Params {
    backends: usize,
    max_conns: u32,
    cache_tokens: u64,
    minutes: u64,
    warmup: u64,
    sessions_per_sec: f64,
    prompts: usize,
    think_secs: f64,
    seed: u64,
    overflow_percent: u32,
    entries_per_conn: u32,
    sweep: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            backends: 8,
            max_conns: 32,
            cache_tokens: 400_000,
            minutes: 60,
            warmup: 10,
            sessions_per_sec: 3.9,
            prompts: 24,
            think_secs: 15.0,
            seed: 1,
            overflow_percent: 20,
            entries_per_conn: lb_core::AffinityConfig::default().entries_per_conn,
            sweep: false,
        }
    }
}

fn params() -> Params {
    let mut p = Params::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).map(String::as_str).unwrap_or("");
        let num = |v: &str| -> f64 { v.parse().unwrap_or_else(|_| panic!("bad value {v}")) };
        match pair[0].as_str() {
            "--backends" => p.backends = num(v) as usize,
            "--max-conns" => p.max_conns = num(v) as u32,
            "--cache-tokens" => p.cache_tokens = num(v) as u64,
            "--minutes" => p.minutes = num(v) as u64,
            "--warmup" => p.warmup = num(v) as u64,
            "--sessions-per-sec" => p.sessions_per_sec = num(v),
            "--prompts" => p.prompts = num(v) as usize,
            "--think" => p.think_secs = num(v),
            "--seed" => p.seed = num(v) as u64,
            "--overflow-percent" => p.overflow_percent = num(v) as u32,
            "--entries-per-conn" => p.entries_per_conn = num(v) as u32,
            "--sweep" => p.sweep = num(v) != 0.0,
            other => panic!("unknown flag {other}"),
        }
    }
    p
}

// ---------------------------------------------------------------------------- workload

/// One chain unit: its cumulative hash and how many tokens it covers.
#[derive(Clone, Copy, Debug)]
struct Unit {
    hash: u64,
    tokens: u32,
}

/// A whole conversation, laid out as the chain of its last request plus answer.
struct Session {
    id: u64,
    units: Vec<Unit>,
    /// `prompt_end[t]`: units in turn t's prompt; `answer_end[t]`: with its answer.
    prompt_end: Vec<usize>,
    answer_end: Vec<usize>,
    answer_tokens: Vec<u32>,
    start: f64,
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Appends a message of `tokens` tokens (content id `content`) as blocks.
fn push_message(units: &mut Vec<Unit>, content: u64, tokens: u32) {
    let blocks = tokens.div_ceil(BLOCK_TOKENS).max(1);
    for b in 0..blocks {
        let prev = units.last().map_or(0x5eed, |u| u.hash);
        let size = if b + 1 == blocks {
            tokens - b * BLOCK_TOKENS
        } else {
            BLOCK_TOKENS
        };
        units.push(Unit {
            hash: mix(prev.rotate_left(23) ^ mix(content ^ u64::from(b) << 48)),
            tokens: size.max(1),
        });
    }
}

fn exp(rng: &mut SmallRng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

fn workload(p: &Params, rng: &mut SmallRng) -> Vec<Session> {
    // Zipf(1) popularity over the system prompts, fixed sizes per prompt.
    let prompt_tokens: Vec<u32> = (0..p.prompts)
        .map(|_| rng.random_range(1000..4000))
        .collect();
    let weights: Vec<f64> = (1..=p.prompts).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    let horizon = (p.minutes * 60) as f64;
    let mut sessions = Vec::new();
    let mut t = 0.0;
    loop {
        t += exp(rng, 1.0 / p.sessions_per_sec);
        if t >= horizon {
            break;
        }
        let mut x = rng.random::<f64>() * total;
        let prompt = weights
            .iter()
            .position(|w| {
                x -= w;
                x <= 0.0
            })
            .unwrap_or(p.prompts - 1);
        let id = sessions.len() as u64;
        let mut units = Vec::new();
        push_message(
            &mut units,
            0x5157_0000 + prompt as u64,
            prompt_tokens[prompt],
        );
        let turns = rng.random_range(2..=16);
        let (mut prompt_end, mut answer_end, mut answer_tokens) = (vec![], vec![], vec![]);
        for turn in 0..turns {
            let content = mix(id << 20 | turn << 1);
            push_message(&mut units, content, rng.random_range(20..400));
            prompt_end.push(units.len());
            let answer = rng.random_range(100..700);
            push_message(&mut units, content | 1, answer);
            answer_end.push(units.len());
            answer_tokens.push(answer);
        }
        sessions.push(Session {
            id,
            units,
            prompt_end,
            answer_end,
            answer_tokens,
            start: t,
        });
    }
    sessions
}

// ---------------------------------------------------------------------------- caches

/// A backend's prefix cache: LRU over units, bounded in tokens.
struct Cache {
    capacity: u64,
    used: u64,
    clock: u64,
    /// hash → (tokens, stamp)
    units: HashMap<u64, (u32, u64)>,
    lru: BTreeMap<u64, u64>,
}

impl Cache {
    fn new(capacity: u64) -> Self {
        Cache {
            capacity,
            used: 0,
            clock: 0,
            units: HashMap::new(),
            lru: BTreeMap::new(),
        }
    }

    /// Cached tokens of the longest cached prefix of `units`.
    fn hit(&self, units: &[Unit]) -> u64 {
        units
            .iter()
            .take_while(|u| self.units.contains_key(&u.hash))
            .map(|u| u64::from(u.tokens))
            .sum()
    }

    /// Touches (or inserts) every unit, deepest first so the shared start is freshest.
    fn fill(&mut self, units: &[Unit]) {
        for u in units.iter().rev() {
            self.clock += 1;
            if let Some((_, stamp)) = self.units.get_mut(&u.hash) {
                self.lru.remove(stamp);
                *stamp = self.clock;
            } else {
                self.units.insert(u.hash, (u.tokens, self.clock));
                self.used += u64::from(u.tokens);
            }
            self.lru.insert(self.clock, u.hash);
        }
        while self.used > self.capacity {
            let (_, h) = self.lru.pop_first().expect("used > 0 means entries");
            let (tokens, _) = self.units.remove(&h).expect("in the map");
            self.used -= u64::from(tokens);
        }
    }
}

// ---------------------------------------------------------------------------- routers

enum Router {
    Core {
        bal: Box<Balancer>,
        ids: Vec<BackendId>,
        leases: HashMap<u64, Lease>,
        user_key: bool,
    },
    Oracle {
        rng: SmallRng,
        max_conns: u32,
        overflow_percent: u32,
    },
}

impl Router {
    fn core(policy: Policy, p: &Params) -> Router {
        Router::core_with(policy, p, false)
    }

    /// A core router; `all_holders` sets [`lb_core::AffinityConfig::all_holders`].
    fn core_with(policy: Policy, p: &Params, all_holders: bool) -> Router {
        let now = base();
        let mut config = Config {
            policy,
            status_interval: None,
            ..Config::default()
        };
        config.affinity.overflow_percent = p.overflow_percent;
        config.affinity.entries_per_conn = p.entries_per_conn;
        config.affinity.all_holders = all_holders;
        let mut bal = Balancer::new(config, SmallRng::seed_from_u64(p.seed), now);
        let ids = (0..p.backends)
            .map(|i| {
                let spec = BackendSpec {
                    max_conns: p.max_conns,
                    ..BackendSpec::new(format!("http://10.0.0.{i}:8000"))
                };
                bal.add_backend(now, spec).expect("valid backend")
            })
            .collect();
        Router::Core {
            bal: Box::new(bal),
            ids,
            leases: HashMap::new(),
            user_key: policy == Policy::ConsistentHash,
        }
    }

    /// Picks a backend for request `req` of `session` (prompt `units`), or None if all
    /// are full.
    fn pick(
        &mut self,
        now: Instant,
        req: u64,
        session: &Session,
        units: &[Unit],
        caches: &[Cache],
        in_flight: &[u32],
    ) -> Option<usize> {
        match self {
            Router::Core {
                bal,
                ids,
                leases,
                user_key,
            } => {
                let key = RequestKey::Prefix(units.iter().map(|u| u.hash).collect());
                let user = session.id.to_le_bytes();
                let mut meta = RequestMeta::default().with_affinity(&key);
                if *user_key {
                    meta = meta.with_key(&user);
                }
                let lease = bal.select(now, &meta).ok()?;
                let i = ids.iter().position(|&id| id == lease.backend()).unwrap();
                leases.insert(req, lease);
                Some(i)
            }
            Router::Oracle {
                rng,
                max_conns,
                overflow_percent,
            } => {
                let min = *in_flight.iter().min().unwrap();
                let mut best: Option<(u64, u32, usize)> = None;
                let mut ties = 0;
                for (i, c) in caches.iter().enumerate() {
                    let load = in_flight[i];
                    if load >= *max_conns || (load - min) * 100 > *overflow_percent * *max_conns {
                        continue;
                    }
                    let score = (c.hit(units), Reverse(load));
                    match best.map(|(h, l, _)| score.cmp(&(h, Reverse(l)))) {
                        None | Some(std::cmp::Ordering::Greater) => {
                            best = Some((score.0, load, i));
                            ties = 1;
                        }
                        Some(std::cmp::Ordering::Equal) => {
                            ties += 1;
                            if rng.random_range(0..ties) == 0 {
                                best = Some((score.0, load, i));
                            }
                        }
                        Some(std::cmp::Ordering::Less) => {}
                    }
                }
                best.map(|(_, _, i)| i)
            }
        }
    }

    fn oracle(p: &Params) -> Router {
        Router::Oracle {
            rng: SmallRng::seed_from_u64(p.seed ^ 7),
            max_conns: p.max_conns,
            overflow_percent: p.overflow_percent,
        }
    }

    fn done(&mut self, now: Instant, req: u64) {
        if let Router::Core { bal, leases, .. } = self {
            let lease = leases.remove(&req).expect("a lease per request");
            bal.release(now, lease, Outcome::Response(200));
        }
    }
}

fn base() -> Instant {
    use std::sync::OnceLock;
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

// ---------------------------------------------------------------------------- the run

#[derive(Default)]
struct Report {
    prompt_tokens: u64,
    cached_tokens: u64,
    requests: u64,
    waited: u64,
    /// ∫ in_flight dt per backend, after the warm-up.
    area: Vec<f64>,
    /// The core's cache-aware counters (whole run).
    routing: Option<lb_core::RoutingStats>,
}

impl Report {
    fn reuse(&self) -> f64 {
        self.cached_tokens as f64 / self.prompt_tokens as f64
    }

    /// (max / mean, mean) of the backends' time-averaged in-flight counts.
    fn imbalance(&self, p: &Params) -> (f64, f64) {
        let span = ((p.minutes - p.warmup) * 60) as f64;
        let means: Vec<f64> = self.area.iter().map(|a| a / span).collect();
        let mean = means.iter().sum::<f64>() / means.len() as f64;
        let max = means.iter().cloned().fold(0.0, f64::max);
        (max / mean, mean)
    }
}

#[derive(PartialEq)]
struct T(f64);
impl Eq for T {}
impl PartialOrd for T {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for T {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// Session s sends turn t.
    Send(usize, usize),
    /// Request done: (request id, backend, session, turn).
    Done(u64, usize, usize, usize),
}

fn run(mut router: Router, sessions: &[Session], p: &Params) -> Report {
    let mut rng = SmallRng::seed_from_u64(p.seed ^ 0xabcdef);
    let mut caches: Vec<Cache> = (0..p.backends)
        .map(|_| Cache::new(p.cache_tokens))
        .collect();
    let mut in_flight = vec![0u32; p.backends];
    let mut heap: BinaryHeap<Reverse<(T, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<Reverse<(T, u64, Ev)>>, t: f64, e: Ev| {
        seq += 1;
        heap.push(Reverse((T(t), seq, e)));
    };
    for (s, sess) in sessions.iter().enumerate() {
        push(&mut heap, sess.start, Ev::Send(s, 0));
    }
    let warmup = (p.warmup * 60) as f64;
    let end = (p.minutes * 60) as f64;
    let mut report = Report {
        area: vec![0.0; p.backends],
        ..Report::default()
    };
    let mut waiting: VecDeque<(usize, usize, f64)> = VecDeque::new();
    let mut last = 0.0f64;
    let mut next_req = 0u64;
    while let Some(Reverse((T(t), _, ev))) = heap.pop() {
        if t > end {
            break;
        }
        if t > warmup {
            let from = last.max(warmup);
            for (a, &n) in report.area.iter_mut().zip(&in_flight) {
                *a += f64::from(n) * (t - from);
            }
        }
        last = t;
        let now = base() + Duration::from_secs_f64(t);
        match ev {
            Ev::Send(s, turn) => waiting.push_back((s, turn, t)),
            Ev::Done(req, b, s, turn) => {
                in_flight[b] -= 1;
                router.done(now, req);
                let sess = &sessions[s];
                caches[b].fill(&sess.units[..sess.answer_end[turn]]);
                if turn + 1 < sess.prompt_end.len() {
                    let think = exp(&mut rng, p.think_secs);
                    push(&mut heap, t + think, Ev::Send(s, turn + 1));
                }
            }
        }
        // Start whatever can start, oldest first.
        while let Some(&(s, turn, since)) = waiting.front() {
            let sess = &sessions[s];
            let units = &sess.units[..sess.prompt_end[turn]];
            let req = next_req;
            let Some(b) = router.pick(now, req, sess, units, &caches, &in_flight) else {
                break;
            };
            waiting.pop_front();
            next_req += 1;
            in_flight[b] += 1;
            if t > warmup {
                report.requests += 1;
                report.waited += u64::from(t > since);
                report.prompt_tokens += units.iter().map(|u| u64::from(u.tokens)).sum::<u64>();
                report.cached_tokens += caches[b].hit(units);
            }
            caches[b].fill(units);
            let service = 1.0 + 0.01 * f64::from(sess.answer_tokens[turn]);
            push(&mut heap, t + service, Ev::Done(req, b, s, turn));
        }
    }
    if let Router::Core { bal, .. } = &router {
        report.routing = bal.routing_stats();
    }
    if let Router::Core { bal, leases, .. } = &mut router {
        for (_, l) in leases.drain() {
            bal.release(
                base() + Duration::from_secs(end as u64),
                l,
                Outcome::Cancelled,
            );
        }
    }
    report
}

fn main() {
    let p = params();
    if p.sweep {
        return sweep(&p);
    }
    let mut rng = SmallRng::seed_from_u64(p.seed);
    let sessions = workload(&p, &mut rng);
    describe(&p, &sessions);
    let runs: Vec<(&str, Router)> = vec![
        ("least-conn", Router::core(Policy::LeastConn, &p)),
        ("p2c", Router::core(Policy::P2c, &p)),
        ("consistent-hash", Router::core(Policy::ConsistentHash, &p)),
        ("cache-aware", Router::core(Policy::CacheAware, &p)),
        (
            "cache-aware/all",
            Router::core_with(Policy::CacheAware, &p, true),
        ),
        ("oracle", Router::oracle(&p)),
    ];
    let rows: Vec<(&str, Report)> = runs
        .into_iter()
        .map(|(name, router)| (name, run(router, &sessions, &p)))
        .collect();
    let oracle = rows.last().map(|(_, r)| r.reuse()).unwrap();
    println!();
    println!(
        "| policy          | prefix reuse | of oracle | max/mean in-flight | mean in-flight | waited |"
    );
    println!(
        "|-----------------|-------------:|----------:|-------------------:|---------------:|-------:|"
    );
    for (name, r) in &rows {
        let (imbalance, mean) = r.imbalance(&p);
        println!(
            "| {name:<15} | {:>11.1}% | {:>8.1}% | {:>18.3} | {:>14.1} | {:>5.2}% |",
            100.0 * r.reuse(),
            100.0 * r.reuse() / oracle,
            imbalance,
            mean,
            100.0 * r.waited as f64 / r.requests as f64,
        );
    }
    for (name, r) in &rows {
        if let Some(s) = r.routing {
            println!("\n{name} routing (whole run): {s}");
        }
    }
}

fn describe(p: &Params, sessions: &[Session]) {
    let turns: usize = sessions.iter().map(|s| s.prompt_end.len()).sum();
    println!(
        "prefix workload: {} backends × max_conns {}, cache {} k tokens each, {} min ({} warm-up), \
         {} sessions, {} requests, {} system prompts, guard {} %, {} entries/conn, seed {}",
        p.backends,
        p.max_conns,
        p.cache_tokens / 1000,
        p.minutes,
        p.warmup,
        sessions.len(),
        turns,
        p.prompts,
        p.overflow_percent,
        p.entries_per_conn,
        p.seed
    );
}

/// Cache-aware's share of the oracle's reuse across cache sizes and loads, with the
/// default table size and with one sized to the cache.
fn sweep(base: &Params) {
    println!(
        "cache-aware reuse as a share of the oracle's (max/mean in-flight), {} min runs; \
         re-point: the default, all: all_holders; per conn: entries_per_conn",
        base.minutes
    );
    println!();
    println!(
        "| sessions/s | cache/backend | re-point, {0}/conn | re-point, 32/conn | all, {0}/conn | all, 32/conn | oracle reuse |",
        base.entries_per_conn
    );
    println!(
        "|-----------:|--------------:|------------------:|------------------:|-------------:|-------------:|-------------:|"
    );
    for load in [2.4, 3.9] {
        for cache in [80_000u64, 160_000, 400_000, 1_000_000] {
            let mut p = base.clone();
            p.sessions_per_sec = load;
            p.cache_tokens = cache;
            let mut rng = SmallRng::seed_from_u64(p.seed);
            let sessions = workload(&p, &mut rng);
            let oracle = run(Router::oracle(&p), &sessions, &p);
            let mut cells = Vec::new();
            for all in [false, true] {
                for per_conn in [base.entries_per_conn, 32] {
                    p.entries_per_conn = per_conn;
                    let r = run(
                        Router::core_with(Policy::CacheAware, &p, all),
                        &sessions,
                        &p,
                    );
                    cells.push(format!(
                        "{:.1}% ({:.3})",
                        100.0 * r.reuse() / oracle.reuse(),
                        r.imbalance(&p).0
                    ));
                }
            }
            println!(
                "| {load:>10} | {:>11} k | {:>17} | {:>17} | {:>12} | {:>12} | {:>11.1}% |",
                cache / 1000,
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                100.0 * oracle.reuse()
            );
        }
    }
}
