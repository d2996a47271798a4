//! [`Proxy`]: the state every task of every shard shares. The core (and the backends'
//! [`Upstream`]s) behind one short-held lock, the settings, the notice sink, the
//! lifecycle (connections open, shutdown) and the requests waiting in the admission queue.
//!
//! Every input to the core (`release`, `probe_result`, `handle_timeout`, `enqueue`,
//! `cancel`) is followed, under its lock, by [`Proxy::drain`]: queue admissions are handed
//! to the requests waiting for them (the core releases those nobody waits for any more),
//! and the events are taken, to be logged outside the lock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_listener::Event;
use lb_core::{
    Admission, BackendId, Balancer, Lease, Outcome, OwnedMeta, Policy, Reject, RequestMeta, Summary,
};
use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::account::{Account, Arrival};
use crate::fleet::Source;
use crate::hold::Held;
use crate::lease::{LeaseGuard, QueueWait, Slot};
use crate::metrics::{AffinityPolicy, BackendRow, Format, Metrics, Rejection, Scrape};
use crate::reply::{self, Reply};
use crate::runtime::Runtime;
use crate::settings::{Notice, NoticeSink, Settings, Target};
use crate::start::StartError;
use crate::upstream::Upstream;

/// The shared state of one running proxy. Adapters hold it in an `Arc`.
pub struct Proxy<R: Runtime> {
    core: Mutex<Core<R>>,
    rt: R,
    settings: Settings,
    log: NoticeSink,
    shutting_down: AtomicBool,
    /// Client connections being served.
    connections: AtomicUsize,
    /// Notified when shutdown begins, and then whenever a connection or a lease ends.
    changed: Event,
    /// Requests waiting in the core's admission queue, by ticket.
    waiters: Mutex<HashMap<u64, Arc<Slot>>>,
    /// Wakes the driver when an input may have added an earlier deadline (a queued
    /// request's expiry).
    pub(crate) rearm: Event,
    /// Notified when a client connection closes while the count was at
    /// `--max-client-conns`.
    freed: Event,
    /// Notified once, when shutdown begins: what blocking threads (DNS discovery) wait on.
    pub(crate) stopping: Event,
    metrics: Arc<Metrics>,
    /// The policy's affinity counters, if it has any.
    affinity: Option<AffinityPolicy>,
    /// The next backend's admin API id.
    pub(crate) serial: std::sync::atomic::AtomicU64,
    /// Whether some backend lists its models: then requests are routed by their model
    /// (their body is read first).
    model_pools: AtomicBool,
}

/// What the lock guards: the balancer, and the backends by slot.
pub(crate) struct Core<R: Runtime> {
    pub(crate) balancer: Balancer<SmallRng>,
    upstreams: Vec<Option<Arc<Upstream<R>>>>,
}

/// What the core said after one input, handled outside its lock. (Actions are the
/// driver's alone: it polls them itself.)
#[derive(Default)]
pub(crate) struct Drained {
    events: Vec<lb_core::Event>,
}

impl<R: Runtime> Proxy<R> {
    /// The proxy for `settings`, its backends added (and prepared by `rt`).
    pub fn new(
        settings: Settings,
        log: NoticeSink,
        rt: R,
        now: Instant,
    ) -> Result<Arc<Self>, StartError> {
        let settings_policy = settings.core.policy;
        let mut core = Core {
            balancer: Balancer::new(settings.core.clone(), SmallRng::from_os_rng(), now),
            upstreams: Vec::new(),
        };
        let from_file = match &settings.backends_file {
            Some(path) => crate::discovery::read_backends_file(path, settings.max_conns)
                .map_err(|e| StartError::Url(format!("--backends-file: {e}")))?,
            None => Vec::new(),
        };
        let flagged = settings.backends.iter().map(|s| (s, Source::Flag));
        for (spec, source) in flagged.chain(from_file.iter().map(|s| (s, Source::File))) {
            let target = Target::parse(&spec.url).map_err(|e| StartError::Url(e.to_string()))?;
            let serial = core.upstreams().count() as u64 + 1;
            let idle = settings.pool_idle_timeout;
            core.join(&rt, idle, now, spec.clone(), target, source, || serial)?;
        }
        // Each name's backends must be ones this build can reach (dns+https needs TLS).
        for d in &settings.discover {
            rt.backend(&d.target(std::net::Ipv4Addr::LOCALHOST.into()))
                .map_err(|e| match e {
                    StartError::NoTls(_) => StartError::Discover(format!(
                        "{d}: this smol build of lb has no TLS for https backends \
                         (build it with `--features smol,lb-smol/tls`, or use the default tokio build)"
                    )),
                    other => StartError::Discover(format!("{d}: {other}")),
                })?;
        }
        let next_serial = core.upstreams().count() as u64 + 1;
        Ok(Arc::new(Proxy {
            core: Mutex::new(core),
            rt,
            settings,
            log,
            shutting_down: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            changed: Event::new(),
            waiters: Mutex::new(HashMap::new()),
            rearm: Event::new(),
            freed: Event::new(),
            stopping: Event::new(),
            metrics: Arc::new(Metrics::new(R::NAME)),
            affinity: match settings_policy {
                Policy::CacheAware => Some(AffinityPolicy::CacheAware),
                Policy::ConsistentHash => Some(AffinityPolicy::ConsistentHash),
                Policy::PrefixHash => Some(AffinityPolicy::PrefixHash),
                _ => None,
            },
            serial: std::sync::atomic::AtomicU64::new(next_serial),
            model_pools: AtomicBool::new(false),
        }))
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// An account for a request that arrived as `head` says (see [`Account`]).
    pub fn account(&self, head: &Arrival<'_>) -> Account {
        let access = self
            .settings
            .access_log
            .as_ref()
            .map(|log| (log, self.settings.core.policy.name()));
        Account::new(self.metrics.clone(), head, self.affinity, access)
    }

    /// The `/metrics` exposition now, in `format`.
    pub fn scrape(&self, format: Format) -> String {
        let scrape = {
            let core = self.lock();
            let now = Instant::now();
            let backends = core
                .balancer
                .backends()
                .filter_map(|b| {
                    let up = core.upstream(b.id)?;
                    let engine = b.engine.map(|e| crate::metrics::EngineRow {
                        running: e.report.running,
                        waiting: e.report.waiting,
                        kv_usage: e.report.kv_usage(),
                        age: now.saturating_duration_since(e.at).as_secs_f64(),
                    });
                    Some(BackendRow {
                        engine,
                        url: b.url.clone(),
                        up: b.healthy && !b.draining,
                        in_flight: b.in_flight,
                        max_conns: b.max_conns,
                        weight: b.weight,
                        stats: up.stats.clone(),
                    })
                })
                .collect();
            let policy = self.settings.core.policy;
            Scrape {
                backends,
                queue_depth: core.balancer.queued(),
                affinity: self.affinity.map(|_| {
                    let entries = core.balancer.routing_stats().map_or(0, |r| r.keys);
                    (policy.name(), entries)
                }),
                client_connections: self.connections.load(Ordering::Acquire),
            }
        };
        self.metrics.encode(scrape, format)
    }

    /// Whether a request's body (its first
    /// [`MAX_BODY_PREFIX`](lb_core::affinity::MAX_BODY_PREFIX) bytes) must be read before
    /// selecting: the policy routes by content ([`Settings::routes_by_body`]), or model
    /// pools are on (some backend lists its models).
    ///
    /// For model pools alone, only the body of a `POST`, `PUT` or `PATCH` that may be JSON
    /// is read (`content_type` gives the request's `Content-Type`): none,
    /// `application/json` or `+json`, `text/plain`, or `application/x-www-form-urlencoded`
    /// (what `curl -d` sends). An upload (`multipart/*`, `application/octet-stream`,
    /// media) streams through unread and routes as if it named no model.
    pub fn routes_by_body<'a>(
        &self,
        method: &str,
        content_type: impl FnOnce() -> Option<&'a [u8]>,
    ) -> bool {
        self.settings.routes_by_body()
            || (self.model_pools.load(Ordering::Acquire)
                && matches!(method, "POST" | "PUT" | "PATCH")
                && may_name_a_model(content_type()))
    }

    /// What a request routes by ([`Settings::route_keys`]), the model included while
    /// model pools are on. `prefix` is what the adapter read when
    /// [`routes_by_body`](Self::routes_by_body).
    pub fn route_keys<'h>(
        &self,
        prefix: Option<(&[u8], bool)>,
        header: impl FnOnce(&str) -> Option<&'h [u8]>,
    ) -> crate::RouteKeys {
        let models = self.model_pools.load(Ordering::Acquire);
        self.settings.route_keys(prefix, header, models)
    }

    /// What `lb` answers itself instead of proxying, besides `/health`: `GET /v1/models`
    /// when every healthy backend listed its models (the union, sorted by id, see
    /// [`crate::models`]); `None`: proxy the request. `path` is without the query.
    pub fn local_reply(&self, method: &str, path: &str) -> Option<Reply> {
        if method != "GET" || path != crate::models::MODELS_PATH {
            return None;
        }
        if !self.model_pools.load(Ordering::Acquire) {
            return None;
        }
        let lists = {
            let core = self.lock();
            let mut lists = Vec::new();
            for b in core
                .balancer
                .backends()
                .filter(|b| b.healthy && !b.draining)
            {
                lists.push(core.upstream(b.id)?.models()?);
            }
            lists
        };
        if lists.is_empty() {
            return None;
        }
        Some(Reply {
            status: 200,
            headers: &[("cache-control", "no-store")],
            body: crate::models::union(lists.iter().map(|l| &l[..])),
            request_id: None,
            rejection: None,
        })
    }

    /// A backend's models, as its `/v1/models` answer listed them (`None`: no list, see
    /// [`crate::models`]): kept for the merged list and given to the core.
    pub(crate) fn learn_models(
        &self,
        upstream: &Upstream<R>,
        models: Option<Vec<crate::models::Model>>,
    ) {
        let models: Option<Arc<[crate::models::Model]>> =
            models.filter(|l| !l.is_empty()).map(Into::into);
        if !upstream.set_models(models.clone()) {
            return;
        }
        let ids = models.map(|l| l.iter().map(|m| m.id.clone()).collect());
        let d = {
            let mut core = self.lock();
            let now = Instant::now();
            core.balancer.set_models(now, upstream.id(), ids);
            let on = core.upstreams().any(|u| u.models().is_some());
            self.model_pools.store(on, Ordering::Release);
            self.drain(&mut core, now)
        };
        self.dispatch(d);
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The adapter's runtime.
    pub fn runtime(&self) -> &R {
        &self.rt
    }

    /// Hands a notice to the log (the CLI prints it).
    pub fn notify(&self, notice: Notice) {
        (self.log)(notice);
    }

    pub(crate) fn lock(&self) -> Held<'_, Core<R>> {
        // A panic while holding the lock cannot leave the core half-updated in a way that
        // matters more than stopping the proxy would, so keep serving.
        crate::hold::held(self.core.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The backend with this id, while it is in the pool.
    pub fn upstream(&self, id: BackendId) -> Option<Arc<Upstream<R>>> {
        self.lock().upstream(id)
    }

    /// How long a connection to the backend in `slot` may sit idle in a pool.
    pub fn idle_limit(&self, slot: usize) -> Duration {
        match self.lock().upstreams.get(slot) {
            Some(Some(u)) => u.idle.get(),
            _ => self.settings.pool_idle_timeout,
        }
    }

    /// Counts and health, as `/health` reports them.
    pub fn summary(&self) -> Summary {
        self.lock().balancer.summary()
    }

    /// The answer to `GET /health`.
    pub fn health(&self) -> Reply {
        reply::health(self.summary())
    }

    /// Requests in flight (leases not yet released).
    pub fn in_flight(&self) -> u64 {
        self.lock().balancer.outstanding()
    }

    /// Selects a backend for a request from `client` with routing `meta`; the lease comes
    /// back in a guard that releases it.
    pub fn select(self: &Arc<Self>, meta: &RequestMeta<'_>) -> Result<LeaseGuard<R>, Reject> {
        let mut core = self.lock();
        let now = Instant::now();
        let lease = match core.balancer.select(now, meta) {
            Ok(l) => l,
            Err(reject) => {
                drop(core);
                // With the queue on, a full pool is the queue's to refuse (or not).
                let queued = self.settings.core.queue.enabled();
                match reject {
                    Reject::NoHealthyBackend => self.metrics.rejected(Rejection::NoHealthy),
                    Reject::UnknownModel => self.metrics.rejected(Rejection::UnknownModel),
                    Reject::AllAtCapacity if !queued => {
                        self.metrics.rejected(Rejection::AtCapacity)
                    }
                    Reject::AllAtCapacity => {}
                }
                return Err(reject);
            }
        };
        let upstream = core.upstream_of(&lease);
        drop(core);
        Ok(LeaseGuard::new(self.clone(), lease, upstream, now))
    }

    /// A backend for a request leaving the backends in `tried` (a failover), if one can
    /// take it now (no wait in the queue).
    pub(crate) fn select_excluding(
        self: &Arc<Self>,
        meta: &RequestMeta<'_>,
        tried: &[BackendId],
    ) -> Option<LeaseGuard<R>> {
        let mut core = self.lock();
        let now = Instant::now();
        let lease = core.balancer.select_excluding(now, meta, tried).ok()?;
        let upstream = core.upstream_of(&lease);
        drop(core);
        Some(LeaseGuard::new(self.clone(), lease, upstream, now))
    }

    /// [`select`](Self::select), and when every backend is at its cap and the queue is on
    /// (`--queue-timeout`), a wait in the queue: `Err` when the queue refuses (full: 429;
    /// nothing healthy: 503) or the wait expires (429). Dropping the future (the client
    /// left) gives the place up, and releases a lease that was already delivered.
    pub async fn select_or_wait(
        self: &Arc<Self>,
        meta: &RequestMeta<'_>,
    ) -> Result<LeaseGuard<R>, Reject> {
        match self.select(meta) {
            Err(Reject::AllAtCapacity) if self.settings.core.queue.enabled() => {
                self.wait_for_slot(OwnedMeta::from(meta)).await
            }
            selected => selected,
        }
    }

    /// Waits in the core's admission queue for a slot (see
    /// [`select_or_wait`](Self::select_or_wait)).
    pub async fn wait_for_slot(self: &Arc<Self>, meta: OwnedMeta) -> Result<LeaseGuard<R>, Reject> {
        let slot = Arc::new(Slot::default());
        let entered = Instant::now();
        let (ticket, d) = {
            let mut core = self.lock();
            let ticket = match core.balancer.enqueue(entered, meta) {
                Ok(t) => t,
                Err(reject) => {
                    self.metrics.rejected(match reject {
                        Reject::NoHealthyBackend => Rejection::NoHealthy,
                        Reject::UnknownModel => Rejection::UnknownModel,
                        Reject::AllAtCapacity => Rejection::QueueFull,
                    });
                    return Err(reject);
                }
            };
            // Registered under the core's lock: no admission for it can be drained before.
            self.waiters().insert(ticket.id(), slot.clone());
            (ticket, self.drain(&mut core, Instant::now()))
        };
        // Its expiry may be the earliest deadline now: the driver sets its timer again.
        self.rearm.notify(usize::MAX);
        let mut wait = QueueWait::new(self.clone(), ticket, slot);
        self.dispatch(d);
        let admission = wait.receive().await;
        let now = Instant::now();
        self.metrics
            .queue_wait(now.saturating_duration_since(entered));
        match admission {
            Admission::Admitted(_, lease) => match self.upstream(lease.backend()) {
                Some(upstream) => Ok(LeaseGuard::new(self.clone(), lease, upstream, now)),
                None => {
                    // Removed (forced) between the admission and now.
                    self.release(lease, Outcome::Cancelled);
                    self.metrics.rejected(Rejection::NoHealthy);
                    Err(Reject::NoHealthyBackend)
                }
            },
            Admission::Expired(_) => {
                self.metrics.rejected(Rejection::QueueTimeout);
                Err(Reject::AllAtCapacity)
            }
        }
    }

    pub(crate) fn waiters(&self) -> MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes what the core has to say after an input (call under its lock): its events,
    /// and its queue admissions, handed to their waiting requests right here (a
    /// non-blocking hand-over); the core releases those nobody waits for any more, at
    /// `now` (the input's own time: this runs under the same hold of the lock, and one
    /// clock read less took 15 of the 132 ns a request held it; see benches/contend.rs).
    pub(crate) fn drain(&self, core: &mut Core<R>, now: Instant) -> Drained {
        let mut d = Drained::default();
        core.balancer.deliver_admissions(now, |adm| {
            match self.waiters().remove(&adm.ticket().id()) {
                Some(slot) => slot.deliver(adm),
                None => Err(adm),
            }
        });
        while let Some(e) = core.balancer.poll_event() {
            if let lb_core::Event::Health {
                backend,
                state,
                cause,
                ..
            } = &e
            {
                if let Some(up) = core.upstream(*backend) {
                    let passive = matches!(cause, lb_core::Cause::Passive(_));
                    let healthy = *state == lb_core::HealthState::Healthy;
                    up.stats.transition(healthy, passive);
                    let to = if healthy { "healthy" } else { "unhealthy" };
                    let at = crate::fleet::unix_ms();
                    up.note(|n| n.transition = Some((at, to, cause.to_string())));
                }
            }
            if let lb_core::Event::Removed { backend, .. } = &e {
                if core
                    .take_upstream(*backend)
                    .is_some_and(|u| u.models().is_some())
                {
                    // It may have been the last backend with a list: model pools (and
                    // reading bodies for them) end with it.
                    let on = core.upstreams().any(|u| u.models().is_some());
                    self.model_pools.store(on, Ordering::Release);
                }
            }
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

    /// Gives a lease back with the outcome of its exchange.
    pub(crate) fn release(&self, lease: Lease, outcome: Outcome) {
        let d = {
            let mut core = self.lock();
            // One clock read for both: the lock is held from the first to the second.
            let now = Instant::now();
            core.balancer.release(now, lease, outcome);
            self.drain(&mut core, now)
        };
        // A health transition may bring a probe forward (a passive ejection's re-probe).
        if !d.events.is_empty() {
            self.rearm.notify(usize::MAX);
        }
        self.dispatch(d);
        if self.is_shutting_down() {
            self.changed.notify(usize::MAX);
        }
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Stops taking new work: listeners close, idle connections close, in-flight requests
    /// finish.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.changed.notify(usize::MAX);
        self.stopping.notify(usize::MAX);
        self.rearm.notify(usize::MAX);
    }

    /// Resolves once shutdown has begun.
    pub async fn shutdown_begun(&self) {
        self.until(|p| p.is_shutting_down()).await
    }

    /// Resolves once no client connection is open and no lease is outstanding (call after
    /// [`begin_shutdown`](Self::begin_shutdown)).
    pub async fn drained(&self) {
        self.until(|p| p.connections.load(Ordering::Acquire) == 0 && p.in_flight() == 0)
            .await
    }

    /// Resolves once no lease is outstanding (call after
    /// [`begin_shutdown`](Self::begin_shutdown)).
    pub async fn idle(&self) {
        self.until(|p| p.in_flight() == 0).await
    }

    async fn until(&self, done: impl Fn(&Self) -> bool) {
        loop {
            let listener = self.changed.listen();
            if done(self) {
                return;
            }
            listener.await;
        }
    }

    /// Resolves once fewer than `--max-client-conns` client connections are open (at once
    /// if they are). Each accept loop waits for it before it accepts, so at the limit `lb`
    /// stops accepting and new clients wait in the kernel's backlog.
    pub async fn accept_room(&self) {
        let max = self.settings.max_client_conns;
        loop {
            if self.connections.load(Ordering::Acquire) < max {
                return;
            }
            let freed = self.freed.listen();
            if self.connections.load(Ordering::Acquire) < max {
                return;
            }
            freed.await;
        }
    }

    /// Counts a just-accepted client connection as open until the returned guard drops,
    /// once there is room under `--max-client-conns`. Shards that passed
    /// [`accept_room`](Self::accept_room) at the same moment may each have accepted one
    /// connection more than the limit allows; that one waits here, unread, for a
    /// connection to close. So at most `--max-client-conns` connections are served, and
    /// at most one more per shard is held open.
    pub async fn admit(self: &Arc<Self>) -> ConnectionGuard<R> {
        self.metrics.client_connection();
        let max = self.settings.max_client_conns;
        loop {
            let mut open = self.connections.load(Ordering::Acquire);
            while open < max {
                match self.connections.compare_exchange_weak(
                    open,
                    open + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        return ConnectionGuard {
                            proxy: self.clone(),
                        }
                    }
                    Err(now) => open = now,
                }
            }
            let freed = self.freed.listen();
            if self.connections.load(Ordering::Acquire) < max {
                continue;
            }
            freed.await;
        }
    }

    /// Client connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Wakes whoever waits on the lifecycle (shutdown, drained) to look again.
    pub fn changed(&self) {
        self.changed.notify(usize::MAX);
    }
}

impl<R: Runtime> Core<R> {
    pub(crate) fn upstream(&self, id: BackendId) -> Option<Arc<Upstream<R>>> {
        self.upstreams
            .get(id.slot())?
            .as_ref()
            .filter(|u| u.id() == id)
            .cloned()
    }

    /// Puts an upstream in its slot.
    pub(crate) fn put_upstream(&mut self, up: Arc<Upstream<R>>) {
        let slot = up.id().slot();
        if self.upstreams.len() <= slot {
            self.upstreams.resize_with(slot + 1, || None);
        }
        self.upstreams[slot] = Some(up);
    }

    /// Takes a removed backend's upstream out (its leases keep their own handle).
    pub(crate) fn take_upstream(&mut self, id: BackendId) -> Option<Arc<Upstream<R>>> {
        let s = self.upstreams.get_mut(id.slot())?;
        if s.as_ref().is_some_and(|u| u.id() == id) {
            s.take()
        } else {
            None
        }
    }

    /// Every upstream in the pool.
    pub(crate) fn upstreams(&self) -> impl Iterator<Item = &Arc<Upstream<R>>> {
        self.upstreams.iter().flatten()
    }

    fn upstream_of(&self, lease: &Lease) -> Arc<Upstream<R>> {
        self.upstream(lease.backend())
            .expect("a lease is on a backend in the pool: removal waits for its leases")
    }
}

/// One open client connection; see [`Proxy::admit`].
pub struct ConnectionGuard<R: Runtime> {
    proxy: Arc<Proxy<R>>,
}

impl<R: Runtime> ConnectionGuard<R> {
    /// The proxy it belongs to.
    pub fn proxy(&self) -> &Arc<Proxy<R>> {
        &self.proxy
    }
}

impl<R: Runtime> Drop for ConnectionGuard<R> {
    fn drop(&mut self) {
        let was = self.proxy.connections.fetch_sub(1, Ordering::AcqRel);
        if was >= self.proxy.settings.max_client_conns {
            // The accept loops may be waiting for room: each shard's listener has its
            // own backlog, so every one looks again.
            self.proxy.freed.notify(usize::MAX);
        }
        if self.proxy.is_shutting_down() {
            self.proxy.changed.notify(usize::MAX);
        }
    }
}

/// The client address as the core and `X-Forwarded-For` see it: IPv4-mapped IPv6
/// addresses as IPv4.
pub fn client_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Whether a body of this `Content-Type` may be an OpenAI-style JSON request (see
/// [`Proxy::routes_by_body`]).
fn may_name_a_model(content_type: Option<&[u8]>) -> bool {
    let Some(ct) = content_type else {
        return true;
    };
    let essence = ct.split(|&b| b == b';').next().unwrap_or(ct).trim_ascii();
    let is = |t: &[u8]| essence.eq_ignore_ascii_case(t);
    let json_suffix = essence
        .len()
        .checked_sub(5)
        .is_some_and(|i| essence[i..].eq_ignore_ascii_case(b"+json"));
    is(b"application/json")
        || json_suffix
        || is(b"text/plain")
        || is(b"application/x-www-form-urlencoded")
}

#[cfg(test)]
mod model_body_tests {
    use super::may_name_a_model;

    #[test]
    fn only_bodies_that_may_be_json_are_read_for_the_model() {
        for yes in [
            None,
            Some(&b"application/json"[..]),
            Some(b"Application/JSON; charset=utf-8"),
            Some(b"application/vnd.api+json"),
            Some(b"text/plain"),
            Some(b"application/x-www-form-urlencoded"),
        ] {
            assert!(may_name_a_model(yes), "{yes:?}");
        }
        for no in [
            &b"multipart/form-data; boundary=x"[..],
            b"application/octet-stream",
            b"audio/wav",
            b"image/png",
        ] {
            assert!(!may_name_a_model(Some(no)), "{no:?}");
        }
    }
}

#[cfg(test)]
mod queue_tests {
    use std::future::Future;
    use std::net::{IpAddr, Ipv4Addr};
    use std::pin::pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use std::time::{Duration, Instant};

    use lb_core::{OwnedMeta, RequestMeta};

    use super::Proxy;
    use crate::runtime::Still;
    use crate::settings::{parse_backend, Settings};

    /// One backend, `--max-conns 1 --queue-timeout 60s`.
    fn proxy() -> Arc<Proxy<Still>> {
        let backend = parse_backend("http://127.0.0.1:9001", 1).unwrap();
        let mut settings = Settings::new("127.0.0.1:0".parse().unwrap(), vec![backend]);
        settings.max_conns = 1;
        settings.core.queue.timeout = Some(Duration::from_secs(60));
        Proxy::new(settings, Arc::new(|_| {}), Still, Instant::now()).unwrap()
    }

    fn meta() -> RequestMeta<'static> {
        RequestMeta::from_ip(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// A release hands its slot to the request waiting in the queue, under the same hold
    /// of the lock (and the same `now`), and the count stays exact: one in flight.
    #[test]
    fn a_release_hands_its_slot_to_the_waiting_request() {
        let p = proxy();
        let first = p.select(&meta()).unwrap();
        assert!(p.select(&meta()).is_err(), "the backend is at --max-conns");
        let mut cx = Context::from_waker(Waker::noop());
        let mut waiting = pin!(p.wait_for_slot(OwnedMeta::from(&meta())));
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        assert_eq!(p.in_flight(), 1);
        first.respond(200);
        let Poll::Ready(Ok(second)) = waiting.as_mut().poll(&mut cx) else {
            panic!("the waiting request was not admitted");
        };
        assert_eq!(p.in_flight(), 1);
        assert!(p.select(&meta()).is_err(), "still at --max-conns");
        second.respond(200);
        assert_eq!(p.in_flight(), 0);
    }

    /// A request that gave its place up gets nothing; the released slot stays free.
    #[test]
    fn a_waiter_that_left_takes_no_slot() {
        let p = proxy();
        let first = p.select(&meta()).unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        {
            let mut waiting = pin!(p.wait_for_slot(OwnedMeta::from(&meta())));
            assert!(waiting.as_mut().poll(&mut cx).is_pending());
        }
        first.respond(200);
        assert_eq!(p.in_flight(), 0);
        p.select(&meta()).unwrap().respond(200);
        assert_eq!(p.in_flight(), 0);
    }
}
