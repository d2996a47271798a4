//! The smol build's side of the proxy layer: [`Smol`], the [`Runtime`] the layer runs on
//! (async-io timers, tasks on the first shard's executor, probes over `lb_http1`), and
//! each shard's own state ([`Local`]: its connection pool, deadlines and reactor), which
//! the request path reaches through [`Shard`].

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use async_executor::Executor;
use async_io::Timer;
use event_listener::Event;
use lb_http1::{BodyFramer, Header, Limits, RequestHead, Status, Version};
use lb_proxy::{Fetched, Runtime, Settings, StartError, Target};

use crate::connect::{describe, Connector};
use crate::io::{head_read_size, read_more, send, ReadSize};
use crate::pool::Pool;
use crate::reactor::Reactor;
use crate::stream::{Stream, Wire};
use crate::timers::Timers;

/// The proxy layer on this build.
pub(crate) type Proxy = lb_proxy::Proxy<Smol>;
/// A request's lease on this build.
pub(crate) type LeaseGuard = lb_proxy::LeaseGuard<Smol>;
/// A backend on this build.
pub(crate) type Upstream = lb_proxy::Upstream<Smol>;

/// The smol runtime: shards, the connector, and where background tasks go.
pub(crate) struct Smol {
    pub(crate) connector: Connector,
    /// Head limits for requests and responses.
    pub(crate) limits: Limits,
    /// Each shard's own state, used by its shard's thread only (the locks are never
    /// contended).
    locals: Vec<Local>,
    /// The first shard's executor, where the driver's probes run (held weakly, so that
    /// the executor can go away); set once it exists.
    spawner: Mutex<Weak<Executor<'static>>>,
    /// Shards whose threads still run (the calling thread's included).
    shards_running: AtomicUsize,
    /// Notified when a shard stops.
    stopped: Event,
}

/// A shard's own state.
pub(crate) struct Local {
    /// Idle backend connections.
    pub(crate) pool: Pool,
    /// Deadlines of its requests (`--timeout`, `--head-timeout`).
    pub(crate) timers: Timers,
    /// Its sockets' readiness: the client connections it accepts, and the backend
    /// connections in its pool.
    pub(crate) reactor: Arc<Reactor>,
}

/// What the request path (`conn`, `exchange`, `pump`) needs of its shard besides the
/// proxy: its deadlines, and its connections to backends (an idle one from its pool, a
/// new one, and the pool to keep one in after an exchange). [`Local`] is the server's;
/// `memory::Sim` (the `memory` feature) has one in memory. Generic, not `dyn`: the
/// server's request path is compiled for `Local` alone.
pub(crate) trait Shard {
    /// A connection to a backend.
    type Conn: Wire;

    /// The shard's deadlines (`--timeout`, `--head-timeout`, the stall limits).
    fn timers(&self) -> &Timers;

    /// The most recently used idle connection to `up` that still looks usable.
    fn pooled(&self, up: &Upstream) -> Option<Self::Conn>;

    /// A new connection to `up`, within `--connect-timeout`; the error is a short
    /// description for the log.
    fn connect(
        &self,
        proxy: &Proxy,
        up: &Upstream,
    ) -> impl Future<Output = Result<Self::Conn, String>>;

    /// Keeps `conn` (between two exchanges) for the next request to `up`.
    fn keep(&self, up: &Upstream, conn: Self::Conn);
}

impl Shard for Local {
    type Conn = Stream;

    fn timers(&self) -> &Timers {
        &self.timers
    }

    fn pooled(&self, up: &Upstream) -> Option<Stream> {
        self.pool.take(up.id(), up.idle.get())
    }

    fn connect(
        &self,
        proxy: &Proxy,
        up: &Upstream,
    ) -> impl Future<Output = Result<Stream, String>> {
        proxy.runtime().connector.connect(&up.target, &self.reactor)
    }

    fn keep(&self, up: &Upstream, conn: Stream) {
        self.pool.put(up.id(), conn, up.idle.get());
    }
}

impl Smol {
    pub(crate) fn new(
        settings: &Settings,
        reactors: Vec<Arc<Reactor>>,
    ) -> Result<Self, StartError> {
        let shards = reactors.len();
        let slots = settings.backends.len();
        Ok(Smol {
            connector: Connector::new(settings)?,
            limits: Limits {
                max_head_bytes: settings.max_head_bytes,
                ..Limits::default()
            },
            locals: reactors
                .into_iter()
                .map(|reactor| Local {
                    pool: Pool::new(slots),
                    timers: Timers::new(),
                    reactor,
                })
                .collect(),
            spawner: Mutex::new(Weak::new()),
            shards_running: AtomicUsize::new(shards),
            stopped: Event::new(),
        })
    }

    /// The state of shard `shard`.
    pub(crate) fn local(&self, shard: usize) -> &Local {
        &self.locals[shard]
    }

    /// Background tasks run on `ex` from now on.
    pub(crate) fn set_spawner(&self, ex: &Arc<Executor<'static>>) {
        *self.spawner.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(ex);
    }

    /// A shard's thread has stopped serving (its tasks are gone).
    pub(crate) fn shard_stopped(&self) {
        self.shards_running.fetch_sub(1, Ordering::AcqRel);
        self.stopped.notify(usize::MAX);
    }

    /// Resolves once every shard has stopped.
    pub(crate) async fn shards_stopped(&self) {
        loop {
            let listener = self.stopped.listen();
            if self.shards_running.load(Ordering::Acquire) == 0 {
                return;
            }
            listener.await;
        }
    }
}

impl Runtime for Smol {
    const NAME: &'static str = "smol";
    type Backend = ();

    fn backend(&self, target: &Target) -> Result<(), StartError> {
        self.connector.check(target)
    }

    fn sleep_until(&self, deadline: Instant) -> impl Future<Output = ()> + Send + 'static {
        let timer = Timer::at(deadline);
        async move {
            timer.await;
        }
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let ex = self
            .spawner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .upgrade();
        if let Some(ex) = ex {
            ex.spawn(task).detach();
        }
    }

    fn get(
        &self,
        upstream: &Arc<Upstream>,
        path: &str,
        max_body: usize,
    ) -> impl Future<Output = Result<Fetched, String>> + Send + 'static {
        let target = format!("{}{}", upstream.target.path_prefix, path);
        let upstream = upstream.clone();
        let connector = self.connector.clone();
        let reactor = self.locals[0].reactor.clone();
        let limits = self.limits;
        async move { get(&connector, &reactor, &upstream, target, &limits, max_body).await }
    }
}

/// `GET target` on a new connection to `up`, closed after.
async fn get(
    connector: &Connector,
    reactor: &Arc<Reactor>,
    up: &Upstream,
    target: String,
    limits: &Limits,
    max_body: usize,
) -> Result<Fetched, String> {
    let conn = connector.connect(&up.target, reactor).await?;
    let head = RequestHead {
        method: "GET".into(),
        target,
        version: Version::Http11,
        headers: vec![
            Header::new("Host", up.target.authority.as_bytes()),
            Header::new(
                "User-Agent",
                concat!("lb/", env!("CARGO_PKG_VERSION"), " health-check"),
            ),
            Header::new("Connection", "close"),
        ],
    };
    let mut out = Vec::new();
    head.write(&mut out);
    send(&conn, &out).await.map_err(|e| describe(&e))?;
    let mut buf = Vec::new();
    let mut size = ReadSize::new();
    let resp = loop {
        match lb_http1::parse_response(&buf, limits) {
            Ok(Status::Complete(resp, n)) if resp.is_interim() => {
                // A 1xx before the real answer: skip it.
                buf.drain(..n);
                continue;
            }
            Ok(Status::Complete(resp, n)) => {
                buf.drain(..n);
                break resp;
            }
            Ok(Status::Partial) => {}
            Err(e) => return Err(format!("invalid response: {e}")),
        }
        let want = head_read_size(buf.len(), limits.max_head_bytes, &size);
        match read_more(&conn, &mut buf, want).await {
            Ok(0) => return Err("backend closed the connection".into()),
            Ok(n) => size.record(n),
            Err(e) => return Err(describe(&e)),
        }
    };
    let mut fetched = Fetched {
        status: resp.status,
        ..Fetched::default()
    };
    if max_body == 0 {
        return Ok(fetched);
    }
    // The body, de-chunked, up to `max_body` bytes.
    let kind = resp
        .body_kind(&head)
        .map_err(|e| format!("invalid response: {e}"))?;
    let mut framer = BodyFramer::new(kind);
    let mut dechunk = matches!(kind, lb_http1::BodyKind::Chunked).then(lb_http1::Dechunk::default);
    loop {
        let p = framer
            .push(&buf)
            .map_err(|e| format!("invalid response body: {e}"))?;
        let wire = &buf[..p.consumed];
        let body = &mut fetched.body;
        let mut keep = |data: &[u8]| body.extend_from_slice(data);
        match &mut dechunk {
            Some(d) => d.feed(wire, &mut keep),
            None => keep(wire),
        }
        buf.drain(..p.consumed);
        if fetched.body.len() > max_body {
            fetched.body.truncate(max_body);
            fetched.truncated = true;
            return Ok(fetched);
        }
        if p.done {
            return Ok(fetched);
        }
        match read_more(&conn, &mut buf, 16 * 1024).await {
            Ok(0) => {
                return match framer.finish() {
                    Ok(()) => Ok(fetched),
                    Err(e) => Err(format!("invalid response body: {e}")),
                }
            }
            Ok(_) => {}
            Err(e) => return Err(describe(&e)),
        }
    }
}
