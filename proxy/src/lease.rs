//! Leases held by requests, and places in the admission queue.
//!
//! A [`LeaseGuard`] owns a request's lease on its backend and gives it back exactly once,
//! with the exchange's outcome, when it drops: a finished response, a failure, a client
//! that went away, a cancelled future or a panic all release it, so an in-flight count
//! never leaks. How an exchange failed is told in one vocabulary ([`Failure`]) and turned
//! here, once for both builds, into the reply, the outcome the core learns from, and the
//! log line.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use event_listener::Event;
use lb_core::{
    Admission, BackendError, BackendId, ErrorKind, Lease, Outcome, RequestMeta, Route, Ticket,
};

use crate::proxy::Proxy;
use crate::reply::{self, ProxyError, Reply};
use crate::request_id::RequestId;
use crate::runtime::Runtime;
use crate::settings::Notice;
use crate::upstream::Upstream;

/// A request's lease on its backend; see the module docs.
pub struct LeaseGuard<R: Runtime> {
    proxy: Arc<Proxy<R>>,
    lease: Option<Lease>,
    upstream: Arc<Upstream<R>>,
    /// When the core selected the backend.
    selected: Instant,
    /// The request's id, for the log and error replies (set by [`Account::serve`]).
    ///
    /// [`Account::serve`]: crate::Account::serve
    pub(crate) id: Option<RequestId>,
}

/// How an exchange with a backend failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made (refused, timed out, TLS).
    Connect(String),
    /// The connection failed while in use (reset, closed early).
    Io(String),
    /// A reused keep-alive connection failed before any byte of the response, and the
    /// request could not be sent again: not the backend's fault.
    Race(String),
    /// The request deadline (`--timeout`) passed.
    Timeout,
    /// The backend sent something that is not valid HTTP.
    Invalid(String),
    /// The backend's response is valid but beyond what `lb` passes on (a head over the
    /// limit, a transfer coding it cannot keep intact): not counted against its health.
    Unsupported(String),
}

impl Failure {
    fn kind(&self) -> ErrorKind {
        match self {
            Failure::Connect(_) => ErrorKind::Connect,
            Failure::Io(_) => ErrorKind::Io,
            Failure::Race(_) => ErrorKind::Reuse,
            Failure::Timeout => ErrorKind::Timeout,
            Failure::Invalid(_) => ErrorKind::Protocol,
            Failure::Unsupported(_) => ErrorKind::Unsupported,
        }
    }

    /// What the client is told when this happens before the response head.
    fn answer(&self) -> ProxyError {
        match self {
            Failure::Connect(_) | Failure::Io(_) | Failure::Race(_) => ProxyError::BadGateway,
            Failure::Timeout => ProxyError::GatewayTimeout,
            Failure::Invalid(_) | Failure::Unsupported(_) => ProxyError::BadResponse,
        }
    }

    /// What went wrong, for the log, given where the exchange was.
    fn message(self, after_head: bool) -> String {
        match self {
            Failure::Connect(m)
            | Failure::Io(m)
            | Failure::Race(m)
            | Failure::Invalid(m)
            | Failure::Unsupported(m) => m,
            Failure::Timeout if after_head => {
                "request timeout (--timeout) reached while streaming the response".into()
            }
            Failure::Timeout => "no response before the request timeout (--timeout)".into(),
        }
    }
}

impl<R: Runtime> LeaseGuard<R> {
    pub(crate) fn new(
        proxy: Arc<Proxy<R>>,
        lease: Lease,
        upstream: Arc<Upstream<R>>,
        selected: Instant,
    ) -> Self {
        LeaseGuard {
            proxy,
            lease: Some(lease),
            upstream,
            selected,
            id: None,
        }
    }

    /// When the core selected the backend.
    pub fn selected(&self) -> Instant {
        self.selected
    }

    /// How the core's pick went.
    pub fn route(&self) -> Route {
        self.lease.as_ref().map_or(Route::Plain, Lease::route)
    }

    /// The backend.
    pub fn upstream(&self) -> &Arc<Upstream<R>> {
        &self.upstream
    }

    /// The backend's id.
    pub fn backend(&self) -> BackendId {
        self.upstream.id()
    }

    /// The proxy.
    pub fn proxy(&self) -> &Arc<Proxy<R>> {
        &self.proxy
    }

    /// The exchange ended with this outcome: the lease goes back now.
    pub fn finish(mut self, outcome: Outcome) {
        self.release(outcome);
    }

    /// The response was passed on to its end.
    pub fn respond(self, status: u16) {
        self.finish(Outcome::Response(status));
    }

    /// The exchange failed before a response head: logged, the lease released as
    /// `Failed`; returns the reply for the client. `request` names the request in the log
    /// (method and target).
    pub fn fail(mut self, failure: Failure, request: &dyn fmt::Display) -> Reply {
        let reply = reply::error_for(failure.answer(), self.id.as_ref());
        let kind = failure.kind();
        let message = failure.message(false);
        self.log(request, reply.status, message.clone());
        self.release(Outcome::Failed {
            status: None,
            error: BackendError { kind, message },
        });
        reply
    }

    /// The backend could not be reached (`Failure::Connect`, or a failure before any byte
    /// of the request was written): the request is safe to send elsewhere. Logged as a
    /// failover, the lease released as `Failed` (the backend's passive-health signal), and
    /// another backend selected for `meta`, avoiding those in `tried` (this one is added).
    /// `Err` with the reply for the original failure when no other backend can take it,
    /// or `--connect-retries` are used up.
    // The `Err` is the (rare) final reply, built once per failed request: not worth a box.
    #[allow(clippy::result_large_err)]
    pub fn fail_over(
        mut self,
        failure: Failure,
        request: &dyn fmt::Display,
        meta: &RequestMeta<'_>,
        tried: &mut Vec<BackendId>,
    ) -> Result<LeaseGuard<R>, Reply> {
        tried.push(self.backend());
        let retries = self.proxy.settings().connect_retries as usize;
        let next = if tried.len() > retries {
            None
        } else {
            self.proxy.select_excluding(meta, tried)
        };
        let Some(mut next) = next else {
            return Err(self.fail(failure, request));
        };
        next.id = self.id.take();
        self.upstream.stats.retry(crate::metrics::Retry::Connect);
        let kind = failure.kind();
        let message = failure.message(false);
        self.proxy.notify(Notice::Failover {
            from: self.upstream.url().clone(),
            to: next.upstream.url().clone(),
            request: request.to_string(),
            id: next.id.clone(),
            error: message.clone(),
        });
        self.release(Outcome::Failed {
            status: None,
            error: BackendError { kind, message },
        });
        Ok(next)
    }

    /// The response was cut after its head (which had `status`): logged, the lease
    /// released as `Failed`.
    pub fn cut(mut self, status: u16, failure: Failure, request: &dyn fmt::Display) {
        let kind = failure.kind();
        let message = failure.message(true);
        self.log(request, 0, message.clone());
        self.release(Outcome::Failed {
            status: Some(status),
            error: BackendError { kind, message },
        });
    }

    fn log(&self, request: &dyn fmt::Display, status: u16, error: String) {
        self.proxy.notify(Notice::ProxyError {
            backend: self.upstream.url().clone(),
            request: request.to_string(),
            id: self.id.clone(),
            status,
            error,
        });
    }

    fn release(&mut self, outcome: Outcome) {
        if let Some(lease) = self.lease.take() {
            self.proxy.release(lease, outcome);
        }
    }
}

impl<R: Runtime> Drop for LeaseGuard<R> {
    fn drop(&mut self) {
        // Not finished: the client went away, or the future was dropped.
        self.release(Outcome::Cancelled);
    }
}

impl<R: Runtime> fmt::Debug for LeaseGuard<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("backend", &self.upstream.url())
            .finish_non_exhaustive()
    }
}

/// Where one queued request's [`Admission`] is delivered (a one-shot channel).
#[derive(Default)]
pub(crate) struct Slot {
    state: Mutex<SlotState>,
    ready: Event,
}

#[derive(Default)]
enum SlotState {
    #[default]
    Waiting,
    Delivered(Admission),
    /// The waiter left: nothing can be delivered any more.
    Closed,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the admission over; gives it back if the waiter has left.
    pub(crate) fn deliver(&self, adm: Admission) -> Result<(), Admission> {
        let mut state = self.lock();
        match *state {
            SlotState::Waiting => {
                *state = SlotState::Delivered(adm);
                drop(state);
                self.ready.notify(usize::MAX);
                Ok(())
            }
            _ => Err(adm),
        }
    }

    /// Takes a delivered admission, if any.
    fn take(&self) -> Option<Admission> {
        let mut state = self.lock();
        match std::mem::take(&mut *state) {
            SlotState::Delivered(adm) => Some(adm),
            other => {
                *state = other;
                None
            }
        }
    }

    /// The waiter leaves: later deliveries fail; one that landed before is returned.
    fn close(&self) -> Option<Admission> {
        match std::mem::replace(&mut *self.lock(), SlotState::Closed) {
            SlotState::Delivered(adm) => Some(adm),
            _ => None,
        }
    }
}

/// A place in the admission queue; dropping it before the admission was received gives
/// it up, and a lease that arrived meanwhile is released.
pub(crate) struct QueueWait<R: Runtime> {
    proxy: Arc<Proxy<R>>,
    ticket: Ticket,
    slot: Arc<Slot>,
    /// The admission was received: nothing to give up.
    done: bool,
}

impl<R: Runtime> QueueWait<R> {
    pub(crate) fn new(proxy: Arc<Proxy<R>>, ticket: Ticket, slot: Arc<Slot>) -> Self {
        QueueWait {
            proxy,
            ticket,
            slot,
            done: false,
        }
    }

    /// Waits for the admission.
    pub(crate) async fn receive(&mut self) -> Admission {
        loop {
            let listener = self.slot.ready.listen();
            if let Some(adm) = self.slot.take() {
                self.done = true;
                return adm;
            }
            listener.await;
        }
    }
}

impl<R: Runtime> Drop for QueueWait<R> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let d = {
            let mut core = self.proxy.lock();
            let now = Instant::now();
            core.balancer.cancel(now, self.ticket);
            self.proxy.drain(&mut core, now)
        };
        self.proxy.waiters().remove(&self.ticket.id());
        // No delivery can land after close(); one that landed before is taken back here.
        if let Some(Admission::Admitted(_, lease)) = self.slot.close() {
            self.proxy.release(lease, Outcome::Cancelled);
        }
        self.proxy.dispatch(d);
    }
}
