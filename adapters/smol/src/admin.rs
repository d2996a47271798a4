//! The admin listener (`--admin-bind`): request heads read as on the proxy port (bounded by
//! `--head-timeout` and the head limit), bodies up to `lb_proxy::admin::MAX_BODY`, and the
//! answer from the proxy layer. Connections are kept alive like hyper's.

use std::sync::Arc;

use async_executor::Executor;
use lb_http1::{BodyFramer, Header, ResponseHead, Version};
use lb_proxy::admin::{AdminRequest, AdminResponse, MAX_BODY};

use crate::conn::{read_head, Head};
use crate::io::{date_now, read_more, send};
use crate::rt::Proxy;
use crate::stream::Stream;

/// Serves admin connections on `listener` (registered with shard 0's reactor) until the
/// future is dropped.
pub(crate) async fn serve(
    proxy: Arc<Proxy>,
    ex: &Executor<'static>,
    listener: std::net::TcpListener,
) {
    let reactor = &proxy.runtime().local(0).reactor;
    let Ok(listener) = reactor.register(listener) else {
        return;
    };
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            async_io::Timer::after(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok(stream) = reactor.register(stream) else {
            continue;
        };
        ex.spawn(connection(proxy.clone(), Stream::Tcp(stream), peer))
            .detach();
    }
}

async fn connection(proxy: Arc<Proxy>, client: Stream, peer: std::net::SocketAddr) {
    let mut buf = Vec::new();
    let timers = &proxy.runtime().local(0).timers;
    let mut idle = false;
    loop {
        let req = match read_head(&proxy, timers, &client, &mut buf, idle).await {
            Head::Request(req, n) => {
                buf.drain(..n);
                req
            }
            Head::Bad(e) => {
                let r = status_only(e.status());
                let _ = write(&client, &r, false, true).await;
                return;
            }
            Head::Closed | Head::TimedOut => return,
        };
        idle = true;
        let Ok(kind) = req.body_kind() else {
            let _ = write(&client, &status_only(400), false, true).await;
            return;
        };
        let mut framer = BodyFramer::new(kind);
        let mut body = Vec::new();
        loop {
            let Ok(p) = framer.push(&buf) else {
                let _ = write(&client, &status_only(400), false, true).await;
                return;
            };
            body.extend_from_slice(&buf[..p.consumed]);
            buf.drain(..p.consumed);
            if p.done {
                break;
            }
            if body.len() > MAX_BODY {
                let _ = write(&client, &status_only(413), false, true).await;
                return;
            }
            match read_more(&client, &mut buf, 16 * 1024).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        // Chunked bodies arrive framed; the admin routes take JSON documents, which a
        // client sends with a length.
        let r = proxy.admin(&AdminRequest {
            method: &req.method,
            target: &req.target,
            accept: req.header("accept"),
            authorization: req.header("authorization"),
            client: peer,
            body: &body,
        });
        let keep = req.keep_alive() && !proxy.is_shutting_down();
        if write(&client, &r, keep, !req.is_head()).await.is_err() || !keep {
            return;
        }
    }
}

fn status_only(status: u16) -> AdminResponse {
    AdminResponse {
        status,
        content_type: "application/json",
        headers: &[],
        body: String::new(),
    }
}

async fn write(client: &Stream, r: &AdminResponse, keep: bool, body: bool) -> std::io::Result<()> {
    let mut headers = vec![
        Header::new("Content-Type", r.content_type),
        Header::new("Content-Length", r.body.len().to_string().into_bytes()),
        Header::new("Date", date_now()),
    ];
    for (k, v) in r.headers {
        headers.push(Header::new(*k, *v));
    }
    if !keep {
        headers.push(Header::new("Connection", "close"));
    }
    let head = ResponseHead {
        version: Version::Http11,
        status: r.status,
        reason: String::new(),
        headers,
    };
    let mut out = Vec::with_capacity(256 + r.body.len());
    head.write(&mut out);
    if body {
        out.extend_from_slice(r.body.as_bytes());
    }
    send(client, &out).await
}
