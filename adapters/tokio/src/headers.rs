//! The HTTP rules of `lb_http1::rules` applied to hyper's `HeaderMap`: the same table of
//! hop-by-hop fields, the same request checks (target, `Host`, transfer codings) and
//! response checks, the same forwarding headers, so that this build and the smol build
//! (which applies them through `lb_http1`'s parser and rewriter) cannot drift apart.

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::Version;
use lb_http1::rules;
use lb_proxy::Failure;

use crate::proxy::Peer;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// `lb_http1::rules::HOP_BY_HOP` as header names (compared as names, not strings: the
/// standard ones are one comparison each). A test checks they are the same list.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

fn version(v: Version) -> lb_http1::Version {
    if v == Version::HTTP_10 {
        lb_http1::Version::Http10
    } else {
        lb_http1::Version::Http11
    }
}

fn values<'a>(h: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
    h.get_all(name).iter().map(HeaderValue::as_bytes)
}

/// The request checks the codec makes (hyper has parsed the rest): the target
/// ([`rules::check_target`]: origin-form, absolute-form `http(s)` without user info, `*`
/// for `OPTIONS` only; no `CONNECT`, no authority-form, nothing but ASCII), exactly one
/// valid `Host` in HTTP/1.1, a transfer coding that is exactly `chunked`. (hyper drops a
/// `Content-Length` sent with `Transfer-Encoding` before `lb` sees it: the README lists
/// that difference.)
pub(crate) fn check_request<B>(req: &http::Request<B>) -> Result<(), lb_http1::Error> {
    let uri = req.uri();
    let method = req.method().as_str();
    match (uri.scheme(), uri.authority()) {
        // Origin-form or `*`, the usual case: checked as it came, without allocating.
        (None, None) => {
            let target = uri.path_and_query().map_or("", |p| p.as_str());
            rules::check_target(method, target)?;
        }
        (Some(_), Some(_)) => rules::check_target(method, &uri.to_string())?,
        // Authority-form (`host:port`, or a bare word hyper read as a host): `CONNECT`'s
        // alone, which `lb` refuses.
        _ => return Err(lb_http1::Error::InvalidTarget),
    }
    let (v, h) = (version(req.version()), req.headers());
    rules::check_host(v, values(h, &header::HOST))?;
    lb_http1::chunked(v, values(h, &header::TRANSFER_ENCODING))?;
    Ok(())
}

/// Whether a backend's response can be passed on: a `Content-Length` that is not one
/// number (a list, lines that differ) is invalid, as is both `Content-Length` and
/// `Transfer-Encoding` is invalid; a transfer coding other than exactly `chunked` is one
/// `lb` cannot keep intact (hyper would take the chunks off and leave, say, `gzip` bytes
/// the client is not told about).
pub(crate) fn check_response(v: Version, h: &HeaderMap) -> Result<(), Failure> {
    // hyper reads `Content-Length: 2, 2` as 2 but forwards the list: the codec's rule,
    // where the value is not plain digits.
    let cl = h.get(header::CONTENT_LENGTH).map(HeaderValue::as_bytes);
    if cl.is_some_and(|v| !v.iter().all(u8::is_ascii_digit)) {
        if let Err(e) = lb_http1::content_length(values(h, &header::CONTENT_LENGTH)) {
            return Err(Failure::Invalid(format!("invalid response: {e}")));
        }
    }
    if !h.contains_key(header::TRANSFER_ENCODING) {
        return Ok(());
    }
    if h.contains_key(header::CONTENT_LENGTH) {
        let why = lb_http1::Error::ContentLengthAndTransferEncoding;
        return Err(Failure::Invalid(format!("invalid response: {why}")));
    }
    match lb_http1::chunked(version(v), values(h, &header::TRANSFER_ENCODING)) {
        Ok(_) => Ok(()),
        Err(e) => Err(Failure::Unsupported(format!("invalid response: {e}"))),
    }
}

/// Whether an HTTP/1.0 message asks to keep the connection (`Connection: keep-alive`).
pub(crate) fn wants_keep_alive(h: &HeaderMap) -> bool {
    rules::connection_names(values(h, &header::CONNECTION), b"keep-alive")
}

/// Whether a request asks for an upgrade (e.g. WebSocket): HTTP/1.1, `Upgrade`, and
/// `upgrade` among the `Connection` tokens. `Upgrade` in HTTP/1.0 is ignored (RFC 9110
/// §7.8), as the codec does: it goes as a hop-by-hop header.
pub(crate) fn is_upgrade(v: Version, h: &HeaderMap) -> bool {
    v == Version::HTTP_11
        && h.contains_key(header::UPGRADE)
        && rules::connection_names(values(h, &header::CONNECTION), b"upgrade")
}

/// Removes hop-by-hop headers ([`HOP_BY_HOP`]), and those `Connection` names. An upgrade
/// keeps `Upgrade` and `Connection: upgrade`.
///
/// Runs twice per request, so it looks before it removes: one pass over the names finds
/// the hop-by-hop ones present (usually none, or `Connection` alone), and only those are
/// removed; `Connection`'s tokens are read without allocating in the usual single line.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let mut present: [Option<HeaderName>; 8] = Default::default();
    for (slot, name) in present
        .iter_mut()
        .zip(h.keys().filter(|n| HOP_BY_HOP.contains(n)))
    {
        *slot = Some(name.clone());
    }
    if present[0].is_some() {
        let mut lines = h.get_all(header::CONNECTION).iter();
        let first = lines.next().cloned();
        let more: Vec<HeaderValue> = lines.cloned().collect();
        for line in first.iter().chain(&more) {
            let tokens = line.to_str().unwrap_or_default().split(',').map(str::trim);
            for token in tokens.filter(|t| !named_elsewhere(t)) {
                if !(upgrade && token.eq_ignore_ascii_case("upgrade")) {
                    // Not a header name (junk): nothing by that name to remove.
                    h.remove(token);
                }
            }
        }
        for name in present.iter().flatten() {
            if !(upgrade && name == header::UPGRADE) {
                h.remove(name);
            }
        }
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether a `Connection` token needs no removal of its own: empty, or `keep-alive` (the
/// usual one), a header that is hop-by-hop anyway and goes with the others. Saves parsing
/// and looking up a name per message. (`close` is looked up: RFC 9110 §7.6.1 removes a
/// field by that name too.)
fn named_elsewhere(token: &str) -> bool {
    token.is_empty() || token.eq_ignore_ascii_case("keep-alive")
}

/// Hop-by-hop headers out; `X-Forwarded-For` appended (`lb_http1::rules::forwarded_for`),
/// `X-Forwarded-Proto` and `X-Forwarded-Host` set (from an absolute-form target's
/// authority if there is one, else `Host`); `Host` becomes the backend's authority
/// (what it would see if called directly, like nginx's default `proxy_set_header Host
/// $proxy_host`).
pub(crate) fn rewrite_request_headers(
    h: &mut HeaderMap,
    peer: &Peer,
    host: &HeaderValue,
    target_authority: Option<HeaderValue>,
    upgrade: bool,
    request_id: Option<&HeaderValue>,
) {
    strip_hop_by_hop(h, upgrade);
    // The client's id when it is sane (left as it is), else ours.
    if let Some(v) = request_id {
        h.insert(&crate::proxy::REQUEST_ID, v.clone());
    }
    // hyper answers `Expect: 100-continue` itself when the body is first read: the backend
    // is not asked again (as `lb_http1::rewrite_request` does).
    if h.get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        h.remove(header::EXPECT);
    }
    // Up to three names are added: grow the map at most once.
    h.reserve(3);
    match h.entry(&X_FORWARDED_FOR) {
        Entry::Occupied(mut prior) => {
            // Several lines are one list (RFC 9110 §5.3); they fold into one line.
            let mut chain = Vec::new();
            rules::forwarded_for(prior.iter().map(HeaderValue::as_bytes), peer.ip, &mut chain);
            // Made of valid values and ", ": valid.
            if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(chain)) {
                prior.insert(v);
            }
        }
        Entry::Vacant(slot) => {
            slot.insert(peer.forwarded_for.clone());
        }
    }
    h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    let client_host = h.insert(header::HOST, host.clone());
    if let Some(v) = target_authority.or(client_host).filter(|v| !v.is_empty()) {
        h.insert(&X_FORWARDED_HOST, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(lines: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in lines {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn hop_by_hop_headers_and_connection_names_go() {
        let mut h = map(&[
            ("Connection", "Keep-Alive, X-Hop"),
            ("Connection", " x-other ,, close"),
            ("X-Hop", "1"),
            ("X-Other", "2"),
            // Named by `close` above: a field by that name goes too (RFC 9110 §7.6.1).
            ("Close", "3"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authenticate", "Basic"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Content-Type", "text/plain"),
            ("X-End", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        // `Trailer` is end-to-end: it announces the trailers.
        assert_eq!(names(&h), ["content-type", "trailer", "x-end"]);
    }

    #[test]
    fn the_table_is_the_codecs() {
        let ours: Vec<&str> = HOP_BY_HOP.iter().map(HeaderName::as_str).collect();
        assert_eq!(ours, lb_http1::rules::HOP_BY_HOP);
    }

    #[test]
    fn requests_are_checked_like_the_codec_does() {
        let req = |method: &str, uri: &str, lines: &[(&str, &str)]| {
            let mut b = http::Request::builder().method(method).uri(uri);
            for (n, v) in lines {
                b = b.header(*n, *v);
            }
            b.body(()).unwrap()
        };
        assert!(check_request(&req("GET", "/", &[("host", "a")])).is_ok());
        assert!(check_request(&req("GET", "/", &[])).is_err());
        assert!(check_request(&req("GET", "/", &[("host", "a"), ("host", "a")])).is_err());
        assert!(check_request(&req("GET", "/", &[("host", "a b")])).is_err());
        assert!(check_request(&req("CONNECT", "example.com:443", &[("host", "a")])).is_err());
        // The target, as `rules::check_target` has it (the codec's rule).
        for ok in ["/x?y", "http://b.example:99/x", "https://b/"] {
            assert!(
                check_request(&req("GET", ok, &[("host", "a")])).is_ok(),
                "{ok}"
            );
        }
        assert!(check_request(&req("OPTIONS", "*", &[("host", "a")])).is_ok());
        for bad in [
            "b.example:443",
            "x",
            "*",
            "http://u:p@b.example:99/x",
            "ftp://b/x",
            "/caf\u{e9}",
        ] {
            let Ok(uri) = http::Uri::try_from(bad) else {
                continue; // hyper refuses it itself
            };
            let r = http::Request::builder()
                .method("GET")
                .uri(uri)
                .header("host", "a")
                .body(())
                .unwrap();
            assert!(check_request(&r).is_err(), "{bad}");
        }
        for te in ["gzip, chunked", "chunked, gzip", "identity", "gzip"] {
            let r = req("POST", "/", &[("host", "a"), ("transfer-encoding", te)]);
            assert!(check_request(&r).is_err(), "{te}");
        }
        let twice = req(
            "POST",
            "/",
            &[
                ("host", "a"),
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
        );
        assert!(check_request(&twice).is_err());
        let chunked = req(
            "POST",
            "/",
            &[("host", "a"), ("transfer-encoding", "Chunked")],
        );
        assert!(check_request(&chunked).is_ok());
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_says_so() {
        let mut h = map(&[
            ("Connection", "Upgrade, X-Hop"),
            ("Upgrade", "websocket"),
            ("X-Hop", "1"),
            ("Sec-WebSocket-Key", "k"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(names(&h), ["connection", "sec-websocket-key", "upgrade"]);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn messages_without_hop_by_hop_headers_are_untouched() {
        let mut h = map(&[("Host", "a"), ("Content-Length", "3"), ("X-A", "1")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        // A Connection token that names no header (or is not a name at all) is harmless.
        let mut h = map(&[("Connection", "close, not a name, x-absent"), ("X-A", "1")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["x-a"]);
    }
}
