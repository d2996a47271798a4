//! `--log-to`'s writer: the file and the thread that writes it, shared by both builds.
//!
//! The proxy hands each finished entry to [`open`]'s sink, which only queues it: a bounded
//! channel to the writer thread, so a slow disk never blocks a request. Entries that do not
//! fit are counted, and the count is written as a line of its own before the next entry.
//! When the proxy has stopped, [`Writer::finish`] waits until what was queued is on disk,
//! so the requests a graceful shutdown lets finish are logged too.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lb_proxy::reqlog::{dropped_line, Entry, EntrySink};

/// Entries waiting for the writer; beyond this they are dropped and counted.
const BACKLOG: usize = 1024;

enum Msg {
    Entry(Entry),
    /// Write out everything before this, then answer.
    Flush(SyncSender<()>),
}

/// The writer thread's handle, kept by whoever stops the proxy.
pub(crate) struct Writer {
    tx: SyncSender<Msg>,
}

impl Writer {
    /// Waits, at most `limit`, until every entry queued so far is written and flushed (and
    /// the count of dropped ones, if any). Whether it got there in time.
    pub(crate) fn finish(self, limit: Duration) -> bool {
        let (ack, done) = sync_channel(1);
        self.tx.send(Msg::Flush(ack)).is_ok() && done.recv_timeout(limit).is_ok()
    }
}

/// Opens `path` (created with mode 0640, appended to), starts the writer thread and
/// returns the sink that feeds it, and the writer's handle.
pub(crate) fn open(path: &Path) -> io::Result<(EntrySink, Writer)> {
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
    let writer = Writer { tx: tx.clone() };
    let sink: EntrySink = Arc::new(move |mut entry: Entry, started: Instant| {
        let took = started.elapsed();
        entry.duration_ms = took.as_millis() as u64;
        entry.time_unix_ms = SystemTime::now().checked_sub(took).map_or(0, unix_ms);
        if let Err(TrySendError::Full(_)) = tx.try_send(Msg::Entry(entry)) {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok((sink, writer))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn write_loop(rx: Receiver<Msg>, mut out: impl Write, dropped: Arc<AtomicU64>) {
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
                Msg::Entry(e) => {
                    write_dropped(&mut out, e.time_unix_ms);
                    let _ = out.write_all(e.record().to_line().as_bytes());
                }
                Msg::Flush(ack) => {
                    write_dropped(&mut out, unix_ms(SystemTime::now()));
                    let _ = out.flush();
                    let _ = ack.send(());
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
    use std::time::Duration;

    #[test]
    fn entries_reach_the_file_with_time_and_duration() {
        let dir = std::env::temp_dir().join(format!("lb-reqlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("requests.jsonl");
        let _ = std::fs::remove_file(&path);
        let (sink, writer) = open(&path).unwrap();
        let log = RequestLog::new(sink, 1024);
        let started = Instant::now() - Duration::from_millis(1500);
        let capture = log.capture(started, "POST", "/v1/completions");
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
        assert!(line["duration_ms"].as_u64().unwrap() >= 1500, "{line}");
        let year = &line["time"].as_str().unwrap()[..4];
        assert!(year >= "2024", "{line}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "{:o}", mode & 0o777);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
