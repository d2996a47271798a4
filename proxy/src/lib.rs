//! The proxy layer of `lb`: everything both runtimes need that is not I/O itself.
//!
//! ```text
//! cli/ (lb-cli)      flags → Settings → picks the adapter at build time → prints notices
//! adapters/          tokio + hyper, smol + lb-http1: sockets, timers, byte pumps; no decisions
//! proxy/ (lb-proxy)  this crate: shared state, leases, queue hand-over, the control loop,
//!                    HTTP rules, error replies, the request log; no runtime
//! http1/ (lb-http1)  sans-IO HTTP/1.1 framing (httparse) and the rules as pure functions
//! core/ (lb-core)    sans-IO balancer: pool, policies, health, affinity, queue, status
//! ```
//!
//! An adapter implements [`Runtime`] (a timer, spawning, one bounded GET) and builds a
//! [`Proxy`] from the [`Settings`]; it spawns [`drive`] once, and for each request:
//!
//! 1. reads a request head and checks it with [`rules`] (refusals are [`reply`]s);
//! 2. answers what `lb` answers itself ([`Proxy::local_reply`]: the merged
//!    `GET /v1/models`); reads a body prefix when routing by content
//!    ([`Proxy::routes_by_body`]), takes the [`RouteKeys`] ([`Proxy::route_keys`]) and
//!    calls [`Proxy::select_or_wait`] for a [`LeaseGuard`];
//! 3. forwards and streams both ways; a failure becomes [`LeaseGuard::fail`] (before the
//!    response head: the reply to send) or [`LeaseGuard::cut`] (after it);
//! 4. lets the guard go: the lease returns to the core with the exchange's outcome.
//!
//! Which backend and whether it is healthy are the core's; what is valid HTTP and how a
//! message is rewritten are [`rules`] and `lb-http1`; a new feature that both builds must
//! show (a header rule, a metric, a log field) goes here, once.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod account;
pub mod admin;
pub mod deadline;
pub mod discovery;
pub mod dns;
mod driver;
pub mod fleet;
#[cfg(feature = "lock-timing")]
pub mod hold;
#[cfg(not(feature = "lock-timing"))]
mod hold;
mod lease;
pub mod load;
pub mod metrics;
pub mod models;
mod proxy;
pub mod reply;
pub mod reqlog;
pub mod request_id;
mod runtime;
pub mod settings;
mod start;
mod upstream;
pub mod words;

pub use account::{AccessLog, Account, Arrival, LineSink};
pub use driver::drive;
pub use lease::{Failure, LeaseGuard};
pub use load::LoadSettings;
pub use proxy::{client_ip, ConnectionGuard, Proxy};
pub use runtime::{Fetched, Runtime};
pub use settings::{HashKey, Notice, NoticeSink, RouteKeys, Settings, Target, UrlError};
pub use start::StartError;
pub use upstream::Upstream;
