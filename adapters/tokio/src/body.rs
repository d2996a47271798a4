//! The response body streamed to the client: the backend's body, frame by frame, holding
//! the request's lease until the stream ends and enforcing the request deadline. It also
//! drives the backend connection the body arrives on (see `pool`), and returns it to the
//! shard's pool when the body has been read to its end.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use lb_proxy::reqlog::Capture;
use lb_proxy::Failure;
use tokio::time::{Instant, Sleep};

use crate::pool::Lent;
use crate::proxy::{describe, ReqLine};
use crate::rt::LeaseGuard;

pin_project_lite::pin_project! {
    /// Forwards each frame as soon as it arrives (no buffering). When the backend's body
    /// ends the lease is released with `Response(status)`; on a backend error or the
    /// deadline, with `Failed`; if the client goes away first (the body is dropped), with
    /// `Cancelled`.
    pub(crate) struct Streamed {
        #[pin]
        inner: Incoming,
        lent: Lent,
        deadline: Instant,
        // Made when the body first has to wait (a stream): a response that arrives whole
        // never touches the timer wheel.
        timer: Option<Pin<Box<Sleep>>>,
        guard: Option<LeaseGuard>,
        status: u16,
        request: ReqLine,
        capture: Option<Arc<Capture>>,
        // The failure that cut the stream, handed to hyper one poll later: hyper drops
        // what it has not written yet when a body fails, so it gets the chance to flush
        // the head and the last bytes first.
        failed: Option<Box<dyn std::error::Error + Send + Sync>>,
    }
}

impl Streamed {
    pub(crate) fn new(
        inner: Incoming,
        lent: Lent,
        deadline: Instant,
        guard: LeaseGuard,
        status: u16,
        request: ReqLine,
        capture: Option<Arc<Capture>>,
    ) -> Self {
        Streamed {
            inner,
            lent,
            deadline,
            timer: None,
            guard: Some(guard),
            status,
            request,
            capture,
            failed: None,
        }
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let mut polled = this.inner.as_mut().poll_frame(cx);
        if polled.is_pending() {
            // Nothing buffered: let the connection read (it delivers into `inner`).
            this.lent.poll_io(cx);
            polled = this.inner.as_mut().poll_frame(cx);
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(c), Some(d)) = (this.capture.as_ref(), frame.data_ref()) {
                    c.response(d);
                }
                if this.inner.is_end_stream() {
                    // hyper stops polling once the body says it has ended.
                    this.lent.finish(cx);
                    if let Some(g) = this.guard.take() {
                        g.respond(*this.status);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.lent.finish(cx);
                if let Some(g) = this.guard.take() {
                    g.respond(*this.status);
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(g) = this.guard.take() {
                    g.cut(*this.status, Failure::Io(describe(&e)), this.request);
                }
                *this.failed = Some(e.into());
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => {
                let deadline = *this.deadline;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                ready!(timer.as_mut().poll(cx));
                if let Some(g) = this.guard.take() {
                    g.cut(*this.status, Failure::Timeout, this.request);
                }
                let message = "request timeout (--timeout) reached while streaming the response";
                *this.failed = Some(message.into());
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // A stream cut by a failure not yet handed over is not at its end: hyper must not
        // end it cleanly (a last chunk would make a truncated stream look complete).
        self.failed.is_none() && (self.guard.is_none() || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
