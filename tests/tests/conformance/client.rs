//! The client side of a case: a raw request on a fresh connection, the
//! response read as a strict HTTP/1.1 client reads it, then a second request
//! that tells whether `lb` kept the connection open.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use lb_tests::KEEPALIVE_PATH;

use crate::cases::Case;
use crate::transcript::show_bytes;
use crate::HOST;

/// How long a client waits for a (final) response head, and then for its body.
const RESPONSE_WITHIN: Duration = Duration::from_secs(5);
/// How long a client that sent `Expect: 100-continue` waits for a `100`
/// before it sends the body anyway (as curl does, after 1 s).
const CONTINUE_WAIT: Duration = Duration::from_millis(1500);
/// How long the second request (the keep-alive check) may take.
const SECOND_WITHIN: Duration = Duration::from_secs(3);
/// The longest response head the client reads.
const MAX_HEAD: usize = 1 << 20;

// ---------------------------------------------------------------------------
// What the client saw
// ---------------------------------------------------------------------------

/// A response head as the client read it.
#[derive(Clone, Debug)]
pub(crate) struct Message {
    pub(crate) status: u16,
    /// The status line as sent (shown, not compared).
    pub(crate) line: String,
    pub(crate) headers: Vec<(String, String)>,
}

impl Message {
    pub(crate) fn values(&self, name: &str) -> Vec<&str> {
        values(&self.headers, name)
    }
}

pub(crate) fn values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Whether the client connection was still usable after the exchange.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ConnState {
    /// A second request on it was answered.
    Open,
    /// `lb` closed it (EOF or reset).
    Closed,
    /// Neither: what happened instead.
    Unclear(String),
}

/// What the client saw.
#[derive(Clone, Debug)]
pub(crate) struct ClientSide {
    pub(crate) interim: Vec<Message>,
    pub(crate) response: Option<Message>,
    pub(crate) body: Vec<u8>,
    pub(crate) trailers: Vec<(String, String)>,
    /// How the body ended: `none`, `content-length`, `chunked`,
    /// `close-delimited`, or what went wrong.
    pub(crate) body_end: String,
    pub(crate) conn: ConnState,
    /// Things worth comparing that are none of the above.
    pub(crate) notes: Vec<String>,
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/// Why a read stopped.
#[derive(Debug)]
pub(crate) enum Stop {
    /// EOF or a reset.
    Closed,
    Timeout,
    Invalid(String),
}

/// A client socket and the bytes read from it but not used yet.
pub(crate) struct Reader {
    pub(crate) s: TcpStream,
    pub(crate) buf: Vec<u8>,
    pub(crate) pos: usize,
    pub(crate) closed: bool,
}

impl Reader {
    pub(crate) fn fill(&mut self, deadline: Instant) -> Result<(), Stop> {
        if self.closed {
            return Err(Stop::Closed);
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Stop::Timeout);
            }
            self.s
                .set_read_timeout(Some(deadline - now))
                .map_err(|e| Stop::Invalid(format!("set_read_timeout: {e}")))?;
            match self.s.read(&mut chunk) {
                Ok(0) => {
                    self.closed = true;
                    return Err(Stop::Closed);
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    return Err(Stop::Closed);
                }
            }
        }
    }

    pub(crate) fn rest(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    pub(crate) fn line(&mut self, deadline: Instant) -> Result<Vec<u8>, Stop> {
        loop {
            if let Some(i) = self.rest().windows(2).position(|w| w == b"\r\n") {
                let line = self.rest()[..i].to_vec();
                self.pos += i + 2;
                return Ok(line);
            }
            if self.rest().len() > MAX_HEAD {
                return Err(Stop::Invalid("a line over 1 MiB".into()));
            }
            self.fill(deadline)?;
        }
    }

    pub(crate) fn exact(&mut self, n: usize, deadline: Instant) -> Result<Vec<u8>, Stop> {
        while self.rest().len() < n {
            self.fill(deadline)?;
        }
        let out = self.rest()[..n].to_vec();
        self.pos += n;
        Ok(out)
    }

    /// The next response head; nothing is consumed unless it is whole.
    pub(crate) fn head(&mut self, deadline: Instant) -> Result<Message, Stop> {
        let end = loop {
            if let Some(i) = self.rest().windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if self.rest().len() > MAX_HEAD {
                return Err(Stop::Invalid("a response head over 1 MiB".into()));
            }
            self.fill(deadline)?;
        };
        let head = String::from_utf8_lossy(&self.rest()[..end]).into_owned();
        self.pos += end + 4;
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap_or("").to_string();
        let mut parts = line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        let status = parts.next().and_then(|s| s.parse::<u16>().ok());
        let Some(status) = status.filter(|_| version.starts_with("HTTP/1.")) else {
            return Err(Stop::Invalid(format!(
                "bad status line {}",
                show_bytes(line.as_bytes(), 60)
            )));
        };
        let headers = lines
            .map(|l| match l.split_once(':') {
                Some((k, v)) => (k.to_string(), v.trim_matches([' ', '\t']).to_string()),
                None => ("<no colon>".to_string(), l.to_string()),
            })
            .collect();
        Ok(Message {
            status,
            line,
            headers,
        })
    }
}

pub(crate) fn write_all(s: &TcpStream, data: &[u8]) -> bool {
    let mut s = s;
    s.write_all(data).is_ok()
}

/// The method of a raw request (its first word).
pub(crate) fn method_of(request: &[u8]) -> String {
    let end = request
        .iter()
        .position(|b| *b == b' ' || *b == b'\r')
        .unwrap_or(request.len());
    String::from_utf8_lossy(&request[..end]).into_owned()
}

/// Run one case's client side against `lb` on `port`.
pub(crate) fn exchange(port: u16, case: &Case) -> ClientSide {
    let mut c = ClientSide {
        interim: Vec::new(),
        response: None,
        body: Vec::new(),
        trailers: Vec::new(),
        body_end: String::new(),
        conn: ConnState::Unclear("not checked".into()),
        notes: Vec::new(),
    };
    let s = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => {
            c.conn = ConnState::Unclear(format!("could not connect: {e}"));
            return c;
        }
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(RESPONSE_WITHIN));
    // lb may answer and close before it has read a long request: a failed
    // write is not an outcome on its own (what comes back is).
    let _ = write_all(&s, &case.request);
    let mut r = Reader {
        s,
        buf: Vec::new(),
        pos: 0,
        closed: false,
    };
    let mut pending_body = case.body_after_100.clone();
    let response = loop {
        let wait = if pending_body.is_some() {
            CONTINUE_WAIT
        } else {
            RESPONSE_WITHIN
        };
        match r.head(Instant::now() + wait) {
            Ok(m) if (100..200).contains(&m.status) && m.status != 101 => {
                if m.status == 100 {
                    if let Some(b) = pending_body.take() {
                        let _ = write_all(&r.s, &b);
                    }
                }
                c.interim.push(m);
            }
            Ok(m) => break m,
            Err(Stop::Timeout) if pending_body.is_some() => {
                c.notes.push(format!(
                    "no 100 Continue within {CONTINUE_WAIT:?}: the client sent the body anyway"
                ));
                let b = pending_body.take().unwrap_or_default();
                let _ = write_all(&r.s, &b);
            }
            Err(Stop::Timeout) => {
                note_partial(&mut c, &r);
                c.conn = ConnState::Unclear(format!(
                    "no response within {RESPONSE_WITHIN:?}, connection still open"
                ));
                return c;
            }
            Err(Stop::Closed) => {
                note_partial(&mut c, &r);
                c.conn = ConnState::Closed;
                return c;
            }
            Err(Stop::Invalid(e)) => {
                c.notes.push(format!("unreadable response: {e}"));
                c.conn = ConnState::Unclear("after an unreadable response".into());
                return c;
            }
        }
    };
    let status = response.status;
    let framing = body_framing(&case.method, &response);
    c.response = Some(response);
    let deadline = Instant::now() + RESPONSE_WITHIN;
    let res = match framing {
        Framing::None => Ok("none".to_string()),
        Framing::Length(n) => r.exact(n, deadline).map(|b| {
            c.body = b;
            "content-length".to_string()
        }),
        Framing::Chunked => read_chunked(&mut r, deadline, &mut c),
        Framing::Close => loop {
            match r.fill(deadline) {
                Ok(()) => {}
                Err(Stop::Closed) => {
                    c.body = r.rest().to_vec();
                    r.pos = r.buf.len();
                    break Ok("close-delimited".to_string());
                }
                Err(e) => {
                    c.body = r.rest().to_vec();
                    r.pos = r.buf.len();
                    break Err(e);
                }
            }
        },
    };
    c.body_end = match res {
        Ok(end) => end,
        Err(Stop::Closed) => "cut: closed inside the body".into(),
        Err(Stop::Timeout) => format!("cut: body incomplete after {RESPONSE_WITHIN:?}"),
        Err(Stop::Invalid(e)) => format!("cut: {e}"),
    };
    if status == 101 {
        c.conn = ConnState::Unclear("switched protocols (101)".into());
        return c;
    }
    if r.closed {
        c.conn = ConnState::Closed;
        return c;
    }
    if !r.rest().is_empty() {
        c.notes.push(format!(
            "bytes after the response: {}",
            show_bytes(r.rest(), 60)
        ));
        r.pos = r.buf.len();
    }
    // The keep-alive check: a second request on the same connection.
    let second = format!("GET {KEEPALIVE_PATH} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    if !write_all(&r.s, second.as_bytes()) {
        c.conn = ConnState::Closed;
        return c;
    }
    c.conn = match r.head(Instant::now() + SECOND_WITHIN) {
        Ok(m) if m.status == 200 => ConnState::Open,
        Ok(m) => ConnState::Unclear(format!("a second request got {}", m.status)),
        Err(Stop::Closed) => ConnState::Closed,
        Err(Stop::Timeout) => ConnState::Unclear(format!(
            "open, but a second request got no answer within {SECOND_WITHIN:?}"
        )),
        Err(Stop::Invalid(e)) => ConnState::Unclear(format!("a second request got garbage: {e}")),
    };
    c
}

/// Bytes that came but are not a whole response head.
fn note_partial(c: &mut ClientSide, r: &Reader) {
    if !r.rest().is_empty() {
        c.notes.push(format!(
            "{} bytes that are not a whole response head: {}",
            r.rest().len(),
            show_bytes(r.rest(), 60)
        ));
    }
}

pub(crate) enum Framing {
    None,
    Length(usize),
    Chunked,
    Close,
}

/// How the body of `resp` (to a request with `method`) is framed, as a
/// strict client reads it (RFC 9112 §6.3).
pub(crate) fn body_framing(method: &str, resp: &Message) -> Framing {
    if method == "HEAD" || resp.status == 204 || resp.status == 304 || resp.status == 101 {
        return Framing::None;
    }
    let te = resp.values("transfer-encoding");
    if !te.is_empty() {
        let last = te
            .iter()
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .rfind(|c| !c.is_empty());
        return if last.as_deref() == Some("chunked") {
            Framing::Chunked
        } else {
            Framing::Close
        };
    }
    let cl = resp.values("content-length");
    let lens: Vec<Option<usize>> = cl
        .iter()
        .flat_map(|v| v.split(','))
        .map(|v| v.trim())
        .map(|v| {
            v.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| v.parse().ok())
                .flatten()
        })
        .collect();
    match lens.first() {
        Some(Some(n)) if lens.iter().all(|l| *l == Some(*n)) => Framing::Length(*n),
        _ => Framing::Close,
    }
}

pub(crate) fn read_chunked(
    r: &mut Reader,
    deadline: Instant,
    c: &mut ClientSide,
) -> Result<String, Stop> {
    for _ in 0..1_000_000 {
        let line = r.line(deadline)?;
        let text = String::from_utf8_lossy(&line).into_owned();
        let hex = text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16)
            .map_err(|_| Stop::Invalid(format!("bad chunk size line {text:?}")))?;
        if size == 0 {
            loop {
                let line = r.line(deadline)?;
                if line.is_empty() {
                    return Ok("chunked".into());
                }
                let l = String::from_utf8_lossy(&line).into_owned();
                c.trailers.push(match l.split_once(':') {
                    Some((k, v)) => (k.to_string(), v.trim().to_string()),
                    None => ("<no colon>".into(), l),
                });
            }
        }
        let data = r.exact(size, deadline)?;
        c.body.extend_from_slice(&data);
        if r.exact(2, deadline)? != b"\r\n" {
            return Err(Stop::Invalid("no CRLF after a chunk".into()));
        }
    }
    Err(Stop::Invalid("more than a million chunks".into()))
}
