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

pub(crate) use lb_core::http1::Dechunk;
