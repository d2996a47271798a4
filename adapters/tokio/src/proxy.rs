//! The request path: answer `/health`, ask the core for a backend, forward, stream back.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use lb_core::affinity::MAX_BODY_PREFIX;
use lb_proxy::reply::{self, ProxyError, Reply};
use lb_proxy::reqlog::Capture;
use lb_proxy::Failure;

use crate::body::Streamed;
use crate::pool::{Lent, Pool, SendError};
use crate::rt::{request_uri, LeaseGuard, Proxy};
use crate::upbody::{Replay, UpBody};

pub(crate) type ProxyBody = Either<Full<Bytes>, Streamed>;

/// Method and target (as sent to the backend, with the backend URL's path prefix) of a
/// request, kept for error messages (cheap clones, formatted only when something goes
/// wrong).
pub(crate) struct ReqLine {
    method: Method,
    uri: Uri,
}

impl fmt::Display for ReqLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.uri)
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The backend connections of the shard serving the request.
pub(crate) type Traffic = Arc<Pool>;

/// The client at the other end of a connection: its address, and its IP as an
/// `X-Forwarded-For` value (formatted once per connection, not per request).
#[derive(Clone)]
pub(crate) struct Peer {
    ip: IpAddr,
    forwarded_for: Option<HeaderValue>,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        let ip = lb_proxy::client_ip(addr.ip());
        Peer {
            ip,
            forwarded_for: HeaderValue::try_from(ip.to_string()).ok(),
        }
    }
}

pub(crate) async fn handle(
    proxy: Arc<Proxy>,
    traffic: Traffic,
    peer: Peer,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if req.uri().path() == "/health" {
        return Ok(local(proxy.health()));
    }
    let settings = proxy.settings();
    if req.headers().contains_key(header::TRANSFER_ENCODING)
        && req.headers().contains_key(header::CONTENT_LENGTH)
    {
        // Ambiguous framing is the classic request-smuggling vector: refuse it (hyper
        // would let chunked win), and close the connection.
        let mut resp = local(reply::error(ProxyError::BadRequest));
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(resp);
    }
    if head_size(&req) > settings.max_head_bytes {
        // hyper's own buffer limit is approximate (a single read may overshoot it), so the
        // documented limit is enforced here on what was parsed.
        let mut resp = local(reply::error(ProxyError::HeadTooLarge));
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(resp);
    }
    let arrived = tokio::time::Instant::now();
    let deadline = arrived + settings.request_timeout;
    let capture = settings.request_log.as_ref().map(|log| {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        Arc::new(log.capture(arrived.into_std(), req.method().as_str(), pq))
    });
    let (parts, body) = req.into_parts();
    // A body is copied as it goes up, while it fits, to send it again after a keep-alive
    // race (see `pool`).
    let replay =
        (!hyper::body::Body::is_end_stream(&body)).then(|| Replay::new(settings.replay_buffer));
    let mut body = UpBody::new(body, capture.clone(), replay.clone());

    // Content-based routing reads at most MAX_BODY_PREFIX bytes first; they are replayed
    // to the backend before the rest of the body streams through.
    let mut prefix = None;
    if settings.routes_by_body() {
        let read =
            match tokio::time::timeout_at(deadline, Box::pin(body.read_prefix(MAX_BODY_PREFIX)))
                .await
            {
                Ok(Ok(read)) => read,
                // The client stopped sending (or went away) before the body arrived.
                _ => return Ok(logged(&capture, reply::error(ProxyError::BadRequest))),
            };
        prefix = Some(read);
    }
    let keys = settings.route_keys(
        prefix.as_ref().map(|(data, ended)| (&data[..], *ended)),
        |name| parts.headers.get(name).map(|v| v.as_bytes()),
    );
    let meta = keys.meta(peer.ip);
    // Boxed: a queue wait is rare, and its state would otherwise enlarge every request's
    // future.
    let guard = match proxy.select(&meta) {
        Ok(g) => g,
        Err(lb_core::Reject::AllAtCapacity) if settings.core.queue.enabled() => {
            match Box::pin(proxy.select_or_wait(&meta)).await {
                Ok(g) => g,
                Err(reject) => {
                    return Ok(logged(&capture, reply::error(ProxyError::Rejected(reject))))
                }
            }
        }
        Err(reject) => return Ok(logged(&capture, reply::error(ProxyError::Rejected(reject)))),
    };
    let req = Request::from_parts(parts, body);
    Ok(forward(traffic, guard, peer, req, deadline, capture, replay).await)
}

async fn forward(
    traffic: Traffic,
    guard: LeaseGuard,
    peer: Peer,
    mut req: Request<UpBody>,
    deadline: tokio::time::Instant,
    capture: Option<Arc<Capture>>,
    replay: Option<Arc<Replay>>,
) -> Response<ProxyBody> {
    let upstream = guard.upstream().clone();
    if let Some(c) = &capture {
        c.backend(upstream.url().clone());
    }
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let uri = match request_uri(&upstream, req.uri().path_and_query()) {
        Ok(u) => u,
        Err(_) => {
            drop(guard); // not the backend's fault: released as cancelled
            return logged(&capture, reply::error(ProxyError::BadRequest));
        }
    };
    *req.uri_mut() = uri;
    // Taken from the rewritten target, a fresh allocation: a clone of the client's URI
    // would keep hyper's whole 8 KiB read buffer alive for as long as the request runs.
    let line = ReqLine {
        method: req.method().clone(),
        uri: req.uri().clone(),
    };
    rewrite_request_headers(req.headers_mut(), &peer, &upstream.ext.host, upgrade);

    let sent = if upgrade {
        tokio::time::timeout_at(deadline, Box::pin(traffic.upgrade(&upstream.ext.base, req)))
            .await
            .map(|r| r.map(|resp| (resp, None)))
    } else {
        let send = traffic.send(&upstream, req, replay.as_ref());
        tokio::time::timeout_at(deadline, send)
            .await
            .map(|r| r.map(|(resp, c)| (resp, Some(c))))
    };
    if let Some(r) = &replay {
        // The response has begun (or the exchange failed): no re-send any more.
        r.close();
    }
    let (mut resp, conn) = match sent {
        Ok(Ok(sent)) => sent,
        Ok(Err(SendError::Http(e))) if client_side(&e) => {
            // The client's request body failed (it went away mid-upload): not the
            // backend's fault.
            drop(guard);
            return logged(&capture, reply::error(ProxyError::BadRequest));
        }
        Ok(Err(e)) => {
            let failure = match &e {
                SendError::Connect(e) => Failure::Connect(describe(e.as_ref())),
                SendError::Http(e) => Failure::Io(describe(e)),
                SendError::Race(e) => Failure::Race(describe(e)),
            };
            return logged(&capture, guard.fail(failure, &line));
        }
        Err(_) => return logged(&capture, guard.fail(Failure::Timeout, &line)),
    };
    if let Some(why) = bad_response_framing(resp.headers()) {
        // Ambiguous or non-chunked transfer coding from a backend is never passed on: it is
        // either response splitting or a backend we cannot delimit safely.
        return logged(&capture, guard.fail(Failure::Invalid(why.into()), &line));
    }
    let status = resp.status().as_u16();
    if let Some(c) = &capture {
        c.status(status);
    }
    if let Some(ka) = resp.headers().get(&KEEP_ALIVE) {
        upstream.idle.learn(ka.as_bytes());
    }

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(splice(client_upgrade, backend_upgrade, guard, status));
            let (mut parts, _) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers, true);
            return Response::from_parts(parts, Either::Left(Full::default()));
        }
    }

    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    // No connection comes back for an upgrade request the backend answered without
    // switching: its one-off connection runs as a task and closes after this body.
    let lent = Lent::new(conn, traffic.clone(), upstream);
    let body = if hyper::body::Body::is_end_stream(&body) {
        drop(body);
        lent.finish_now().await;
        guard.respond(status);
        Either::Left(Full::default())
    } else {
        Either::Right(Streamed::new(
            body, lent, deadline, guard, status, line, capture,
        ))
    };
    Response::from_parts(parts, body)
}

/// A local reply, recorded in the request log.
fn logged(capture: &Option<Arc<Capture>>, reply: Reply) -> Response<ProxyBody> {
    if let Some(c) = capture {
        c.reply(&reply);
    }
    local(reply)
}

/// Joins an upgraded client connection with the upgraded backend connection (WebSocket
/// and any other `Upgrade`); the request stays in flight until either side closes.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    guard: LeaseGuard,
    status: u16,
) {
    let (Ok(client), Ok(backend)) = tokio::join!(client, backend) else {
        return; // the guard drops: cancelled
    };
    let mut client = TokioIo::new(client);
    let mut backend = TokioIo::new(backend);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
    guard.respond(status);
}

/// A response the proxy makes itself.
pub(crate) fn local(reply: Reply) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(reply.body))));
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).expect("replies use valid status codes");
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in reply.headers {
        h.insert(*name, HeaderValue::from_static(value));
    }
    resp
}

/// The bytes a request head took on the wire, near enough: request line and header lines.
fn head_size(req: &Request<Incoming>) -> usize {
    let uri = req.uri();
    let target = uri.authority().map_or(0, |a| a.as_str().len() + 8)
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers()
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// Why a backend response's framing is refused (as the smol build's `lb_http1`
/// does): both `Content-Length` and `Transfer-Encoding`, or a transfer coding whose final
/// coding is not `chunked`.
fn bad_response_framing(h: &HeaderMap) -> Option<&'static str> {
    if !h.contains_key(header::TRANSFER_ENCODING) {
        return None;
    }
    if h.contains_key(header::CONTENT_LENGTH) {
        return Some("invalid response: both Content-Length and Transfer-Encoding");
    }
    let last = h
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .rfind(|t| !t.is_empty());
    match last {
        Some(t) if t.eq_ignore_ascii_case("chunked") => None,
        _ => Some("invalid response: Transfer-Encoding does not end in chunked"),
    }
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE) && connection_has(h, "upgrade")
}

fn connection_has(h: &HeaderMap, token: &str) -> bool {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether `name` is hop-by-hop by definition (RFC 9110 §7.6.1), whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), and those `Connection` names. An upgrade
/// keeps `Upgrade` and `Connection: upgrade`.
///
/// Runs twice per request, so it looks before it removes: one pass over the names finds
/// the hop-by-hop ones present (usually none, or `Connection` alone), and only those are
/// removed; `Connection`'s tokens are read without allocating in the usual single line.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let mut present: [Option<HeaderName>; 8] = Default::default();
    for (slot, name) in present
        .iter_mut()
        .zip(h.keys().filter(|n| is_hop_by_hop(n)))
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

/// Hop-by-hop headers out; `X-Forwarded-For` appended, `X-Forwarded-Proto` and
/// `X-Forwarded-Host` set; `Host` becomes the backend's authority (what it would see if
/// called directly, like nginx's default `proxy_set_header Host $proxy_host`).
fn rewrite_request_headers(h: &mut HeaderMap, peer: &Peer, host: &HeaderValue, upgrade: bool) {
    strip_hop_by_hop(h, upgrade);
    // Up to three names are added: grow the map at most once.
    h.reserve(3);
    match h.entry(&X_FORWARDED_FOR) {
        Entry::Occupied(mut prior) => {
            // Several lines are one list (RFC 9110 §5.3); they fold into one line. An
            // unreadable prior value is replaced rather than passed on.
            let mut chain = String::new();
            for line in prior.iter() {
                match line.to_str() {
                    Ok(v) => {
                        chain.push_str(v);
                        chain.push_str(", ");
                    }
                    Err(_) => {
                        chain.clear();
                        break;
                    }
                }
            }
            chain.push_str(&peer.ip.to_string());
            match HeaderValue::try_from(chain)
                .ok()
                .or(peer.forwarded_for.clone())
            {
                Some(v) => drop(prior.insert(v)),
                None => drop(prior.remove_entry_mult()),
            }
        }
        Entry::Vacant(slot) => {
            if let Some(v) = peer.forwarded_for.clone() {
                slot.insert(v);
            }
        }
    }
    h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(client_host) = h.insert(header::HOST, host.clone()) {
        h.insert(&X_FORWARDED_HOST, client_host);
    }
}

/// Whether a client error was caused by the client's own request body.
pub(crate) fn client_side(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_user() || h.is_body_write_aborted() {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// A short, human description of an error: the innermost I/O error in plain words, else
/// the innermost message.
pub(crate) fn describe(e: &(dyn StdError + 'static)) -> String {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    let mut last = e.to_string();
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::ConnectionRefused => "connection refused".into(),
                io::ErrorKind::ConnectionReset => "connection reset by backend".into(),
                io::ErrorKind::ConnectionAborted => "connection aborted".into(),
                io::ErrorKind::TimedOut => "connect timeout (--connect-timeout)".into(),
                io::ErrorKind::UnexpectedEof => "backend closed the connection".into(),
                _ => io.to_string(),
            };
        }
        last = err.to_string();
        cur = err.source();
    }
    last
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
            ("Content-Type", "text/plain"),
            ("X-End", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["content-type", "x-end"]);
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
