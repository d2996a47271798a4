//! The request log (`--log-to`): one JSON object per completed request, one per line.
//!
//! Adapters open a [`Capture`] per request from the [`RequestLog`] in their settings and
//! feed it the bodies as they stream; dropping it hands the finished [`Entry`] to the
//! [`EntrySink`], the writer the CLI runs off the request path. This module decides what
//! a capture keeps and what a line says, so both builds write the same.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Default cap on each captured body (`--log-body-limit`): 64 KiB, enough for almost
/// every completion request and answer, and what keeps a request's capture small
/// whatever its bodies' sizes.
pub const DEFAULT_BODY_LIMIT: u64 = 64 * 1024;

/// What an [`Entry`] costs besides its strings and bodies ([`Entry::footprint`]): the
/// entry itself and its place in the writer's queue.
pub const ENTRY_OVERHEAD: usize = 256;

/// One completed (or refused) request.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    /// When the request arrived, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// From arrival to the end of the response (or of the exchange).
    pub duration_ms: u64,
    /// Request method.
    pub method: &'a str,
    /// Request path and query.
    pub path: &'a str,
    /// Status sent to the client (0 if none was sent).
    pub status: u16,
    /// The backend's URL; `None` for requests refused by `lb` itself (429, 503).
    pub backend: Option<&'a str>,
    /// The request's id (`X-Request-Id`).
    pub request_id: Option<&'a str>,
    /// The captured request body (at most the cap).
    pub request: &'a [u8],
    /// Whether the request body was cut at the cap.
    pub request_truncated: bool,
    /// The captured response body (at most the cap).
    pub response: &'a [u8],
    /// Whether the response body was cut at the cap.
    pub response_truncated: bool,
}

impl Record<'_> {
    /// The record as one line of JSON, newline included: bodies are embedded as JSON when
    /// they are JSON, as a string otherwise (e.g. an SSE stream; invalid UTF-8 replaced),
    /// `null` when empty.
    pub fn to_line(&self) -> String {
        let mut out = String::with_capacity(256 + self.request.len() + self.response.len());
        let _ = write!(
            out,
            r#"{{"time":"{}","duration_ms":{},"method":{},"path":{},"status":{},"backend":{},"request_id":{},"#,
            rfc3339_ms(self.time_unix_ms),
            self.duration_ms,
            json_string(self.method),
            json_string(self.path),
            self.status,
            self.backend.map_or("null".to_string(), json_string),
            self.request_id.map_or("null".to_string(), json_string),
        );
        out.push_str(r#""request":"#);
        body(self.request, &mut out);
        out.push_str(r#","response":"#);
        body(self.response, &mut out);
        let _ = writeln!(
            out,
            r#","request_truncated":{},"response_truncated":{}}}"#,
            self.request_truncated, self.response_truncated
        );
        out
    }
}

/// Where finished entries go: `--log-to`'s writer. It is called once per request, from
/// whichever task drops the request's [`Capture`] last, and must not block. `started` is
/// when the request arrived, on the caller's clock: the writer stamps the entry's
/// `time_unix_ms` and `duration_ms` from it (the core reads no clock).
pub type EntrySink = Arc<dyn Fn(Entry, Instant) + Send + Sync>;

/// The request log as the proxy sees it: where entries go, and how much of each body an
/// entry keeps (`--log-body-limit`).
#[derive(Clone)]
pub struct RequestLog {
    sink: EntrySink,
    limit: u64,
}

impl RequestLog {
    /// A log handing entries to `sink`, each body capped at `limit` bytes.
    pub fn new(sink: EntrySink, limit: u64) -> Self {
        RequestLog { sink, limit }
    }

    /// A capture for one request that arrived at `started`.
    /// A capture for one request: when it arrived, its method, path and query, and its
    /// request id (`X-Request-Id`, the client's or generated).
    pub fn capture(&self, started: Instant, method: &str, path: &str, id: &str) -> Capture {
        let mut entry = Entry::new(0, method, path);
        entry.request_id = Some(id.to_string());
        Capture {
            sink: self.sink.clone(),
            limit: self.limit,
            started,
            entry: Mutex::new(entry),
        }
    }
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// One request's record in the making. The request and response bodies stream
/// concurrently and each append through a shared reference (hence the lock, which is
/// never contended for long). Dropping it hands the entry to the log's sink.
pub struct Capture {
    sink: EntrySink,
    limit: u64,
    started: Instant,
    entry: Mutex<Entry>,
}

impl Capture {
    fn with(&self, f: impl FnOnce(&mut Entry, u64)) {
        let mut e = self.entry.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut e, self.limit);
    }

    /// Request body bytes as they pass (the data, without chunked framing).
    pub fn request(&self, data: &[u8]) {
        self.with(|e, limit| e.add_request(data, limit));
    }

    /// Response body bytes as they pass (the data, without chunked framing).
    pub fn response(&self, data: &[u8]) {
        self.with(|e, limit| e.add_response(data, limit));
    }

    /// The status sent to the client.
    pub fn status(&self, status: u16) {
        self.with(|e, _| e.status = status);
    }

    /// The backend the request went to.
    pub fn backend(&self, url: Arc<str>) {
        self.with(|e, _| e.backend = Some(url));
    }

    /// A reply the proxy made itself: its status, and its body as the response.
    pub fn reply(&self, reply: &crate::reply::Reply) {
        self.with(|e, limit| e.set_reply(reply.status, reply.body.as_bytes(), limit));
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let entry = std::mem::take(self.entry.get_mut().unwrap_or_else(|p| p.into_inner()));
        (self.sink)(entry, self.started);
    }
}

/// One request's record in the making, owned: a [`Capture`] fills it as the request
/// arrives and its bodies stream (up to a cap); the writer writes [`Entry::record`]'s
/// line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// See [`Record::time_unix_ms`].
    pub time_unix_ms: u64,
    /// See [`Record::duration_ms`] (set when the exchange ends).
    pub duration_ms: u64,
    /// Request method.
    pub method: String,
    /// Request path and query.
    pub path: String,
    /// Status sent to the client (0 until known).
    pub status: u16,
    /// The backend's URL, once one is chosen.
    pub backend: Option<Arc<str>>,
    /// The request's id.
    pub request_id: Option<String>,
    /// Request body captured so far.
    pub request: Vec<u8>,
    /// Whether the request body hit the cap.
    pub request_truncated: bool,
    /// Response body captured so far.
    pub response: Vec<u8>,
    /// Whether the response body hit the cap.
    pub response_truncated: bool,
}

impl Entry {
    /// An entry for a request that arrived at `time_unix_ms`.
    pub fn new(time_unix_ms: u64, method: &str, path: &str) -> Self {
        Entry {
            time_unix_ms,
            method: method.to_string(),
            path: path.to_string(),
            ..Entry::default()
        }
    }

    /// Appends request body bytes, keeping at most `limit` in all.
    pub fn add_request(&mut self, data: &[u8], limit: u64) {
        append(&mut self.request, &mut self.request_truncated, data, limit);
    }

    /// Appends response body bytes, keeping at most `limit` in all.
    pub fn add_response(&mut self, data: &[u8], limit: u64) {
        append(
            &mut self.response,
            &mut self.response_truncated,
            data,
            limit,
        );
    }

    /// A reply the proxy made itself: its status, and its body as the response.
    pub fn set_reply(&mut self, status: u16, body: &[u8], limit: u64) {
        self.status = status;
        self.response.clear();
        self.response_truncated = false;
        self.add_response(body, limit);
    }

    /// The bytes this entry holds in memory: its buffers' capacities and
    /// [`ENTRY_OVERHEAD`]. The writer's backlog is bounded in these.
    pub fn footprint(&self) -> usize {
        ENTRY_OVERHEAD
            + self.method.capacity()
            + self.path.capacity()
            + self.request.capacity()
            + self.response.capacity()
    }

    /// The borrowed record to write.
    pub fn record(&self) -> Record<'_> {
        Record {
            time_unix_ms: self.time_unix_ms,
            duration_ms: self.duration_ms,
            method: &self.method,
            path: &self.path,
            status: self.status,
            backend: self.backend.as_deref(),
            request_id: self.request_id.as_deref(),
            request: &self.request,
            request_truncated: self.request_truncated,
            response: &self.response,
            response_truncated: self.response_truncated,
        }
    }
}

fn append(buf: &mut Vec<u8>, truncated: &mut bool, data: &[u8], limit: u64) {
    let room = usize::try_from(limit.saturating_sub(buf.len() as u64)).unwrap_or(usize::MAX);
    if data.len() > room {
        *truncated = true;
    }
    let take = &data[..data.len().min(room)];
    if buf.len() + take.len() > buf.capacity() {
        // Grow by doubling as usual, but never past the cap: a capture holds at most
        // `limit` bytes a body, not the next power of two.
        let cap = usize::try_from(limit).unwrap_or(usize::MAX);
        let want = (buf.capacity() * 2).max(buf.len() + take.len()).min(cap);
        buf.reserve_exact(want - buf.len());
    }
    buf.extend_from_slice(take);
}

/// The line written when records had to be dropped (the writer fell behind).
pub fn dropped_line(time_unix_ms: u64, dropped: u64) -> String {
    format!(
        "{{\"time\":\"{}\",\"dropped_records\":{dropped},\"reason\":\"the log writer fell behind; these requests were served but not logged\"}}\n",
        rfc3339_ms(time_unix_ms)
    )
}

pub(crate) fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("serialising a str cannot fail")
}

fn body(b: &[u8], out: &mut String) {
    if b.iter().all(u8::is_ascii_whitespace) {
        out.push_str("null");
        return;
    }
    match serde_json::from_slice::<serde_json::Value>(b) {
        // Valid JSON on one line is kept byte for byte (key order, number spelling);
        // otherwise it is re-serialised compactly so the record stays on one line.
        Ok(v) => match std::str::from_utf8(b) {
            Ok(raw) if !raw.contains(['\n', '\r']) => out.push_str(raw.trim()),
            _ => out.push_str(&v.to_string()),
        },
        Err(_) => out.push_str(&json_string(&String::from_utf8_lossy(b))),
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` from milliseconds since the epoch (proleptic Gregorian).
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(req: &'a [u8], resp: &'a [u8]) -> Record<'a> {
        Record {
            time_unix_ms: 1_795_441_071_123,
            duration_ms: 12,
            method: "POST",
            path: "/v1/completions",
            status: 200,
            backend: Some("http://127.0.0.1:8001"),
            request_id: Some("id-1"),
            request: req,
            request_truncated: false,
            response: resp,
            response_truncated: true,
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_441_071_123), "2026-11-23T13:37:51.123Z");
    }

    #[test]
    fn json_bodies_are_embedded_on_one_line() {
        let line = record(
            b"{\n  \"prompt\": \"hi\"\n}",
            b"data: {\"a\":1}\n\ndata: [DONE]\n\n",
        )
        .to_line();
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["request"]["prompt"], "hi");
        assert_eq!(v["response"], "data: {\"a\":1}\n\ndata: [DONE]\n\n");
        assert_eq!(v["backend"], "http://127.0.0.1:8001");
        assert_eq!(v["time"], "2026-11-23T13:37:51.123Z");
        let raw = record(br#"{"z":1,"a":2.50}"#, b"").to_line();
        assert!(
            raw.contains(r#""request":{"z":1,"a":2.50}"#),
            "kept verbatim: {raw}"
        );
        assert_eq!(v["response_truncated"], true);
    }

    #[test]
    fn entries_cap_their_bodies() {
        let mut e = Entry::new(0, "POST", "/x");
        e.add_request(b"hello", 3);
        e.add_request(b"!", 3);
        assert_eq!(
            (e.request.as_slice(), e.request_truncated),
            (&b"hel"[..], true)
        );
        e.add_response(b"ok", 3);
        assert!(!e.response_truncated);
        e.set_reply(429, b"{}", 3);
        assert_eq!((e.status, e.response.as_slice()), (429, &b"{}"[..]));
        assert_eq!(e.record().method, "POST");
    }

    #[test]
    fn a_capped_body_holds_no_more_than_its_cap() {
        let mut e = Entry::new(0, "POST", "/x");
        let limit = 64 * 1024;
        for _ in 0..1000 {
            e.add_request(&[b'a'; 1000], limit);
        }
        assert_eq!(e.request.len(), 65536);
        assert!(e.request_truncated);
        assert_eq!(e.request.capacity(), 65536, "grown past the cap");
        assert_eq!(e.footprint(), ENTRY_OVERHEAD + 4 + 2 + 65536);
    }

    #[test]
    fn a_capture_hands_its_entry_over_once_when_dropped() {
        let got: Arc<Mutex<Vec<(Entry, Instant)>>> = Arc::default();
        let into = got.clone();
        let log = RequestLog::new(Arc::new(move |e, t| into.lock().unwrap().push((e, t))), 4);
        let started = Instant::now();
        let c = log.capture(started, "POST", "/v1/chat/completions", "rid-7");
        c.backend("http://b:1".into());
        c.request(b"abc");
        c.request(b"def");
        c.response(b"xy");
        c.status(200);
        assert!(
            got.lock().unwrap().is_empty(),
            "handed over before the drop"
        );
        drop(c);
        {
            let got = got.lock().unwrap();
            assert_eq!(got.len(), 1);
            let (e, t) = &got[0];
            assert_eq!(*t, started);
            assert_eq!(
                (e.method.as_str(), e.path.as_str()),
                ("POST", "/v1/chat/completions")
            );
            assert_eq!(e.backend.as_deref(), Some("http://b:1"));
            assert_eq!(e.request_id.as_deref(), Some("rid-7"));
            assert_eq!(
                (e.request.as_slice(), e.request_truncated),
                (&b"abcd"[..], true)
            );
            assert_eq!((e.status, e.response.as_slice()), (200, &b"xy"[..]));
        }

        // A reply the proxy made itself replaces whatever response was captured.
        let c = log.capture(started, "GET", "/", "rid-8");
        c.response(b"partial");
        c.reply(&crate::reply::Reply {
            status: 503,
            headers: &[],
            body: "{}".into(),
            request_id: None,
            rejection: None,
        });
        drop(c);
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[1].0.status, got[1].0.response.as_slice()),
            (503, &b"{}"[..])
        );
    }

    #[test]
    fn empty_bodies_and_no_backend_are_null() {
        let mut r = record(b"", b" ");
        r.backend = None;
        let v: serde_json::Value = serde_json::from_str(&r.to_line()).unwrap();
        assert!(v["request"].is_null() && v["response"].is_null() && v["backend"].is_null());
        let d: serde_json::Value = serde_json::from_str(&dropped_line(0, 3)).unwrap();
        assert_eq!(d["dropped_records"], 3);
    }
}
