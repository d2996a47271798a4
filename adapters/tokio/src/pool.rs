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
//! - An idle connection is never used after `pool_idle_timeout` (4 s, below uvicorn's 5 s
//!   keep-alive), and a reaper closes expired ones so they do not sit half-closed.
//! - A request whose *reused* connection turned out closed before any byte of it was
//!   written (hyper hands the request back) is sent once more on a fresh connection.
//!   Nothing else is re-sent.
//! - Dropping a lent connection mid-exchange (the client left) closes it: the backend sees
//!   the request cancelled at once.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::client::Connector;
use crate::upbody::UpBody;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Why an exchange with a backend failed.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made (refused, timed out, TLS).
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed after the request was (at least partly) sent.
    Http(hyper::Error),
}

/// A keep-alive connection to one backend.
pub(crate) struct Conn {
    send: SendRequest<UpBody>,
    /// `None` once the connection future has finished (closed or failed). Boxed: it is
    /// about 1.7 KB, and a `Conn` moves with every response that carries it.
    conn: Option<Box<Connection<Io, UpBody>>>,
    /// When it went idle (for the idle timeout).
    idle_since: Instant,
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

/// The idle connections of one shard, by backend slot.
pub(crate) struct Pool {
    idle: Mutex<Vec<Vec<Conn>>>,
    connector: Connector,
    builder: http1::Builder,
    idle_timeout: Duration,
}

impl Pool {
    pub(crate) fn new(connector: Connector, idle_timeout: Duration) -> Self {
        Pool {
            idle: Mutex::new(Vec::new()),
            connector,
            builder: http1::Builder::new(),
            idle_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<Conn>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection to `slot` that is still open and young
    /// enough. Older ones found on the way are closed.
    fn checkout(&self, slot: usize, cx: &mut Context<'_>) -> Option<Conn> {
        let now = Instant::now();
        loop {
            let mut c = self.lock().get_mut(slot)?.pop()?;
            if now.duration_since(c.idle_since) < self.idle_timeout && c.reusable(cx) {
                return Some(c);
            }
        }
    }

    /// Returns a connection whose exchange has ended, if it can serve another request.
    fn checkin(&self, slot: usize, mut c: Conn, cx: &mut Context<'_>) {
        if !c.reusable(cx) {
            return;
        }
        c.idle_since = Instant::now();
        let mut idle = self.lock();
        if idle.len() <= slot {
            idle.resize_with(slot + 1, Vec::new);
        }
        idle[slot].push(c);
    }

    /// A new connection to the backend at `base` (scheme and authority). Boxed: its
    /// future holds a TLS-capable stream and hyper's handshake, state that is gone once
    /// connected and that the request's own future need not carry.
    fn connect<'a>(
        &'a self,
        base: &'a Uri,
    ) -> Pin<Box<dyn Future<Output = Result<Conn, SendError>> + Send + 'a>> {
        Box::pin(self.connect_inner(base))
    }

    async fn connect_inner(&self, base: &Uri) -> Result<Conn, SendError> {
        let io = self
            .connector
            .clone()
            .call(base.clone())
            .await
            .map_err(SendError::Connect)?;
        let (send, conn) = self.builder.handshake(io).await.map_err(SendError::Http)?;
        Ok(Conn {
            send,
            conn: Some(Box::new(conn)),
            idle_since: Instant::now(),
        })
    }

    /// A one-off connection for an upgrade (WebSocket): run as a task of its own, since
    /// after the `101` the upgraded IO is spliced elsewhere. Never pooled.
    pub(crate) async fn upgrade(
        &self,
        base: &Uri,
        req: Request<UpBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let Conn { mut send, conn, .. } = self.connect(base).await?;
        if let Some(conn) = conn {
            tokio::spawn((*conn).with_upgrades());
        }
        send.send_request(req).await.map_err(SendError::Http)
    }

    /// Closes idle connections past the idle timeout, every `period`, for as long as the
    /// pool is used.
    pub(crate) async fn reap(pool: std::sync::Weak<Pool>, period: Duration) {
        loop {
            tokio::time::sleep(period).await;
            let Some(pool) = pool.upgrade() else { return };
            let now = Instant::now();
            let expired: Vec<Conn> = {
                let mut idle = pool.lock();
                let mut out = Vec::new();
                for conns in idle.iter_mut() {
                    // Oldest first: the list is pushed and popped at its end.
                    let keep = conns
                        .iter()
                        .position(|c| now.duration_since(c.idle_since) < pool.idle_timeout)
                        .unwrap_or(conns.len());
                    out.extend(conns.drain(..keep));
                }
                out
            };
            drop(expired);
        }
    }

    /// Sends `req` to the backend in `slot` (at `base`) and waits for the response head,
    /// driving the connection from the calling task. On success the connection comes back
    /// lent to the response body.
    pub(crate) async fn send(
        &self,
        slot: usize,
        base: &Uri,
        req: Request<UpBody>,
    ) -> Result<(Response<Incoming>, Conn), SendError> {
        let pooled = poll_fn(|cx| Poll::Ready(self.checkout(slot, cx))).await;
        let (mut c, reused) = match pooled {
            Some(c) => (c, true),
            None => (self.connect(base).await?, false),
        };
        match exchange(&mut c, req).await {
            Ok(resp) => Ok((resp, c)),
            Err(mut e) => match e.take_message() {
                // The reused connection was found closed before any byte of the request
                // went out: the one transparent re-send, on a fresh connection. Boxed: a
                // rare path whose state would otherwise enlarge every request's future.
                Some(req) if reused => Box::pin(self.resend(base, req)).await,
                _ => Err(SendError::Http(e.into_error())),
            },
        }
    }

    async fn resend(
        &self,
        base: &Uri,
        req: Request<UpBody>,
    ) -> Result<(Response<Incoming>, Conn), SendError> {
        let mut c = self.connect(base).await?;
        match exchange(&mut c, req).await {
            Ok(resp) => Ok((resp, c)),
            Err(e) => Err(SendError::Http(e.into_error())),
        }
    }
}

/// One request on `c`: queue it, then poll the connection (which writes it and reads the
/// response head) and the response future together until the head is in.
async fn exchange(
    c: &mut Conn,
    req: Request<UpBody>,
) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<UpBody>>> {
    let mut response = std::pin::pin!(c.send.try_send_request(req));
    poll_fn(|cx| {
        // The connection first: it takes the request off the channel, writes it, and
        // reads; the response future then sees what it delivered.
        c.poll_io(cx);
        response.as_mut().poll(cx)
    })
    .await
}

/// A connection lent to a response body: polled with it, returned to the pool when the
/// body has been read to its end, closed if dropped before.
pub(crate) struct Lent {
    conn: Option<Conn>,
    pool: std::sync::Arc<Pool>,
    slot: usize,
}

impl Lent {
    pub(crate) fn new(conn: Option<Conn>, pool: std::sync::Arc<Pool>, slot: usize) -> Self {
        Lent { conn, pool, slot }
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
            self.pool.checkin(self.slot, c, cx);
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
