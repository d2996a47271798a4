//! Message body length decisions (RFC 9112 §6.3).
//!
//! Which headers are accepted:
//!
//! * `Content-Length`: one or more lines, each one decimal number; all
//!   must be equal (two lines `5` are fine, `5` and `6` are
//!   [`Error::ConflictingContentLength`], `5, 5` on one line is
//!   [`Error::InvalidContentLength`]).
//! * `Transfer-Encoding`: the combined list over all lines must be exactly
//!   `chunked` (case-insensitive). Anything else (`gzip`, `chunked, gzip`,
//!   `gzip, chunked`, `identity`, `chunked, chunked`) is
//!   [`Error::UnsupportedTransferEncoding`], as is any `Transfer-Encoding` in
//!   an HTTP/1.0 message.
//! * Both at once is [`Error::ContentLengthAndTransferEncoding`].
//!
//! These rules are checked by the head parsers, so heads coming from
//! [`parse_request`](super::parse_request) / [`parse_response`](super::parse_response)
//! only fail [`ResponseHead::body_kind`] for an unexpected 101.

use super::head::{known_values, list_items, Known, RequestHead, ResponseHead, Version};
use super::{Error, Header};

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BodyKind {
    /// No body: the next message starts right after the head.
    None,
    /// Exactly this many bytes (`Content-Length`).
    Length(u64),
    /// `Transfer-Encoding: chunked`: chunks up to the zero-size chunk and
    /// the trailer section.
    Chunked,
    /// Everything until the connection closes (responses only). The
    /// connection cannot be reused.
    CloseDelimited,
    /// The response was `101 Switching Protocols`: after the head both
    /// directions are an opaque byte tunnel until either side closes.
    Tunnel,
}

/// What the framing headers of a message declare, before taking the
/// request method or the status code into account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Declared {
    /// Neither `Content-Length` nor `Transfer-Encoding`.
    Nothing,
    /// A valid `Content-Length`.
    Length(u64),
    /// A valid `Transfer-Encoding: chunked`.
    Chunked,
}

/// Validates the framing headers and says what they declare.
pub(crate) fn declared_framing(version: Version, headers: &[Header]) -> Result<Declared, Error> {
    let length = content_length(known_values(headers, Known::ContentLength))?;
    let chunked = chunked(version, known_values(headers, Known::TransferEncoding))?;
    match (length, chunked) {
        (Some(_), true) => Err(Error::ContentLengthAndTransferEncoding),
        (Some(n), false) => Ok(Declared::Length(n)),
        (None, true) => Ok(Declared::Chunked),
        (None, false) => Ok(Declared::Nothing),
    }
}

/// Whether the `Transfer-Encoding` values (every line of the field) declare a chunked
/// body: `false` when there are none, `true` when their combined list is exactly
/// `chunked` (case-insensitive) in an HTTP/1.1 message, and
/// [`Error::UnsupportedTransferEncoding`] for anything else (`gzip`, `chunked, gzip`,
/// `gzip, chunked`, `identity`, `chunked` on two lines, any coding in HTTP/1.0). A
/// proxy that passes a body on byte for byte must understand all of its codings, and
/// the last must be `chunked` for the length to be known (RFC 9112 §6.1).
pub fn chunked<'a>(
    version: Version,
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<bool, Error> {
    let mut values = values.into_iter().peekable();
    if values.peek().is_none() {
        return Ok(false);
    }
    let mut codings = values.flat_map(list_items);
    let only_chunked = codings
        .next()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none();
    if only_chunked && version == Version::Http11 {
        Ok(true)
    } else {
        Err(Error::UnsupportedTransferEncoding)
    }
}

/// The `Content-Length` declared by the field's values (every line), if any:
/// [`Error::InvalidContentLength`] for a value that is not one plain decimal number (no
/// sign, no spaces inside, no list), and [`Error::ConflictingContentLength`] for lines
/// that differ (equal lines are one length).
pub fn content_length<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<u64>, Error> {
    let mut found = None;
    for value in values {
        // One number a line: a list (`5, 5`), an empty value, a sign or inner spaces are
        // invalid (hyper refuses them too).
        let n = parse_decimal(value.trim_ascii()).ok_or(Error::InvalidContentLength)?;
        match found {
            Some(m) if m != n => return Err(Error::ConflictingContentLength),
            _ => found = Some(n),
        }
    }
    Ok(found)
}

/// `1*DIGIT` as a u64; `None` if empty, not digits, or too large.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

impl RequestHead {
    /// How the request body is delimited (RFC 9112 §6.3 rules 4-7):
    /// chunked if `Transfer-Encoding: chunked`, else `Length(n)` if
    /// `Content-Length: n`, else no body. Never `CloseDelimited`.
    pub fn body_kind(&self) -> Result<BodyKind, Error> {
        Ok(match declared_framing(self.version, &self.headers)? {
            Declared::Nothing => BodyKind::None,
            Declared::Length(n) => BodyKind::Length(n),
            Declared::Chunked => BodyKind::Chunked,
        })
    }
}

impl ResponseHead {
    /// How the body of this response to `req` is delimited (RFC 9112 §6.3):
    ///
    /// 1. `101` to an upgrade request (with an `Upgrade` header) -> `Tunnel`;
    ///    `101` otherwise -> [`Error::UnexpectedUpgrade`].
    /// 2. Response to `HEAD`, any other 1xx, `204`, `304` -> `None`
    ///    (a `Content-Length` there describes the would-be body).
    /// 3. `Transfer-Encoding: chunked` -> `Chunked`.
    /// 4. `Content-Length: n` -> `Length(n)`.
    /// 5. Otherwise -> `CloseDelimited`.
    pub fn body_kind(&self, req: &RequestHead) -> Result<BodyKind, Error> {
        let declared = declared_framing(self.version, &self.headers)?;
        if self.status == 101 {
            let has_upgrade = known_values(&self.headers, Known::Upgrade).any(|v| !v.is_empty());
            return if req.is_upgrade() && has_upgrade {
                Ok(BodyKind::Tunnel)
            } else {
                Err(Error::UnexpectedUpgrade)
            };
        }
        if req.is_head() || self.status < 200 || self.status == 204 || self.status == 304 {
            return Ok(BodyKind::None);
        }
        Ok(match declared {
            Declared::Nothing => BodyKind::CloseDelimited,
            Declared::Length(n) => BodyKind::Length(n),
            Declared::Chunked => BodyKind::Chunked,
        })
    }
}
