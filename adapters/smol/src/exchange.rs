//! One proxied exchange: the request head and body to a backend, the response head and body
//! back, or a tunnel after `101`. Every byte is framed by `lb_core::http1`; the lease goes
//! back to the core with the outcome however the exchange ends.
//!
//! Phases 0 to 2 are raced against the request deadline (`--timeout` from the request's
//! arrival: reading a body prefix and waiting in the queue count); a tunnel is not:
//!
//! 0. a connection (pooled, else new) and the request head written to it, while watching
//!    the client (a client that leaves cancels);
//! 1. the response head read (interim `1xx` heads forwarded), while the request body goes
//!    up and, once it is complete, the client is watched again;
//! 2. the response head and body sent down, chunk by chunk as they arrive;
//! 3. after `101`: both connections spliced until both directions end (or shutdown's
//!    deadline).

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use futures_lite::future;
use lb_core::http1::{
    rewrite_request, BodyFramer, BodyKind, Forwarding, RequestHead, ResponseHead, ResponsePlan,
};
use lb_core::reply::{self, ProxyError};
use lb_core::reqlog::Capture;
use lb_core::{BackendError, BackendId, ErrorKind, Notice, Outcome};

use crate::conn::{write_reply, After};
use crate::connect::describe;
use crate::io::{send, splice, watch};
use crate::pump::{
    download, poll_upload, response_head, send_head, upload, DownEnd, HeadFail, UpEnd, WATCH_CAP,
};
use crate::reqlog::{Side, Tap};
use crate::shared::{LeaseGuard, Local, Shared};
use crate::stream::Stream;

/// Forwards `req` to the lease's backend and its response to the client, by `deadline`
/// (`--timeout` from the request's arrival); says whether the client connection carries
/// on. `cbuf` holds the bytes read from the client after the head (for content-based
/// routing, the body or its first part), and keeps what follows this request's body. The
/// request log's `capture` gets the backend, the status and both bodies; it is written
/// when the exchange ends (for an upgrade, once the `101` is sent).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward(
    shared: &Arc<Shared>,
    local: &Local,
    client: &Stream,
    cbuf: &mut Vec<u8>,
    peer: SocketAddr,
    req: RequestHead,
    guard: LeaseGuard,
    deadline: Instant,
    capture: Option<Capture>,
) -> After {
    let id = guard.backend();
    let up = shared.upstream(id);
    let mut timer = local.timers.at(deadline);
    if let Some(c) = &capture {
        c.backend(up.url.clone());
    }
    let ctx = Ctx {
        shared,
        id,
        req: &req,
        capture: capture.as_ref(),
    };

    // The head for the backend, with the body bytes already here.
    let mut head = Vec::with_capacity(1024);
    let fwd = Forwarding {
        client_ip: peer.ip().to_canonical(),
        client_proto: "http",
        backend_authority: &up.target.authority,
        backend_path_prefix: &up.target.path_prefix,
    };
    let (mut framer, mut up_tap) = match rewrite_request(&req, &fwd, &mut head) {
        Ok(kind) => (
            BodyFramer::new(kind),
            Tap::new(capture.as_ref(), Side::Request, kind),
        ),
        Err(_) => return ctx.reject(client, guard, ProxyError::BadRequest).await,
    };
    let early = match framer.push(cbuf) {
        Ok(p) => p.consumed,
        Err(_) => return ctx.reject(client, guard, ProxyError::BadRequest).await,
    };
    if let Some(tap) = &mut up_tap {
        tap.feed(&cbuf[..early]);
    }
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
            match send_head(shared, local, id, up, &head).await {
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
        let mut upload = pin!(upload(client, cbuf, &conn, framer, &req_done, up_tap));

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
        if let Some(c) = &capture {
            c.status(status);
        }
        if plan.is_upgrade() {
            Step::Upgrade(resp, out)
        } else {
            // Phase 2: the head (with the body bytes already here), then the body.
            let mut framer = BodyFramer::new(plan.body);
            let mut down_tap = Tap::new(capture.as_ref(), Side::Response, plan.body);
            match framer.push(&bbuf) {
                Ok(p) => {
                    if let Some(tap) = &mut down_tap {
                        tap.feed(&bbuf[..p.consumed]);
                    }
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
                let mut down = pin!(download(client, &conn, &mut bbuf, framer, out, down_tap));
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
                local.pool.put(id, conn);
            }
            return after;
        }
        Step::Upgrade(resp, out) => (resp, out),
    };

    // Phase 3: 101 Switching Protocols. The client may already have sent tunnel bytes
    // (kept in `cbuf`), and the backend may have sent some after its head (in `bbuf`).
    // The request is logged now, as the tunnel may stay open for hours.
    drop(capture);
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

/// What the failure paths need.
struct Ctx<'a> {
    shared: &'a Shared,
    id: BackendId,
    req: &'a RequestHead,
    capture: Option<&'a Capture>,
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
        let reply = reply::error(answer);
        if let Some(c) = self.capture {
            c.reply(&reply);
        }
        let _ = write_reply(client, &reply, self.req, false).await;
        After::Linger
    }

    /// Answers an error; the connection carries on only if the request was read whole.
    async fn answer(&self, client: &Stream, reply: reply::Reply, req_done: bool) -> After {
        if let Some(c) = self.capture {
            c.reply(&reply);
        }
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
