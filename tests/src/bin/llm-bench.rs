//! `llm-bench`: the client of `tests/load/llm_bench.sh`, the end-to-end benchmark of `lb`
//! in front of mock inference engines (`mock-backend --engine`). Benchmark tooling, not a
//! test.
//!
//! ```text
//! llm-bench --lb 127.0.0.1:19000 [--lb ...] --engine 127.0.0.1:18000 [--engine ...]
//!           --label least-conn --speed 4 --duration 40 --warmup 10 [...]
//! ```
//!
//! # Workload
//!
//! Multi-turn chat sessions sharing system prompts, replayed open-loop:
//!
//! * **Sessions arrive as a Poisson process** (`--session-rate` per modelled second) during
//!   `--duration` wall seconds, whatever the answers' speed. Each session picks one of
//!   `--system-prompts` system prompts by Zipf popularity (exponent 1: the first is the
//!   most used), `--system-kib` KiB of text each (uniform in the range, fixed per prompt),
//!   and has `--turns` turns (uniform in the range).
//! * **A turn** sends the whole conversation so far (system prompt, every earlier user
//!   message and the assistant's answer as streamed) plus a new user message of
//!   `--user-bytes` bytes (uniform), unique to the session, with `max_tokens` uniform in
//!   `--max-tokens`, `"stream": true` (usage included) and `"user"` = the session id. The
//!   next turn is sent an exponential think time (`--think`, modelled seconds, mean) after
//!   the answer ends: a user reads before typing again. A session whose next turn would
//!   start at or after `--duration` ends there, and so does one whose request failed.
//! * **Connections.** Each request goes to the next `--lb` address in turn (round robin
//!   over requests, so one conversation's turns land on every replica, as behind a
//!   Kubernetes Service), over a kept-alive connection to it when one is idle, else a new
//!   one.
//! * **Seeded.** The schedule (arrivals, prompts, messages, lengths, think times) comes
//!   from `--seed`: every run and every policy get the same sessions.
//!
//! # Bounds
//!
//! Every loop is bounded: at most `--max-sessions` sessions, at most `--turns` turns each,
//! no turn starts after `--duration`, and every request still running at `--duration` +
//! `--drain` is abandoned (counted as `unfinished`).
//!
//! # Measures
//!
//! Only requests sent at or after `--warmup` (the engines' caches fill and the sessions
//! ramp up before it) count. Times are divided back from the engines' `--speed`, i.e.
//! reported in the modelled engine's time: measured wall time × speed (and rates ÷
//! speed), so the figures read as those of a fleet of real 7-8 B engines.
//!
//! * `req/s`: requests completed (`200`, stream ended with `[DONE]`) between `--warmup` and
//!   `--duration`, per modelled second;
//! * TTFT: send to the first content token; e2e: send to `[DONE]`; p50 and p99 of the
//!   completed requests sent after `--warmup`;
//! * prefix-cache hit rate: the engines' `vllm:prefix_cache_hits_total` /
//!   `vllm:prefix_cache_queries_total` increase between `--warmup` and `--duration`,
//!   summed over `--engine`s (read from their `/metrics`);
//! * errors: non-`200` answers and transport errors (any time), and requests unfinished at
//!   the deadline.
//!
//! Prints one markdown table row on stdout:
//! `| label | replicas | req/s | TTFT p50 | TTFT p99 | e2e p99 | hit rate | errors |`
//! and a line of details on stderr. Exits 1 when no request completed or an engine's
//! `/metrics` cannot be read, 2 on bad flags.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(name = "llm-bench", about = "Client of tests/load/llm_bench.sh")]
struct Args {
    /// An `lb` address (host:port); repeat for replicas.
    #[arg(long = "lb", required = true)]
    lbs: Vec<SocketAddr>,
    /// An engine address (host:port) whose `/metrics` is read; repeat.
    #[arg(long = "engine", required = true)]
    engines: Vec<SocketAddr>,
    /// The policy's name, the table's first column.
    #[arg(long, default_value = "?")]
    label: String,
    /// The engines' `--speed`: times are reported multiplied by it.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Wall seconds during which sessions start and turns are sent.
    #[arg(long, default_value_t = 40.0)]
    duration: f64,
    /// Wall seconds before measuring.
    #[arg(long, default_value_t = 10.0)]
    warmup: f64,
    /// Wall seconds after `--duration` for requests in flight to end.
    #[arg(long, default_value_t = 20.0)]
    drain: f64,
    /// New sessions per modelled second (Poisson).
    #[arg(long, default_value_t = 2.0)]
    session_rate: f64,
    /// Turns per session: MIN..MAX.
    #[arg(long, default_value = "2..8", value_parser = range)]
    turns: (u64, u64),
    /// Mean think time between an answer and the next turn, modelled seconds.
    #[arg(long, default_value_t = 5.0)]
    think: f64,
    /// Distinct system prompts.
    #[arg(long, default_value_t = 32)]
    system_prompts: u64,
    /// System prompt size in KiB: MIN..MAX.
    #[arg(long, default_value = "4..10", value_parser = range)]
    system_kib: (u64, u64),
    /// User message size in bytes: MIN..MAX.
    #[arg(long, default_value = "200..1200", value_parser = range)]
    user_bytes: (u64, u64),
    /// `max_tokens` per turn: MIN..MAX.
    #[arg(long, default_value = "16..64", value_parser = range)]
    max_tokens: (u64, u64),
    /// Most sessions started.
    #[arg(long, default_value_t = 20_000)]
    max_sessions: usize,
    /// The schedule's seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The `model` field.
    #[arg(long, default_value = "mock-model")]
    model: String,
}

fn range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("'{s}' is not MIN..MAX"))?;
    let a: u64 = a
        .parse()
        .map_err(|_| format!("'{a}' is not a whole number"))?;
    let b: u64 = b
        .parse()
        .map_err(|_| format!("'{b}' is not a whole number"))?;
    if a == 0 || a > b || b > 1_000_000 {
        return Err(format!("'{s}': need 1 <= MIN <= MAX <= 1000000"));
    }
    Ok((a, b))
}

const WORDS: [&str; 32] = [
    "the",
    "model",
    "answer",
    "user",
    "policy",
    "request",
    "cache",
    "prefix",
    "token",
    "batch",
    "engine",
    "route",
    "always",
    "never",
    "explain",
    "briefly",
    "context",
    "tool",
    "call",
    "result",
    "format",
    "json",
    "list",
    "step",
    "check",
    "value",
    "error",
    "retry",
    "output",
    "input",
    "system",
    "assistant",
];

/// `n` bytes of words, starting with `head`.
fn text(rng: &mut SmallRng, head: &str, n: usize) -> String {
    let mut s = String::with_capacity(n + 16);
    s.push_str(head);
    while s.len() < n {
        s.push(' ');
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s.truncate(n.max(head.len()));
    s
}

fn uniform(rng: &mut SmallRng, (a, b): (u64, u64)) -> u64 {
    rng.random_range(a..=b)
}

fn exp(rng: &mut SmallRng, mean: f64) -> f64 {
    let u: f64 = rng.random();
    -(1.0 - u).ln() * mean
}

struct Turn {
    user: String,
    max_tokens: u64,
    /// Think time before it, wall seconds (unused for the first turn).
    think: f64,
}

struct Session {
    id: usize,
    start: f64,
    system: usize,
    turns: Vec<Turn>,
}

struct Schedule {
    systems: Vec<String>,
    sessions: Vec<Session>,
}

fn schedule(a: &Args) -> Schedule {
    let mut rng = SmallRng::seed_from_u64(a.seed);
    let systems: Vec<String> = (0..a.system_prompts)
        .map(|i| {
            let kib = uniform(&mut rng, a.system_kib);
            text(
                &mut rng,
                &format!("You are agent {i}. Follow these rules."),
                (kib * 1024) as usize,
            )
        })
        .collect();
    // Zipf(1) popularity: weight 1/(i+1).
    let weights: Vec<f64> = (0..systems.len()).map(|i| 1.0 / (i as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let mut sessions = Vec::new();
    let mut t = 0.0;
    while sessions.len() < a.max_sessions {
        t += exp(&mut rng, 1.0 / (a.session_rate * a.speed));
        if t >= a.duration {
            break;
        }
        let mut x = rng.random::<f64>() * total;
        let mut system = systems.len() - 1;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                system = i;
                break;
            }
            x -= w;
        }
        let id = sessions.len();
        let turns = (0..uniform(&mut rng, a.turns))
            .map(|k| {
                let n = uniform(&mut rng, a.user_bytes) as usize;
                Turn {
                    user: text(&mut rng, &format!("Session {id} turn {k}:"), n),
                    max_tokens: uniform(&mut rng, a.max_tokens),
                    think: exp(&mut rng, a.think / a.speed),
                }
            })
            .collect();
        sessions.push(Session {
            id,
            start: t,
            system,
            turns,
        });
    }
    Schedule { systems, sessions }
}

/// One request's outcome; times in wall seconds since the start.
struct Rec {
    sent: f64,
    ttft: f64,
    e2e: f64,
    ok: bool,
}

#[derive(Default)]
struct Shared {
    recs: Vec<Rec>,
    errors: BTreeMap<String, u64>,
    prompt_tokens: u64,
    cached_tokens: u64,
}

type Sender = SendRequest<Full<Bytes>>;

struct Client {
    lbs: Vec<SocketAddr>,
    pools: Vec<Mutex<Vec<Sender>>>,
    next: AtomicUsize,
    opened: AtomicUsize,
    t0: Instant,
    model: String,
    shared: Mutex<Shared>,
}

impl Client {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn error(&self, what: String) {
        *self.shared.lock().unwrap().errors.entry(what).or_default() += 1;
    }

    async fn sender(&self, i: usize) -> Result<Sender, String> {
        while let Some(s) = {
            let popped = self.pools[i].lock().unwrap().pop();
            popped
        } {
            // Its last response was read to the end: it is ready, or about to be.
            let mut s = s;
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), s.ready()).await {
                return Ok(s);
            }
        }
        let tcp = TcpStream::connect(self.lbs[i])
            .await
            .map_err(|e| format!("connect: {}", e.kind()))?;
        tcp.set_nodelay(true).ok();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(send)
    }

    /// Sends one turn; returns the assistant's answer, or None on failure (recorded).
    async fn turn(&self, messages: &[Value], max_tokens: u64, user: &str) -> Option<String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.lbs.len();
        let body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
            "user": user,
        });
        let sent = self.now();
        let mut send = match self.sender(i).await {
            Ok(s) => s,
            Err(e) => {
                self.error(e);
                self.record(sent, 0.0, 0.0, false);
                return None;
            }
        };
        let req = Request::post("/v1/chat/completions")
            .header("host", self.lbs[i].to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let resp = match send.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.error(format!("send: {e}"));
                self.record(sent, 0.0, 0.0, false);
                return None;
            }
        };
        let status = resp.status();
        let mut body = resp.into_body();
        if status != 200 {
            self.error(format!("status {}", status.as_u16()));
            self.record(sent, 0.0, 0.0, false);
            return None;
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut answer = String::new();
        let mut ttft = None;
        let mut done = false;
        let (mut prompt, mut cached) = (0, 0);
        while !done {
            let frame = match body.frame().await {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    self.error(format!("body: {e}"));
                    self.record(sent, 0.0, 0.0, false);
                    return None;
                }
                None => break,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..end + 2).collect();
                let Some(payload) = event.strip_prefix(b"data: ") else {
                    continue;
                };
                let payload = &payload[..payload.len() - 2];
                if payload == b"[DONE]" {
                    done = true;
                    break;
                }
                let Ok(v) = serde_json::from_slice::<Value>(payload) else {
                    continue;
                };
                if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                    if ttft.is_none() {
                        ttft = Some(self.now() - sent);
                    }
                    answer.push_str(c);
                }
                if let Some(p) = v["usage"]["prompt_tokens"].as_u64() {
                    prompt = p;
                    cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0);
                }
            }
        }
        let e2e = self.now() - sent;
        let Some(ttft) = ttft.filter(|_| done) else {
            self.error("stream ended early".into());
            self.record(sent, 0.0, 0.0, false);
            return None;
        };
        // The chunked body's end follows `[DONE]`; read it so the connection can be reused.
        let mut ended = false;
        for _ in 0..16 {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(_)) => break,
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if ended && !send.is_closed() {
            self.pools[i].lock().unwrap().push(send);
        }
        {
            let mut sh = self.shared.lock().unwrap();
            sh.prompt_tokens += prompt;
            sh.cached_tokens += cached;
        }
        self.record(sent, ttft, e2e, true);
        Some(answer)
    }

    fn record(&self, sent: f64, ttft: f64, e2e: f64, ok: bool) {
        self.shared.lock().unwrap().recs.push(Rec {
            sent,
            ttft,
            e2e,
            ok,
        });
    }

    async fn session(&self, s: &Session, system: &str, duration: f64) {
        tokio::time::sleep_until(self.t0 + Duration::from_secs_f64(s.start)).await;
        let mut messages = vec![json!({"role": "system", "content": system})];
        let user = format!("session-{}", s.id);
        for (k, t) in s.turns.iter().enumerate() {
            if self.now() + if k > 0 { t.think } else { 0.0 } >= duration {
                return;
            }
            if k > 0 {
                tokio::time::sleep(Duration::from_secs_f64(t.think)).await;
            }
            messages.push(json!({"role": "user", "content": t.user}));
            let Some(answer) = self.turn(&messages, t.max_tokens, &user).await else {
                return;
            };
            messages.push(json!({"role": "assistant", "content": answer}));
        }
    }
}

/// Sum of the engines' prefix-cache (hits, queries) counters.
async fn prefix_counters(engines: &[SocketAddr]) -> Result<(f64, f64), String> {
    let (mut hits, mut queries) = (0.0, 0.0);
    for e in engines {
        let text = tokio::time::timeout(Duration::from_secs(5), get_metrics(*e))
            .await
            .map_err(|_| format!("{e}/metrics: timed out"))??;
        let mut seen = 0;
        for line in text.lines() {
            let value = || {
                line.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            if line.starts_with("vllm:prefix_cache_hits_total") {
                hits += value();
                seen += 1;
            } else if line.starts_with("vllm:prefix_cache_queries_total") {
                queries += value();
                seen += 1;
            }
        }
        if seen < 2 {
            return Err(format!("{e}/metrics: no vllm:prefix_cache_* counters"));
        }
    }
    Ok((hits, queries))
}

async fn get_metrics(e: SocketAddr) -> Result<String, String> {
    let tcp = TcpStream::connect(e)
        .await
        .map_err(|x| format!("{e}/metrics: {x}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|x| format!("{e}/metrics: {x}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get("/metrics")
        .header("host", e.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = send
        .send_request(req)
        .await
        .map_err(|x| format!("{e}/metrics: {x}"))?;
    if resp.status() != 200 {
        return Err(format!("{e}/metrics: status {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|x| format!("{e}/metrics: {x}"))?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    let a = Args::parse();
    let bad = |m: &str| -> ! {
        eprintln!("llm-bench: error: {m}");
        std::process::exit(2)
    };
    if !(a.speed > 0.0 && a.speed <= 1000.0) {
        bad("--speed: need 0 < X <= 1000");
    }
    if !(a.duration > 0.0 && a.duration <= 3600.0) {
        bad("--duration: need 0 < S <= 3600");
    }
    if !(a.warmup >= 0.0 && a.warmup < a.duration) {
        bad("--warmup: need 0 <= S < --duration");
    }
    if !(a.drain >= 0.0 && a.drain <= 600.0) {
        bad("--drain: need 0 <= S <= 600");
    }
    if !(a.session_rate > 0.0 && a.session_rate <= 10_000.0) {
        bad("--session-rate: need 0 < R <= 10000");
    }
    if !(a.think >= 0.0 && a.think <= 3600.0) {
        bad("--think: need 0 <= S <= 3600");
    }
    if a.system_prompts == 0 || a.system_prompts > 10_000 {
        bad("--system-prompts: need 1..=10000");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    std::process::exit(rt.block_on(run(a)));
}

async fn run(a: Args) -> i32 {
    let sched = schedule(&a);
    let turns: usize = sched.sessions.iter().map(|s| s.turns.len()).sum();
    let n_sessions = sched.sessions.len();
    let client = Arc::new(Client {
        pools: a.lbs.iter().map(|_| Mutex::new(Vec::new())).collect(),
        lbs: a.lbs.clone(),
        next: AtomicUsize::new(0),
        opened: AtomicUsize::new(0),
        t0: Instant::now() + Duration::from_millis(50),
        model: a.model.clone(),
        shared: Mutex::new(Shared::default()),
    });
    let systems = Arc::new(sched.systems);
    let deadline = client.t0 + Duration::from_secs_f64(a.duration + a.drain);
    let mut tasks = tokio::task::JoinSet::new();
    for s in sched.sessions {
        let (c, systems, duration) = (client.clone(), systems.clone(), a.duration);
        tasks.spawn(async move { c.session(&s, &systems[s.system], duration).await });
    }
    // The engines' counters at --warmup and at --duration.
    tokio::time::sleep_until(client.t0 + Duration::from_secs_f64(a.warmup)).await;
    let before = prefix_counters(&a.engines).await;
    tokio::time::sleep_until(client.t0 + Duration::from_secs_f64(a.duration)).await;
    let after = prefix_counters(&a.engines).await;
    let (before, after) = match (before, after) {
        (Ok(b), Ok(x)) => (b, x),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("llm-bench: error: {e}");
            return 1;
        }
    };
    let mut unfinished = 0;
    if tokio::time::timeout_at(deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        unfinished = tasks.len();
        tasks.abort_all();
    }
    let sh = client.shared.lock().unwrap();
    let speed = a.speed;
    let measured: Vec<&Rec> = sh.recs.iter().filter(|r| r.sent >= a.warmup).collect();
    let ok: Vec<&&Rec> = measured.iter().filter(|r| r.ok).collect();
    let in_window = ok.iter().filter(|r| r.sent + r.e2e <= a.duration).count();
    let mut ttft: Vec<f64> = ok.iter().map(|r| r.ttft * speed * 1e3).collect();
    let mut e2e: Vec<f64> = ok.iter().map(|r| r.e2e * speed * 1e3).collect();
    ttft.sort_by(f64::total_cmp);
    e2e.sort_by(f64::total_cmp);
    let window = (a.duration - a.warmup) * speed;
    let dq = after.1 - before.1;
    let hit = if dq > 0.0 {
        (after.0 - before.0) / dq
    } else {
        f64::NAN
    };
    let errors: u64 = sh.errors.values().sum::<u64>() + unfinished as u64;
    println!(
        "| {} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1}% | {} |",
        a.label,
        a.lbs.len(),
        in_window as f64 / window,
        pct(&ttft, 50.0),
        pct(&ttft, 99.0),
        pct(&e2e, 99.0),
        hit * 100.0,
        errors,
    );
    let client_hit = if sh.prompt_tokens > 0 {
        sh.cached_tokens as f64 / sh.prompt_tokens as f64 * 100.0
    } else {
        0.0
    };
    eprintln!(
        "llm-bench {} x{}: {} sessions, {} turns scheduled, {} requests sent ({} measured, {} ok), \
         client-side cached tokens {:.1}%, {} connections opened, unfinished {}, errors {:?}",
        a.label,
        a.lbs.len(),
        n_sessions,
        turns,
        sh.recs.len(),
        measured.len(),
        ok.len(),
        client_hit,
        client.opened.load(Ordering::Relaxed),
        unfinished,
        sh.errors,
    );
    if ok.is_empty() {
        eprintln!("llm-bench: error: no request completed");
        return 1;
    }
    0
}
