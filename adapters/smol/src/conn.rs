//! A client connection: request heads in (bounded by `--head-timeout`), `/health` and
//! errors answered here, everything else forwarded; kept alive until either side ends it.

use std::net::SocketAddr;
use std::sync::Arc;

use async_io::Timer;
use futures_lite::future;
use lb_core::http1::{self, BodyKind, Header, RequestHead, ResponseHead, Status, Version};
use lb_core::reply::{self, ProxyError, Reply};
use lb_core::RequestMeta;

use crate::exchange;
use crate::io::{head_read_size, linger_close, may_end_head, read_more, send};
use crate::shared::{ConnectionGuard, Shared};
use crate::stream::Stream;

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
enum Head {
    Request(RequestHead, usize),
    /// End of stream, an error, or shutdown while idle: close without a word.
    Closed,
    Bad(http1::Error),
    TimedOut,
}

/// Serves one client connection until it closes.
pub(crate) async fn serve(open: ConnectionGuard, client: Stream, peer: SocketAddr) {
    let shared = open.shared().clone();
    let mut cbuf = Vec::new();
    let mut first = true;
    loop {
        let head = read_head(&shared, &client, &mut cbuf).await;
        let req = match head {
            Head::Request(req, n) => {
                cbuf.drain(..n);
                req
            }
            Head::Closed => return,
            Head::TimedOut if cbuf.is_empty() && !first => return, // idle keep-alive
            Head::TimedOut => {
                let _ =
                    write_local(&client, &reply::error(ProxyError::HeadTimeout), false, true).await;
                return linger_close(&client).await;
            }
            Head::Bad(e) => {
                let answer = if e.status() == 431 {
                    ProxyError::HeadTooLarge
                } else {
                    ProxyError::BadRequest
                };
                let _ = write_local(&client, &reply::error(answer), false, true).await;
                return linger_close(&client).await;
            }
        };
        first = false;
        let after = handle(&shared, &client, &mut cbuf, peer, req).await;
        match after {
            After::KeepAlive => {}
            After::Close => return,
            After::Linger => return linger_close(&client).await,
            After::Gone => return,
        }
    }
}

async fn handle(
    shared: &Arc<Shared>,
    client: &Stream,
    cbuf: &mut Vec<u8>,
    peer: SocketAddr,
    req: RequestHead,
) -> After {
    // A body we do not forward is not read: the connection closes after the answer.
    let no_body = matches!(req.body_kind(), Ok(BodyKind::None | BodyKind::Length(0)));
    let local = if path(&req.target) == "/health" {
        reply::health(shared.core().summary())
    } else {
        match shared.select(&RequestMeta::from_ip(peer.ip().to_canonical())) {
            Ok(guard) => return exchange::forward(shared, client, cbuf, peer, req, guard).await,
            Err(reject) => reply::error(ProxyError::Rejected(reject)),
        }
    };
    let keep = no_body && req.keep_alive() && !shared.is_shutting_down();
    match write_reply(client, &local, &req, keep).await {
        Err(_) => After::Gone,
        Ok(()) if keep => After::KeepAlive,
        Ok(()) if no_body => After::Close,
        Ok(()) => After::Linger,
    }
}

/// Reads until a complete request head is in `cbuf` (which may already hold some), within
/// `--head-timeout`. While no byte of it has arrived, shutdown closes the connection.
async fn read_head(shared: &Shared, client: &Stream, cbuf: &mut Vec<u8>) -> Head {
    let limit = shared.limits.max_head_bytes;
    let read = async {
        let mut check = !cbuf.is_empty();
        loop {
            if check {
                match http1::parse_request(cbuf, &shared.limits) {
                    Ok(Status::Complete(req, n)) => return Head::Request(req, n),
                    Ok(Status::Partial) => {}
                    Err(e) => return Head::Bad(e),
                }
            }
            let before = cbuf.len();
            let want = head_read_size(before, limit);
            let got = if before == 0 {
                if shared.is_shutting_down() {
                    return Head::Closed;
                }
                future::or(read_more(client, cbuf, want), async {
                    shared.shutdown_begun().await;
                    Ok(0)
                })
                .await
            } else {
                read_more(client, cbuf, want).await
            };
            match got {
                Ok(0) | Err(_) => return Head::Closed,
                Ok(_) => check = may_end_head(cbuf, before) || cbuf.len() >= limit,
            }
        }
    };
    future::or(read, async {
        Timer::after(shared.settings.head_timeout).await;
        Head::TimedOut
    })
    .await
}

/// The path of a request target (origin- or absolute-form), without the query.
fn path(target: &str) -> &str {
    let origin = match target.find("://") {
        Some(i) if !target.starts_with('/') => {
            let rest = &target[i + 3..];
            rest.find('/').map_or("/", |j| &rest[j..])
        }
        _ => target,
    };
    origin.split('?').next().unwrap_or(origin)
}

/// Sends a reply the proxy makes itself, to `req`; `keep` says whether the connection
/// stays open. A `HEAD` request gets the head only.
pub(crate) async fn write_reply(
    client: &Stream,
    reply: &Reply,
    req: &RequestHead,
    keep: bool,
) -> std::io::Result<()> {
    let http10 = req.version == Version::Http10;
    write_local_head(client, reply, keep, http10, !req.is_head()).await
}

/// Sends a reply when there is no parsed request (a bad or late head).
async fn write_local(
    client: &Stream,
    reply: &Reply,
    keep: bool,
    body: bool,
) -> std::io::Result<()> {
    write_local_head(client, reply, keep, false, body).await
}

async fn write_local_head(
    client: &Stream,
    reply: &Reply,
    keep: bool,
    http10: bool,
    body: bool,
) -> std::io::Result<()> {
    let mut headers = Vec::with_capacity(4 + reply.headers.len());
    headers.push(Header::new("Content-Type", "application/json"));
    headers.push(Header::new(
        "Content-Length",
        reply.body.len().to_string().into_bytes(),
    ));
    for (name, value) in reply.headers {
        headers.push(Header::new(*name, *value));
    }
    if !keep {
        headers.push(Header::new("Connection", "close"));
    } else if http10 {
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
}
