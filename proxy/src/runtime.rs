//! What the proxy layer needs from a runtime, in quinn's style: a timer, spawning, and one
//! bounded HTTP GET on a connection of its own (health probes; later load polls and model
//! lists). Each adapter implements it once; the layer never names tokio or smol.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use crate::settings::Target;
use crate::start::StartError;
use crate::upstream::Upstream;

/// The runtime an adapter brings.
pub trait Runtime: Send + Sync + Sized + 'static {
    /// Its name, for `lb_build_info{runtime}`: `tokio` or `smol`.
    const NAME: &'static str;

    /// What the adapter keeps per backend beside the layer's [`Upstream`] (the tokio build:
    /// hyper's URI and `Host` value, made once rather than per request).
    type Backend: Send + Sync + 'static;

    /// Prepares a backend the pool gains. The error says what is wrong with it (its URL,
    /// or a TLS setup the build lacks).
    fn backend(&self, target: &Target) -> Result<Self::Backend, StartError>;

    /// Resolves at `deadline` (at once if it has passed).
    fn sleep_until(&self, deadline: Instant) -> impl Future<Output = ()> + Send + 'static;

    /// Runs `task` in the background until it ends (or the runtime stops).
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static);

    /// `GET <the backend's path prefix><path>` on a new connection (closed after), with
    /// `Host` the backend's authority: the status and at most `max_body` bytes of the body
    /// (`max_body` 0: the body is not read). The error is a short description for the
    /// log. The layer bounds the time it may take.
    fn get(
        &self,
        upstream: &Arc<Upstream<Self>>,
        path: &str,
        max_body: usize,
    ) -> impl Future<Output = Result<Fetched, String>> + Send + 'static;
}

/// The answer to [`Runtime::get`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    /// The final status (interim `1xx` answers skipped).
    pub status: u16,
    /// The body, or its first `max_body` bytes.
    pub body: Vec<u8>,
    /// Whether the body was longer than `max_body`.
    pub truncated: bool,
}

/// For unit tests: a runtime that never runs anything (no driver, no probes; every
/// fetch fails), so that what is tested is the proxy's state alone.
#[cfg(test)]
pub(crate) struct Still;

#[cfg(test)]
impl Runtime for Still {
    const NAME: &'static str = "still";
    type Backend = ();

    fn backend(&self, _: &Target) -> Result<(), StartError> {
        Ok(())
    }

    fn sleep_until(&self, _: Instant) -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }

    fn spawn(&self, _: impl Future<Output = ()> + Send + 'static) {}

    #[allow(clippy::manual_async_fn)]
    fn get(
        &self,
        _: &Arc<Upstream<Self>>,
        _: &str,
        _: usize,
    ) -> impl Future<Output = Result<Fetched, String>> + Send + 'static {
        async { Err("no".into()) }
    }
}
