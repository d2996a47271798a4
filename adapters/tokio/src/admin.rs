//! The admin listener (`--admin-bind`): hyper reads each request (its body bounded by
//! `lb_proxy::admin::MAX_BODY`), the proxy layer answers it.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use lb_proxy::admin::{AdminRequest, MAX_BODY};
use tokio::net::TcpListener;

use crate::rt::Proxy;

/// Serves admin connections on `listener` until shutdown begins.
pub(crate) async fn serve(proxy: Arc<Proxy>, listener: std::net::TcpListener) {
    let Ok(listener) = TcpListener::from_std(listener) else {
        return;
    };
    let stop = proxy.clone();
    let accept = async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(proxy.clone(), req, peer));
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = stop.shutdown_begun() => {}
    }
}

async fn answer(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    client: std::net::SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(Response::builder()
                .status(413)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    br#"{"error":{"message":"admin request body over 64 KiB","type":"invalid_request_error","param":null,"code":"body_too_large"}}"#,
                )))
                .expect("a valid response"));
        }
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let r = proxy.admin(&AdminRequest {
        method: parts.method.as_str(),
        target,
        accept: parts
            .headers
            .get(http::header::ACCEPT)
            .map(|v| v.as_bytes()),
        authorization: parts
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
        client,
        body: &body,
    });
    let mut resp = Response::builder()
        .status(r.status)
        .header("content-type", r.content_type);
    for (k, v) in r.headers {
        resp = resp.header(*k, *v);
    }
    // hyper leaves the body out of an answer to HEAD (its length stays).
    Ok(resp
        .body(Full::new(Bytes::from(r.body)))
        .expect("a valid response"))
}
