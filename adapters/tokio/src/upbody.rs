//! The request body sent to a backend: frames already read (to route by content), then the
//! rest of the client's body as it arrives; each frame copied to the request log if on,
//! and into the [`Replay`] copy while it fits.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use lb_proxy::reqlog::Capture;
use tokio::time::Sleep;

pub(crate) struct UpBody {
    buffered: VecDeque<Frame<Bytes>>,
    buffered_len: u64,
    rest: Option<Incoming>,
    capture: Option<Arc<Capture>>,
    replay: Option<Arc<Replay>>,
    /// Data bytes read from the client, for the request's account.
    counter: Option<Arc<AtomicU64>>,
    /// `--client-body-timeout`: the longest the client's body may send nothing.
    stall_limit: Duration,
    /// Armed while the client's body has nothing to give; cleared by each frame.
    stalled: Option<Pin<Box<Sleep>>>,
}

/// Errors a request body gives hyper: the client's (hyper's), or [`BodyStalled`].
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body sent nothing for `--client-body-timeout`.
#[derive(Debug)]
pub(crate) struct BodyStalled;

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body sent nothing for --client-body-timeout")
    }
}

impl std::error::Error for BodyStalled {}

/// A copy of a request body as it goes up, kept while it stays within `--replay-buffer`,
/// so the request can be sent again after the keep-alive race (see `pool`). The bytes are
/// copied, not shared: the client's frames share hyper's read buffer, which they would
/// keep alive while the backend thinks. When hyper drops the body before its end (the
/// connection failed), what is left of the client's body comes back here, so that it can
/// still be read whole ([`Replay::complete`]).
pub(crate) struct Replay {
    state: Mutex<Kept>,
}

struct Kept {
    data: BytesMut,
    trailers: Option<HeaderMap>,
    /// Bytes it may still take; `None` once it gave up (the body outgrew it, or the
    /// response has begun and a re-send can no longer happen).
    room: Option<usize>,
    ended: bool,
    /// The unread rest of a body hyper dropped.
    rest: Option<Rest>,
}

/// The part of a client's body nobody read yet.
struct Rest {
    buffered: VecDeque<Frame<Bytes>>,
    incoming: Option<Incoming>,
    capture: Option<Arc<Capture>>,
}

/// A whole request body, to send again.
pub(crate) struct Whole {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Replay {
    /// A copy of at most `limit` body bytes.
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Replay {
            state: Mutex::new(Kept {
                data: BytesMut::new(),
                trailers: None,
                room: Some(limit),
                ended: false,
                rest: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Kept> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keep(&self, frame: &Frame<Bytes>) {
        let mut k = self.lock();
        let Some(room) = k.room else { return };
        if let Some(d) = frame.data_ref() {
            match room.checked_sub(d.len()) {
                Some(room) => {
                    k.room = Some(room);
                    k.data.extend_from_slice(d);
                }
                None => k.give_up(),
            }
        } else if let Some(t) = frame.trailers_ref() {
            k.trailers = Some(t.clone());
        }
    }

    fn end(&self) {
        self.lock().ended = true;
    }

    /// No re-send can happen any more: the copy goes.
    pub(crate) fn close(&self) {
        self.lock().give_up();
    }

    /// The whole body, reading what is left of it from the client first (the caller
    /// bounds the wait); `None` if it outgrows the copy, fails or was never handed back.
    pub(crate) async fn complete(&self) -> Option<Whole> {
        let rest = {
            let mut k = self.lock();
            k.room?;
            if k.ended {
                None
            } else {
                Some(k.rest.take()?)
            }
        };
        if let Some(mut rest) = rest {
            while let Some(frame) = rest.buffered.pop_front() {
                self.take(&frame, rest.capture.as_deref())?;
            }
            if let Some(mut incoming) = rest.incoming {
                while let Some(frame) = incoming.frame().await {
                    self.take(&frame.ok()?, rest.capture.as_deref())?;
                }
            }
            self.end();
        }
        let mut k = self.lock();
        k.room?;
        Some(Whole {
            data: std::mem::take(&mut k.data).freeze(),
            trailers: k.trailers.take(),
        })
    }

    /// Keeps a frame of the rest (and logs it); `None` once the copy gave up.
    fn take(&self, frame: &Frame<Bytes>, capture: Option<&Capture>) -> Option<()> {
        if let (Some(c), Some(d)) = (capture, frame.data_ref()) {
            c.request(d);
        }
        self.keep(frame);
        self.lock().room.map(|_| ())
    }

    /// hyper dropped the body before its end: keeps the rest, if a re-send may need it.
    fn hand_back(&self, rest: Rest) {
        let mut k = self.lock();
        if k.room.is_some() && !k.ended {
            k.rest = Some(rest);
        }
    }
}

impl Kept {
    fn give_up(&mut self) {
        self.room = None;
        self.data = BytesMut::new();
        self.trailers = None;
        self.rest = None;
    }
}

impl Drop for UpBody {
    fn drop(&mut self) {
        if let Some(r) = self.replay.take() {
            r.hand_back(Rest {
                buffered: std::mem::take(&mut self.buffered),
                incoming: self.rest.take(),
                capture: self.capture.take(),
            });
        }
    }
}

impl UpBody {
    /// The client's body as is (`replay`: its copy for a re-send).
    pub(crate) fn new(
        body: Incoming,
        capture: Option<Arc<Capture>>,
        replay: Option<Arc<Replay>>,
        counter: Option<Arc<AtomicU64>>,
        stall_limit: Duration,
    ) -> Self {
        UpBody {
            buffered: VecDeque::new(),
            buffered_len: 0,
            rest: Some(body),
            capture,
            replay,
            counter,
            stall_limit,
            stalled: None,
        }
    }

    /// No body.
    pub(crate) fn empty() -> Self {
        UpBody {
            buffered: VecDeque::new(),
            buffered_len: 0,
            rest: None,
            capture: None,
            replay: None,
            counter: None,
            stall_limit: Duration::MAX,
            stalled: None,
        }
    }

    /// A body kept whole, sent again (already in the request log).
    pub(crate) fn replayed(whole: Whole) -> Self {
        let mut body = UpBody::empty();
        body.buffered_len = whole.data.len() as u64;
        if !whole.data.is_empty() {
            body.buffered.push_back(Frame::data(whole.data));
        }
        if let Some(t) = whole.trailers {
            body.buffered.push_back(Frame::trailers(t));
        }
        body
    }

    /// Reads frames until `limit` data bytes or the end; they are replayed first. Returns the
    /// data read (contiguous, for parsing) and whether the body ended within the limit.
    pub(crate) async fn read_prefix(&mut self, limit: usize) -> Result<(Vec<u8>, bool), BodyError> {
        let mut data = Vec::new();
        let stall_limit = self.stall_limit;
        let Some(rest) = self.rest.as_mut() else {
            return Ok((data, true));
        };
        while data.len() < limit {
            let frame = tokio::time::timeout(stall_limit, rest.frame())
                .await
                .map_err(|_| BodyStalled)?;
            match frame {
                None => {
                    self.rest = None;
                    return Ok((data, true));
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(frame)) => {
                    if let Some(d) = frame.data_ref() {
                        data.extend_from_slice(d);
                        self.buffered_len += d.len() as u64;
                        if let Some(c) = &self.counter {
                            c.fetch_add(d.len() as u64, Ordering::Relaxed);
                        }
                    }
                    self.buffered.push_back(frame);
                }
            }
        }
        let ended = rest.is_end_stream();
        Ok((data, ended))
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = this.poll_inner(cx);
        if let Some(r) = &this.replay {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    r.keep(frame);
                    if this.is_end_stream() {
                        r.end();
                    }
                }
                Poll::Ready(None) => r.end(),
                // The client's body failed: it cannot be held whole.
                Poll::Ready(Some(Err(_))) => r.close(),
                Poll::Pending => {}
            }
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |r| r.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + self.buffered_len);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + self.buffered_len);
        }
        hint
    }
}

impl UpBody {
    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self;
        let polled = match this.buffered.pop_front() {
            Some(frame) => {
                if let Some(d) = frame.data_ref() {
                    this.buffered_len -= d.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            None => match this.rest.as_mut() {
                None => Poll::Ready(None),
                Some(rest) => match Pin::new(rest).poll_frame(cx) {
                    Poll::Ready(frame) => {
                        this.stalled = None;
                        if let (Some(c), Some(Ok(f))) = (&this.counter, &frame) {
                            if let Some(d) = f.data_ref() {
                                c.fetch_add(d.len() as u64, Ordering::Relaxed);
                            }
                        }
                        Poll::Ready(frame.map(|f| f.map_err(BodyError::from)))
                    }
                    // Nothing from the client now: it may wait at most the stall limit.
                    Poll::Pending => {
                        let limit = this.stall_limit;
                        let timer = this
                            .stalled
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                        match timer.as_mut().poll(cx) {
                            Poll::Ready(()) => Poll::Ready(Some(Err(BodyStalled.into()))),
                            Poll::Pending => Poll::Pending,
                        }
                    }
                },
            },
        };
        if let (Some(c), Poll::Ready(Some(Ok(frame)))) = (this.capture.as_ref(), &polled) {
            if let Some(d) = frame.data_ref() {
                c.request(d);
            }
        }
        polled
    }
}
