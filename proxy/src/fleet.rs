//! Backends that change while `lb` runs: added, drained, removed and reweighted through
//! the admin API (`/admin/backends`, see [`crate::admin`]), each change logged and
//! counted with its source. One implementation for both runtimes: the adapters only
//! carry the admin request here.
//!
//! Ids: each backend gets a number when it joins (1, 2, ... in order), stable for its
//! life and never reused, even when its core slot is.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lb_core::{BackendId, BackendSpec, PoolError};
use serde_json::{json, Value};

use crate::reqlog::rfc3339_ms;
use crate::runtime::Runtime;
use crate::settings::{IdleLimit, Notice, Target};
use crate::upstream::Upstream;
use crate::{Proxy, StartError};

/// Where a backend (or a change to it) came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `--backends`.
    Flag,
    /// `--backends-file`.
    File,
    /// `--discover dns://`.
    Dns,
    /// The admin API.
    Api,
}

impl Source {
    /// Its name in the API, the log and the `source` label.
    pub fn name(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::File => "file",
            Source::Dns => "dns",
            Source::Api => "api",
        }
    }
}

/// What changed in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A backend joined.
    Added,
    /// It takes no new requests; it stays listed once idle.
    Drained,
    /// It takes no new requests and leaves once idle (or at once, forced).
    Removed,
    /// Its weight changed.
    Weight,
}

impl Change {
    /// Its name in the log and the `change` label.
    pub fn name(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Drained => "drained",
            Change::Removed => "removed",
            Change::Weight => "weight",
        }
    }
}

/// Who asked for a change: its source and, for the API, the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The source.
    pub source: Source,
    /// The API client's address.
    pub client: Option<SocketAddr>,
}

impl Origin {
    /// A change through the admin API from `client`.
    pub fn api(client: SocketAddr) -> Self {
        Origin {
            source: Source::Api,
            client: Some(client),
        }
    }
}

/// Why a change was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum FleetError {
    /// The URL or weight is not usable (400).
    Invalid(String),
    /// The backend is in the pool already (409).
    Duplicate(String),
    /// No backend has this id (404).
    NotFound(u64),
}

/// The last probe of a backend and the last health transition, for the API's listing.
#[derive(Clone, Debug, Default)]
pub struct Notes {
    /// When the last probe ended (ms since the epoch) and what it found.
    pub probe: Option<(u64, String)>,
    /// When the last transition happened (ms since the epoch), to which state, and why.
    pub transition: Option<(u64, &'static str, String)>,
}

/// Milliseconds since the Unix epoch now.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<R: Runtime> Proxy<R> {
    /// Adds a backend (`spec.url` in `--backends` syntax, normalised here). It is probed
    /// before it takes traffic while a probed backend can take it, unless `trust`.
    pub fn add_backend(
        &self,
        spec: BackendSpec,
        trust: bool,
        origin: Origin,
    ) -> Result<u64, FleetError> {
        let target = Target::parse(&spec.url).map_err(|e| FleetError::Invalid(e.to_string()))?;
        self.add_target(spec, target, trust, origin)
    }

    /// Adds the backend `target` (`spec`'s URL is taken from it), as
    /// [`add_backend`](Self::add_backend) does.
    pub(crate) fn add_target(
        &self,
        spec: BackendSpec,
        target: Target,
        trust: bool,
        origin: Origin,
    ) -> Result<u64, FleetError> {
        let url = target.url.clone();
        let serial = {
            let mut core = self.lock();
            let next = || self.serial.fetch_add(1, Ordering::Relaxed);
            let idle = self.settings().pool_idle_timeout;
            let (id, serial) = core
                .join(
                    self.runtime(),
                    idle,
                    Instant::now(),
                    spec,
                    target,
                    origin.source,
                    next,
                )
                .map_err(|e| match e {
                    StartError::Backend(PoolError::Duplicate { url }) => FleetError::Duplicate(url),
                    StartError::Backend(other) => FleetError::Invalid(other.to_string()),
                    other => FleetError::Invalid(other.to_string()),
                })?;
            if trust {
                core.balancer.trust_backend(id);
            }
            serial
        };
        // Its first probe is due now: the driver sets its timer again.
        self.rearm.notify(usize::MAX);
        self.changed_by(&url, Change::Added, origin);
        Ok(serial)
    }

    /// Drains the backend `serial`: no new requests; those in flight (streams included)
    /// finish. With `remove`, it leaves the pool once idle; else it stays listed as
    /// drained.
    pub fn drain_backend(
        &self,
        serial: u64,
        remove: bool,
        origin: Origin,
    ) -> Result<(), FleetError> {
        let (url, d) = {
            let mut core = self.lock();
            let up = core.by_serial(serial).ok_or(FleetError::NotFound(serial))?;
            let now = Instant::now();
            if remove {
                core.balancer.drain_backend(now, up.id());
            } else {
                core.balancer.park_backend(now, up.id());
            }
            (up.url().clone(), self.drain(&mut core, now))
        };
        self.dispatch(d);
        let change = if remove {
            Change::Removed
        } else {
            Change::Drained
        };
        self.changed_by(&url, change, origin);
        Ok(())
    }

    /// Removes the backend `serial` at once: it takes nothing more and leaves the pool
    /// (its requests in flight run on, no longer counted against it).
    pub fn remove_backend_now(&self, serial: u64, origin: Origin) -> Result<(), FleetError> {
        let (url, d) = {
            let mut core = self.lock();
            let up = core.by_serial(serial).ok_or(FleetError::NotFound(serial))?;
            let now = Instant::now();
            core.balancer.remove_backend(now, up.id());
            (up.url().clone(), self.drain(&mut core, now))
        };
        self.dispatch(d);
        self.changed_by(&url, Change::Removed, origin);
        Ok(())
    }

    /// Sets the weight of the backend `serial`.
    pub fn set_weight(&self, serial: u64, weight: u32, origin: Origin) -> Result<(), FleetError> {
        let url = {
            let mut core = self.lock();
            let up = core.by_serial(serial).ok_or(FleetError::NotFound(serial))?;
            core.balancer
                .set_weight(Instant::now(), up.id(), weight)
                .map_err(|e| FleetError::Invalid(e.to_string()))?;
            up.url().clone()
        };
        self.changed_by(&url, Change::Weight, origin);
        Ok(())
    }

    /// The id of the backend with this URL (normalised as `--backends` does), if any.
    pub fn backend_serial(&self, url: &str) -> Option<u64> {
        let url = Target::parse(url).ok()?.url;
        let core = self.lock();
        let serial = core
            .upstreams()
            .find(|u| *u.url() == url)
            .map(|u| u.serial());
        serial
    }

    /// Every backend, as `GET /admin/backends` lists them.
    pub fn backends_json(&self) -> Value {
        let core = self.lock();
        let now = Instant::now();
        let engine_config = core.balancer.config().engine;
        let list: Vec<Value> = core
            .balancer
            .backends()
            .filter_map(|v| {
                let up = core.upstream(v.id)?;
                let notes = up.notes();
                let polls = up.load_polls();
                let engine = v.engine.map(|e| {
                    let fresh = engine_config.is_fresh(e.at, now);
                    json!({
                        "signal": polls.engine.map(|e| e.name()),
                        "running": e.report.running,
                        "waiting": e.report.waiting,
                        "kv_usage": e.report.kv_usage(),
                        "age_seconds": now.saturating_duration_since(e.at).as_secs_f64(),
                        "fresh": fresh,
                        "saturated": fresh && engine_config.is_saturated(&e.report),
                    })
                });
                let state = match (v.draining, v.parked && v.in_flight == 0, v.healthy) {
                    (true, true, _) => "drained",
                    (true, false, _) => "draining",
                    (false, _, true) => "healthy",
                    (false, _, false) => "unhealthy",
                };
                Some(json!({
                    "id": up.serial(),
                    "url": &*v.url,
                    // The `Host` it is sent: for a backend found by DNS, the name.
                    "host": &*up.target.authority,
                    "weight": v.weight,
                    "source": up.source().name(),
                    "state": state,
                    "probed": v.proven,
                    "in_flight": v.in_flight,
                    "max_conns": v.max_conns,
                    // What its /v1/models listed (null: no list, it serves every model).
                    "models": v.models.as_ref().map(|l| l.iter().map(|m| &**m).collect::<Vec<_>>()),
                    "last_probe": notes.probe.as_ref().map(|(at, result)| json!({
                        "at": rfc3339_ms(*at),
                        "result": result,
                    })),
                    "last_transition": notes.transition.as_ref().map(|(at, to, cause)| json!({
                        "at": rfc3339_ms(*at),
                        "to": to,
                        "cause": cause,
                    })),
                    "engine": engine,
                    "last_load_poll": polls.last.as_ref().map(|(at, result)| json!({
                        "at": rfc3339_ms(*at),
                        "result": result,
                    })),
                }))
            })
            .collect();
        json!({ "backends": list })
    }

    /// Logs and counts one change.
    fn changed_by(&self, url: &Arc<str>, change: Change, origin: Origin) {
        self.metrics().backend_change(origin.source, change);
        self.notify(Notice::BackendChange {
            backend: url.clone(),
            change,
            source: origin.source,
            client: origin.client,
        });
    }
}

impl<R: Runtime> crate::proxy::Core<R> {
    /// Puts `target` in the pool (`spec` with its URL), prepared by `rt`, with the admin
    /// id `serial()` (asked only once it has joined): the one way in for the backends
    /// given at start and those added while running.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn join(
        &mut self,
        rt: &R,
        idle: Duration,
        now: Instant,
        mut spec: BackendSpec,
        target: Target,
        source: Source,
        serial: impl FnOnce() -> u64,
    ) -> Result<(BackendId, u64), StartError> {
        spec.url = target.url.to_string();
        let ext = rt.backend(&target)?;
        let id = self
            .balancer
            .add_backend(now, spec)
            .map_err(StartError::Backend)?;
        let serial = serial();
        let up = Upstream::new(id, target, IdleLimit::new(idle), ext, serial, source);
        self.put_upstream(Arc::new(up));
        Ok((id, serial))
    }

    fn by_serial(&self, serial: u64) -> Option<Arc<Upstream<R>>> {
        self.upstreams()
            .find(|u| u.serial() == serial && self.balancer.backend(u.id()).is_some())
            .cloned()
    }
}

/// The id in a backend's API path, if it is one.
pub(crate) fn parse_serial(s: &str) -> Option<u64> {
    s.parse().ok().filter(|n| *n > 0)
}
