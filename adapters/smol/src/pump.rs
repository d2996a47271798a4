//! The moving parts of an exchange, each a future over borrowed connections and buffers:
//! the request head out (with the one safe re-send), the request body up, the response
//! head in, the response body down. `exchange` runs them against each other and the
//! deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use lb_core::http1::{
    self, rewrite_response, BodyFramer, RequestHead, ResponseHead, ResponsePlan, Status,
};
use lb_core::{BackendId, ErrorKind};

use crate::connect::describe;
use crate::io::{
    head_read_size, may_end_head, read_more, send, watch, write_counted, Budget, ReadSize,
};
use crate::reqlog::Tap;
use crate::shared::{Local, Shared, Upstream};
use crate::stream::Stream;

/// Most bytes kept from a client while it waits for its response (a pipelined request,
/// early tunnel bytes); past this the client is not read until the response is done.
pub(crate) const WATCH_CAP: usize = 64 * 1024;

/// How the client → backend direction ended.
pub(crate) enum UpEnd {
    /// The client closed or reset its connection.
    ClientGone,
    /// The client's request body is malformed (bad chunked framing).
    BadBody,
    /// Writing to the backend failed: not fatal by itself, the backend may have answered.
    BackendWrite(std::io::Error),
}

/// Why no response head could be read.
pub(crate) enum HeadFail {
    /// The backend closed or failed before a complete head.
    Io(String),
    /// The head is not valid HTTP, or a `101` nobody asked for.
    Invalid(http1::Error),
    /// Forwarding an interim head to the client failed.
    ClientGone,
}

/// How streaming the response body ended.
pub(crate) enum DownEnd {
    Done,
    ClientGone,
    Backend(ErrorKind, String),
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

/// Writes the head on a pooled connection, or a new one. A pooled connection that fails
/// before any byte of the head reached it is replaced once by a new connection: the
/// backend never saw the request, so sending it again is safe.
pub(crate) async fn send_head(
    shared: &Shared,
    local: &Local,
    id: BackendId,
    up: &Upstream,
    head: &[u8],
) -> Result<Stream, (ErrorKind, String)> {
    if let Some(conn) = local.pool.take(id) {
        let mut written = 0;
        match write_counted(&conn, head, &mut written).await {
            Ok(()) => return Ok(conn),
            Err(e) if written > 0 => return Err((ErrorKind::Io, describe(&e))),
            Err(_) => {}
        }
    }
    let conn = shared
        .connector
        .connect(up, &local.reactor)
        .await
        .map_err(|m| (ErrorKind::Connect, m))?;
    let mut written = 0;
    match write_counted(&conn, head, &mut written).await {
        Ok(()) => Ok(conn),
        Err(e) => Err((ErrorKind::Io, describe(&e))),
    }
}

/// Client → backend: the rest of the request body as it arrives (copied to `tap`), then
/// (the body complete, `done` set) watching the client, so that one that leaves cancels
/// the exchange.
pub(crate) async fn upload(
    client: &Stream,
    cbuf: &mut Vec<u8>,
    conn: &Stream,
    mut framer: BodyFramer,
    done: &AtomicBool,
    mut tap: Option<Tap<'_>>,
) -> UpEnd {
    let mut size = ReadSize::new();
    let mut budget = Budget::new();
    while !framer.is_done() {
        if cbuf.is_empty() {
            match read_more(client, cbuf, size.get()).await {
                Ok(0) | Err(_) => return UpEnd::ClientGone,
                Ok(n) => size.record(n),
            }
        }
        let p = match framer.push(cbuf) {
            Ok(p) => p,
            Err(_) => return UpEnd::BadBody,
        };
        if let Some(tap) = &mut tap {
            tap.feed(&cbuf[..p.consumed]);
        }
        let mut written = 0;
        if let Err(e) = write_counted(conn, &cbuf[..p.consumed], &mut written).await {
            return UpEnd::BackendWrite(e);
        }
        cbuf.drain(..p.consumed);
        budget.spend(p.consumed).await;
    }
    done.store(true, Ordering::Release);
    watch(client, cbuf, WATCH_CAP).await;
    UpEnd::ClientGone
}

/// Reads the final response head, forwarding interim (`1xx`) heads to the client. Returns
/// the head, its plan, and the rewritten head to send.
pub(crate) async fn response_head(
    shared: &Shared,
    client: &Stream,
    conn: &Stream,
    bbuf: &mut Vec<u8>,
    req: &RequestHead,
    req_done: &AtomicBool,
) -> Result<(ResponseHead, ResponsePlan, Vec<u8>), HeadFail> {
    let limits = &shared.limits;
    let mut check = false;
    loop {
        if check {
            match http1::parse_response(bbuf, limits) {
                Ok(Status::Complete(resp, n)) => {
                    bbuf.drain(..n);
                    // Keep the client connection only if its request body is all read.
                    let close = shared.is_shutting_down() || !req_done.load(Ordering::Acquire);
                    let mut out = Vec::with_capacity(512);
                    let plan =
                        rewrite_response(&resp, req, close, &mut out).map_err(HeadFail::Invalid)?;
                    if !resp.is_interim() {
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
        let want = head_read_size(before, limits.max_head_bytes);
        if before == 0 {
            // The request has just gone out: the answer is most likely not here yet, and a
            // read now would only find nothing (a `recv` answering `EAGAIN` per request).
            conn.readable().await;
        }
        match read_more(conn, bbuf, want).await {
            Ok(0) => {
                return Err(HeadFail::Io(
                    "backend closed the connection before answering".into(),
                ))
            }
            Ok(_) => check = may_end_head(bbuf, before) || bbuf.len() >= limits.max_head_bytes,
            Err(e) => return Err(HeadFail::Io(describe(&e))),
        }
    }
}

/// Backend → client: the head (with the first body bytes), then the body as it arrives
/// (copied to `tap`), each read written through at once (server-sent events are not held
/// back).
pub(crate) async fn download(
    client: &Stream,
    conn: &Stream,
    bbuf: &mut Vec<u8>,
    mut framer: BodyFramer,
    out: Vec<u8>,
    mut tap: Option<Tap<'_>>,
) -> DownEnd {
    if send(client, &out).await.is_err() {
        return DownEnd::ClientGone;
    }
    drop(out);
    let mut size = ReadSize::new();
    let mut budget = Budget::new();
    // Whether the last read emptied the socket (it returned less than asked): then the
    // next bytes (the next SSE event, say) are most likely not here yet, so wait until
    // the reactor says so instead of reading for nothing.
    let mut drained = false;
    while !framer.is_done() {
        if drained {
            conn.readable().await;
        }
        let want = size.get();
        match read_more(conn, bbuf, want).await {
            Ok(0) => {
                return match framer.finish() {
                    Ok(()) => DownEnd::Done, // close-delimited: complete at EOF
                    Err(e) => DownEnd::Backend(ErrorKind::Io, e.to_string()),
                };
            }
            Ok(n) => {
                size.record(n);
                drained = n < want;
            }
            Err(e) => return DownEnd::Backend(ErrorKind::Io, describe(&e)),
        }
        let p = match framer.push(bbuf) {
            Ok(p) => p,
            Err(e) => {
                return DownEnd::Backend(ErrorKind::Protocol, format!("invalid response body: {e}"))
            }
        };
        if let Some(tap) = &mut tap {
            tap.feed(&bbuf[..p.consumed]);
        }
        if send(client, &bbuf[..p.consumed]).await.is_err() {
            return DownEnd::ClientGone;
        }
        bbuf.drain(..p.consumed);
        budget.spend(p.consumed).await;
    }
    DownEnd::Done
}
