//! `--log-to`: the bodies of a request, copied into its [`Capture`] as they stream (the
//! capture and the writer are shared by both builds: `lb_proxy::reqlog` and the CLI).

use lb_http1::BodyKind;
use lb_proxy::reqlog::Capture;

/// Which body a [`Tap`] copies.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    Request,
    Response,
}

/// Copies one body into a capture as its bytes pass, as the backend or client reads it:
/// the data of a chunked body, without its framing.
pub(crate) struct Tap<'a> {
    capture: &'a Capture,
    side: Side,
    chunks: Option<Dechunk>,
}

impl<'a> Tap<'a> {
    /// A tap for a body framed as `kind` (the framing as forwarded, verbatim).
    pub(crate) fn new(capture: Option<&'a Capture>, side: Side, kind: BodyKind) -> Option<Self> {
        Some(Tap {
            capture: capture?,
            side,
            chunks: matches!(kind, BodyKind::Chunked).then(Dechunk::default),
        })
    }

    /// Copies the data in `wire`: bytes of the body as framed, already accepted by the
    /// body's `BodyFramer` (so well-formed).
    pub(crate) fn feed(&mut self, wire: &[u8]) {
        let (capture, side) = (self.capture, self.side);
        let copy = |data: &[u8]| match side {
            Side::Request => capture.request(data),
            Side::Response => capture.response(data),
        };
        match &mut self.chunks {
            Some(d) => d.feed(wire, copy),
            None if wire.is_empty() => {}
            None => copy(wire),
        }
    }
}

pub(crate) use lb_http1::Dechunk;
