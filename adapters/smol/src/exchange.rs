//! One proxied exchange: the request head and body to a backend, the response head and body
//! back, or a tunnel after `101`. Every byte is framed by `lb_http1`; the lease goes
//! back to the core with the outcome however the exchange ends.
//!
//! The steps, each raced against the request deadline (`--timeout` from the request's
//! arrival: reading a body prefix and waiting in the queue count) but the tunnel:
//!
//! 1. [`connect`]: a connection (pooled, else new) with the request head on it, while
//!    watching the client (a client that leaves cancels);
//! 2. [`await_head`]: the response head read (interim `1xx` heads forwarded), while the
//!    request body goes up and, once it is complete, the client is watched again;
//! 3. [`stream_body`]: the response head and body sent down, chunk by chunk as they
//!    arrive, while the upload (or the watch) goes on;
//! 4. [`tunnel`]: after `101`, both connections spliced until both directions end (or
//!    shutdown's deadline).
//!
//! **The keep-alive race.** A backend may close an idle keep-alive connection just as a
//! request goes out on it (its idle limit ran out, or it closes after every response
//! without saying so). The request then fails before any byte of a response arrives,
//! which says nothing about the backend's health: it is never counted against it
//! ([`ErrorKind::Reuse`]). When `lb` still holds the whole request (the head, and a body
//! complete within `--replay-buffer`), it is sent once more on a new connection; nothing
//! had reached the client yet.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use futures_lite::future;
use lb_core::RequestMeta;
use lb_http1::{
    rewrite_request, BodyFramer, BodyKind, Forwarding, RequestHead, ResponseHead, ResponsePlan,
};
use lb_proxy::reply::ProxyError;
use lb_proxy::reqlog::Capture;
use lb_proxy::{Account, Failure};

use crate::conn::{write_reply, After};
use crate::connect::describe;
use crate::io::{send, splice, watch, Stall};
use crate::pump::{
    download, hold_rest, poll_upload, response_head, send_fresh, send_head, upload, DownEnd,
    HeadFail, Reframe, Replay, UpEnd, Upward, WATCH_CAP,
};
use crate::reqlog::{Side, Tap};
use crate::rt::{LeaseGuard, Proxy, Shard, Upstream};
use crate::stream::Wire;
use crate::timers::Sleep;

/// Forwards `req` to the lease's backend and its response to the client, by `deadline`
/// (`--timeout` from the request's arrival); says whether the client connection carries
/// on. `cbuf` holds the bytes read from the client after the head (for content-based
/// routing, the body or its first part), and keeps what follows this request's body. The
/// request log's `capture` gets the backend, the status and both bodies; it is written
/// when the exchange ends (for an upgrade, once the `101` is sent).
///
/// A backend that cannot be reached (nothing of the request was written to it) hands the
/// request to another (`--connect-retries`, [`LeaseGuard::fail_over`]), chosen for `meta`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward<S: Shard, C: Wire>(
    local: &S,
    client: &C,
    cbuf: &mut Vec<u8>,
    peer: SocketAddr,
    req: RequestHead,
    meta: &RequestMeta<'_>,
    mut guard: LeaseGuard,
    deadline: Instant,
    capture: Option<Capture>,
    acct: &mut Account,
) -> After {
    let proxy = guard.proxy().clone();
    if let Some(c) = &capture {
        c.backend(guard.upstream().url().clone());
    }
    let mut x = Exchange {
        proxy: &proxy,
        local,
        client,
        up: guard.upstream().clone(),
        peer,
        req: &req,
        capture: capture.as_ref(),
        timer: local.timers().at(deadline),
        reused: false,
        acct,
    };

    // The head for the backend, with the body bytes already here.
    let Some((mut sent, mut upward)) = x.outgoing(cbuf) else {
        return x.reject(guard, ProxyError::BadRequest).await;
    };
    let body_read = upward.framer.is_done();
    let mut tried = Vec::new();
    let (mut conn, reused) = loop {
        match x.connect(cbuf, &sent).await {
            Ok(c) => break c,
            Err(End::Failed(f @ Failure::Connect(_))) => {
                guard = match x.fail_over(guard, f, meta, &mut tried, &mut sent) {
                    Ok(next) => next,
                    Err(reply) => return x.answer(reply, body_read).await,
                };
            }
            Err(end) => return x.end(guard, end, body_read).await,
        }
    };
    x.reused = reused;
    if reused {
        upward.replay = Replay::new(sent.bytes, sent.body, proxy.settings().replay_buffer);
    }

    let req_done = AtomicBool::new(body_read);
    let mut bbuf = Vec::new();
    let (resp, out) = loop {
        let step = x
            .exchange(&conn, cbuf, &mut bbuf, &mut upward, &req_done)
            .await;
        match step {
            Step::Finished {
                after,
                reuse,
                status,
            } => {
                guard.respond(status);
                if reuse {
                    local.keep(&x.up, conn);
                }
                return after;
            }
            Step::Upgrade(resp, out) => break (resp, out),
            Step::Cut { status, failure } => {
                guard.cut(status, failure, &x.line());
                return After::Gone;
            }
            Step::End(end) => {
                return x.end(guard, end, req_done.load(Ordering::Acquire)).await;
            }
            Step::Race(message) => {
                // Sent once more only if the whole request is here: its body complete
                // (the rest is read now if need be) and kept. A new connection that
                // cannot be made sends it to another backend (as the tokio build does);
                // any other failure on it is the backend's own.
                let whole = upward.replay.is_some() && x.hold_rest(cbuf, &mut upward).await;
                let Some(replay) = upward.replay.take().filter(|_| whole) else {
                    let done = upward.framer.is_done();
                    return x
                        .end(guard, End::Failed(Failure::Race(message)), done)
                        .await;
                };
                req_done.store(true, Ordering::Release);
                x.up.stats.retry(lb_proxy::metrics::Retry::KeepAliveRace);
                let (bytes, body) = replay.into_parts();
                let mut again = Sent { bytes, body };
                conn = loop {
                    match x.resend(cbuf, &again.bytes).await {
                        Ok(c) => break c,
                        // The backend is gone (the close was its end): like any request
                        // that reached no backend, it goes to another one.
                        Err(End::Failed(f @ Failure::Connect(_))) => {
                            guard = match x.fail_over(guard, f, meta, &mut tried, &mut again) {
                                Ok(next) => next,
                                Err(reply) => return x.answer(reply, true).await,
                            };
                        }
                        Err(end) => return x.end(guard, end, true).await,
                    }
                };
                x.reused = false;
            }
        }
    };
    // The request is logged now, as the tunnel may stay open for hours.
    drop((x, upward));
    drop(capture);
    tunnel(client, guard, conn, cbuf, &bbuf, resp.status, out).await
}

/// Room for what [`Exchange::head`] adds to a request head: the request line's version,
/// `Host`, the `X-Forwarded-*` headers with an IPv6 client address, `X-Request-Id`.
const ADDED_HEADERS: usize = 192;

/// The request head as sent, with the body bytes that went with it.
struct Sent {
    bytes: Vec<u8>,
    /// How many of `bytes` are body.
    body: usize,
}

/// How an exchange ended before a response was under way: the client gets an answer (or
/// is gone).
enum End {
    /// The backend failed (or the deadline passed): answer with the error.
    Failed(Failure),
    /// The client's request is malformed (bad body framing): 400, not the backend's fault.
    BadRequest,
    /// The client's body stalled (`--client-body-timeout`): 408, not the backend's fault.
    Stalled,
    /// The client went away: nothing to answer.
    ClientGone,
}

/// Where an exchange on one connection got to.
enum Step {
    /// The response was streamed to its end (`reuse`: the backend connection can take
    /// another request).
    Finished {
        after: After,
        reuse: bool,
        status: u16,
    },
    /// `101 Switching Protocols`: the rewritten head, then the tunnel.
    Upgrade(ResponseHead, Vec<u8>),
    /// The response was cut after its head (it had this status).
    Cut { status: u16, failure: Failure },
    /// It ended before a response was under way.
    End(End),
    /// A reused connection failed before any byte of a response: the keep-alive race.
    Race(String),
}

/// What the steps of one exchange share.
struct Exchange<'a, S, C> {
    proxy: &'a Proxy,
    local: &'a S,
    client: &'a C,
    /// The backend (another one after a failover).
    up: Arc<Upstream>,
    peer: SocketAddr,
    req: &'a RequestHead,
    capture: Option<&'a Capture>,
    /// The request deadline.
    timer: Sleep<'a>,
    /// Whether the connection in use came from the pool (only then can a failure be the
    /// keep-alive race; a new connection's failure is the backend's).
    reused: bool,
    /// The request's account.
    acct: &'a mut Account,
}

impl<'a, S: Shard, C: Wire> Exchange<'a, S, C> {
    /// The head for the backend with the body bytes already read (taken from `cbuf`),
    /// and the body's way up. `None` when the request's framing is invalid.
    fn outgoing(&mut self, cbuf: &mut Vec<u8>) -> Option<(Sent, Upward<'a>)> {
        // Room for the head as rewritten and the body bytes here: it is kept for the
        // whole exchange when the connection is reused (the keep-alive race's replay),
        // so it is sized to what it will hold rather than to a round guess.
        let room = self.req.method.len()
            + self.req.target.len()
            + self.up.target.authority.len()
            + self.up.target.path_prefix.len()
            + self
                .req
                .headers
                .iter()
                .map(|h| h.name().len() + h.value().len() + 4)
                .sum::<usize>()
            + ADDED_HEADERS
            + cbuf.len();
        let mut head = Vec::with_capacity(room);
        let kind = self.head(&mut head).ok()?;
        let mut framer = BodyFramer::new(kind);
        let mut tap = Tap::new(self.capture, Side::Request, kind);
        let pushed = framer.push(cbuf).ok()?;
        let early = pushed.consumed;
        let counted = (kind != BodyKind::None && kind != BodyKind::Length(0)).then(|| {
            let c = self.acct.body_counter();
            c.fetch_add(pushed.data as u64, Ordering::Relaxed);
            c
        });
        if let Some(tap) = &mut tap {
            tap.feed(&cbuf[..early]);
        }
        head.extend_from_slice(&cbuf[..early]);
        cbuf.drain(..early);
        let upward = Upward {
            stall: Stall {
                timers: self.local.timers(),
                limit: self.proxy.settings().client_body_timeout,
            },
            continue_due: self.req.expects_continue() && !framer.is_done(),
            framer,
            tap,
            replay: None,
            counted,
        };
        Some((
            Sent {
                bytes: head,
                body: early,
            },
            upward,
        ))
    }

    /// Writes the head for the backend into `out`; says how the body is framed.
    fn head(&self, out: &mut Vec<u8>) -> Result<BodyKind, lb_http1::Error> {
        let fwd = Forwarding {
            client_ip: lb_proxy::client_ip(self.peer.ip()),
            client_proto: "http",
            backend_authority: &self.up.target.authority,
            backend_path_prefix: &self.up.target.path_prefix,
        };
        let kind = rewrite_request(self.req, &fwd, out)?;
        if !self.acct.kept_client_id() {
            // Before the head's final empty line.
            out.truncate(out.len() - 2);
            out.extend_from_slice(b"X-Request-Id: ");
            out.extend_from_slice(self.acct.id().as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
        }
        Ok(kind)
    }

    /// The request reached no backend (`failure`): it goes to another one, if one is
    /// left ([`LeaseGuard::fail_over`]), and `sent` is written again for it (the head
    /// names its backend: Host, path prefix). Err: the reply for the client.
    fn fail_over(
        &mut self,
        guard: LeaseGuard,
        failure: Failure,
        meta: &RequestMeta<'_>,
        tried: &mut Vec<lb_core::BackendId>,
        sent: &mut Sent,
    ) -> Result<LeaseGuard, lb_proxy::reply::Reply> {
        let mut guard = guard.fail_over(failure, &self.line(), meta, tried)?;
        self.acct.serve(&mut guard);
        self.up = guard.upstream().clone();
        if let Some(c) = self.capture {
            c.backend(self.up.url().clone());
        }
        self.rehead(sent);
        Ok(guard)
    }

    /// `sent` again for the backend now chosen (after a failover): its head, then the
    /// same body bytes.
    fn rehead(&self, sent: &mut Sent) {
        let body = sent.bytes.split_off(sent.bytes.len() - sent.body);
        sent.bytes.clear();
        // Its framing was accepted for the first backend: it is the same request.
        let _ = self.head(&mut sent.bytes);
        sent.bytes.extend_from_slice(&body);
    }

    /// Step 1: a connection with the head on it (and whether it was reused).
    async fn connect(&mut self, cbuf: &mut Vec<u8>, sent: &Sent) -> Result<(S::Conn, bool), End> {
        let (proxy, local, up) = (self.proxy, self.local, self.up.clone());
        self.guarded(cbuf, send_head(proxy, local, &up, &sent.bytes))
            .await
    }

    /// A new connection with `bytes` (the whole request, after the keep-alive race) on it.
    async fn resend(&mut self, cbuf: &mut Vec<u8>, bytes: &[u8]) -> Result<S::Conn, End> {
        let (proxy, local, up) = (self.proxy, self.local, self.up.clone());
        self.guarded(cbuf, send_fresh(proxy, local, &up, bytes))
            .await
    }

    /// Reads the rest of the request body into its replay copy, within the deadline.
    async fn hold_rest(&mut self, cbuf: &mut Vec<u8>, upward: &mut Upward<'_>) -> bool {
        let client = self.client;
        let timer = &mut self.timer;
        future::or(hold_rest(client, cbuf, upward), async {
            timer.await;
            false
        })
        .await
    }

    /// Runs `work` while watching the client and the deadline.
    async fn guarded<T>(
        &mut self,
        cbuf: &mut Vec<u8>,
        work: impl Future<Output = Result<T, Failure>>,
    ) -> Result<T, End> {
        let client = self.client;
        let timer = &mut self.timer;
        future::or(
            async { work.await.map_err(End::Failed) },
            future::or(
                async {
                    watch(client, cbuf, WATCH_CAP).await;
                    Err(End::ClientGone)
                },
                async {
                    timer.await;
                    Err(End::Failed(Failure::Timeout))
                },
            ),
        )
        .await
    }

    /// Steps 2 and 3 on `conn`: the response head, then its body, while the request body
    /// goes up.
    async fn exchange(
        &mut self,
        conn: &S::Conn,
        cbuf: &mut Vec<u8>,
        bbuf: &mut Vec<u8>,
        upward: &mut Upward<'_>,
        req_done: &AtomicBool,
    ) -> Step {
        let mut up_failed: Option<std::io::Error> = None;
        let mut upload = pin!(upload(self.client, cbuf, conn, upward, req_done));
        let (resp, plan, out) = match self
            .await_head(conn, bbuf, upload.as_mut(), &mut up_failed, req_done)
            .await
        {
            Ok(head) => head,
            Err(step) => return step,
        };
        if let Some(ka) = resp.header("keep-alive") {
            self.up.idle.learn(ka);
        }
        if let Some(c) = self.capture {
            c.status(resp.status);
        }
        self.acct.status(resp.status);
        if plan.is_upgrade() {
            return Step::Upgrade(resp, out);
        }
        self.stream_body(
            conn,
            bbuf,
            upload,
            &mut up_failed,
            req_done,
            resp,
            plan,
            out,
        )
        .await
    }

    /// Step 2: the final response head (interim heads forwarded), while the upload goes
    /// on.
    async fn await_head<F: Future<Output = UpEnd>>(
        &mut self,
        conn: &S::Conn,
        bbuf: &mut Vec<u8>,
        mut upload: Pin<&mut F>,
        up_failed: &mut Option<std::io::Error>,
        req_done: &AtomicBool,
    ) -> Result<(ResponseHead, ResponsePlan, Vec<u8>), Step> {
        enum Got {
            Head(ResponseHead, ResponsePlan, Vec<u8>),
            Fail(HeadFail),
            Up(UpEnd),
            Timeout,
        }
        let got = {
            let mut down = pin!(response_head(
                self.proxy,
                self.client,
                conn,
                bbuf,
                self.req,
                req_done,
                self.acct.id(),
            ));
            let timer = &mut self.timer;
            poll_fn(|cx| {
                if let Some(end) = poll_upload(upload.as_mut(), up_failed, cx) {
                    return Poll::Ready(Got::Up(end));
                }
                if let Poll::Ready(r) = down.as_mut().poll(cx) {
                    return Poll::Ready(match r {
                        Ok((resp, plan, out)) => Got::Head(resp, plan, out),
                        Err(e) => Got::Fail(e),
                    });
                }
                match Pin::new(&mut *timer).poll(cx) {
                    Poll::Ready(_) => Poll::Ready(Got::Timeout),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        };
        Err(Step::End(match got {
            Got::Head(resp, plan, out) => return Ok((resp, plan, out)),
            Got::Up(UpEnd::BadBody) => End::BadRequest,
            Got::Up(UpEnd::Stalled) => End::Stalled,
            Got::Up(_) | Got::Fail(HeadFail::ClientGone) => End::ClientGone,
            Got::Fail(HeadFail::Io { message, silent }) => {
                let message = match up_failed.take() {
                    Some(e) => {
                        format!("{message} (after a failed request write: {})", describe(&e))
                    }
                    None => message,
                };
                if silent && self.reused {
                    return Err(Step::Race(message));
                }
                End::Failed(Failure::Io(message))
            }
            Got::Fail(HeadFail::Invalid(e)) => {
                let message = format!("invalid response: {e}");
                End::Failed(match e {
                    // Valid HTTP beyond what lb passes on: not the backend's ill health.
                    lb_http1::Error::HeadTooLarge
                    | lb_http1::Error::TooManyHeaders
                    | lb_http1::Error::UnsupportedTransferEncoding => Failure::Unsupported(message),
                    _ => Failure::Invalid(message),
                })
            }
            Got::Timeout => End::Failed(Failure::Timeout),
        }))
    }

    /// Step 3: the head (with the body bytes already here), then the body.
    #[allow(clippy::too_many_arguments)]
    async fn stream_body<F: Future<Output = UpEnd>>(
        &mut self,
        conn: &S::Conn,
        bbuf: &mut Vec<u8>,
        mut upload: Pin<&mut F>,
        up_failed: &mut Option<std::io::Error>,
        req_done: &AtomicBool,
        resp: ResponseHead,
        plan: ResponsePlan,
        mut out: Vec<u8>,
    ) -> Step {
        let status = resp.status;
        let mut framer = BodyFramer::new(plan.body);
        let mut tap = Tap::new(self.capture, Side::Response, plan.body);
        let early_data;
        let mut reframe = Reframe::of(&plan);
        match framer.push(bbuf) {
            Ok(p) => {
                early_data = p.data;
                if let Some(tap) = &mut tap {
                    tap.feed(&bbuf[..p.consumed]);
                }
                reframe.push(&bbuf[..p.consumed], &mut out);
                bbuf.drain(..p.consumed);
            }
            Err(e) => {
                let msg = format!("invalid response body: {e}");
                return Step::End(End::Failed(Failure::Invalid(msg)));
            }
        }
        enum Got {
            Down(DownEnd),
            Up,
            Timeout,
        }
        let got = {
            let mut down = pin!(download(
                self.client,
                conn,
                bbuf,
                framer,
                (out, early_data),
                tap,
                reframe,
                &mut *self.acct,
            ));
            let timer = &mut self.timer;
            poll_fn(|cx| {
                if poll_upload(upload.as_mut(), up_failed, cx).is_some() {
                    return Poll::Ready(Got::Up);
                }
                if let Poll::Ready(end) = down.as_mut().poll(cx) {
                    return Poll::Ready(Got::Down(end));
                }
                match Pin::new(&mut *timer).poll(cx) {
                    Poll::Ready(_) => Poll::Ready(Got::Timeout),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        };
        let failure = match got {
            Got::Down(DownEnd::Done) => {
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
                return Step::Finished {
                    after,
                    reuse,
                    status,
                };
            }
            Got::Down(DownEnd::ClientGone) | Got::Up => return Step::End(End::ClientGone),
            Got::Down(DownEnd::Backend(failure)) => failure,
            Got::Timeout => Failure::Timeout,
        };
        Step::Cut { status, failure }
    }

    /// The request as the log names it.
    fn line(&self) -> String {
        format!("{} {}", self.req.method, self.req.target)
    }

    /// Answers the client for an exchange that ended before a response was under way,
    /// and releases the lease with the matching outcome.
    async fn end(&mut self, guard: LeaseGuard, end: End, req_done: bool) -> After {
        let reply = match end {
            End::ClientGone => return After::Gone,
            End::BadRequest => return self.reject(guard, ProxyError::BadRequest).await,
            End::Stalled => return self.reject(guard, ProxyError::BodyTimeout).await,
            End::Failed(failure) => guard.fail(failure, &self.line()),
        };
        self.answer(reply, req_done).await
    }

    /// Sends `reply` (an error) to the client; the connection carries on only if the
    /// request was read whole.
    async fn answer(&mut self, reply: lb_proxy::reply::Reply, req_done: bool) -> After {
        if let Some(c) = self.capture {
            c.reply(&reply);
        }
        self.acct.replied(&reply);
        let keep = req_done && self.req.keep_alive() && !self.proxy.is_shutting_down();
        match write_reply(self.client, &reply, self.req, keep).await {
            Err(_) => After::Gone,
            Ok(()) if keep => After::KeepAlive,
            Ok(()) if req_done => After::Close,
            Ok(()) => After::Linger,
        }
    }

    /// The client's request cannot be forwarded (bad body framing): 400, not the
    /// backend's fault.
    async fn reject(&mut self, guard: LeaseGuard, answer: ProxyError) -> After {
        drop(guard); // not the backend's fault: released as cancelled
        let reply = self.acct.reply(answer);
        if let Some(c) = self.capture {
            c.reply(&reply);
        }
        let _ = write_reply(self.client, &reply, self.req, false).await;
        After::Linger
    }
}

/// Step 4: `101 Switching Protocols`. The client may already have sent tunnel bytes (kept
/// in `cbuf`), and the backend may have sent some after its head (`bbuf`).
async fn tunnel<C: Wire, B: Wire>(
    client: &C,
    guard: LeaseGuard,
    conn: B,
    cbuf: &mut Vec<u8>,
    bbuf: &[u8],
    status: u16,
    out: Vec<u8>,
) -> After {
    let result = async {
        send(client, &out).await?;
        send(client, bbuf).await?;
        send(&conn, cbuf).await?;
        cbuf.clear();
        splice(client, &conn).await
    }
    .await;
    // The tunnel ends when either side closes; an error on the way is not the backend's
    // fault any more than the client's.
    let _ = result;
    guard.respond(status);
    After::Gone
}
