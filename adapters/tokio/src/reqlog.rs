//! `--log-to`: bodies copied as they stream into a per-request capture; completed
//! captures go to a writer thread through a bounded channel, so a slow disk never blocks
//! the proxy (records that do not fit are counted, and the count is logged).

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lb_core::reqlog::{dropped_line, Entry};

/// Records waiting for the writer; beyond this they are dropped and counted.
const BACKLOG: usize = 1024;

/// The handle the proxy keeps: where captures go.
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

    /// A capture for one request; it is logged when its last holder drops it.
    pub(crate) fn capture(self: &Arc<Self>, method: &str, path: &str) -> Arc<Capture> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Arc::new(Capture {
            log: self.clone(),
            started: Instant::now(),
            entry: Mutex::new(Entry::new(now, method, path)),
        })
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

/// One request's record in the making, shared by the handler, the request body and the
/// response body.
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

    pub(crate) fn request(&self, data: &[u8]) {
        self.with(|e, limit| e.add_request(data, limit));
    }

    pub(crate) fn response(&self, data: &[u8]) {
        self.with(|e, limit| e.add_response(data, limit));
    }

    pub(crate) fn status(&self, status: u16) {
        self.with(|e, _| e.status = status);
    }

    pub(crate) fn backend(&self, url: Arc<str>) {
        self.with(|e, _| e.backend = Some(url));
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
