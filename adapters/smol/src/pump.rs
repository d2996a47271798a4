//! The moving parts of an exchange, each a future over borrowed connections and buffers:
//! the request head out (with the one safe re-send), the request body up, the response
//! head in, the response body down. `exchange` runs them against each other and the
//! deadline.

use lb_proxy::metrics::{Retry, UpstreamConn};
use lb_proxy::request_id::RequestId;
use lb_proxy::Account;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use lb_http1::{rewrite_response, BodyFramer, RequestHead, ResponseHead, ResponsePlan, Status};
use lb_proxy::Failure;

use crate::connect::describe;
use crate::io::{
    date_now, head_read_size, may_end_head, read_more, readable, send, watch, write_counted,
    Budget, ReadSize, Stall,
};
use crate::reqlog::Tap;
use crate::rt::{Proxy, Shard, Upstream};
use crate::stream::Wire;

/// Most bytes kept from a client while it waits for its response (a pipelined request,
/// early tunnel bytes); past this the client is not read until the response is done.
pub(crate) const WATCH_CAP: usize = 64 * 1024;

/// How the client → backend direction ended.
pub(crate) enum UpEnd {
    /// The client closed or reset its connection.
    ClientGone,
    /// The client's body sent nothing for `--client-body-timeout`.
    Stalled,
    /// The client's request body is malformed (bad chunked framing).
    BadBody,
    /// Writing to the backend failed: not fatal by itself, the backend may have answered.
    BackendWrite(std::io::Error),
}

/// Why no response head could be read.
pub(crate) enum HeadFail {
    /// The backend closed or failed before a complete head; `silent` when not one byte
    /// of a response had arrived.
    Io { message: String, silent: bool },
    /// The head is not valid HTTP, or a `101` nobody asked for.
    Invalid(lb_http1::Error),
    /// Forwarding an interim head to the client failed.
    ClientGone,
}

/// How streaming the response body ended.
pub(crate) enum DownEnd {
    Done,
    ClientGone,
    Backend(Failure),
}

/// Polls the upload unless it already ended; a non-fatal end (a failed backend write) is
/// kept in `failed`, a fatal one returned.
pub(crate) fn poll_upload<F>(
    upload: Pin<&mut F>,
    failed: &mut Option<std::io::Error>,
    cx: &mut std::task::Context<'_>,
) -> Option<UpEnd>
where
    F: Future<Output = UpEnd>,
{
    if failed.is_some() {
        return None;
    }
    match upload.poll(cx) {
        Poll::Ready(UpEnd::BackendWrite(e)) => {
            *failed = Some(e);
            None
        }
        Poll::Ready(end) => Some(end),
        Poll::Pending => None,
    }
}

/// A connection with `head` written to it: a pooled one if one takes the whole head,
/// else a new one. Whether the connection was reused comes back with it: only a reused
/// connection can lose the keep-alive race (see `exchange`). A pooled connection that
/// fails while the head goes out never saw a whole request, so the head goes to a new
/// connection instead.
pub(crate) async fn send_head<S: Shard>(
    proxy: &Proxy,
    local: &S,
    up: &Upstream,
    head: &[u8],
) -> Result<(S::Conn, bool), Failure> {
    if let Some(conn) = local.pooled(up) {
        let mut written = 0;
        if write_counted(&conn, head, &mut written).await.is_ok() {
            up.stats.connection(UpstreamConn::Reused);
            return Ok((conn, true));
        }
        // Found closed: the head goes out again on a new connection.
        up.stats.retry(Retry::KeepAliveRace);
    }
    let conn = send_fresh(proxy, local, up, head).await?;
    Ok((conn, false))
}

/// A new connection to `up` with `bytes` written to it.
pub(crate) async fn send_fresh<S: Shard>(
    proxy: &Proxy,
    local: &S,
    up: &Upstream,
    bytes: &[u8],
) -> Result<S::Conn, Failure> {
    let connected = local.connect(proxy, up).await;
    up.stats.connection(if connected.is_ok() {
        UpstreamConn::New
    } else {
        UpstreamConn::Failed
    });
    let conn = connected.map_err(Failure::Connect)?;
    let mut written = 0;
    match write_counted(&conn, bytes, &mut written).await {
        Ok(()) => Ok(conn),
        // Reset before any byte of the request went out: as good as refused (the request
        // may go elsewhere).
        Err(e) if written == 0 => Err(Failure::Connect(describe(&e))),
        Err(e) => Err(Failure::Io(describe(&e))),
    }
}

/// The request body on its way up: its framing, its copy for the request log, and the
/// copy kept for a re-send.
pub(crate) struct Upward<'a> {
    pub(crate) framer: BodyFramer,
    pub(crate) tap: Option<Tap<'a>>,
    pub(crate) replay: Option<Replay>,
    /// The client waits for `100 Continue` before it sends the body (`Expect`): sent
    /// when the body is first read (the backend is not asked).
    pub(crate) continue_due: bool,
    /// The longest the body may send nothing (`--client-body-timeout`).
    pub(crate) stall: Stall<'a>,
    /// Body data bytes from the client, for the request's account.
    pub(crate) counted: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

/// The request as it went to a reused connection (head and body), kept while it stays
/// within `--replay-buffer`, to send it again on a new connection if the reused one turns
/// out closed before any byte of the response.
pub(crate) struct Replay {
    bytes: Vec<u8>,
    /// How many of `bytes` are body.
    body: usize,
    /// Body bytes it may still take.
    room: usize,
}

impl Replay {
    /// `sent` is the head with the body bytes that went with it (`body` of them).
    pub(crate) fn new(sent: Vec<u8>, body: usize, limit: usize) -> Option<Replay> {
        let room = limit.checked_sub(body)?;
        Some(Replay {
            bytes: sent,
            body,
            room,
        })
    }

    /// The bytes to send again, and how many of them (at the end) are body.
    pub(crate) fn into_parts(self) -> (Vec<u8>, usize) {
        (self.bytes, self.body)
    }
}

/// Keeps `body` bytes in `replay`, or drops it once the body outgrows it.
fn keep(replay: &mut Option<Replay>, body: &[u8]) {
    if let Some(r) = replay {
        match r.room.checked_sub(body.len()) {
            Some(room) => {
                r.room = room;
                r.body += body.len();
                r.bytes.extend_from_slice(body);
            }
            None => *replay = None,
        }
    }
}

/// Client → backend: the rest of the request body as it arrives (copied to the tap and
/// the replay copy), then (the body complete, `done` set) watching the client, so that
/// one that leaves cancels the exchange. Once the body is complete, dropping the future
/// and starting another (on a new connection) loses nothing; before, every body byte it
/// took from `cbuf` went to the tap and the replay copy (if it still has room), written
/// to the backend or not.
pub(crate) async fn upload<C: Wire, B: Wire>(
    client: &C,
    cbuf: &mut Vec<u8>,
    conn: &B,
    up: &mut Upward<'_>,
    done: &AtomicBool,
) -> UpEnd {
    let mut size = ReadSize::new();
    let mut budget = Budget::new();
    while !up.framer.is_done() {
        let n = match next_body_part(client, cbuf, up, &mut size).await {
            Ok(n) => n,
            Err(end) => return end,
        };
        let mut written = 0;
        let wrote = write_counted(conn, &cbuf[..n], &mut written).await;
        cbuf.drain(..n);
        if let Err(e) = wrote {
            return UpEnd::BackendWrite(e);
        }
        budget.spend(n).await;
    }
    done.store(true, Ordering::Release);
    watch(client, cbuf, WATCH_CAP).await;
    UpEnd::ClientGone
}

/// Reads the rest of the request body into the replay copy (nothing goes to a backend):
/// whether the whole request is now held. `false` once it outgrows `--replay-buffer`.
pub(crate) async fn hold_rest<C: Wire>(
    client: &C,
    cbuf: &mut Vec<u8>,
    up: &mut Upward<'_>,
) -> bool {
    let mut size = ReadSize::new();
    while !up.framer.is_done() && up.replay.is_some() {
        match next_body_part(client, cbuf, up, &mut size).await {
            Ok(n) => drop(cbuf.drain(..n)),
            Err(_) => return false,
        }
    }
    up.replay.is_some()
}

/// The next bytes of the request body, at the start of `cbuf` (read from the client if
/// it holds none): how many belong to the body. They have been fed to the tap and the
/// replay copy.
async fn next_body_part<C: Wire>(
    client: &C,
    cbuf: &mut Vec<u8>,
    up: &mut Upward<'_>,
    size: &mut ReadSize,
) -> Result<usize, UpEnd> {
    if cbuf.is_empty() {
        if up.continue_due {
            up.continue_due = false;
            send(client, b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(|_| UpEnd::ClientGone)?;
        }
        match up
            .stall
            .within(read_more(client, &mut *cbuf, size.get()))
            .await
        {
            Ok(0) => return Err(UpEnd::ClientGone),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(UpEnd::Stalled),
            Err(_) => return Err(UpEnd::ClientGone),
            Ok(n) => size.record(n),
        }
    }
    let p = up.framer.push(cbuf).map_err(|_| UpEnd::BadBody)?;
    if let Some(c) = &up.counted {
        c.fetch_add(p.data as u64, Ordering::Relaxed);
    }
    let part = &cbuf[..p.consumed];
    if let Some(tap) = &mut up.tap {
        tap.feed(part);
    }
    keep(&mut up.replay, part);
    Ok(p.consumed)
}

/// Reads the final response head, forwarding interim (`1xx`) heads to the client. Returns
/// the head, its plan, and the rewritten head to send.
pub(crate) async fn response_head<C: Wire, B: Wire>(
    proxy: &Proxy,
    client: &C,
    conn: &B,
    bbuf: &mut Vec<u8>,
    req: &RequestHead,
    req_done: &AtomicBool,
    id: &RequestId,
) -> Result<(ResponseHead, ResponsePlan, Vec<u8>), HeadFail> {
    let limits = &proxy.runtime().limits;
    let mut check = false;
    let mut silent = true;
    let mut size = ReadSize::new();
    loop {
        if check {
            match lb_http1::parse_response(bbuf, limits) {
                Ok(Status::Complete(resp, n)) => {
                    bbuf.drain(..n);
                    // Keep the client connection only if its request body is all read.
                    let close = proxy.is_shutting_down() || !req_done.load(Ordering::Acquire);
                    // Room for what is added (Date, X-Request-Id) and the body bytes
                    // already here, which go out with the head: no regrowth.
                    let mut out = Vec::with_capacity(n + 256 + bbuf.len().min(1 << 18));
                    // Only a response without a Date gets one (the clock is not read
                    // for the others).
                    let date = (!resp.is_interim() && resp.header("date").is_none()).then(date_now);
                    let date = date.as_ref().map(|d| &d[..]);
                    let plan = rewrite_response(&resp, req, close, date, &mut out)
                        .map_err(HeadFail::Invalid)?;
                    if !resp.is_interim() {
                        // The request's id, before the head's final empty line.
                        out.truncate(out.len() - 2);
                        out.extend_from_slice(b"X-Request-Id: ");
                        out.extend_from_slice(id.as_bytes());
                        out.extend_from_slice(b"\r\n\r\n");
                        return Ok((resp, plan, out));
                    }
                    if !out.is_empty() && send(client, &out).await.is_err() {
                        return Err(HeadFail::ClientGone);
                    }
                    check = !bbuf.is_empty();
                    continue;
                }
                Ok(Status::Partial) => {}
                Err(e) => return Err(HeadFail::Invalid(e)),
            }
        }
        let before = bbuf.len();
        // Until the status line is whole, every read is checked: a reply that is not
        // HTTP is refused at once, not when (if ever) a head ends.
        let first_line_open = !bbuf.contains(&b'\n');
        let want = head_read_size(before, limits.max_head_bytes, &size);
        if before == 0 {
            // The request has just gone out: the answer is most likely not here yet, and a
            // read now would only find nothing (a `recv` answering `EAGAIN` per request).
            readable(conn).await;
        }
        match read_more(conn, bbuf, want).await {
            Ok(0) => {
                return Err(HeadFail::Io {
                    message: "backend closed the connection before answering".into(),
                    silent,
                })
            }
            Ok(n) => {
                size.record(n);
                silent = false;
                check = first_line_open
                    || may_end_head(bbuf, before)
                    || bbuf.len() >= limits.max_head_bytes;
            }
            Err(e) => {
                return Err(HeadFail::Io {
                    message: describe(&e),
                    silent,
                })
            }
        }
    }
}

/// Backend → client: the head (with the first body bytes), then the body as it arrives
/// (copied to `tap`), each read written through at once (server-sent events are not held
/// back).
///
/// The body goes down as [`Reframe`] says: as it came, each part as a chunk (and the
/// backend's end of stream as the last chunk), or the chunks' data alone.
///
/// A client that takes nothing of it for `--client-write-timeout` is gone (see
/// `io::Client`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn download<C: Wire, B: Wire>(
    client: &C,
    conn: &B,
    bbuf: &mut Vec<u8>,
    mut framer: BodyFramer,
    (out, early_data): (Vec<u8>, usize),
    mut tap: Option<Tap<'_>>,
    mut reframe: Reframe,
    acct: &mut Account,
) -> DownEnd {
    if early_data > 0 {
        acct.first_byte();
        acct.bytes_out(early_data as u64);
    }
    if send(client, &out).await.is_err() {
        return DownEnd::ClientGone;
    }
    drop(out);
    let mut chunked = Vec::new();
    let mut size = ReadSize::new();
    let mut budget = Budget::new();
    // Whether the last read emptied the socket (it returned less than asked): then the
    // next bytes (the next SSE event, say) are most likely not here yet, so wait until
    // the reactor says so instead of reading for nothing.
    let mut drained = false;
    while !framer.is_done() {
        if drained {
            readable(conn).await;
        }
        let want = size.get();
        match read_more(conn, bbuf, want).await {
            Ok(0) => {
                return match framer.finish() {
                    // Close-delimited: complete at EOF.
                    Ok(()) if matches!(reframe, Reframe::Rechunk) => {
                        match send(client, b"0\r\n\r\n").await {
                            Ok(()) => DownEnd::Done,
                            Err(_) => DownEnd::ClientGone,
                        }
                    }
                    Ok(()) => DownEnd::Done,
                    Err(e) => DownEnd::Backend(Failure::Io(e.to_string())),
                };
            }
            Ok(n) => {
                size.record(n);
                drained = n < want;
            }
            Err(e) => return DownEnd::Backend(Failure::Io(describe(&e))),
        }
        let p = match framer.push(bbuf) {
            Ok(p) => p,
            Err(e) => {
                return DownEnd::Backend(Failure::Invalid(format!("invalid response body: {e}")))
            }
        };
        if let Some(tap) = &mut tap {
            tap.feed(&bbuf[..p.consumed]);
        }
        if p.data > 0 {
            acct.first_byte();
            acct.bytes_out(p.data as u64);
        }
        let part = if let Reframe::AsIs = reframe {
            &bbuf[..p.consumed]
        } else {
            chunked.clear();
            reframe.push(&bbuf[..p.consumed], &mut chunked);
            &chunked[..]
        };
        if send(client, part).await.is_err() {
            return DownEnd::ClientGone;
        }
        bbuf.drain(..p.consumed);
        budget.spend(p.consumed).await;
    }
    DownEnd::Done
}

/// How a response body's bytes go to the client (see `lb_http1::ResponsePlan`).
pub(crate) enum Reframe {
    /// As they came.
    AsIs,
    /// Each part as a chunk (`ResponsePlan::rechunk`: a close-delimited body to an
    /// HTTP/1.1 client); the last chunk is sent at the backend's end of stream.
    Rechunk,
    /// The chunks' data alone (`ResponsePlan::dechunk`: a chunked body to an HTTP/1.0
    /// client).
    Dechunk(lb_http1::Dechunk),
}

impl Reframe {
    pub(crate) fn of(plan: &lb_http1::ResponsePlan) -> Self {
        if plan.rechunk {
            Reframe::Rechunk
        } else if plan.dechunk {
            Reframe::Dechunk(lb_http1::Dechunk::default())
        } else {
            Reframe::AsIs
        }
    }

    /// Appends the body bytes `wire`, reframed, to `out`.
    pub(crate) fn push(&mut self, wire: &[u8], out: &mut Vec<u8>) {
        match self {
            Reframe::AsIs => out.extend_from_slice(wire),
            Reframe::Rechunk => chunk(out, wire),
            Reframe::Dechunk(d) => d.feed(wire, |data| out.extend_from_slice(data)),
        }
    }
}

/// Appends `data` as one chunk (nothing if it is empty: that would be the last chunk).
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    use std::io::Write as _;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}
