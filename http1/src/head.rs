//! Message heads: owned types, push-style parsing, serialization.
//!
//! Parsing is two passes over the bytes received so far:
//!
//! 1. [`scan_head`] walks the lines to find the end of the head (the first
//!    empty line) and enforces what httparse is lenient about: CRLF line
//!    endings only (no bare CR, no bare LF), no obs-fold, the size limit and
//!    the header count limit. Until the empty line arrives the answer is
//!    [`Status::Partial`] (or an error if a rule is already broken).
//! 2. httparse (default, strict `ParserConfig`) parses the complete head;
//!    the result is copied into an owned [`RequestHead`] / [`ResponseHead`],
//!    then target, `Host` and framing headers are checked.
//!
//! A parse error is final: the caller must not retry with more bytes.

use super::framing::declared_framing;
use super::Error;
use super::FieldBytes;

/// Default for [`Limits::max_head_bytes`]: 64 KiB.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 64 * 1024;
/// Default for [`Limits::max_headers`].
pub const DEFAULT_MAX_HEADERS: usize = 100;

/// Limits applied while parsing a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum size of a head in bytes, from the first byte (including any
    /// empty lines before the start line) to the final CRLF included.
    /// Exceeding it is [`Error::HeadTooLarge`].
    pub max_head_bytes: usize,
    /// Maximum number of header lines. Exceeding it is
    /// [`Error::TooManyHeaders`].
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
        }
    }
}

/// Outcome of a push-style parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status<T> {
    /// The head is complete; the `usize` is the number of bytes it used.
    /// Bytes after that belong to the body or the next message.
    Complete(T, usize),
    /// More bytes are needed. Call again with the same bytes plus more.
    Partial,
}

/// An HTTP/1.x version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Version {
    /// `HTTP/1.0`
    Http10,
    /// `HTTP/1.1`
    Http11,
}

impl Version {
    /// The version as it appears on the wire, e.g. `"HTTP/1.1"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }

    fn from_minor(minor: u8) -> Version {
        if minor == 0 {
            Version::Http10
        } else {
            Version::Http11
        }
    }
}

/// One header line: a name and a value, as received.
///
/// The name keeps its case (compare with [`Header::is`]); the value has leading and
/// trailing whitespace removed and may contain obs-text (bytes >= 0x80), hence bytes
/// rather than a string. Both are [`FieldBytes`]: short ones need no allocation. The
/// names `lb` looks for are recognised once, when the header is made, so that looking
/// one up compares a tag, not a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    name: FieldBytes,
    value: FieldBytes,
    known: Known,
}

impl Header {
    /// Builds a header. The caller guarantees `name` is a token and `value`
    /// has no CR, LF or NUL (heads from the parser always satisfy this).
    pub fn new(name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Header {
        let name = name.as_ref();
        Header {
            name: FieldBytes::new(name),
            value: FieldBytes::new(value.as_ref()),
            known: Known::of(name),
        }
    }

    /// Header name, a token (`Content-Type`), as received.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Header value, without surrounding whitespace.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// Whether this header is called `name` (ASCII case-insensitive).
    pub fn is(&self, name: &str) -> bool {
        self.is_named(Known::of(name.as_bytes()), name)
    }

    /// [`is`](Self::is), with `name` already recognised as `known`.
    fn is_named(&self, known: Known, name: &str) -> bool {
        match known {
            Known::Other => {
                self.known == Known::Other && self.name.eq_ignore_ascii_case(name.as_bytes())
            }
            k => self.known == k,
        }
    }

    /// Whether this header is the `known` one.
    pub(crate) fn is_known(&self, known: Known) -> bool {
        self.known == known
    }

    /// Which of the names looked for this header has (or [`Known::Other`]).
    pub(crate) fn known(&self) -> Known {
        self.known
    }
}

/// Whether `name` equals `lower` (of the same length; lower-case letters and `-` only)
/// ASCII case-insensitively: a letter may differ by its case bit, anything else must be
/// equal. Every byte is looked at (no branch a byte), the first one first.
fn same_name(name: &[u8], lower: &[u8]) -> bool {
    let case = |c: u8| u8::from(c.is_ascii_lowercase()) << 5;
    let differs = |(&b, &c): (&u8, &u8)| (b | case(c)) ^ c;
    name.len() == lower.len()
        && differs((&name[0], &lower[0])) == 0
        && name
            .iter()
            .zip(lower)
            .fold(0, |acc, pair| acc | differs(pair))
            == 0
}

/// The header names the codec (and the proxy) looks for, recognised case-insensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Known {
    Connection,
    ContentLength,
    ContentType,
    Date,
    Expect,
    Host,
    KeepAlive,
    ProxyAuthenticate,
    ProxyAuthorization,
    ProxyConnection,
    Te,
    TransferEncoding,
    Upgrade,
    UserAgent,
    XForwardedFor,
    XForwardedHost,
    XForwardedProto,
    XRequestId,
    /// Any other name.
    Other,
}

impl Known {
    /// What `name` is (ASCII case-insensitive): by its length, then among the few
    /// names of that length.
    pub(crate) fn of(name: &[u8]) -> Known {
        use Known::*;
        let is = |lower: &[u8]| same_name(name, lower);
        match name.len() {
            2 if is(b"te") => Te,
            4 if is(b"host") => Host,
            4 if is(b"date") => Date,
            6 if is(b"expect") => Expect,
            7 if is(b"upgrade") => Upgrade,
            10 if is(b"connection") => Connection,
            10 if is(b"keep-alive") => KeepAlive,
            10 if is(b"user-agent") => UserAgent,
            12 if is(b"content-type") => ContentType,
            12 if is(b"x-request-id") => XRequestId,
            14 if is(b"content-length") => ContentLength,
            15 if is(b"x-forwarded-for") => XForwardedFor,
            16 if is(b"proxy-connection") => ProxyConnection,
            16 if is(b"x-forwarded-host") => XForwardedHost,
            17 if is(b"transfer-encoding") => TransferEncoding,
            17 if is(b"x-forwarded-proto") => XForwardedProto,
            18 if is(b"proxy-authenticate") => ProxyAuthenticate,
            19 if is(b"proxy-authorization") => ProxyAuthorization,
            _ => Other,
        }
    }

    /// Whether this name is hop-by-hop by itself ([`crate::rules::HOP_BY_HOP`]).
    pub(crate) fn is_hop_by_hop(self) -> bool {
        use Known::*;
        matches!(
            self,
            Connection
                | KeepAlive
                | ProxyConnection
                | Te
                | TransferEncoding
                | Upgrade
                | ProxyAuthenticate
                | ProxyAuthorization
        )
    }
}

/// An owned request head: request line plus headers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestHead {
    /// Method token, e.g. `GET`.
    pub method: String,
    /// Request target as sent: `/path?q`, `http://host/path` or `*`.
    pub target: String,
    /// Protocol version.
    pub version: Version,
    /// Header lines in order.
    pub headers: Vec<Header>,
}

/// An owned response head: status line plus headers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResponseHead {
    /// Protocol version.
    pub version: Version,
    /// Status code, 100..=999.
    pub status: u16,
    /// Reason phrase; empty if it was empty or contained obs-text.
    pub reason: String,
    /// Header lines in order.
    pub headers: Vec<Header>,
}

/// Parses a request head from the start of `buf`.
///
/// Returns `Complete(head, consumed)` once the whole head (through the
/// empty line) is in `buf`, `Partial` if more bytes are needed, or an error
/// if the bytes can never become a valid head. Empty lines before the
/// request line are skipped (RFC 9112 §2.2) and counted in `consumed`.
///
/// Besides syntax this checks: only HTTP/1.0 and 1.1; a target in origin-,
/// absolute- or asterisk-form (no CONNECT); exactly one valid `Host` in
/// HTTP/1.1; consistent framing headers (see [`RequestHead::body_kind`]).
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Status<RequestHead>, Error> {
    let Some(span) = scan_head(buf, limits)? else {
        return Ok(Status::Partial);
    };
    check_request_line(&buf[span.start..span.first_line_end])?;
    let (mut stack, mut heap) = ([httparse::EMPTY_HEADER; STACK_SLOTS], Vec::new());
    let slots = header_slots(span.header_lines, &mut stack, &mut heap);
    let mut req = httparse::Request::new(slots);
    match req.parse(&buf[..span.end]) {
        Ok(httparse::Status::Complete(n)) if n == span.end => {}
        Ok(_) => return Err(Error::InvalidRequestLine),
        Err(e) => return Err(map_httparse(e, Error::InvalidRequestLine)),
    }
    let head = RequestHead {
        method: req.method.unwrap_or_default().to_owned(),
        target: req.path.unwrap_or_default().to_owned(),
        version: Version::from_minor(req.version.unwrap_or(1)),
        headers: owned_headers(req.headers),
    };
    crate::rules::check_target(&head.method, &head.target)?;
    crate::rules::check_host(head.version, known_values(&head.headers, Known::Host))?;
    declared_framing(head.version, &head.headers)?;
    Ok(Status::Complete(head, span.end))
}

/// Parses a response head from the start of `buf`.
///
/// Same contract as [`parse_request`]. Checks: only HTTP/1.0 and 1.1, a
/// 3-digit status >= 100, consistent framing headers. Whether the response
/// has a body depends on the request; see [`ResponseHead::body_kind`].
pub fn parse_response(buf: &[u8], limits: &Limits) -> Result<Status<ResponseHead>, Error> {
    // What is here must at least start a status line: a peer that is not speaking HTTP is
    // refused now, not when (if ever) a head ends. (First, so that a prefix of a head
    // and the whole head are refused for the same reason.)
    status_line_start(buf)?;
    let span = match scan_head(buf, limits) {
        Ok(Some(span)) => span,
        Ok(None) => return Ok(Status::Partial),
        // A status line that long is just a head too large.
        Err(Error::UriTooLong) => return Err(Error::HeadTooLarge),
        Err(e) => return Err(e),
    };
    let (mut stack, mut heap) = ([httparse::EMPTY_HEADER; STACK_SLOTS], Vec::new());
    let slots = header_slots(span.header_lines, &mut stack, &mut heap);
    let mut res = httparse::Response::new(slots);
    match res.parse(&buf[..span.end]) {
        Ok(httparse::Status::Complete(n)) if n == span.end => {}
        Ok(_) => return Err(Error::InvalidStatusLine),
        Err(e) => return Err(map_httparse(e, Error::InvalidStatusLine)),
    }
    let status = res.code.unwrap_or(0);
    if status < 100 {
        return Err(Error::InvalidStatusLine);
    }
    let head = ResponseHead {
        version: Version::from_minor(res.version.unwrap_or(1)),
        status,
        reason: res.reason.unwrap_or_default().to_owned(),
        headers: owned_headers(res.headers),
    };
    declared_framing(head.version, &head.headers)?;
    Ok(Status::Complete(head, span.end))
}

/// Whether `buf` starts (or can still start) a status line: `HTTP/1.0` or `HTTP/1.1`
/// ([`Error::UnsupportedVersion`] otherwise), then, once its first line is whole, a space
/// and three digits ([`Error::InvalidStatusLine`]).
fn status_line_start(buf: &[u8]) -> Result<(), Error> {
    let mut line = buf;
    while let Some(rest) = line.strip_prefix(b"\r\n") {
        line = rest;
    }
    if line == b"\r" {
        // Another empty line, its LF still to come.
        return Ok(());
    }
    let end = line.iter().position(|&b| b == b'\r' || b == b'\n');
    let first = &line[..end.unwrap_or(line.len())];
    let version = &first[..first.len().min(8)];
    let known = [&b"HTTP/1.1"[..], b"HTTP/1.0"]
        .iter()
        .any(|v| v.starts_with(version));
    if !known || (end.is_some() && version.len() < 8) {
        return Err(Error::UnsupportedVersion);
    }
    if end.is_some() {
        let status = first.len() >= 12
            && first[8] == b' '
            && first[9..12].iter().all(u8::is_ascii_digit)
            && first.get(12).is_none_or(|&b| b == b' ');
        if !status {
            return Err(Error::InvalidStatusLine);
        }
    }
    Ok(())
}

impl RequestHead {
    /// Appends the head as is (request line, headers, empty line) to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        for part in [
            &self.method,
            " ",
            &self.target,
            " ",
            self.version.as_str(),
            "\r\n",
        ] {
            out.extend_from_slice(part.as_bytes());
        }
        write_headers(out, &self.headers);
    }

    /// The value of the first header called `name`, if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header_values(&self.headers, name).next()
    }

    /// Whether the client wants the connection kept open after this
    /// exchange: HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with
    /// `Connection: keep-alive` (and no `close`).
    pub fn keep_alive(&self) -> bool {
        keep_alive(self.version, &self.headers)
    }

    /// Whether this is an upgrade request (e.g. WebSocket): HTTP/1.1, a
    /// non-empty `Upgrade` header, and `upgrade` among the `Connection`
    /// tokens. (`Upgrade` in HTTP/1.0 is ignored, RFC 9110 §7.8.)
    pub fn is_upgrade(&self) -> bool {
        self.version == Version::Http11
            && known_values(&self.headers, Known::Upgrade).any(|v| !v.is_empty())
            && connection_has(&self.headers, b"upgrade")
    }

    /// Whether the client waits for `100 Continue` before sending the body
    /// (`Expect: 100-continue` in HTTP/1.1).
    pub fn expects_continue(&self) -> bool {
        self.version == Version::Http11
            && known_values(&self.headers, Known::Expect)
                .any(|v| v.eq_ignore_ascii_case(b"100-continue"))
    }

    /// Whether the method is `HEAD` (its response never has a body).
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

impl ResponseHead {
    /// Appends the head as is (status line, headers, empty line) to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        let code = [
            b'0' + (self.status / 100 % 10) as u8,
            b'0' + (self.status / 10 % 10) as u8,
            b'0' + (self.status % 10) as u8,
        ];
        for part in [self.version.as_str().as_bytes(), b" ", &code, b" "] {
            out.extend_from_slice(part);
        }
        out.extend_from_slice(self.reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        write_headers(out, &self.headers);
    }

    /// The value of the first header called `name`, if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header_values(&self.headers, name).next()
    }

    /// Whether the backend keeps the connection open after this response
    /// (same rule as [`RequestHead::keep_alive`]). A close-delimited body
    /// also ends the connection, whatever this says.
    pub fn keep_alive(&self) -> bool {
        keep_alive(self.version, &self.headers)
    }

    /// Whether this is an interim response (1xx other than 101): it is
    /// followed by another response head for the same request.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }

    /// Whether this is `101 Switching Protocols`.
    pub fn is_upgrade(&self) -> bool {
        self.status == 101
    }
}

/// Where a complete head lies in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeadSpan {
    /// Start of the start line (after skipped empty lines).
    start: usize,
    /// End of the start line, excluding its CRLF.
    first_line_end: usize,
    /// End of the head, after the final CRLF.
    end: usize,
    /// Number of header lines.
    header_lines: usize,
}

/// Finds the end of the head in `buf` while enforcing the line rules.
///
/// `Ok(None)` means "no empty line yet, and nothing wrong so far". The scan
/// only looks at the first `max_head_bytes` bytes, so it is bounded, and an
/// error found in a prefix of `buf` is also found in `buf` (never a
/// different verdict on more bytes).
fn scan_head(buf: &[u8], limits: &Limits) -> Result<Option<HeadSpan>, Error> {
    let limit = buf.len().min(limits.max_head_bytes);
    let mut i = 0;
    // Skip empty lines before the start line.
    while i + 1 < limit && buf[i] == b'\r' && buf[i + 1] == b'\n' {
        i += 2;
    }
    let start = i;
    let mut line_start = i;
    let mut first_line_end = None;
    let mut header_lines = 0;
    while i < limit {
        // Straight to the line's end: the bytes between are the parser's to judge.
        match next_line_byte(&buf[i..limit]) {
            Some(n) => i += n,
            None => break,
        }
        match buf[i] {
            b'\r' => {
                if i + 1 >= limit {
                    break;
                }
                if buf[i + 1] != b'\n' {
                    return Err(Error::BareCr);
                }
                if let Some(first_line_end) = first_line_end {
                    if i == line_start {
                        return Ok(Some(HeadSpan {
                            start,
                            first_line_end,
                            end: i + 2,
                            header_lines,
                        }));
                    }
                    header_lines += 1;
                    if header_lines > limits.max_headers {
                        return Err(Error::TooManyHeaders);
                    }
                } else {
                    first_line_end = Some(i);
                }
                i += 2;
                line_start = i;
                if i < limit && (buf[i] == b' ' || buf[i] == b'\t') {
                    return Err(Error::ObsFold);
                }
            }
            _ => return Err(Error::BareLf),
        }
    }
    if buf.len() < limits.max_head_bytes {
        Ok(None)
    } else if first_line_end.is_none() {
        // The start line alone outgrows the limit: for a request, its target (RFC 9112
        // §3: 414 rather than 431).
        Err(Error::UriTooLong)
    } else {
        Err(Error::HeadTooLarge)
    }
}

/// The index of the first CR or LF in `s`: 8 bytes at a time as one word (any byte
/// equal to CR or LF makes a zero byte after the XOR, which the subtraction trick finds),
/// then the byte within the block.
pub(crate) fn next_line_byte(s: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const CR: u64 = u64::from_ne_bytes([b'\r'; 8]);
    const LF: u64 = u64::from_ne_bytes([b'\n'; 8]);
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS != 0;
    let mut at = 0;
    for block in s.chunks_exact(8) {
        let w = u64::from_ne_bytes(block.try_into().unwrap_or_default());
        if has_zero(w ^ CR) || has_zero(w ^ LF) {
            break;
        }
        at += 8;
    }
    s[at..]
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .map(|n| at + n)
}

/// Whether the start of what a client sent cannot begin a request: past any empty lines
/// (RFC 9112 §2.2 lets a server skip them), a byte that is not a token character before
/// the method ends, within its first 32 bytes. A TLS ClientHello on the plain port, say,
/// gets its 400 at once, as hyper gives it, instead of waiting out the head timeout for a
/// line end that never comes. (Only the first 64 bytes are looked at, so that a head
/// trickled in byte by byte costs linear time, empty lines included.)
pub fn cannot_start_request(buf: &[u8]) -> bool {
    let buf = &buf[..buf.len().min(64)];
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    buf[start..]
        .iter()
        .take(32)
        .take_while(|&&b| b != b' ')
        .any(|&b| !crate::body::is_tchar(b))
}

/// Whether the bytes from `from` on (with the 3 before) may end a head: a blank line, in
/// CRLF or bare-LF form (`\n\n` or `\n\r\n`). A reader that parses again only then
/// spends linear time on a head trickled in byte by byte, not quadratic. (The parser
/// itself decides; this only saves calls.)
pub fn may_end_head(buf: &[u8], from: usize) -> bool {
    let window = &buf[from.saturating_sub(3)..];
    let mut i = 0;
    while let Some(n) = next_line_byte(&window[i..]) {
        let at = i + n;
        if window[at] == b'\n' {
            match window.get(at + 1) {
                Some(b'\n') => return true,
                Some(b'\r') if window.get(at + 2) == Some(&b'\n') => return true,
                _ => {}
            }
        }
        i = at + 1;
    }
    false
}

/// Checks what httparse would report vaguely: a missing version (HTTP/0.9)
/// and a well-formed but unsupported `HTTP/x.y`.
fn check_request_line(line: &[u8]) -> Result<(), Error> {
    let mut parts = line.split(|&b| b == b' ');
    let (_method, target, version) = (parts.next(), parts.next(), parts.next());
    match (target, version) {
        (Some(t), None) if !t.is_empty() => Err(Error::MissingVersion),
        (Some(_), Some(v)) if v.starts_with(b"HTTP/") && v != b"HTTP/1.0" && v != b"HTTP/1.1" => {
            Err(Error::UnsupportedVersion)
        }
        _ => Ok(()),
    }
}

fn map_httparse(e: httparse::Error, start_line: Error) -> Error {
    match e {
        httparse::Error::HeaderName => Error::InvalidHeaderName,
        httparse::Error::HeaderValue => Error::InvalidHeaderValue,
        httparse::Error::TooManyHeaders => Error::TooManyHeaders,
        httparse::Error::Version => Error::UnsupportedVersion,
        httparse::Error::Status => Error::InvalidStatusLine,
        httparse::Error::NewLine | httparse::Error::Token => start_line,
    }
}

/// How many header slots the parsers keep on the stack (a head with more gets them from
/// the heap).
const STACK_SLOTS: usize = 16;

/// `n` empty slots for httparse: from `stack` when there are enough, else in `heap`.
fn header_slots<'s, 'b>(
    n: usize,
    stack: &'s mut [httparse::Header<'b>; STACK_SLOTS],
    heap: &'s mut Vec<httparse::Header<'b>>,
) -> &'s mut [httparse::Header<'b>] {
    if n <= STACK_SLOTS {
        &mut stack[..n]
    } else {
        heap.resize(n, httparse::EMPTY_HEADER);
        heap
    }
}

fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<Header> {
    headers
        .iter()
        .map(|h| Header::new(h.name, h.value))
        .collect()
}

/// Splits an absolute-form `http(s)://authority/rest` target into the
/// authority and the origin-form rest (`/` if empty, `/?q` if only a query).
pub(crate) fn split_absolute(target: &str) -> Option<(&str, std::borrow::Cow<'_, str>)> {
    let scheme_len = if starts_with_ignore_case(target, "http://") {
        7
    } else if starts_with_ignore_case(target, "https://") {
        8
    } else {
        return None;
    };
    let rest = &target[scheme_len..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let path = if path.starts_with('/') {
        std::borrow::Cow::Borrowed(path)
    } else {
        std::borrow::Cow::Owned(format!("/{path}"))
    };
    Some((authority, path))
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

fn write_headers(out: &mut Vec<u8>, headers: &[Header]) {
    for h in headers {
        write_header(out, &h.name, &h.value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal, without going through `fmt` (a head is written per request).
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `name: value\r\n`.
pub(crate) fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    debug_assert!(!value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0));
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Values of all headers called `name`, in order.
pub(crate) fn header_values<'a, 'n>(
    headers: &'a [Header],
    name: &'n str,
) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
    let known = Known::of(name.as_bytes());
    headers
        .iter()
        .filter(move |h| h.is_named(known, name))
        .map(|h| h.value.as_slice())
}

/// Values of all headers that are `known`, in order.
pub(crate) fn known_values(headers: &[Header], known: Known) -> impl Iterator<Item = &[u8]> {
    headers
        .iter()
        .filter(move |h| h.known == known)
        .map(|h| h.value.as_slice())
}

/// The elements of a comma-separated list value, whitespace-trimmed,
/// empty elements skipped (RFC 9110 §5.6.1).
pub(crate) fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|item| item.trim_ascii())
        .filter(|item| !item.is_empty())
}

/// Whether any `Connection` header lists `token` (ASCII case-insensitive).
pub(crate) fn connection_has(headers: &[Header], token: &[u8]) -> bool {
    known_values(headers, Known::Connection)
        .flat_map(list_items)
        .any(|item| item.eq_ignore_ascii_case(token))
}

fn keep_alive(version: Version, headers: &[Header]) -> bool {
    if connection_has(headers, b"close") {
        return false;
    }
    version == Version::Http11 || connection_has(headers, b"keep-alive")
}

/// The idle limit a `Keep-Alive` response field announces (`timeout=N`, seconds; RFC
/// 2068 §19.7.1.1, still sent by Apache, gunicorn and others), if it names one.
pub fn keep_alive_timeout(value: &[u8]) -> Option<u64> {
    list_items(value).find_map(|item| {
        let (name, n) = item.split_at(item.iter().position(|&b| b == b'=')?);
        if !name.trim_ascii().eq_ignore_ascii_case(b"timeout") {
            return None;
        }
        let n = n[1..].trim_ascii();
        let n = n
            .strip_prefix(b"\"")
            .and_then(|n| n.strip_suffix(b"\""))
            .unwrap_or(n);
        std::str::from_utf8(n).ok()?.parse().ok()
    })
}
