//! The request body sent to a backend: frames already read (to route by content), then the
//! rest of the client's body as it arrives; each frame copied to the request log if on.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use lb_core::reqlog::Capture;

pin_project_lite::pin_project! {
    pub(crate) struct UpBody {
        buffered: VecDeque<Frame<Bytes>>,
        buffered_len: u64,
        #[pin]
        rest: Option<Incoming>,
        capture: Option<Arc<Capture>>,
    }
}

impl UpBody {
    /// The client's body as is.
    pub(crate) fn new(body: Incoming, capture: Option<Arc<Capture>>) -> Self {
        UpBody {
            buffered: VecDeque::new(),
            buffered_len: 0,
            rest: Some(body),
            capture,
        }
    }

    /// Reads frames until `limit` data bytes or the end; they are replayed first. Returns the
    /// data read (contiguous, for parsing) and whether the body ended within the limit.
    pub(crate) async fn read_prefix(
        &mut self,
        limit: usize,
    ) -> Result<(Vec<u8>, bool), hyper::Error> {
        let mut data = Vec::new();
        let Some(rest) = self.rest.as_mut() else {
            return Ok((data, true));
        };
        while data.len() < limit {
            match rest.frame().await {
                None => {
                    self.rest = None;
                    return Ok((data, true));
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => {
                    if let Some(d) = frame.data_ref() {
                        data.extend_from_slice(d);
                        self.buffered_len += d.len() as u64;
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let polled = match this.buffered.pop_front() {
            Some(frame) => {
                if let Some(d) = frame.data_ref() {
                    *this.buffered_len -= d.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            None => match this.rest.as_pin_mut() {
                None => Poll::Ready(None),
                Some(rest) => rest.poll_frame(cx),
            },
        };
        if let (Some(c), Poll::Ready(Some(Ok(frame)))) = (this.capture.as_ref(), &polled) {
            if let Some(d) = frame.data_ref() {
                c.request(d);
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
