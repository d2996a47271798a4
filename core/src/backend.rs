//! Backend identity and what the pool knows about one backend.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::engine::EngineReport;
use crate::health::Health;

/// Identifies one backend for as long as it is in the pool.
///
/// Ids are a slot and a generation: a slot freed by a removed backend is reused by a later
/// one under a new generation, so an id held by a stale [`Lease`](crate::Lease) or probe
/// result never matches the newcomer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId {
    pub(crate) slot: u32,
    pub(crate) gen: u32,
}

impl BackendId {
    /// The backend's slot: a small index, unique among the backends present at one time
    /// (adapters may use it to index their own per-backend tables).
    pub fn slot(self) -> usize {
        self.slot as usize
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b{}.{}", self.slot, self.gen)
    }
}

/// The largest weight a backend may have. Weighted policies precompute tables whose size
/// grows with the sum of weights, so weights are kept small.
pub const MAX_WEIGHT: u32 = 1000;

/// What a caller says about a backend when adding it to the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// The backend's base URL, e.g. `http://10.0.0.5:8000`. The core treats it as a name;
    /// adapters parse it.
    pub url: String,
    /// Relative weight, `1..=MAX_WEIGHT`; used by weighted policies.
    pub weight: u32,
    /// Cap on requests in flight to this backend; 0 = unlimited. A backend at its cap is
    /// not eligible for selection.
    pub max_conns: u32,
}

impl BackendSpec {
    /// A backend with weight 1 and no cap.
    pub fn new(url: impl Into<String>) -> Self {
        BackendSpec {
            url: url.into(),
            weight: 1,
            max_conns: 0,
        }
    }
}

/// Why the pool refused a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolError {
    /// The weight was 0 or above [`MAX_WEIGHT`].
    InvalidWeight {
        /// The backend's URL.
        url: String,
        /// The refused weight.
        weight: u32,
    },
    /// A backend with this URL is already in the pool.
    Duplicate {
        /// The backend's URL.
        url: String,
    },
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::InvalidWeight { url, weight } => write!(
                f,
                "backend {url}: weight {weight} is out of range (1..={MAX_WEIGHT})"
            ),
            PoolError::Duplicate { url } => write!(f, "backend {url} is listed twice"),
        }
    }
}

impl std::error::Error for PoolError {}

/// One backend's state inside the pool.
#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) id: BackendId,
    pub(crate) url: Arc<str>,
    pub(crate) weight: u32,
    pub(crate) max_conns: u32,
    pub(crate) in_flight: u32,
    pub(crate) draining: bool,
    /// With `draining`: stays in the pool, listed as drained, once idle (rather than
    /// removed): [`Balancer::park_backend`](crate::Balancer::park_backend).
    pub(crate) parked: bool,
    pub(crate) health: Health,
    /// Hash of the URL: the backend's name for rendezvous hashing.
    pub(crate) name_hash: u64,
    /// When the next probe is due.
    pub(crate) next_probe: Instant,
    /// The probe in flight, if any: its sequence number and deadline.
    pub(crate) probe: Option<(u64, Instant)>,
    /// Sequence number of the last probe started.
    pub(crate) probe_seq: u64,
    /// The wait before the next re-probe of a passively ejected backend (doubling up to
    /// the probe interval); `None` otherwise.
    pub(crate) backoff: Option<std::time::Duration>,
    /// Set for the span of one `select` that must avoid this backend (a failover away
    /// from it): it then counts as full.
    pub(crate) excluded: bool,
    /// The engine's last load report, fresh or not (see [`crate::engine`]).
    pub(crate) engine: Option<EngineReport>,
    /// `running + waiting` of the last report while it is fresh, else 0.
    pub(crate) engine_load: u32,
    /// Whether the last report is fresh (it counts in [`Backend::load`]).
    pub(crate) fresh: bool,
    /// `in_flight` when the last report came.
    pub(crate) in_flight_at_report: u32,
    /// Whether the last report is fresh and says the engine is saturated.
    pub(crate) saturated: bool,
    /// Set for the span of one `select` that passes over saturated backends: it then
    /// counts as full.
    pub(crate) shunned: bool,
    /// The models it serves, sorted and deduplicated, as its `/v1/models` last listed
    /// them; `None` (never learnt, or an empty list): every model.
    pub(crate) models: Option<Arc<[Box<str>]>>,
    /// Set for the span of one `select` whose request names a model this backend does
    /// not serve: it then counts as full, and rendezvous rankings leave it out.
    pub(crate) off_model: bool,
}

impl Backend {
    /// Whether this backend can take no request now: at its in-flight cap, or excluded
    /// from the selection under way.
    #[inline]
    pub(crate) fn at_cap(&self) -> bool {
        self.excluded
            || self.shunned
            || self.off_model
            || (self.max_conns != 0 && self.in_flight >= self.max_conns)
    }

    /// The effective load every load-aware choice ranks by, relative to the weight
    /// ([`crate::policy::load_cmp`], cache-aware's overflow guard, and the bounded-load
    /// walk of [`Policy::PrefixHash`](crate::Policy::PrefixHash)): `max(in_flight,
    /// running + waiting + what was sent since the report)` with a fresh engine report,
    /// else `in_flight` (see
    /// [`crate::engine`] for why). `max_conns` is checked against `in_flight` alone.
    #[inline]
    pub(crate) fn load(&self) -> u32 {
        self.in_flight
            .max((self.engine_load + self.in_flight).saturating_sub(self.in_flight_at_report))
    }

    /// Whether it serves `model`: its list names it, or it has no list.
    pub(crate) fn serves(&self, model: &str) -> bool {
        match &self.models {
            None => true,
            Some(list) => list.binary_search_by(|m| (**m).cmp(model)).is_ok(),
        }
    }
}

/// A read-only view of one backend, for status pages and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendView {
    /// The backend's id.
    pub id: BackendId,
    /// Its URL.
    pub url: Arc<str>,
    /// Its weight.
    pub weight: u32,
    /// Its in-flight cap (0 = unlimited).
    pub max_conns: u32,
    /// Requests in flight to it (leases not yet released).
    pub in_flight: u32,
    /// Whether it is healthy.
    pub healthy: bool,
    /// Whether a probe has passed since it joined (until then it takes traffic only while
    /// no proven backend is there).
    pub proven: bool,
    /// Whether it is draining (no new requests; removed once idle, unless parked).
    pub draining: bool,
    /// Whether it was drained to stay (parked): listed with no traffic, once idle.
    pub parked: bool,
    /// How many times it has been ejected (bumped on each healthy → unhealthy transition).
    pub epoch: u64,
    /// The engine's last load report and when it came, fresh or not: it counts while
    /// [`EngineLoadConfig::is_fresh`](crate::EngineLoadConfig::is_fresh).
    pub engine: Option<EngineReport>,
    /// The models it serves (sorted), as learnt from its `/v1/models`; `None`: every
    /// model (no list, or an empty one).
    pub models: Option<Arc<[Box<str>]>>,
}

impl From<&Backend> for BackendView {
    fn from(b: &Backend) -> Self {
        BackendView {
            id: b.id,
            url: b.url.clone(),
            weight: b.weight,
            max_conns: b.max_conns,
            in_flight: b.in_flight,
            healthy: b.health.is_healthy(),
            proven: b.health.is_proven(),
            draining: b.draining,
            parked: b.parked,
            epoch: b.health.epoch(),
            engine: b.engine,
            models: b.models.clone(),
        }
    }
}
