//! `--log-to`'s and `--access-log`'s writer: the file and the thread that writes it,
//! shared by both builds.
//!
//! The proxy hands each finished entry to [`open`]'s sink, which only queues it for the
//! writer thread, so a slow disk never blocks a request. The queue is bounded in bytes
//! ([`BACKLOG_BYTES`], each entry counted by its [`Entry::footprint`]), so the memory it
//! takes depends neither on how far the writer is behind nor on how many entries wait:
//! entries that do not fit are dropped and counted, and the count is written as a line
//! of its own before the next entry. When the proxy has stopped, [`Writer::finish`]
//! waits until what was queued is on disk, so the requests a graceful shutdown lets
//! finish are logged too.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lb_proxy::reqlog::{dropped_line, Entry, EntrySink};

/// The most bytes of entries waiting for the writer (16 MiB: 256 entries with both bodies
/// at the default 64 KiB cap, tens of thousands of small ones); beyond it entries are
/// dropped and counted. An entry larger than this on its own still goes into an empty
/// queue, so a `--log-body-limit` above 8 MiB logs as long as the writer keeps up.
pub(crate) const BACKLOG_BYTES: usize = 16 << 20;

enum Msg {
    /// An entry, and the bytes it counts for in the backlog.
    Entry(Entry, usize),
    /// A finished line (the access log), and the bytes it counts for.
    Line(String, usize),
    /// Write out everything before this, then answer.
    Flush(SyncSender<()>),
    /// Reopen the file (SIGHUP: it was rotated).
    Reopen,
}

/// The bytes of the entries queued for the writer, held under a bound.
struct Backlog {
    queued: AtomicUsize,
    bound: usize,
}

impl Backlog {
    /// Counts `size` more bytes in, unless that would pass the bound (into an empty
    /// backlog, anything goes). Whether it did.
    fn admit(&self, size: usize) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q == 0 || q.saturating_add(size) <= self.bound).then(|| q.saturating_add(size))
            })
            .is_ok()
    }

    /// `size` bytes left the backlog (written, or never sent).
    fn release(&self, size: usize) {
        self.queued.fetch_sub(size, Ordering::AcqRel);
    }
}

/// The writer thread's handle, kept by whoever stops the proxy.
pub(crate) struct Writer {
    tx: Sender<Msg>,
    backlog: Arc<Backlog>,
    dropped: Arc<AtomicU64>,
}

impl Writer {
    /// Waits, at most `limit`, until every entry queued so far is written and flushed (and
    /// the count of dropped ones, if any). Whether it got there in time.
    #[cfg(test)]
    pub(crate) fn finish(self, limit: Duration) -> bool {
        self.flush(limit)
    }

    /// Waits, at most `limit`, until every entry queued so far is written and flushed.
    pub(crate) fn flush(&self, limit: Duration) -> bool {
        let (ack, done) = sync_channel(1);
        self.tx.send(Msg::Flush(ack)).is_ok() && done.recv_timeout(limit).is_ok()
    }

    /// Reopens the file after what is queued now is written (log rotation: the old file
    /// was renamed; a new one is created with the same mode).
    pub(crate) fn reopen(&self) {
        let _ = self.tx.send(Msg::Reopen);
    }

    /// Bytes of entries queued now.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.backlog.queued.load(Ordering::Acquire)
    }
}

/// Opens `path` (created with mode 0640, appended to), starts the writer thread and
/// returns the sink that feeds it, and the writer's handle.
pub(crate) fn open(path: &Path) -> io::Result<(EntrySink, Writer)> {
    let file = open_file(path)?;
    let path = path.to_path_buf();
    let reopen = Box::new(move || open_file(&path).map(|f| Box::new(f) as Box<dyn Write + Send>));
    let (tx, writer) = spawn(Box::new(file), Some(reopen), BACKLOG_BYTES)?;
    Ok((entry_sink(tx, &writer), writer))
}

/// Opens `--access-log`'s `path` (`-`: stdout), starts its writer thread and returns the
/// sink for its lines, and the writer's handle.
pub(crate) fn open_lines(path: &Path) -> io::Result<(lb_proxy::LineSink, Writer)> {
    let (out, reopen): (Box<dyn Write + Send>, Option<Reopen>) = if path == Path::new("-") {
        (Box::new(io::stdout()), None)
    } else {
        let p = path.to_path_buf();
        (
            Box::new(open_file(path)?),
            Some(Box::new(move || {
                open_file(&p).map(|f| Box::new(f) as Box<dyn Write + Send>)
            })),
        )
    };
    let (tx, writer) = spawn(out, reopen, BACKLOG_BYTES)?;
    let backlog = writer.backlog.clone();
    let dropped = writer.dropped.clone();
    let sink: lb_proxy::LineSink = Arc::new(move |line: String| {
        let size = line.len() + lb_proxy::reqlog::ENTRY_OVERHEAD;
        if !backlog.admit(size) {
            dropped.fetch_add(1, Ordering::Relaxed);
        } else if tx.send(Msg::Line(line, size)).is_err() {
            backlog.release(size);
        }
    });
    Ok((sink, writer))
}

fn open_file(path: &Path) -> io::Result<BufWriter<std::fs::File>> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    Ok(BufWriter::new(file))
}

/// Makes the output anew (SIGHUP).
type Reopen = Box<dyn FnMut() -> io::Result<Box<dyn Write + Send>> + Send>;

/// Starts the writer thread on `out`, its backlog bounded at `bound` bytes.
#[cfg(test)]
fn start(out: impl Write + Send + 'static, bound: usize) -> io::Result<(EntrySink, Writer)> {
    let (tx, writer) = spawn(Box::new(out), None, bound)?;
    Ok((entry_sink(tx, &writer), writer))
}

/// The sink for `--log-to`'s entries.
fn entry_sink(tx: Sender<Msg>, writer: &Writer) -> EntrySink {
    let backlog = writer.backlog.clone();
    let dropped = writer.dropped.clone();
    Arc::new(move |mut entry: Entry, started: Instant| {
        let took = started.elapsed();
        entry.duration_ms = took.as_millis() as u64;
        entry.time_unix_ms = SystemTime::now().checked_sub(took).map_or(0, unix_ms);
        let size = entry.footprint();
        if !backlog.admit(size) {
            dropped.fetch_add(1, Ordering::Relaxed);
        } else if tx.send(Msg::Entry(entry, size)).is_err() {
            // The writer is gone (it never is before the process ends).
            backlog.release(size);
        }
    })
}

/// Starts the writer thread; returns the channel to it and its handle.
fn spawn(
    out: Box<dyn Write + Send>,
    reopen: Option<Reopen>,
    bound: usize,
) -> io::Result<(Sender<Msg>, Writer)> {
    let (tx, rx) = channel();
    let backlog = Arc::new(Backlog {
        queued: AtomicUsize::new(0),
        bound,
    });
    let dropped = Arc::new(AtomicU64::new(0));
    let (counter, drained) = (dropped.clone(), backlog.clone());
    std::thread::Builder::new()
        .name("lb-log-writer".into())
        .spawn(move || write_loop(rx, out, reopen, counter, &drained))?;
    let writer = Writer {
        tx: tx.clone(),
        backlog,
        dropped,
    };
    Ok((tx, writer))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn write_loop(
    rx: Receiver<Msg>,
    mut out: Box<dyn Write + Send>,
    mut reopen: Option<Reopen>,
    dropped: Arc<AtomicU64>,
    backlog: &Backlog,
) {
    let write_dropped = |out: &mut dyn Write, time_unix_ms: u64| {
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let _ = out.write_all(dropped_line(time_unix_ms, lost).as_bytes());
        }
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Entry(e, size) => {
                    write_dropped(&mut out, e.time_unix_ms);
                    let _ = out.write_all(e.record().to_line().as_bytes());
                    drop(e);
                    backlog.release(size);
                }
                Msg::Line(line, size) => {
                    write_dropped(&mut out, unix_ms(SystemTime::now()));
                    let _ = out.write_all(line.as_bytes());
                    backlog.release(size);
                }
                Msg::Flush(ack) => {
                    write_dropped(&mut out, unix_ms(SystemTime::now()));
                    let _ = out.flush();
                    let _ = ack.send(());
                }
                Msg::Reopen => {
                    let _ = out.flush();
                    // A file that cannot be reopened keeps the old one (still open).
                    if let Some(Ok(new)) = reopen.as_mut().map(|r| r()) {
                        out = new;
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        // Flush whenever the backlog is empty: lines appear promptly, writes stay batched.
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_proxy::reqlog::RequestLog;
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    /// An output that blocks every write until opened, and keeps what it was given.
    #[derive(Clone, Default)]
    struct Gated(Arc<Gate>);

    #[derive(Default)]
    struct Gate {
        state: Mutex<(bool, Vec<u8>)>,
        opened: Condvar,
    }

    impl Gated {
        fn open(&self) {
            self.0.state.lock().unwrap().0 = true;
            self.0.opened.notify_all();
        }

        fn lines(&self) -> Vec<serde_json::Value> {
            let text = self.0.state.lock().unwrap().1.clone();
            String::from_utf8(text)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut state = self.0.state.lock().unwrap();
            while !state.0 {
                state = self.0.opened.wait(state).unwrap();
            }
            state.1.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_writer_drops_and_counts_past_the_byte_bound() {
        const BOUND: usize = 1 << 20;
        let out = Gated::default();
        let (sink, writer) = start(out.clone(), BOUND).unwrap();
        let log = RequestLog::new(sink, 1 << 20);
        let body = vec![b'x'; 100 << 10];
        let one = {
            let mut e = Entry::new(0, "POST", "/upload");
            e.add_request(&body, 1 << 20);
            e.footprint()
        };
        // The writer takes the first entry and blocks writing it; it still counts
        // until written, so exactly `fits` entries are queued.
        let fits = BOUND / one;
        let sent = fits + 25;
        for _ in 0..sent {
            let capture = log.capture(Instant::now(), "POST", "/upload", "r1");
            capture.request(&body);
        }
        assert_eq!(writer.queued(), fits * one);
        out.open();
        assert!(writer.flush(Duration::from_secs(10)));
        assert_eq!(writer.queued(), 0);
        let lines = out.lines();
        let logged = lines.iter().filter(|l| l["path"] == "/upload").count();
        let dropped: u64 = lines
            .iter()
            .filter_map(|l| l["dropped_records"].as_u64())
            .sum();
        assert_eq!((logged, dropped), (fits, 25), "{} lines", lines.len());

        // Written out, the backlog takes entries again: more than it holds at once, in all.
        for _ in 0..sent {
            log.capture(Instant::now(), "POST", "/again", "r2")
                .request(&body);
            assert!(writer.flush(Duration::from_secs(10)));
        }
        assert!(writer.finish(Duration::from_secs(10)));
        let again = out.lines().iter().filter(|l| l["path"] == "/again").count();
        assert_eq!(again, sent);
    }

    #[test]
    fn entries_reach_the_file_with_time_and_duration() {
        let dir = std::env::temp_dir().join(format!("lb-reqlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("requests.jsonl");
        let _ = std::fs::remove_file(&path);
        let (sink, writer) = open(&path).unwrap();
        let log = RequestLog::new(sink, 1024);
        let started = Instant::now() - Duration::from_millis(1500);
        let capture = log.capture(started, "POST", "/v1/completions", "r3");
        capture.request(br#"{"prompt":"hi"}"#);
        capture.status(200);
        drop(capture);
        // What was handed over is on disk once finish returns.
        assert!(writer.finish(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&path).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["method"], "POST");
        assert_eq!(line["status"], 200);
        assert_eq!(line["request"]["prompt"], "hi");
        assert_eq!(line["request_id"], "r3");
        assert!(line["duration_ms"].as_u64().unwrap() >= 1500, "{line}");
        let year = &line["time"].as_str().unwrap()[..4];
        assert!(year >= "2024", "{line}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "{:o}", mode & 0o777);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
