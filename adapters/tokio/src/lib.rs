//! Runs the `lb` core on tokio and hyper.
//!
//! This crate moves bytes and time: it accepts connections, forwards requests over pooled
//! backend connections, streams bodies both ways without buffering, runs health probes
//! when the core asks for them, and feeds every outcome back. Every decision (which
//! backend, whether it is healthy, when to probe, what to report) is the core's.
//!
//! Entry point: [`run`], which blocks until SIGTERM/SIGINT and a graceful drain.
#![forbid(unsafe_code)]

mod admin;
mod body;
mod client;
mod headers;
mod pool;
mod proxy;
mod rt;
mod stall;
mod upbody;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use lb_proxy::{Notice, NoticeSink, Settings};
use rt::{Proxy, Tokio};
use tokio::net::{TcpListener, TcpSocket};

pub use lb_proxy::StartError;

/// `lb --check`: everything [`run`] would refuse of `settings` short of binding a socket
/// (backend URLs, TLS setup and `--backend-ca`, the pool's rules), without listening.
pub fn check(settings: Settings) -> Result<(), StartError> {
    let rt = runtime().map_err(|e| StartError::runtime("start the tokio runtime", e))?;
    let _entered = rt.enter();
    let tokio = Tokio::new(&settings)?;
    Proxy::new(settings, Arc::new(|_| {}), tokio, Instant::now()).map(drop)
}

/// Runs the proxy until SIGTERM or SIGINT, then lets in-flight requests finish for up to
/// `settings.shutdown_timeout`. Returns an error only when it cannot start (bind, TLS setup).
///
/// One single-threaded runtime per CPU ("shard"), each with its own `SO_REUSEPORT`
/// listener and its own backend connection pool, so a request never changes thread: no
/// cross-thread wake-ups on the hot path, as in nginx's worker model. The core is shared by
/// all shards behind one mutex. The main thread's shard also runs the control path (timer,
/// probes) and signal handling.
pub fn run(settings: Settings, log: NoticeSink) -> Result<(), StartError> {
    let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = runtime().map_err(|e| StartError::runtime("start the tokio runtime", e))?;
    // Binding registers a socket with a reactor, so it happens in the main runtime's
    // context; `into_std` hands each shard a plain socket to register with its own.
    let entered = rt.enter();
    // Signal handlers go in before any socket opens: a SIGTERM that arrives once lb accepts
    // connections must always mean a graceful stop, never the default kill.
    let signals = Signals::install()
        .map_err(|e| StartError::runtime("install the SIGTERM/SIGINT/SIGHUP handlers", e))?;
    let listeners =
        bind_all(settings.listen, shards).map_err(|e| StartError::Bind(settings.listen, e))?;
    let local = listeners[0]
        .local_addr()
        .map_err(|e| StartError::Bind(settings.listen, e))?;
    let admin = lb_proxy::admin::bind(&settings, &*log)?;
    let tokio = Tokio::new(&settings)?;
    let proxy = Proxy::new(settings, log.clone(), tokio, Instant::now())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut first = None;
    for (i, listener) in listeners.into_iter().enumerate() {
        if i == 0 {
            first = Some(listener);
            continue;
        }
        let (proxy, stop_rx, done_tx) = (proxy.clone(), stop_rx.clone(), done_tx.clone());
        std::thread::Builder::new()
            .name(format!("lb-shard-{i}"))
            .spawn(move || {
                if let Ok(rt) = runtime() {
                    rt.block_on(shard(proxy, listener, stop_rx));
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| StartError::runtime("start a worker thread", e))?;
    }
    let first = first.expect("at least one shard");
    drop(entered);
    rt.block_on(async move {
        tokio::spawn(lb_proxy::drive(proxy.clone()));
        let own = tokio::spawn(shard(proxy.clone(), first, stop_rx));
        log(Notice::Listening(local));
        if let Some(admin) = admin {
            if let Ok(addr) = admin.local_addr() {
                log(Notice::AdminListening(addr));
            }
            tokio::spawn(admin::serve(proxy.clone(), admin));
        }
        signals.recv(&log).await;
        proxy.begin_shutdown();
        log(Notice::ShuttingDown {
            in_flight: proxy.in_flight(),
        });
        let deadline = after(proxy.settings().shutdown_timeout);
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout_at(deadline, own).await;
        drop(done_tx);
        let _ =
            tokio::time::timeout_at(deadline, async { while done_rx.recv().await.is_some() {} })
                .await;
        let _ = tokio::time::timeout_at(deadline, proxy.idle()).await;
        log(Notice::Stopped {
            abandoned: proxy.in_flight(),
        });
    });
    Ok(())
}

/// `d` from now, saturating (`lb_proxy::deadline`): never a panic, whatever `d`.
pub(crate) fn after(d: std::time::Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(lb_proxy::deadline::deadline(Instant::now(), d))
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// One listening socket per shard on `addr`, all bound with `SO_REUSEPORT` (when there are
/// several) so that the kernel spreads connections among the shards. `SO_REUSEPORT` would
/// also let them join a group another process already listens with (a second `lb` started
/// by mistake), silently splitting its traffic; so the address is first claimed by a
/// socket without it, which fails like a plain bind when the address is in use. With port
/// 0, the first socket picks the port and the others bind that one.
fn bind_all(addr: std::net::SocketAddr, shards: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let reuse_port = shards > 1;
    if reuse_port && addr.port() != 0 {
        let probe = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        probe.set_reuseaddr(true)?;
        probe.bind(addr)?;
        // Dropped (closed) before the shards bind: it never listens.
    }
    let first = bind(addr, reuse_port)?;
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..shards {
        all.push(bind(addr, reuse_port)?);
    }
    Ok(all)
}

/// A listening socket; with `reuse_port`, several shards bind the same address and the
/// kernel spreads connections among them.
fn bind(addr: std::net::SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    // into_std needs no runtime; each shard registers its listener with its own reactor.
    socket.listen(4096)?.into_std()
}

/// One shard: accepts on its listener until told to stop, then lets its connections finish.
async fn shard(
    proxy: Arc<Proxy>,
    listener: std::net::TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Ok(listener) = TcpListener::from_std(listener) else {
        return;
    };
    let settings = proxy.settings();
    let connector = proxy.runtime().connector.clone();
    let traffic = Arc::new(pool::Pool::new(connector, settings.max_head_bytes));
    let limits = proxy.clone();
    tokio::spawn(pool::Pool::reap(
        Arc::downgrade(&traffic),
        std::time::Duration::from_secs(1),
        move |slot| limits.idle_limit(slot),
    ));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The head timeout is `Graceful`'s: hyper's arms a timer per request.
        .header_read_timeout(None)
        .max_buf_size((2 * settings.max_head_bytes).max(8192))
        .keep_alive(true);
    // Every connection task holds a receiver (never polled): `closed()` resolves once the
    // last one is gone. `closing` asks them to finish gracefully.
    let (conns_tx, conns_rx) = tokio::sync::watch::channel(false);
    let closing = Arc::new(Stop::default());
    let write_timeout = settings.client_write_timeout;
    let head_timeout = settings.head_timeout;
    loop {
        // At --max-client-conns, wait for a connection to close before accepting.
        tokio::select! {
            () = proxy.accept_room() => {}
            _ = stop.changed() => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(_) => {
                        // Out of file descriptors and the like: the listener stays
                        // readable, so back off instead of spinning; the connections
                        // already open keep working.
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                // Past --max-client-conns (shards that accepted at once), the
                // connection waits here unread until another closes.
                let open = tokio::select! {
                    open = proxy.admit() => open,
                    _ = stop.changed() => break,
                };
                let _ = stream.set_nodelay(true);
                let metrics = proxy.metrics().clone();
                let (proxy, traffic) = (proxy.clone(), traffic.clone());
                let peer = proxy::Peer::new(peer);
                let activity = Arc::new(stall::Activity::default());
                let exchanges = activity.clone();
                let service = service_fn(move |req| {
                    let exchange = exchanges.begin();
                    let (proxy, traffic, peer) = (proxy.clone(), traffic.clone(), peer.clone());
                    async move {
                        let (response, mut account) = proxy::handle(proxy, traffic, peer, req).await;
                        if let Some(a) = &mut account {
                            a.status(response.status().as_u16());
                        }
                        let proxied = matches!(response.body(), http_body_util::Either::Right(_));
                        Ok::<_, Infallible>(response.map(|b| stall::Tracked::new(b, exchange, account, proxied)))
                    }
                });
                let io = TokioIo::new(stall::WriteStall::new(stream, write_timeout, activity.clone()));
                let conn = builder.serve_connection(io, service).with_upgrades();
                let (alive, closing) = (conns_rx.clone(), closing.clone());
                tokio::spawn(async move {
                    // Finishes the request in progress once the shard stops, then closes;
                    // a connection with no response in progress (idle, or holding part
                    // of a head) closes at once.
                    let ended = Graceful::new(conn, &closing, &activity, head_timeout, |c| c.graceful_shutdown()).await;
                    if let Some(Err(e)) = ended {
                        // A head hyper refused itself (it answered it): counted as lb's.
                        if e.is_parse_too_large() {
                            metrics.refused(431);
                        } else if e.is_parse() {
                            metrics.refused(400);
                        }
                    }
                    drop((alive, open));
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let deadline = after(settings.shutdown_timeout);
    closing.begin();
    drop(conns_rx);
    let _ = tokio::time::timeout_at(deadline, conns_tx.closed()).await;
    // Upgraded connections (WebSockets) have left hyper; they hold leases until closed.
    let _ = tokio::time::timeout_at(deadline, proxy.idle()).await;
}

/// A shard's request to its client connections to finish gracefully.
#[derive(Default)]
struct Stop {
    stopping: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Stop {
    fn begin(&self) {
        self.stopping.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

pin_project_lite::pin_project! {
    /// A client connection that shuts down gracefully when its shard stops, and is closed
    /// when a request head takes longer than `--head-timeout` to arrive.
    ///
    /// A `select!` against a stop channel would poll that channel each time the task wakes,
    /// several times per request. Here the task's waker is registered with the stop signal
    /// once, on the first poll (a connection task's waker never changes), and each later
    /// wake costs one atomic load. When the stop comes, a connection that has nothing in
    /// progress ([`stall::Activity::quiet`]) is dropped (closed) rather than asked to
    /// finish.
    ///
    /// The head timeout is one timer per connection, not one per request (hyper's own arms
    /// and cancels a timer for every head): an exchange only notes when it ended; when the
    /// timer fires, a connection that has waited `head_timeout` since for a head is closed
    /// (as hyper's own timeout does, without an answer), else the timer is set again for
    /// the time that is left.
    struct Graceful<'a, C, F> {
        #[pin]
        conn: C,
        #[pin]
        notified: tokio::sync::futures::Notified<'a>,
        stopping: &'a AtomicBool,
        registered: bool,
        activity: &'a stall::Activity,
        #[pin]
        head_timer: tokio::time::Sleep,
        head_timeout: Duration,
        shutdown: Option<F>,
    }
}

impl<'a, C, F> Graceful<'a, C, F>
where
    C: Future,
    F: FnOnce(Pin<&mut C>),
{
    fn new(
        conn: C,
        stop: &'a Stop,
        activity: &'a stall::Activity,
        head_timeout: Duration,
        shutdown: F,
    ) -> Self {
        let first = activity
            .head_deadline(head_timeout)
            .unwrap_or_else(|| tokio::time::Instant::now() + head_timeout);
        Graceful {
            conn,
            notified: stop.notify.notified(),
            stopping: &stop.stopping,
            registered: false,
            activity,
            head_timer: tokio::time::sleep_until(first),
            head_timeout,
            shutdown: Some(shutdown),
        }
    }
}

impl<C, F> Future for Graceful<'_, C, F>
where
    C: Future,
    F: FnOnce(Pin<&mut C>),
{
    /// `None`: dropped at the stop with nothing in progress, or for a late head.
    type Output = Option<C::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if !*this.registered {
            *this.registered = true;
            // Registers the waker; a stop that came first is seen through the flag below.
            let _ = this.notified.as_mut().poll(cx);
        }
        if this.stopping.load(Ordering::Acquire) {
            if this.activity.quiet() {
                return Poll::Ready(None);
            }
            if let Some(shutdown) = this.shutdown.take() {
                shutdown(this.conn.as_mut());
            }
        }
        while this.head_timer.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            match this.activity.head_deadline(*this.head_timeout) {
                Some(late) if late <= now => return Poll::Ready(None),
                Some(late) => this.head_timer.as_mut().reset(late),
                // Checked again a whole timeout after now: the next head's wait starts
                // later than that.
                None => this.head_timer.as_mut().reset(now + *this.head_timeout),
            }
        }
        this.conn.poll(cx).map(Some)
    }
}

/// How long an accept loop waits after a failed accept (out of file descriptors, say)
/// before trying again.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

/// SIGTERM and SIGINT, registered eagerly.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves at SIGTERM or SIGINT; each SIGHUP before is told to `log` (log files are
    /// reopened) and otherwise ignored.
    async fn recv(mut self, log: &NoticeSink) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => log(Notice::Hangup),
            }
        }
    }
}
