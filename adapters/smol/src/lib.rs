//! Runs the `lb` core on smol's parts: `async-executor` (one executor per CPU, each on its
//! own thread), `async-io` (timers), `async-signal`; sockets are registered with each
//! shard's own edge-triggered epoll (`reactor`: Linux only), which is what lets this build
//! outrun HAProxy. The tiny build of `lb`: no tokio, no hyper.
//!
//! What it does: accepts connections; reads request heads and frames bodies with
//! `lb_http1` (it parses no HTTP of its own, save taking the data out of chunked
//! bodies the framer has accepted, for routing and the request log); answers `/health`
//! and errors from `lb_proxy::reply`; forwards everything else over pooled keep-alive
//! backend connections, streaming both bodies through small buffers (2 KiB growing to
//! 32 KiB per direction) and writing each chunk through at once; splices upgraded
//! connections (WebSocket); runs health probes when the core asks; and drains gracefully
//! on SIGTERM/SIGINT.
//!
//! LLM-aware routing, as in the tokio build: when routing reads the body
//! (`Proxy::routes_by_body`: cache-aware, prefix-hash, consistent-hash on the `user`
//! field, or model pools) the first 4 MiB of the body are read before selecting, keyed
//! by the proxy layer (`Proxy::route_keys`), then forwarded ahead of the rest; a request that
//! finds every backend at `--max-conns` may wait in the core's admission queue
//! (`--queue-timeout`), giving its place up if its client leaves; and `--log-to` writes
//! one `lb_proxy::reqlog` line per request from a writer thread.
//!
//! TLS to `https://` backends (rustls, ring, system roots, `--backend-ca`) is the `tls`
//! feature, off by default: it takes the stripped `lb` from about 1.2 MiB to 2.5 MiB.
//! Without it, an `https://` backend is refused at start with an error naming
//! `--backends`. Build it in with `--features smol,lb-smol/tls`.
//!
//! What it does not do: decide anything. Which backend, whether it is healthy, when to
//! probe and what to report are the core's (`lb_core::Balancer`, behind one mutex); every
//! lease goes back through a guard's `Drop` with the exchange's outcome. Nor does it
//! retry: the one re-send is of a request whose pooled connection failed before any of
//! its bytes were written.
//!
//! Entry points: [`run`] blocks until a signal and the drain; [`serve`] is the same
//! server as a future that any executor can drive (it needs `async-io`'s reactor, with
//! which it registers its first shard's epoll), stopped by the `shutdown` future it is
//! given.
//!
//! The per-request path (`conn`, `exchange`, `pump`, `io`) is generic over the byte
//! streams it reads and writes (`stream::Wire`) and over the shard that gives it deadlines
//! and backend connections (`rt::Shard`); the server compiles it once, for TCP (or TLS)
//! streams and the shard's own pool and connector. The `memory` feature compiles it for
//! in-memory streams too: `memory::Sim` serves one client connection without a socket,
//! for tests and the `proxy_path` fuzz target. What stays concrete: the proxy layer it
//! runs on (`lb_proxy::Proxy<Smol>`), the shard's `Timers`, and everything around a
//! connection (accepting, the pool, connecting, TLS, probes, the admin API).
#![forbid(unsafe_code)]

mod admin;
mod conn;
mod connect;
mod exchange;
mod io;
mod listen;
#[cfg(feature = "memory")]
pub mod memory;
mod pool;
mod pump;
mod reactor;
mod reqlog;
mod rt;
mod stream;
mod timers;
#[cfg(feature = "tls")]
mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::net::TcpListener;

use async_executor::Executor;
use async_io::Timer;
use async_signal::{Signal, Signals};
use futures_lite::{future, StreamExt};
use lb_proxy::{Notice, NoticeSink, Settings};
use reactor::Reactor;
use rt::{Proxy, Smol};

pub use lb_proxy::StartError;

/// Runs the proxy until SIGTERM or SIGINT, then lets in-flight requests finish for up to
/// `settings.shutdown_timeout`. Returns an error only when it cannot start (bind, TLS
/// setup, signal handlers).
///
/// The calling thread runs the first shard, blocked in that shard's own reactor.
pub fn run(settings: Settings, log: NoticeSink) -> Result<(), StartError> {
    let mut signals = Signals::new([Signal::Term, Signal::Int, Signal::Hup])
        .map_err(|e| StartError::runtime("install the SIGTERM/SIGINT/SIGHUP handlers", e))?;
    let reactor = Reactor::new().map_err(reactor_error)?;
    let hangups = log.clone();
    let shutdown = async move {
        // SIGHUP reopens the log files and is otherwise ignored.
        while let Some(Ok(Signal::Hup)) = signals.next().await {
            hangups(Notice::Hangup);
        }
    };
    reactor.block_on(start(
        settings,
        log,
        shutdown,
        Shard0::Blocked(reactor.clone()),
    ))
}

/// `lb --check`: everything [`run`] would refuse of `settings` short of binding a socket
/// (backend URLs, TLS to `https://` backends, the pool's rules), without listening.
pub fn check(settings: Settings) -> Result<(), StartError> {
    let reactor = Reactor::new().map_err(reactor_error)?;
    let rt = Smol::new(&settings, vec![reactor])?;
    Proxy::new(settings, Arc::new(|_| {}), rt, Instant::now()).map(drop)
}

/// How the first shard's reactor is polled.
enum Shard0 {
    /// By the thread, in [`Reactor::block_on`].
    Blocked(Arc<Reactor>),
    /// By a task on whatever executor runs [`serve`] (see [`Reactor::nest`]).
    Nested,
}

/// The proxy as a future: binds, serves until `shutdown` resolves, then stops accepting
/// and lets in-flight requests and streams finish for up to `settings.shutdown_timeout`.
///
/// One shard per CPU, as nginx runs workers: each has its own `SO_REUSEPORT` listener, its
/// own executor, reactor and backend connection pool, so a request stays on one thread and
/// takes no lock another thread holds, but the core's. The calling thread runs the first
/// shard (and the control path) on an executor driven by this future, so it runs under
/// any executor (`async_io::block_on`, async-std, ...); the others run on threads of
/// their own (small stacks: tasks live on the heap), started here and stopped with it.
pub async fn serve(
    settings: Settings,
    log: NoticeSink,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    start(settings, log, shutdown, Shard0::Nested).await
}

async fn start(
    settings: Settings,
    log: NoticeSink,
    shutdown: impl Future<Output = ()>,
    first: Shard0,
) -> Result<(), StartError> {
    let listen = settings.listen;
    let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut listeners = listen::bind(listen, shards).map_err(|e| StartError::Bind(listen, e))?;
    let local = listeners[0]
        .local_addr()
        .map_err(|e| StartError::Bind(listen, e))?;
    let (first, nested) = match first {
        Shard0::Blocked(r) => (r, None),
        Shard0::Nested => {
            let r = Reactor::new().map_err(reactor_error)?;
            let poller = r.nest().map_err(reactor_error)?;
            (r, Some(poller))
        }
    };
    let mut reactors = vec![first];
    for _ in 1..shards {
        reactors.push(Reactor::new().map_err(reactor_error)?);
    }
    let admin = lb_proxy::admin::bind(&settings, &*log)?;
    let rt = Smol::new(&settings, reactors)?;
    let proxy = Proxy::new(settings, log.clone(), rt, Instant::now())?;
    let own = listeners.remove(0);
    for (i, listener) in listeners.into_iter().enumerate() {
        let on_thread = proxy.clone();
        let started = std::thread::Builder::new()
            .name(format!("lb-shard-{}", i + 1))
            .stack_size(SHARD_STACK)
            .spawn(move || {
                let proxy = on_thread;
                let ex = Executor::new();
                let reactor = proxy.runtime().local(i + 1).reactor.clone();
                reactor.block_on(ex.run(async {
                    future::or(shard(&proxy, &ex, listener, i + 1), proxy.shutdown_begun()).await;
                    wind_down(&proxy).await;
                }));
                // Dropping the executor drops the tasks still running (streams cut at the
                // deadline): their connections close and their leases are released.
                drop(ex);
                proxy.runtime().shard_stopped();
            });
        if let Err(e) = started {
            // The shards already started stop with this one.
            proxy.begin_shutdown();
            return Err(StartError::runtime("start a worker thread", e));
        }
    }
    let ex = Arc::new(Executor::new());
    proxy.runtime().set_spawner(&ex);
    let served = ex.run(async {
        ex.spawn(lb_proxy::drive(proxy.clone())).detach();
        if let Some(poller) = nested {
            ex.spawn(poller).detach();
        }
        log(Notice::Listening(local));
        if let Some(admin) = admin {
            if let Ok(addr) = admin.local_addr() {
                log(Notice::AdminListening(addr));
            }
            let (on, spawner) = (proxy.clone(), ex.clone());
            ex.spawn(async move {
                future::or(
                    admin::serve(on.clone(), &spawner, admin),
                    on.shutdown_begun(),
                )
                .await
            })
            .detach();
        }
        future::or(shard(&proxy, &ex, own, 0), shutdown).await;
        proxy.begin_shutdown();
        log(Notice::ShuttingDown {
            in_flight: proxy.in_flight(),
        });
        wind_down(&proxy).await;
    });
    served.await;
    drop(ex);
    proxy.runtime().shard_stopped();
    // The other shards reach the same deadline at about the same time.
    future::or(proxy.runtime().shards_stopped(), async {
        Timer::after(Duration::from_secs(1)).await;
    })
    .await;
    log(Notice::Stopped {
        abandoned: proxy.in_flight(),
    });
    Ok(())
}

fn reactor_error(e: std::io::Error) -> StartError {
    StartError::runtime("create an event loop (epoll)", e)
}

/// How long an accept loop waits after a failed accept (out of file descriptors, say)
/// before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Stack size of the shards' own threads: connection tasks live on the heap, so the stack
/// holds little more than the executor's loop.
const SHARD_STACK: usize = 256 * 1024;

/// One shard: reaps its pool, fires its deadlines, accepts on its listener and serves each
/// connection as a task on `ex`, until the future is dropped (which closes the listener).
async fn shard(proxy: &Arc<Proxy>, ex: &Executor<'static>, listener: TcpListener, index: usize) {
    let reactor = &proxy.runtime().local(index).reactor;
    let registered = listener
        .set_nonblocking(true)
        .and_then(|()| reactor.register(listener));
    let Ok(listener) = registered else {
        // Registering with the reactor failed: the other shards' listeners still serve.
        return std::future::pending().await;
    };
    let reaper = proxy.clone();
    ex.spawn(async move {
        let limits = |slot| reaper.idle_limit(slot);
        reaper.runtime().local(index).pool.reap(limits).await
    })
    .detach();
    let timers = proxy.clone();
    ex.spawn(async move { timers.runtime().local(index).timers.run().await })
        .detach();
    loop {
        // At --max-client-conns, wait for a connection to close before accepting.
        proxy.accept_room().await;
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Past --max-client-conns (shards that accepted at once), the
                // connection waits here unread until another closes.
                let open = proxy.admit().await;
                let _ = stream.set_nodelay(true);
                // Refused by epoll (out of memory): the connection closes.
                let Ok(stream) = reactor.register(stream) else {
                    continue;
                };
                ex.spawn(conn::serve(open, index, stream::Stream::Tcp(stream), peer))
                    .detach();
            }
            // Out of file descriptors and the like: the listener stays readable, so back
            // off instead of spinning; the connections already open keep working.
            Err(_) => {
                Timer::after(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// After shutdown began: waits until every connection and lease is gone, for at most
/// `--shutdown-timeout`.
async fn wind_down(proxy: &Proxy) {
    let deadline = lb_proxy::deadline::deadline(Instant::now(), proxy.settings().shutdown_timeout);
    future::or(proxy.drained(), async {
        Timer::at(deadline).await;
    })
    .await;
}
