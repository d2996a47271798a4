//! Each shard's keep-alive connections to backends, driven by the request that uses them.
//!
//! A backend connection is a hyper HTTP/1 `SendRequest` and its `Connection` future. Unlike
//! hyper-util's pooled client, which runs every connection as a task of its own (so each
//! request and each body chunk hops between two tasks), the connection here is polled by
//! the task of the client connection it is serving: first while the request goes out and
//! the response head comes back ([`Exchange::send`]), then from the response body handed
//! to hyper's server ([`Lent`], inside `body::Streamed`). When the response has been read
//! to its end and hyper says the connection can take another request, it goes back to the
//! shard's idle list; nobody polls it there.
//!
//! Rules kept from the field:
//! - An idle connection is never used after its backend's idle limit (4 s, below
//!   uvicorn's 5 s keep-alive, or less when the backend announces `Keep-Alive:
//!   timeout=N`), and a reaper closes expired ones so they do not sit half-closed. One the
//!   backend closed meanwhile is noticed at check-out: hyper reads its end of stream when
//!   the connection is polled there.
//! - The keep-alive race: a request whose *reused* connection failed before any byte of
//!   the response arrived (the backend closed it as the request went out) is sent once
//!   more on a new connection, if `lb` still holds it whole: hyper hands back one it never
//!   wrote, else the head was copied before sending and the body kept (`upbody::Replay`)
//!   within `--replay-buffer`. If the new connection cannot be made (the backend is
//!   gone: the close was its end), the request goes to another backend like any request
//!   that reached none (`--connect-retries`); any other failure there is the backend's
//!   own, and nothing else is re-sent. The smol build follows the same rule.
//! - Dropping a lent connection mid-exchange (the client left) closes it: the backend sees
//!   the request cancelled at once.

use lb_core::BackendId;
use lb_proxy::metrics::{BackendStats, Retry, UpstreamConn};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower_service::Service;

use crate::client::Connector;
use crate::proxy::{client_side, describe, describe_connect};
use crate::rt::{Backend, Upstream};
use crate::upbody::{Replay, UpBody};

/// A backend connection as hyper's client sees it.
type Io = TokioIo<Counted>;

/// A backend connection's stream. Plain TCP is read and written directly; hyper-rustls's
/// stream (hyper's traits over tokio's, over hyper's) is kept only for `https://`
/// backends, boxed as it holds the TLS session (so a plain connection does not carry its
/// size). Taking plain requests off its two adapter layers saved 0.2k instructions per
/// request (`tests/load/instructions.sh`: 43,344 -> 43,159).
enum Stream {
    Plain(TcpStream),
    Tls(Box<TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>>),
}

impl From<MaybeHttpsStream<TokioIo<TcpStream>>> for Stream {
    fn from(io: MaybeHttpsStream<TokioIo<TcpStream>>) -> Self {
        match io {
            MaybeHttpsStream::Http(tcp) => Stream::Plain(tcp.into_inner()),
            tls => Stream::Tls(Box::new(TokioIo::new(tls))),
        }
    }
}

/// A backend stream that counts the bytes read from it, so that a failed exchange tells
/// whether any of its response arrived (see the keep-alive race in the module docs).
pub(crate) struct Counted {
    stream: Stream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        };
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// Why an exchange with a backend failed.
pub(crate) enum SendError {
    /// No connection could be made (refused, timed out, TLS).
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed after the request was (at least partly) sent.
    Http(hyper::Error),
    /// A reused connection failed before any byte of the response arrived, and the
    /// request could not be sent again (its body was not held whole): the keep-alive
    /// race, not the backend's fault.
    Race(hyper::Error),
    /// The request never reached the backend (no connection could be made, or a new one
    /// failed before any byte of it was written): it comes back, to go elsewhere.
    Unreached(String, Box<Request<UpBody>>),
}

/// A keep-alive connection to one backend.
pub(crate) struct Conn {
    send: SendRequest<UpBody>,
    /// `None` once the connection future has finished (closed or failed). Boxed: it is
    /// about 1.7 KB, and a `Conn` moves with every response that carries it.
    conn: Option<Box<Connection<Io, UpBody>>>,
    /// When it went idle (for the idle timeout).
    idle_since: Instant,
    /// Bytes read from it so far.
    read: Arc<AtomicU64>,
}

impl Conn {
    /// Drives the connection: writes what is queued, reads what arrived. Returns `false`
    /// once it has closed.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        match Pin::new(&mut **conn).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(_) => {
                self.conn = None;
                false
            }
        }
    }

    /// Whether it can take another request now (polled once to notice a close).
    fn reusable(&mut self, cx: &mut Context<'_>) -> bool {
        self.poll_io(cx) && self.send.is_ready()
    }
}

/// The idle connections of one shard, by backend slot; each list tagged with the backend
/// it holds connections to (a slot freed by a removal may go to another backend).
pub(crate) struct Pool {
    idle: Mutex<Vec<(Option<BackendId>, Vec<Conn>)>>,
    connector: Connector,
    builder: http1::Builder,
}

impl Pool {
    /// A pool whose connections buffer at most `max_head` bytes of a response head.
    pub(crate) fn new(connector: Connector, max_head: usize) -> Self {
        let mut builder = http1::Builder::new();
        // hyper's buffer must hold a whole head: beyond it, the response is refused.
        builder.max_buf_size(max_head.max(8192));
        Pool {
            idle: Mutex::new(Vec::new()),
            connector,
            builder,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Option<BackendId>, Vec<Conn>)>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection to `slot` that is still open and young
    /// enough. Older ones found on the way are closed.
    fn checkout(&self, id: BackendId, limit: Duration, cx: &mut Context<'_>) -> Option<Conn> {
        let now = Instant::now();
        loop {
            let mut c = {
                let mut idle = self.lock();
                let (owner, list) = idle.get_mut(id.slot())?;
                if *owner != Some(id) {
                    return None;
                }
                list.pop()?
            };
            if now.duration_since(c.idle_since) < limit && c.reusable(cx) {
                return Some(c);
            }
        }
    }

    /// Returns a connection whose exchange has ended, if it can serve another request
    /// (and may sit idle at all: `limit` above 0).
    fn checkin(&self, id: BackendId, limit: Duration, mut c: Conn, cx: &mut Context<'_>) {
        if limit.is_zero() || !c.reusable(cx) {
            return;
        }
        c.idle_since = Instant::now();
        let mut idle = self.lock();
        let slot = id.slot();
        if idle.len() <= slot {
            idle.resize_with(slot + 1, || (None, Vec::new()));
        }
        let (owner, list) = &mut idle[slot];
        if *owner != Some(id) {
            // The slot's previous backend left the pool: its connections go.
            *owner = Some(id);
            list.clear();
        }
        list.push(c);
    }

    /// A new connection to the backend `to` (at its `base`: scheme and address; with its
    /// own connector when it has one). Boxed: its future holds a TLS-capable stream and
    /// hyper's handshake, state that is gone once connected and that the request's own
    /// future need not carry.
    fn connect<'a>(
        &'a self,
        to: &'a Backend,
    ) -> Pin<Box<dyn Future<Output = Result<Conn, SendError>> + Send + 'a>> {
        Box::pin(self.connect_inner(to))
    }

    async fn connect_inner(&self, to: &Backend) -> Result<Conn, SendError> {
        let io = to
            .connector
            .as_ref()
            .unwrap_or(&self.connector)
            .clone()
            .call(to.base.clone())
            .await
            .map_err(SendError::Connect)?;
        let read = Arc::new(AtomicU64::new(0));
        let io = TokioIo::new(Counted {
            stream: io.into(),
            read: read.clone(),
        });
        let (send, conn) = self.builder.handshake(io).await.map_err(SendError::Http)?;
        Ok(Conn {
            send,
            conn: Some(Box::new(conn)),
            idle_since: Instant::now(),
            read,
        })
    }

    /// A one-off connection for an upgrade (WebSocket): run as a task of its own, since
    /// after the `101` the upgraded IO is spliced elsewhere. Never pooled.
    pub(crate) async fn upgrade(
        &self,
        to: &Backend,
        req: Request<UpBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let Conn { mut send, conn, .. } = self.connect(to).await?;
        if let Some(conn) = conn {
            tokio::spawn((*conn).with_upgrades());
        }
        send.send_request(req).await.map_err(SendError::Http)
    }

    /// Closes idle connections past their backend's idle limit (`limit` of its slot),
    /// every `period`, for as long as the pool is used.
    pub(crate) async fn reap(
        pool: std::sync::Weak<Pool>,
        period: Duration,
        limit: impl Fn(usize) -> Duration,
    ) {
        loop {
            tokio::time::sleep(period).await;
            let Some(pool) = pool.upgrade() else { return };
            let now = Instant::now();
            let expired: Vec<Conn> = {
                let mut idle = pool.lock();
                let mut out = Vec::new();
                for (slot, (_, conns)) in idle.iter_mut().enumerate() {
                    let limit = limit(slot);
                    // Oldest first: the list is pushed and popped at its end.
                    let keep = conns
                        .iter()
                        .position(|c| now.duration_since(c.idle_since) < limit)
                        .unwrap_or(conns.len());
                    out.extend(conns.drain(..keep));
                }
                out
            };
            drop(expired);
        }
    }

    /// Sends `req` to `upstream` and waits for the response head, driving the connection
    /// from the calling task. On success the connection comes back lent to the response
    /// body. `replay` is the request body's copy, if it has a body.
    ///
    /// An `async` block, not an `async fn`: that would keep `req` twice (argument and
    /// local) in a state every request's future carries.
    #[allow(clippy::manual_async_fn)] // `async fn` would store the arguments twice
    pub(crate) fn send<'a>(
        &'a self,
        upstream: &'a Upstream,
        req: Request<UpBody>,
        replay: Option<&'a Arc<Replay>>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Conn), SendError>> + Send + 'a {
        async move {
            let (id, limit) = (upstream.id(), upstream.idle.get());
            let stats = &upstream.stats;
            let pooled = poll_fn(|cx| Poll::Ready(self.checkout(id, limit, cx))).await;
            let Some(mut c) = pooled else {
                // Boxed: a new connection's state (the connect) would otherwise enlarge
                // every request's future, and a pooled connection is the usual case.
                return Box::pin(self.fresh(&upstream.ext, stats, req)).await;
            };
            stats.connection(UpstreamConn::Reused);
            // Kept until the response head: the request may have to go out again.
            let head = HeadCopy::of(&req);
            let read = c.read.load(Ordering::Relaxed);
            match exchange(&mut c, req).await {
                Ok(resp) => Ok((resp, c)),
                // Boxed, as rare as a new connection.
                Err(e) => Box::pin(self.again(upstream, c, read, head, e, replay)).await,
            }
        }
    }

    /// After a failed exchange on a reused connection `c` (which had read `read` bytes
    /// before it): `req` goes out again on a fresh connection if nothing of the response
    /// arrived, else the error stands.
    async fn again(
        &self,
        upstream: &Upstream,
        c: Conn,
        read: u64,
        head: HeadCopy,
        mut e: hyper::client::conn::TrySendError<Request<UpBody>>,
        replay: Option<&Arc<Replay>>,
    ) -> Result<(Response<Incoming>, Conn), SendError> {
        let again = match e.take_message() {
            // Found closed before any byte of the request went out.
            Some(req) => req,
            // The keep-alive race: nothing of the response arrived (and the client's own
            // body did not fail).
            None if c.read.load(Ordering::Relaxed) == read && !client_side(e.error()) => {
                // Dropping the connection drops what hyper held of the body, which hands
                // the unread rest back to `replay`.
                drop(c);
                let body = match replay {
                    None => Some(UpBody::empty()),
                    Some(r) => r.complete().await.map(UpBody::replayed),
                };
                match body {
                    Some(body) => Request::from_parts(head.into_parts(), body),
                    None => return Err(SendError::Race(e.into_error())),
                }
            }
            None => return Err(SendError::Http(e.into_error())),
        };
        upstream.stats.retry(Retry::KeepAliveRace);
        self.fresh(&upstream.ext, &upstream.stats, again).await
    }

    /// `req` on a new connection. A request that never left (no connection, or one that
    /// failed before any byte of it was written) comes back: it may go to another backend.
    async fn fresh(
        &self,
        base: &Backend,
        stats: &BackendStats,
        req: Request<UpBody>,
    ) -> Result<(Response<Incoming>, Conn), SendError> {
        let connected = self.connect(base).await;
        stats.connection(if connected.is_ok() {
            UpstreamConn::New
        } else {
            UpstreamConn::Failed
        });
        let mut c = match connected {
            Ok(c) => c,
            Err(SendError::Connect(e)) => {
                return Err(SendError::Unreached(
                    describe_connect(e.as_ref()),
                    Box::new(req),
                ))
            }
            Err(e) => return Err(e),
        };
        match exchange(&mut c, req).await {
            Ok(resp) => Ok((resp, c)),
            Err(mut e) => match e.take_message() {
                Some(req) => Err(SendError::Unreached(describe(e.error()), Box::new(req))),
                None => Err(SendError::Http(e.into_error())),
            },
        }
    }
}

/// A request head, copied before it goes out on a reused connection, to send it again.
/// The header values are copied into one buffer of their own: the request's own share
/// hyper's read buffer, which they would keep alive for as long as the backend thinks.
struct HeadCopy {
    method: Method,
    uri: Uri,
    version: Version,
    names: Vec<(HeaderName, usize)>,
    values: BytesMut,
}

impl HeadCopy {
    fn of<B>(req: &Request<B>) -> Self {
        let h = req.headers();
        let mut names = Vec::with_capacity(h.len());
        let mut values = BytesMut::with_capacity(h.iter().map(|(_, v)| v.len()).sum());
        for (name, value) in h {
            values.extend_from_slice(value.as_bytes());
            names.push((name.clone(), value.len()));
        }
        HeadCopy {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            names,
            values,
        }
    }

    fn into_parts(self) -> http::request::Parts {
        let mut values: Bytes = self.values.freeze();
        let mut headers = HeaderMap::with_capacity(self.names.len());
        for (name, len) in self.names {
            let value = values.split_to(len);
            // Copied from valid values: cannot fail.
            if let Ok(v) = HeaderValue::from_maybe_shared(value) {
                headers.append(name, v);
            }
        }
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method;
        parts.uri = self.uri;
        parts.version = self.version;
        parts.headers = headers;
        parts
    }
}

/// One request on `c`: queue it, then poll the connection (which writes it and reads the
/// response head) and the response future together until the head is in.
///
/// A future of its own rather than an `async fn`: that would hold `req` twice (argument and
/// local), and this state sits in every request's future.
fn exchange(c: &mut Conn, req: Request<UpBody>) -> Exchange<'_, impl Future<Output = Exchanged>> {
    let response = c.send.try_send_request(req);
    Exchange { c, response }
}

type Exchanged = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<UpBody>>>;

pin_project_lite::pin_project! {
    struct Exchange<'a, F> {
        c: &'a mut Conn,
        #[pin]
        response: F,
    }
}

impl<F: Future<Output = Exchanged>> Future for Exchange<'_, F> {
    type Output = Exchanged;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Exchanged> {
        let this = self.project();
        // The connection first: it takes the request off the channel, writes it, and
        // reads; the response future then sees what it delivered.
        this.c.poll_io(cx);
        this.response.poll(cx)
    }
}

/// A connection lent to a response body: polled with it, returned to the pool when the
/// body has been read to its end, closed if dropped before.
pub(crate) struct Lent {
    conn: Option<Conn>,
    pool: Arc<Pool>,
    upstream: Arc<Upstream>,
}

impl Lent {
    pub(crate) fn new(conn: Option<Conn>, pool: Arc<Pool>, upstream: Arc<Upstream>) -> Self {
        Lent {
            conn,
            pool,
            upstream,
        }
    }

    /// Drives the connection so the response body makes progress.
    pub(crate) fn poll_io(&mut self, cx: &mut Context<'_>) {
        if let Some(c) = self.conn.as_mut() {
            c.poll_io(cx);
        }
    }

    /// The response was read to its end: the connection goes back to the pool if it can
    /// take another request.
    pub(crate) fn finish(&mut self, cx: &mut Context<'_>) {
        if let Some(c) = self.conn.take() {
            let (id, limit) = (self.upstream.id(), self.upstream.idle.get());
            self.pool.checkin(id, limit, c, cx);
        }
    }

    /// `finish` from async code.
    pub(crate) async fn finish_now(mut self) {
        poll_fn(|cx| {
            self.finish(cx);
            Poll::Ready(())
        })
        .await
    }
}
