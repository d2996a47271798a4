//! The one error type of [`crate::http1`].

use std::fmt;

/// Why a head or a body was rejected.
///
/// Every rejection rule has its own variant so that logs and tests can tell
/// them apart. The same variants are used for both directions:
///
/// * for a **client request**, answer [`Error::status`] (400 or 431) and
///   close the connection: after a framing error the byte stream can no
///   longer be trusted, so the connection must not be reused;
/// * for a **backend response**, answer 502 Bad Gateway to the client (or,
///   if the response head was already forwarded, close the client
///   connection) and close the backend connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// The head did not end within [`Limits::max_head_bytes`](super::Limits).
    HeadTooLarge,
    /// A request line that alone is longer than
    /// [`Limits::max_head_bytes`](super::Limits): its target is too long.
    UriTooLong,
    /// The head has more header lines than [`Limits::max_headers`](super::Limits).
    TooManyHeaders,
    /// A CR byte not followed by LF somewhere in the head.
    BareCr,
    /// An LF byte not preceded by CR somewhere in the head.
    BareLf,
    /// A header line starts with a space or tab (obsolete line folding, or
    /// whitespace between the start line and the first header).
    ObsFold,
    /// A request line without an HTTP version (HTTP/0.9 style, `GET /`).
    MissingVersion,
    /// An HTTP version other than `HTTP/1.0` or `HTTP/1.1`, or a malformed one.
    UnsupportedVersion,
    /// A malformed request line: bad method token or bad spacing.
    InvalidRequestLine,
    /// A request target that is not origin-form (`/path?q`), absolute-form
    /// (`http://host/path`) or `*` (only for OPTIONS); or a CONNECT request.
    InvalidTarget,
    /// A malformed status line: status code not 3 digits in 100..=999, or bad
    /// bytes in the reason phrase.
    InvalidStatusLine,
    /// A header name that is empty or contains a byte that is not a token
    /// character (e.g. a space before the colon).
    InvalidHeaderName,
    /// A header value containing a control character.
    InvalidHeaderValue,
    /// An HTTP/1.1 request without `Host`, with several `Host` lines, or with
    /// an invalid `Host` value.
    InvalidHost,
    /// Both `Content-Length` and `Transfer-Encoding` are present.
    ContentLengthAndTransferEncoding,
    /// Several `Content-Length` values that differ.
    ConflictingContentLength,
    /// A `Content-Length` that is not a decimal number fitting in a u64.
    InvalidContentLength,
    /// A `Transfer-Encoding` other than exactly `chunked`, or any
    /// `Transfer-Encoding` in an HTTP/1.0 message.
    UnsupportedTransferEncoding,
    /// A chunk-size line that does not start with hex digits, or has bytes
    /// other than `;` extensions after them.
    InvalidChunkSize,
    /// A chunk size of more than 16 hex digits (would overflow a u64).
    ChunkSizeOverflow,
    /// Malformed chunked framing other than the size: missing CRLF after
    /// chunk data, bad bytes or excessive length in a chunk extension, or a
    /// malformed or too large trailer section.
    InvalidChunk,
    /// A 101 Switching Protocols response to a request that did not ask for
    /// an upgrade, or without an `Upgrade` header.
    UnexpectedUpgrade,
    /// The connection ended before the message body was complete.
    IncompleteBody,
}

impl Error {
    /// The status code to answer a client whose **request** caused this
    /// error: 431 Request Header Fields Too Large for [`Error::HeadTooLarge`]
    /// and [`Error::TooManyHeaders`], 414 URI Too Long for [`Error::UriTooLong`], 400 Bad
    /// Request for everything else.
    ///
    /// For errors in a backend **response** answer 502 instead.
    pub fn status(self) -> u16 {
        match self {
            Error::HeadTooLarge | Error::TooManyHeaders => 431,
            Error::UriTooLong => 414,
            _ => 400,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = match self {
            Error::UriTooLong => {
                "request target is too long; send a shorter URL (or raise the head size limit)"
            }
            Error::HeadTooLarge => {
                "message head is too large; send fewer or shorter headers (or raise the head size limit)"
            }
            Error::TooManyHeaders => {
                "message head has too many header lines; send fewer headers (or raise the header count limit)"
            }
            Error::BareCr => "message head contains a CR not followed by LF; end lines with CRLF",
            Error::BareLf => "message head contains an LF not preceded by CR; end lines with CRLF",
            Error::ObsFold => {
                "a header line starts with whitespace (obsolete line folding); put each header on one line"
            }
            Error::MissingVersion => {
                "request line has no HTTP version (HTTP/0.9 is not supported); send `METHOD target HTTP/1.1`"
            }
            Error::UnsupportedVersion => {
                "unsupported or malformed HTTP version; only HTTP/1.0 and HTTP/1.1 are accepted"
            }
            Error::InvalidRequestLine => {
                "malformed request line; send `METHOD target HTTP/1.1` with single spaces and a token method"
            }
            Error::InvalidTarget => {
                "invalid request target; send an origin-form path like `/a?b`, an absolute `http://host/a` URL, or `*` for OPTIONS (CONNECT is not supported)"
            }
            Error::InvalidStatusLine => {
                "malformed status line; expected `HTTP/1.1 NNN reason` with a 3-digit status of at least 100"
            }
            Error::InvalidHeaderName => {
                "invalid header name; names must be non-empty tokens directly followed by `:`"
            }
            Error::InvalidHeaderValue => "header value contains a control character",
            Error::InvalidHost => {
                "HTTP/1.1 request must have exactly one valid Host header"
            }
            Error::ContentLengthAndTransferEncoding => {
                "message has both Content-Length and Transfer-Encoding; send only one of them"
            }
            Error::ConflictingContentLength => {
                "message has several different Content-Length values; send exactly one"
            }
            Error::InvalidContentLength => {
                "Content-Length is not a non-negative decimal number that fits in 64 bits"
            }
            Error::UnsupportedTransferEncoding => {
                "Transfer-Encoding must be exactly `chunked` (and is not allowed in HTTP/1.0 messages)"
            }
            Error::InvalidChunkSize => "chunk size line is malformed; expected hex digits then CRLF",
            Error::ChunkSizeOverflow => "chunk size has more than 16 hex digits",
            Error::InvalidChunk => {
                "malformed chunked body: missing CRLF after chunk data, bad chunk extension, or bad trailer"
            }
            Error::UnexpectedUpgrade => {
                "101 Switching Protocols without an upgrade request or without an Upgrade header"
            }
            Error::IncompleteBody => "connection closed before the message body was complete",
        };
        f.write_str(msg)
    }
}

impl std::error::Error for Error {}
