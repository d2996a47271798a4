//! Why the proxy could not start: one list for both builds, so they say the same.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use lb_core::PoolError;

/// Why the proxy could not start. Each message names the flag to look at.
#[derive(Debug)]
pub enum StartError {
    /// The listen address could not be bound.
    Bind(SocketAddr, io::Error),
    /// The admin listener's address (`--admin-bind`) could not be bound.
    AdminBind(SocketAddr, io::Error),
    /// TLS setup failed (e.g. an unreadable `--backend-ca`).
    Tls(String),
    /// An `https://` backend, in a build without TLS.
    NoTls(String),
    /// The core refused a backend.
    Backend(PoolError),
    /// A backend URL is not usable.
    Url(String),
    /// A `--discover` name cannot be followed by this build.
    Discover(String),
    /// The runtime could not be set up: `what` could not be done (start the runtime, a
    /// worker thread, an event loop, the signal handlers).
    Runtime {
        /// What failed, in a few words.
        what: &'static str,
        /// Why.
        error: io::Error,
    },
}

impl StartError {
    /// A runtime setup failure.
    pub fn runtime(what: &'static str, error: io::Error) -> Self {
        StartError::Runtime { what, error }
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Bind(a, e) => write!(f, "cannot listen on {a} (--port/--bind): {e}"),
            StartError::AdminBind(a, e) => write!(f, "cannot listen on {a} (--admin-bind): {e}"),
            StartError::Tls(e) => write!(f, "TLS setup failed (--backend-ca): {e}"),
            StartError::NoTls(url) => write!(
                f,
                "--backends: {url}: this smol build of lb has no TLS for https:// backends \
                 (build it with `--features smol,lb-smol/tls`, or use the default tokio build)"
            ),
            StartError::Backend(e) => write!(f, "--backends: {e}"),
            StartError::Url(e) => write!(f, "--backends: {e}"),
            StartError::Discover(e) => write!(f, "--discover: {e}"),
            StartError::Runtime { what, error } => write!(f, "cannot {what}: {error}"),
        }
    }
}

impl std::error::Error for StartError {}
