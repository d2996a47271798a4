//! The tokio build's side of the proxy layer: [`Tokio`], the [`Runtime`] the layer runs on
//! (tokio's timers and tasks, probes over a one-off hyper connection), and what this
//! build keeps per backend ([`Backend`]: hyper's URI and `Host` value, made once).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};
use http_body_util::{BodyExt, Empty};
use lb_proxy::{Fetched, Runtime, Settings, StartError, Target};
use tower_service::Service;

use crate::client::{self, Connector};
use crate::proxy::{describe, describe_connect};

/// The proxy layer on this build.
pub(crate) type Proxy = lb_proxy::Proxy<Tokio>;
/// A request's lease on this build.
pub(crate) type LeaseGuard = lb_proxy::LeaseGuard<Tokio>;
/// A backend on this build.
pub(crate) type Upstream = lb_proxy::Upstream<Tokio>;

/// The tokio runtime: where tasks go, and how backends are reached.
pub(crate) struct Tokio {
    handle: tokio::runtime::Handle,
    /// Each shard's pool makes its connections with a clone of this.
    pub(crate) connector: Connector,
    /// What it is made of, for backends that need their own ([`Backend::connector`]).
    parts: client::Parts,
    /// The most bytes of a response head hyper's client buffers.
    pub(crate) max_head_bytes: usize,
}

/// What this build keeps per backend.
pub(crate) struct Backend {
    /// The `Host` the backend sees, on requests and probes: its own authority.
    pub(crate) host: HeaderValue,
    /// Scheme and address (`host:port`), what a connection is made to.
    pub(crate) base: Uri,
    /// Its own connector, for a backend whose TLS name is not its host (one found by
    /// `--discover dns+https://NAME`: reached at an address, checked as NAME).
    pub(crate) connector: Option<Connector>,
}

impl Tokio {
    /// Call within the runtime the driver and probes will run on.
    pub(crate) fn new(settings: &Settings) -> Result<Self, StartError> {
        let parts = client::parts(settings)?;
        Ok(Tokio {
            handle: tokio::runtime::Handle::current(),
            connector: parts.connector(),
            parts,
            max_head_bytes: settings.max_head_bytes,
        })
    }
}

/// The request target (origin form) for `pq` on `upstream`: the URL's path prefix, then
/// the client's path and query.
pub(crate) fn request_uri(
    upstream: &Upstream,
    pq: Option<&PathAndQuery>,
) -> Result<Uri, http::Error> {
    let pq = pq.map_or("/", |p| p.as_str());
    let prefix = &upstream.target.path_prefix;
    if prefix.is_empty() {
        Uri::builder().path_and_query(pq).build()
    } else {
        Uri::builder()
            .path_and_query(format!("{prefix}{pq}"))
            .build()
    }
}

impl Runtime for Tokio {
    const NAME: &'static str = "tokio";
    type Backend = Backend;

    fn backend(&self, t: &Target) -> Result<Backend, StartError> {
        let bad = |e: &dyn std::fmt::Display| StartError::Url(format!("backend {}: {e}", t.url));
        let scheme = if t.tls { Scheme::HTTPS } else { Scheme::HTTP };
        let authority: Authority = t.authority.parse().map_err(|e| bad(&e))?;
        let address: Authority = t.connect_authority().parse().map_err(|e| bad(&e))?;
        let base = Uri::builder()
            .scheme(scheme)
            .authority(address)
            .path_and_query("/")
            .build()
            .map_err(|e| bad(&e))?;
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| bad(&e))?;
        let connector = if t.tls && t.tls_name != t.host {
            Some(self.parts.named(&t.tls_name).map_err(|e| bad(&e))?)
        } else {
            None
        };
        Ok(Backend {
            host,
            base,
            connector,
        })
    }

    fn sleep_until(&self, deadline: Instant) -> impl Future<Output = ()> + Send + 'static {
        let _entered = self.handle.enter();
        tokio::time::sleep_until(deadline.into())
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.handle.spawn(task);
    }

    fn get(
        &self,
        upstream: &Arc<Upstream>,
        path: &str,
        max_body: usize,
    ) -> impl Future<Output = Result<Fetched, String>> + Send + 'static {
        let target = format!("{}{}", upstream.target.path_prefix, path);
        let upstream = upstream.clone();
        let mut connector = self.connector.clone();
        let max_head = self.max_head_bytes;
        async move {
            let uri = Uri::builder()
                .path_and_query(target)
                .build()
                .map_err(|e| e.to_string())?;
            let req = http::Request::get(uri)
                .header(http::header::HOST, upstream.ext.host.clone())
                .header(
                    http::header::USER_AGENT,
                    concat!("lb/", env!("CARGO_PKG_VERSION"), " health-check"),
                )
                .header(http::header::CONNECTION, "close")
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            if let Some(own) = &upstream.ext.connector {
                connector = own.clone();
            }
            let io = connector
                .call(upstream.ext.base.clone())
                .await
                .map_err(|e| describe_connect(e.as_ref()))?;
            let (mut send, conn) = hyper::client::conn::http1::Builder::new()
                .max_buf_size(max_head.max(8192))
                .handshake::<_, Empty<Bytes>>(io)
                .await
                .map_err(|e| describe(&e))?;
            // The connection runs beside the exchange and ends with it (Connection: close).
            let conn = tokio::spawn(conn);
            let resp = send.send_request(req).await.map_err(|e| describe(&e));
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    conn.abort();
                    return Err(e);
                }
            };
            let mut fetched = Fetched {
                status: resp.status().as_u16(),
                ..Fetched::default()
            };
            if max_body > 0 {
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| describe(&e))?;
                    if let Some(d) = frame.data_ref() {
                        fetched.body.extend_from_slice(d);
                        if fetched.body.len() > max_body {
                            fetched.body.truncate(max_body);
                            fetched.truncated = true;
                            break;
                        }
                    }
                }
            }
            conn.abort();
            Ok(fetched)
        }
    }
}
