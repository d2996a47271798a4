//! Fuzz harness `proxy_path`: the smol build's whole request path, in memory.
//!
//! `lb_smol::memory::Sim` serves one client connection with the build's real request path
//! (`conn`, `exchange`, `pump`, `io`; the real proxy layer and core) over in-memory
//! streams; the harness plays the client and every backend connection the proxy opens.
//! An input is a setup (backends, policy, head limit, the peers' windows and read sizes,
//! replay buffer, retries, pooling) and a script: arbitrary client bytes and well-formed
//! requests with arbitrary parts, arbitrary backend bytes and responses, floods (up to
//! 2 MiB in all), half-closes, resets, refused connects, a client that stops reading,
//! time passing (every pending deadline fires) and shutdown. After each step the proxy
//! runs until it waits.
//!
//! Checked:
//! - no panic (a debug build's lease drop-bomb included), and the task never spins;
//! - what each backend receives is well framed: request heads that `lb_http1` parses,
//!   each followed by a body framed as its head says (a connection's stream may stop
//!   short only where an exchange was cut; checking stops after an upgrade request);
//!   and a connection goes back to the pool only between two requests;
//! - what the client receives is well framed: response heads that parse, each final one
//!   answering the next request the client sent (as the same parser reads them; but an
//!   answer to a head the proxy refused or timed out, which has no `X-Request-Id`), its
//!   body framed as its head says for that request (a `HEAD`, a `204`...); nothing after
//!   a response that said `Connection: close`; checking stops at a `101` or a
//!   close-delimited body;
//! - bounded memory: while the proxy runs, its heap grows by at most a bound set by its
//!   limits (head size, buffers, replay buffer, the body prefix when routing by body) and
//!   the peers' windows, however much the peers send;
//! - the end: once every peer has closed and every deadline fired, the connection ends,
//!   with no lease outstanding and no client connection counted open; and it ends so
//!   even when the client reads nothing more (but a tunnel's).
//!
//! Shared by the cargo-fuzz target and by `adapters/smol/tests/fuzz_corpus.rs`, which
//! replays the corpus on stable. It installs the process's global allocator (a counting
//! one).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::VecDeque;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use lb_core::{BackendSpec, Policy};
use lb_http1::{
    parse_request, parse_response, BodyFramer, BodyKind, Header, Limits, RequestHead, Status,
    Version,
};
use lb_proxy::{HashKey, Settings};
use lb_smol::memory::{Peer, Sim, Wires};

/// Most bytes all floods of one input send.
const FLOODS: usize = 2 << 20;
/// Most script steps taken from one input.
const MAX_OPS: usize = 64;
/// The proxy's buffers, as `lb_smol` sizes them: what it keeps of a client's pipelined
/// bytes while it waits (`pump::WATCH_CAP`), and its most bytes per read (`io::CHUNK`).
const WATCH_CAP: usize = 64 * 1024;
const CHUNK: usize = 32 * 1024;

#[derive(Arbitrary, Debug)]
struct Setup {
    backends: u8,
    policy: u8,
    max_head: u8,
    window: u8,
    segment: u8,
    replay: u8,
    retries: u8,
    pool: bool,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Client(Vec<u8>),
    Request(Req),
    ClientFlood(Flood),
    /// Bytes from a backend connection, counted from the newest.
    Backend(u8, Vec<u8>),
    Response(u8, Resp),
    BackendFlood(u8, Flood),
    Shut(Who),
    Reset(Who),
    ClientReads(bool),
    Refuse(u8),
    Tick,
    Shutdown,
}

#[derive(Arbitrary, Debug)]
enum Who {
    Client,
    Backend(u8),
}

#[derive(Arbitrary, Debug)]
struct Flood {
    unit: Vec<u8>,
    kib: u16,
}

#[derive(Arbitrary, Debug)]
struct Req {
    method: u8,
    target: u8,
    http10: bool,
    host: bool,
    framing: u8,
    delta: i8,
    body: Vec<u8>,
    json: bool,
    connection: u8,
    expect: bool,
    extra: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Resp {
    status: u8,
    http10: bool,
    framing: u8,
    delta: i8,
    body: Vec<u8>,
    connection: u8,
    keep_alive: Option<u8>,
    extra: Vec<u8>,
}

/// An input as the setup and the script it stands for (`None`: too short for a setup).
fn decode(data: &[u8]) -> Option<(Setup, Vec<Op>)> {
    let mut u = Unstructured::new(data);
    let setup = Setup::arbitrary(&mut u).ok()?;
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS && !u.is_empty() {
        match Op::arbitrary(&mut u) {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    Some((setup, ops))
}

/// What an input stands for, to read (a crash's script).
#[allow(dead_code)]
pub fn describe(data: &[u8]) -> String {
    format!("{:#?}", decode(data))
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    HEAP.with(|h| h.set((false, 0, 0)));
    let Some((setup, ops)) = decode(data) else {
        return;
    };
    trace(|| format!("{setup:?}"));
    let mut world = World::new(&setup);
    world.settle();
    for op in ops {
        trace(|| format!("{op:?}"));
        world.apply(op);
        world.settle();
    }
    trace(|| "finish".into());
    world.finish();
}

/// With `PROXY_PATH_TRACE` set, prints the script and the proxy's output as they go.
fn trace(line: impl FnOnce() -> String) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("PROXY_PATH_TRACE").is_some()) {
        eprintln!("{}", line());
    }
}

struct World {
    sim: Sim,
    /// What the proxy reads from the client, as the same parser reads it.
    sent: Requests,
    /// What the proxy writes to the client.
    received: Responses,
    /// What the proxy writes to each backend connection.
    backends: Vec<Requests>,
    /// Whether the client reads what it is sent.
    reading: bool,
    /// The end: every peer closes, and every backend connection as soon as it opens.
    closing: bool,
    floods: usize,
    /// Heap growth allowed to the proxy, but for its connections' windows.
    bound: usize,
    /// Per connection.
    per_conn: usize,
}

impl World {
    fn new(setup: &Setup) -> World {
        let backends = 1 + usize::from(setup.backends % 3);
        let specs = (0..backends)
            .map(|i| BackendSpec {
                max_conns: 8,
                ..BackendSpec::new(format!("http://10.0.0.{}:8000/base", i + 1))
            })
            .collect();
        let mut settings = Settings::new("127.0.0.1:0".parse().unwrap(), specs);
        settings.core.policy = match setup.policy % 4 {
            0 => Policy::LeastConn,
            1 => Policy::RoundRobin,
            2 => Policy::CacheAware,
            _ => Policy::ConsistentHash,
        };
        settings.hash_key = HashKey::User;
        settings.max_head_bytes =
            [512, 2048, 16 * 1024, 64 * 1024][usize::from(setup.max_head % 4)];
        settings.replay_buffer = [0, 100, 64 * 1024][usize::from(setup.replay % 3)];
        settings.connect_retries = u32::from(setup.retries % 3);
        if !setup.pool {
            settings.pool_idle_timeout = Duration::ZERO;
        }
        let wires = Wires {
            window: [1, 61, 1460, 65536][usize::from(setup.window % 4)],
            segment: [1, 7, 1460, 65536][usize::from(setup.segment % 4)],
        };
        let head = settings.max_head_bytes;
        let prefix = if settings.routes_by_body() {
            2 * lb_core::affinity::MAX_BODY_PREFIX + WATCH_CAP
        } else {
            0
        };
        let bound = 256 * 1024
            + 4 * head
            + 2 * WATCH_CAP
            + 4 * CHUNK
            + 2 * (settings.replay_buffer + head)
            + prefix;
        let per_conn = 2 * wires.window.next_power_of_two() + 4096;
        // Floods of more than the bound can tell buffering without one; a peer that sends
        // a byte per read is given less, to keep an input quick.
        let floods = FLOODS.min(wires.segment.min(wires.window).max(16) * 1024);
        let limits = Limits {
            max_head_bytes: head,
            ..Limits::default()
        };
        let sim = Sim::new(settings, wires).expect("valid settings");
        World {
            sim,
            sent: Requests::new(limits, false),
            received: Responses::default(),
            backends: Vec::new(),
            reading: true,
            closing: false,
            floods,
            bound,
            per_conn,
        }
    }

    /// The backend connection `n` counts back from the newest, if any.
    fn backend(&self, n: u8) -> Option<Peer> {
        let open = self.sim.backends();
        (open > 0).then(|| Peer::Backend(open - 1 - usize::from(n) % open))
    }

    fn who(&self, who: &Who) -> Option<Peer> {
        match who {
            Who::Client => Some(Peer::Client),
            Who::Backend(n) => self.backend(*n),
        }
    }

    fn flood(&mut self, f: &Flood) -> Vec<u8> {
        let n = (usize::from(f.kib) * 1024).min(self.floods);
        self.floods -= n;
        let unit: &[u8] = if f.unit.is_empty() { b"a" } else { &f.unit };
        let mut data = Vec::with_capacity(2 * n + unit.len());
        data.extend_from_slice(unit);
        while data.len() < n {
            data.extend_from_within(..);
        }
        data.truncate(n);
        data
    }

    fn client_sends(&mut self, data: &[u8]) {
        self.sim.send(Peer::Client, data);
        self.sent.mirror(data);
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Client(data) => self.client_sends(&data),
            Op::Request(req) => self.client_sends(&req.bytes()),
            Op::ClientFlood(f) => {
                let data = self.flood(&f);
                self.client_sends(&data);
            }
            Op::Backend(n, data) => {
                if let Some(p) = self.backend(n) {
                    self.sim.send(p, &data);
                }
            }
            Op::Response(n, resp) => {
                if let Some(p) = self.backend(n) {
                    self.sim.send(p, &resp.bytes());
                }
            }
            Op::BackendFlood(n, f) => {
                if let Some(p) = self.backend(n) {
                    let data = self.flood(&f);
                    self.sim.send(p, &data);
                }
            }
            Op::Shut(who) => {
                if let Some(p) = self.who(&who) {
                    self.sim.shut(p);
                }
            }
            Op::Reset(who) => {
                if let Some(p) = self.who(&who) {
                    self.sim.reset(p);
                }
            }
            Op::ClientReads(on) => self.reading = on,
            Op::Refuse(n) => self.sim.refuse(usize::from(n % 4)),
            Op::Tick => self.sim.fire_timers(),
            Op::Shutdown => self.sim.shutdown(),
        }
    }

    /// Runs the proxy until it waits, taking what it writes (to the client only while it
    /// reads), and checks what it wrote and its heap.
    fn settle(&mut self) {
        loop {
            if self.closing {
                self.sim.shut(Peer::Client);
                for n in 0..self.sim.backends() {
                    self.sim.shut(Peer::Backend(n));
                }
            }
            measured(|| self.sim.step());
            let mut moved = false;
            if self.reading {
                let out = self.sim.take(Peer::Client, usize::MAX);
                if !out.is_empty() {
                    moved = true;
                    trace(|| format!("  client <- {:?}", String::from_utf8_lossy(&out)));
                    if let Err(e) = self.received.feed(&out, &mut self.sent) {
                        panic!("the client receives {e}");
                    }
                }
            }
            for n in 0..self.sim.backends() {
                if self.backends.len() <= n {
                    let big = Limits {
                        max_head_bytes: usize::MAX,
                        max_headers: usize::MAX,
                    };
                    self.backends.push(Requests::new(big, true));
                }
                let out = self.sim.take(Peer::Backend(n), usize::MAX);
                if !out.is_empty() {
                    moved = true;
                    trace(|| format!("  backend {n} <- {:?}", String::from_utf8_lossy(&out)));
                    if let Err(e) = self.backends[n].check(&out) {
                        panic!("backend connection {n} receives {e}");
                    }
                }
            }
            let allowed = self.bound + (1 + self.sim.backends()) * self.per_conn;
            let peak = peak();
            assert!(
                peak <= allowed as isize,
                "the proxy's heap grew by {peak} bytes, more than {allowed}"
            );
            if !moved {
                return;
            }
        }
    }

    /// Every peer closes and time passes until the connection ends; then nothing is left
    /// outstanding.
    fn finish(&mut self) {
        // A client that reads nothing more cannot hold its connection open past every
        // deadline, but in a tunnel (which waits on the client as TCP would).
        self.reading = false;
        self.closing = true;
        for _ in 0..8 {
            if self.sim.ended() {
                break;
            }
            self.sim.fire_timers();
            self.settle();
        }
        assert!(
            self.sim.ended() || self.received.tunnel,
            "a client that does not read holds its connection open"
        );
        self.reading = true;
        for _ in 0..8 {
            if self.sim.ended() {
                break;
            }
            self.sim.fire_timers();
            self.settle();
        }
        assert!(self.sim.ended(), "the connection does not end");
        trace(|| {
            let allowed = self.bound + (1 + self.sim.backends()) * self.per_conn;
            format!("heap peak {} of {allowed}", peak())
        });
        assert_eq!(self.sim.in_flight(), 0, "a lease is outstanding");
        assert_eq!(
            self.sim.open_connections(),
            0,
            "a connection is counted open"
        );
        for (n, seen) in self.backends.iter().enumerate() {
            for at in self.sim.kept_at(Peer::Backend(n)) {
                assert!(
                    seen.stopped_at.is_some_and(|s| at > s) || seen.boundaries.contains(&at),
                    "backend connection {n} was pooled {at} bytes in, within a request \
                     (requests end at {:?})",
                    seen.boundaries
                );
            }
        }
    }
}

/// A stream of requests, parsed as it comes.
struct Requests {
    limits: Limits,
    buf: Vec<u8>,
    body: Option<BodyFramer>,
    /// Bytes taken from the stream (the offset of `buf[0]`).
    at: usize,
    /// Where each complete request (head and body) ended.
    boundaries: Vec<usize>,
    /// Complete heads not yet answered (the client's stream).
    heads: VecDeque<RequestHead>,
    /// An upgrade request's body ended here: what follows may be a tunnel.
    upgrade_after_body: bool,
    /// Whether to stop after an upgrade request (the proxy's stream to a backend; the
    /// client's goes on, as the proxy reads on unless the answer is a `101`).
    stop_at_upgrade: bool,
    /// Where parsing stopped (after an upgrade request, or at an error in the client's
    /// stream).
    stopped_at: Option<usize>,
}

impl Requests {
    fn new(limits: Limits, stop_at_upgrade: bool) -> Requests {
        Requests {
            limits,
            stop_at_upgrade,
            buf: Vec::new(),
            body: None,
            at: 0,
            boundaries: vec![0],
            heads: VecDeque::new(),
            upgrade_after_body: false,
            stopped_at: None,
        }
    }

    /// The proxy's stream to a backend: every request must parse and be framed.
    fn check(&mut self, data: &[u8]) -> Result<(), String> {
        self.feed(data)?;
        // The heads are not needed: each backend request is checked on its own.
        self.heads.clear();
        Ok(())
    }

    /// The client's stream, as the proxy reads it: an error ends it (the proxy refuses
    /// it and closes).
    fn mirror(&mut self, data: &[u8]) {
        if self.feed(data).is_err() {
            self.stop();
        }
    }

    fn stop(&mut self) {
        self.stopped_at = Some(self.at);
        self.buf = Vec::new();
        self.body = None;
    }

    fn take(&mut self, n: usize) {
        self.buf.drain(..n);
        self.at += n;
    }

    fn request_ended(&mut self) {
        self.boundaries.push(self.at);
        if self.upgrade_after_body && self.stop_at_upgrade {
            self.stop();
        }
    }

    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        if self.stopped_at.is_some() {
            return Ok(());
        }
        self.buf.extend_from_slice(data);
        loop {
            if self.stopped_at.is_some() {
                return Ok(());
            }
            if let Some(framer) = &mut self.body {
                let p = framer
                    .push(&self.buf)
                    .map_err(|e| format!("a request body framed badly: {e}"))?;
                let done = p.done;
                self.take(p.consumed);
                if !done {
                    return Ok(());
                }
                self.body = None;
                self.request_ended();
                continue;
            }
            if self.buf.is_empty() {
                return Ok(());
            }
            match parse_request(&self.buf, &self.limits) {
                Ok(Status::Complete(head, n)) => {
                    self.take(n);
                    let kind = head
                        .body_kind()
                        .map_err(|e| format!("a request head with bad framing: {e}"))?;
                    self.upgrade_after_body = head.is_upgrade() || head.method == "CONNECT";
                    self.heads.push_back(head);
                    match kind {
                        BodyKind::None | BodyKind::Length(0) => self.request_ended(),
                        BodyKind::Length(_) | BodyKind::Chunked => {
                            self.body = Some(BodyFramer::new(kind));
                        }
                        other => return Err(format!("a request head framed {other:?}")),
                    }
                }
                Ok(Status::Partial) => return Ok(()),
                Err(e) => {
                    let start = &self.buf[..self.buf.len().min(200)];
                    return Err(format!(
                        "an invalid request head ({e}): {:?}",
                        String::from_utf8_lossy(start)
                    ));
                }
            }
        }
    }
}

/// The proxy's stream to the client, parsed as it comes.
#[derive(Default)]
struct Responses {
    buf: Vec<u8>,
    body: Option<BodyFramer>,
    /// The response in progress said `Connection: close`.
    closing: bool,
    /// A response that said `Connection: close` has ended: nothing may follow.
    closed: bool,
    /// Checking stopped (a tunnel, or a close-delimited body).
    stopped: bool,
    /// The proxy sent a `101`: the connection is a tunnel.
    tunnel: bool,
    answered: usize,
}

/// The request a response answers when the proxy answers one it could not parse.
fn unparsed() -> RequestHead {
    RequestHead {
        method: "GET".into(),
        target: "/".into(),
        version: Version::Http11,
        headers: vec![Header::new("Host", "lb")],
    }
}

impl Responses {
    fn feed(&mut self, data: &[u8], requests: &mut Requests) -> Result<(), String> {
        if self.stopped {
            return Ok(());
        }
        if self.closed {
            return Err(format!(
                "{} bytes after a response that said `Connection: close`",
                data.len()
            ));
        }
        self.buf.extend_from_slice(data);
        let big = Limits {
            max_head_bytes: usize::MAX,
            max_headers: usize::MAX,
        };
        loop {
            if let Some(framer) = &mut self.body {
                let p = framer
                    .push(&self.buf)
                    .map_err(|e| format!("a response body framed badly: {e}"))?;
                self.buf.drain(..p.consumed);
                if !p.done {
                    return Ok(());
                }
                self.body = None;
                self.response_ended()?;
                continue;
            }
            if self.buf.is_empty() {
                return Ok(());
            }
            let (resp, n) = match parse_response(&self.buf, &big) {
                Ok(Status::Complete(resp, n)) => (resp, n),
                Ok(Status::Partial) => return Ok(()),
                Err(e) => {
                    let start = &self.buf[..self.buf.len().min(200)];
                    return Err(format!(
                        "an invalid response head ({e}): {:?}",
                        String::from_utf8_lossy(start)
                    ));
                }
            };
            self.buf.drain(..n);
            if resp.is_interim() {
                continue;
            }
            // A response to a request the proxy parsed carries its id; so does every
            // answer of its own but `/health`'s (`no-store`). One without either answers
            // a head the proxy refused or stopped waiting for (which the client may have
            // completed since).
            let to_parsed = resp.header("x-request-id").is_some()
                || resp.header("cache-control") == Some(&b"no-store"[..]);
            let req = match to_parsed {
                true => requests.heads.pop_front().unwrap_or_else(unparsed),
                false => unparsed(),
            };
            self.answered += 1;
            let kind = resp.body_kind(&req).map_err(|e| {
                format!(
                    "response {} ({}) to {} {} framed badly: {e}",
                    self.answered, resp.status, req.method, req.target
                )
            })?;
            self.closing = !resp.keep_alive();
            match kind {
                BodyKind::None | BodyKind::Length(0) => self.response_ended()?,
                BodyKind::Length(_) | BodyKind::Chunked => {
                    self.body = Some(BodyFramer::new(kind));
                }
                BodyKind::CloseDelimited | BodyKind::Tunnel => {
                    self.tunnel = kind == BodyKind::Tunnel;
                    self.stopped = true;
                    return Ok(());
                }
            }
        }
    }

    fn response_ended(&mut self) -> Result<(), String> {
        if self.closing {
            self.closed = true;
            if !self.buf.is_empty() {
                return Err(format!(
                    "{} bytes after a response that said `Connection: close`",
                    self.buf.len()
                ));
            }
        }
        Ok(())
    }
}

impl Req {
    fn bytes(&self) -> Vec<u8> {
        const METHODS: [&str; 9] = [
            "GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "G@T",
        ];
        const TARGETS: [&str; 9] = [
            "/",
            "/health",
            "/v1/completions",
            "/v1/chat/completions?stream=true",
            "http://example.com:8080/x?y",
            "*",
            "/a%20b",
            "//double",
            "/health?x=1",
        ];
        let method = METHODS[usize::from(self.method) % METHODS.len()];
        let target = TARGETS[usize::from(self.target) % TARGETS.len()];
        let version = if self.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut out = format!("{method} {target} {version}\r\n").into_bytes();
        if self.host {
            out.extend_from_slice(b"Host: lb.test\r\n");
        }
        let body = if self.json {
            format!(
                r#"{{"model":"m","user":"u{}","prompt":"{}"}}"#,
                self.body.len() % 7,
                hex(&self.body)
            )
            .into_bytes()
        } else {
            self.body.clone()
        };
        let body = frame(&mut out, self.framing, self.delta, &body, self.extra.len());
        match self.connection % 5 {
            1 => out.extend_from_slice(b"Connection: close\r\n"),
            2 => out.extend_from_slice(b"Connection: keep-alive\r\n"),
            3 => out.extend_from_slice(b"Connection: upgrade\r\nUpgrade: websocket\r\n"),
            4 => out.extend_from_slice(b"Connection: x-drop\r\nX-Drop: 1\r\n"),
            _ => {}
        }
        if self.expect {
            out.extend_from_slice(b"Expect: 100-continue\r\n");
        }
        extra(&mut out, &self.extra);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        out
    }
}

impl Resp {
    fn bytes(&self) -> Vec<u8> {
        const STATUSES: [u16; 15] = [
            100, 101, 103, 200, 200, 201, 204, 206, 301, 304, 404, 429, 500, 502, 503,
        ];
        let status = match usize::from(self.status) {
            s if s < 200 => STATUSES[s % STATUSES.len()],
            _ => 100 + 3 * u16::from(self.status),
        };
        let version = if self.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut out = format!("{version} {status} R\r\n").into_bytes();
        let body = frame(
            &mut out,
            self.framing,
            self.delta,
            &self.body,
            self.extra.len(),
        );
        match self.connection % 4 {
            1 => out.extend_from_slice(b"Connection: close\r\n"),
            2 => out.extend_from_slice(b"Connection: keep-alive\r\n"),
            3 => out.extend_from_slice(b"Connection: upgrade\r\nUpgrade: websocket\r\n"),
            _ => {}
        }
        if let Some(t) = self.keep_alive {
            out.extend_from_slice(format!("Keep-Alive: timeout={}\r\n", t % 8).as_bytes());
        }
        extra(&mut out, &self.extra);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        out
    }
}

/// Writes framing headers for `body` into `out` (a head in progress) and returns the
/// body as it goes on the wire. Some choices are invalid on purpose.
fn frame(out: &mut Vec<u8>, framing: u8, delta: i8, body: &[u8], seed: usize) -> Vec<u8> {
    let length = |out: &mut Vec<u8>, n: usize| {
        out.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes());
    };
    match framing % 9 {
        // No framing: whatever body follows is the next message.
        0 => body.to_vec(),
        1 => {
            length(out, body.len().saturating_add_signed(isize::from(delta)));
            body.to_vec()
        }
        2 => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            chunked(body, seed, false)
        }
        3 => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            length(out, body.len());
            chunked(body, seed, false)
        }
        4 => {
            length(out, body.len());
            length(out, body.len().saturating_add_signed(isize::from(delta)));
            body.to_vec()
        }
        5 => {
            out.extend_from_slice(b"Transfer-Encoding: gzip, chunked\r\n");
            chunked(body, seed, false)
        }
        6 => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            chunked(body, seed, true)
        }
        7 => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            let mut wire = chunked(body, seed, false);
            // Cut short or overlong by `delta`.
            let n = wire.len().saturating_add_signed(isize::from(delta));
            wire.resize(n, b'x');
            wire
        }
        _ => {
            length(out, body.len());
            body.to_vec()
        }
    }
}

/// `body` in chunks of a few sizes, with chunk extensions and a trailer if `fancy`.
fn chunked(body: &[u8], seed: usize, fancy: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    let mut size = 1 + seed % 13;
    while !rest.is_empty() {
        let n = size.min(rest.len());
        if fancy {
            out.extend_from_slice(format!("{n:X};ext=\"v\"\r\n").as_bytes());
        } else {
            out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        }
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
        size = size * 3 % 61 + 1;
    }
    out.extend_from_slice(b"0\r\n");
    if fancy {
        out.extend_from_slice(b"X-Trailer: t\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// An extra header made of `raw`: printable bytes kept, others as they map to `a..p`.
fn extra(out: &mut Vec<u8>, raw: &[u8]) {
    if raw.is_empty() {
        return;
    }
    out.extend_from_slice(b"X-Fuzz: ");
    out.extend(raw.iter().map(|&b| match b {
        b' '..=b'~' => b,
        _ => b'a' + b % 16,
    }));
    out.extend_from_slice(b"\r\n");
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

// The proxy's heap, counted while it runs: a global allocator that keeps, per thread, the
// bytes allocated less those freed while counting is on, and the peak.

struct Counting;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

thread_local! {
    /// Counting on, bytes live, the most bytes live.
    static HEAP: Cell<(bool, isize, isize)> = const { Cell::new((false, 0, 0)) };
}

fn note(delta: isize) {
    let _ = HEAP.try_with(|h| {
        let (on, live, peak) = h.get();
        if on {
            let live = live + delta;
            h.set((on, live, peak.max(live)));
        }
    });
}

#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        note(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Runs `f` with the heap counted (from where the last count left off).
fn measured<T>(f: impl FnOnce() -> T) -> T {
    HEAP.with(|h| {
        let (_, live, peak) = h.get();
        h.set((true, live, peak));
    });
    let out = f();
    HEAP.with(|h| {
        let (_, live, peak) = h.get();
        h.set((false, live, peak));
    });
    out
}

/// The most bytes counted live so far in this input.
fn peak() -> isize {
    HEAP.with(|h| h.get().2)
}
