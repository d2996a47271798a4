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
use lb_core::reqlog::{dropped_line, Entry};

/// Records waiting for the writer; beyond this they are dropped and counted.
const BACKLOG: usize = 1024;

/// Where captures go: the writer thread's channel.
pub(crate) struct RequestLog {
    tx: SyncSender<Entry>,
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
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Capture {
            log: self.clone(),
            started: Instant::now(),
            entry: Mutex::new(Entry::new(now, method, path)),
        }
    }
}

fn write_loop(rx: Receiver<Entry>, mut out: BufWriter<std::fs::File>, dropped: Arc<AtomicU64>) {
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(e) = next {
            let lost = dropped.swap(0, Ordering::Relaxed);
            if lost > 0 {
                let _ = out.write_all(dropped_line(e.time_unix_ms, lost).as_bytes());
            }
            let _ = out.write_all(e.record().to_line().as_bytes());
            next = rx.try_recv().ok();
        }
        // Flush whenever the backlog is empty: lines appear promptly, writes stay batched.
        let _ = out.flush();
    }
}

/// One request's record in the making. The exchange's request and response halves run
/// concurrently and each append through a shared reference (hence the uncontended lock).
/// Dropping it hands the record to the writer.
pub(crate) struct Capture {
    log: Arc<RequestLog>,
    started: Instant,
    entry: Mutex<Entry>,
}

impl Capture {
    fn with(&self, f: impl FnOnce(&mut Entry, u64)) {
        let mut e = self.entry.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut e, self.log.limit);
    }

    fn request(&self, data: &[u8]) {
        self.with(|e, limit| e.add_request(data, limit));
    }

    fn response(&self, data: &[u8]) {
        self.with(|e, limit| e.add_response(data, limit));
    }

    pub(crate) fn status(&self, status: u16) {
        self.with(|e, _| e.status = status);
    }

    pub(crate) fn backend(&self, url: Arc<str>) {
        self.with(|e, _| e.backend = Some(url));
    }

    /// A reply the proxy made itself: its status, and its body as the response.
    pub(crate) fn reply(&self, reply: &lb_core::reply::Reply) {
        self.with(|e, limit| e.set_reply(reply.status, reply.body.as_bytes(), limit));
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let mut entry = std::mem::take(self.entry.get_mut().unwrap_or_else(|p| p.into_inner()));
        entry.duration_ms = self.started.elapsed().as_millis() as u64;
        if let Err(TrySendError::Full(_)) = self.log.tx.try_send(entry) {
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
