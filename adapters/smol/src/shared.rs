//! State shared by every task on every shard: the core behind a mutex, backend targets,
//! the connection pools (one per shard, so a request never takes a connection another
//! thread uses), the admission queue's waiters, the request log, and the shutdown state.
//!
//! Every input to the core (`release`, `probe_result`, `handle_timeout`, `enqueue`,
//! `cancel`) is followed by [`Shared::drain`] under its lock, which hands each
//! [`Admission`] to the request waiting for it (the core releases those nobody waits for
//! any more, `Balancer::deliver_admissions`), and [`Shared::dispatch`] outside it, which
//! logs the events.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use event_listener::Event;
use lb_core::{
    Admission, BackendId, Balancer, Lease, Outcome, OwnedMeta, PoolError, Reject, RequestMeta,
    Ticket,
};
use lb_http1::Limits;
use lb_proxy::settings::IdleLimit;
use lb_proxy::{Notice, NoticeSink, Settings, Target};
use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::connect::Connector;
use crate::pool::Pool;
use crate::reactor::Reactor;
use crate::timers::Timers;

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
    /// A shard's thread could not be started.
    Thread(io::Error),
    /// A shard's event loop (an epoll instance and an eventfd) could not be created.
    Reactor(io::Error),
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
            StartError::Thread(e) => write!(f, "cannot start a worker thread: {e}"),
            StartError::Reactor(e) => write!(f, "cannot create an event loop (epoll): {e}"),
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
    /// How long its connections may sit idle in a pool.
    pub(crate) idle: IdleLimit,
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
    /// Each shard's own state, used by its shard's thread only (the locks are never
    /// contended).
    locals: Vec<Local>,
    shutting_down: AtomicBool,
    /// Client connections being served.
    connections: AtomicUsize,
    /// Shards whose threads still run (the calling thread's included).
    shards_running: AtomicUsize,
    /// Notified when shutdown begins, and then whenever a connection or a lease ends.
    pub(crate) changed: Event,
    /// Requests waiting in the core's admission queue, by ticket.
    waiters: Mutex<HashMap<u64, Arc<Slot>>>,
    /// Wakes the driver when an input may have added an earlier deadline (a queued
    /// request's expiry).
    pub(crate) rearm: Event,
}

/// What the core said after one input, handled outside its lock.
#[derive(Default)]
pub(crate) struct Drained {
    events: Vec<lb_core::Event>,
}

impl Shared {
    pub(crate) fn new(
        settings: Settings,
        log: NoticeSink,
        now: Instant,
        reactors: Vec<Arc<Reactor>>,
    ) -> Result<Arc<Self>, StartError> {
        let shards = reactors.len();
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
                idle: IdleLimit::new(settings.pool_idle_timeout),
            });
        }
        let connector = Connector::new(&settings, upstreams.iter().flatten())?;
        let limits = Limits {
            max_head_bytes: settings.max_head_bytes,
            ..Limits::default()
        };
        Ok(Arc::new(Shared {
            core: Mutex::new(core),
            locals: reactors
                .into_iter()
                .map(|reactor| Local {
                    pool: Pool::new(upstreams.len()),
                    timers: Timers::new(),
                    reactor,
                })
                .collect(),
            upstreams,
            limits,
            connector,
            settings,
            log,
            shutting_down: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            shards_running: AtomicUsize::new(shards),
            changed: Event::new(),
            waiters: Mutex::new(HashMap::new()),
            rearm: Event::new(),
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
        self.upstreams[slot]
            .as_ref()
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

    /// Takes the events the core has after an input (call under its lock), and hands its
    /// queue admissions to their waiting requests right here (a non-blocking hand-over);
    /// the core releases those nobody waits for any more. Actions (probes) are the
    /// driver's: only its `handle_timeout` makes them.
    pub(crate) fn drain(&self, core: &mut Balancer<SmallRng>) -> Drained {
        core.deliver_admissions(Instant::now(), |adm| {
            match self.waiters().remove(&adm.ticket().id()) {
                Some(slot) => slot.deliver(adm),
                None => Err(adm),
            }
        });
        let mut d = Drained::default();
        while let Some(e) = core.poll_event() {
            d.events.push(e);
        }
        d
    }

    /// Logs the events (outside the core's lock).
    pub(crate) fn dispatch(&self, d: Drained) {
        for e in d.events {
            (self.log)(Notice::Core(e));
        }
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, lease: Lease, outcome: Outcome) {
        let d = {
            let mut core = self.core();
            core.release(Instant::now(), lease, outcome);
            self.drain(&mut core)
        };
        self.dispatch(d);
        if self.is_shutting_down() {
            self.changed.notify(usize::MAX);
        }
    }

    /// Waits in the core's admission queue for a slot (every backend was at its cap):
    /// `Err` when the queue refuses (full: 429; nothing healthy: 503) or the wait expires
    /// (429). Dropping the future (the client left) gives the place up, and releases a
    /// lease that was already delivered.
    pub(crate) async fn wait_for_slot(
        self: &Arc<Self>,
        meta: OwnedMeta,
    ) -> Result<LeaseGuard, Reject> {
        let slot = Arc::new(Slot::default());
        let (ticket, d) = {
            let mut core = self.core();
            let ticket = core.enqueue(Instant::now(), meta)?;
            // Registered under the core's lock: no admission for it can be drained before.
            self.waiters().insert(ticket.id(), slot.clone());
            (ticket, self.drain(&mut core))
        };
        // Its expiry may be the earliest deadline now: the driver sets its timer again.
        self.rearm.notify(usize::MAX);
        let mut wait = QueueWait {
            shared: self.clone(),
            ticket,
            slot,
            done: false,
        };
        self.dispatch(d);
        let admission = wait.slot.receive().await;
        wait.done = true;
        match admission {
            Admission::Admitted(_, lease) => Ok(LeaseGuard {
                shared: self.clone(),
                lease: Some(lease),
                outcome: Outcome::Cancelled,
            }),
            Admission::Expired(_) => Err(Reject::AllAtCapacity),
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

    /// Counts a client connection of shard `shard` as open until the returned guard drops.
    pub(crate) fn open_connection(self: &Arc<Self>, shard: usize) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard {
            shared: self.clone(),
            shard,
        }
    }

    /// The state of shard `shard`.
    pub(crate) fn local(&self, shard: usize) -> &Local {
        &self.locals[shard]
    }

    /// A shard's thread has stopped serving (its tasks are gone).
    pub(crate) fn shard_stopped(&self) {
        self.shards_running.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify(usize::MAX);
    }

    /// Resolves once every shard has stopped (call after `begin_shutdown`).
    pub(crate) async fn shards_stopped(&self) {
        loop {
            let listener = self.changed.listen();
            if self.shards_running.load(Ordering::Acquire) == 0 {
                return;
            }
            listener.await;
        }
    }
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

/// One open client connection; see [`Shared::open_connection`].
pub(crate) struct ConnectionGuard {
    shared: Arc<Shared>,
    shard: usize,
}

impl ConnectionGuard {
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The state of the connection's shard.
    pub(crate) fn local(&self) -> &Local {
        self.shared.local(self.shard)
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

/// Where one queued request's [`Admission`] is delivered (a one-shot channel).
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    ready: Event,
}

#[derive(Default)]
enum SlotState {
    #[default]
    Waiting,
    Delivered(Admission),
    /// The waiter left: nothing can be delivered any more.
    Closed,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the admission over; gives it back if the waiter has left.
    fn deliver(&self, adm: Admission) -> Result<(), Admission> {
        let mut state = self.lock();
        match *state {
            SlotState::Waiting => {
                *state = SlotState::Delivered(adm);
                drop(state);
                self.ready.notify(usize::MAX);
                Ok(())
            }
            _ => Err(adm),
        }
    }

    /// Takes a delivered admission, if any.
    fn take(&self) -> Option<Admission> {
        let mut state = self.lock();
        match std::mem::take(&mut *state) {
            SlotState::Delivered(adm) => Some(adm),
            other => {
                *state = other;
                None
            }
        }
    }

    /// Waits for the admission.
    async fn receive(&self) -> Admission {
        loop {
            let listener = self.ready.listen();
            if let Some(adm) = self.take() {
                return adm;
            }
            listener.await;
        }
    }

    /// The waiter leaves: later deliveries fail; one that landed before is returned.
    fn close(&self) -> Option<Admission> {
        match std::mem::replace(&mut *self.lock(), SlotState::Closed) {
            SlotState::Delivered(adm) => Some(adm),
            _ => None,
        }
    }
}

/// A place in the admission queue; dropping it before the admission was received gives
/// it up, and a lease that arrived meanwhile is released.
struct QueueWait {
    shared: Arc<Shared>,
    ticket: Ticket,
    slot: Arc<Slot>,
    /// The admission was received: nothing to give up.
    done: bool,
}

impl Drop for QueueWait {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let d = {
            let mut core = self.shared.core();
            core.cancel(Instant::now(), self.ticket);
            self.shared.drain(&mut core)
        };
        self.shared.waiters().remove(&self.ticket.id());
        // No delivery can land after close(); one that landed before is taken back here.
        if let Some(Admission::Admitted(_, lease)) = self.slot.close() {
            self.shared.release(lease, Outcome::Cancelled);
        }
        self.shared.dispatch(d);
    }
}
