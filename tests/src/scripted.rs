//! A scripted raw backend: a loopback TCP server (threads, blocking I/O)
//! that records the exact bytes of every request it gets and answers each
//! with the raw bytes the test gave it.
//!
//! Per accepted connection it reads one request at a time: the head, then
//! the body as the head frames it (`Content-Length`, chunked with its
//! trailers, or none). It records the request ([`Received`]), writes the
//! current [`Script`]'s bytes and then closes or waits for the next request
//! on the same connection, as the script says. The script is shared by all
//! connections and changed with [`ScriptedBackend::set_script`], so a test
//! that runs its cases one after the other can keep one backend (and one
//! `lb`) for all of them, whichever pooled connection `lb` picks.
//!
//! Two kinds of request are answered without a script and never recorded:
//! `lb`'s health probes (`User-Agent: lb/... health-check`, counted in
//! [`ScriptedBackend::probes`]) get a small `200`, and requests for a path
//! ending in [`KEEPALIVE_PATH`] get `200` with the body `ok` (a client's
//! second request that tells whether `lb` kept its connection open).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Requests for a path ending in this are answered `200 ok` and not recorded.
pub const KEEPALIVE_PATH: &str = "/__scripted/keepalive";

/// How long one request may take to arrive whole once its first byte has.
const REQUEST_WITHIN: Duration = Duration::from_secs(5);

/// The longest request head read; a longer one is recorded as a problem.
const MAX_HEAD: usize = 1 << 20;

/// What the backend does after writing a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Wait for the next request on the same connection.
    KeepOpen,
    /// Send FIN, let the peer read everything, close.
    Close,
    /// Wait [`RESET_AFTER`] (so that the peer has read what was written), then
    /// reset the connection (RST, through `SO_LINGER` 0).
    Reset,
}

/// How long [`After::Reset`] waits before it resets the connection.
pub const RESET_AFTER: Duration = Duration::from_millis(200);

/// What the backend does with `Expect: 100-continue`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Continue {
    /// Send `HTTP/1.1 100 Continue` as soon as the head is read, then read
    /// the body (what a conforming origin server does).
    Send,
    /// Never send `100`: just wait for the body (it is recorded as
    /// incomplete if it does not come within 5 s).
    Never,
}

/// How the backend answers the next requests (until the next
/// [`ScriptedBackend::set_script`]).
#[derive(Clone, Debug)]
pub struct Script {
    /// The exact bytes written back: one or more raw responses (interim ones
    /// such as `103` included), nothing added, nothing checked.
    pub response: Vec<u8>,
    /// What to do after writing them.
    pub after: After,
    /// What to do with `Expect: 100-continue`.
    pub expect: Continue,
}

impl Script {
    /// Answer with `response`, keep the connection open, honour `Expect`.
    pub fn new(response: impl Into<Vec<u8>>) -> Script {
        Script {
            response: response.into(),
            after: After::KeepOpen,
            expect: Continue::Send,
        }
    }

    /// The same, closing the connection after the response.
    pub fn closing(mut self) -> Script {
        self.after = After::Close;
        self
    }

    /// The same, resetting the connection after the response ([`After::Reset`]).
    pub fn resetting(mut self) -> Script {
        self.after = After::Reset;
        self
    }

    /// The same, never answering `Expect: 100-continue` with a `100`.
    pub fn never_continue(mut self) -> Script {
        self.expect = Continue::Never;
        self
    }
}

impl Default for Script {
    fn default() -> Script {
        Script::new(&b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ndefault"[..])
    }
}

/// One request as the backend read it.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// Every byte read for this request (head, body as framed, trailers).
    pub raw: Vec<u8>,
    /// The request line, without its line end.
    pub request_line: String,
    /// The header fields in order, as (name as sent, value without the
    /// surrounding whitespace). An obs-fold continuation line is kept as a
    /// field named `<obs-fold>` whose value is the whole line.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// The trailer fields of a chunked body.
    pub trailers: Vec<(String, String)>,
    /// How the body was framed: `none`, `content-length N`, `chunked`.
    pub framing: String,
    /// Whether the backend sent `100 Continue` before reading the body.
    pub sent_continue: bool,
    /// What went wrong reading it (the request is recorded all the same and
    /// the script's response sent; the connection is closed afterwards).
    pub problem: Option<String>,
}

impl Received {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The request method (the request line's first word).
    pub fn method(&self) -> &str {
        self.request_line.split(' ').next().unwrap_or("")
    }

    /// The request target (the request line's second word).
    pub fn target(&self) -> &str {
        self.request_line.split(' ').nth(1).unwrap_or("")
    }

    fn is_probe(&self) -> bool {
        self.header_all("user-agent")
            .iter()
            .any(|ua| ua.starts_with("lb/") && ua.contains("health-check"))
    }

    fn is_keepalive_check(&self) -> bool {
        let path = self.target().split('?').next().unwrap_or("");
        path.ends_with(KEEPALIVE_PATH)
    }
}

#[derive(Default)]
struct Shared {
    script: Mutex<Script>,
    received: Mutex<Vec<Received>>,
    probes: AtomicUsize,
    connections: AtomicUsize,
    stop: AtomicBool,
}

/// The scripted backend; stops (and closes every connection within 50 ms)
/// when dropped.
pub struct ScriptedBackend {
    /// The port it listens on.
    pub port: u16,
    /// The address it listens on (127.0.0.1 unless started with [`ScriptedBackend::spawn_at`]).
    pub ip: IpAddr,
    shared: Arc<Shared>,
    accept: Option<thread::JoinHandle<()>>,
}

impl ScriptedBackend {
    /// Start it on a free loopback port with [`Script::default`].
    pub fn spawn() -> ScriptedBackend {
        ScriptedBackend::spawn_at(Ipv4Addr::LOCALHOST.into())
    }

    /// Start it on a free port of `ip` with [`Script::default`] (in the network
    /// namespace of the calling thread).
    pub fn spawn_at(ip: IpAddr) -> ScriptedBackend {
        ScriptedBackend::spawn_on(SocketAddr::new(ip, 0))
    }

    /// Start it on `addr` (a port another backend just left, say), with
    /// [`Script::default`].
    pub fn spawn_on(addr: SocketAddr) -> ScriptedBackend {
        let ip = addr.ip();
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let port = listener.local_addr().expect("local_addr").port();
        listener.set_nonblocking(true).expect("set_nonblocking");
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let accept = thread::spawn(move || {
            while !sh.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        sh.connections.fetch_add(1, Ordering::SeqCst);
                        let sh = sh.clone();
                        thread::spawn(move || serve(s, &sh));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        ScriptedBackend {
            port,
            ip,
            shared,
            accept: Some(accept),
        }
    }

    /// `http://<ip>:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", SocketAddr::new(self.ip, self.port))
    }

    /// Answer the next requests with `script`.
    pub fn set_script(&self, script: Script) {
        *self.shared.script.lock().unwrap() = script;
    }

    /// The requests recorded since the last call (probes and keep-alive
    /// checks excluded), in the order they were read whole.
    pub fn take_received(&self) -> Vec<Received> {
        std::mem::take(&mut *self.shared.received.lock().unwrap())
    }

    /// How many health probes it answered.
    pub fn probes(&self) -> usize {
        self.shared.probes.load(Ordering::SeqCst)
    }

    /// How many connections it accepted.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptedBackend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------

/// A socket and the bytes read from it but not used yet.
struct Wire<'a> {
    s: &'a TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` used by the request being read (its raw bytes).
    used: usize,
    shared: &'a Shared,
}

enum ReadErr {
    /// The peer closed (or reset) before the request started.
    Gone,
    /// The backend is stopping.
    Stopped,
    /// Something went wrong inside a request.
    Bad(String),
}

impl Wire<'_> {
    /// Read more bytes into `buf`. Before `deadline` is set (no byte of the
    /// request yet) this waits for as long as the backend runs.
    fn fill(&mut self, deadline: Option<Instant>) -> Result<(), ReadErr> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return Err(ReadErr::Stopped);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(ReadErr::Bad(format!(
                    "timed out after {REQUEST_WITHIN:?} waiting for the rest of the request"
                )));
            }
            match (&*self.s).read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Err(ReadErr::Gone),
                Ok(0) => return Err(ReadErr::Bad("connection closed inside the request".into())),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) if self.buf.is_empty() => return Err(ReadErr::Gone),
                Err(e) => return Err(ReadErr::Bad(format!("read error inside the request: {e}"))),
            }
        }
    }

    /// The next line (without CRLF or LF) of the request.
    fn line(&mut self, deadline: Option<Instant>, max: usize) -> Result<Vec<u8>, ReadErr> {
        loop {
            if let Some(i) = self.buf[self.used..].iter().position(|&b| b == b'\n') {
                let mut line = self.buf[self.used..self.used + i].to_vec();
                self.used += i + 1;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() - self.used > max {
                return Err(ReadErr::Bad(format!("a line longer than {max} bytes")));
            }
            self.fill(deadline)?;
        }
    }

    fn exact(&mut self, n: usize, deadline: Option<Instant>) -> Result<Vec<u8>, ReadErr> {
        while self.buf.len() - self.used < n {
            self.fill(deadline)?;
        }
        let out = self.buf[self.used..self.used + n].to_vec();
        self.used += n;
        Ok(out)
    }

    /// Take the bytes of the request just read out of `buf`.
    fn take_raw(&mut self) -> Vec<u8> {
        let raw = self.buf[..self.used].to_vec();
        self.buf.drain(..self.used);
        self.used = 0;
        raw
    }
}

fn serve(s: TcpStream, shared: &Shared) {
    let _ = s.set_nodelay(true);
    // Short read timeouts so that idle connections notice `stop`.
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let mut wire = Wire {
        s: &s,
        buf: Vec::new(),
        used: 0,
        shared,
    };
    loop {
        let mut rec = Received::default();
        let mut script = Script::default();
        let res = read_request(&mut wire, &mut script, &mut rec);
        rec.raw = wire.take_raw();
        match res {
            Err(ReadErr::Gone) | Err(ReadErr::Stopped) => return,
            Err(ReadErr::Bad(problem)) => {
                rec.problem = Some(problem);
            }
            Ok(()) => {}
        }
        let scripted = rec.problem.is_some() || !(rec.is_probe() || rec.is_keepalive_check());
        let (reply, after) = if !scripted {
            if rec.is_probe() {
                shared.probes.fetch_add(1, Ordering::SeqCst);
                (PROBE_REPLY, After::KeepOpen)
            } else {
                (KEEPALIVE_REPLY, After::KeepOpen)
            }
        } else {
            let after = match script.after {
                After::KeepOpen if rec.problem.is_some() => After::Close,
                after => after,
            };
            // Recorded before the response goes out, so a client that has
            // the response can read the record.
            shared.received.lock().unwrap().push(rec);
            (&script.response[..], after)
        };
        if (&s).write_all(reply).is_err() {
            return;
        }
        if after == After::Reset {
            thread::sleep(RESET_AFTER);
            reset_on_close(&s);
            return;
        }
        if after == After::Close {
            let _ = s.shutdown(Shutdown::Write);
            // Let the peer read it all before the socket goes away.
            let deadline = Instant::now() + Duration::from_millis(500);
            let mut sink = [0u8; 4096];
            while Instant::now() < deadline && !shared.stop.load(Ordering::SeqCst) {
                match (&s).read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => break,
                }
            }
            return;
        }
    }
}

/// Make closing `s` send RST instead of FIN: `SO_LINGER` on with a zero timeout.
fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes from the pointer to a
    // live local, on a descriptor `s` owns.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt(SO_LINGER): {}",
        std::io::Error::last_os_error()
    );
}

const PROBE_REPLY: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"data\":[]}";
const KEEPALIVE_REPLY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// Read one request into `rec` (everything but `raw`).
/// `script` is set to the current script once the request's first byte is
/// in (an idle pooled connection serves the script of the request it gets).
fn read_request(
    wire: &mut Wire<'_>,
    script: &mut Script,
    rec: &mut Received,
) -> Result<(), ReadErr> {
    // The first line waits as long as the connection is idle; once it has a
    // byte, the whole request must come within REQUEST_WITHIN.
    while wire.buf.is_empty() {
        wire.fill(None)?;
    }
    *script = wire.shared.script.lock().unwrap().clone();
    let deadline = Some(Instant::now() + REQUEST_WITHIN);
    let line = wire.line(deadline, MAX_HEAD)?;
    rec.request_line = String::from_utf8_lossy(&line).into_owned();
    let mut head_len = line.len();
    loop {
        let line = wire.line(deadline, MAX_HEAD)?;
        head_len += line.len() + 2;
        if head_len > MAX_HEAD {
            return Err(ReadErr::Bad(format!("request head over {MAX_HEAD} bytes")));
        }
        if line.is_empty() {
            break;
        }
        rec.headers.push(parse_field(&line));
    }

    let expects = rec
        .header_all("expect")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("100-continue"));
    let framing = request_framing(rec);
    let has_body = !matches!(framing, Ok(Framing::None) | Ok(Framing::Length(0)));
    if expects && has_body && script.expect == Continue::Send {
        rec.sent_continue = true;
        (&*wire.s)
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|e| ReadErr::Bad(format!("writing 100 Continue: {e}")))?;
    }
    match framing {
        Err(problem) => {
            rec.framing = "invalid".into();
            Err(ReadErr::Bad(problem))
        }
        Ok(Framing::None) => {
            rec.framing = "none".into();
            Ok(())
        }
        Ok(Framing::Length(n)) => {
            rec.framing = format!("content-length {n}");
            rec.body = wire.exact(n, deadline)?;
            Ok(())
        }
        Ok(Framing::Chunked) => {
            rec.framing = "chunked".into();
            read_chunked(wire, deadline, rec)
        }
    }
}

fn parse_field(line: &[u8]) -> (String, String) {
    if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return (
            "<obs-fold>".into(),
            String::from_utf8_lossy(line).into_owned(),
        );
    }
    match line.iter().position(|&b| b == b':') {
        Some(i) => (
            String::from_utf8_lossy(&line[..i]).into_owned(),
            String::from_utf8_lossy(&line[i + 1..])
                .trim_matches([' ', '\t'])
                .to_string(),
        ),
        None => (
            "<no colon>".into(),
            String::from_utf8_lossy(line).into_owned(),
        ),
    }
}

enum Framing {
    None,
    Length(usize),
    Chunked,
}

/// How a request body is framed (RFC 9112 §6.3, as a strict server reads it).
fn request_framing(rec: &Received) -> Result<Framing, String> {
    let te = rec.header_all("transfer-encoding");
    let cl = rec.header_all("content-length");
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err("both Transfer-Encoding and Content-Length".into());
        }
        let codings: Vec<String> = te
            .iter()
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect();
        return if codings == ["chunked"] {
            Ok(Framing::Chunked)
        } else {
            Err(format!("Transfer-Encoding {codings:?} is not just chunked"))
        };
    }
    let mut len = None;
    for v in cl.iter().flat_map(|v| v.split(',')) {
        let v = v.trim();
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid Content-Length {v:?}"));
        }
        let n: usize = v
            .parse()
            .map_err(|_| format!("Content-Length {v:?} too large"))?;
        if len.is_some_and(|l| l != n) {
            return Err("differing Content-Length values".into());
        }
        len = Some(n);
    }
    Ok(len.map_or(Framing::None, Framing::Length))
}

fn read_chunked(
    wire: &mut Wire<'_>,
    deadline: Option<Instant>,
    rec: &mut Received,
) -> Result<(), ReadErr> {
    for _ in 0..1_000_000 {
        let line = wire.line(deadline, 4096)?;
        let text = String::from_utf8_lossy(&line);
        let hex = text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16)
            .map_err(|_| ReadErr::Bad(format!("bad chunk size line {text:?}")))?;
        if size == 0 {
            loop {
                let line = wire.line(deadline, 64 * 1024)?;
                if line.is_empty() {
                    return Ok(());
                }
                rec.trailers.push(parse_field(&line));
            }
        }
        let data = wire.exact(size, deadline)?;
        rec.body.extend_from_slice(&data);
        if wire.exact(2, deadline)? != b"\r\n" {
            return Err(ReadErr::Bad("no CRLF after a chunk".into()));
        }
    }
    Err(ReadErr::Bad("more than a million chunks".into()))
}
