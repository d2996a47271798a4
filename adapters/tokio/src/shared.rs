//! State shared by every task: the core behind a mutex, backend targets, HTTP clients.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use lb_core::{
    Action, Admission, BackendId, Balancer, Lease, Outcome, OwnedMeta, PoolError, Reject,
    RequestMeta, Ticket,
};
use lb_proxy::settings::IdleLimit;
use lb_proxy::{Notice, NoticeSink, Settings, Target};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use tokio::sync::{oneshot, Notify};

use crate::client::{self, Connector};

/// Why the proxy could not start.
#[derive(Debug)]
pub enum StartError {
    /// The tokio runtime could not be built.
    Runtime(io::Error),
    /// The listen address could not be bound.
    Bind(SocketAddr, io::Error),
    /// TLS setup failed (e.g. an unreadable `--backend-ca`).
    Tls(String),
    /// The core refused a backend.
    Backend(PoolError),
    /// A backend URL could not be turned into a request URI.
    Url(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Runtime(e) => write!(f, "cannot start the tokio runtime: {e}"),
            StartError::Bind(a, e) => write!(f, "cannot listen on {a} (--port/--bind): {e}"),
            StartError::Tls(e) => write!(f, "TLS setup failed (--backend-ca): {e}"),
            StartError::Backend(e) => write!(f, "--backends: {e}"),
            StartError::Url(e) => write!(f, "--backends: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A backend as the adapter addresses it.
pub(crate) struct Upstream {
    pub(crate) url: Arc<str>,
    /// The `Host` the backend sees, on requests and probes: its own authority.
    pub(crate) host: http::HeaderValue,
    /// Path prefix from the backend URL, empty or `/base`.
    pub(crate) prefix: String,
    /// The health-probe URI.
    pub(crate) probe_uri: Uri,
    /// Scheme and authority, what a connection is made to.
    pub(crate) base: Uri,
    /// How long its connections may sit idle in a pool.
    pub(crate) idle: IdleLimit,
}

impl Upstream {
    fn new(t: &Target, settings: &Settings) -> Result<Self, StartError> {
        let health_path = &settings.health_path;
        let bad = |e: &dyn fmt::Display| StartError::Url(format!("backend {}: {e}", t.url));
        let scheme = if t.tls { Scheme::HTTPS } else { Scheme::HTTP };
        let authority: Authority = t.authority.parse().map_err(|e| bad(&e))?;
        let probe_uri = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query(format!("{}{}", t.path_prefix, health_path))
            .build()
            .map_err(|e| bad(&e))?;
        let base = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| bad(&e))?;
        let host = http::HeaderValue::from_str(authority.as_str()).map_err(|e| bad(&e))?;
        Ok(Upstream {
            base,
            url: t.url.clone(),
            host,
            prefix: t.path_prefix.clone(),
            probe_uri,
            idle: IdleLimit::new(settings.pool_idle_timeout),
        })
    }

    /// The request target (origin form) for `pq` on this backend: the URL's path prefix,
    /// then the client's path and query.
    pub(crate) fn target(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = pq.map_or("/", |p| p.as_str());
        if self.prefix.is_empty() {
            Uri::builder().path_and_query(pq).build()
        } else {
            Uri::builder()
                .path_and_query(format!("{}{}", self.prefix, pq))
                .build()
        }
    }
}

pub(crate) struct Shared {
    core: Mutex<Balancer<SmallRng>>,
    /// Backends by slot.
    upstreams: Vec<Option<Upstream>>,
    /// Each shard builds its own traffic client from this (its own pool, its own thread).
    pub(crate) connector: Connector,
    pub(crate) probes: Client<Connector, Empty<Bytes>>,
    pub(crate) settings: Settings,
    pub(crate) log: NoticeSink,
    shutting_down: AtomicBool,
    idle: Notify,
    /// Requests waiting in the core's admission queue, by ticket.
    waiters: Mutex<HashMap<u64, oneshot::Sender<Admission>>>,
    /// Wakes the driver when an input added an earlier deadline (a queued request).
    pub(crate) rearm: Notify,
}

/// What the core said after one input, handled outside its lock.
#[derive(Default)]
pub(crate) struct Drained {
    pub(crate) actions: Vec<Action>,
    events: Vec<lb_core::Event>,
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
            upstreams[id.slot()] = Some(Upstream::new(&target, &settings)?);
        }
        let connector = client::connector(&settings)?;
        Ok(Arc::new(Shared {
            core: Mutex::new(core),
            upstreams,
            probes: client::build(connector.clone(), &settings),
            connector,
            settings,
            log,
            shutting_down: AtomicBool::new(false),
            idle: Notify::new(),
            waiters: Mutex::new(HashMap::new()),
            rearm: Notify::new(),
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

    /// How long a connection to the backend in `slot` may sit idle in a pool.
    pub(crate) fn idle_limit(&self, slot: usize) -> std::time::Duration {
        self.upstreams
            .get(slot)
            .and_then(Option::as_ref)
            .map_or(self.settings.pool_idle_timeout, |u| u.idle.get())
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

    /// Takes everything the core has to say after an input (call under its lock). Queue
    /// admissions are handed to their waiting requests right here (a non-blocking send);
    /// the core releases those nobody waits for any more.
    pub(crate) fn drain(&self, core: &mut Balancer<SmallRng>) -> Drained {
        let mut d = Drained::default();
        while let Some(a) = core.poll_action() {
            d.actions.push(a);
        }
        core.deliver_admissions(Instant::now(), |adm| self.hand_over(adm));
        while let Some(e) = core.poll_event() {
            d.events.push(e);
        }
        d
    }

    /// Gives an admission to the request waiting for it, or back if it has gone.
    fn hand_over(&self, adm: Admission) -> Result<(), Admission> {
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&adm.ticket().id());
        match waiter {
            Some(tx) => tx.send(adm),
            None => Err(adm),
        }
    }

    /// Logs the events (outside the core's lock).
    pub(crate) fn dispatch(&self, d: Drained) {
        for e in d.events {
            (self.log)(Notice::Core(e));
        }
    }

    fn release(&self, lease: Lease, outcome: Outcome) {
        let (d, idle) = {
            let mut core = self.core();
            core.release(Instant::now(), lease, outcome);
            (self.drain(&mut core), core.outstanding() == 0)
        };
        self.dispatch(d);
        if idle && self.shutting_down.load(Ordering::Acquire) {
            self.idle.notify_waiters();
        }
    }

    /// Waits in the core's admission queue for a slot (every backend was at its cap).
    /// Dropping the future (the client left) gives the place up.
    pub(crate) async fn wait_for_slot(
        self: &Arc<Self>,
        meta: OwnedMeta,
    ) -> Result<LeaseGuard, Reject> {
        let (tx, rx) = oneshot::channel();
        let (ticket, d) = {
            let mut core = self.core();
            let ticket = core.enqueue(Instant::now(), meta)?;
            // Registered under the core's lock: no admission for it can be drained before.
            self.waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ticket.id(), tx);
            // enqueue may admit at once (a slot freed since select): deliver it now.
            (ticket, self.drain(&mut core))
        };
        self.dispatch(d);
        self.rearm.notify_one();
        let mut wait = QueueWait {
            shared: self.clone(),
            ticket,
            rx: Some(rx),
        };
        let admission = wait.rx.as_mut().expect("present until drop").await;
        wait.rx = None;
        match admission {
            Ok(Admission::Admitted(_, lease)) => Ok(LeaseGuard {
                shared: self.clone(),
                lease: Some(lease),
                outcome: Outcome::Cancelled,
            }),
            Ok(Admission::Expired(_)) | Err(_) => Err(Reject::AllAtCapacity),
        }
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.core().outstanding()
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Resolves once no lease is outstanding (call after `begin_shutdown`).
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Owns a lease; releases it exactly once, with the recorded outcome, when dropped (so a
/// cancelled future, a dropped body or a panic all release it). The outcome starts as
/// `Cancelled` and is set as the exchange progresses.
pub(crate) struct LeaseGuard {
    shared: Arc<Shared>,
    lease: Option<Lease>,
    outcome: Outcome,
}

impl LeaseGuard {
    pub(crate) fn backend(&self) -> BackendId {
        self.lease.as_ref().expect("present until drop").backend()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
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

/// A place in the admission queue; dropping it before the admission arrived gives it up,
/// and a lease that arrived meanwhile is released.
struct QueueWait {
    shared: Arc<Shared>,
    ticket: Ticket,
    rx: Option<oneshot::Receiver<Admission>>,
}

impl Drop for QueueWait {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let d = {
            let mut core = self.shared.core();
            core.cancel(Instant::now(), self.ticket);
            self.shared.drain(&mut core)
        };
        self.shared
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.ticket.id());
        // No send can land after close(); one that landed before is taken back here.
        rx.close();
        if let Ok(Admission::Admitted(_, lease)) = rx.try_recv() {
            self.shared.release(lease, Outcome::Cancelled);
        }
        self.shared.dispatch(d);
    }
}
