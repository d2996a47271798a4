//! `--log-to`'s writer: the file and the thread that writes it, shared by both builds.
//!
//! The proxy hands each finished entry to [`open`]'s sink, which only queues it: a bounded
//! channel to the writer thread, so a slow disk never blocks a request. Entries that do not
//! fit are counted, and the count is written as a line of its own before the next entry.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lb_core::reqlog::{dropped_line, Entry, EntrySink};

/// Entries waiting for the writer; beyond this they are dropped and counted.
const BACKLOG: usize = 1024;

/// Opens `path` (created with mode 0640, appended to), starts the writer thread and
/// returns the sink that feeds it. The thread ends when the last sink clone is dropped.
pub(crate) fn open(path: &Path) -> io::Result<EntrySink> {
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
    Ok(Arc::new(move |mut entry: Entry, started: Instant| {
        let took = started.elapsed();
        entry.duration_ms = took.as_millis() as u64;
        entry.time_unix_ms = SystemTime::now()
            .checked_sub(took)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        if let Err(TrySendError::Full(_)) = tx.try_send(entry) {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    }))
}

fn write_loop(rx: Receiver<Entry>, mut out: impl Write, dropped: Arc<AtomicU64>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use lb_core::reqlog::RequestLog;
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::Duration;

    #[test]
    fn entries_reach_the_file_with_time_and_duration() {
        let dir = std::env::temp_dir().join(format!("lb-reqlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("requests.jsonl");
        let _ = std::fs::remove_file(&path);
        let log = RequestLog::new(open(&path).unwrap(), 1024);
        let started = Instant::now() - Duration::from_millis(1500);
        let capture = log.capture(started, "POST", "/v1/completions");
        capture.request(br#"{"prompt":"hi"}"#);
        capture.status(200);
        drop(capture);
        drop(log);
        // The writer flushes once its backlog is empty; poll for the line.
        let mut text = String::new();
        for _ in 0..500 {
            text = std::fs::read_to_string(&path).unwrap();
            if text.ends_with('\n') {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
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
