//! Runs the `lb` core on tokio and hyper.
//!
//! This crate moves bytes and time: it accepts connections, forwards requests over pooled
//! backend connections, streams bodies both ways without buffering, runs health probes
//! when the core asks for them, and feeds every outcome back. Every decision (which
//! backend, whether it is healthy, when to probe, what to report) is the core's.
//!
//! Entry point: [`run`], which blocks until SIGTERM/SIGINT and a graceful drain.
#![forbid(unsafe_code)]

mod body;
mod client;
mod driver;
mod proxy;
mod shared;

use std::io;
use std::time::Instant;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use lb_core::{Notice, NoticeSink, Settings};
use tokio::net::TcpListener;

pub use shared::StartError;

/// Runs the proxy until SIGTERM or SIGINT, then lets in-flight requests finish for up to
/// `settings.shutdown_timeout`. Returns an error only when it cannot start (bind, TLS setup).
pub fn run(settings: Settings, log: NoticeSink) -> Result<(), StartError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lb-worker")
        .build()
        .map_err(StartError::Runtime)?;
    rt.block_on(serve(settings, log))
}

async fn serve(settings: Settings, log: NoticeSink) -> Result<(), StartError> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| StartError::Bind(settings.listen, e))?;
    let shared = shared::Shared::new(settings, log.clone(), Instant::now())?;
    tokio::spawn(driver::drive(shared.clone()));
    log(Notice::Listening(
        listener
            .local_addr()
            .map_err(|e| StartError::Bind(shared.settings.listen, e))?,
    ));

    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.settings.head_timeout)
        .max_buf_size(shared.settings.max_head_bytes.max(8192))
        .keep_alive(true);
    // Every connection task holds a receiver: a send asks them to finish gracefully, and
    // `closed()` resolves once the last one is gone.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly, keep serving.
                        accept_error(&e).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let service = service_fn(move |req| proxy::handle(shared.clone(), peer, req));
                let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
                let mut stop_rx = stop_rx.clone();
                tokio::spawn(async move {
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = stop_rx.changed() => {}
                    }
                    // Finish the request in progress, then close (idle keep-alive
                    // connections close at once).
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                });
            }
            _ = &mut stop => break,
        }
    }
    drop(listener);
    shared.begin_shutdown();
    log(Notice::ShuttingDown {
        in_flight: shared.in_flight(),
    });
    let deadline = tokio::time::Instant::now() + shared.settings.shutdown_timeout;
    let _ = stop_tx.send(true);
    drop(stop_rx);
    let _ = tokio::time::timeout_at(deadline, stop_tx.closed()).await;
    let _ = tokio::time::timeout_at(deadline, shared.idle()).await;
    log(Notice::Stopped {
        abandoned: shared.in_flight(),
    });
    Ok(())
}

async fn accept_error(e: &io::Error) {
    // EMFILE/ENFILE/ENOBUFS: the listener stays readable, so sleeping avoids a hot loop.
    let _ = e;
    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
