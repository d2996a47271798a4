//! State shared by every task: the core behind a mutex, backend targets, the connection
//! pool, and the shutdown state.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use event_listener::Event;
use lb_core::http1::Limits;
use lb_core::{
    BackendId, Balancer, Lease, Notice, NoticeSink, Outcome, PoolError, RequestMeta, Settings,
    Target,
};
use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::connect::Connector;
use crate::pool::Pool;

/// Why the proxy could not start.
#[derive(Debug)]
pub enum StartError {
    /// The listen address could not be bound.
    Bind(SocketAddr, io::Error),
    /// The SIGTERM/SIGINT handlers could not be installed.
    Signal(io::Error),
    /// TLS setup failed (e.g. an unreadable `--backend-ca`).
    Tls(String),
    /// An `https://` backend, in a build without TLS.
    NoTls(String),
    /// The core refused a backend.
    Backend(PoolError),
    /// A backend URL is not usable.
    Url(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Bind(a, e) => write!(f, "cannot listen on {a} (--port/--bind): {e}"),
            StartError::Signal(e) => write!(f, "cannot install the SIGTERM/SIGINT handlers: {e}"),
            StartError::Tls(e) => write!(f, "TLS setup failed (--backend-ca): {e}"),
            StartError::NoTls(url) => write!(
                f,
                "--backends: {url}: this smol build of lb has no TLS for https:// backends \
                 (build it with `--features smol,lb-smol/tls`, or use the default tokio build)"
            ),
            StartError::Backend(e) => write!(f, "--backends: {e}"),
            StartError::Url(e) => write!(f, "--backends: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A backend as the adapter addresses it.
pub(crate) struct Upstream {
    /// The URL as the operator gave it (normalised), for logs.
    pub(crate) url: Arc<str>,
    /// Host, port, authority (the `Host` the backend sees), path prefix, TLS.
    pub(crate) target: Target,
    /// `GET <prefix><health path>`: the probe's request target.
    pub(crate) probe_target: String,
}

pub(crate) struct Shared {
    core: Mutex<Balancer<SmallRng>>,
    /// Backends by slot.
    upstreams: Vec<Option<Upstream>>,
    pub(crate) settings: Settings,
    pub(crate) log: NoticeSink,
    /// Head limits for requests and responses.
    pub(crate) limits: Limits,
    pub(crate) connector: Connector,
    pub(crate) pool: Pool,
    shutting_down: AtomicBool,
    /// Client connections being served.
    connections: AtomicUsize,
    /// Notified when shutdown begins, and then whenever a connection or a lease ends.
    pub(crate) changed: Event,
}

impl Shared {
    pub(crate) fn new(
        settings: Settings,
        log: NoticeSink,
        now: Instant,
    ) -> Result<Arc<Self>, StartError> {
        let mut core = Balancer::new(settings.core.clone(), SmallRng::from_os_rng(), now);
        let mut upstreams: Vec<Option<Upstream>> = Vec::new();
        for spec in &settings.backends {
            let target = Target::parse(&spec.url).map_err(|e| StartError::Url(e.to_string()))?;
            let id = core
                .add_backend(now, spec.clone())
                .map_err(StartError::Backend)?;
            if upstreams.len() <= id.slot() {
                upstreams.resize_with(id.slot() + 1, || None);
            }
            let probe_target = format!("{}{}", target.path_prefix, settings.health_path);
            upstreams[id.slot()] = Some(Upstream {
                url: target.url.clone(),
                target,
                probe_target,
            });
        }
        let connector = Connector::new(&settings, upstreams.iter().flatten())?;
        let limits = Limits {
            max_head_bytes: settings.max_head_bytes,
            ..Limits::default()
        };
        Ok(Arc::new(Shared {
            core: Mutex::new(core),
            pool: Pool::new(upstreams.len(), settings.pool_idle_timeout),
            upstreams,
            limits,
            connector,
            settings,
            log,
            shutting_down: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            changed: Event::new(),
        }))
    }

    pub(crate) fn core(&self) -> MutexGuard<'_, Balancer<SmallRng>> {
        // A panic while holding the lock cannot leave the core half-updated in a way that
        // matters more than stopping the proxy would, so keep serving.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn upstream(&self, id: BackendId) -> &Upstream {
        self.upstreams[id.slot()]
            .as_ref()
            .expect("every backend the core knows was registered at startup")
    }

    /// Selects a backend; the lease comes back wrapped in a guard that releases it.
    pub(crate) fn select(
        self: &Arc<Self>,
        meta: &RequestMeta<'_>,
    ) -> Result<LeaseGuard, lb_core::Reject> {
        let lease = self.core().select(Instant::now(), meta)?;
        Ok(LeaseGuard {
            shared: self.clone(),
            lease: Some(lease),
            outcome: Outcome::Cancelled,
        })
    }

    fn release(&self, lease: Lease, outcome: Outcome) {
        let mut events = Vec::new();
        {
            let mut core = self.core();
            core.release(Instant::now(), lease, outcome);
            while let Some(e) = core.poll_event() {
                events.push(e);
            }
        }
        for e in events {
            (self.log)(Notice::Core(e));
        }
        if self.is_shutting_down() {
            self.changed.notify(usize::MAX);
        }
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.core().outstanding()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.changed.notify(usize::MAX);
    }

    /// Resolves once shutdown has begun.
    pub(crate) async fn shutdown_begun(&self) {
        loop {
            let listener = self.changed.listen();
            if self.is_shutting_down() {
                return;
            }
            listener.await;
        }
    }

    /// Resolves once no client connection is open and no lease is outstanding (call after
    /// `begin_shutdown`).
    pub(crate) async fn drained(&self) {
        loop {
            let listener = self.changed.listen();
            if self.connections.load(Ordering::Acquire) == 0 && self.in_flight() == 0 {
                return;
            }
            listener.await;
        }
    }

    /// Counts a client connection as open until the returned guard drops.
    pub(crate) fn open_connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard {
            shared: self.clone(),
        }
    }
}

/// One open client connection; see [`Shared::open_connection`].
pub(crate) struct ConnectionGuard {
    shared: Arc<Shared>,
}

impl ConnectionGuard {
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
        if self.shared.is_shutting_down() {
            self.shared.changed.notify(usize::MAX);
        }
    }
}

/// Owns a lease; releases it exactly once, with the recorded outcome, when dropped (so a
/// cancelled future, a closed connection or a panic all release it). The outcome starts as
/// `Cancelled` and is set when the exchange ends.
pub(crate) struct LeaseGuard {
    shared: Arc<Shared>,
    lease: Option<Lease>,
    outcome: Outcome,
}

impl LeaseGuard {
    pub(crate) fn backend(&self) -> BackendId {
        self.lease.as_ref().expect("present until drop").backend()
    }

    /// Records how the exchange ended and releases the lease now.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            let outcome = std::mem::replace(&mut self.outcome, Outcome::Cancelled);
            self.shared.release(lease, outcome);
        }
    }
}
