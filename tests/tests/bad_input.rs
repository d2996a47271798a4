//! Bad input, on both builds: every malformed request gets its status (400,
//! 431, or 408 for a head that does not arrive in time) and its connection
//! closed, and lb keeps serving; every malformed backend response is a 502 (or,
//! when its head was already forwarded, a cut client connection), never
//! forwarded as-is.
//!
//! Each request case is sent on a raw TCP connection; the test reads until
//! EOF (or reset) for at most [`CLOSE_WITHIN`], then checks the first status
//! line and that the connection was closed. After every case `/health` must
//! answer 200 and a request must go through a real mock backend.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::*;

/// How long lb may take to answer a bad request and close the connection.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Raw exchanges
// ---------------------------------------------------------------------------

/// How reading a connection ended.
#[derive(Debug, Clone, PartialEq)]
enum End {
    /// Orderly EOF.
    Eof,
    /// A reset (or another read error): the connection is closed too.
    Reset(String),
    /// Still open after the deadline.
    Open,
}

/// Everything read from one connection.
#[derive(Debug)]
struct Reply {
    bytes: Vec<u8>,
    end: End,
    /// From the start of reading to the end (EOF, reset, or the deadline).
    took: Duration,
}

impl Reply {
    fn status_line(&self) -> Option<String> {
        let i = self.bytes.windows(2).position(|w| w == b"\r\n")?;
        Some(String::from_utf8_lossy(&self.bytes[..i]).into_owned())
    }

    /// The status of the first response (`None` without a status line).
    fn status(&self) -> Option<u16> {
        let line = self.status_line()?;
        let mut parts = line.split(' ');
        let version = parts.next()?;
        if !version.starts_with("HTTP/1.") {
            return None;
        }
        parts.next()?.parse().ok()
    }

    fn closed(&self) -> bool {
        self.end != End::Open
    }

    /// What was read, for failure messages.
    fn show(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        let cut: String = text.chars().take(600).collect();
        format!(
            "{} bytes {:?}{} then {:?} after {:?}",
            self.bytes.len(),
            cut,
            if cut.len() < text.len() { "..." } else { "" },
            self.end,
            self.took
        )
    }

    /// `None` if this is `status` followed by a close, else what is wrong.
    fn check(&self, status: u16) -> Option<String> {
        let mut wrong = Vec::new();
        if self.status() != Some(status) {
            wrong.push(format!("expected status {status}"));
        }
        if !self.closed() {
            wrong.push(format!(
                "expected the connection closed within {CLOSE_WITHIN:?}"
            ));
        }
        (!wrong.is_empty()).then(|| format!("{}; got {}", wrong.join(" and "), self.show()))
    }

    /// The first response, parsed.
    fn parsed(&self) -> Option<Parsed> {
        Parsed::from(&self.bytes, self.end == End::Eof)
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to lb on {port}: {e}"));
    s.set_nodelay(true).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Read `s` until EOF, a reset or `within`.
fn read_to_close(s: &TcpStream, within: Duration) -> Reply {
    let start = Instant::now();
    let deadline = start + within;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let end = loop {
        let now = Instant::now();
        if now >= deadline {
            break End::Open;
        }
        s.set_read_timeout(Some(deadline - now)).unwrap();
        match (&*s).read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break End::Reset(e.to_string()),
        }
    };
    Reply {
        bytes,
        end,
        took: start.elapsed(),
    }
}

/// Send `data` on a fresh connection (lb may close before all of it is
/// written) and read what comes back until the connection closes.
fn send_raw(port: u16, data: &[u8]) -> Reply {
    let s = connect(port);
    let _ = (&s).write_all(data);
    read_to_close(&s, CLOSE_WITHIN)
}

/// A response parsed from raw bytes.
#[derive(Debug)]
struct Parsed {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body is complete as framed: the whole `Content-Length`, the
    /// terminating zero-size chunk, or EOF for a close-delimited body.
    complete: bool,
}

impl Parsed {
    fn from(bytes: &[u8], eof: bool) -> Option<Parsed> {
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let rest = &bytes[end + 4..];
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let (body, complete) = if get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            dechunk(rest)
        } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            (rest[..n.min(rest.len())].to_vec(), rest.len() >= n)
        } else {
            (rest.to_vec(), eof)
        };
        Some(Parsed {
            status,
            headers,
            body,
            complete,
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Decode a chunked body: (the data of the valid chunks, whether the body
/// ended with a valid zero-size chunk and trailer section).
fn dechunk(mut b: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(i) = b.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let line = String::from_utf8_lossy(&b[..i]).into_owned();
        let hex = line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(hex, 16) else {
            return (out, false);
        };
        b = &b[i + 2..];
        if size == 0 {
            // Trailers up to an empty line.
            loop {
                let Some(j) = b.windows(2).position(|w| w == b"\r\n") else {
                    return (out, false);
                };
                if j == 0 {
                    return (out, true);
                }
                b = &b[j + 2..];
            }
        }
        if b.len() < size + 2 || &b[size..size + 2] != b"\r\n" {
            return (out, false);
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

// ---------------------------------------------------------------------------
// lb keeps serving
// ---------------------------------------------------------------------------

/// `/health` answers 200 and a completion goes through the mock.
fn assert_still_serving(lb: &Lb, m: &Mock, after: &str) {
    let (status, h) = lb.health();
    assert_eq!(status, 200, "/health after {after}: {h}");
    let r = lb.completion();
    assert_eq!(r.status, 200, "a completion after {after}: {}", r.text());
    assert_eq!(
        r.backend_port(),
        Some(m.port),
        "a completion after {after} should come from the mock: {}",
        r.text()
    );
}

/// A mock and an lb in front of it.
fn lb_with_mock(extra: &[&str]) -> (Mock, Lb) {
    let m = Mock::spawn::<&str>(&[]);
    let url = m.url();
    let mut args = vec!["--backends", url.as_str()];
    args.extend_from_slice(extra);
    let lb = Lb::spawn(&args);
    (m, lb)
}

/// Send each bad request on its own connection: each must get `status` and a
/// close, none may reach the backend, and lb must keep serving after each.
/// Panics with every failing case at once.
fn assert_rejected(rule: &str, status: u16, cases: &[(&str, &[u8])]) {
    let (m, lb) = lb_with_mock(&[]);
    let mut failures = Vec::new();
    for (name, raw) in cases {
        let reply = send_raw(lb.port, raw);
        eprintln!("{rule} / {name}: {}", reply.show());
        if let Some(wrong) = reply.check(status) {
            failures.push(format!(
                "{rule} / {name}: sent {:?}: {wrong}",
                String::from_utf8_lossy(raw)
            ));
        }
        assert_still_serving(&lb, &m, &format!("{rule} / {name}"));
    }
    assert!(
        failures.is_empty(),
        "[{} build] {} of {} cases failed:\n{}",
        lb_build(),
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(
        m.requests(),
        cases.len() as u64,
        "only the completions may reach the backend, none of the bad requests ({rule})"
    );
}

// ---------------------------------------------------------------------------
// Requests: 400
// ---------------------------------------------------------------------------

#[test]
fn content_length_and_transfer_encoding_get_400() {
    if build_is("tokio") {
        // hyper removes Content-Length when Transfer-Encoding is present before the
        // adapter sees the request, so this build cannot answer 400. It does what RFC 9112
        // §6.3 requires of an intermediary instead: Content-Length dropped, the chunked
        // framing used, the connection closed after the response. Nothing can desync:
        // the backend gets exactly the chunked body and no bytes are left to be read as a
        // second request.
        for raw in [
            &b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\
               Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
            &b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
               Content-Length: 15\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        ] {
            let (m, lb) = lb_with_mock(&[]);
            let reply = send_raw(lb.port, raw);
            assert!(reply.closed(), "the connection must close: {}", reply.show());
            let p = reply.parsed().unwrap_or_else(|| panic!("no response: {}", reply.show()));
            if p.status == 200 {
                let v: Value = serde_json::from_slice(&p.body).expect("mock /upload JSON");
                assert_eq!(v["bytes"], 5, "the chunked body, not the Content-Length: {v}");
            } else {
                assert_eq!(p.status, 400, "{}", reply.show());
            }
            assert!(
                !String::from_utf8_lossy(&reply.bytes).contains("/smuggled"),
                "a second request must not be read from the body: {}",
                reply.show()
            );
            assert!(m.requests() <= 1, "at most the one request reached the backend");
        }
        return;
    }
    assert_rejected(
        "Content-Length + Transfer-Encoding",
        400,
        &[
            (
                "CL then TE",
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\
                  Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            ),
            (
                "TE then CL",
                b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
                  Content-Length: 15\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            ),
        ],
    );
}

#[test]
fn differing_duplicate_content_lengths_get_400() {
    assert_rejected(
        "differing Content-Length",
        400,
        &[
            (
                "two lines",
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\
                  Content-Length: 7\r\n\r\nhello",
            ),
            (
                "one list",
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 7\r\n\r\nhello",
            ),
        ],
    );
    // Control: identical duplicates are one length (RFC 9110 §8.6), so the
    // 400s above are for the difference, not for the duplicate.
    let (_m, lb) = lb_with_mock(&[]);
    let reply = send_raw(
        lb.port,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\
          Connection: close\r\n\r\nhello",
    );
    let p = reply
        .parsed()
        .unwrap_or_else(|| panic!("identical Content-Lengths: no response: {}", reply.show()));
    assert_eq!(
        p.status,
        200,
        "identical duplicate Content-Lengths should pass: {}",
        reply.show()
    );
    let v: Value = serde_json::from_slice(&p.body).expect("mock /upload JSON");
    assert_eq!(v["bytes"], 5, "{v}");
}

#[test]
fn transfer_encoding_other_than_final_chunked_gets_400() {
    assert_rejected(
        "Transfer-Encoding not final chunked",
        400,
        &[
            (
                "gzip",
                b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nhello",
            ),
            (
                "chunked, gzip",
                b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n\
                  5\r\nhello\r\n0\r\n\r\n",
            ),
            (
                "identity",
                b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\nhello",
            ),
            (
                "chunked line then gzip line",
                b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
                  Transfer-Encoding: gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            ),
        ],
    );
}

/// A valid chunked head to the mock's `/upload`, then `body`: 400 and close.
/// The head may already have been forwarded, so the backend count is not
/// checked here.
fn assert_bad_chunked_body(rule: &str, cases: &[(&str, &[u8])]) {
    let (m, lb) = lb_with_mock(&[]);
    let head = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut failures = Vec::new();
    for (name, body) in cases {
        let s = connect(lb.port);
        let _ = (&s).write_all(head);
        // Let the head go out on its own, as a streaming client would.
        thread::sleep(Duration::from_millis(100));
        let _ = (&s).write_all(body);
        let reply = read_to_close(&s, CLOSE_WITHIN);
        eprintln!("{rule} / {name}: {}", reply.show());
        if let Some(wrong) = reply.check(400) {
            failures.push(format!(
                "{rule} / {name}: body {:?}: {wrong}",
                String::from_utf8_lossy(body)
            ));
        }
        assert_still_serving(&lb, &m, &format!("{rule} / {name}"));
    }
    assert!(
        failures.is_empty(),
        "[{} build] {} of {} cases failed:\n{}",
        lb_build(),
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn invalid_chunk_size_gets_400() {
    assert_bad_chunked_body(
        "invalid chunk size",
        &[
            ("zz first", b"zz\r\nhello\r\n0\r\n\r\n"),
            (
                "zz after a chunk",
                b"5\r\nhello\r\nzz\r\nhello\r\n0\r\n\r\n",
            ),
            ("empty size line", b"\r\nhello\r\n0\r\n\r\n"),
        ],
    );
}

#[test]
fn chunk_size_overflow_gets_400() {
    assert_bad_chunked_body(
        "chunk-size overflow",
        &[
            ("17 f", b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
            ("2^64", b"10000000000000000\r\nhello\r\n0\r\n\r\n"),
        ],
    );
}

#[test]
fn obs_fold_gets_400() {
    assert_rejected(
        "obs-fold",
        400,
        &[
            (
                "space",
                b"GET /fold HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
            ),
            (
                "tab",
                b"GET /fold HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n\tb\r\n\r\n",
            ),
        ],
    );
}

#[test]
fn bare_cr_gets_400() {
    assert_rejected(
        "bare CR",
        400,
        &[
            (
                "in a value",
                b"GET /cr HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
            ),
            (
                "ending a header line",
                b"GET /cr HTTP/1.1\r\nHost: x\rX-B: y\r\n\r\n",
            ),
            (
                "ending the request line",
                b"GET /cr HTTP/1.1\rHost: x\r\n\r\n",
            ),
        ],
    );
}

#[test]
fn invalid_header_names_get_400() {
    assert_rejected(
        "invalid header name",
        400,
        &[
            (
                "space inside",
                b"GET /n HTTP/1.1\r\nHost: x\r\nX Bad: 1\r\n\r\n",
            ),
            (
                "space before colon",
                b"GET /n HTTP/1.1\r\nHost: x\r\nX-Bad : 1\r\n\r\n",
            ),
            ("@", b"GET /n HTTP/1.1\r\nHost: x\r\nX@Bad: 1\r\n\r\n"),
            ("empty", b"GET /n HTTP/1.1\r\nHost: x\r\n: 1\r\n\r\n"),
            (
                "non-ASCII",
                b"GET /n HTTP/1.1\r\nHost: x\r\nX-\xc3\xa9: 1\r\n\r\n",
            ),
        ],
    );
}

#[test]
fn request_line_without_version_gets_400() {
    assert_rejected(
        "no version",
        400,
        &[
            ("HTTP/0.9 style", b"GET /\r\n\r\n"),
            ("with headers", b"GET /\r\nHost: x\r\n\r\n"),
            ("trailing space", b"GET / \r\nHost: x\r\n\r\n"),
        ],
    );
}

// ---------------------------------------------------------------------------
// Requests: 431 and 408
// ---------------------------------------------------------------------------

#[test]
fn head_over_64_kib_gets_431() {
    let (m, lb) = lb_with_mock(&[]);
    // Control: a 60 KiB head is under the limit and goes through.
    let big = "a".repeat(60 * 1024);
    let r = request(lb.port, "GET", "/big", &[("X-Big", &big)], None).unwrap();
    assert_eq!(r.status, 200, "a 60 KiB head should pass: {}", r.text());
    assert_eq!(
        r.json()["headers"]["x-big"].as_str().map(str::len),
        Some(big.len())
    );

    let huge = "a".repeat(70 * 1024);
    let raw = format!("GET /huge HTTP/1.1\r\nHost: x\r\nX-Huge: {huge}\r\n\r\n");
    let reply = send_raw(lb.port, raw.as_bytes());
    eprintln!("a 70 KiB header: {}", reply.show());
    if let Some(wrong) = reply.check(431) {
        panic!("[{} build] a 70 KiB header: {wrong}", lb_build());
    }
    assert_still_serving(&lb, &m, "a 70 KiB header");
    assert_eq!(m.requests(), 2, "the 70 KiB head never reached the backend");
}

/// Check a connection whose head never completed within `--head-timeout 1s`:
/// smol answers 408 and closes; tokio (hyper) closes without an answer (see
/// the README's limitations), so there only the close is checked.
fn assert_head_timeout(what: &str, reply: &Reply) {
    eprintln!("{what}: {}", reply.show());
    assert!(
        reply.closed(),
        "[{} build] {what}: the connection should close about 1 s after it opened \
         (--head-timeout 1s); got {}",
        lb_build(),
        reply.show()
    );
    assert!(
        reply.took >= Duration::from_millis(700),
        "[{} build] {what}: closed before the 1 s head timeout: {}",
        lb_build(),
        reply.show()
    );
    if !build_is("tokio") {
        assert_eq!(
            reply.status(),
            Some(408),
            "[{} build] {what}: expected a 408; got {}",
            lb_build(),
            reply.show()
        );
        let p = reply.parsed().expect("parsed 408");
        assert!(p.complete, "incomplete 408: {}", reply.show());
    }
}

#[test]
fn head_not_arriving_in_time_gets_408() {
    let (m, lb) = lb_with_mock(&["--head-timeout", "1s"]);

    // Half a head, then silence.
    let s = connect(lb.port);
    (&s).write_all(b"GET /half HTTP/1.1\r\nHost: x\r\nX-Par")
        .unwrap();
    let reply = read_to_close(&s, CLOSE_WITHIN);
    assert_head_timeout("half a head", &reply);
    drop(s);
    assert_still_serving(&lb, &m, "half a head");

    // Slowloris: a byte every 100 ms, never ending the head. The timeout is
    // for the whole head, not per read.
    let s = connect(lb.port);
    (&s).write_all(b"GET /drip HTTP/1.1\r\nHost: x\r\nX-Drip: ")
        .unwrap();
    let w = s.try_clone().unwrap();
    let dripper = thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < CLOSE_WITHIN + Duration::from_secs(1) {
            if (&w).write_all(b"a").is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    let reply = read_to_close(&s, CLOSE_WITHIN);
    assert_head_timeout("a head dripping one byte every 100 ms", &reply);
    let _ = s.shutdown(std::net::Shutdown::Both);
    dripper.join().unwrap();
    assert_still_serving(&lb, &m, "a dripping head");
    assert_eq!(
        m.requests(),
        2,
        "the unfinished heads never reached the backend"
    );
}

// ---------------------------------------------------------------------------
// Backend responses: 502
// ---------------------------------------------------------------------------

/// Marks the garbage each fake backend answers with: it must never reach a
/// client.
const MARKER: &str = "evil-marker";

/// A scripted backend: answers its probes (`GET /v1/models`) normally, and
/// every other request with `parts`, written 200 ms apart (so that lb sees,
/// and may forward, each part before the next), then closes. Stops when
/// dropped.
struct PacedBackend {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PacedBackend {
    fn spawn(parts: Vec<Vec<u8>>) -> PacedBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let parts = Arc::new(parts);
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let parts = parts.clone();
                        thread::spawn(move || {
                            let _ = serve_paced(s, &parts);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        PacedBackend {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn serve_paced(mut s: TcpStream, parts: &[Vec<u8>]) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 8192];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    // Health probes pass: the fake is a backend lb routes to, until its replies.
    if req.starts_with(b"GET /v1/models ") {
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")?;
        return Ok(());
    }
    if req.starts_with(b"GET /v1/models ") {
        let body = r#"{"object":"list","data":[]}"#;
        let probe = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(probe.as_bytes())?;
    } else {
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                thread::sleep(Duration::from_millis(200));
            }
            s.write_all(part)?;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    // Let the peer read it all before the socket goes away.
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    while s.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
    Ok(())
}

impl Drop for PacedBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A [`PacedBackend`] answering with `parts` next to a real mock, behind a
/// round-robin lb.
fn fake_and_mock(parts: Vec<Vec<u8>>) -> (PacedBackend, Mock, Lb) {
    let fake = PacedBackend::spawn(parts);
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&[
        "--routing",
        "round-robin",
        "--health-check-interval",
        "60s",
        "--backends",
        &fake.url(),
        "--backends",
        &m.url(),
    ]);
    lb.wait_healthy(2);
    // Both probed: a backend not yet probed takes nothing while a probed one has room.
    lb.wait_probed(2);
    (fake, m, lb)
}

const PROXIED: &[u8] = b"GET /proxied HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Send requests until one is not answered by the mock (round-robin: the
/// first or the second); returns that reply.
fn reply_from_fake(lb: &Lb, m: &Mock) -> Reply {
    for _ in 0..4 {
        let reply = send_raw(lb.port, PROXIED);
        let from_mock = reply.parsed().is_some_and(|p| {
            p.status == 200 && p.header("x-backend-port") == Some(m.port.to_string().as_str())
        });
        if !from_mock {
            return reply;
        }
    }
    panic!("4 requests in a row went to the mock: round-robin never picked the fake backend");
}

/// lb keeps serving after a bad backend: `/health` 200 and a request through
/// the mock (the fake may still take a turn, answered with a 5xx error).
fn assert_still_serving_mock(lb: &Lb, m: &Mock, after: &str) {
    let (status, h) = lb.health();
    assert_eq!(status, 200, "/health after {after}: {h}");
    for _ in 0..3 {
        let r = lb.completion();
        if r.status == 200 && r.backend_port() == Some(m.port) {
            return;
        }
        let e = assert_error_json(&r, r.status);
        assert!(r.status >= 500, "after {after}: {} {e}", r.status);
        assert!(
            !r.text().contains(MARKER),
            "garbage forwarded: {}",
            r.text()
        );
    }
    panic!("after {after}: no request reached the mock in 3 tries");
}

/// The proxied request to a backend answering `garbage` gets a JSON 502,
/// nothing of the garbage, and lb keeps serving.
fn assert_bad_response_is_502(rule: &str, garbage: &str) {
    assert!(garbage.contains(MARKER), "the garbage must carry MARKER");
    let (_fake, m, lb) = fake_and_mock(vec![garbage.as_bytes().to_vec()]);
    let reply = reply_from_fake(&lb, &m);
    eprintln!("backend {rule}: {}", reply.show());
    let build = lb_build();
    let p = reply.parsed().unwrap_or_else(|| {
        panic!(
            "[{build} build] backend {rule}: no complete response head: {}",
            reply.show()
        )
    });
    assert!(
        !String::from_utf8_lossy(&reply.bytes).contains(MARKER),
        "[{build} build] backend {rule}: the garbage {garbage:?} reached the client: {}",
        reply.show()
    );
    assert_eq!(
        p.status,
        502,
        "[{build} build] backend {rule}: the backend answered {garbage:?}; expected 502, got {}",
        reply.show()
    );
    assert!(p.complete, "incomplete 502: {}", reply.show());
    let v: Value = serde_json::from_slice(&p.body)
        .unwrap_or_else(|e| panic!("502 body is not JSON ({e}): {}", reply.show()));
    let e = &v["error"];
    assert!(
        e["message"].is_string() && e["type"].is_string(),
        "502 body is not an OpenAI error: {v}"
    );
    assert!(reply.closed(), "{}", reply.show());
    assert_still_serving_mock(&lb, &m, &format!("backend {rule}"));
}

/// Not bad input, but it needs the scripted backend: a close-delimited response whose last
/// bytes and the backend's close arrive together (written, then the socket shut down at
/// once) reaches the client whole, every time. The close is the end of the body, and lb
/// must see it although no further event comes (the smol build once waited for one after
/// a short read, until `--timeout`).
#[test]
fn a_close_delimited_response_arriving_with_its_close_is_passed_whole() {
    let body = "close-delimited body";
    let response =
        format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{body}");
    let fake = PacedBackend::spawn(vec![response.into_bytes()]);
    let lb = Lb::spawn(&["--health-check-interval", "60s", "--backends", &fake.url()]);
    lb.wait_healthy(1);
    let build = lb_build();
    for i in 1..=20 {
        let reply = send_raw(lb.port, PROXIED);
        let p = reply.parsed().unwrap_or_else(|| {
            panic!(
                "[{build} build] request {i}: no response head: {}",
                reply.show()
            )
        });
        assert_eq!(
            p.status,
            200,
            "[{build} build] request {i}: {}",
            reply.show()
        );
        assert!(
            p.complete && p.body == body.as_bytes(),
            "[{build} build] request {i}: the body did not arrive whole and ended: {}",
            reply.show()
        );
    }
}

#[test]
fn backend_bad_status_line_gives_502() {
    assert_bad_response_is_502(
        "bad status line",
        "HTTP/1.1 abc\r\nX-Marker: evil-marker\r\nContent-Length: 11\r\n\r\nevil-marker",
    );
}

#[test]
fn backend_content_length_and_transfer_encoding_gives_502() {
    assert_bad_response_is_502(
        "Content-Length + Transfer-Encoding",
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\
         X-Marker: evil-marker\r\n\r\nb\r\nevil-marker\r\n0\r\n\r\n",
    );
}

#[test]
fn backend_differing_content_lengths_give_502() {
    assert_bad_response_is_502(
        "differing Content-Length",
        "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Length: 12\r\n\
         X-Marker: evil-marker\r\n\r\nevil-marker\n",
    );
}

#[test]
fn backend_transfer_encoding_not_final_chunked_gives_502() {
    assert_bad_response_is_502(
        "Transfer-Encoding chunked, gzip",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\
         X-Marker: evil-marker\r\n\r\nb\r\nevil-marker\r\n0\r\n\r\n",
    );
}

#[test]
fn backend_bare_cr_gives_502() {
    assert_bad_response_is_502(
        "bare CR",
        "HTTP/1.1 200 OK\r\nX-Marker: evil\rmarker\r\nContent-Length: 11\r\n\r\nevil-marker",
    );
}

#[test]
fn backend_obs_fold_gives_502() {
    assert_bad_response_is_502(
        "obs-fold",
        "HTTP/1.1 200 OK\r\nX-Marker: evil\r\n -marker\r\nContent-Length: 11\r\n\r\nevil-marker",
    );
}

#[test]
fn backend_invalid_header_name_gives_502() {
    assert_bad_response_is_502(
        "invalid header name",
        "HTTP/1.1 200 OK\r\nX Marker: evil-marker\r\nContent-Length: 11\r\n\r\nevil-marker",
    );
}

/// A backend body that breaks its chunked framing after the head was
/// forwarded: the client connection is cut, the client never sees a complete
/// body, nor anything after the bad chunk-size line.
fn assert_bad_backend_chunk_cuts(rule: &str, bad_size_line: &str) {
    // The head and a valid chunk first, so that lb forwards them; then the bad
    // size line.
    let good = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n\
                5\r\nhello\r\n";
    let bad = format!("{bad_size_line}\r\n{MARKER}\r\n0\r\n\r\n");
    let garbage = format!("{good}{bad}");
    let (_fake, m, lb) = fake_and_mock(vec![good.as_bytes().to_vec(), bad.into_bytes()]);
    let reply = reply_from_fake(&lb, &m);
    eprintln!("backend {rule}: {}", reply.show());
    let build = lb_build();
    assert!(
        !String::from_utf8_lossy(&reply.bytes).contains(MARKER),
        "[{build} build] backend {rule}: bytes after the bad chunk-size line reached the client: {}",
        reply.show()
    );
    assert!(
        reply.closed(),
        "[{build} build] backend {rule}: the client connection should be closed: {}",
        reply.show()
    );
    match reply.parsed() {
        // Nothing, or not even a whole head: cut.
        None => {}
        Some(p) if p.status == 502 => {
            assert!(p.complete, "incomplete 502: {}", reply.show());
        }
        Some(p) => {
            assert_eq!(
                p.status,
                200,
                "[{build} build] backend {rule}: {}",
                reply.show()
            );
            assert!(
                !p.complete,
                "[{build} build] backend {rule}: the backend's body {garbage:?} broke its \
                 chunked framing, but the client got a complete body {:?}: {}",
                String::from_utf8_lossy(&p.body),
                reply.show()
            );
        }
    }
    assert_still_serving_mock(&lb, &m, &format!("backend {rule}"));
}

#[test]
fn backend_invalid_chunk_size_mid_body_cuts_the_client() {
    assert_bad_backend_chunk_cuts("invalid chunk size", "zz");
}

#[test]
fn backend_chunk_size_overflow_mid_body_cuts_the_client() {
    assert_bad_backend_chunk_cuts("chunk-size overflow", "fffffffffffffffff");
}
