//! Rewriting heads for the other side of the proxy.
//!
//! Both directions drop the hop-by-hop headers ([`HOP_BY_HOP`]:
//! `Connection`, `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`,
//! `Upgrade` (kept when upgrading), `Proxy-Authenticate`,
//! `Proxy-Authorization`) and every header named in `Connection`.
//!
//! [`HOP_BY_HOP`]: crate::rules::HOP_BY_HOP `Content-Length` and `Transfer-Encoding` are not
//! copied but written again from the [`BodyKind`], so the emitted head always
//! frames the (verbatim forwarded) body exactly as it was framed on input.
//! Headers the proxy adds itself are written after the filtering and can't
//! be removed by a `Connection` token.

use std::net::IpAddr;

use super::framing::content_length;
use super::head::{
    connection_has, known_values, push_decimal, split_absolute, write_header, Known,
};
use super::rules::forwarded_for;
use super::{BodyKind, Error, Header, RequestHead, ResponseHead, Version};

/// Where and how a request is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarding<'a> {
    /// The client's address, appended to `X-Forwarded-For`.
    pub client_ip: IpAddr,
    /// The scheme the client used (`"http"` or `"https"`), sent as
    /// `X-Forwarded-Proto`.
    pub client_proto: &'a str,
    /// The backend's `host[:port]`, sent as `Host`.
    pub backend_authority: &'a str,
    /// The path of the backend URL (`"/base"` for `http://h:1/base`), put in
    /// front of every request path. `""` or `"/"` for none; a trailing `/`
    /// is ignored.
    pub backend_path_prefix: &'a str,
}

/// Writes the head to send to the backend for `req` into `out` and returns
/// how the request body that follows is framed (forward it verbatim).
///
/// The emitted head:
///
/// * request line: same method and version (an HTTP/1.0 client's request
///   goes out as HTTP/1.0, so the backend never answers it with chunked
///   encoding the client could not read); the target's path gets the
///   backend path prefix (`/base` + `/v1/models?x=1` ->
///   `/base/v1/models?x=1`, no double slash; `/` -> `/base/`). An
///   absolute-form target is sent in origin-form; `*` is sent unchanged.
/// * `Host` is the **backend's** authority, like nginx's default
///   `proxy_set_header Host $proxy_host`: the backend sees its own
///   `host:port`. The client's `Host` (or the authority of an absolute-form
///   target) goes to `X-Forwarded-Host` instead.
/// * `X-Forwarded-For`: the client's list (all lines merged) with
///   `client_ip` appended; `X-Forwarded-Proto` and `X-Forwarded-Host` are
///   replaced, never merged.
/// * `Expect: 100-continue` dropped: the proxy answers `100 Continue` itself when it
///   starts reading the body.
/// * hop-by-hop headers dropped (see the module docs); for an upgrade
///   request ([`RequestHead::is_upgrade`]) `Upgrade` is kept and
///   `Connection: upgrade` is sent.
/// * `Content-Length: n` or `Transfer-Encoding: chunked` per the body.
///
/// Fails only if the framing headers are invalid (never for a head from
/// [`parse_request`](super::parse_request)).
pub fn rewrite_request(
    req: &RequestHead,
    fwd: &Forwarding<'_>,
    out: &mut Vec<u8>,
) -> Result<BodyKind, Error> {
    let body = req.body_kind()?;
    let upgrade = req.is_upgrade();
    let (client_host, path) = match split_absolute(&req.target) {
        Some((authority, path)) => (Some(authority.as_bytes()), path),
        None => (req.header("host"), req.target.as_str().into()),
    };

    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    if path == "*" {
        out.push(b'*');
    } else {
        write_prefixed(out, fwd.backend_path_prefix, &path);
    }
    out.push(b' ');
    out.extend_from_slice(req.version.as_str().as_bytes());
    out.extend_from_slice(b"\r\n");

    write_header(out, b"Host", fwd.backend_authority.as_bytes());
    const REPLACED: [Known; 4] = [
        Known::Host,
        Known::XForwardedFor,
        Known::XForwardedProto,
        Known::XForwardedHost,
    ];
    for h in kept(&req.headers, upgrade, &REPLACED) {
        write_header(out, h.name(), h.value());
    }

    out.extend_from_slice(b"X-Forwarded-For: ");
    let prior = known_values(&req.headers, Known::XForwardedFor)
        .filter(|_| !connection_has(&req.headers, b"x-forwarded-for"));
    forwarded_for(prior, fwd.client_ip, out);
    out.extend_from_slice(b"\r\n");
    write_header(out, b"X-Forwarded-Proto", fwd.client_proto.as_bytes());
    if let Some(host) = client_host.filter(|h| !h.is_empty()) {
        write_header(out, b"X-Forwarded-Host", host);
    }
    write_framing(out, body);
    if upgrade {
        write_header(out, b"Connection", b"upgrade");
    }
    out.extend_from_slice(b"\r\n");
    Ok(body)
}

/// What the proxy must do after forwarding a response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsePlan {
    /// How the response body that follows is framed (`Tunnel` after a 101).
    pub body: BodyKind,
    /// Whether the client connection stays open for the next request after
    /// this response. (Whether the *backend* connection can be reused is
    /// [`ResponseHead::keep_alive`] plus a self-delimited body.)
    pub keep_alive: bool,
    /// A close-delimited body goes to the client chunked (so that its
    /// connection can stay open): wrap each part read in a chunk, and end
    /// with the last chunk `0\r\n\r\n` when the backend closes.
    pub rechunk: bool,
    /// A chunked body to an HTTP/1.0 client (from a backend that should not have sent
    /// one, RFC 9112 §6.1) goes to the client as its data alone, without the chunk
    /// framing and trailers ([`Dechunk`](crate::Dechunk)), and the connection closes at
    /// its end.
    pub dechunk: bool,
}

impl ResponsePlan {
    /// Whether the response switched protocols (101): after its head, copy
    /// bytes both ways until either side closes.
    pub fn is_upgrade(&self) -> bool {
        self.body == BodyKind::Tunnel
    }

    /// How the body is framed as the client reads it: chunked when re-chunked,
    /// close-delimited when its chunks are taken off, else as the backend framed it.
    pub fn sent_body(&self) -> BodyKind {
        if self.rechunk {
            BodyKind::Chunked
        } else if self.dechunk {
            BodyKind::CloseDelimited
        } else {
            self.body
        }
    }
}

/// Writes the head to send to the client for the backend's response `resp`
/// to `req` into `out`, and says how to continue.
///
/// `close` asks to close the client connection after this response (e.g.
/// when shutting down); `date` is the current time as an HTTP-date
/// ([`http_date`](crate::http_date)), sent when the response has no `Date`
/// (RFC 9110 §6.6.1 asks a proxy to add one). The emitted head:
///
/// * status line `HTTP/1.1 <status> <reason>` (a proxy sends its own
///   version);
/// * hop-by-hop headers dropped; for a 101, `Upgrade` is kept and
///   `Connection: upgrade` is sent;
/// * framing re-emitted from the body kind; for a response without body
///   (HEAD) a valid `Content-Length` is kept as information, for 1xx, 204
///   and 304 it is dropped; a close-delimited body goes to an HTTP/1.1 client
///   chunked ([`ResponsePlan::rechunk`]), so its connection can stay open; a
///   chunked body to an HTTP/1.0 client goes without its chunks, delimited by the
///   close ([`ResponsePlan::dechunk`]);
/// * `Connection: close` if the client connection will not be kept open
///   (but to an HTTP/1.0 client that did not ask for `keep-alive`: closing
///   is its default), and `Connection: keep-alive` for an HTTP/1.0 client
///   that keeps it open.
///
/// Interim responses (1xx other than 101, [`ResponseHead::is_interim`]) get
/// no `Connection` header; another response head follows. For an HTTP/1.0
/// client they are not written at all (RFC 9110 §15.2).
///
/// Fails with [`Error::UnexpectedUpgrade`] for a 101 the request did not ask
/// for (answer 502).
pub fn rewrite_response(
    resp: &ResponseHead,
    req: &RequestHead,
    close: bool,
    date: Option<&[u8]>,
    out: &mut Vec<u8>,
) -> Result<ResponsePlan, Error> {
    let body = resp.body_kind(req)?;
    let rechunk = body == BodyKind::CloseDelimited && req.version == Version::Http11;
    let dechunk = body == BodyKind::Chunked && req.version == Version::Http10;
    let self_delimited = rechunk
        || matches!(body, BodyKind::None | BodyKind::Length(_))
        || (body == BodyKind::Chunked && !dechunk);
    let keep_alive = !close && req.keep_alive() && self_delimited;
    let plan = ResponsePlan {
        body,
        keep_alive,
        rechunk,
        dechunk,
    };
    if resp.is_interim() && req.version == Version::Http10 {
        return Ok(plan);
    }

    out.extend_from_slice(b"HTTP/1.1 ");
    // At least three digits (a parsed status is 100..=999).
    let status = resp.status;
    if status < 1000 {
        out.extend_from_slice(&[
            b'0' + (status / 100) as u8,
            b'0' + (status / 10 % 10) as u8,
            b'0' + (status % 10) as u8,
        ]);
    } else {
        push_decimal(out, u64::from(status));
    }
    out.push(b' ');
    out.extend_from_slice(resp.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in kept(&resp.headers, plan.is_upgrade(), &[]) {
        write_header(out, h.name(), h.value());
    }
    match body {
        BodyKind::None if resp.status >= 200 && resp.status != 204 && resp.status != 304 => {
            if let Ok(Some(n)) = content_length(known_values(&resp.headers, Known::ContentLength)) {
                write_framing(out, BodyKind::Length(n));
            }
        }
        _ => write_framing(out, plan.sent_body()),
    }
    if let Some(date) = date.filter(|_| resp.header("date").is_none() && !resp.is_interim()) {
        write_header(out, b"Date", date);
    }
    if plan.is_upgrade() {
        write_header(out, b"Connection", b"upgrade");
    } else if resp.is_interim() {
        // The final response will say.
    } else if !keep_alive && (req.version == Version::Http11 || req.keep_alive()) {
        write_header(out, b"Connection", b"close");
    } else if keep_alive && req.version == Version::Http10 {
        write_header(out, b"Connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
    Ok(plan)
}

/// The headers to copy: not hop-by-hop, not named in `Connection`, not
/// framing, not in `replaced`. `Upgrade` survives when `upgrade` is true.
fn kept<'a>(
    headers: &'a [Header],
    upgrade: bool,
    replaced: &'a [Known],
) -> impl Iterator<Item = &'a Header> + 'a {
    // Most heads have no `Connection` field: then no name needs looking for in one.
    let listed = headers.iter().any(|h| h.is_known(Known::Connection));
    headers.iter().filter(move |h| {
        if upgrade && h.is_known(Known::Upgrade) {
            return true;
        }
        let dropped = h.known().is_hop_by_hop()
            || is_expect_continue(h)
            || h.is_known(Known::ContentLength)
            || replaced.iter().any(|&k| h.is_known(k))
            || (listed && connection_has(headers, h.name()));
        !dropped
    })
}

/// `Expect: 100-continue`: the proxy answers it itself (when it starts reading the body),
/// so the backend is not asked again.
fn is_expect_continue(h: &Header) -> bool {
    h.is_known(Known::Expect) && h.value().eq_ignore_ascii_case(b"100-continue")
}

fn write_framing(out: &mut Vec<u8>, body: BodyKind) {
    match body {
        BodyKind::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyKind::Chunked => write_header(out, b"Transfer-Encoding", b"chunked"),
        BodyKind::None | BodyKind::CloseDelimited | BodyKind::Tunnel => {}
    }
}

/// Appends `prefix` + `path` with exactly one `/` between them.
fn write_prefixed(out: &mut Vec<u8>, prefix: &str, path: &str) {
    let prefix = prefix.trim_end_matches('/');
    if !prefix.is_empty() && !prefix.starts_with('/') {
        out.push(b'/');
    }
    out.extend_from_slice(prefix.as_bytes());
    if !path.starts_with('/') {
        out.push(b'/');
    }
    out.extend_from_slice(path.as_bytes());
}
