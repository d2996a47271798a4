//! Prometheus metrics: recorded per thread on the request path (atomic adds into the
//! calling shard's own cache lines: no lock, no allocation), summed and encoded when
//! `/metrics` is scraped, with `prometheus-client` as the encoder (Prometheus text 0.0.4,
//! or OpenMetrics when the scrape asks for it).
//!
//! Every series `lb` exports is listed, with its labels and meaning, in the README's
//! "Metrics and logs" section; `encode` is the one place that names them.

mod cells;
mod codes;
mod encode;
mod hist;
mod process;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cells::Cells;
use codes::Codes;
pub use encode::{BackendRow, EngineRow, Format, Scrape};
use hist::Histogram;

/// Why `lb` answered a request itself (`lb_rejections_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// No healthy backend (503).
    NoHealthy,
    /// Every healthy backend at `--max-conns`, no queue (429).
    AtCapacity,
    /// The admission queue was full (429).
    QueueFull,
    /// The wait in the admission queue expired (429).
    QueueTimeout,
    /// A malformed or refused request (400, 413, 414, 417, 431, 501, 505).
    BadRequest,
    /// The client was too slow with its head or body (408).
    Timeout,
    /// `lb` is shutting down (503).
    ShuttingDown,
    /// No backend serves the request's model, with `--strict-models` (404).
    UnknownModel,
}

impl Rejection {
    const ALL: [Rejection; 8] = [
        Rejection::NoHealthy,
        Rejection::AtCapacity,
        Rejection::QueueFull,
        Rejection::QueueTimeout,
        Rejection::BadRequest,
        Rejection::Timeout,
        Rejection::ShuttingDown,
        Rejection::UnknownModel,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::NoHealthy => "no_healthy",
            Rejection::AtCapacity => "at_capacity",
            Rejection::QueueFull => "queue_full",
            Rejection::QueueTimeout => "queue_timeout",
            Rejection::BadRequest => "bad_request",
            Rejection::Timeout => "timeout",
            Rejection::ShuttingDown => "shutting_down",
            Rejection::UnknownModel => "unknown_model",
        }
    }
}

/// How a proxied request got its backend connection
/// (`lb_upstream_connections_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamConn {
    /// A new connection.
    New,
    /// A pooled keep-alive connection.
    Reused,
    /// A new connection that could not be made.
    Failed,
}

/// Why a request was sent again (`lb_retries_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Its backend could not be reached: sent to another (`--connect-retries`).
    Connect,
    /// A reused keep-alive connection failed before any response byte: sent again on a
    /// new connection to the same backend.
    KeepAliveRace,
}

/// Which way body bytes went (`lb_bytes_total{direction}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Request body bytes from clients.
    In,
    /// Response body bytes to clients.
    Out,
}

/// The affinity policies whose lookups are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AffinityPolicy {
    CacheAware = 0,
    ConsistentHash = 1,
    PrefixHash = 2,
}

/// A lookup's result (`lb_affinity_lookups_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    Hit = 0,
    Miss = 1,
    Overflow = 2,
}

/// The proxy's metrics that are not per backend.
#[derive(Debug)]
pub struct Metrics {
    cells: Cells<Cell>,
    runtime: &'static str,
    /// Pool changes at runtime, by source and change (rare: no per-thread cells).
    changes: [[AtomicU64; 4]; 4],
}

#[derive(Debug, Default)]
struct Cell {
    /// Responses `lb` made itself (`backend="none"`), by code.
    codes: Codes,
    duration: Histogram,
    rejections: [AtomicU64; Rejection::ALL.len()],
    queue_wait: Histogram,
    client_conns: AtomicU64,
    bytes: [AtomicU64; 2],
    affinity: [[AtomicU64; 3]; 3],
}

impl Metrics {
    /// Metrics of a proxy running on `runtime` (`tokio` or `smol`: `lb_build_info`).
    pub fn new(runtime: &'static str) -> Self {
        Metrics {
            cells: Cells::new(cells::default_cells()),
            runtime,
            changes: Default::default(),
        }
    }

    fn cell(&self) -> &Cell {
        self.cells.mine()
    }

    /// A response `lb` made itself, with `status`, that took `took` from the request's
    /// head (see [`crate::Account`] for requests that have one).
    pub(crate) fn answered(&self, status: u16, took: Duration) {
        let c = self.cell();
        c.codes.add(status);
        c.duration.observe(took);
    }

    /// The pool changed at runtime.
    pub(crate) fn backend_change(
        &self,
        source: crate::fleet::Source,
        change: crate::fleet::Change,
    ) {
        self.changes[source as usize][change as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `lb` refused a request (also counted in `lb_requests_total` by its answer).
    pub fn rejected(&self, why: Rejection) {
        self.cell().rejections[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A refusal of a request head that never became a request `lb` handles (malformed,
    /// too large, too slow): counted as answered by `lb` (`status`, no duration: the head
    /// never arrived whole) and as a rejection.
    pub fn refused(&self, status: u16) {
        let c = self.cell();
        c.codes.add(status);
        c.duration.observe(Duration::ZERO);
        self.rejected(rejection_for(status));
    }

    /// A request waited `waited` in the admission queue.
    pub(crate) fn queue_wait(&self, waited: Duration) {
        self.cell().queue_wait.observe(waited);
    }

    /// A client connection was accepted.
    pub(crate) fn client_connection(&self) {
        self.cell().client_conns.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` body bytes went `dir`.
    #[inline]
    pub fn bytes(&self, dir: Direction, n: u64) {
        self.cell().bytes[dir as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn affinity(&self, policy: AffinityPolicy, lookup: Lookup) {
        self.cell().affinity[policy as usize][lookup as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The rejection reason of a refusal with `status`.
pub(crate) fn rejection_for(status: u16) -> Rejection {
    match status {
        408 => Rejection::Timeout,
        503 => Rejection::ShuttingDown,
        _ => Rejection::BadRequest,
    }
}

/// One backend's metrics; it lives in the backend's [`crate::Upstream`], so its series go
/// when the backend leaves the pool.
#[derive(Debug)]
pub struct BackendStats {
    cells: Cells<BackendCell>,
    to_healthy: AtomicU64,
    to_unhealthy: AtomicU64,
    passive_ejections: AtomicU64,
    probes: Histogram,
}

#[derive(Debug, Default)]
struct BackendCell {
    codes: Codes,
    duration: Histogram,
    first_byte: Histogram,
    conns: [AtomicU64; 3],
    retries: [AtomicU64; 2],
}

impl Default for BackendStats {
    fn default() -> Self {
        BackendStats {
            cells: Cells::new(cells::default_cells()),
            to_healthy: AtomicU64::new(0),
            to_unhealthy: AtomicU64::new(0),
            passive_ejections: AtomicU64::new(0),
            probes: Histogram::default(),
        }
    }
}

impl BackendStats {
    /// A response from this backend with `status`, `took` from the request's head; and,
    /// when a body byte came, `first_byte` after the request was sent.
    pub(crate) fn answered(&self, status: u16, took: Duration, first_byte: Option<Duration>) {
        let c = self.cells.mine();
        c.codes.add(status);
        c.duration.observe(took);
        if let Some(d) = first_byte {
            c.first_byte.observe(d);
        }
    }

    /// How a request got its connection to this backend.
    #[inline]
    pub fn connection(&self, how: UpstreamConn) {
        let i = match how {
            UpstreamConn::New => 0,
            UpstreamConn::Reused => 1,
            UpstreamConn::Failed => 2,
        };
        self.cells.mine().conns[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A request to this backend was sent again (elsewhere, or on a new connection).
    pub fn retry(&self, why: Retry) {
        let i = match why {
            Retry::Connect => 0,
            Retry::KeepAliveRace => 1,
        };
        self.cells.mine().retries[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A health transition; `passive`: an ejection by proxied traffic.
    pub(crate) fn transition(&self, healthy: bool, passive: bool) {
        let to = if healthy {
            &self.to_healthy
        } else {
            &self.to_unhealthy
        };
        to.fetch_add(1, Ordering::Relaxed);
        if passive && !healthy {
            self.passive_ejections.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A probe took `took` (whatever its result).
    pub(crate) fn probe(&self, took: Duration) {
        self.probes.observe(took);
    }
}
