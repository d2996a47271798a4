//! The sans-IO core of `lb`: every decision the load balancer makes, and nothing else.
//!
//! A [`Balancer`] holds the backend pool, the balancing [`Policy`], each backend's
//! [`Health`] and the status schedule. It never touches a socket, a clock or a global
//! random number generator: time comes in as `now: Instant`, the first argument of every
//! input; randomness comes from the injected, seedable RNG; decisions come out as values.
//! Everything here is deterministic and testable without a network.
//!
//! # Driving contract
//!
//! Methods come in four kinds, as in quinn-proto:
//!
//! - **getters** ([`Balancer::summary`], [`Balancer::backends`], ...) read state;
//! - **inputs** tell the core what happened: [`Balancer::handle_timeout`],
//!   [`Balancer::probe_result`], [`Balancer::release`], and the pool changes
//!   [`Balancer::add_backend`], [`Balancer::remove_backend`], [`Balancer::drain_backend`];
//! - **the request path**: [`Balancer::select`] returns a [`Lease`] (the in-flight slot is
//!   already reserved) or a [`Reject`]; the lease goes back exactly once through
//!   [`Balancer::release`] with its [`Outcome`], whatever happened to the request;
//! - **outputs** are drained with `poll_*`: [`Balancer::poll_action`] (work for the
//!   adapter: [`Action::StartProbe`]), [`Balancer::poll_event`] (health transitions and
//!   status reports, for the log) and [`Balancer::poll_timeout`] (when to call
//!   `handle_timeout` next).
//!
//! An adapter keeps one timer. After any input, it drains `poll_action` and `poll_event`
//! until they return `None`, then re-arms its timer to `poll_timeout()`. When the timer
//! fires it calls `handle_timeout(now)` and drains again. After `handle_timeout(t)`,
//! `poll_timeout()` is later than `t` or `None`, so this loop never spins.
//!
//! The balancer is single-threaded (`&mut self`); adapters share it behind a mutex, so
//! `select` and `release` are short and allocate nothing.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, Instant};
//! use lb_core::{Action, Balancer, BackendSpec, Config, Outcome, ProbeOutcome, RequestMeta};
//! use rand::{rngs::SmallRng, SeedableRng};
//!
//! let start = Instant::now(); // the adapter's clock; the core never reads one
//! let mut lb = Balancer::new(Config::default(), SmallRng::seed_from_u64(7), start);
//! lb.add_backend(start, BackendSpec::new("http://127.0.0.1:8000")).unwrap();
//!
//! // The first sweep is due at once.
//! assert_eq!(lb.poll_timeout(), Some(start));
//! lb.handle_timeout(start);
//! while let Some(Action::StartProbe { probe, .. }) = lb.poll_action() {
//!     // ... the adapter GETs the health path, then:
//!     lb.probe_result(start + Duration::from_millis(3), probe, ProbeOutcome::Status(200));
//! }
//!
//! let lease = lb.select(start, &RequestMeta::default()).unwrap();
//! // ... proxy the request to the lease's backend, then, however it ended:
//! lb.release(start, lease, Outcome::Response(200));
//! assert_eq!(lb.summary().in_flight, 0);
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod backend;
mod balancer;
mod hash;
mod health;
pub mod http1;
mod policy;
pub mod reply;
pub mod settings;
mod status;

pub use backend::{BackendId, BackendSpec, BackendView, PoolError, MAX_WEIGHT};
pub use balancer::{
    Action, BackendError, Balancer, Cause, Config, ErrorKind, Event, Lease, Outcome, ProbeId,
    Reject, RequestMeta, MIN_TICK,
};
pub use hash::hash_bytes;
pub use health::{Health, HealthConfig, HealthState, ProbeOutcome};
pub use policy::{Policy, UnknownPolicy};
pub use settings::{Notice, NoticeSink, Settings, Target, UrlError};
pub use status::{StatusReport, Summary, LOADS_ELIDE_ABOVE, LOADS_KEPT_EACH_END};
