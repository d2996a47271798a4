//! `--log-to`: bodies copied as they stream into a per-request [`Capture`]; a finished
//! capture goes to a writer thread through a bounded channel, so a slow disk never blocks
//! the proxy (records that do not fit are counted, and the count is logged). The lines
//! themselves are `lb_core::reqlog`'s, the same in both builds.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lb_core::http1::BodyKind;
use lb_core::reqlog::{dropped_line, Record};

/// Records waiting for the writer; beyond this they are dropped and counted.
const BACKLOG: usize = 1024;

/// A capture whose exchange is over, on its way to the writer.
struct Done {
    time_unix_ms: u64,
    duration_ms: u64,
    state: State,
}

/// Where captures go: the writer thread's channel.
pub(crate) struct RequestLog {
    tx: SyncSender<Done>,
    dropped: Arc<AtomicU64>,
    limit: u64,
}

impl RequestLog {
    /// Opens (creates with mode 0640, appends) the file and starts the writer thread.
    pub(crate) fn open(path: &Path, limit: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)?;
        let (tx, rx) = sync_channel(BACKLOG);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        std::thread::Builder::new()
            .name("lb-request-log".into())
            .spawn(move || write_loop(rx, BufWriter::new(file), counter))?;
        Ok(RequestLog { tx, dropped, limit })
    }

    /// A capture for one request; it is logged when it is dropped.
    pub(crate) fn capture(self: &Arc<Self>, method: &str, path: &str) -> Capture {
        Capture {
            log: self.clone(),
            started: Instant::now(),
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            state: Mutex::new(State {
                method: method.to_string(),
                path: path.to_string(),
                ..State::default()
            }),
        }
    }
}

fn write_loop(rx: Receiver<Done>, mut out: BufWriter<std::fs::File>, dropped: Arc<AtomicU64>) {
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(d) = next {
            let lost = dropped.swap(0, Ordering::Relaxed);
            if lost > 0 {
                let _ = out.write_all(dropped_line(d.time_unix_ms, lost).as_bytes());
            }
            let s = &d.state;
            let record = Record {
                time_unix_ms: d.time_unix_ms,
                duration_ms: d.duration_ms,
                method: &s.method,
                path: &s.path,
                status: s.status,
                backend: s.backend.as_deref(),
                request: &s.request,
                request_truncated: s.request_truncated,
                response: &s.response,
                response_truncated: s.response_truncated,
            };
            let _ = out.write_all(record.to_line().as_bytes());
            next = rx.try_recv().ok();
        }
        // Flush whenever the backlog is empty: lines appear promptly, writes stay batched.
        let _ = out.flush();
    }
}

#[derive(Default)]
struct State {
    method: String,
    path: String,
    status: u16,
    backend: Option<Arc<str>>,
    request: Vec<u8>,
    request_truncated: bool,
    response: Vec<u8>,
    response_truncated: bool,
}

/// One request's record in the making. The exchange's request and response halves run
/// concurrently and each append through a shared reference (hence the uncontended lock).
/// Dropping it hands the record to the writer.
pub(crate) struct Capture {
    log: Arc<RequestLog>,
    started: Instant,
    time_unix_ms: u64,
    state: Mutex<State>,
}

impl Capture {
    fn with(&self, f: impl FnOnce(&mut State, u64)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s, self.log.limit);
    }

    fn request(&self, data: &[u8]) {
        self.with(|s, limit| append(&mut s.request, &mut s.request_truncated, data, limit));
    }

    fn response(&self, data: &[u8]) {
        self.with(|s, limit| append(&mut s.response, &mut s.response_truncated, data, limit));
    }

    pub(crate) fn status(&self, status: u16) {
        self.with(|s, _| s.status = status);
    }

    pub(crate) fn backend(&self, url: Arc<str>) {
        self.with(|s, _| s.backend = Some(url));
    }

    /// A reply the proxy made itself: its status, and its body as the response.
    pub(crate) fn reply(&self, reply: &lb_core::reply::Reply) {
        self.with(|s, limit| {
            s.status = reply.status;
            s.response.clear();
            s.response_truncated = false;
            let body = reply.body.as_bytes();
            append(&mut s.response, &mut s.response_truncated, body, limit);
        });
    }
}

fn append(buf: &mut Vec<u8>, truncated: &mut bool, data: &[u8], limit: u64) {
    let room = usize::try_from(limit.saturating_sub(buf.len() as u64)).unwrap_or(usize::MAX);
    if data.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

impl Drop for Capture {
    fn drop(&mut self) {
        let state = std::mem::take(self.state.get_mut().unwrap_or_else(|p| p.into_inner()));
        let done = Done {
            time_unix_ms: self.time_unix_ms,
            duration_ms: self.started.elapsed().as_millis() as u64,
            state,
        };
        if let Err(TrySendError::Full(_)) = self.log.tx.try_send(done) {
            self.log.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Which body a [`Tap`] copies.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    Request,
    Response,
}

/// Copies one body into a capture as its bytes pass, as the backend or client reads it:
/// the data of a chunked body, without its framing.
pub(crate) struct Tap<'a> {
    capture: &'a Capture,
    side: Side,
    chunks: Option<Dechunk>,
}

impl<'a> Tap<'a> {
    /// A tap for a body framed as `kind` (the framing as forwarded, verbatim).
    pub(crate) fn new(capture: Option<&'a Capture>, side: Side, kind: BodyKind) -> Option<Self> {
        Some(Tap {
            capture: capture?,
            side,
            chunks: matches!(kind, BodyKind::Chunked).then(Dechunk::default),
        })
    }

    /// Copies the data in `wire`: bytes of the body as framed, already accepted by the
    /// body's `BodyFramer` (so well-formed).
    pub(crate) fn feed(&mut self, wire: &[u8]) {
        let (capture, side) = (self.capture, self.side);
        let copy = |data: &[u8]| match side {
            Side::Request => capture.request(data),
            Side::Response => capture.response(data),
        };
        match &mut self.chunks {
            Some(d) => d.feed(wire, copy),
            None if wire.is_empty() => {}
            None => copy(wire),
        }
    }
}

/// The data of a chunked body, from bytes `lb_core::http1::BodyFramer` has accepted.
///
/// The core's framer delimits bodies without decoding them (the proxy forwards them
/// verbatim), so the request log and content-based routing take the chunks' data out
/// here. Validation is the framer's: this only needs to tell size lines, data, line ends
/// and trailers apart in input known to be well-formed.
#[derive(Default)]
pub(crate) struct Dechunk {
    state: Chunk,
}

#[derive(Clone, Copy)]
enum Chunk {
    /// Reading the hex size (this much so far).
    Size { size: u64 },
    /// Past the size (extensions, CR) up to LF.
    Line { size: u64 },
    /// In the chunk's data.
    Data { left: u64 },
    /// After the data, up to LF.
    DataEnd,
    /// The last chunk was read: trailers and the end, nothing more of interest.
    Trailers,
}

impl Default for Chunk {
    fn default() -> Self {
        Chunk::Size { size: 0 }
    }
}

impl Dechunk {
    /// Feeds wire bytes; calls `data` with each run of data bytes in them.
    pub(crate) fn feed(&mut self, wire: &[u8], mut data: impl FnMut(&[u8])) {
        let mut pos = 0;
        while pos < wire.len() {
            let b = wire[pos];
            self.state = match self.state {
                Chunk::Size { size } => match (b as char).to_digit(16) {
                    Some(d) => {
                        pos += 1;
                        Chunk::Size {
                            size: size.wrapping_shl(4) | u64::from(d),
                        }
                    }
                    None => Chunk::Line { size },
                },
                Chunk::Line { size } => {
                    pos += 1;
                    match b {
                        b'\n' if size == 0 => Chunk::Trailers,
                        b'\n' => Chunk::Data { left: size },
                        _ => Chunk::Line { size },
                    }
                }
                Chunk::Data { left } => {
                    let n =
                        usize::try_from(left).map_or(wire.len() - pos, |l| l.min(wire.len() - pos));
                    data(&wire[pos..pos + n]);
                    pos += n;
                    match left - n as u64 {
                        0 => Chunk::DataEnd,
                        left => Chunk::Data { left },
                    }
                }
                Chunk::DataEnd => {
                    pos += 1;
                    match b {
                        b'\n' => Chunk::Size { size: 0 },
                        _ => Chunk::DataEnd,
                    }
                }
                Chunk::Trailers => return,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(wire: &[u8], split: usize) -> Vec<u8> {
        let mut d = Dechunk::default();
        let mut out = Vec::new();
        let (a, b) = wire.split_at(split);
        d.feed(a, |x| out.extend_from_slice(x));
        d.feed(b, |x| out.extend_from_slice(x));
        out
    }

    #[test]
    fn chunked_data_whatever_the_split() {
        let wire = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\n";
        for split in 0..=wire.len() {
            assert_eq!(
                decode(wire, split),
                b"helloabcdefghijklmnopqrstuvwxyz",
                "split at {split}"
            );
        }
    }

    #[test]
    fn bytes_after_the_last_chunk_are_not_data() {
        assert_eq!(decode(b"3\r\nabc\r\n0\r\n\r\n", 4), b"abc");
    }
}
