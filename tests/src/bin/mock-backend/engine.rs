//! The engine model behind `mock-backend --engine`: one LLM inference engine
//! (vLLM-like) serving one model on one GPU, as a sans-IO state machine.
//!
//! The engine never reads a clock: every input carries `now`, and
//! [`Engine::poll_timeout`] says when it next needs [`Engine::handle_timeout`].
//! Driving contract (the driver in `driver.rs` follows it):
//!
//! 1. [`Engine::submit`] a request (`now` = its arrival), [`Engine::cancel`]
//!    one whose client left;
//! 2. at or after [`Engine::poll_timeout`], call [`Engine::handle_timeout`];
//! 3. after any call, drain [`Engine::poll_event`] until `None`.
//!
//! After `handle_timeout(now)`, `poll_timeout()` is later than `now` or `None`.
//!
//! # Model
//!
//! * **Iterations (continuous batching).** The engine runs one iteration after
//!   another while it has work. An iteration starts by admitting waiting
//!   requests, first come first served, while fewer than `slots` sequences run
//!   and the KV cache can hold the head of the queue (the queue never skips
//!   its head). It lasts the prefill time of the prompts it admitted plus one
//!   decode step for the whole batch, and at its end every running sequence
//!   has one more token: a new sequence gets its first token at the end of the
//!   iteration that admitted it. A request that arrives during an iteration
//!   waits for its end. Prefills are not chunked: an admission lengthens that
//!   iteration for every running sequence.
//! * **Timing.** Prefill costs [`PREFILL_SECS_PER_TOKEN`] per *uncached*
//!   prompt token; a decode step costs [`DECODE_SECS_AT_BATCH_1`] for one
//!   running sequence, growing linearly to [`DECODE_SECS_AT_BATCH_32`] for 32
//!   (and on at the same slope). Every time is divided by `speed`.
//! * **Tokens.** See [`Prompt::from_text`]: 4 bytes of the canonical prompt
//!   text make one token, 16 tokens one KV block.
//! * **KV cache and prefix cache.** `kv_blocks` blocks of [`BLOCK_TOKENS`]
//!   tokens. A running sequence holds the full blocks of its prompt, shared
//!   and keyed by their chain hash (block i's key hashes block i-1's key and
//!   block i's bytes, so equal keys mean equal prefixes), plus private blocks
//!   for the rest of its prompt and its whole answer: the blocks for prompt +
//!   `max_tokens` are reserved at admission, so the engine never preempts
//!   (vLLM allocates as it goes and preempts when it runs out instead). When
//!   a sequence ends, its keyed blocks stay cached, unreferenced, in LRU order
//!   (released in reverse, so a chain's tail goes before its head, as vLLM's
//!   free queue does) until the space is needed. A request's cached prefix is
//!   the longest run of its leading blocks present at admission, at most its
//!   prompt length minus one token in whole blocks (vLLM always computes the
//!   last prompt token); its blocks are inserted or reused at admission.
//! * **Limits.** At most `max_waiting` requests wait (more are rejected); a
//!   request whose prompt + `max_tokens` cannot fit in the whole cache is
//!   rejected (vLLM's maximum context length). Memory is bounded by
//!   `slots`, `max_waiting`, the prompts' sizes and `kv_blocks` entries.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

/// Tokens per KV block: vLLM's default `--block-size`.
pub const BLOCK_TOKENS: u64 = 16;

/// Bytes of canonical prompt text per token: the usual rule of thumb for
/// English text with a BPE tokenizer, and the one `lb`'s cache-aware routing
/// and `simulate_prefix` assume (1 KiB of text = 256 tokens).
pub const BYTES_PER_TOKEN: usize = 4;

const BLOCK_BYTES: usize = BLOCK_TOKENS as usize * BYTES_PER_TOKEN;

// The costs below are round estimates for a 7-8 B model in 16-bit weights on
// one data-centre GPU (A100/H100 class), not measurements. Prefill is
// compute-bound: about 2 x 8e9 FLOPs a token, so some 10-20 k tokens/s in
// practice; 0.1 ms a token is the round, slow end. Decode is bound by memory
// bandwidth: each step reads all ~16 GB of weights (8 ms at 2 TB/s) plus the
// KV cache and overheads, so tens of ms per token at batch 1; batching shares
// the weight reads, so a step grows slowly with the batch (x2 at 32 here).

/// Prefill time per uncached prompt token (0.1 ms: 10 k tokens/s).
pub const PREFILL_SECS_PER_TOKEN: f64 = 0.000_1;

/// Decode step with one running sequence (20 ms: 50 tokens/s).
pub const DECODE_SECS_AT_BATCH_1: f64 = 0.020;

/// Decode step with 32 running sequences (40 ms); linear in the batch size.
pub const DECODE_SECS_AT_BATCH_32: f64 = 0.040;

/// Upper bounds of the `vllm:time_to_first_token_seconds` buckets, vLLM's.
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// The engine's settings (from `--slots`, `--kv-blocks`, `--max-waiting`,
/// `--speed`).
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Sequences decoded together at most.
    pub slots: usize,
    /// KV cache size in blocks of [`BLOCK_TOKENS`] tokens.
    pub kv_blocks: u64,
    /// Requests allowed to wait for admission.
    pub max_waiting: usize,
    /// Every modelled time is divided by this (> 0).
    pub speed: f64,
}

impl EngineConfig {
    /// Prefill time of `uncached` prompt tokens.
    pub fn prefill(&self, uncached: u64) -> Duration {
        self.scaled(uncached as f64 * PREFILL_SECS_PER_TOKEN)
    }

    /// Time of one decode step with `batch` running sequences.
    pub fn decode_step(&self, batch: usize) -> Duration {
        let slope = (DECODE_SECS_AT_BATCH_32 - DECODE_SECS_AT_BATCH_1) / 31.0;
        let extra = batch.saturating_sub(1) as f64 * slope;
        self.scaled(DECODE_SECS_AT_BATCH_1 + extra)
    }

    /// Longest prompt + answer, in tokens: the whole cache.
    pub fn max_context_tokens(&self) -> u64 {
        self.kv_blocks.saturating_mul(BLOCK_TOKENS)
    }

    fn scaled(&self, secs: f64) -> Duration {
        Duration::try_from_secs_f64(secs / self.speed).unwrap_or(Duration::MAX)
    }
}

/// A prompt as the engine sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    /// Its length in tokens.
    pub tokens: u64,
    /// The chain keys of its full blocks, in order.
    pub block_keys: Vec<u64>,
}

impl Prompt {
    /// Tokenizes the canonical prompt text (chat: `role\0content\x01` per
    /// message; completions: the prompt): token i is bytes `4i..4i+4` of its
    /// UTF-8 (the last one may be shorter), so a prompt has `ceil(bytes / 4)`
    /// tokens. Block j is tokens `16j..16j+16` (bytes `64j..64j+64`, fewer
    /// if the last token is short); only blocks of 16 tokens are keyed, key j
    /// being FNV-1a 64 of key j-1 (little-endian; 0 before the first block)
    /// followed by block j's bytes.
    pub fn from_text(text: &str) -> Self {
        let bytes = text.as_bytes();
        let tokens = bytes.len().div_ceil(BYTES_PER_TOKEN) as u64;
        let full_blocks = (tokens / BLOCK_TOKENS) as usize;
        let mut block_keys = Vec::with_capacity(full_blocks);
        let mut key = 0u64;
        for (j, block) in bytes.chunks(BLOCK_BYTES).take(full_blocks).enumerate() {
            debug_assert!(j < full_blocks);
            key = chain_key(key, block);
            block_keys.push(key);
        }
        Prompt { tokens, block_keys }
    }
}

fn chain_key(prev: u64, block: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in prev.to_le_bytes().iter().chain(block) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The engine's name for a request (chosen by the caller, unique).
pub type RequestId = u64;

/// Why a request was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// `max_waiting` requests are already waiting.
    QueueFull { max_waiting: usize },
    /// Prompt + answer need more blocks than the whole KV cache has.
    TooLong {
        prompt_tokens: u64,
        max_tokens: u64,
        max_context: u64,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rejection::QueueFull { max_waiting } => write!(
                f,
                "mock-backend: engine overloaded, {max_waiting} requests already waiting \
                 (--max-waiting)"
            ),
            Rejection::TooLong {
                prompt_tokens,
                max_tokens,
                max_context,
            } => write!(
                f,
                "This model's maximum context length is {max_context} tokens. However, you \
                 requested {} tokens ({prompt_tokens} in the messages, {max_tokens} in the \
                 completion). Please reduce the length of the messages or completion.",
                prompt_tokens.saturating_add(max_tokens)
            ),
        }
    }
}

/// What happened to a request; drained with [`Engine::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Admitted into the batch; `cached_tokens` of its prompt were cached.
    Admitted { id: RequestId, cached_tokens: u64 },
    /// It has `generated` tokens now; `done` after its last one (it has then
    /// left the engine).
    Token {
        id: RequestId,
        generated: u64,
        done: bool,
    },
}

/// A histogram with [`TTFT_BUCKETS`] bounds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket, not cumulative: `counts[i]` for
    /// `TTFT_BUCKETS[i-1] < v <= TTFT_BUCKETS[i]`, the last one above them all.
    pub counts: [u64; TTFT_BUCKETS.len() + 1],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        let i = TTFT_BUCKETS.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }
}

/// What `/metrics` shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub running: usize,
    pub waiting: usize,
    /// Blocks held by running sequences / all blocks (0..=1).
    pub kv_usage: f64,
    /// Prompt tokens of admitted requests.
    pub prefix_queries: u64,
    /// Of those, tokens found in the prefix cache.
    pub prefix_hits: u64,
    /// Prompt tokens of admitted requests (vLLM's `prompt_tokens`).
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generation_tokens: u64,
    /// Seconds from arrival to first token (divided by `speed`, like every
    /// time: what a client sees).
    pub ttft: Histogram,
}

struct Waiting {
    id: RequestId,
    arrived: Instant,
    prompt: Prompt,
    max_tokens: u64,
}

struct Running {
    id: RequestId,
    arrived: Instant,
    block_keys: Vec<u64>,
    private_blocks: u64,
    max_tokens: u64,
    generated: u64,
}

/// The engine; see the module documentation.
pub struct Engine {
    cfg: EngineConfig,
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    cache: BlockCache,
    /// When the iteration in progress ends; `None` while idle.
    iteration_end: Option<Instant>,
    counters: Snapshot,
    events: VecDeque<Event>,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        assert!(
            cfg.slots > 0 && cfg.kv_blocks > 0 && cfg.speed > 0.0 && cfg.speed.is_finite(),
            "engine settings out of range: {cfg:?}"
        );
        Engine {
            cache: BlockCache::new(cfg.kv_blocks),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            iteration_end: None,
            counters: Snapshot {
                running: 0,
                waiting: 0,
                kv_usage: 0.0,
                prefix_queries: 0,
                prefix_hits: 0,
                prompt_tokens: 0,
                generation_tokens: 0,
                ttft: Histogram::default(),
            },
            events: VecDeque::new(),
        }
    }

    /// A request arrives at `now`, asking for `max_tokens` tokens (at least
    /// one is generated). It waits, and is admitted at once if the engine is
    /// idle.
    pub fn submit(
        &mut self,
        now: Instant,
        id: RequestId,
        prompt: Prompt,
        max_tokens: u64,
    ) -> Result<(), Rejection> {
        let max_tokens = max_tokens.max(1);
        let blocks = prompt
            .tokens
            .saturating_add(max_tokens)
            .div_ceil(BLOCK_TOKENS);
        if blocks > self.cfg.kv_blocks {
            return Err(Rejection::TooLong {
                prompt_tokens: prompt.tokens,
                max_tokens,
                max_context: self.cfg.max_context_tokens(),
            });
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(Rejection::QueueFull {
                max_waiting: self.cfg.max_waiting,
            });
        }
        debug_assert!(!self.contains(id), "request id {id} reused");
        self.waiting.push_back(Waiting {
            id,
            arrived: now,
            prompt,
            max_tokens,
        });
        if self.iteration_end.is_none() {
            self.start_iteration(now);
        }
        Ok(())
    }

    /// The client of `id` left: the request leaves the queue or the batch
    /// (freeing its slot and blocks). Returns whether it was there.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            let r = self.running.remove(i);
            self.cache.release(&r.block_keys, r.private_blocks);
            return true;
        }
        false
    }

    /// Runs every iteration that ends at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Each pass ends an iteration in which at least one sequence got a
        // token, or leaves the engine idle: bounded by the tokens owed.
        while let Some(end) = self.iteration_end.filter(|&end| end <= now) {
            self.finish_iteration(end);
            self.start_iteration(end);
        }
    }

    /// When the iteration in progress ends; `None` while idle.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.iteration_end
    }

    /// The next thing that happened, oldest first.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The gauges and counters now (as of the last input).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_usage: self.cache.usage(),
            ..self.counters.clone()
        }
    }

    fn contains(&self, id: RequestId) -> bool {
        self.waiting.iter().any(|w| w.id == id) || self.running.iter().any(|r| r.id == id)
    }

    /// Admits what fits and schedules the iteration's end, or goes idle.
    fn start_iteration(&mut self, at: Instant) {
        let mut prefill_tokens = 0u64;
        while self.running.len() < self.cfg.slots {
            let Some(head) = self.waiting.front() else {
                break;
            };
            let private = private_blocks(head.prompt.tokens, head.max_tokens);
            if !self.cache.fits(&head.prompt.block_keys, private) {
                break;
            }
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            let hit_blocks = self
                .cache
                .cached_prefix(&w.prompt.block_keys)
                .min(w.prompt.tokens.saturating_sub(1) / BLOCK_TOKENS);
            let cached_tokens = hit_blocks * BLOCK_TOKENS;
            self.cache.acquire(&w.prompt.block_keys, private);
            self.counters.prefix_queries += w.prompt.tokens;
            self.counters.prefix_hits += cached_tokens;
            self.counters.prompt_tokens += w.prompt.tokens;
            prefill_tokens += w.prompt.tokens - cached_tokens;
            self.events.push_back(Event::Admitted {
                id: w.id,
                cached_tokens,
            });
            self.running.push(Running {
                id: w.id,
                arrived: w.arrived,
                block_keys: w.prompt.block_keys,
                private_blocks: private,
                max_tokens: w.max_tokens,
                generated: 0,
            });
        }
        self.iteration_end = if self.running.is_empty() {
            // Nothing runs, so the whole cache is free for the head: it was
            // admitted unless the queue is empty.
            debug_assert!(self.waiting.is_empty());
            None
        } else {
            let d = self.cfg.prefill(prefill_tokens) + self.cfg.decode_step(self.running.len());
            // At least 1 ns, so that time always moves on.
            Some(at + d.max(Duration::from_nanos(1)))
        };
    }

    /// Every running sequence gets a token at `end`; finished ones leave.
    fn finish_iteration(&mut self, end: Instant) {
        for r in &mut self.running {
            r.generated += 1;
            self.counters.generation_tokens += 1;
            if r.generated == 1 {
                let ttft = end.saturating_duration_since(r.arrived);
                self.counters.ttft.observe(ttft.as_secs_f64());
            }
            self.events.push_back(Event::Token {
                id: r.id,
                generated: r.generated,
                done: r.generated >= r.max_tokens,
            });
        }
        let cache = &mut self.cache;
        self.running.retain(|r| {
            let done = r.generated >= r.max_tokens;
            if done {
                cache.release(&r.block_keys, r.private_blocks);
            }
            !done
        });
    }
}

/// Blocks a sequence holds besides its keyed prompt blocks: the partial last
/// prompt block and its whole answer.
fn private_blocks(prompt_tokens: u64, max_tokens: u64) -> u64 {
    let all = prompt_tokens
        .saturating_add(max_tokens)
        .div_ceil(BLOCK_TOKENS);
    all - prompt_tokens / BLOCK_TOKENS
}

/// The KV cache: keyed (shareable, cacheable) blocks and a count of private
/// ones, `capacity` blocks in all.
struct BlockCache {
    capacity: u64,
    entries: HashMap<u64, CachedBlock>,
    /// Unreferenced keyed blocks by release tick: the first goes first.
    free_lru: BTreeMap<u64, u64>,
    /// Keyed blocks with references.
    referenced: u64,
    /// Private blocks of running sequences.
    private: u64,
    tick: u64,
}

struct CachedBlock {
    refs: u32,
    /// Its key in `free_lru` while `refs == 0`.
    tick: u64,
}

impl BlockCache {
    fn new(capacity: u64) -> Self {
        BlockCache {
            capacity,
            entries: HashMap::new(),
            free_lru: BTreeMap::new(),
            referenced: 0,
            private: 0,
            tick: 0,
        }
    }

    /// How many leading `keys` are cached.
    fn cached_prefix(&self, keys: &[u64]) -> u64 {
        keys.iter()
            .take_while(|k| self.entries.contains_key(k))
            .count() as u64
    }

    /// Whether a sequence with `keys` and `private` blocks can be admitted:
    /// unreferenced cached blocks count as free (they can be evicted).
    fn fits(&self, keys: &[u64], private: u64) -> bool {
        let newly_referenced = keys
            .iter()
            .filter(|k| self.entries.get(k).is_none_or(|b| b.refs == 0))
            .count() as u64;
        self.referenced + newly_referenced + self.private + private <= self.capacity
    }

    /// References `keys` (inserting the missing ones) and `private` blocks,
    /// evicting least recently released blocks to make room. Call after
    /// [`BlockCache::fits`].
    fn acquire(&mut self, keys: &[u64], private: u64) {
        for &k in keys {
            let b = self
                .entries
                .entry(k)
                .or_insert(CachedBlock { refs: 0, tick: 0 });
            if b.refs == 0 {
                self.free_lru.remove(&b.tick);
                self.referenced += 1;
            }
            b.refs += 1;
        }
        self.private += private;
        // `fits` held, so the unreferenced blocks alone cover any excess.
        while self.entries.len() as u64 + self.private > self.capacity {
            let Some((_, key)) = self.free_lru.pop_first() else {
                debug_assert!(false, "KV cache over capacity with nothing to evict");
                break;
            };
            self.entries.remove(&key);
        }
    }

    /// Drops one reference to each of `keys` (the last block first, so it is
    /// evicted first) and frees `private` blocks.
    fn release(&mut self, keys: &[u64], private: u64) {
        for k in keys.iter().rev() {
            let Some(b) = self.entries.get_mut(k) else {
                debug_assert!(false, "released a block that is not cached");
                continue;
            };
            b.refs -= 1;
            if b.refs == 0 {
                self.tick += 1;
                b.tick = self.tick;
                self.free_lru.insert(self.tick, *k);
                self.referenced -= 1;
            }
        }
        self.private -= private;
    }

    fn usage(&self) -> f64 {
        (self.referenced + self.private) as f64 / self.capacity as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(slots: usize, kv_blocks: u64) -> EngineConfig {
        EngineConfig {
            slots,
            kv_blocks,
            max_waiting: 100,
            speed: 1.0,
        }
    }

    fn ms(n: f64) -> Duration {
        Duration::from_secs_f64(n / 1000.0)
    }

    fn events(e: &mut Engine) -> Vec<Event> {
        std::iter::from_fn(|| e.poll_event()).collect()
    }

    /// Whether two durations agree within a microsecond (float rounding).
    fn near(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) < Duration::from_micros(1)
    }

    /// Runs the engine to idle, jumping from deadline to deadline; returns
    /// when (since `t0`) each request got its first token and its last one
    /// from here on.
    fn run_to_idle(e: &mut Engine, t0: Instant) -> HashMap<RequestId, (Duration, Duration)> {
        let mut seen: HashMap<RequestId, (Duration, Duration)> = HashMap::new();
        let _ = events(e);
        for _ in 0..1_000_000 {
            let Some(at) = e.poll_timeout() else {
                return seen;
            };
            e.handle_timeout(at);
            for ev in events(e) {
                if let Event::Token { id, .. } = ev {
                    seen.entry(id).or_insert((at - t0, at - t0)).1 = at - t0;
                }
            }
        }
        panic!("the engine never went idle");
    }

    #[test]
    fn tokenizes_four_bytes_a_token_and_chains_blocks() {
        assert_eq!(Prompt::from_text("").tokens, 0);
        assert_eq!(Prompt::from_text("abcd").tokens, 1);
        assert_eq!(Prompt::from_text("abcde").tokens, 2);
        let long = "x".repeat(64 * 3 + 10);
        let p = Prompt::from_text(&long);
        assert_eq!(p.tokens, 48 + 3);
        assert_eq!(p.block_keys.len(), 3);
        // 61 bytes: 16 tokens (the last one short), one keyed block.
        assert_eq!(Prompt::from_text(&"y".repeat(61)).block_keys.len(), 1);
        // Keys chain: the same block after different prefixes differs.
        let a = Prompt::from_text(&format!("{}{}", "a".repeat(64), "c".repeat(64)));
        let b = Prompt::from_text(&format!("{}{}", "b".repeat(64), "c".repeat(64)));
        assert_ne!(a.block_keys[1], b.block_keys[1]);
        // And a shared prefix gives shared leading keys.
        let c = Prompt::from_text(&format!("{}{}", "a".repeat(64), "d".repeat(64)));
        assert_eq!(a.block_keys[0], c.block_keys[0]);
        assert_ne!(a.block_keys[1], c.block_keys[1]);
        // Golden: the first key of 64 'x' is stable across builds.
        assert_eq!(
            Prompt::from_text(&"x".repeat(64)).block_keys,
            vec![chain_key(0, &[b'x'; 64])]
        );
    }

    #[test]
    fn costs_follow_the_constants() {
        let c = cfg(32, 100);
        assert!(near(c.prefill(10_000), Duration::from_secs(1)));
        assert!(near(c.decode_step(1), ms(20.0)));
        assert!(near(c.decode_step(32), ms(40.0)));
        assert!(near(c.decode_step(64), ms(60.0 + 20.0 / 31.0)));
        assert!(c.decode_step(16) > ms(29.0) && c.decode_step(16) < ms(30.0));
        let fast = EngineConfig { speed: 100.0, ..c };
        assert!(near(fast.decode_step(1), Duration::from_micros(200)));
        assert!(near(fast.prefill(10_000), ms(10.0)));
    }

    #[test]
    fn a_lone_request_prefills_then_decodes() {
        let t0 = Instant::now();
        let mut e = Engine::new(cfg(4, 1000));
        let p = Prompt::from_text(&"z".repeat(4000)); // 1000 tokens
        e.submit(t0, 1, p, 3).unwrap();
        assert_eq!(
            events(&mut e),
            vec![Event::Admitted {
                id: 1,
                cached_tokens: 0
            }]
        );
        // First token after 1000 x 0.1 ms of prefill and a 20 ms step.
        assert!(near(e.poll_timeout().unwrap() - t0, ms(120.0)));
        e.handle_timeout(t0 + ms(119.0));
        assert!(events(&mut e).is_empty());
        // Then a token every 20 ms.
        e.handle_timeout(t0 + ms(150.0));
        assert_eq!(
            events(&mut e),
            vec![
                Event::Token {
                    id: 1,
                    generated: 1,
                    done: false
                },
                Event::Token {
                    id: 1,
                    generated: 2,
                    done: false
                },
            ]
        );
        assert!(near(e.poll_timeout().unwrap() - t0, ms(160.0)));
        let s = e.snapshot();
        assert_eq!((s.running, s.waiting, s.generation_tokens), (1, 0, 2));
        // 1000 + 3 tokens: 63 blocks of 1000.
        assert!((s.kv_usage - 0.063).abs() < 1e-12, "{}", s.kv_usage);
        e.handle_timeout(t0 + ms(200.0));
        assert_eq!(
            events(&mut e),
            vec![Event::Token {
                id: 1,
                generated: 3,
                done: true
            }]
        );
        assert_eq!(e.poll_timeout(), None);
        let s = e.snapshot();
        assert_eq!((s.running, s.kv_usage), (0, 0.0));
        assert_eq!(s.ttft.count, 1);
        assert!((s.ttft.sum - 0.120).abs() < 1e-9);
        // 0.1 < 0.12 <= 0.25: the ninth bucket.
        assert_eq!(s.ttft.counts[8], 1);
    }

    #[test]
    fn slots_bound_the_batch_and_the_rest_wait_in_order() {
        let t0 = Instant::now();
        let mut e = Engine::new(cfg(2, 1000));
        for id in 1..=3 {
            e.submit(t0, id, Prompt::from_text("hi"), 10).unwrap();
        }
        let s = e.snapshot();
        // The first was admitted on arrival; the others wait for the
        // iteration's end, then only one fits.
        assert_eq!((s.running, s.waiting), (1, 2));
        e.handle_timeout(e.poll_timeout().unwrap());
        let s = e.snapshot();
        assert_eq!((s.running, s.waiting), (2, 1));
        let firsts = run_to_idle(&mut e, t0);
        // Request 3 starts when request 1 (10 tokens from t0) is done.
        assert!(firsts[&3].0 > firsts[&1].1, "{firsts:?}");
        assert!(firsts[&3].0 > firsts[&2].0);
        let s = e.snapshot();
        assert_eq!((s.running, s.waiting, s.generation_tokens), (0, 0, 30));
    }

    #[test]
    fn decode_slows_with_the_batch() {
        let t0 = Instant::now();
        let mut e = Engine::new(cfg(32, 10_000));
        for id in 0..32 {
            e.submit(t0, id, Prompt::from_text(""), 5).unwrap();
        }
        e.handle_timeout(e.poll_timeout().unwrap()); // the first one's first step
        let _ = events(&mut e);
        assert_eq!(e.snapshot().running, 32);
        assert!(near(e.poll_timeout().unwrap() - t0, ms(20.0 + 40.0)));
    }

    #[test]
    fn repeated_prompts_hit_the_prefix_cache_and_prefill_less() {
        let t0 = Instant::now();
        let mut e = Engine::new(cfg(4, 10_000));
        let text = "q".repeat(40_000); // 10_000 tokens, 625 blocks
        e.submit(t0, 1, Prompt::from_text(&text), 1).unwrap();
        let cold = e.poll_timeout().unwrap() - t0;
        assert!(near(cold, ms(1020.0)));
        e.handle_timeout(t0 + cold);
        let t1 = t0 + Duration::from_secs(5);
        e.submit(t1, 2, Prompt::from_text(&text), 1).unwrap();
        // All but the last block: 624 x 16 = 9984 tokens cached.
        assert!(events(&mut e).contains(&Event::Admitted {
            id: 2,
            cached_tokens: 9984
        }));
        let warm = e.poll_timeout().unwrap() - t1;
        assert!(near(warm, ms(1.6 + 20.0)));
        e.handle_timeout(t1 + warm);
        let s = e.snapshot();
        assert_eq!((s.prefix_queries, s.prefix_hits), (20_000, 9984));
        // A prompt that extends the first one shares its 625 blocks.
        let longer = format!("{text}{}", "r".repeat(400));
        e.submit(t1 + warm, 3, Prompt::from_text(&longer), 1)
            .unwrap();
        assert!(events(&mut e).contains(&Event::Admitted {
            id: 3,
            cached_tokens: 10_000
        }));
    }

    #[test]
    fn lru_evicts_the_least_recently_released_tail_first() {
        let t0 = Instant::now();
        // 10 blocks. Prompt A: 4 blocks; B: 4 other blocks; each asks 1 token.
        let mut e = Engine::new(cfg(1, 10));
        let a = "a".repeat(64 * 4);
        let b = "b".repeat(64 * 4);
        let c = "c".repeat(64 * 4);
        let mut now = t0;
        for (id, text) in [(1, &a), (2, &b)] {
            e.submit(now, id, Prompt::from_text(text), 1).unwrap();
            now = e.poll_timeout().unwrap();
            e.handle_timeout(now);
        }
        // Both cached: 8 of 10 blocks, none in use.
        assert_eq!(e.snapshot().kv_usage, 0.0);
        // C needs 4 keyed blocks + 1 private: A's last three go (released
        // first, tail first), its first block stays.
        e.submit(now, 3, Prompt::from_text(&c), 1).unwrap();
        assert!((e.snapshot().kv_usage - 0.5).abs() < 1e-12);
        now = e.poll_timeout().unwrap();
        e.handle_timeout(now);
        let _ = events(&mut e);
        e.submit(now, 4, Prompt::from_text(&a), 1).unwrap();
        assert!(events(&mut e).contains(&Event::Admitted {
            id: 4,
            cached_tokens: 16
        }));
        now = e.poll_timeout().unwrap();
        e.handle_timeout(now);
        let _ = events(&mut e);
        e.submit(now, 5, Prompt::from_text(&b), 1).unwrap();
        // B's blocks were released after A's: B lost only what A's second
        // run needed beyond the free space.
        let cached = events(&mut e)
            .into_iter()
            .find_map(|ev| match ev {
                Event::Admitted {
                    id: 5,
                    cached_tokens,
                } => Some(cached_tokens),
                _ => None,
            })
            .unwrap();
        assert_eq!(cached, 16);
        assert_eq!(e.cache.entries.len() as u64 + e.cache.private, 10);
    }

    #[test]
    fn a_full_cache_holds_the_queue_head_until_blocks_free() {
        let t0 = Instant::now();
        // 10 blocks, 4 slots; each request needs 6 blocks (2 keyed + 4 private).
        let mut e = Engine::new(cfg(4, 10));
        let one = format!("{}{}", "1".repeat(128), "x".repeat(4));
        let two = format!("{}{}", "2".repeat(128), "x".repeat(4));
        e.submit(t0, 1, Prompt::from_text(&one), 60).unwrap();
        e.submit(t0, 2, Prompt::from_text(&two), 60).unwrap();
        e.handle_timeout(e.poll_timeout().unwrap());
        let s = e.snapshot();
        assert_eq!((s.running, s.waiting), (1, 1));
        assert!((s.kv_usage - 0.6).abs() < 1e-12);
        let firsts = run_to_idle(&mut e, t0);
        assert!(firsts[&2].0 > firsts[&1].1);
    }

    #[test]
    fn limits_reject_with_vllm_like_messages() {
        let t0 = Instant::now();
        let mut e = Engine::new(EngineConfig {
            max_waiting: 1,
            ..cfg(1, 4)
        });
        let err = e
            .submit(t0, 1, Prompt::from_text(&"x".repeat(200)), 20)
            .unwrap_err();
        assert_eq!(
            err,
            Rejection::TooLong {
                prompt_tokens: 50,
                max_tokens: 20,
                max_context: 64
            }
        );
        assert!(err
            .to_string()
            .contains("maximum context length is 64 tokens"));
        e.submit(t0, 1, Prompt::from_text("a"), 5).unwrap();
        e.submit(t0, 2, Prompt::from_text("b"), 5).unwrap();
        assert_eq!(
            e.submit(t0, 3, Prompt::from_text("c"), 5),
            Err(Rejection::QueueFull { max_waiting: 1 })
        );
        assert_eq!(e.snapshot().waiting, 1);
    }

    #[test]
    fn cancel_frees_the_slot_and_blocks() {
        let t0 = Instant::now();
        let mut e = Engine::new(cfg(1, 100));
        e.submit(t0, 1, Prompt::from_text(&"a".repeat(640)), 100)
            .unwrap();
        e.submit(t0, 2, Prompt::from_text("b"), 1).unwrap();
        e.submit(t0, 3, Prompt::from_text("c"), 1).unwrap();
        assert!(e.cancel(3));
        assert!(e.cancel(1));
        assert!(!e.cancel(1));
        assert_eq!(e.snapshot().kv_usage, 0.0);
        let firsts = run_to_idle(&mut e, t0);
        assert_eq!(firsts.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(e.snapshot().generation_tokens, 1);
    }

    /// After `handle_timeout(t)`, the next deadline is later than `t`, also at
    /// absurd speeds, and the engine always drains.
    #[test]
    fn time_always_moves_on() {
        let t0 = Instant::now();
        let mut e = Engine::new(EngineConfig {
            speed: 1e12,
            ..cfg(3, 1000)
        });
        let mut now = t0;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for id in 0..200u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let text = "w".repeat((x % 300) as usize);
            let _ = e.submit(now, id, Prompt::from_text(&text), 1 + x % 7);
            if x % 5 == 0 {
                e.cancel(id.saturating_sub(1));
            }
            now += Duration::from_nanos(x % 3);
            e.handle_timeout(now);
            let _ = events(&mut e);
            if let Some(next) = e.poll_timeout() {
                assert!(next > now);
            }
        }
        let _ = run_to_idle(&mut e, t0);
        let s = e.snapshot();
        assert_eq!((s.running, s.waiting, s.kv_usage), (0, 0, 0.0));
        assert_eq!(e.cache.referenced + e.cache.private, 0);
    }
}
