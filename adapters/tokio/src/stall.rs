//! A client connection whose writes may not stall: a client that reads nothing of its
//! response for `--client-write-timeout` is cut off (its write fails with `TimedOut`), so
//! one stalled client cannot pin a connection slot, a lease and hyper's buffers. A timer
//! is made only when a write has to wait: a client that keeps reading never costs one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

pin_project_lite::pin_project! {
    pub(crate) struct WriteStall {
        #[pin]
        inner: TcpStream,
        limit: Duration,
        // Armed while a write waits; cleared by any progress.
        waiting: Option<Pin<Box<Sleep>>>,
        activity: Arc<Activity>,
    }
}

impl WriteStall {
    pub(crate) fn new(inner: TcpStream, limit: Duration, activity: Arc<Activity>) -> Self {
        WriteStall {
            inner,
            limit,
            waiting: None,
            activity,
        }
    }
}

/// Passes `polled` on, arming the stall timer while it is pending and failing it once the
/// timer fires.
fn watch<T>(
    polled: Poll<io::Result<T>>,
    waiting: &mut Option<Pin<Box<Sleep>>>,
    limit: Duration,
    activity: &Activity,
    cx: &mut Context<'_>,
) -> Poll<io::Result<T>> {
    if polled.is_ready() {
        if waiting.take().is_some() {
            activity.writing.store(false, Ordering::Release);
        }
        return polled;
    }
    let timer = waiting.get_or_insert_with(|| {
        activity.writing.store(true, Ordering::Release);
        Box::pin(tokio::time::sleep(limit))
    });
    ready!(timer.as_mut().poll(cx));
    *waiting = None;
    activity.writing.store(false, Ordering::Release);
    Poll::Ready(Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "the client read nothing for --client-write-timeout",
    )))
}

impl AsyncRead for WriteStall {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteStall {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        watch(polled, this.waiting, *this.limit, this.activity, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        watch(polled, this.waiting, *this.limit, this.activity, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let polled = this.inner.poll_flush(cx);
        watch(polled, this.waiting, *this.limit, this.activity, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// What a client connection is doing, as far as its shard's stop and the head timeout
/// need to know: how many exchanges are between their head (hyper calls the service) and
/// the end of their response body, whether a write is waiting on the client, and since
/// when none has been in progress. A connection with neither holds at most a partial head,
/// which a stop need not wait for: hyper's graceful shutdown would wait for that head until
/// `--head-timeout`.
pub(crate) struct Activity {
    exchanges: std::sync::atomic::AtomicU32,
    writing: std::sync::atomic::AtomicBool,
    /// When the last exchange ended (or the connection opened), in milliseconds after
    /// `opened`.
    idle_since: std::sync::atomic::AtomicU64,
    opened: tokio::time::Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            exchanges: Default::default(),
            writing: Default::default(),
            idle_since: Default::default(),
            opened: tokio::time::Instant::now(),
        }
    }
}

impl Activity {
    /// Marks an exchange in progress until the returned guard drops.
    pub(crate) fn begin(self: &Arc<Self>) -> Exchange {
        self.exchanges.fetch_add(1, Ordering::Relaxed);
        Exchange(self.clone())
    }

    /// No response is in progress and nothing waits to be written.
    pub(crate) fn quiet(&self) -> bool {
        self.exchanges.load(Ordering::Acquire) == 0 && !self.writing.load(Ordering::Acquire)
    }

    /// When a head that has not arrived by then is too late (`limit` after the last
    /// exchange ended, or after the connection opened), or `None` while an exchange is in
    /// progress (the next head is waited for only after it).
    pub(crate) fn head_deadline(&self, limit: Duration) -> Option<tokio::time::Instant> {
        if self.exchanges.load(Ordering::Acquire) != 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since.load(Ordering::Acquire));
        Some(self.opened + since + limit)
    }
}

/// An exchange in progress (see [`Activity`]).
pub(crate) struct Exchange(Arc<Activity>);

impl Drop for Exchange {
    fn drop(&mut self) {
        let a = &self.0;
        if a.exchanges.load(Ordering::Relaxed) == 1 {
            // The last one ends: the wait for the next head starts now. (Stored before
            // the count falls, so a head timer that sees no exchange sees this time.)
            let ms = a.opened.elapsed().as_millis() as u64;
            a.idle_since.store(ms, Ordering::Release);
        }
        a.exchanges.fetch_sub(1, Ordering::Release);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its exchange marked in progress until hyper drops it
    /// (at its end, or when the connection goes), and feeds the request's account: body
    /// bytes out, the first byte of a proxied body; the account records the request when
    /// this drops.
    pub(crate) struct Tracked<B> {
        #[pin]
        inner: B,
        exchange: Exchange,
        account: Option<lb_proxy::Account>,
        proxied: bool,
    }
}

impl<B> Tracked<B> {
    pub(crate) fn new(
        inner: B,
        exchange: Exchange,
        account: Option<lb_proxy::Account>,
        proxied: bool,
    ) -> Self {
        Tracked {
            inner,
            exchange,
            account,
            proxied,
        }
    }
}

impl<B: hyper::body::Body> hyper::body::Body for Tracked<B>
where
    B::Data: bytes::Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let (Some(a), Poll::Ready(Some(Ok(frame)))) = (this.account.as_mut(), &polled) {
            if let Some(d) = frame.data_ref() {
                let n = bytes::Buf::remaining(d) as u64;
                if n > 0 {
                    if *this.proxied {
                        a.first_byte();
                    }
                    a.bytes_out(n);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
