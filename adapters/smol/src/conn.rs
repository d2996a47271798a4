//! A client connection: request heads in (bounded by `--head-timeout`), `/health` and
//! errors answered here, routing keys taken (from the body's first part when routing by
//! content), a backend selected (or waited for in the admission queue), everything else
//! forwarded; kept alive until either side ends it.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use futures_lite::future;
use lb_core::affinity::MAX_BODY_PREFIX;
use lb_http1::{BodyFramer, BodyKind, Header, RequestHead, ResponseHead, Status, Version};
use lb_proxy::reply::{self, ProxyError, Reply};
use lb_proxy::{Arrival, ConnectionGuard};

use crate::exchange;
use crate::io::{
    date_now, head_read_size, linger_close, may_end_head, read_more, readable, send, watch, Budget,
    Client, ReadSize, Stall,
};
use crate::pump::WATCH_CAP;
use crate::reqlog::Dechunk;
use crate::rt::{Proxy, Shard, Smol};
use crate::stream::{Stream, Wire};
use crate::timers::Timers;

/// What the client connection does after an exchange.
pub(crate) enum After {
    /// Read the next request.
    KeepAlive,
    /// Close: everything the client sent was read.
    Close,
    /// Close, but the client may still be sending (a body we did not read): linger so
    /// that our answer is not lost to a reset.
    Linger,
    /// The connection is unusable (the client left, or a response was cut): drop it.
    Gone,
}

/// How waiting for a request head ended.
pub(crate) enum Head {
    Request(RequestHead, usize),
    /// End of stream, an error, or shutdown while idle: close without a word.
    Closed,
    Bad(lb_http1::Error),
    TimedOut,
}

/// Serves one client connection of shard `shard` until it closes.
pub(crate) async fn serve(
    open: ConnectionGuard<Smol>,
    shard: usize,
    client: Stream,
    peer: SocketAddr,
) {
    let proxy = open.proxy().clone();
    serve_on(open, proxy.runtime().local(shard), client, peer).await
}

/// Serves one client connection on `local` until it closes: [`serve`], over any
/// [`Shard`] and client [`Wire`] (in memory for tests and fuzzing).
pub(crate) async fn serve_on<S: Shard, C: Wire>(
    open: ConnectionGuard<Smol>,
    local: &S,
    client: C,
    peer: SocketAddr,
) {
    let proxy = open.proxy().clone();
    let timers = local.timers();
    let writes = Stall {
        timers,
        limit: proxy.settings().client_write_timeout,
    };
    let client = Client::new(client, writes);
    let mut cbuf = Vec::new();
    let mut first = true;
    loop {
        let head = read_head(&proxy, timers, &client, &mut cbuf, !first).await;
        let req = match head {
            Head::Request(req, n) => {
                cbuf.drain(..n);
                req
            }
            Head::Closed => return,
            Head::TimedOut if cbuf.is_empty() && !first => return, // idle keep-alive
            Head::TimedOut => {
                proxy.metrics().refused(408);
                let _ =
                    write_local(&client, &reply::error(ProxyError::HeadTimeout), false, true).await;
                return linger_close(&client, timers).await;
            }
            Head::Bad(e) => {
                proxy.metrics().refused(e.status());
                let _ = write_local(&client, &reply::refused(e.status()), false, true).await;
                return linger_close(&client, timers).await;
            }
        };
        first = false;
        let after = handle(&proxy, local, &client, &mut cbuf, peer, req).await;
        match after {
            After::KeepAlive => {}
            After::Close => return,
            After::Linger => return linger_close(&client, timers).await,
            After::Gone => return,
        }
    }
}

/// One request: `/health` answered here; else routing keys (from the body's first part
/// when routing by content), a backend from the core (or a wait in its admission queue),
/// and the exchange. Every request but `/health` gets a request-log capture when
/// `--log-to` is set.
async fn handle<S: Shard, C: Wire>(
    proxy: &Arc<Proxy>,
    local: &S,
    client: &C,
    cbuf: &mut Vec<u8>,
    peer: SocketAddr,
    mut req: RequestHead,
) -> After {
    let target_path = path(&req.target);
    if target_path == "/health" {
        return answer(proxy, client, &req, &proxy.health()).await;
    }
    let settings = proxy.settings();
    let arrived = Instant::now();
    let mut acct = proxy.account(&Arrival {
        at: arrived,
        client: peer,
        method: &req.method,
        target: &req.target,
        version: if req.version == Version::Http10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        },
        header: &|name| req.header(name),
    });
    if acct.replaced_client_id() {
        // Replaced by ours (added when the head is written for the backend).
        req.headers.retain(|h| !h.is(lb_proxy::request_id::HEADER));
    }
    let deadline = lb_proxy::deadline::deadline(arrived, settings.request_timeout);
    let capture = settings.request_log.as_ref().map(|log| {
        let pq = path_and_query(&req.target);
        log.capture(arrived, &req.method, pq, acct.id().as_str())
    });
    if let Some(mut local) = proxy.local_reply(&req.method, target_path) {
        // The merged `GET /v1/models`.
        local.request_id = Some(acct.id().clone());
        acct.replied(&local);
        if let Some(c) = &capture {
            c.reply(&local);
        }
        return answer(proxy, client, &req, &local).await;
    }

    // Content-based routing reads at most MAX_BODY_PREFIX body bytes first (into `cbuf`,
    // from where they are forwarded); the rest streams through as usual.
    let mut prefix = None;
    if proxy.routes_by_body(&req.method, || req.header("content-type")) {
        let stall = Stall {
            timers: local.timers(),
            limit: settings.client_body_timeout,
        };
        let read = future::or(read_prefix(client, cbuf, &mut req, stall), async {
            local.timers().at(deadline).await;
            Err(ProxyError::BadRequest)
        });
        let read = match read.await {
            Ok(read) => read,
            Err(answer) => {
                // The client stalled (408), or stopped sending, went away or framed its
                // body badly (400), before the body arrived.
                let local = acct.reply(answer);
                if let Some(c) = &capture {
                    c.reply(&local);
                }
                return match write_reply(client, &local, &req, false).await {
                    Ok(()) => After::Linger,
                    Err(_) => After::Gone,
                };
            }
        };
        prefix = Some(read);
    }
    let keys = proxy.route_keys(
        prefix.as_ref().map(|(data, ended)| (&data[..], *ended)),
        |name| req.header(name),
    );
    let meta = keys.meta(lb_proxy::client_ip(peer.ip()));
    // A wait in the queue gives its place up if the client leaves meanwhile.
    let selected = future::or(async { Some(proxy.select_or_wait(&meta).await) }, async {
        watch(client, cbuf, WATCH_CAP).await;
        None
    });
    let local = match selected.await {
        None => return After::Gone,
        Some(Ok(mut guard)) => {
            acct.serve(&mut guard);
            return exchange::forward(
                local, client, cbuf, peer, req, &meta, guard, deadline, capture, &mut acct,
            )
            .await;
        }
        Some(Err(reject)) => acct.reply(ProxyError::Rejected(reject)),
    };
    if let Some(c) = &capture {
        c.reply(&local);
    }
    answer(proxy, client, &req, &local).await
}

/// Reads the request body into `cbuf` (after what it holds) until the body ends or
/// [`MAX_BODY_PREFIX`] bytes of it (as read, framing included) are here; returns the data
/// and whether the body ended within it. `Err` is the answer: the client left or framed
/// its body badly (400), or it stalled (408). A client that waits for `100 Continue` gets
/// it first (and the backend is not asked again).
async fn read_prefix<'b, C: Wire>(
    client: &C,
    cbuf: &'b mut Vec<u8>,
    req: &mut RequestHead,
    stall: Stall<'_>,
) -> Result<(Cow<'b, [u8]>, bool), ProxyError> {
    let bad = |_| ProxyError::BadRequest;
    let kind = req.body_kind().map_err(bad)?;
    let mut framer = BodyFramer::new(kind);
    let mut chunks = matches!(kind, BodyKind::Chunked).then(|| (Dechunk::default(), Vec::new()));
    let mut consumed = 0;
    let mut size = ReadSize::new();
    let mut budget = Budget::new();
    let mut first = true;
    loop {
        let p = framer.push(&cbuf[consumed..]).map_err(bad)?;
        let wire = &cbuf[consumed..consumed + p.consumed];
        consumed += p.consumed;
        let held = match &mut chunks {
            Some((dechunk, data)) => {
                dechunk.feed(wire, |d| data.extend_from_slice(d));
                data.len()
            }
            None => consumed,
        };
        // Bounded in bytes read off the socket, not only in data: chunk framing (and its
        // extensions) take room too.
        if p.done || held >= MAX_BODY_PREFIX || consumed >= MAX_BODY_PREFIX {
            break;
        }
        if first && req.expects_continue() {
            send(client, b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(|_| ProxyError::BadRequest)?;
            req.headers.retain(|h| !h.is("expect"));
        }
        first = false;
        match stall
            .within(read_more(client, &mut *cbuf, size.get()))
            .await
        {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(ProxyError::BodyTimeout)
            }
            Ok(0) | Err(_) => return Err(ProxyError::BadRequest),
            Ok(n) => {
                size.record(n);
                budget.spend(n).await;
            }
        }
    }
    let ended = framer.is_done();
    Ok(match chunks {
        Some((_, data)) => (Cow::Owned(data), ended),
        None => (Cow::Borrowed(&cbuf[..consumed]), ended),
    })
}

/// Sends a reply the proxy made itself; the connection carries on only if the request
/// had no body (a body we do not forward is not read: the connection closes after the
/// answer).
async fn answer<C: Wire>(proxy: &Proxy, client: &C, req: &RequestHead, local: &Reply) -> After {
    let no_body = matches!(req.body_kind(), Ok(BodyKind::None | BodyKind::Length(0)));
    let keep = no_body && req.keep_alive() && !proxy.is_shutting_down();
    match write_reply(client, local, req, keep).await {
        Err(_) => After::Gone,
        Ok(()) if keep => After::KeepAlive,
        Ok(()) if no_body => After::Close,
        Ok(()) => After::Linger,
    }
}

/// Reads until a complete request head is in `cbuf` (which may already hold some), within
/// `--head-timeout`. While no byte of it has arrived, shutdown closes the connection.
/// `idle`: the connection has just answered a request, so the next one is most likely not
/// here yet; wait until the socket is readable before reading (sparing a read that would
/// find nothing).
pub(crate) async fn read_head<C: Wire>(
    proxy: &Proxy,
    timers: &Timers,
    client: &C,
    cbuf: &mut Vec<u8>,
    idle: bool,
) -> Head {
    let limits = &proxy.runtime().limits;
    let limit = limits.max_head_bytes;
    let read = async {
        let mut check = !cbuf.is_empty();
        let mut size = ReadSize::new();
        loop {
            if check {
                match lb_http1::parse_request(cbuf, limits) {
                    Ok(Status::Complete(req, n)) => return Head::Request(req, n),
                    Ok(Status::Partial) => {}
                    Err(e) => return Head::Bad(e),
                }
            }
            let before = cbuf.len();
            let want = head_read_size(before, limit, &size);
            let got = if before == 0 {
                if proxy.is_shutting_down() {
                    return Head::Closed;
                }
                let read = async {
                    if idle {
                        readable(client).await;
                    }
                    read_more(client, cbuf, want).await
                };
                future::or(read, async {
                    proxy.shutdown_begun().await;
                    Ok(0)
                })
                .await
            } else {
                // Part of a head is here: at shutdown it is not waited for.
                future::or(read_more(client, cbuf, want), async {
                    proxy.shutdown_begun().await;
                    Ok(0)
                })
                .await
            };
            match got {
                Ok(0) | Err(_) => return Head::Closed,
                Ok(n) => {
                    size.record(n);
                    check = may_end_head(cbuf, before) || cbuf.len() >= limit;
                    if !check && lb_http1::cannot_start_request(cbuf) {
                        return Head::Bad(lb_http1::Error::InvalidRequestLine);
                    }
                }
            }
        }
    };
    future::or(read, async {
        timers.after(proxy.settings().head_timeout).await;
        Head::TimedOut
    })
    .await
}

/// The path of a request target (origin- or absolute-form), without the query.
fn path(target: &str) -> &str {
    // Origin form, the usual case, first: no search for a scheme.
    let absolute = !target.starts_with('/');
    let origin = match absolute.then(|| target.find("://")).flatten() {
        Some(i) => {
            let rest = &target[i + 3..];
            rest.find('/').map_or("/", |j| &rest[j..])
        }
        _ => target,
    };
    origin.split('?').next().unwrap_or(origin)
}

/// The path and query of a request target, as the request log shows it: an absolute-form
/// target without its scheme and authority.
fn path_and_query(target: &str) -> &str {
    match target.find("://") {
        Some(i) if !target.starts_with('/') => {
            let rest = &target[i + 3..];
            rest.find(['/', '?']).map_or("/", |j| &rest[j..])
        }
        _ => target,
    }
}

/// Sends a reply the proxy makes itself, to `req`; `keep` says whether the connection
/// stays open. A `HEAD` request gets the head only.
pub(crate) async fn write_reply<C: Wire>(
    client: &C,
    reply: &Reply,
    req: &RequestHead,
    keep: bool,
) -> std::io::Result<()> {
    let http10 = req.version == Version::Http10;
    // An HTTP/1.0 client that did not ask to keep the connection needs no word.
    let say_close = !keep && (!http10 || req.keep_alive());
    write_local_head(client, reply, keep, say_close, http10, !req.is_head()).await
}

/// Sends a reply when there is no parsed request (a bad or late head).
async fn write_local<C: Wire>(
    client: &C,
    reply: &Reply,
    keep: bool,
    body: bool,
) -> std::io::Result<()> {
    write_local_head(client, reply, keep, !keep, false, body).await
}

async fn write_local_head<C: Wire>(
    client: &C,
    reply: &Reply,
    keep: bool,
    say_close: bool,
    http10: bool,
    body: bool,
) -> std::io::Result<()> {
    let mut headers = Vec::with_capacity(5 + reply.headers.len());
    if !reply.body.is_empty() {
        headers.push(Header::new("Content-Type", "application/json"));
    }
    headers.push(Header::new(
        "Content-Length",
        reply.body.len().to_string().into_bytes(),
    ));
    let mut closing = false;
    for (name, value) in reply.headers {
        closing |= name.eq_ignore_ascii_case("connection");
        headers.push(Header::new(*name, *value));
    }
    headers.push(Header::new("Date", date_now()));
    if let Some(id) = &reply.request_id {
        headers.push(Header::new("X-Request-Id", id.as_bytes()));
    }
    if say_close && !closing {
        headers.push(Header::new("Connection", "close"));
    } else if keep && http10 {
        headers.push(Header::new("Connection", "keep-alive"));
    }
    let head = ResponseHead {
        version: Version::Http11,
        status: reply.status,
        reason: reason(reply.status).into(),
        headers,
    };
    let mut out = Vec::with_capacity(256 + reply.body.len());
    head.write(&mut out);
    if body {
        out.extend_from_slice(reply.body.as_bytes());
    }
    send(client, &out).await
}

/// The reason phrase of the statuses the proxy answers by itself.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        408 => "Request Timeout",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::path;

    #[test]
    fn paths() {
        assert_eq!(path("/health"), "/health");
        assert_eq!(path("/health?x=1"), "/health");
        assert_eq!(path("http://h:1/health?y"), "/health");
        assert_eq!(path("http://h:1"), "/");
        assert_eq!(path("/a://b"), "/a://b");
        assert_eq!(path("*"), "*");
    }

    #[test]
    fn paths_and_queries() {
        use super::path_and_query;
        assert_eq!(path_and_query("/v1/x?a=1"), "/v1/x?a=1");
        assert_eq!(path_and_query("http://h:1/v1?a"), "/v1?a");
        assert_eq!(path_and_query("http://h:1"), "/");
        assert_eq!(path_and_query("*"), "*");
    }
}
