//! The admission queue and the request log, in a debug build (where a lease dropped
//! without being released panics): a client that leaves the queue gives its place up,
//! also as a slot frees for it; a queued request gets the slot; chunked bodies are logged
//! as their data.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use lb_core::{BackendSpec, Config, Event, QueueStats};
use lb_proxy::reqlog::{Entry, EntrySink, RequestLog};
use lb_proxy::{Notice, NoticeSink, Settings};

/// Path and body of each request a backend saw.
type Seen = Mutex<Vec<(String, Vec<u8>)>>;

/// A backend on std threads. `/hold...` requests wait for a token (see `release`);
/// everything else is answered at once. Answers are chunked JSON; each request's path
/// and body are recorded.
struct Backend {
    addr: SocketAddr,
    seen: Arc<Seen>,
    tokens: Arc<(Mutex<u32>, Condvar)>,
}

impl Backend {
    fn spawn() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tokens = Arc::new((Mutex::new(0u32), Condvar::new()));
        let (log, gate) = (seen.clone(), tokens.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(s) = stream else { continue };
                let (log, gate) = (log.clone(), gate.clone());
                thread::spawn(move || serve_one(s, &log, &gate));
            }
        });
        Backend { addr, seen, tokens }
    }

    /// Lets one held request answer.
    fn release(&self) {
        let (count, cv) = &*self.tokens;
        *count.lock().unwrap() += 1;
        cv.notify_all();
    }

    fn paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            // Not requests: the probe, and the model list a passing probe is followed by.
            .filter(|p| p != "/probe" && p != "/v1/models")
            .collect()
    }

    fn wait_for(&self, path: &str) {
        let t = Instant::now();
        while !self.paths().iter().any(|p| p == path) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{path} never arrived"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn serve_one(mut s: TcpStream, log: &Seen, gate: &(Mutex<u32>, Condvar)) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = read_until(&mut s, b"\r\n\r\n");
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let path = head.split(' ').nth(1).unwrap_or("").to_string();
    let body = if head.contains("transfer-encoding: chunked") {
        // (The tests' chunked bodies have no blank line before their end.)
        dechunk(&read_until(&mut s, b"\r\n\r\n"))
    } else {
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
        let mut b = vec![0; len];
        s.read_exact(&mut b).unwrap();
        b
    };
    log.lock().unwrap().push((path.clone(), body));
    if path.starts_with("/hold") {
        let (count, cv) = gate;
        let mut n = count.lock().unwrap();
        while *n == 0 {
            n = cv.wait(n).unwrap();
        }
        *n -= 1;
    }
    let _ = s.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n6\r\n{\"ok\":\r\n5\r\ntrue}\r\n0\r\n\r\n",
    );
}

fn read_until(s: &mut TcpStream, end: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(end) {
        match s.read(&mut byte) {
            Ok(1) => out.push(byte[0]),
            _ => break,
        }
    }
    out
}

/// The data of a well-formed chunked body.
fn dechunk(mut wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = wire.windows(2).position(|w| w == b"\r\n").unwrap();
        let line = std::str::from_utf8(&wire[..nl]).unwrap();
        let size = usize::from_str_radix(line.split(';').next().unwrap(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&wire[nl + 2..nl + 2 + size]);
        wire = &wire[nl + 2 + size + 2..];
    }
}

/// `lb_smol::serve` on its own thread until dropped (which stops it and joins, so a panic
/// in the proxy fails the test).
struct Lb {
    addr: SocketAddr,
    /// The admission queue as the core's status reports (every [`STATUS_EVERY`]) tell it:
    /// `waiting` as of the last report, the counters summed over all of them.
    queue: Arc<Mutex<QueueStats>>,
    stop: Option<async_std::channel::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Lb {
    fn spawn(settings: Settings) -> Lb {
        let (addr_tx, addr_rx) = mpsc::channel();
        let addr_tx = Mutex::new(addr_tx);
        let queue = Arc::new(Mutex::new(QueueStats::default()));
        let seen = queue.clone();
        let log: NoticeSink = Arc::new(move |n: Notice| match n {
            Notice::Listening(a) => {
                let _ = addr_tx.lock().unwrap().send(a);
            }
            Notice::Core(Event::Status(report)) => {
                if let Some(q) = report.queue {
                    let mut total = seen.lock().unwrap();
                    total.waiting = q.waiting;
                    total.enqueued += q.enqueued;
                    total.admitted += q.admitted;
                    total.expired += q.expired;
                    total.full += q.full;
                    total.cancelled += q.cancelled;
                }
            }
            _ => {}
        });
        let (stop, stopped) = async_std::channel::bounded::<()>(1);
        let thread = thread::spawn(move || {
            let shutdown = async move {
                let _ = stopped.recv().await;
            };
            futures_lite::future::block_on(lb_smol::serve(settings, log, shutdown)).unwrap();
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Lb {
            addr,
            queue,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Waits until the queue, as the status reports tell it, satisfies `done`.
    fn wait_queue(&self, what: &str, done: impl Fn(&QueueStats) -> bool) {
        let t = Instant::now();
        loop {
            let q = *self.queue.lock().unwrap();
            if done(&q) {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "never {what}: the queue is {q:?}"
            );
            thread::sleep(STATUS_EVERY);
        }
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let joined = t.join();
            if !thread::panicking() {
                joined.expect("the proxy panicked");
            }
        }
    }
}

/// How often the core reports its status (with the queue's counters) in these tests.
const STATUS_EVERY: Duration = Duration::from_millis(5);

fn settings(backend: SocketAddr, queue: Option<Duration>, log: Option<RequestLog>) -> Settings {
    let mut core = Config::default();
    core.queue.timeout = queue;
    core.status_interval = Some(STATUS_EVERY);
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        backends: vec![BackendSpec {
            max_conns: 1,
            ..BackendSpec::new(format!("http://{backend}"))
        }],
        core,
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        health_path: "/probe".into(),
        // No engine load polls: the backend's record of paths is the requests'.
        load: lb_proxy::LoadSettings {
            signal: None,
            ..lb_proxy::LoadSettings::default()
        },
        shutdown_timeout: Duration::from_secs(2),
        backend_ca: None,
        request_log: log,
        ..Settings::new("127.0.0.1:0".parse().unwrap(), Vec::new())
    }
}

/// Sends `raw` on a new connection.
fn open(addr: SocketAddr, raw: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(raw).unwrap();
    s
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n\r\n").into_bytes()
}

/// The whole answer on `s` (the proxy closes after it).
fn answer(mut s: TcpStream) -> String {
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn health(addr: SocketAddr) -> String {
    answer(open(addr, &get("/health")))
}

fn wait_idle(addr: SocketAddr) {
    let t = Instant::now();
    loop {
        let h = health(addr);
        if h.contains(r#""active_conns":0"#) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never idle: {h}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_leaves_the_queue_gives_its_place_up() {
    let backend = Backend::spawn();
    let lb = Lb::spawn(settings(backend.addr, Some(Duration::from_secs(5)), None));
    let a = open(lb.addr, &get("/hold-a"));
    backend.wait_for("/hold-a");
    // B finds the only slot taken: it waits in the queue, then its client leaves, and
    // lb gives its place up.
    let b = open(lb.addr, &get("/b"));
    lb.wait_queue("B waiting", |q| q.waiting == 1 && q.enqueued == 1);
    drop(b);
    lb.wait_queue("B's place given up", |q| q.waiting == 0 && q.cancelled == 1);
    backend.release();
    let ra = answer(a);
    assert!(ra.starts_with("HTTP/1.1 200"), "{ra}");
    // The slot A freed is not held for B: C gets it at once.
    let t = Instant::now();
    let rc = answer(open(lb.addr, &get("/c")));
    assert!(rc.starts_with("HTTP/1.1 200"), "{rc}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(backend.paths(), ["/hold-a", "/c"]);
    wait_idle(lb.addr);
}

#[test]
fn a_queued_request_gets_the_slot_and_leaving_as_it_frees_leaks_nothing() {
    let backend = Backend::spawn();
    let lb = Lb::spawn(settings(backend.addr, Some(Duration::from_secs(5)), None));
    // A queued request is admitted when the slot frees.
    let a = open(lb.addr, &get("/hold-1"));
    backend.wait_for("/hold-1");
    let b = open(lb.addr, &get("/after-1"));
    lb.wait_queue("B waiting", |q| q.waiting == 1 && q.enqueued == 1);
    backend.release();
    let (ra, rb) = (answer(a), answer(b));
    assert!(ra.starts_with("HTTP/1.1 200"), "{ra}");
    assert!(
        rb.starts_with("HTTP/1.1 200") && rb.contains("true}"),
        "{rb}"
    );
    // The queued client leaves just as the slot frees: whichever comes first, the
    // lease is released (a leak would panic in this debug build, or keep the slot).
    for i in 0..5 {
        let hold = format!("/hold-x{i}");
        let a = open(lb.addr, &get(&hold));
        backend.wait_for(&hold);
        let b = open(lb.addr, &get("/leaving"));
        let enqueued = 2 + i;
        lb.wait_queue("the leaving client waiting", |q| {
            q.waiting == 1 && q.enqueued == enqueued
        });
        backend.release();
        drop(b);
        assert!(answer(a).starts_with("HTTP/1.1 200"));
        wait_idle(lb.addr);
    }
    let rc = answer(open(lb.addr, &get("/last")));
    assert!(rc.starts_with("HTTP/1.1 200"), "{rc}");
}

#[test]
fn queued_past_the_timeout_is_refused_with_429() {
    let backend = Backend::spawn();
    let lb = Lb::spawn(settings(
        backend.addr,
        Some(Duration::from_millis(300)),
        None,
    ));
    let a = open(lb.addr, &get("/hold-a"));
    backend.wait_for("/hold-a");
    let t = Instant::now();
    let rb = answer(open(lb.addr, &get("/b")));
    assert!(rb.starts_with("HTTP/1.1 429"), "{rb}");
    let lower = rb.to_ascii_lowercase();
    assert!(lower.contains("\r\nretry-after: 1\r\n"), "{rb}");
    assert!(rb.contains("rate_limit_error"), "{rb}");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    backend.release();
    assert!(answer(a).starts_with("HTTP/1.1 200"));
    assert_eq!(backend.paths(), ["/hold-a"]);
    wait_idle(lb.addr);
}

#[test]
fn chunked_bodies_are_logged_as_their_data() {
    // The entries as the CLI's writer would get them.
    let entries: Arc<Mutex<Vec<Entry>>> = Arc::default();
    let into = entries.clone();
    let sink: EntrySink = Arc::new(move |e, _started| into.lock().unwrap().push(e));
    let log = RequestLog::new(sink, lb_proxy::reqlog::DEFAULT_BODY_LIMIT);
    let backend = Backend::spawn();
    let lb = Lb::spawn(settings(backend.addr, None, Some(log)));

    let req = b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n\
                Transfer-Encoding: chunked\r\n\r\n\
                7;ext=1\r\n{\"promp\r\n8\r\nt\":\"hi\"}\r\n0\r\nX-Trailer: 1\r\n\r\n";
    let r = answer(open(lb.addr, req));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let seen = backend.seen.lock().unwrap().clone();
    // (The health checker fetches /v1/models too, maybe first.)
    let (_, body) = seen
        .iter()
        .find(|(p, _)| p.starts_with("/v1/completions"))
        .unwrap();
    assert_eq!(body, br#"{"prompt":"hi"}"#);
    let _ = health(lb.addr); // never logged

    // An entry is handed over when the exchange ends, just after the answer went out.
    let t = Instant::now();
    while entries.lock().unwrap().is_empty() && t.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(20));
    }
    let lines: Vec<String> = entries
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.record().to_line())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    for part in [
        r#""method":"POST","path":"/v1/completions?x=1","status":200,"#,
        &format!(r#""backend":"http://{}""#, backend.addr),
        r#""request":{"prompt":"hi"},"response":{"ok":true},"#,
        r#""request_truncated":false,"response_truncated":false}"#,
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }
    drop(lb);
}
