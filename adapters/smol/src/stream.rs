//! The byte streams of the request path: [`Wire`], what it needs of one, and [`Stream`],
//! the one type for both sides of a real connection: TCP, or (backends only) TLS over
//! it.
//!
//! A `Wire` reads and writes through a shared reference, so one task can read and write a
//! connection from two futures at once (the request body going up while the response
//! comes down). The request path (`conn`, `exchange`, `pump`, `io`) is generic over it:
//! monomorphised for `Stream` in the server, and for the in-memory streams of
//! `memory` (the `memory` feature) in tests and the `proxy_path` fuzz target.

use std::io;
use std::net::{Shutdown, TcpStream};
#[cfg(feature = "tls")]
use std::pin::Pin;
use std::task::{Context, Poll};

#[cfg(feature = "tls")]
use futures_lite::{AsyncRead, AsyncWrite};

use crate::reactor::Io;

/// A connection as the request path uses it. The `poll_*` methods are those of
/// futures-lite's `AsyncRead` and `AsyncWrite`, through `&self`; `io` has their futures
/// (`read_more`, `send`, ...).
pub(crate) trait Wire {
    /// Reads into `buf`; `Ok(0)` at end of stream.
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;

    /// Writes some of `buf`.
    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>>;

    /// Flushes what was written (a TLS record).
    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Flushes, then shuts the connection down for writing (TLS first sends
    /// close_notify): the peer reads end of stream.
    fn poll_close(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Ready when the connection may have something to read (or an error, or its end),
    /// without reading.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()>;

    /// Shuts the connection down for writing at once, without a goodbye (for a connection
    /// we give up on).
    fn shutdown_write(&self);

    /// Writes all of `data`, one message (or one part of a body): `io::send`. A client
    /// connection (`io::Client`) keeps its messages whole and in order.
    fn send(&self, data: &[u8]) -> impl std::future::Future<Output = io::Result<()>> {
        crate::io::write_all(self, data, 0)
    }
}

pub(crate) enum Stream {
    Tcp(Io<TcpStream>),
    #[cfg(feature = "tls")]
    Tls(Box<std::sync::Mutex<futures_rustls::client::TlsStream<Io<TcpStream>>>>),
}

impl Stream {
    /// Whether an idle connection can no longer carry a request: the peer closed it, reset
    /// it, or sent bytes nobody asked for. Never blocks.
    pub(crate) fn is_stale(&self) -> bool {
        let mut byte = [0u8; 1];
        let peeked = match self {
            Stream::Tcp(s) => s.get_ref().peek(&mut byte),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                let guard = s.lock().unwrap_or_else(|p| p.into_inner());
                guard.get_ref().0.get_ref().peek(&mut byte)
            }
        };
        !matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Whether an idle connection certainly still works: its last read emptied it and the
    /// reactor has seen nothing since (see `reactor::Io::is_quiet`). `false` means "look"
    /// ([`Stream::is_stale`]), not "closed". A TLS stream is never known quiet.
    pub(crate) fn is_quiet(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_quiet(),
            #[cfg(feature = "tls")]
            Stream::Tls(_) => false,
        }
    }
}

impl Wire for Stream {
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(s) => s.poll_recv(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                let mut guard = s.lock().unwrap_or_else(|p| p.into_inner());
                Pin::new(&mut *guard).poll_read(cx, buf)
            }
        }
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(s) => s.poll_send(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                let mut guard = s.lock().unwrap_or_else(|p| p.into_inner());
                Pin::new(&mut *guard).poll_write(cx, buf)
            }
        }
    }

    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(_) => Poll::Ready(Ok(())),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                let mut guard = s.lock().unwrap_or_else(|p| p.into_inner());
                Pin::new(&mut *guard).poll_flush(cx)
            }
        }
    }

    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    fn poll_close(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => Poll::Ready(s.get_ref().shutdown(Shutdown::Write)),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                let mut guard = s.lock().unwrap_or_else(|p| p.into_inner());
                futures_lite::ready!(Pin::new(&mut *guard).poll_close(cx))?;
                Poll::Ready(guard.get_ref().0.get_ref().shutdown(Shutdown::Write))
            }
        }
    }

    /// At once, unless its last read found it empty and no event came since (see
    /// `reactor`). A TLS stream may hold decrypted bytes the socket does not show, so it
    /// is always ready.
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Stream::Tcp(s) => s.poll_readable(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(_) => Poll::Ready(()),
        }
    }

    /// Shuts the TCP connection down for writing, without a TLS close_notify (for a
    /// connection we give up on).
    fn shutdown_write(&self) {
        match self {
            Stream::Tcp(s) => {
                let _ = s.get_ref().shutdown(Shutdown::Write);
            }
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                let guard = s.lock().unwrap_or_else(|p| p.into_inner());
                let _ = guard.get_ref().0.get_ref().shutdown(Shutdown::Write);
            }
        }
    }
}
