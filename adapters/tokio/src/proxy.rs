//! The request path: answer `/health`, ask the core for a backend, forward, stream back.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use lb_core::affinity::MAX_BODY_PREFIX;
use lb_proxy::reply::{self, ProxyError, Reply};
use lb_proxy::reqlog::Capture;
use lb_proxy::{Account, Arrival, Failure};

/// `X-Request-Id`.
pub(crate) static REQUEST_ID: header::HeaderName =
    header::HeaderName::from_static(lb_proxy::request_id::HEADER);

use crate::body::Streamed;
use crate::headers::{
    check_request, check_response, is_upgrade, rewrite_request_headers, strip_hop_by_hop,
    wants_keep_alive, KEEP_ALIVE,
};
use crate::pool::{Lent, Pool, SendError};
use crate::rt::{request_uri, LeaseGuard, Proxy, Upstream};
use crate::upbody::{BodyStalled, Replay, UpBody};

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

/// The backend connections of the shard serving the request.
pub(crate) type Traffic = Arc<Pool>;

/// The client at the other end of a connection: its address, and its IP as an
/// `X-Forwarded-For` value (formatted once per connection, not per request). Shared by the
/// connection's requests (an `Arc`: a pointer in each request's future, and no copy of the
/// value per request).
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    pub(crate) ip: IpAddr,
    pub(crate) forwarded_for: HeaderValue,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr) -> Arc<Self> {
        let ip = lb_proxy::client_ip(addr.ip());
        let forwarded_for = HeaderValue::try_from(ip.to_string())
            .expect("an IP address in text is a valid header value");
        Arc::new(Peer {
            addr,
            ip,
            forwarded_for,
        })
    }
}

/// One request: `/health` answered here, else proxied. The request's [`Account`] comes
/// back with the response: it records the request when the response body has ended.
///
/// Each of these request functions is an `async` block rather than an `async fn`, which
/// would keep its arguments twice (as arguments and as locals) in the request's future:
/// hyper holds that future for every connection.
#[allow(clippy::manual_async_fn)] // `async fn` would store the arguments twice
pub(crate) fn handle(
    proxy: Arc<Proxy>,
    traffic: Traffic,
    peer: Arc<Peer>,
    req: Request<Incoming>,
) -> impl Future<Output = (Response<ProxyBody>, Option<Account>)> + Send {
    async move {
        if req.uri().path() == "/health" {
            return (local(proxy.health()), None);
        }
        let arrived = std::time::Instant::now();
        let version = if req.version() == http::Version::HTTP_10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        };
        let mut acct = proxy.account(&Arrival {
            at: arrived,
            client: peer.addr,
            method: req.method().as_str(),
            target: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path(), |p| p.as_str()),
            version,
            header: &|name| req.headers().get(name).map(HeaderValue::as_bytes),
        });
        let ends = Ends::of(&req);
        let mut resp = proxied(proxy, traffic, peer, req, &mut acct).await;
        ends.say_close(&mut resp);
        (resp, Some(acct))
    }
}

#[allow(clippy::manual_async_fn)] // `async fn` would store the arguments twice
fn proxied(
    proxy: Arc<Proxy>,
    traffic: Traffic,
    peer: Arc<Peer>,
    req: Request<Incoming>,
    acct: &mut Account,
) -> impl Future<Output = Response<ProxyBody>> + Send + '_ {
    async move {
        let settings = proxy.settings();
        if let Err(e) = check_request(&req) {
            // What the codec refuses (see `headers`): the status alone, and the connection
            // closes.
            return answer(acct, reply::refused(e.status()));
        }
        if head_size(&req) > settings.max_head_bytes {
            // hyper's own buffer limit is approximate (a single read may overshoot it), so the
            // documented limit is enforced here on what was parsed.
            let status = lb_http1::Error::HeadTooLarge.status();
            return answer(acct, reply::refused(status));
        }
        let arrived = acct.arrived();
        let deadline = tokio::time::Instant::from_std(lb_proxy::deadline::deadline(
            arrived,
            settings.request_timeout,
        ));
        let capture = settings.request_log.as_ref().map(|log| {
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            Arc::new(log.capture(arrived, req.method().as_str(), pq, acct.id().as_str()))
        });
        if let Some(mut r) = proxy.local_reply(req.method().as_str(), req.uri().path()) {
            // The merged `GET /v1/models`.
            r.request_id = Some(acct.id().clone());
            return logged(&capture, acct, r);
        }
        let (parts, body) = req.into_parts();
        // A body is copied as it goes up, while it fits, to send it again after a keep-alive
        // race (see `pool`).
        let replay =
            (!hyper::body::Body::is_end_stream(&body)).then(|| Replay::new(settings.replay_buffer));
        let counter = (!hyper::body::Body::is_end_stream(&body)).then(|| acct.body_counter());
        let mut body = UpBody::new(
            body,
            capture.clone(),
            replay.clone(),
            counter,
            settings.client_body_timeout,
        );

        // Content-based routing reads at most MAX_BODY_PREFIX bytes first; they are replayed
        // to the backend before the rest of the body streams through.
        let mut prefix = None;
        if proxy.routes_by_body(parts.method.as_str(), || {
            parts
                .headers
                .get(header::CONTENT_TYPE)
                .map(HeaderValue::as_bytes)
        }) {
            let read = match tokio::time::timeout_at(
                deadline,
                Box::pin(body.read_prefix(MAX_BODY_PREFIX)),
            )
            .await
            {
                Ok(Ok(read)) => read,
                // The client stalled (408), or went away or framed its body badly (400),
                // before the body arrived.
                Ok(Err(e)) if stalled(e.as_ref()) => {
                    let r = acct.reply(ProxyError::BodyTimeout);
                    return logged(&capture, acct, r);
                }
                _ => {
                    let r = acct.reply(ProxyError::BadRequest);
                    return logged(&capture, acct, r);
                }
            };
            prefix = Some(read);
        }
        let keys = proxy.route_keys(
            prefix.as_ref().map(|(data, ended)| (&data[..], *ended)),
            |name| parts.headers.get(name).map(|v| v.as_bytes()),
        );
        let meta = keys.meta(peer.ip);
        // Boxed: a queue wait is rare, and its state would otherwise enlarge every request's
        // future.
        let mut guard = match proxy.select(&meta) {
            Ok(g) => g,
            Err(lb_core::Reject::AllAtCapacity) if settings.core.queue.enabled() => {
                match Box::pin(proxy.select_or_wait(&meta)).await {
                    Ok(g) => g,
                    Err(reject) => {
                        let r = acct.reply(ProxyError::Rejected(reject));
                        return logged(&capture, acct, r);
                    }
                }
            }
            Err(reject) => {
                let r = acct.reply(ProxyError::Rejected(reject));
                return logged(&capture, acct, r);
            }
        };
        acct.serve(&mut guard);
        let req = Request::from_parts(parts, body);
        let to = Route {
            traffic,
            peer,
            meta: &meta,
            deadline,
        };
        forward(to, guard, req, capture, replay, acct).await
    }
}

/// Where a request goes and how: the shard's backend connections, the client, the
/// routing keys (for a failover), the request deadline.
struct Route<'a> {
    traffic: Traffic,
    peer: Arc<Peer>,
    meta: &'a lb_core::RequestMeta<'a>,
    deadline: tokio::time::Instant,
}

#[allow(clippy::manual_async_fn)] // `async fn` would store the arguments twice
fn forward<'a>(
    to: Route<'a>,
    mut guard: LeaseGuard,
    mut req: Request<UpBody>,
    capture: Option<Arc<Capture>>,
    replay: Option<Arc<Replay>>,
    acct: &'a mut Account,
) -> impl Future<Output = Response<ProxyBody>> + Send + 'a {
    async move {
        // Borrowed, not moved out: moved, they would be stored twice in this future.
        let (traffic, peer, meta, deadline) = (&to.traffic, &to.peer, to.meta, to.deadline);
        let mut upstream = guard.upstream().clone();
        if let Some(c) = &capture {
            c.backend(upstream.url().clone());
        }
        let upgrade = is_upgrade(req.version(), req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let client_authority = req.uri().authority().cloned();
        let uri = match request_uri(&upstream, req.uri().path_and_query()) {
            Ok(u) => u,
            Err(_) => {
                drop(guard); // not the backend's fault: released as cancelled
                let r = acct.reply(ProxyError::BadRequest);
                return logged(&capture, acct, r);
            }
        };
        *req.uri_mut() = uri;
        // Taken from the rewritten target, a fresh allocation: a clone of the client's URI
        // would keep hyper's whole 8 KiB read buffer alive for as long as the request runs.
        let line = ReqLine {
            method: req.method().clone(),
            uri: req.uri().clone(),
        };
        // The authority of an absolute-form target wins over `Host` (RFC 9112 §3.2.2).
        let authority = client_authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        // One value for the id, on the request (unless the client's stays) and the response.
        let kept = acct.kept_client_id();
        let id = match kept {
            true => req.headers().get(&REQUEST_ID).cloned(),
            false => None,
        }
        .or_else(|| HeaderValue::from_bytes(acct.id().as_bytes()).ok());
        rewrite_request_headers(
            req.headers_mut(),
            peer,
            &upstream.ext.host,
            authority,
            upgrade,
            id.as_ref().filter(|_| !kept),
        );

        let sent = if upgrade {
            tokio::time::timeout_at(deadline, Box::pin(traffic.upgrade(&upstream.ext, req)))
                .await
                .map(|r| r.map(|resp| (resp, None)))
        } else {
            let mut tried = Vec::new();
            loop {
                let send = traffic.send(&upstream, req, replay.as_ref());
                match tokio::time::timeout_at(deadline, send).await {
                    // The backend could not be reached: the request goes to another one.
                    Ok(Err(SendError::Unreached(why, back))) => {
                        match guard.fail_over(Failure::Connect(why), &line, meta, &mut tried) {
                            Ok(next) => guard = next,
                            Err(reply) => return logged(&capture, acct, reply),
                        }
                        acct.serve(&mut guard);
                        req = *back;
                        retarget(&mut req, &upstream, guard.upstream());
                        upstream = guard.upstream().clone();
                        if let Some(c) = &capture {
                            c.backend(upstream.url().clone());
                        }
                    }
                    sent => break sent.map(|r| r.map(|(resp, c)| (resp, Some(c)))),
                }
            }
        };
        if let Some(r) = &replay {
            // The response has begun (or the exchange failed): no re-send any more.
            r.close();
        }
        let (mut resp, conn) = match sent {
            Ok(Ok(sent)) => sent,
            Ok(Err(SendError::Http(e))) if client_side(&e) => {
                // The client's request body failed (it stalled: 408; it went away mid-upload
                // or framed it badly: 400): not the backend's fault.
                drop(guard);
                let answer = if stalled(&e) {
                    ProxyError::BodyTimeout
                } else {
                    ProxyError::BadRequest
                };
                let r = acct.reply(answer);
                return logged(&capture, acct, r);
            }
            Ok(Err(e)) => {
                let failure = match &e {
                    SendError::Connect(e) => Failure::Connect(describe_connect(e.as_ref())),
                    SendError::Http(e) if e.is_parse_too_large() => Failure::Unsupported(format!(
                        "invalid response: {}",
                        lb_http1::Error::HeadTooLarge
                    )),
                    SendError::Http(e) if e.is_parse() => {
                        Failure::Invalid(format!("invalid response: {}", describe(e)))
                    }
                    SendError::Http(e) => Failure::Io(describe(e)),
                    SendError::Race(e) => Failure::Race(describe(e)),
                    SendError::Unreached(why, _) => Failure::Connect(why.clone()),
                };
                return logged(&capture, acct, guard.fail(failure, &line));
            }
            Err(_) => return logged(&capture, acct, guard.fail(Failure::Timeout, &line)),
        };
        if let Err(failure) = check_response(resp.version(), resp.headers()) {
            return logged(&capture, acct, guard.fail(failure, &line));
        }
        if fields_size(resp.headers()) > guard.proxy().settings().max_head_bytes {
            // As for requests: hyper's buffer limit is approximate; the head limit is ours.
            let why = lb_http1::Error::HeadTooLarge;
            let failure = Failure::Unsupported(format!("invalid response: {why}"));
            return logged(&capture, acct, guard.fail(failure, &line));
        }
        let status = resp.status().as_u16();
        if let Some(c) = &capture {
            c.status(status);
        }
        if let Some(ka) = resp.headers().get(&KEEP_ALIVE) {
            upstream.idle.learn(ka.as_bytes());
        }

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                // A 101 nobody asked for: the codec refuses it too.
                let why = lb_http1::Error::UnexpectedUpgrade;
                let failure = Failure::Invalid(format!("invalid response: {why}"));
                return logged(&capture, acct, guard.fail(failure, &line));
            };
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(splice(client_upgrade, backend_upgrade, guard, status));
            let (mut parts, _) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers, true);
            set_request_id(&mut parts.headers, id);
            parts.version = http::Version::HTTP_11;
            return Response::from_parts(parts, Either::Left(Full::default()));
        }

        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        set_request_id(&mut parts.headers, id);
        // A proxy sends its own version: hyper then frames the body for the client (chunks
        // for a close-delimited HTTP/1.0 answer to an HTTP/1.1 client).
        parts.version = http::Version::HTTP_11;
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
}

/// Points a request meant for `from` at `to` (a failover): its target's path prefix and
/// its `Host` are the backend's.
fn retarget(req: &mut Request<UpBody>, from: &Upstream, to: &Upstream) {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let own = pq
        .strip_prefix(from.target.path_prefix.as_str())
        .unwrap_or(pq);
    if let Ok(uri) = own
        .parse::<http::uri::PathAndQuery>()
        .map_err(http::Error::from)
        .and_then(|pq| request_uri(to, Some(&pq)))
    {
        *req.uri_mut() = uri;
    }
    req.headers_mut().insert(header::HOST, to.ext.host.clone());
}

/// A local reply, recorded in the request log and the account.
fn logged(capture: &Option<Arc<Capture>>, acct: &mut Account, reply: Reply) -> Response<ProxyBody> {
    if let Some(c) = capture {
        c.reply(&reply);
    }
    answer(acct, reply)
}

/// A local reply to the request `acct` accounts for, counted there. (Error replies carry
/// the request's id; a bare refusal of a head does not, as in the smol build.)
fn answer(acct: &mut Account, reply: Reply) -> Response<ProxyBody> {
    acct.replied(&reply);
    local(reply)
}

/// The response carries the request's id.
fn set_request_id(h: &mut HeaderMap, id: Option<HeaderValue>) {
    if let Some(v) = id {
        h.insert(&REQUEST_ID, v);
    }
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
    let json = !reply.body.is_empty();
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(reply.body))));
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).expect("replies use valid status codes");
    let h = resp.headers_mut();
    if json {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    for (name, value) in reply.headers {
        h.insert(*name, HeaderValue::from_static(value));
    }
    if let Some(id) = &reply.request_id {
        if let Ok(v) = HeaderValue::from_bytes(id.as_bytes()) {
            h.insert(&REQUEST_ID, v);
        }
    }
    resp.extensions_mut().insert(Local);
    resp
}

/// Marks a reply `lb` made itself (see [`Ends`]).
#[derive(Clone, Copy)]
struct Local;

/// What decides, once the response is known, whether the connection ends after it, and
/// says so with `Connection: close` as the smol build does (RFC 9112 §9.6), where hyper
/// would close without a word or, worse, say `keep-alive`:
/// - a reply `lb` makes itself to a request with a body: the body may not have been read
///   (a refused or failed request; a stalled or badly framed upload), so the connection
///   closes after the answer;
/// - an answer without a length to an HTTP/1.0 client that asked to keep the connection:
///   the body ends when the connection does (hyper would announce `keep-alive`).
///
/// An HTTP/1.0 client that did not ask to keep the connection needs no word.
struct Ends {
    body: bool,
    http10: bool,
    keep_alive: bool,
    head: bool,
}

impl Ends {
    fn of(req: &Request<Incoming>) -> Self {
        let http10 = req.version() == http::Version::HTTP_10;
        Ends {
            body: !hyper::body::Body::is_end_stream(req.body()),
            http10,
            keep_alive: !http10 || wants_keep_alive(req.headers()),
            head: req.method() == Method::HEAD,
        }
    }

    fn say_close(&self, resp: &mut Response<ProxyBody>) {
        // The usual request (HTTP/1.1, no body) has nothing to look at.
        if !(self.body || self.http10)
            || !self.keep_alive
            || resp.headers().contains_key(header::CONNECTION)
        {
            return;
        }
        let local = self.body && resp.extensions().get::<Local>().is_some();
        let status = resp.status();
        let bodiless = self.head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let unframed = self.http10
            && !bodiless
            && !resp.headers().contains_key(header::CONTENT_LENGTH)
            && hyper::body::Body::size_hint(resp.body()).exact().is_none();
        if local || unframed {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            if self.http10 {
                // hyper answers an HTTP/1.0 client in HTTP/1.0 whatever the version; said
                // here, it closes without adding `keep-alive` to our `close`.
                *resp.version_mut() = http::Version::HTTP_10;
            }
        }
    }
}

/// The bytes a request head took on the wire, near enough: request line and header lines.
fn head_size(req: &Request<Incoming>) -> usize {
    let uri = req.uri();
    let target = uri.authority().map_or(0, |a| a.as_str().len() + 8)
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    line + fields_size(req.headers())
}

/// The bytes the header lines of a head took on the wire, near enough.
fn fields_size(h: &HeaderMap) -> usize {
    h.iter()
        .fold(0, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
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

/// Whether the error comes from a request body that stalled (`--client-body-timeout`).
fn stalled(e: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyStalled>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A short, human description of an error on an established backend connection: the
/// innermost I/O error in plain words, else the innermost message.
pub(crate) fn describe(e: &(dyn StdError + 'static)) -> String {
    innermost(e, lb_proxy::words::io_error)
}

/// [`describe`] for an error while connecting.
pub(crate) fn describe_connect(e: &(dyn StdError + 'static)) -> String {
    innermost(e, lb_proxy::words::connect_error)
}

fn innermost(e: &(dyn StdError + 'static), words: fn(&io::Error) -> String) -> String {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    let mut last = e.to_string();
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return words(io);
        }
        last = err.to_string();
        cur = err.source();
    }
    last
}
