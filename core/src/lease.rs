//! The request path's values: a [`Lease`] on a backend, or a [`Reject`]; and the
//! [`Outcome`] the lease is given back with.

use std::fmt;

use crate::backend::BackendId;

/// A reserved slot on one backend: the request in flight.
///
/// Returned by [`Balancer::select`](crate::Balancer::select); give it back exactly once
/// with [`Balancer::release`](crate::Balancer::release), which consumes it. In debug
/// builds, dropping a lease without releasing it panics, so tests catch a path that
/// forgets (adapters tie the release to a guard's `Drop`).
#[must_use = "a Lease must be given back with Balancer::release"]
#[derive(Debug, PartialEq, Eq)]
pub struct Lease {
    backend: BackendId,
    /// The backend's health epoch when the lease was taken: an outcome counts towards
    /// passive health only if the backend has not been ejected since.
    epoch: u64,
    route: Route,
    released: bool,
}

/// How an affinity policy's pick went, for metrics and the access log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Route {
    /// A policy without affinity.
    #[default]
    Plain,
    /// The backend holding the request's longest known prefix (`depth` units of it).
    Hit {
        /// Units of the request's chain the backend holds.
        depth: u32,
    },
    /// Nothing known for the request (or it had no key): load decided.
    Miss,
    /// A known prefix whose holder was too loaded: another backend, holding `depth`
    /// units of the chain (0: none).
    Overflow {
        /// Units of the request's chain the chosen backend holds.
        depth: u32,
    },
}

impl Lease {
    /// The backend that serves this request.
    pub fn backend(&self) -> BackendId {
        self.backend
    }

    /// How the pick went.
    pub fn route(&self) -> Route {
        self.route
    }

    /// A lease on `backend`, taken at its health `epoch`.
    pub(crate) fn new(backend: BackendId, epoch: u64) -> Self {
        Lease {
            backend,
            epoch,
            route: Route::Plain,
            released: false,
        }
    }

    /// The lease, with how the pick went.
    pub(crate) fn routed(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    /// Ends the lease (it was given back, or dies with its balancer), so that dropping it
    /// is no longer a bug. Returns its backend and epoch.
    pub(crate) fn end(mut self) -> (BackendId, u64) {
        self.released = true;
        (self.backend, self.epoch)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if cfg!(debug_assertions) && !self.released && !std::thread::panicking() {
            panic!(
                "lease on backend {} dropped without Balancer::release",
                self.backend
            );
        }
    }
}

/// Why no backend was selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// No backend is healthy (the proxy answers 503).
    NoHealthyBackend,
    /// Every healthy backend is at its in-flight cap (the proxy answers 429).
    AllAtCapacity,
    /// The request names a model no backend in the pool lists, every backend has a list,
    /// and [`Config::strict_models`](crate::Config::strict_models) is on (the proxy
    /// answers 404, `model_not_found`).
    UnknownModel,
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reject::NoHealthyBackend => "no healthy backend",
            Reject::AllAtCapacity => "every healthy backend is at its connection limit",
            Reject::UnknownModel => "no backend serves the requested model",
        })
    }
}

/// What kind of failure a backend exchange ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The connection could not be made (refused, unreachable, TLS handshake).
    Connect,
    /// The request's deadline passed.
    Timeout,
    /// The connection failed while in use (reset, closed early).
    Io,
    /// The backend sent something that is not valid HTTP.
    Protocol,
    /// A reused keep-alive connection failed before any byte of the response arrived,
    /// and the request could not be sent again: the backend most likely closed the idle
    /// connection as the request went out. Not the backend's fault: it never counts
    /// against its health.
    Reuse,
    /// The backend's response is valid but beyond what the proxy passes on (a head over
    /// its limit, a transfer coding it cannot keep intact). Not a sign of ill health: it
    /// never counts against the backend.
    Unsupported,
}

/// A failed backend exchange: a kind for decisions, a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendError {
    /// The kind of failure.
    pub kind: ErrorKind,
    /// What happened, e.g. `connection refused`.
    pub message: String,
}

/// How a request's exchange with its backend ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered with this status and the exchange finished normally.
    Response(u16),
    /// The backend failed: before a response head (`status` is `None`) or after it.
    Failed {
        /// The response status, if a head arrived before the failure.
        status: Option<u16>,
        /// What went wrong.
        error: BackendError,
    },
    /// The client went away, or the request ended for a reason not the backend's.
    Cancelled,
}

impl Outcome {
    /// The passive-health signal of this outcome: `Some(true)` for a failure (5xx, a
    /// transport error, a timeout before the response head), `Some(false)` for a success
    /// (any status below 500: 4xx and 429 never count against a backend), `None` when it
    /// says nothing about the backend (client gone; a timeout after the head, since the
    /// backend was answering; a keep-alive race, [`ErrorKind::Reuse`]; a response the
    /// proxy will not pass on, [`ErrorKind::Unsupported`]).
    pub fn passive_failure(&self) -> Option<bool> {
        match self {
            Outcome::Response(status) => Some(*status >= 500),
            Outcome::Failed {
                status: Some(_),
                error,
            } if error.kind == ErrorKind::Timeout => None,
            Outcome::Failed { error, .. }
                if matches!(error.kind, ErrorKind::Reuse | ErrorKind::Unsupported) =>
            {
                None
            }
            Outcome::Failed { .. } => Some(true),
            Outcome::Cancelled => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Response(s) => write!(f, "status {s}"),
            Outcome::Failed {
                status: None,
                error,
            } => write!(f, "error: {}", error.message),
            Outcome::Failed {
                status: Some(s),
                error,
            } => write!(f, "error after status {s}: {}", error.message),
            Outcome::Cancelled => f.write_str("cancelled"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "dropped without Balancer::release")]
    fn forgotten_lease_panics_in_debug() {
        let _ = Lease::new(BackendId { slot: 0, gen: 0 }, 0);
    }

    #[test]
    fn ended_lease_drops_quietly() {
        let (backend, epoch) = Lease::new(BackendId { slot: 3, gen: 1 }, 7).end();
        assert_eq!((backend, epoch), (BackendId { slot: 3, gen: 1 }, 7));
    }
}
