//! The floor of a reverse proxy built on hyper 1.x and tokio: what the tokio build could reach
//! if it did nothing but move requests and responses through hyper.
//!
//! It has no balancing core, no timers, no header rewriting, no `/health`, no error replies
//! and no pool: each client connection gets one backend connection of its own (round robin
//! over the backends), opened when the client connects, and that connection is driven from
//! the client connection's task, as `lb-tokio` drives its pooled ones. Shards as in
//! `lb-tokio`: one current-thread runtime per CPU, each with its own `SO_REUSEPORT`
//! listener.
//!
//! It exists to answer one question with a measurement: whether the tokio build's throughput
//! target is within hyper's reach on a given machine. Not a product; for benchmarks only. It
//! takes the go-load-balance CLI's two flags, so `compare.sh` can run it as `OTHER_LB`, and
//! ignores `lb`'s other flags, so `tests/load/cpu_per_request.sh` can run it too.
//!
//! ```text
//! cargo build --release -p lb-tokio --example hyper_floor
//! target/release/examples/hyper_floor --backends http://127.0.0.1:18000 http://127.0.0.1:18001 --port 19000
//! OTHER_LB=target/release/examples/hyper_floor LB_CMD=... ../shared/bench/compare.sh
//! ```

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

type Upstream = (
    SendRequest<Incoming>,
    Connection<TokioIo<TcpStream>, Incoming>,
);
type Slot = Arc<Mutex<Option<Upstream>>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    let usage =
        "usage: hyper_floor --backends URL... --port PORT (URL: http://host:port or host:port)";
    let mut port: Option<u16> = None;
    let mut backends = Vec::new();
    let mut args = std::env::args().skip(1).peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()),
            "--backends" => {
                while let Some(url) = args.next_if(|a| !a.starts_with("--")) {
                    let addr = url.trim_start_matches("http://").trim_end_matches('/');
                    backends.push(addr.parse::<SocketAddr>().expect(usage));
                }
            }
            // lb's other flags (e.g. --health-check-interval 5s), so that one command line
            // runs both: accepted and ignored.
            flag if flag.starts_with("--") => {
                args.next_if(|a| !a.starts_with("--"));
            }
            _ => panic!("{usage}"),
        }
    }
    let port = port.expect(usage);
    assert!(!backends.is_empty(), "{usage}");
    let backends = Arc::new(backends);
    let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = Arc::new(AtomicUsize::new(0));
    // Binding registers the socket with a reactor; each shard re-registers it with its own.
    let binder = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let _entered = binder.enter();
    let threads: Vec<_> = (0..shards)
        .map(|_| {
            let listener = listen(port).expect("bind");
            let (backends, next) = (backends.clone(), next.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(shard(listener, backends, next));
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn listen(port: u16) -> std::io::Result<std::net::TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(4096)?.into_std()
}

async fn shard(
    listener: std::net::TcpListener,
    backends: Arc<Vec<SocketAddr>>,
    next: Arc<AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    let builder = hyper::server::conn::http1::Builder::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let backend = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
        let builder = builder.clone();
        tokio::spawn(async move {
            let Ok(up) = TcpStream::connect(backend).await else {
                return;
            };
            let _ = up.set_nodelay(true);
            let Ok(pair) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await else {
                return;
            };
            let slot: Slot = Arc::new(Mutex::new(Some(pair)));
            let service = service_fn(move |req| forward(slot.clone(), req));
            let _ = builder
                .serve_connection(TokioIo::new(client), service)
                .await;
        });
    }
}

/// Sends the request on the connection's backend connection, driving that connection from
/// this task until the response head is in; the body then drives it (see `Relay`).
async fn forward(slot: Slot, req: Request<Incoming>) -> Result<Response<Relay>, BoxError> {
    // Empty only if the previous response's connection was lost (it failed mid-body): the
    // error closes the client connection.
    let (mut send, mut conn) = slot
        .lock()
        .unwrap()
        .take()
        .ok_or("backend connection lost")?;
    // The connection first notices the previous response ended, then takes this request.
    poll_fn(|cx| {
        let _ = Pin::new(&mut conn).poll(cx);
        send.poll_ready(cx)
    })
    .await?;
    let resp = {
        let mut response = std::pin::pin!(send.send_request(req));
        poll_fn(|cx| {
            let _ = Pin::new(&mut conn).poll(cx);
            response.as_mut().poll(cx)
        })
        .await?
    };
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(
        parts,
        Relay {
            body,
            upstream: Some((send, conn)),
            slot,
        },
    ))
}

/// The backend's response body, frame by frame; gives the backend connection back to the
/// client connection when it has ended.
struct Relay {
    body: Incoming,
    upstream: Option<Upstream>,
    slot: Slot,
}

impl Relay {
    fn give_back(&mut self) {
        if let Some(up) = self.upstream.take() {
            *self.slot.lock().unwrap() = Some(up);
        }
    }
}

impl Drop for Relay {
    /// hyper drops a body that says it has ended (`Content-Length: 0`, 204, 304, HEAD)
    /// without polling it: the connection goes back all the same.
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending() {
            if let Some((_, conn)) = this.upstream.as_mut() {
                let _ = Pin::new(conn).poll(cx);
            }
            polled = Pin::new(&mut this.body).poll_frame(cx);
        }
        if matches!(polled, Poll::Ready(None)) || this.body.is_end_stream() {
            this.give_back();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
