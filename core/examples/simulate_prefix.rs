//! A deterministic discrete-event simulation of LLM chat traffic through one or several
//! `lb` replicas (each a real [`Balancer`]) in front of simulated inference engines, to
//! compare the policies on prefix-cache reuse, time to first token and load balance:
//!
//! ```text
//! cargo run --release -p lb-core --example simulate_prefix [-- --replicas 1,2,4,8 --format tsv]
//! ```
//!
//! The default run prints one table: for R = 1, 2, 4 and 8 replicas, each of least-conn,
//! p2c, cache-aware, consistent-hash and prefix-hash without and with engine load
//! signals, and the oracle: one simulated hour (the first 10 minutes as warm-up) per
//! row, about 25 s of CPU in release for the 41 rows; the same table every run (seeded).
//!
//! # Workload (defaults; every knob is a flag, see `params`)
//!
//! - 8 backends. Sessions arrive as a Poisson process (1.3 a second); each picks one of
//!   24 shared system prompts (Zipf popularity, 1-4 k tokens) and has 2-16 turns. Turn
//!   `t` sends the system prompt, every earlier message and a new user message (20-400
//!   tokens); its answer (100-700 tokens) joins the conversation, and the next turn
//!   comes after a think time (exponential, mean 15 s) from the answer's end.
//! - Keys are chains shaped as [`RequestKey::from_body`](lb_core::RequestKey::from_body)
//!   builds them: one unit per 256-token block (1 KiB of text) of each message,
//!   cumulative hashes. Consistent hashing keys by session (the OpenAI `user` field);
//!   prefix-hash by the chat's opening (the system prompt and the first user message,
//!   [`RequestKey::Chat`](lb_core::RequestKey::Chat)), at most `--prefix-units` units
//!   (`lb`'s default, 32).
//!
//! # Replicas
//!
//! `--replicas R` puts R independent balancers (same flags, separate RNG seeds) in front
//! of the same engines, as R `lb` pods behind a Kubernetes Service: each request (each
//! turn, as a client that opens a new connection per request) goes to a replica drawn
//! by hashing (session, turn), and each replica sees only its own requests: its
//! in-flight counts, its `max_conns` cap (per replica, as each `lb` enforces its own),
//! its cache-aware table. Backends never fail in this simulation, so every replica has
//! the same healthy set (the same health events: none). With engine signals (`+signals`
//! rows), every replica polls every engine each `--interval-ms` (500, `--load-interval`'s
//! default; each replica at its own phase) and hands the figures (running, waiting, KV
//! usage) to [`Balancer::load_report`] `--delay-ms` (50) after the engine reported
//! them: the report's age.
//!
//! # Engines
//!
//! Each backend is an engine in the range of a 7-8 B model on one H100-class GPU (vLLM
//! without chunked prefill):
//!
//! - `--slots` (32) sequences run together; more requests wait in the engine's FIFO
//!   queue (vLLM's `num_requests_waiting`). `lb`'s `--max-conns` is 32 per replica: with
//!   one replica the engines never queue (lb holds the excess in its own FIFO, as its
//!   admission queue does); with R replicas an engine can be sent up to 32 R.
//! - A request taking a slot is prefilled: [`PREFILL_BASE_SECS`] (5 ms) +
//!   [`PREFILL_SECS_PER_TOKEN`] (0.1 ms) per prompt token not found in the engine's
//!   prefix cache, one prefill at a time, and the engine decodes nothing meanwhile (a
//!   prefill step). Time to first token (TTFT) runs from the client's send to the end
//!   of its prefill: waits in `lb` and in the engine included.
//! - Otherwise the engine decodes one token for every prefilled sequence per step of
//!   [`DECODE_BASE_SECS`] (10 ms) + [`DECODE_SECS_PER_SEQ`] (0.4 ms) per sequence: 10.4
//!   ms at batch 1, 22.8 ms at batch 32.
//! - The prefix cache holds 400 k tokens (what an 8 B model leaves for KV on one 80 GB
//!   GPU), LRU over chain units (as vLLM and SGLang keep blocks); a prompt finds its
//!   longest cached prefix from its start. KV usage (reported) is the running
//!   sequences' prompt and decoded tokens over that size.
//!
//! At 1.3 sessions a second (about 11.7 requests a second) the engines hold 8-16
//! requests each on average (of 32 slots): prefills are the bottleneck, so a policy
//! that reuses little (least-conn: ~57 % of prompt tokens cached) spends half its time
//! prefilling, holds twice the load of one that reuses much (cache-aware: ~93 %) and
//! saturates at about 1.5 sessions a second, where cache-aware runs far beyond.
//!
//! # The oracle
//!
//! One router that knows every engine's cache and load: it sends each request to the
//! backend with the longest cached prefix among those the cache-aware load guard allows
//! (below the cap and at most 20 % of `max_conns` above the least loaded, by the
//! engines' true load), ties to the least loaded. It does not depend on R.
//!
//! # Reported
//!
//! Per row, over the requests sent after the first `warmup` minutes: prefix reuse
//! (cached prompt tokens / prompt tokens) and its share of the oracle's, TTFT p50 and
//! p99, the load imbalance (max / mean over engines of their time-averaged load,
//! running + waiting), the mean load, and the shares of requests that waited in `lb`
//! (every backend at this replica's cap) and in an engine's queue. `--format tsv`
//! prints the same as tab-separated rows with a header.
//!
//! Other flags: `--policies least-conn,prefix-hash` (a subset), `--signals off|on|both`,
//! `--minutes`, `--warmup`, `--seed`, `--sessions-per-sec`, `--backends`, `--slots`,
//! `--max-conns`, `--cache-tokens`, `--prefix-units`, `--balance-factor`.
//!
//! `--sweep 1` instead runs cache-aware (its default table and `all_holders`) and the
//! oracle with one replica over cache sizes (80 k-1 M tokens) and two loads, with the
//! default table size and with one sized to the cache (32 entries per connection), to
//! show how cache pressure affects the table.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use lb_core::{
    BackendId, BackendSpec, Balancer, Config, Lease, LoadReport, Outcome, Policy, PrefixHashConfig,
    RequestKey, RequestMeta,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// Tokens per chain block (1 KiB of text at about 4 bytes a token).
const BLOCK_TOKENS: u32 = 256;

/// Prefill: a fixed cost per request...
const PREFILL_BASE_SECS: f64 = 0.005;
/// ... plus this per prompt token not in the prefix cache (10 k tokens a second).
const PREFILL_SECS_PER_TOKEN: f64 = 0.0001;
/// Decode: one step (a token for every running sequence) takes this...
const DECODE_BASE_SECS: f64 = 0.010;
/// ... plus this per sequence in the batch (22.8 ms at 32).
const DECODE_SECS_PER_SEQ: f64 = 0.0004;

fn decode_step(batch: usize) -> f64 {
    DECODE_BASE_SECS + DECODE_SECS_PER_SEQ * batch as f64
}

/// The policies of the table, in order.
const POLICIES: [Policy; 5] = [
    Policy::LeastConn,
    Policy::P2c,
    Policy::CacheAware,
    Policy::ConsistentHash,
    Policy::PrefixHash,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Table,
    Tsv,
}

#[derive(Clone, Debug)]
struct Params {
    backends: usize,
    max_conns: u32,
    slots: usize,
    cache_tokens: u64,
    minutes: u64,
    warmup: u64,
    sessions_per_sec: f64,
    prompts: usize,
    think_secs: f64,
    seed: u64,
    overflow_percent: u32,
    entries_per_conn: u32,
    prefix_units: usize,
    balance_factor: f64,
    replicas: Vec<usize>,
    policies: Vec<Policy>,
    /// Rows without (false) and with (true) engine signals.
    signals: Vec<bool>,
    interval_ms: u64,
    delay_ms: u64,
    format: Format,
    sweep: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            backends: 8,
            max_conns: 32,
            slots: 32,
            cache_tokens: 400_000,
            minutes: 60,
            warmup: 10,
            sessions_per_sec: 1.3,
            prompts: 24,
            think_secs: 15.0,
            seed: 1,
            overflow_percent: 20,
            entries_per_conn: lb_core::AffinityConfig::default().entries_per_conn,
            prefix_units: lb_core::DEFAULT_PREFIX_UNITS,
            balance_factor: f64::from(lb_core::DEFAULT_BALANCE_FACTOR) / 1000.0,
            replicas: vec![1, 2, 4, 8],
            policies: POLICIES.to_vec(),
            signals: vec![false, true],
            interval_ms: 500,
            delay_ms: 50,
            format: Format::Table,
            sweep: false,
        }
    }
}

/// Exits with status 2 naming the flag.
fn bad(flag: &str, v: &str) -> ! {
    eprintln!("simulate_prefix: bad value '{v}' for {flag}");
    std::process::exit(2)
}

fn params() -> Params {
    let mut p = Params::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let flag = pair[0].as_str();
        let Some(v) = pair.get(1).map(String::as_str) else {
            bad(flag, "")
        };
        let num = |v: &str| -> f64 {
            v.parse()
                .ok()
                .filter(|x: &f64| x.is_finite() && *x >= 0.0)
                .unwrap_or_else(|| bad(flag, v))
        };
        match flag {
            "--backends" => p.backends = (num(v) as usize).max(1),
            "--max-conns" => p.max_conns = (num(v) as u32).max(1),
            "--slots" => p.slots = (num(v) as usize).max(1),
            "--cache-tokens" => p.cache_tokens = num(v) as u64,
            "--minutes" => p.minutes = (num(v) as u64).max(1),
            "--warmup" => p.warmup = num(v) as u64,
            "--sessions-per-sec" => p.sessions_per_sec = num(v),
            "--prompts" => p.prompts = (num(v) as usize).max(1),
            "--think" => p.think_secs = num(v),
            "--seed" => p.seed = num(v) as u64,
            "--overflow-percent" => p.overflow_percent = num(v) as u32,
            "--entries-per-conn" => p.entries_per_conn = (num(v) as u32).max(1),
            "--prefix-units" => p.prefix_units = (num(v) as usize).max(1),
            "--balance-factor" => p.balance_factor = num(v),
            "--interval-ms" => p.interval_ms = (num(v) as u64).max(1),
            "--delay-ms" => p.delay_ms = num(v) as u64,
            "--replicas" => {
                p.replicas = v
                    .split(',')
                    .map(|r| match r.trim().parse::<usize>() {
                        Ok(n @ 1..=64) => n,
                        _ => bad(flag, v),
                    })
                    .collect()
            }
            "--policies" => {
                p.policies = v
                    .split(',')
                    .map(|s| match s.trim().parse::<Policy>() {
                        Ok(pol) if POLICIES.contains(&pol) => pol,
                        _ => bad(flag, v),
                    })
                    .collect()
            }
            "--signals" => {
                p.signals = match v {
                    "off" => vec![false],
                    "on" => vec![true],
                    "both" => vec![false, true],
                    _ => bad(flag, v),
                }
            }
            "--format" => {
                p.format = match v {
                    "table" => Format::Table,
                    "tsv" => Format::Tsv,
                    _ => bad(flag, v),
                }
            }
            "--sweep" => p.sweep = num(v) != 0.0,
            other => {
                eprintln!("simulate_prefix: unknown flag {other}");
                std::process::exit(2)
            }
        }
    }
    if p.warmup >= p.minutes {
        bad("--warmup", &p.warmup.to_string());
    }
    if p.balance_factor <= 1.0 {
        bad("--balance-factor", &p.balance_factor.to_string());
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

/// One `lb` replica (a real core) or the oracle.
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
    /// Replica `replica` of a core router; `all_holders` sets
    /// [`lb_core::AffinityConfig::all_holders`].
    fn core(policy: Policy, p: &Params, replica: usize, all_holders: bool) -> Router {
        let now = base();
        let mut config = Config {
            policy,
            status_interval: None,
            prefix_hash: PrefixHashConfig {
                units: p.prefix_units,
                balance_factor: (p.balance_factor * 1000.0).round() as u32,
            },
            ..Config::default()
        };
        config.affinity.overflow_percent = p.overflow_percent;
        config.affinity.entries_per_conn = p.entries_per_conn;
        config.affinity.all_holders = all_holders;
        config.engine.interval = Duration::from_millis(p.interval_ms);
        let seed = p.seed ^ mix(replica as u64 + 1);
        let mut bal = Balancer::new(config, SmallRng::seed_from_u64(seed), now);
        let ids = (0..p.backends)
            .map(|i| {
                let spec = BackendSpec {
                    max_conns: p.max_conns,
                    ..BackendSpec::new(format!("http://10.0.{}.{}:8000", i / 250, i % 250))
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

    fn oracle(p: &Params) -> Router {
        Router::Oracle {
            rng: SmallRng::seed_from_u64(p.seed ^ 7),
            max_conns: p.max_conns,
            overflow_percent: p.overflow_percent,
        }
    }

    /// Picks a backend for request `req` of `session` (prompt `units`), or None if every
    /// backend is at this router's cap. `load`: the engines' true loads (the oracle's).
    fn pick(
        &mut self,
        now: Instant,
        req: u64,
        session: &Session,
        units: &[Unit],
        engines: &[Engine],
    ) -> Option<usize> {
        match self {
            Router::Core {
                bal,
                ids,
                leases,
                user_key,
            } => {
                // As `RequestKey::from_body` keys a chat: its opening is the system
                // prompt and the first user message (turn 0's prompt).
                let key = RequestKey::Chat {
                    chain: units.iter().map(|u| u.hash).collect(),
                    opening: session.prompt_end[0],
                };
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
                let load = |i: usize| engines[i].load() as u32;
                let min = (0..engines.len()).map(load).min().unwrap();
                let mut best: Option<(u64, u32, usize)> = None;
                let mut ties = 0;
                for (i, e) in engines.iter().enumerate() {
                    let load = load(i);
                    if load >= *max_conns || (load - min) * 100 > *overflow_percent * *max_conns {
                        continue;
                    }
                    let score = (e.cache.hit(units), Reverse(load));
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

    fn done(&mut self, now: Instant, req: u64) {
        if let Router::Core { bal, leases, .. } = self {
            let lease = leases.remove(&req).expect("a lease per request");
            bal.release(now, lease, Outcome::Response(200));
        }
    }

    /// Hands the engines' figures to a core router.
    fn load_reports(&mut self, now: Instant, reports: &[LoadReport]) {
        if let Router::Core { bal, ids, .. } = self {
            for (&id, &r) in ids.iter().zip(reports) {
                bal.load_report(now, id, r);
            }
        }
    }

    /// Gives back the leases still out at the end.
    fn finish(&mut self, now: Instant) {
        if let Router::Core { bal, leases, .. } = self {
            for (_, l) in leases.drain() {
                bal.release(now, l, Outcome::Cancelled);
            }
        }
    }
}

fn base() -> Instant {
    use std::sync::OnceLock;
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// The replica that request (session `s`, turn `turn`) reaches among `r`.
fn replica_of(seed: u64, s: usize, turn: usize, r: usize) -> usize {
    (mix(seed ^ 0x7265_706c ^ ((s as u64) << 8 | turn as u64)) % r as u64) as usize
}

// ---------------------------------------------------------------------------- engines

/// A request inside `lb` or an engine.
#[derive(Clone, Copy, Debug)]
struct Job {
    req: u64,
    replica: usize,
    session: usize,
    turn: usize,
    /// When the client sent it.
    sent: f64,
}

/// A sequence being decoded.
#[derive(Clone, Copy, Debug)]
struct Decoding {
    job: Job,
    /// The engine's decode clock at which its last token is out.
    finish_v: f64,
    /// The decode clock when it started, and its prompt tokens (for KV usage).
    start_v: f64,
    prompt_tokens: u64,
}

/// One simulated inference engine (see the module docs).
struct Engine {
    cache: Cache,
    /// Requests beyond `slots`, in arrival order.
    waiting: VecDeque<Job>,
    /// Requests holding a slot, not yet prefilled; the front one is prefilling (until
    /// `prefill_end`), with its prompt tokens.
    prefill: VecDeque<Job>,
    prefill_end: f64,
    prefill_tokens: u64,
    decoding: Vec<Decoding>,
    /// The decode clock: tokens decoded per running sequence since the start, as of
    /// `v_at`. It stands still while a prefill runs.
    v: f64,
    v_at: f64,
    /// Bumped at every reschedule: older wake-ups are void.
    generation: u64,
}

impl Engine {
    fn new(cache_tokens: u64) -> Self {
        Engine {
            cache: Cache::new(cache_tokens),
            waiting: VecDeque::new(),
            prefill: VecDeque::new(),
            prefill_end: 0.0,
            prefill_tokens: 0,
            decoding: Vec::new(),
            v: 0.0,
            v_at: 0.0,
            generation: 0,
        }
    }

    fn running(&self) -> usize {
        self.prefill.len() + self.decoding.len()
    }

    /// Running + waiting: what the engine reports as its load.
    fn load(&self) -> usize {
        self.running() + self.waiting.len()
    }

    /// The decode clock at `t` (not stored).
    fn v_at(&self, t: f64) -> f64 {
        if self.prefill.is_empty() && !self.decoding.is_empty() {
            self.v + (t - self.v_at) / decode_step(self.decoding.len())
        } else {
            self.v
        }
    }

    /// Brings the decode clock to `t`; call before any change of the running set.
    fn advance(&mut self, t: f64) {
        self.v = self.v_at(t);
        self.v_at = t;
    }

    /// What its metrics say at `t`.
    fn report(&self, t: f64, cache_tokens: u64) -> LoadReport {
        let v = self.v_at(t);
        let kv: f64 = self
            .decoding
            .iter()
            .map(|d| d.prompt_tokens as f64 + (v - d.start_v))
            .sum::<f64>()
            + self.prefill_tokens as f64;
        LoadReport::new(self.running() as u32, self.waiting.len() as u32)
            .with_kv_usage(kv / cache_tokens.max(1) as f64)
    }

    /// When it next has something to do (a prefill ends or a sequence finishes).
    fn next_event(&self, t: f64) -> Option<f64> {
        if !self.prefill.is_empty() {
            return Some(self.prefill_end);
        }
        let min = self
            .decoding
            .iter()
            .map(|d| d.finish_v)
            .min_by(f64::total_cmp)?;
        Some(t + (min - self.v).max(0.0) * decode_step(self.decoding.len()))
    }
}

// ---------------------------------------------------------------------------- the run

#[derive(Default)]
struct Report {
    prompt_tokens: u64,
    cached_tokens: u64,
    /// Requests sent after the warm-up that got their first token.
    requests: u64,
    /// Of those, how many waited in `lb` (every backend at the replica's cap) and in an
    /// engine's queue.
    lb_waited: u64,
    engine_waited: u64,
    ttft: Vec<f32>,
    /// ∫ load dt per engine, after the warm-up.
    area: Vec<f64>,
}

impl Report {
    fn reuse(&self) -> f64 {
        self.cached_tokens as f64 / self.prompt_tokens.max(1) as f64
    }

    /// (max / mean, mean) of the engines' time-averaged loads.
    fn imbalance(&self, p: &Params) -> (f64, f64) {
        let span = ((p.minutes - p.warmup) * 60) as f64;
        let means: Vec<f64> = self.area.iter().map(|a| a / span).collect();
        let mean = means.iter().sum::<f64>() / means.len() as f64;
        let max = means.iter().cloned().fold(0.0, f64::max);
        (max / mean, mean)
    }

    /// The `q` quantile of the TTFTs, in seconds (sorts them).
    fn ttft(&mut self, q: f64) -> f64 {
        self.ttft.sort_by(f32::total_cmp);
        match self.ttft.len() {
            0 => f64::NAN,
            n => f64::from(self.ttft[((n as f64 * q) as usize).min(n - 1)]),
        }
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
    /// Engine b's wake-up of this generation.
    Engine(usize, u64),
    /// Replica r polls every engine.
    Poll(usize),
    /// Replica r receives the figures of snapshot id.
    Deliver(usize, u64),
}

/// One run: the routers (one per replica, or the oracle) in front of fresh engines.
struct Sim<'a> {
    p: &'a Params,
    sessions: &'a [Session],
    routers: Vec<Router>,
    engines: Vec<Engine>,
    /// Requests waiting in each replica (every backend at its cap), oldest first.
    lb_queues: Vec<VecDeque<Job>>,
    heap: BinaryHeap<Reverse<(T, u64, Ev)>>,
    seq: u64,
    rng: SmallRng,
    next_req: u64,
    snapshots: HashMap<u64, Vec<LoadReport>>,
    warmup: f64,
    report: Report,
}

impl Sim<'_> {
    fn push(&mut self, t: f64, e: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((T(t), self.seq, e)));
    }

    fn counted(&self, job: &Job) -> bool {
        job.sent >= self.warmup
    }

    /// Starts what replica r's queue can start, oldest first.
    fn start(&mut self, r: usize, t: f64) {
        let now = base() + Duration::from_secs_f64(t);
        while let Some(&job) = self.lb_queues[r].front() {
            let sess = &self.sessions[job.session];
            let units = &sess.units[..sess.prompt_end[job.turn]];
            let Some(b) = self.routers[r].pick(now, job.req, sess, units, &self.engines) else {
                break;
            };
            self.lb_queues[r].pop_front();
            if t > job.sent && self.counted(&job) {
                self.report.lb_waited += 1;
            }
            self.engines[b].advance(t);
            if self.engines[b].running() < self.p.slots {
                self.take_slot(b, job, t);
            } else {
                if self.counted(&job) {
                    self.report.engine_waited += 1;
                }
                self.engines[b].waiting.push_back(job);
            }
            self.reschedule(b, t);
        }
    }

    /// Job gets a slot on engine b: it joins the prefill queue.
    fn take_slot(&mut self, b: usize, job: Job, t: f64) {
        self.engines[b].prefill.push_back(job);
        if self.engines[b].prefill.len() == 1 {
            self.begin_prefill(b, t);
        }
    }

    /// Engine b prefills the front of its prefill queue from `t`.
    fn begin_prefill(&mut self, b: usize, t: f64) {
        let job = self.engines[b].prefill[0];
        let sess = &self.sessions[job.session];
        let units = &sess.units[..sess.prompt_end[job.turn]];
        let prompt: u64 = units.iter().map(|u| u64::from(u.tokens)).sum();
        let e = &mut self.engines[b];
        let hit = e.cache.hit(units);
        e.cache.fill(units);
        e.prefill_end = t + PREFILL_BASE_SECS + PREFILL_SECS_PER_TOKEN * (prompt - hit) as f64;
        e.prefill_tokens = prompt;
        if job.sent >= self.warmup {
            self.report.prompt_tokens += prompt;
            self.report.cached_tokens += hit;
        }
    }

    fn reschedule(&mut self, b: usize, t: f64) {
        let e = &mut self.engines[b];
        e.generation += 1;
        let generation = e.generation;
        if let Some(at) = e.next_event(t) {
            self.push(at, Ev::Engine(b, generation));
        }
    }

    /// Engine b's wake-up at t: a prefill ends, or sequences finish.
    fn wake(&mut self, b: usize, t: f64) {
        let now = base() + Duration::from_secs_f64(t);
        self.engines[b].advance(t);
        let e = &mut self.engines[b];
        if !e.prefill.is_empty() && e.prefill_end <= t {
            let job = e.prefill.pop_front().expect("not empty");
            let sess = &self.sessions[job.session];
            let v = e.v;
            e.decoding.push(Decoding {
                job,
                finish_v: v + f64::from(sess.answer_tokens[job.turn]),
                start_v: v,
                prompt_tokens: e.prefill_tokens,
            });
            e.prefill_tokens = 0;
            if job.sent >= self.warmup {
                self.report.requests += 1;
                self.report.ttft.push((t - job.sent) as f32);
            }
            if !self.engines[b].prefill.is_empty() {
                self.begin_prefill(b, t);
            }
        } else if self.engines[b].prefill.is_empty() {
            // Finished sequences (the clock reached their last token; a little slack
            // for rounding).
            let v = self.engines[b].v + 1e-9;
            let mut i = 0;
            while i < self.engines[b].decoding.len() {
                let d = self.engines[b].decoding[i];
                if d.finish_v > v {
                    i += 1;
                    continue;
                }
                self.engines[b].decoding.swap_remove(i);
                let job = d.job;
                let sess = &self.sessions[job.session];
                self.engines[b]
                    .cache
                    .fill(&sess.units[..sess.answer_end[job.turn]]);
                self.routers[job.replica].done(now, job.req);
                if job.turn + 1 < sess.prompt_end.len() {
                    let think = exp(&mut self.rng, self.p.think_secs);
                    self.push(t + think, Ev::Send(job.session, job.turn + 1));
                }
                if let Some(next) = self.engines[b].waiting.pop_front() {
                    self.take_slot(b, next, t);
                }
                // The freed lease may let this replica's queue (the oracle's: any) go on.
                self.start(job.replica, t);
            }
        }
        self.reschedule(b, t);
    }
}

/// Runs `routers` (one per replica; one oracle) over `sessions`; with `signals`, every
/// replica polls the engines' load.
fn run(routers: Vec<Router>, sessions: &[Session], p: &Params, signals: bool) -> Report {
    let replicas = routers.len();
    let mut sim = Sim {
        p,
        sessions,
        routers,
        engines: (0..p.backends)
            .map(|_| Engine::new(p.cache_tokens))
            .collect(),
        lb_queues: vec![VecDeque::new(); replicas],
        heap: BinaryHeap::new(),
        seq: 0,
        rng: SmallRng::seed_from_u64(p.seed ^ 0xabcdef),
        next_req: 0,
        snapshots: HashMap::new(),
        warmup: (p.warmup * 60) as f64,
        report: Report {
            area: vec![0.0; p.backends],
            ..Report::default()
        },
    };
    for (s, sess) in sessions.iter().enumerate() {
        sim.push(sess.start, Ev::Send(s, 0));
    }
    let interval = p.interval_ms as f64 / 1000.0;
    if signals {
        for r in 0..replicas {
            let phase = (mix(p.seed ^ 0x706f_6c6c ^ r as u64) % p.interval_ms) as f64 / 1000.0;
            sim.push(phase, Ev::Poll(r));
        }
    }
    let end = (p.minutes * 60) as f64;
    let mut last = 0.0f64;
    let mut snapshot = 0u64;
    while let Some(Reverse((T(t), _, ev))) = sim.heap.pop() {
        if t > end {
            break;
        }
        if t > sim.warmup {
            let from = last.max(sim.warmup);
            for (a, e) in sim.report.area.iter_mut().zip(&sim.engines) {
                *a += e.load() as f64 * (t - from);
            }
        }
        last = t;
        match ev {
            Ev::Send(s, turn) => {
                let r = if replicas == 1 {
                    0
                } else {
                    replica_of(p.seed, s, turn, replicas)
                };
                let job = Job {
                    req: sim.next_req,
                    replica: r,
                    session: s,
                    turn,
                    sent: t,
                };
                sim.next_req += 1;
                sim.lb_queues[r].push_back(job);
                sim.start(r, t);
            }
            Ev::Engine(b, generation) => {
                if sim.engines[b].generation == generation {
                    sim.wake(b, t);
                }
            }
            Ev::Poll(r) => {
                let reports = sim
                    .engines
                    .iter()
                    .map(|e| e.report(t, p.cache_tokens))
                    .collect();
                snapshot += 1;
                sim.snapshots.insert(snapshot, reports);
                sim.push(t + p.delay_ms as f64 / 1000.0, Ev::Deliver(r, snapshot));
                sim.push(t + interval, Ev::Poll(r));
            }
            Ev::Deliver(r, id) => {
                let reports = sim.snapshots.remove(&id).expect("a snapshot per poll");
                let now = base() + Duration::from_secs_f64(t);
                sim.routers[r].load_reports(now, &reports);
            }
        }
    }
    let now = base() + Duration::from_secs_f64(end);
    for r in &mut sim.routers {
        r.finish(now);
    }
    sim.report
}

/// The routers of one row: R replicas of `policy`.
fn replicas(policy: Policy, p: &Params, r: usize) -> Vec<Router> {
    (0..r).map(|i| Router::core(policy, p, i, false)).collect()
}

// ---------------------------------------------------------------------------- output

/// One row of the table.
struct Row {
    replicas: Option<usize>,
    policy: &'static str,
    signals: bool,
    reuse: f64,
    of_oracle: f64,
    p50: f64,
    p99: f64,
    imbalance: f64,
    mean_load: f64,
    lb_waited: f64,
    engine_waited: f64,
    requests: u64,
}

impl Row {
    fn new(
        replicas: Option<usize>,
        policy: &'static str,
        signals: bool,
        mut r: Report,
        oracle: f64,
        p: &Params,
    ) -> Row {
        let (imbalance, mean_load) = r.imbalance(p);
        let n = r.requests.max(1) as f64;
        Row {
            replicas,
            policy,
            signals,
            reuse: r.reuse(),
            of_oracle: r.reuse() / oracle,
            p50: r.ttft(0.5),
            p99: r.ttft(0.99),
            imbalance,
            mean_load,
            lb_waited: r.lb_waited as f64 / n,
            engine_waited: r.engine_waited as f64 / n,
            requests: r.requests,
        }
    }

    fn print(&self, format: Format) {
        let replicas = self.replicas.map_or("any".to_string(), |r| r.to_string());
        match format {
            Format::Tsv => println!(
                "{replicas}\t{}\t{}\t{:.4}\t{:.4}\t{:.1}\t{:.1}\t{:.3}\t{:.2}\t{:.4}\t{:.4}\t{}",
                self.policy,
                u8::from(self.signals),
                self.reuse,
                self.of_oracle,
                1000.0 * self.p50,
                1000.0 * self.p99,
                self.imbalance,
                self.mean_load,
                self.lb_waited,
                self.engine_waited,
                self.requests
            ),
            Format::Table => println!(
                "| {replicas:>3} | {:<15} | {:>7} | {:>6.1}% | {:>8.1}% | {:>9.0} | {:>9.0} | {:>8.3} | {:>9.1} | {:>6.2}% | {:>10.2}% |",
                self.policy,
                if self.signals { "yes" } else { "no" },
                100.0 * self.reuse,
                100.0 * self.of_oracle,
                1000.0 * self.p50,
                1000.0 * self.p99,
                self.imbalance,
                self.mean_load,
                100.0 * self.lb_waited,
                100.0 * self.engine_waited,
            ),
        }
    }
}

fn header(format: Format) {
    match format {
        Format::Tsv => println!(
            "replicas\tpolicy\tsignals\treuse\tof_oracle\tttft_p50_ms\tttft_p99_ms\t\
             max_mean_load\tmean_load\tlb_waited\tengine_waited\trequests"
        ),
        Format::Table => {
            println!(
                "|   R | policy          | signals |  reuse | of oracle | TTFT p50 ms | TTFT p99 ms | max/mean load | mean load | lb wait | engine wait |"
            );
            println!(
                "|----:|-----------------|--------:|-------:|----------:|------------:|------------:|--------------:|----------:|--------:|------------:|"
            );
        }
    }
}

fn main() {
    let p = params();
    if p.sweep {
        return sweep(&p);
    }
    let mut rng = SmallRng::seed_from_u64(p.seed);
    let sessions = workload(&p, &mut rng);
    if p.format == Format::Table {
        describe(&p, &sessions);
        println!();
    }
    header(p.format);
    let oracle = run(vec![Router::oracle(&p)], &sessions, &p, false);
    let oracle_reuse = oracle.reuse();
    Row::new(None, "oracle", false, oracle, oracle_reuse, &p).print(p.format);
    for &r in &p.replicas {
        for &policy in &p.policies {
            for &signals in &p.signals {
                let report = run(replicas(policy, &p, r), &sessions, &p, signals);
                Row::new(Some(r), policy.name(), signals, report, oracle_reuse, &p).print(p.format);
            }
        }
    }
}

fn describe(p: &Params, sessions: &[Session]) {
    let turns: usize = sessions.iter().map(|s| s.prompt_end.len()).sum();
    println!(
        "prefix workload: {} engines × {} slots, lb max_conns {} per replica, cache {} k tokens \
         each, {} min ({} warm-up), {} sessions, {} requests, {} system prompts, guard {} %, \
         prefix-hash {} units × {}, signals every {} ms ({} ms old), seed {}",
        p.backends,
        p.slots,
        p.max_conns,
        p.cache_tokens / 1000,
        p.minutes,
        p.warmup,
        sessions.len(),
        turns,
        p.prompts,
        p.overflow_percent,
        p.prefix_units,
        p.balance_factor,
        p.interval_ms,
        p.delay_ms,
        p.seed
    );
}

/// Cache-aware's share of the oracle's reuse across cache sizes and loads, with the
/// default table size and with one sized to the cache (one replica, no signals).
fn sweep(base: &Params) {
    println!(
        "cache-aware reuse as a share of the oracle's (max/mean load), {} min runs; \
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
    for load in [0.8, 1.3] {
        for cache in [80_000u64, 160_000, 400_000, 1_000_000] {
            let mut p = base.clone();
            p.sessions_per_sec = load;
            p.cache_tokens = cache;
            let mut rng = SmallRng::seed_from_u64(p.seed);
            let sessions = workload(&p, &mut rng);
            let oracle = run(vec![Router::oracle(&p)], &sessions, &p, false);
            let mut cells = Vec::new();
            for all in [false, true] {
                for per_conn in [base.entries_per_conn, 32] {
                    p.entries_per_conn = per_conn;
                    let router = Router::core(Policy::CacheAware, &p, 0, all);
                    let r = run(vec![router], &sessions, &p, false);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two replicas running prefix-hash (separate cores, separate seeds, the same flags
    /// and healthy set) send every prompt of the workload to the same engine: when
    /// idle, and when both are fed the same engine figures.
    #[test]
    fn replicas_agree_on_prefix_hash() {
        let p = Params {
            minutes: 2,
            warmup: 1,
            ..Params::default()
        };
        let sessions = workload(&p, &mut SmallRng::seed_from_u64(3));
        let engines: Vec<Engine> = (0..p.backends).map(|_| Engine::new(1000)).collect();
        let mut a = Router::core(Policy::PrefixHash, &p, 0, false);
        let mut b = Router::core(Policy::PrefixHash, &p, 1, false);
        let now = base();
        let mut picks = 0;
        let mut spread = std::collections::HashSet::new();
        for loads in [None, Some(())] {
            if loads.is_some() {
                // Uneven but shared engine figures: both walk past the same ones.
                let reports: Vec<LoadReport> = (0..p.backends as u32)
                    .map(|i| LoadReport::new(4 * i, i % 3))
                    .collect();
                a.load_reports(now, &reports);
                b.load_reports(now, &reports);
            }
            for (n, s) in sessions.iter().enumerate() {
                for turn in 0..s.prompt_end.len() {
                    let units = &s.units[..s.prompt_end[turn]];
                    let req = (n * 100 + turn) as u64;
                    let x = a.pick(now, req, s, units, &engines).unwrap();
                    let y = b.pick(now, req, s, units, &engines).unwrap();
                    assert_eq!(x, y, "session {n} turn {turn}");
                    a.done(now, req);
                    b.done(now, req);
                    spread.insert(x);
                    picks += 1;
                }
            }
        }
        assert!(picks > 100, "{picks} picks");
        assert!(spread.len() > 1, "every prompt on one engine");
    }

    /// The engine model: one request alone prefills its uncached prompt, decodes at the
    /// batch-1 step, and the second identical one finds the prompt cached.
    #[test]
    fn engine_times_and_reuse() {
        let p = Params {
            backends: 1,
            minutes: 10,
            warmup: 1,
            ..Params::default()
        };
        let mut units = Vec::new();
        push_message(&mut units, 1, 1024);
        let prompt_end = units.len();
        push_message(&mut units, 2, 100);
        let session = |start: f64, id: u64| Session {
            id,
            units: units.clone(),
            prompt_end: vec![prompt_end],
            answer_end: vec![units.len()],
            answer_tokens: vec![100],
            start,
        };
        let sessions = vec![session(100.0, 0), session(200.0, 1)];
        let mut r = run(replicas(Policy::LeastConn, &p, 1), &sessions, &p, true);
        assert_eq!(r.requests, 2);
        assert_eq!(r.prompt_tokens, 2048);
        assert_eq!(r.cached_tokens, 1024);
        let cold = PREFILL_BASE_SECS + 1024.0 * PREFILL_SECS_PER_TOKEN;
        assert!((r.ttft(0.99) - cold).abs() < 1e-4, "{}", r.ttft(0.99));
        assert!((r.ttft(0.0) - PREFILL_BASE_SECS).abs() < 1e-4);
        // Busy 2 × (prefill + 100 decode steps at batch 1) of 540 s.
        let (_, mean) = r.imbalance(&p);
        let busy = cold + PREFILL_BASE_SECS + 200.0 * decode_step(1);
        assert!((mean * 540.0 - busy).abs() < 0.05, "{mean}");
    }
}
