//! One proxied exchange: the request head and body to a backend, the response head and body
//! back, or a tunnel after `101`. Every byte is framed by `lb_core::http1`; the lease goes
//! back to the core with the outcome however the exchange ends.
//!
//! Phases, each raced against the request deadline:
//!
//! 0. a connection (pooled, else new) and the request head written to it, while watching
//!    the client (a client that leaves cancels);
//! 1. the response head read (interim `1xx` heads forwarded), while the request body goes
//!    up and, once it is complete, the client is watched again;
//! 2. the response head and body sent down, chunk by chunk as they arrive;
//! 3. after `101`: both connections spliced until either closes.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use async_io::Timer;
use futures_lite::future;
use lb_core::http1::{
    self, rewrite_request, rewrite_response, BodyFramer, BodyKind, Forwarding, RequestHead,
    ResponseHead, ResponsePlan, Status,
};
use lb_core::reply::{self, ProxyError};
use lb_core::{BackendError, BackendId, ErrorKind, Notice, Outcome};

use crate::conn::{write_reply, After};
use crate::connect::describe;
use crate::io::{
    head_read_size, may_end_head, read_more, send, splice, watch, write_counted, Budget, ReadSize,
};
use crate::shared::{LeaseGuard, Shared, Upstream};
use crate::stream::Stream;

/// Most bytes kept from a client while it waits for its response (a pipelined request,
/// early tunnel bytes); past this the client is not read until the response is done.
const WATCH_CAP: usize = 64 * 1024;

/// How the client → backend direction ended.
enum UpEnd {
    /// The client closed or reset its connection.
    ClientGone,
    /// The client's request body is malformed (bad chunked framing).
    BadBody,
    /// Writing to the backend failed: not fatal by itself, the backend may have answered.
    BackendWrite(std::io::Error),
}

/// Why no response head could be read.
enum HeadFail {
    /// The backend closed or failed before a complete head.
    Io(String),
    /// The head is not valid HTTP, or a `101` nobody asked for.
    Invalid(http1::Error),
    /// Forwarding an interim head to the client failed.
    ClientGone,
}

/// How streaming the response body ended.
enum DownEnd {
    Done,
    ClientGone,
    Backend(ErrorKind, String),
}

/// Forwards `req` to the lease's backend and its response to the client; says whether
/// the client connection carries on. `cbuf` holds the bytes read from the client after
/// the head, and keeps what follows this request's body.
pub(crate) async fn forward(
    shared: &Arc<Shared>,
    client: &Stream,
    cbuf: &mut Vec<u8>,
    peer: SocketAddr,
    req: RequestHead,
    guard: LeaseGuard,
) -> After {
    let id = guard.backend();
    let up = shared.upstream(id);
    let mut timer = Timer::at(Instant::now() + shared.settings.request_timeout);
    let ctx = Ctx {
        shared,
        id,
        req: &req,
    };

    // The head for the backend, with the body bytes already here.
    let mut head = Vec::with_capacity(1024);
    let fwd = Forwarding {
        client_ip: peer.ip().to_canonical(),
        client_proto: "http",
        backend_authority: &up.target.authority,
        backend_path_prefix: &up.target.path_prefix,
    };
    let mut framer = match rewrite_request(&req, &fwd, &mut head) {
        Ok(kind) => BodyFramer::new(kind),
        Err(_) => return ctx.reject(client, guard, ProxyError::BadRequest).await,
    };
    let early = match framer.push(cbuf) {
        Ok(p) => p.consumed,
        Err(_) => return ctx.reject(client, guard, ProxyError::BadRequest).await,
    };
    head.extend_from_slice(&cbuf[..early]);
    cbuf.drain(..early);
    let body_read = framer.is_done();

    // Phase 0: a connection with the head on it.
    enum P0 {
        Sent(Stream),
        Failed(ErrorKind, String),
        ClientGone,
        Timeout,
    }
    let p0 = future::or(
        async {
            match send_head(shared, id, up, &head).await {
                Ok(conn) => P0::Sent(conn),
                Err((kind, msg)) => P0::Failed(kind, msg),
            }
        },
        future::or(
            async {
                watch(client, cbuf, WATCH_CAP).await;
                P0::ClientGone
            },
            async {
                (&mut timer).await;
                P0::Timeout
            },
        ),
    )
    .await;
    let conn = match p0 {
        P0::Sent(conn) => conn,
        P0::Failed(kind, msg) => {
            return ctx
                .fail(client, guard, ProxyError::BadGateway, kind, msg, body_read)
                .await
        }
        P0::ClientGone => return After::Gone,
        P0::Timeout => return ctx.timeout(client, guard, body_read).await,
    };
    drop(head);

    let req_done = AtomicBool::new(body_read);
    let mut bbuf = Vec::new();
    let mut up_failed: Option<std::io::Error> = None;

    // Phases 1 and 2 share the upload; they end with a decision, or with a `101`.
    enum Step {
        Upgrade(ResponseHead, Vec<u8>),
        Finished {
            after: After,
            reuse: bool,
            status: u16,
        },
    }
    let step = {
        let mut upload = pin!(upload(client, cbuf, &conn, framer, &req_done));

        // Phase 1: the response head, while the request body goes up.
        enum P1 {
            Head(ResponseHead, ResponsePlan, Vec<u8>),
            Fail(HeadFail),
            Up(UpEnd),
            Timeout,
        }
        let p1 = {
            let mut down = pin!(response_head(
                shared, client, &conn, &mut bbuf, &req, &req_done
            ));
            poll_fn(|cx| {
                if let Some(end) = poll_upload(upload.as_mut(), &mut up_failed, cx) {
                    return Poll::Ready(P1::Up(end));
                }
                if let Poll::Ready(r) = down.as_mut().poll(cx) {
                    return Poll::Ready(match r {
                        Ok((resp, plan, out)) => P1::Head(resp, plan, out),
                        Err(e) => P1::Fail(e),
                    });
                }
                match Pin::new(&mut timer).poll(cx) {
                    Poll::Ready(_) => Poll::Ready(P1::Timeout),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        };
        let done = req_done.load(Ordering::Acquire);
        let (resp, plan, mut out) = match p1 {
            P1::Head(resp, plan, out) => (resp, plan, out),
            P1::Up(UpEnd::BadBody) => {
                return ctx.reject(client, guard, ProxyError::BadRequest).await
            }
            P1::Up(_) => return After::Gone,
            P1::Fail(HeadFail::ClientGone) => return After::Gone,
            P1::Fail(HeadFail::Io(msg)) => {
                let msg = match up_failed {
                    Some(e) => format!("{msg} (after a failed request write: {})", describe(&e)),
                    None => msg,
                };
                return ctx
                    .fail(
                        client,
                        guard,
                        ProxyError::BadGateway,
                        ErrorKind::Io,
                        msg,
                        done,
                    )
                    .await;
            }
            P1::Fail(HeadFail::Invalid(e)) => {
                let msg = format!("invalid response: {e}");
                return ctx
                    .fail(
                        client,
                        guard,
                        ProxyError::BadResponse,
                        ErrorKind::Protocol,
                        msg,
                        done,
                    )
                    .await;
            }
            P1::Timeout => return ctx.timeout(client, guard, done).await,
        };
        let status = resp.status;
        if plan.is_upgrade() {
            Step::Upgrade(resp, out)
        } else {
            // Phase 2: the head (with the body bytes already here), then the body.
            let mut framer = BodyFramer::new(plan.body);
            match framer.push(&bbuf) {
                Ok(p) => {
                    out.extend_from_slice(&bbuf[..p.consumed]);
                    bbuf.drain(..p.consumed);
                }
                Err(e) => {
                    let msg = format!("invalid response body: {e}");
                    return ctx
                        .fail(
                            client,
                            guard,
                            ProxyError::BadResponse,
                            ErrorKind::Protocol,
                            msg,
                            done,
                        )
                        .await;
                }
            }
            enum P2 {
                Down(DownEnd),
                Up,
                Timeout,
            }
            let p2 = {
                let mut down = pin!(download(client, &conn, &mut bbuf, framer, out));
                poll_fn(|cx| {
                    if poll_upload(upload.as_mut(), &mut up_failed, cx).is_some() {
                        return Poll::Ready(P2::Up);
                    }
                    if let Poll::Ready(end) = down.as_mut().poll(cx) {
                        return Poll::Ready(P2::Down(end));
                    }
                    match Pin::new(&mut timer).poll(cx) {
                        Poll::Ready(_) => Poll::Ready(P2::Timeout),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await
            };
            match p2 {
                P2::Down(DownEnd::Done) => {
                    let done = req_done.load(Ordering::Acquire);
                    let self_delimited = matches!(
                        plan.body,
                        BodyKind::None | BodyKind::Length(_) | BodyKind::Chunked
                    );
                    let reuse = done
                        && up_failed.is_none()
                        && resp.keep_alive()
                        && self_delimited
                        && bbuf.is_empty();
                    let after = if plan.keep_alive && done {
                        After::KeepAlive
                    } else if done {
                        After::Close
                    } else {
                        After::Linger
                    };
                    Step::Finished {
                        after,
                        reuse,
                        status,
                    }
                }
                P2::Down(DownEnd::ClientGone) | P2::Up => return After::Gone,
                P2::Down(DownEnd::Backend(kind, msg)) => {
                    ctx.cut(guard, status, kind, msg);
                    return After::Gone;
                }
                P2::Timeout => {
                    let msg = "request timeout (--timeout) reached while streaming the response";
                    ctx.cut(guard, status, ErrorKind::Timeout, msg.into());
                    return After::Gone;
                }
            }
        }
    };
    let (resp, out) = match step {
        Step::Finished {
            after,
            reuse,
            status,
        } => {
            guard.finish(Outcome::Response(status));
            if reuse {
                shared.pool.put(id, conn);
            }
            return after;
        }
        Step::Upgrade(resp, out) => (resp, out),
    };

    // Phase 3: 101 Switching Protocols. The client may already have sent tunnel bytes
    // (kept in `cbuf`), and the backend may have sent some after its head (in `bbuf`).
    let status = resp.status;
    let result = async {
        send(client, &out).await?;
        send(client, &bbuf).await?;
        send(&conn, cbuf).await?;
        cbuf.clear();
        splice(client, &conn).await
    }
    .await;
    // The tunnel ends when either side closes; an error on the way is not the backend's
    // fault any more than the client's.
    let _ = result;
    guard.finish(Outcome::Response(status));
    After::Gone
}

/// Polls the upload unless it already ended; a non-fatal end (a failed backend write) is
/// kept in `failed`, a fatal one returned.
fn poll_upload<F>(
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
async fn send_head(
    shared: &Shared,
    id: BackendId,
    up: &Upstream,
    head: &[u8],
) -> Result<Stream, (ErrorKind, String)> {
    if let Some(conn) = shared.pool.take(id) {
        let mut written = 0;
        match write_counted(&conn, head, &mut written).await {
            Ok(()) => return Ok(conn),
            Err(e) if written > 0 => return Err((ErrorKind::Io, describe(&e))),
            Err(_) => {}
        }
    }
    let connect = future::or(shared.connector.connect(up), async {
        Timer::after(shared.settings.connect_timeout).await;
        Err(describe(&std::io::ErrorKind::TimedOut.into()))
    });
    let conn = connect.await.map_err(|m| (ErrorKind::Connect, m))?;
    let mut written = 0;
    match write_counted(&conn, head, &mut written).await {
        Ok(()) => Ok(conn),
        Err(e) => Err((ErrorKind::Io, describe(&e))),
    }
}

/// Client → backend: the rest of the request body as it arrives, then (the body complete,
/// `done` set) watching the client, so that one that leaves cancels the exchange.
async fn upload(
    client: &Stream,
    cbuf: &mut Vec<u8>,
    conn: &Stream,
    mut framer: BodyFramer,
    done: &AtomicBool,
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
async fn response_head(
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

/// Backend → client: the head (with the first body bytes), then the body as it arrives,
/// each read written through at once (server-sent events are not held back).
async fn download(
    client: &Stream,
    conn: &Stream,
    bbuf: &mut Vec<u8>,
    mut framer: BodyFramer,
    out: Vec<u8>,
) -> DownEnd {
    if send(client, &out).await.is_err() {
        return DownEnd::ClientGone;
    }
    drop(out);
    let mut size = ReadSize::new();
    let mut budget = Budget::new();
    while !framer.is_done() {
        match read_more(conn, bbuf, size.get()).await {
            Ok(0) => {
                return match framer.finish() {
                    Ok(()) => DownEnd::Done, // close-delimited: complete at EOF
                    Err(e) => DownEnd::Backend(ErrorKind::Io, e.to_string()),
                };
            }
            Ok(n) => size.record(n),
            Err(e) => return DownEnd::Backend(ErrorKind::Io, describe(&e)),
        }
        let p = match framer.push(bbuf) {
            Ok(p) => p,
            Err(e) => {
                return DownEnd::Backend(ErrorKind::Protocol, format!("invalid response body: {e}"))
            }
        };
        if send(client, &bbuf[..p.consumed]).await.is_err() {
            return DownEnd::ClientGone;
        }
        bbuf.drain(..p.consumed);
        budget.spend(p.consumed).await;
    }
    DownEnd::Done
}

/// What the failure paths need.
struct Ctx<'a> {
    shared: &'a Shared,
    id: BackendId,
    req: &'a RequestHead,
}

impl Ctx<'_> {
    fn log(&self, status: u16, error: String) {
        (self.shared.log)(Notice::ProxyError {
            backend: self.shared.upstream(self.id).url.clone(),
            request: format!("{} {}", self.req.method, self.req.target),
            status,
            error,
        });
    }

    /// The backend failed before a response head: answer `answer`, release as `Failed`.
    async fn fail(
        &self,
        client: &Stream,
        guard: LeaseGuard,
        answer: ProxyError,
        kind: ErrorKind,
        message: String,
        req_done: bool,
    ) -> After {
        let reply = reply::error(answer);
        self.log(reply.status, message.clone());
        guard.finish(Outcome::Failed {
            status: None,
            error: BackendError { kind, message },
        });
        self.answer(client, reply, req_done).await
    }

    async fn timeout(&self, client: &Stream, guard: LeaseGuard, req_done: bool) -> After {
        let msg = "no response before the request timeout (--timeout)".to_string();
        self.fail(
            client,
            guard,
            ProxyError::GatewayTimeout,
            ErrorKind::Timeout,
            msg,
            req_done,
        )
        .await
    }

    /// The client's request cannot be forwarded (bad body framing): 400, not the
    /// backend's fault.
    async fn reject(&self, client: &Stream, guard: LeaseGuard, answer: ProxyError) -> After {
        guard.finish(Outcome::Cancelled);
        let _ = write_reply(client, &reply::error(answer), self.req, false).await;
        After::Linger
    }

    /// Answers an error; the connection carries on only if the request was read whole.
    async fn answer(&self, client: &Stream, reply: reply::Reply, req_done: bool) -> After {
        let keep = req_done && self.req.keep_alive() && !self.shared.is_shutting_down();
        match write_reply(client, &reply, self.req, keep).await {
            Err(_) => After::Gone,
            Ok(()) if keep => After::KeepAlive,
            Ok(()) if req_done => After::Close,
            Ok(()) => After::Linger,
        }
    }

    /// The response was cut after its head: release as `Failed` with its status.
    fn cut(&self, guard: LeaseGuard, status: u16, kind: ErrorKind, message: String) {
        self.log(0, message.clone());
        guard.finish(Outcome::Failed {
            status: Some(status),
            error: BackendError { kind, message },
        });
    }
}
