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
//!   [`Balancer::probe_result`], [`Balancer::release`], [`Balancer::load_report`] (an
//!   engine's own load figures, see [`engine`]), and the pool changes
//!   [`Balancer::add_backend`], [`Balancer::remove_backend`], [`Balancer::drain_backend`];
//! - **the request path**: [`Balancer::select`] returns a [`Lease`] (the in-flight slot is
//!   already reserved) or a [`Reject`]; the lease goes back exactly once through
//!   [`Balancer::release`] with its [`Outcome`], whatever happened to the request;
//! - **outputs** are drained with `poll_*`: [`Balancer::poll_action`] (work for the
//!   adapter: [`Action::StartProbe`]), [`Balancer::poll_event`] (health transitions and
//!   status reports, for the log), [`Balancer::poll_admission`] (ends of waits in the
//!   admission queue, see below) and [`Balancer::poll_timeout`] (when to call
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
//! # LLM-aware routing
//!
//! Two policies route by request content, and the adapter supplies the key:
//!
//! - [`Policy::CacheAware`] (`--routing cache-aware`, needs `max_conns > 0` on every
//!   backend: [`Config::validate`] checks it) sends a request to the backend that last
//!   served its longest prompt prefix, within a load guard; see [`affinity`] for the rule,
//!   the TTL, the memory bound and the invalidation. The adapter reads at most
//!   [`affinity::MAX_BODY_PREFIX`] bytes of a request body; if the whole body fits it
//!   computes [`RequestKey::from_body`] once (outside the lock: it parses JSON), else
//!   uses [`RequestKey::None`]; it forwards the buffered bytes, then streams the rest.
//! - [`Policy::ConsistentHash`] (`--routing consistent-hash --hash-key ...`) maps a key to
//!   a backend by weighted rendezvous hashing (the scheme of [`Policy::IpHash`]): the
//!   adapter passes the bytes of `--hash-key header:NAME` (the header's value), or of
//!   `user` ([`affinity::user_of`] on the buffered body), with
//!   [`RequestMeta::with_key`]; with no key the client IP is hashed.
//!
//! ```text
//! let key = if policy == CacheAware && body fits in MAX_BODY_PREFIX {
//!     RequestKey::from_body(&buffered)              // once per request
//! } else { RequestKey::None };
//! let user = (policy == ConsistentHash && hash_key == User)
//!     .then(|| affinity::user_of(&buffered)).flatten();
//! let mut meta = RequestMeta::from_ip(peer.ip()).with_affinity(&key);
//! if let Some(k) = header_value.or(user.as_deref().map(str::as_bytes)) {
//!     meta = meta.with_key(k);
//! }
//! let lease = core.lock().select(now, &meta)?;      // then forward buffered + rest
//! ```
//!
//! [`StatusReport::routing`] carries the cache-aware counters (`Display`:
//! `warm 82% cold 15% ovfl 3% (120 reqs, 5731 keys)`).
//!
//! # Admission queue
//!
//! `max_conns` is a hard limit under every policy: when every healthy backend is full,
//! `select` says [`Reject::AllAtCapacity`] (429). With [`QueueConfig::timeout`] set
//! (`--queue-timeout`), the request waits instead in a bounded FIFO
//! ([`QueueConfig::size`], `--queue-size`) for a slot; see [`queue`]. One more output,
//! [`Balancer::poll_admission`], joins the drain loop:
//!
//! ```text
//! match core.select(now, &meta) {
//!     Ok(lease) => proxy(lease),
//!     Err(Reject::AllAtCapacity) if queue_on => {
//!         let ticket = core.enqueue(now, OwnedMeta::from(&meta))?;  // Err → reply
//!         let rx = waiters.insert(ticket);          // e.g. a oneshot per ticket
//!         drain(core);                              // may admit it at once
//!         // on client disconnect: if !core.cancel(now, ticket) { a lease is coming
//!         //   or came: release it with Outcome::Cancelled }
//!         match rx.await { Admitted(lease) => proxy(lease), Expired => reply 429 }
//!     }
//!     Err(r) => reply(r),
//! }
//!
//! fn drain(core) {   // after every input, with poll_action and poll_event
//!     while let Some(a) = core.poll_admission() {
//!         match a {
//!             Admission::Admitted(t, lease) => match waiters.remove(t) {
//!                 Some(tx) => tx.send(lease),   // if the send fails: release(Cancelled)
//!                 None => core.release(now, lease, Outcome::Cancelled),
//!             },
//!             Admission::Expired(t) => waiters.remove(t).send(Expired),
//!         }
//!     }
//!     arm the timer at core.poll_timeout()  // includes queue deadlines
//! }
//! ```
//!
//! An `Admitted` carries a [`Lease`]: the same drop check applies, so every admission
//! must reach a waiter or be released. `release`, `enqueue`, `cancel`, `add_backend`,
//! `probe_result` and `handle_timeout` may all produce admissions.
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

pub mod affinity;
mod backend;
mod balancer;
mod config;
pub mod engine;
mod event;
mod hash;
mod health;
mod lease;
mod policy;
pub mod queue;
mod request;
mod status;

pub use affinity::{AffinityConfig, RequestKey, RoutingStats};
pub use backend::{BackendId, BackendSpec, BackendView, PoolError, MAX_WEIGHT};
pub use balancer::Balancer;
pub use config::{
    Config, ConfigError, PrefixHashConfig, DEFAULT_BALANCE_FACTOR, DEFAULT_PREFIX_UNITS, MIN_TICK,
};
pub use engine::{EngineLoadConfig, EngineReport, LoadReport};
pub use event::{Action, Cause, Event, ProbeId};
pub use hash::hash_bytes;
pub use health::{Health, HealthConfig, HealthState, ProbeOutcome};
pub use lease::{BackendError, ErrorKind, Lease, Outcome, Reject, Route};
pub use policy::{Policy, UnknownPolicy};
pub use queue::{Admission, OwnedMeta, QueueConfig, QueueStats, Ticket};
pub use request::RequestMeta;
pub use status::{StatusReport, Summary, LOADS_ELIDE_ABOVE, LOADS_KEPT_EACH_END};
