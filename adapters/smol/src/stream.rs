//! One byte stream type for both sides: a TCP connection, or (backends only) TLS over
//! one. `&Stream` reads and writes, so one task can read and write a connection from two
//! futures at once (the request body going up while the response comes down).

use std::io;
use std::net::{Shutdown, TcpStream};
use std::pin::Pin;
use std::task::{Context, Poll};

use async_io::Async;
use futures_lite::{ready, AsyncRead, AsyncWrite};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};

pub(crate) enum Stream {
    Tcp(Async<TcpStream>),
    #[cfg(feature = "tls")]
    Tls(Box<std::sync::Mutex<futures_rustls::client::TlsStream<Async<TcpStream>>>>),
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

    /// Waits until the connection has something to read (or an error, or its end), as
    /// the reactor says: no read syscall. Use it before a read that would most likely find
    /// nothing yet, to spare that read (a `recv` answering `EAGAIN`). A TLS stream may hold
    /// decrypted bytes the socket does not show, so it is always ready.
    ///
    /// This shares the reader's waker slot (`poll_readable`, as `poll_read` uses), not
    /// `Async::readable`'s own list: that one forgets its interest when dropped, so each
    /// wait would cost an `epoll_ctl` where a read that found nothing costs none.
    pub(crate) async fn readable(&self) {
        match self {
            Stream::Tcp(s) => {
                let _ = std::future::poll_fn(|cx| s.poll_readable(cx)).await;
            }
            #[cfg(feature = "tls")]
            Stream::Tls(_) => {}
        }
    }

    /// Shuts the TCP connection down for writing, without a TLS close_notify (for a
    /// connection we give up on).
    pub(crate) fn shutdown_write(&self) {
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

impl AsyncRead for &Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match *self {
            Stream::Tcp(s) => poll_recv(s, cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                let mut guard = s.lock().unwrap_or_else(|p| p.into_inner());
                Pin::new(&mut *guard).poll_read(cx, buf)
            }
        }
    }
}

impl AsyncWrite for &Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match *self {
            Stream::Tcp(s) => poll_send(s, cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                let mut guard = s.lock().unwrap_or_else(|p| p.into_inner());
                Pin::new(&mut *guard).poll_write(cx, buf)
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match *self {
            Stream::Tcp(s) => Pin::new(&mut &*s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                let mut guard = s.lock().unwrap_or_else(|p| p.into_inner());
                Pin::new(&mut *guard).poll_flush(cx)
            }
        }
    }

    /// Flushes, then shuts the connection down for writing (TLS first sends close_notify):
    /// the peer reads end of stream.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match *self {
            Stream::Tcp(s) => {
                futures_lite::ready!(Pin::new(&mut &*s).poll_flush(cx))?;
                Poll::Ready(s.get_ref().shutdown(Shutdown::Write))
            }
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                let mut guard = s.lock().unwrap_or_else(|p| p.into_inner());
                futures_lite::ready!(Pin::new(&mut *guard).poll_close(cx))?;
                Poll::Ready(guard.get_ref().0.get_ref().shutdown(Shutdown::Write))
            }
        }
    }
}

/// Reads from a TCP stream as async-io's `poll_read` does (try, then wait for readiness),
/// with `recv` made by rustix straight to the kernel: glibc's wrappers enter and leave a
/// thread-cancellation point around every call, 2% of the proxy's CPU under load.
fn poll_recv(
    s: &Async<TcpStream>,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    loop {
        match rustix::net::recv(s.get_ref(), &mut *buf, RecvFlags::empty()) {
            Ok((n, _)) => return Poll::Ready(Ok(n)),
            Err(Errno::AGAIN) => {}
            Err(Errno::INTR) => continue,
            Err(e) => return Poll::Ready(Err(e.into())),
        }
        ready!(s.poll_readable(cx))?;
    }
}

/// Writes to a TCP stream as async-io's `poll_write` does, with rustix's `send` (see
/// [`poll_recv`]).
fn poll_send(s: &Async<TcpStream>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        match rustix::net::send(s.get_ref(), buf, SendFlags::NOSIGNAL) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(Errno::AGAIN) => {}
            Err(Errno::INTR) => continue,
            Err(e) => return Poll::Ready(Err(e.into())),
        }
        ready!(s.poll_writable(cx))?;
    }
}
