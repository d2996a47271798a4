//! `mock-backend`: a fake OpenAI-compatible LLM inference server for black-box
//! tests, demos and benchmarks of the `lb` load balancer.
//!
//! # Startup
//!
//! On startup it prints exactly one line to stdout, `listening on ADDR:PORT`
//! (e.g. `listening on 127.0.0.1:40123`, the real bound port, also with
//! `--port 0`), and flushes it. Nothing else is ever written to stdout;
//! diagnostics go to stderr. SIGTERM and SIGINT make it exit 0 at once.
//!
//! # Flags
//!
//! | flag | default | meaning |
//! | --- | --- | --- |
//! | `--port N` | `0` | port to listen on; `0` picks a free port |
//! | `--bind IP` | `127.0.0.1` | address to listen on |
//! | `--mode healthy\|failing\|flaky\|timeout` | `healthy` | behaviour, see below |
//! | `--delay D` | `0` | wait this long before answering each request |
//! | `--failure-rate R` | `0.5` | probability (0.0..=1.0) that `flaky` fails a request |
//! | `--seed N` | random | seed (u64) of the `flaky` RNG: same seed, same sequence |
//! | `--response-size N` | `0` | bytes of padding added to non-streaming completion JSON |
//! | `--health-endpoint PATH` | `/v1/models` | the health-check path |
//! | `--tokens N` | `10` | tokens per completion (chunks per stream); engine: the default `max_tokens` |
//! | `--token-interval D` | `50ms` | time between streamed chunks |
//! | `--idle-timeout D` | never | close keep-alive connections idle this long |
//! | `--keep-alive-header N` | none | send `Keep-Alive: timeout=N` on every response |
//! | `--close-after D` | never | close each connection this long after a response ends, without announcing it (no `Connection: close`) |
//! | `--model NAME` | `mock-model` | a served model name; repeat for more (the first is the default) |
//! | `--engine` | off | model an inference engine: see *Engine mode* |
//! | `--slots N` | `32` | engine: sequences decoded together (1..=4096) |
//! | `--kv-blocks N` | `25000` | engine: KV cache blocks of 16 tokens (400 k tokens) |
//! | `--max-waiting N` | `1000` | engine: requests that may wait; more get 503 |
//! | `--speed X` | `1` | engine: every modelled time is divided by X (> 0) |
//!
//! Durations (`D`) are a number with an optional unit: `500ms`, `2s`, `1.5m`,
//! `250us`, `100ns`, `1h`, or a plain number of seconds such as `0.5`.
//! For `--idle-timeout`, `0`, `never` and `none` mean "never". The engine
//! flags require `--engine`.
//!
//! # Modes
//!
//! * `healthy`: everything answers normally.
//! * `failing`: the health endpoint answers 503, every other request 500.
//! * `flaky`: each request except the health endpoint fails with 500 with
//!   probability `--failure-rate` (one draw per request, in arrival order, from
//!   an RNG seeded by `--seed`); the health endpoint always answers 200.
//! * `timeout`: connections are accepted and requests (head and body) are read,
//!   but nothing is ever answered, not even the health endpoint.
//!
//! The control endpoints `/stats`, `/prefixstats`, `/prefixstats/reset` and
//! `GET /metrics` are exempt from the modes and from
//! `--delay`: they always answer at once, so a test can inspect a failing or
//! hanging backend. `--delay` applies to every
//! other request (including the health endpoint) before anything is answered.
//! Error bodies are OpenAI-style:
//! `{"error":{"message":..,"type":..,"code":N},"backend_port":P}`.
//!
//! # Endpoints
//!
//! Every response carries the header `x-backend-port: P`, and every JSON body
//! a field `"backend_port": P` (P = the bound port).
//!
//! * `<health endpoint>` (any method, default `GET /v1/models`): 200 with an
//!   OpenAI model list `{"object":"list","data":[{"id":"mock-model",..}],..}`,
//!   one entry per `--model`.
//!   Counted in `/stats` as `health_checks`, not as `requests`.
//! * `GET /v1/models` (when it is not the health endpoint): the same list.
//!   Counted in `/stats` as `model_lists`, not as `requests` (`lb` reads it at
//!   every health sweep to learn the models).
//! * `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI-shaped JSON
//!   (`text_completion` / `chat.completion`, with `choices`, `usage`, the
//!   request's `model` or the first `--model`) of `--tokens` tokens (`token0 token1
//!   ...`), plus `"padding": "xxx.."` of `--response-size` bytes when that is
//!   not 0. With `"stream": true` the answer is `text/event-stream` (chunked):
//!   one `data: {json}\n\n` chunk per token (`text_completion` /
//!   `chat.completion.chunk`, each with `backend_port`), the first at once and
//!   then one every `--token-interval`, each flushed immediately; with
//!   `"stream_options": {"include_usage": true}` a usage chunk follows; the
//!   stream ends with `data: [DONE]\n\n`. Invalid JSON (or JSON that is not an
//!   object) gets 400 `{"error":{"message":..,"type":"invalid_request_error"}}`.
//!   Each served request feeds the simulated prefix cache (below). With
//!   `--engine`, see *Engine mode* for what changes.
//! * `GET /metrics`: with `--engine`, the engine's vLLM-named Prometheus
//!   metrics (below); without it, `404`. Not counted in `/stats`, and a
//!   connection whose first request it is (a load balancer's load poll) is not
//!   counted in `connections` or `open_connections` either.
//! * `GET /prefixstats`: `{"requests","matched_chars","total_chars","ratio"}`
//!   of the simulated prefix cache. It remembers the canonical text of the
//!   last 1024 served completion/chat requests (chat: each message as
//!   `role\u0000content\u0001`, concatenated; completions: the `prompt`
//!   string). For each request, matched = the longest common prefix in chars
//!   with any remembered text (computed before remembering it); totals are
//!   summed over requests; ratio = matched/total (0 when total is 0).
//! * `POST /prefixstats/reset`: clears the cache and its counters.
//! * `GET /stats`: `{"requests","in_flight","health_checks","model_lists","connections",
//!   "open_connections","idle_closes","backend_port"}`. `requests` counts
//!   every request (including failed and never-answered ones) except the
//!   health endpoint and the control endpoints; `in_flight` is how many of
//!   those are being handled now (until their response body is fully sent);
//!   `connections` counts accepted TCP connections, `open_connections` those
//!   still open, `idle_closes` those closed by `--idle-timeout` or `--close-after`.
//! * `GET /ws`: WebSocket echo (text and binary messages are sent back
//!   unchanged; pings are answered).
//! * `POST /upload` (or PUT): reads the body as a stream (never buffered) and
//!   answers `{"bytes":n,"fnv1a":"<16 hex digits>","backend_port":P}`, the
//!   FNV-1a 64 hash of all body bytes.
//! * `GET /download?bytes=N`: N bytes (byte i is `(i % 251) as u8`) streamed
//!   in 64 KiB chunks, with `Content-Length: N`.
//! * `GET /sse?events=N&interval_ms=M`: an SSE stream of N events
//!   `data: {"event":i,"backend_port":P}\n\n` (first at once, then one every
//!   M ms) ending with `data: [DONE]\n\n`; defaults: `--tokens` and
//!   `--token-interval`.
//! * Anything else: 200 `{"ok":true,"backend_port":P,"path":"/x","uri":
//!   "/x?q=1","method":"GET","version":"HTTP/1.1","headers":{..}}` where
//!   `headers` maps each lowercased request header name to its value (repeated
//!   headers joined with `", "`). Methods other than GET and HEAD also get
//!   `"body_bytes": n` (the body is counted as a stream, not buffered).
//!
//! # Engine mode
//!
//! With `--engine`, completions are served by a model of one inference engine
//! (vLLM-like: one 7-8 B model on one GPU), deterministic given the arrival
//! times. The model, its constants and where they come from are documented in
//! `mock-backend/engine.rs`; in short:
//!
//! * **Batching.** The engine runs iterations back to back while it has
//!   work. Each admits waiting requests in FIFO order while fewer than
//!   `--slots` run and the KV cache holds the next one, then lasts the
//!   admitted prompts' prefill plus one decode step, and gives every running
//!   sequence one token. A request arriving mid-iteration waits for its end.
//!   At most `--max-waiting` requests wait: more get 503 (`server_error`).
//! * **Timing.** Prefill: 0.1 ms per *uncached* prompt token. Decode step:
//!   20 ms with one running sequence, growing linearly to 40 ms with 32 (and
//!   on). Every time is divided by `--speed`. `--token-interval` is unused.
//! * **Tokens.** 4 bytes of the canonical prompt text (as for `/prefixstats`:
//!   chat messages as `role\u0000content\u0001`, or the `prompt`) make one token
//!   (`ceil(bytes / 4)` tokens); 16 tokens make one KV block.
//! * **Prefix cache.** `--kv-blocks` blocks. A prompt's full blocks are keyed
//!   by their chain hash (block i's key hashes block i-1's key and block i's
//!   bytes). A running sequence holds its prompt's blocks plus blocks for its
//!   whole answer, reserved at admission (so nothing is ever preempted); when
//!   it ends its keyed blocks stay cached, evicted least recently used first.
//!   A request's cached prefix is its longest run of leading blocks present
//!   at admission (at most its prompt minus one token); only the rest is
//!   prefilled.
//! * **Requests.** `model` must be a `--model` (absent: the first); another
//!   gets 404 `{"error":{"message":..,"type":"invalid_request_error",
//!   "param":"model","code":"model_not_found"},"backend_port":P}`. The answer
//!   has exactly `max_completion_tokens` (else `max_tokens`, else `--tokens`)
//!   tokens: the mock never stops early, as with vLLM's `ignore_eos`; a value
//!   below 1 gets 400. A prompt + answer longer than the whole cache
//!   (`--kv-blocks` x 16 tokens) gets 400 with vLLM's context-length message.
//!   `usage` counts the engine's prompt tokens and adds
//!   `"prompt_tokens_details":{"cached_tokens":N}`.
//! * **Answers.** Streamed: one chunk per token as the engine makes it (the
//!   first after the queue, the prefill and one step), then the usage chunk if
//!   asked for, then `[DONE]`. Not streamed: the whole answer when its last
//!   token is made. A client that leaves cancels its request, freeing its slot
//!   and blocks. `--mode` and `--delay` still apply first.
//! * **`GET /metrics`.** Prometheus text (format 0.0.4) with vLLM's names,
//!   help texts and labels `{engine="0",model_name="<first --model>"}`:
//!   gauges `vllm:num_requests_running`, `vllm:num_requests_waiting`,
//!   `vllm:kv_cache_usage_perc` (0..1: blocks held by running sequences);
//!   counters `vllm:prefix_cache_queries_total` and
//!   `vllm:prefix_cache_hits_total` (prompt tokens looked up / found cached,
//!   counted at admission), `vllm:prompt_tokens_total`,
//!   `vllm:generation_tokens_total`; histogram
//!   `vllm:time_to_first_token_seconds` (vLLM's buckets, 0.001 to 2560 s;
//!   from arrival to first token, divided by `--speed` like every time: what
//!   a client sees).
//!
//! # Connections
//!
//! HTTP/1.1 with keep-alive (hyper 1). With `--idle-timeout D`, a connection
//! with no request in progress (a request is in progress from its first byte
//! until its response is fully written) and no bytes received for `D` is
//! closed: the TCP socket is dropped, so a client that reuses it sees EOF (or
//! a reset). Upgraded WebSocket connections are not subject to it.

#![forbid(unsafe_code)]

#[path = "mock-backend/driver.rs"]
mod driver;
#[path = "mock-backend/engine.rs"]
mod engine;
#[path = "mock-backend/prom.rs"]
mod prom;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::ops::Bound;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use driver::{EngineHost, Progress, Ticket};

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// How the backend behaves; see the crate documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Answer everything normally.
    Healthy,
    /// 503 on the health endpoint, 500 on everything else.
    Failing,
    /// Fail (500) a fraction `--failure-rate` of requests; health stays 200.
    Flaky,
    /// Read requests but never answer.
    Timeout,
}

/// A fake OpenAI-compatible inference server for tests, demos and benchmarks.
#[derive(Clone, Debug, Parser)]
#[command(name = "mock-backend", version)]
struct Args {
    /// Port to listen on (0 = pick a free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Behaviour of the backend.
    #[arg(long, value_enum, default_value_t = Mode::Healthy)]
    mode: Mode,
    /// Delay before answering each request (e.g. `500ms`, `2s`, `0.5`).
    #[arg(long, value_parser = parse_duration, default_value = "0")]
    delay: Duration,
    /// Probability (0.0..=1.0) that a request fails in `flaky` mode.
    #[arg(long, value_parser = parse_rate, default_value_t = 0.5)]
    failure_rate: f64,
    /// Seed of the `flaky` RNG (makes failures deterministic).
    #[arg(long)]
    seed: Option<u64>,
    /// Bytes of padding added to non-streaming completion responses.
    #[arg(long, default_value_t = 0)]
    response_size: usize,
    /// Path of the health endpoint.
    #[arg(long, default_value = "/v1/models", value_parser = parse_path)]
    health_endpoint: String,
    /// Tokens per completion (chunks per streamed completion).
    #[arg(long, default_value_t = 10)]
    tokens: usize,
    /// Time between streamed chunks.
    #[arg(long, value_parser = parse_duration, default_value = "50ms")]
    token_interval: Duration,
    /// Close keep-alive connections idle for this long (`0`/`never` = never).
    #[arg(long, value_parser = parse_idle_timeout)]
    idle_timeout: Option<Duration>,
    /// Announce `Keep-Alive: timeout=N` (seconds) on every response.
    #[arg(long, value_name = "N")]
    keep_alive_header: Option<u64>,
    /// Close each connection this long after a response ended (`0` = at once), without
    /// `Connection: close`: the backend that lets a client's reuse race its close.
    #[arg(long, value_parser = parse_duration)]
    close_after: Option<Duration>,
    /// A served model name (repeatable): `/v1/models` lists them, the first is
    /// the default answer model (and `/metrics`'s `model_name`).
    #[arg(long = "model", value_name = "NAME", default_value = "mock-model", value_parser = parse_model)]
    models: Vec<String>,
    /// Model an inference engine: continuous batching, prefill and decode
    /// times, a prefix cache, vLLM's `/metrics`.
    #[arg(long)]
    engine: bool,
    /// Engine: sequences decoded together (more wait in a FIFO queue).
    #[arg(long, default_value_t = 32, requires = "engine",
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    slots: u64,
    /// Engine: KV cache size, in blocks of 16 tokens.
    #[arg(long, default_value_t = 25_000, requires = "engine",
          value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    kv_blocks: u64,
    /// Engine: requests allowed to wait; more get 503.
    #[arg(long, default_value_t = 1000, requires = "engine",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_waiting: u64,
    /// Engine: divide every modelled time by this (e.g. 100 for fast tests).
    #[arg(long, default_value_t = 1.0, requires = "engine", value_parser = parse_speed)]
    speed: f64,
}

impl Args {
    /// The engine's settings, with `--engine`.
    fn engine_config(&self) -> Option<engine::EngineConfig> {
        self.engine.then(|| engine::EngineConfig {
            slots: usize::try_from(self.slots).unwrap_or(usize::MAX),
            kv_blocks: self.kv_blocks,
            max_waiting: usize::try_from(self.max_waiting).unwrap_or(usize::MAX),
            speed: self.speed,
        })
    }
}

/// Parses `500ms`, `2s`, `1.5m`, `1h`, `250us`, `100ns` or plain seconds `0.5`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit_secs) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us").or_else(|| t.strip_suffix("µs")) {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix("ns") {
        (n, 1e-9)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (try 500ms, 2s or 0.5)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("invalid duration {s:?}: must be >= 0"));
    }
    Duration::try_from_secs_f64(v * unit_secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Like [`parse_duration`], but `never`/`none` mean zero (= disabled).
fn parse_idle_timeout(s: &str) -> Result<Duration, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "never" | "none" | "off" => Ok(Duration::ZERO),
        _ => parse_duration(s),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate {s:?}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("failure rate {v} not in 0.0..=1.0"))
    }
}

fn parse_speed(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "invalid speed {s:?}: a number above 0 (1 = real time, 100 = 100x faster)"
        )),
    }
}

fn parse_model(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("a model name cannot be empty".to_owned())
    } else {
        Ok(s.to_owned())
    }
}

fn parse_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') {
        Ok(s.to_owned())
    } else {
        Err(format!("path {s:?} must start with '/'"))
    }
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

/// State shared by all connections.
struct App {
    args: Args,
    /// The bound port, reported as `backend_port`.
    port: u16,
    /// Reference point for the per-connection activity clocks.
    start: Instant,
    requests: AtomicU64,
    in_flight: AtomicU64,
    health_checks: AtomicU64,
    /// `GET /v1/models` when it is not the health endpoint.
    model_lists: AtomicU64,
    connections: AtomicU64,
    open_connections: AtomicU64,
    idle_closes: AtomicU64,
    next_id: AtomicU64,
    rng: Mutex<SmallRng>,
    prefix: Mutex<PrefixCache>,
    /// The engine model, with `--engine`.
    engine: Option<Arc<EngineHost>>,
}

impl App {
    fn nanos(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Per-connection bookkeeping for `--idle-timeout`.
struct ConnState {
    app: Arc<App>,
    /// Requests in progress on this connection.
    active: AtomicUsize,
    /// `App::nanos()` when bytes were last received or a request ended.
    last_activity: AtomicU64,
    /// Responses finished on this connection.
    served: AtomicU64,
    /// Whether it was taken out of the connection counts (its first request was
    /// `GET /metrics`).
    uncounted: AtomicBool,
}

impl ConnState {
    fn touch(&self) {
        self.last_activity
            .store(self.app.nanos(), Ordering::Relaxed);
    }

    /// When the connection becomes closable if nothing else happens.
    fn idle_deadline(&self, timeout: Duration) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        if self.active.load(Ordering::Acquire) > 0 {
            return now + timeout;
        }
        let idle_for = self
            .app
            .nanos()
            .saturating_sub(self.last_activity.load(Ordering::Relaxed));
        now + timeout.saturating_sub(Duration::from_nanos(idle_for))
    }

    fn idle_for_at_least(&self, timeout: Duration) -> bool {
        self.active.load(Ordering::Acquire) == 0
            && self
                .app
                .nanos()
                .saturating_sub(self.last_activity.load(Ordering::Relaxed))
                >= u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Marks a request as in progress until dropped (which happens when its
/// response body has been fully sent, or when hyper gives up on it).
struct RequestGuard {
    conn: Arc<ConnState>,
    /// Whether it counts in the global `in_flight`.
    counted: bool,
}

impl RequestGuard {
    fn new(conn: Arc<ConnState>, counted: bool) -> Self {
        conn.active.fetch_add(1, Ordering::AcqRel);
        conn.touch();
        if counted {
            conn.app.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        Self { conn, counted }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.counted {
            self.conn.app.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        self.conn.touch();
        self.conn.served.fetch_add(1, Ordering::AcqRel);
        self.conn.active.fetch_sub(1, Ordering::AcqRel);
    }
}

// ---------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------

type BoxBody = UnsyncBoxBody<Bytes, Infallible>;

/// A response body that keeps its request's [`RequestGuard`] alive.
struct TrackedBody {
    inner: BoxBody,
    _guard: RequestGuard,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).boxed_unsync()
}

/// An SSE body of `n` events made by `make(i)`: the first at once, then events
/// `1..paced` each `interval` after the previous one, the rest (if any) at once,
/// then `data: [DONE]`.
fn sse_body<F>(n: usize, paced: usize, interval: Duration, make: F) -> BoxBody
where
    F: Fn(usize) -> Value + Send + 'static,
{
    let stream = futures_util::stream::unfold((0usize, make), move |(i, make)| async move {
        if i > n {
            return None;
        }
        let bytes = if i == n {
            Bytes::from_static(b"data: [DONE]\n\n")
        } else {
            if i > 0 && i < paced && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Bytes::from(format!("data: {}\n\n", make(i)))
        };
        Some((Ok::<_, Infallible>(Frame::data(bytes)), (i + 1, make)))
    });
    StreamBody::new(stream).boxed_unsync()
}

/// FNV-1a 64-bit hash, fed incrementally.
#[derive(Clone, Copy)]
struct Fnv1a(u64);

impl Fnv1a {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Self(Self::OFFSET)
    }

    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(Self::PRIME);
        }
    }
}

/// Reads a request body to its end without buffering it; returns its length
/// and, if asked, its FNV-1a hash.
async fn drain(body: Incoming, mut hash: Option<&mut Fnv1a>) -> Result<u64, hyper::Error> {
    let mut body = body;
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len() as u64;
            if let Some(h) = hash.as_deref_mut() {
                h.update(&data);
            }
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------
// Simulated prefix cache
// ---------------------------------------------------------------------------

/// Remembers the canonical texts of the last [`PrefixCache::CAPACITY`]
/// requests and measures how much of each new text is a prefix already seen.
#[derive(Default)]
struct PrefixCache {
    /// Remembered texts, oldest first.
    order: VecDeque<Arc<str>>,
    /// The same texts sorted, with multiplicities: the remembered text with the
    /// longest common prefix with `q` is a sorted neighbour of `q`.
    sorted: BTreeMap<Arc<str>, usize>,
    requests: u64,
    matched_chars: u64,
    total_chars: u64,
}

impl PrefixCache {
    const CAPACITY: usize = 1024;

    /// Scores `text` against the remembered texts, then remembers it.
    fn observe(&mut self, text: &str) {
        let matched = self.longest_match_chars(text);
        self.requests += 1;
        self.matched_chars += matched as u64;
        self.total_chars += text.chars().count() as u64;
        self.remember(text);
    }

    /// Longest common prefix (in chars) of `text` with any remembered text.
    fn longest_match_chars(&self, text: &str) -> usize {
        let below = self
            .sorted
            .range::<str, _>((Bound::Unbounded, Bound::Included(text)))
            .next_back();
        let above = self
            .sorted
            .range::<str, _>((Bound::Excluded(text), Bound::Unbounded))
            .next();
        let mut best = [below, above]
            .into_iter()
            .flatten()
            .map(|(s, _)| common_prefix_bytes(text.as_bytes(), s.as_bytes()))
            .max()
            .unwrap_or(0);
        while !text.is_char_boundary(best) {
            best -= 1;
        }
        text[..best].chars().count()
    }

    fn remember(&mut self, text: &str) {
        let text: Arc<str> = Arc::from(text);
        *self.sorted.entry(text.clone()).or_insert(0) += 1;
        self.order.push_back(text);
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                if let Some(count) = self.sorted.get_mut(&old) {
                    *count -= 1;
                    if *count == 0 {
                        self.sorted.remove(&old);
                    }
                }
            }
        }
    }

    fn stats(&self, port: u16) -> Value {
        let ratio = if self.total_chars == 0 {
            0.0
        } else {
            self.matched_chars as f64 / self.total_chars as f64
        };
        json!({
            "requests": self.requests,
            "matched_chars": self.matched_chars,
            "total_chars": self.total_chars,
            "ratio": ratio,
            "backend_port": port,
        })
    }
}

fn common_prefix_bytes(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Text of a message `content`: a string, or the `text` of its parts.
fn content_text(content: Option<&Value>) -> String {
    match content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.clone(),
                other => other
                    .get("text")
                    .and_then(Value::as_str)
                    .map_or_else(|| other.to_string(), str::to_owned),
            })
            .collect(),
        Some(other) => other.to_string(),
    }
}

/// Canonical text of a request for the prefix cache: for chat, each message as
/// `role\0content\x01`; for completions, the prompt (a list of strings is
/// concatenated; anything else is its JSON text).
fn canonical_text(req: &Value, chat: bool) -> String {
    if chat {
        let mut out = String::new();
        for m in req
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.push_str(m.get("role").and_then(Value::as_str).unwrap_or(""));
            out.push('\u{0}');
            out.push_str(&content_text(m.get("content")));
            out.push('\u{1}');
        }
        out
    } else {
        match req.get("prompt") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                a.iter().filter_map(Value::as_str).collect()
            }
            Some(other) => other.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------

/// What a request is asking for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Health,
    Stats,
    PrefixStats,
    PrefixReset,
    Metrics,
    Completion { chat: bool },
    Models,
    Ws,
    Upload,
    Download,
    Sse,
    Echo,
}

impl Route {
    /// `GET /metrics` is a control endpoint with or without `--engine` (without it, a
    /// `404`), so that a load balancer's load polls count nowhere.
    fn of(method: &Method, path: &str, health: &str) -> Self {
        if path == health {
            return Self::Health;
        }
        match (method, path) {
            (&Method::GET, "/stats") => Self::Stats,
            (&Method::GET, "/metrics") => Self::Metrics,
            (&Method::GET, "/prefixstats") => Self::PrefixStats,
            (&Method::POST, "/prefixstats/reset") => Self::PrefixReset,
            (&Method::POST, "/v1/completions") => Self::Completion { chat: false },
            (&Method::POST, "/v1/chat/completions") => Self::Completion { chat: true },
            (&Method::GET | &Method::HEAD, "/v1/models") => Self::Models,
            (&Method::GET, "/ws") => Self::Ws,
            (&Method::POST | &Method::PUT, "/upload") => Self::Upload,
            (&Method::GET | &Method::HEAD, "/download") => Self::Download,
            (&Method::GET, "/sse") => Self::Sse,
            _ => Self::Echo,
        }
    }

    /// Control endpoints: not counted, and exempt from modes and delay.
    fn is_control(self) -> bool {
        matches!(
            self,
            Self::Stats | Self::PrefixStats | Self::PrefixReset | Self::Metrics
        )
    }
}

fn respond(
    app: &App,
    status: StatusCode,
    content_type: &'static str,
    body: BoxBody,
) -> Response<BoxBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert("x-backend-port", HeaderValue::from(app.port));
    resp
}

fn json_resp(app: &App, status: StatusCode, v: &Value) -> Response<BoxBody> {
    respond(app, status, "application/json", full(v.to_string()))
}

fn error_resp(app: &App, status: StatusCode, kind: &str, message: &str) -> Response<BoxBody> {
    let v = json!({
        "error": {"message": message, "type": kind, "code": status.as_u16()},
        "backend_port": app.port,
    });
    json_resp(app, status, &v)
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Parses query parameter `name` as `T`, `default` when absent; `Err` is the
/// message for a 400 answer.
fn numeric_param<T: std::str::FromStr>(
    req: &Request<Incoming>,
    name: &str,
    default: T,
) -> Result<T, String> {
    match query_param(req, name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("invalid query parameter {name}={v:?}")),
    }
}

fn bad_request(app: &App, message: &str) -> Response<BoxBody> {
    error_resp(
        app,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
    )
}

/// hyper service entry point: wraps [`route`] with the request bookkeeping.
async fn handle(
    conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Result<Response<TrackedBody>, Infallible> {
    let app = conn.app.clone();
    let r = Route::of(req.method(), req.uri().path(), &app.args.health_endpoint);
    // A connection opened for `GET /metrics` alone (a load balancer's load poll, sent
    // with `Connection: close`) is not counted in `connections` either.
    if r == Route::Metrics
        && conn.served.load(Ordering::Acquire) == 0
        && conn.active.load(Ordering::Acquire) == 0
        && !conn.uncounted.swap(true, Ordering::AcqRel)
    {
        app.connections.fetch_sub(1, Ordering::Relaxed);
        app.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
    let counted = !r.is_control() && r != Route::Health && r != Route::Models;
    let guard = RequestGuard::new(conn, counted);
    if counted {
        app.requests.fetch_add(1, Ordering::Relaxed);
    } else if r == Route::Health {
        app.health_checks.fetch_add(1, Ordering::Relaxed);
    } else if r == Route::Models {
        app.model_lists.fetch_add(1, Ordering::Relaxed);
    }
    let mut resp = route(&app, r, req).await;
    if let Some(n) = app.args.keep_alive_header {
        if let Ok(v) = HeaderValue::from_str(&format!("timeout={n}")) {
            resp.headers_mut().insert("keep-alive", v);
        }
    }
    Ok(resp.map(|inner| TrackedBody {
        inner,
        _guard: guard,
    }))
}

/// Applies the mode and delay, then dispatches to the endpoint.
async fn route(app: &App, r: Route, req: Request<Incoming>) -> Response<BoxBody> {
    if !r.is_control() {
        if app.args.mode == Mode::Timeout {
            // Read the whole request, then hang until the client goes away.
            let _ = drain(req.into_body(), None).await;
            return std::future::pending().await;
        }
        if !app.args.delay.is_zero() {
            tokio::time::sleep(app.args.delay).await;
        }
        let fail = match app.args.mode {
            Mode::Failing => true,
            Mode::Flaky if r != Route::Health => {
                let rate = app.args.failure_rate;
                app.rng
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .random_bool(rate)
            }
            _ => false,
        };
        if fail {
            let _ = drain(req.into_body(), None).await;
            return if r == Route::Health {
                error_resp(
                    app,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "mock-backend: unhealthy (failing mode)",
                )
            } else {
                let mode = format!("{:?}", app.args.mode).to_lowercase();
                let msg = format!("mock-backend: simulated failure ({mode} mode)");
                error_resp(app, StatusCode::INTERNAL_SERVER_ERROR, "server_error", &msg)
            };
        }
    }
    match r {
        Route::Health | Route::Models => models(app),
        Route::Stats => stats(app),
        Route::PrefixStats => {
            let v = app
                .prefix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .stats(app.port);
            json_resp(app, StatusCode::OK, &v)
        }
        Route::PrefixReset => {
            let _ = drain(req.into_body(), None).await;
            let mut cache = app.prefix.lock().unwrap_or_else(|e| e.into_inner());
            *cache = PrefixCache::default();
            let v = cache.stats(app.port);
            drop(cache);
            json_resp(app, StatusCode::OK, &v)
        }
        Route::Metrics => metrics(app),
        Route::Completion { chat } => completion(app, req, chat).await,
        Route::Ws => websocket(app, req),
        Route::Upload => upload(app, req).await,
        Route::Download => download(app, &req),
        Route::Sse => sse(app, &req),
        Route::Echo => echo(app, req).await,
    }
}

fn models(app: &App) -> Response<BoxBody> {
    let data: Vec<Value> = app
        .args
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "mock-backend"}))
        .collect();
    let v = json!({
        "object": "list",
        "data": data,
        "backend_port": app.port,
    });
    json_resp(app, StatusCode::OK, &v)
}

/// `GET /metrics` (`--engine` only): vLLM-named Prometheus text.
fn metrics(app: &App) -> Response<BoxBody> {
    let Some(host) = &app.engine else {
        return error_resp(
            app,
            StatusCode::NOT_FOUND,
            "not_found",
            "no engine (--engine)",
        );
    };
    let text = prom::render(&app.args.models[0], &host.snapshot());
    respond(app, StatusCode::OK, prom::CONTENT_TYPE, full(text))
}

fn stats(app: &App) -> Response<BoxBody> {
    let v = json!({
        "requests": app.requests.load(Ordering::Relaxed),
        "in_flight": app.in_flight.load(Ordering::Relaxed),
        "health_checks": app.health_checks.load(Ordering::Relaxed),
        "model_lists": app.model_lists.load(Ordering::Relaxed),
        "connections": app.connections.load(Ordering::Relaxed),
        "open_connections": app.open_connections.load(Ordering::Relaxed),
        "idle_closes": app.idle_closes.load(Ordering::Relaxed),
        "backend_port": app.port,
    });
    json_resp(app, StatusCode::OK, &v)
}

/// `POST /v1/completions` and `POST /v1/chat/completions`.
async fn completion(app: &App, req: Request<Incoming>, chat: bool) -> Response<BoxBody> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let msg = format!("could not read request body: {e}");
            return bad_request(app, &msg);
        }
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            let msg = "request body must be a JSON object";
            return bad_request(app, msg);
        }
        Err(e) => {
            let msg = format!("invalid JSON in request body: {e}");
            return bad_request(app, &msg);
        }
    };
    let text = canonical_text(&v, chat);
    app.prefix
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .observe(&text);
    if let Some(host) = &app.engine {
        return engine_completion(app, host, &v, chat, &text).await;
    }

    let n = app.args.tokens;
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&app.args.models[0])
        .to_owned();
    let answer = Answer::new(app, chat, model, n);
    let prompt_tokens = text.split_whitespace().count();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": n,
        "total_tokens": prompt_tokens + n,
    });

    if v.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let events = n + usize::from(include_usage(&v));
        let make = move |i: usize| {
            if i >= n {
                answer.usage_chunk(usage.clone())
            } else {
                answer.token_chunk(i)
            }
        };
        return event_stream(app, sse_body(events, n, app.args.token_interval, make));
    }
    let mut out = answer.whole(usage);
    if app.args.response_size > 0 {
        out["padding"] = Value::String("x".repeat(app.args.response_size));
    }
    json_resp(app, StatusCode::OK, &out)
}

/// Whether a streamed completion asks for a final usage chunk.
fn include_usage(req: &Value) -> bool {
    req.pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// A `text/event-stream` response with `body`.
fn event_stream(app: &App, body: BoxBody) -> Response<BoxBody> {
    let mut resp = respond(app, StatusCode::OK, "text/event-stream", body);
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

/// The answer to one completion request: `n` tokens `token0 token1 ...`.
struct Answer {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    n: usize,
    port: u16,
}

impl Answer {
    fn new(app: &App, chat: bool, model: String, n: usize) -> Self {
        let port = app.port;
        let seq = app.next_id.fetch_add(1, Ordering::Relaxed);
        let kind = if chat { "chatcmpl" } else { "cmpl" };
        Answer {
            id: format!("{kind}-mock-{port}-{seq}"),
            created: unix_secs(),
            model,
            chat,
            n,
            port,
        }
    }

    fn finish(&self) -> &'static str {
        if self.chat {
            "stop"
        } else {
            "length"
        }
    }

    fn token(i: usize) -> String {
        format!("{}token{i}", if i == 0 { "" } else { " " })
    }

    /// The streamed chunk of token `i`.
    fn token_chunk(&self, i: usize) -> Value {
        let fin = if i + 1 == self.n {
            json!(self.finish())
        } else {
            Value::Null
        };
        let choices = if self.chat {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": Self::token(i)})
            } else {
                json!({"content": Self::token(i)})
            };
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": fin}])
        } else {
            json!([{"index": 0, "text": Self::token(i), "logprobs": null, "finish_reason": fin}])
        };
        self.chunk(choices)
    }

    /// The streamed chunk with the usage, after the tokens.
    fn usage_chunk(&self, usage: Value) -> Value {
        let mut chunk = self.chunk(json!([]));
        chunk["usage"] = usage;
        chunk
    }

    fn chunk(&self, choices: Value) -> Value {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "backend_port": self.port,
        })
    }

    /// The whole (not streamed) answer.
    fn whole(&self, usage: Value) -> Value {
        let text: String = (0..self.n).map(Self::token).collect();
        let (object, choice) = if self.chat {
            (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": self.finish(),
                }),
            )
        } else {
            (
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": self.finish()}),
            )
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
            "backend_port": self.port,
        })
    }
}

/// A completion in `--engine` mode: the model must be served, the request
/// waits for the engine, and tokens come at the engine's pace.
async fn engine_completion(
    app: &App,
    host: &Arc<EngineHost>,
    v: &Value,
    chat: bool,
    text: &str,
) -> Response<BoxBody> {
    let model = match v.get("model") {
        None | Some(Value::Null) => app.args.models[0].clone(),
        Some(Value::String(m)) if app.args.models.contains(m) => m.clone(),
        Some(other) => {
            let name = other
                .as_str()
                .map_or_else(|| other.to_string(), str::to_owned);
            let e = json!({
                "error": {
                    "message": format!("The model `{name}` does not exist."),
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                },
                "backend_port": app.port,
            });
            return json_resp(app, StatusCode::NOT_FOUND, &e);
        }
    };
    let max_tokens = match requested_max_tokens(v) {
        Ok(n) => n.unwrap_or(app.args.tokens as u64),
        Err(msg) => return bad_request(app, &msg),
    };
    let prompt = engine::Prompt::from_text(text);
    let prompt_tokens = prompt.tokens;
    let mut ticket = match host.submit(prompt, max_tokens) {
        Ok(t) => t,
        Err(e @ engine::Rejection::QueueFull { .. }) => {
            let msg = e.to_string();
            return error_resp(app, StatusCode::SERVICE_UNAVAILABLE, "server_error", &msg);
        }
        Err(e @ engine::Rejection::TooLong { .. }) => return bad_request(app, &e.to_string()),
    };
    let n = usize::try_from(max_tokens.max(1)).unwrap_or(usize::MAX);
    let answer = Answer::new(app, chat, model, n);

    if v.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let start = EngineStream {
            ticket,
            answer,
            prompt_tokens,
            progress: Progress::default(),
            sent: 0,
            usage_left: include_usage(v),
            done_left: true,
        };
        let stream = futures_util::stream::unfold(start, EngineStream::next_frame);
        return event_stream(app, StreamBody::new(stream).boxed_unsync());
    }

    let mut p = Progress::default();
    while !p.done {
        match ticket.next().await {
            Some(next) => p = next,
            None => {
                let msg = "mock-backend: the engine dropped the request";
                return error_resp(app, StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg);
            }
        }
    }
    let mut out = answer.whole(engine_usage(prompt_tokens, &p));
    if app.args.response_size > 0 {
        out["padding"] = Value::String("x".repeat(app.args.response_size));
    }
    json_resp(app, StatusCode::OK, &out)
}

/// The usage of an engine answer, with vLLM's (and OpenAI's) cached tokens.
fn engine_usage(prompt_tokens: u64, p: &Progress) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": p.generated,
        "total_tokens": prompt_tokens + p.generated,
        "prompt_tokens_details": {"cached_tokens": p.cached_tokens.unwrap_or(0)},
    })
}

/// A streamed engine answer: a chunk per token as the engine makes them,
/// then the usage chunk if asked for, then `[DONE]`. Dropping it (the client
/// left) drops the ticket, which cancels the request.
struct EngineStream {
    ticket: Ticket,
    answer: Answer,
    prompt_tokens: u64,
    /// The latest progress seen.
    progress: Progress,
    /// Token chunks sent.
    sent: u64,
    usage_left: bool,
    done_left: bool,
}

impl EngineStream {
    async fn next_frame(mut self) -> Option<(Result<Frame<Bytes>, Infallible>, Self)> {
        // Each pass sends a frame, ends, or waits for the engine's next token.
        loop {
            let p = self.progress;
            if self.sent < p.generated {
                let i = usize::try_from(self.sent).unwrap_or(usize::MAX);
                let frame = sse_frame(&self.answer.token_chunk(i));
                self.sent += 1;
                return Some((frame, self));
            }
            if p.done && self.usage_left {
                let usage = engine_usage(self.prompt_tokens, &p);
                let frame = sse_frame(&self.answer.usage_chunk(usage));
                self.usage_left = false;
                return Some((frame, self));
            }
            if p.done && self.done_left {
                self.done_left = false;
                let frame = Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n")));
                return Some((frame, self));
            }
            if p.done {
                return None;
            }
            // `None`: the request left the engine unfinished; end the stream.
            self.progress = self.ticket.next().await?;
        }
    }
}

fn sse_frame(v: &Value) -> Result<Frame<Bytes>, Infallible> {
    Ok(Frame::data(Bytes::from(format!("data: {v}\n\n"))))
}

/// `max_completion_tokens`, else `max_tokens`, else `None`; `Err` is the
/// message for a 400 answer.
fn requested_max_tokens(v: &Value) -> Result<Option<u64>, String> {
    for key in ["max_completion_tokens", "max_tokens"] {
        match v.get(key) {
            None | Some(Value::Null) => {}
            Some(n) => {
                return match n.as_u64() {
                    Some(n) if n >= 1 => Ok(Some(n)),
                    _ => Err(format!("{key} must be an integer of at least 1, got {n}")),
                };
            }
        }
    }
    Ok(None)
}

/// `GET /ws`: accepts the WebSocket upgrade and echoes messages.
fn websocket(app: &App, mut req: Request<Incoming>) -> Response<BoxBody> {
    let h = req.headers();
    let is_ws = h
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = h.get(hyper::header::SEC_WEBSOCKET_KEY).filter(|_| is_ws) else {
        let msg = "expected a WebSocket upgrade request";
        return bad_request(app, msg);
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                eprintln!("mock-backend: websocket upgrade failed: {e}");
                return;
            }
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(msg) = ws.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(_) => break,
            };
            match msg {
                Message::Text(_) | Message::Binary(_) => {
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
                // tungstenite queues the close reply and pongs itself; reading
                // on sends them, and ends the stream once closed.
                Message::Close(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        // If echoing failed, still try to say goodbye properly.
        let _ = ws.close(None).await;
    });
    let mut resp = respond(app, StatusCode::SWITCHING_PROTOCOLS, "text/plain", full(""));
    let h = resp.headers_mut();
    h.remove(CONTENT_TYPE);
    h.insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    h.insert(
        hyper::header::UPGRADE,
        HeaderValue::from_static("websocket"),
    );
    h.insert(
        hyper::header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).unwrap_or_else(|_| HeaderValue::from_static("")),
    );
    resp
}

/// `POST /upload`: counts and hashes the body as it streams in.
async fn upload(app: &App, req: Request<Incoming>) -> Response<BoxBody> {
    let mut hash = Fnv1a::new();
    match drain(req.into_body(), Some(&mut hash)).await {
        Ok(n) => {
            let v =
                json!({"bytes": n, "fnv1a": format!("{:016x}", hash.0), "backend_port": app.port});
            json_resp(app, StatusCode::OK, &v)
        }
        Err(e) => {
            let msg = format!("could not read request body: {e}");
            bad_request(app, &msg)
        }
    }
}

/// `GET /download?bytes=N`: N pattern bytes in 64 KiB chunks.
fn download(app: &App, req: &Request<Incoming>) -> Response<BoxBody> {
    const CHUNK: usize = 64 * 1024;
    const PERIOD: usize = 251;
    let total: u64 = match numeric_param(req, "bytes", 0) {
        Ok(n) => n,
        Err(msg) => return bad_request(app, &msg),
    };
    // One buffer holding the pattern from every phase: chunk k starting at
    // offset `pos` is `pattern[pos % 251..][..len]`, a zero-copy slice.
    let pattern: Bytes = (0..CHUNK + PERIOD).map(|i| (i % PERIOD) as u8).collect();
    let stream = futures_util::stream::unfold(0u64, move |pos| {
        let pattern = pattern.clone();
        async move {
            if pos >= total {
                return None;
            }
            let len = (total - pos).min(CHUNK as u64) as usize;
            let start = (pos % PERIOD as u64) as usize;
            let chunk = pattern.slice(start..start + len);
            Some((Ok::<_, Infallible>(Frame::data(chunk)), pos + len as u64))
        }
    });
    let mut resp = respond(
        app,
        StatusCode::OK,
        "application/octet-stream",
        StreamBody::new(stream).boxed_unsync(),
    );
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(total));
    resp
}

/// `GET /sse?events=N&interval_ms=M`.
fn sse(app: &App, req: &Request<Incoming>) -> Response<BoxBody> {
    let events = match numeric_param(req, "events", app.args.tokens) {
        Ok(n) => n,
        Err(msg) => return bad_request(app, &msg),
    };
    let default_ms = app.args.token_interval.as_secs_f64() * 1000.0;
    let interval_ms: f64 = match numeric_param(req, "interval_ms", default_ms) {
        Ok(ms) if ms.is_finite() && ms >= 0.0 => ms,
        _ => return bad_request(app, "invalid query parameter interval_ms"),
    };
    let port = app.port;
    let body = sse_body(
        events,
        events,
        Duration::from_secs_f64(interval_ms / 1000.0),
        move |i| json!({"event": i, "backend_port": port}),
    );
    let mut resp = respond(app, StatusCode::OK, "text/event-stream", body);
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

/// Any other request: describes it back as JSON.
async fn echo(app: &App, req: Request<Incoming>) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let mut headers = Map::new();
    for name in parts.headers.keys() {
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_owned(), Value::String(joined));
    }
    let mut v = json!({
        "ok": true,
        "backend_port": app.port,
        "path": parts.uri.path(),
        "uri": parts.uri.to_string(),
        "method": parts.method.as_str(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
    });
    let n = drain(body, None).await;
    if parts.method != Method::GET && parts.method != Method::HEAD {
        match n {
            Ok(n) => v["body_bytes"] = json!(n),
            Err(e) => {
                let msg = format!("could not read request body: {e}");
                return bad_request(app, &msg);
            }
        }
    }
    json_resp(app, StatusCode::OK, &v)
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

/// A TCP stream that records when bytes arrive (for `--idle-timeout`).
struct ActivityIo {
    inner: TcpStream,
    conn: Arc<ConnState>,
}

impl AsyncRead for ActivityIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.conn.touch();
        }
        res
    }
}

impl AsyncWrite for ActivityIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Serves one TCP connection until it ends or is closed for idleness.
async fn serve_connection(app: Arc<App>, stream: TcpStream) {
    app.connections.fetch_add(1, Ordering::Relaxed);
    app.open_connections.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    let state = Arc::new(ConnState {
        app: app.clone(),
        active: AtomicUsize::new(0),
        last_activity: AtomicU64::new(app.nanos()),
        served: AtomicU64::new(0),
        uncounted: AtomicBool::new(false),
    });
    let io = TokioIo::new(ActivityIo {
        inner: stream,
        conn: state.clone(),
    });
    let svc_state = state.clone();
    let svc = hyper::service::service_fn(move |req| handle(svc_state.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    // Idle rules: `--idle-timeout` from the start, `--close-after` once a response ended
    // (the shorter wins).
    let (idle, close_after) = (app.args.idle_timeout, app.args.close_after);
    if idle.is_none() && close_after.is_none() {
        let _ = conn.await;
    } else {
        loop {
            let timeout = match (idle, close_after) {
                (i, Some(c)) if state.served.load(Ordering::Acquire) > 0 => {
                    i.map_or(c, |i| i.min(c))
                }
                (Some(i), _) => i,
                // Only `--close-after`, nothing served yet: wait for a response to end.
                (None, Some(c)) => c.max(Duration::from_millis(5)),
                (None, None) => unreachable!("checked above"),
            };
            let deadline = state.idle_deadline(timeout);
            tokio::select! {
                _ = conn.as_mut() => break,
                () = tokio::time::sleep_until(deadline) => {
                    let closable = idle.is_some() || state.served.load(Ordering::Acquire) > 0;
                    if closable && state.idle_for_at_least(timeout) {
                        // Returning drops `conn` and with it the socket.
                        app.idle_closes.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }
    if !state.uncounted.load(Ordering::Acquire) {
        app.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = Args::parse();
    args.idle_timeout = args.idle_timeout.filter(|d| !d.is_zero());
    let listener = TcpListener::bind(SocketAddr::new(args.bind, args.port)).await?;
    let addr = listener.local_addr()?;
    let seed = args.seed.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ (u64::from(std::process::id()) << 32)
    });
    let app = Arc::new(App {
        port: addr.port(),
        start: Instant::now(),
        requests: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        health_checks: AtomicU64::new(0),
        model_lists: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        open_connections: AtomicU64::new(0),
        idle_closes: AtomicU64::new(0),
        next_id: AtomicU64::new(0),
        rng: Mutex::new(SmallRng::seed_from_u64(seed)),
        prefix: Mutex::new(PrefixCache::default()),
        engine: args.engine_config().map(EngineHost::start),
        args,
    });
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
    }

    let shutdown = shutdown_signal();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = shutdown.as_mut() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tokio::spawn(serve_connection(app.clone(), stream));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off briefly.
                    eprintln!("mock-backend: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("abc").is_err());
        assert_eq!(parse_idle_timeout("never"), Ok(Duration::ZERO));
    }

    #[test]
    fn args() {
        let a = Args::try_parse_from([
            "mock-backend",
            "--port",
            "0",
            "--mode",
            "flaky",
            "--failure-rate",
            "0.25",
            "--seed",
            "7",
            "--delay",
            "10ms",
            "--idle-timeout",
            "5s",
        ])
        .unwrap();
        assert_eq!(a.mode, Mode::Flaky);
        assert_eq!(a.failure_rate, 0.25);
        assert_eq!(a.seed, Some(7));
        assert_eq!(a.delay, Duration::from_millis(10));
        assert_eq!(a.idle_timeout, Some(Duration::from_secs(5)));
        assert_eq!(a.health_endpoint, "/v1/models");
        assert_eq!(a.token_interval, Duration::from_millis(50));
        assert!(Args::try_parse_from(["mock-backend", "--failure-rate", "1.5"]).is_err());
        assert!(Args::try_parse_from(["mock-backend", "--health-endpoint", "x"]).is_err());
    }

    #[test]
    fn engine_args() {
        let a = Args::try_parse_from(["mock-backend"]).unwrap();
        assert_eq!(a.models, ["mock-model"]);
        assert!(a.engine_config().is_none());
        let a = Args::try_parse_from(["mock-backend", "--engine"]).unwrap();
        assert_eq!(
            a.engine_config(),
            Some(engine::EngineConfig {
                slots: 32,
                kv_blocks: 25_000,
                max_waiting: 1000,
                speed: 1.0
            })
        );
        let a = Args::try_parse_from([
            "mock-backend",
            "--engine",
            "--slots",
            "2",
            "--kv-blocks",
            "100",
            "--max-waiting",
            "5",
            "--speed",
            "50",
            "--model",
            "a",
            "--model",
            "b/c",
        ])
        .unwrap();
        assert_eq!(a.models, ["a", "b/c"]);
        assert_eq!(
            a.engine_config(),
            Some(engine::EngineConfig {
                slots: 2,
                kv_blocks: 100,
                max_waiting: 5,
                speed: 50.0
            })
        );
        // Engine flags need --engine; bounds are checked.
        for bad in [
            &["mock-backend", "--slots", "2"][..],
            &["mock-backend", "--speed", "2"],
            &["mock-backend", "--engine", "--slots", "0"],
            &["mock-backend", "--engine", "--kv-blocks", "0"],
            &["mock-backend", "--engine", "--speed", "0"],
            &["mock-backend", "--engine", "--speed", "inf"],
            &["mock-backend", "--engine", "--max-waiting", "0"],
            &["mock-backend", "--model", ""],
        ] {
            assert!(Args::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn metrics_is_a_control_route() {
        let r = Route::of(&Method::GET, "/metrics", "/v1/models");
        assert_eq!(r, Route::Metrics);
        assert!(r.is_control());
        assert_eq!(
            Route::of(&Method::POST, "/metrics", "/v1/models"),
            Route::Echo
        );
    }

    #[test]
    fn max_tokens_from_the_request() {
        let mt = |v: Value| requested_max_tokens(&v);
        assert_eq!(mt(json!({})), Ok(None));
        assert_eq!(mt(json!({"max_tokens": null})), Ok(None));
        assert_eq!(mt(json!({"max_tokens": 7})), Ok(Some(7)));
        assert_eq!(
            mt(json!({"max_tokens": 7, "max_completion_tokens": 3})),
            Ok(Some(3))
        );
        assert!(mt(json!({"max_tokens": 0})).is_err());
        assert!(mt(json!({"max_tokens": -1})).is_err());
        assert!(mt(json!({"max_tokens": 1.5})).is_err());
        assert!(mt(json!({"max_tokens": "9"})).is_err());
    }

    #[test]
    fn prefix_cache() {
        let mut c = PrefixCache::default();
        c.observe("hello world");
        c.observe("hello there");
        c.observe("help");
        c.observe("");
        c.observe("hello world");
        assert_eq!(c.requests, 5);
        // 0 + 6 ("hello ") + 3 ("hel") + 0 + 11
        assert_eq!(c.matched_chars, 20);
        assert_eq!(c.total_chars, 11 + 11 + 4 + 11);
        // Multi-byte chars are counted as chars, never split.
        let mut c = PrefixCache::default();
        c.observe("héé");
        c.observe("hé\u{e9}x");
        c.observe("hè");
        assert_eq!(c.matched_chars, 3 + 1);
    }

    #[test]
    fn prefix_cache_evicts() {
        let mut c = PrefixCache::default();
        c.observe("first");
        for i in 0..PrefixCache::CAPACITY {
            c.observe(&format!("{i}"));
        }
        assert_eq!(c.order.len(), PrefixCache::CAPACITY);
        let before = c.matched_chars;
        c.observe("first");
        assert_eq!(c.matched_chars, before);
    }

    #[test]
    fn canonical() {
        let v: Value = serde_json::from_str(
            r#"{"messages":[{"role":"system","content":"be nice"},{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            canonical_text(&v, true),
            "system\u{0}be nice\u{1}user\u{0}hi\u{1}"
        );
        let v: Value = serde_json::from_str(r#"{"prompt":"abc"}"#).unwrap();
        assert_eq!(canonical_text(&v, false), "abc");
    }

    #[test]
    fn fnv() {
        let mut h = Fnv1a::new();
        h.update(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
    }
}
