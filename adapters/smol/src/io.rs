//! Byte-moving helpers over any [`Wire`]: cancel-safe buffered reads, writes, the upgrade
//! splice, and a lingering close. No HTTP here.

use std::future::{pending, poll_fn};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_lite::future;

use crate::stream::Wire;
use crate::timers::Timers;

/// Now as an HTTP-date, for the `Date` of the responses `lb` makes or passes on without
/// one.
pub(crate) fn date_now() -> [u8; lb_http1::HTTP_DATE_LEN] {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    lb_http1::http_date(secs)
}

/// Most bytes moved per read while streaming a body or a tunnel: the most buffered per
/// direction, whatever the size of the body.
pub(crate) const CHUNK: usize = 32 * 1024;

/// First read size for a head, and for a body; doubled while reads fill it.
const FIRST_READ: usize = 2 * 1024;

/// The read size for a stream of body bytes: small for small messages and server-sent
/// events (a thousand open streams stay cheap), doubling up to [`CHUNK`] while reads fill
/// it (bulk transfers).
pub(crate) struct ReadSize(usize);

impl ReadSize {
    pub(crate) fn new() -> Self {
        ReadSize(FIRST_READ)
    }

    pub(crate) fn get(&self) -> usize {
        self.0
    }

    /// Records that a read of `self.get()` bytes returned `n`.
    pub(crate) fn record(&mut self, n: usize) {
        if n == self.0 {
            self.0 = (self.0 * 2).min(CHUNK);
        }
    }
}

/// Reads once from `r`, appending at most `max` bytes to `buf`; returns how many (0 at
/// end of stream). Cancel-safe: `buf` only ever holds bytes that were actually read.
///
/// A read of at most [`FIRST_READ`] bytes into a buffer without room for them goes
/// through the stack: a read that finds nothing (a connection waiting for its peer: a
/// backend working on a long request, a client between requests) then holds no heap,
/// and the buffer grows by what arrived, not by what might have. With a thousand slow
/// requests in flight this is 2 KiB each on both sides.
pub(crate) async fn read_more<R: Wire + ?Sized>(
    r: &R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<usize> {
    poll_fn(|cx| {
        let old = buf.len();
        if max <= FIRST_READ && buf.capacity() - old < max {
            let mut tmp = [0u8; FIRST_READ];
            let res = r.poll_read(cx, &mut tmp[..max]);
            if let Poll::Ready(Ok(n)) = res {
                buf.extend_from_slice(&tmp[..n]);
            }
            return res;
        }
        buf.resize(old + max, 0);
        let res = r.poll_read(cx, &mut buf[old..]);
        let n = match res {
            Poll::Ready(Ok(n)) => n,
            _ => 0,
        };
        buf.truncate(old + n);
        res
    })
    .await
}

/// Lets other tasks run now and then during a long transfer: the executor does not
/// preempt, and a socket that is always ready would otherwise keep one task running (and
/// `/health` waiting) for a whole 100 MiB body.
pub(crate) struct Budget(usize);

impl Budget {
    /// Bytes moved between two yields.
    const BYTES: usize = 256 * 1024;

    pub(crate) fn new() -> Self {
        Budget(0)
    }

    /// Counts `n` bytes moved; yields once the budget is spent.
    pub(crate) async fn spend(&mut self, n: usize) {
        self.0 += n;
        if self.0 >= Self::BYTES {
            self.0 = 0;
            future::yield_now().await;
        }
    }
}

/// How much to read next while a head of `held` bytes is incomplete, given the limit:
/// `size` (small at first, as most heads are small; doubling while reads fill it), and up
/// to one byte past the limit so that an oversized head is detected.
///
/// Not more because the head is long: each read costs as many bytes zeroed as it asks
/// for, so a head that trickles in a byte per read would cost time quadratic in its
/// length (to 2 GiB zeroed for a 64 KiB head).
pub(crate) fn head_read_size(held: usize, limit: usize, size: &ReadSize) -> usize {
    size.get().min(limit.saturating_sub(held) + 1).max(1)
}

/// Whether the bytes from `from` on (with the 3 before) may end a head: a blank line, in
/// CRLF or bare-LF form ([`lb_http1::may_end_head`]). Parsing is retried only then, so a
/// head trickled in byte by byte costs linear time, not quadratic.
pub(crate) fn may_end_head(buf: &[u8], from: usize) -> bool {
    lb_http1::may_end_head(buf, from)
}

/// Waits until `s` may have something to read (see [`Wire::poll_readable`]).
pub(crate) async fn readable<S: Wire + ?Sized>(s: &S) {
    poll_fn(|cx| s.poll_readable(cx)).await
}

/// Writes all of `data` after its first `written` bytes (without a flush).
pub(crate) async fn write_all<W: Wire + ?Sized>(
    w: &W,
    data: &[u8],
    mut written: usize,
) -> io::Result<()> {
    write_all_counted(w, data, &mut written).await
}

/// Writes all of `data` (without a flush), counting in `written` the bytes that reached
/// the socket.
async fn write_all_counted<W: Wire + ?Sized>(
    w: &W,
    data: &[u8],
    written: &mut usize,
) -> io::Result<()> {
    while *written < data.len() {
        match poll_fn(|cx| w.poll_write(cx, &data[*written..])).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => *written += n,
        }
    }
    Ok(())
}

/// Writes all of `data`, counting in `written` the bytes that reached the socket (so a
/// caller knows whether a failed write sent anything).
pub(crate) async fn write_counted<W: Wire + ?Sized>(
    w: &W,
    data: &[u8],
    written: &mut usize,
) -> io::Result<()> {
    write_all_counted(w, data, written).await?;
    poll_fn(|cx| w.poll_flush(cx)).await
}

/// The longest one read or write with a client may wait (`--client-body-timeout`,
/// `--client-write-timeout`), on the shard's timers.
#[derive(Clone, Copy)]
pub(crate) struct Stall<'a> {
    pub(crate) timers: &'a Timers,
    pub(crate) limit: Duration,
}

impl Stall<'_> {
    /// Runs `io`, giving up with `TimedOut` when it waits longer than the limit. The timer
    /// is made only when `io` has to wait at all: reads and writes that go through at once
    /// cost none.
    pub(crate) async fn within<T>(
        self,
        io: impl std::future::Future<Output = io::Result<T>>,
    ) -> io::Result<T> {
        let mut io = std::pin::pin!(io);
        if let Some(done) = future::poll_once(io.as_mut()).await {
            return done;
        }
        future::or(io, async {
            self.timers.after(self.limit).await;
            Err(io::ErrorKind::TimedOut.into())
        })
        .await
    }
}

/// Writes all of `data` to `s`, as one message ([`Wire::send`]).
pub(crate) async fn send<S: Wire + ?Sized>(s: &S, data: &[u8]) -> io::Result<()> {
    s.send(data).await
}

/// A client connection: its stream, to which the proxy's messages (response heads and
/// body parts, interim heads, its own replies) go out whole, one at a time, each within
/// `--client-write-timeout`.
///
/// A client that takes nothing of a message for that long is gone (its message is cut),
/// whichever message it is: a response body's part, or a reply the proxy made itself (a
/// client that pipelines requests and reads none of the answers cannot hold its
/// connection open).
///
/// More than one future writes to a client: the upload's `100 Continue` while a response
/// head comes down, an interim head forwarded while the deadline runs, an error reply
/// once the deadline has cut a write. So [`Wire::send`] waits for the message being
/// written to end before it starts another (none interleave), and once a message was cut
/// (its future dropped partway, or its write failed) it writes nothing more and fails:
/// the stream is broken, the connection can only close. (Which a client would otherwise
/// read as `HHTTP/1.1 400 ...`: the first byte of a cut `100 Continue`, then the reply.)
///
/// The rest goes straight to the stream: reads, and the tunnel's copy after the last
/// message (its own future is the only one left).
pub(crate) struct Client<'a, C> {
    wire: C,
    /// `--client-write-timeout`.
    stall: Stall<'a>,
    /// A message is being written.
    busy: AtomicBool,
    /// A message was cut.
    cut: AtomicBool,
    /// The writer waiting for its turn.
    waiting: Mutex<Option<Waker>>,
}

impl<'a, C: Wire> Client<'a, C> {
    pub(crate) fn new(wire: C, stall: Stall<'a>) -> Self {
        Client {
            wire,
            stall,
            busy: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            waiting: Mutex::new(None),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ready with the turn to write a message, or the error once the stream is broken.
    fn poll_turn(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.cut.load(Ordering::Acquire) {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if !self.busy.swap(true, Ordering::AcqRel) {
                return Poll::Ready(Ok(()));
            }
            *self.waiting() = Some(cx.waker().clone());
            if self.busy.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
    }

    async fn message(&self, data: &[u8]) -> io::Result<()> {
        let message = async {
            poll_fn(|cx| self.poll_turn(cx)).await?;
            let mut turn = Turn {
                client: self,
                whole: false,
            };
            let wrote = write_all(&self.wire, data, 0).await;
            turn.whole = wrote.is_ok();
            wrote
        };
        self.stall.within(message).await
    }
}

/// A message's turn: ends with its future, cutting the stream unless the message went
/// out whole.
struct Turn<'a, 'b, C> {
    client: &'a Client<'b, C>,
    whole: bool,
}

impl<C> Drop for Turn<'_, '_, C> {
    fn drop(&mut self) {
        let c = self.client;
        if !self.whole {
            c.cut.store(true, Ordering::Release);
        }
        c.busy.store(false, Ordering::Release);
        let waiting = c.waiting.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = waiting {
            w.wake();
        }
    }
}

impl<C: Wire> Wire for Client<'_, C> {
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self.wire.poll_read(cx, buf)
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.wire.poll_write(cx, buf)
    }

    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.wire.poll_flush(cx)
    }

    fn poll_close(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.wire.poll_close(cx)
    }

    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.wire.poll_readable(cx)
    }

    fn shutdown_write(&self) {
        self.wire.shutdown_write();
    }

    fn send(&self, data: &[u8]) -> impl std::future::Future<Output = io::Result<()>> {
        self.message(data)
    }
}

/// Reads from the client while nothing else does (waiting for the backend), keeping what
/// arrives (a pipelined request, early tunnel bytes) up to `cap` bytes. Resolves when the
/// client closes or fails: it went away. It reads only once the reactor says there is
/// something: a client that waits for its answer costs no read.
pub(crate) async fn watch<S: Wire + ?Sized>(s: &S, buf: &mut Vec<u8>, cap: usize) {
    loop {
        if buf.len() >= cap {
            // Enough buffered; stop reading (the client waits for our answer anyway).
            pending::<()>().await;
        }
        readable(s).await;
        match read_more(s, buf, 1024.min(cap - buf.len())).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Copies `from` to `to` until `from` ends, then shuts `to` down for writing.
async fn copy_half<R, W>(from: &R, to: &W) -> io::Result<()>
where
    R: Wire + ?Sized,
    W: Wire + ?Sized,
{
    let mut buf = Vec::new();
    let mut size = ReadSize::new();
    let mut budget = Budget::new();
    loop {
        buf.clear();
        let n = read_more(from, &mut buf, size.get()).await?;
        size.record(n);
        budget.spend(n).await;
        if n == 0 {
            return poll_fn(|cx| to.poll_close(cx)).await;
        }
        write_counted(to, &buf[..n], &mut 0).await?;
    }
}

/// Joins two connections after an upgrade: bytes flow both ways until both directions
/// have ended (each end's EOF is passed on as a write shutdown), or either fails.
pub(crate) async fn splice<A, B>(a: &A, b: &B) -> io::Result<()>
where
    A: Wire + ?Sized,
    B: Wire + ?Sized,
{
    future::try_zip(copy_half(a, b), copy_half(b, a))
        .await
        .map(|_| ())
}

/// Closes a client connection that may still have unread input (a rejected request, an
/// answer sent before the request body ended): shut down our side, then read and drop
/// what the client still sends for a moment, so that the kernel does not answer the
/// unread bytes with a reset that would destroy our last response in flight. The moment
/// is on the shard's `timers`.
pub(crate) async fn linger_close<S: Wire + ?Sized>(s: &S, timers: &Timers) {
    s.shutdown_write();
    let drain = async {
        let mut buf = vec![0u8; 4096];
        let mut total = 0usize;
        while total < 1 << 20 {
            match poll_fn(|cx| s.poll_read(cx, &mut buf)).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    };
    future::or(drain, timers.after(LINGER)).await;
}

/// How long [`linger_close`] reads what a client still sends.
const LINGER: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_candidates() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(may_end_head(head, 0));
        // The head in two reads: the first never ends it, the second always does, however
        // the blank line is split.
        for split in 1..head.len() {
            assert!(!may_end_head(&head[..split], 0), "first read up to {split}");
            assert!(may_end_head(head, split), "second read from {split}");
        }
        assert!(may_end_head(b"GET / HTTP/1.1\nHost: x\n\n", 20));
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: x\r\n", 0));
    }

    #[test]
    fn head_reads_grow_while_filled_and_stop_past_the_limit() {
        let mut size = ReadSize::new();
        assert_eq!(head_read_size(0, 65536, &size), FIRST_READ);
        // A head that trickles in does not make reads bigger.
        size.record(1);
        assert_eq!(head_read_size(8192, 65536, &size), FIRST_READ);
        size.record(FIRST_READ);
        assert_eq!(head_read_size(8192, 65536, &size), 2 * FIRST_READ);
        assert_eq!(head_read_size(65000, 65536, &size), 537);
        assert_eq!(head_read_size(65536, 65536, &size), 1);
    }

    /// Answers each read with the next of its parts (`None`: nothing yet).
    struct Parts(Mutex<Vec<Option<&'static [u8]>>>);

    impl Wire for Parts {
        fn poll_read(&self, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
            match self.0.lock().unwrap().remove(0) {
                None => Poll::Pending,
                Some(part) => {
                    buf[..part.len()].copy_from_slice(part);
                    Poll::Ready(Ok(part.len()))
                }
            }
        }
        fn poll_write(&self, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_readable(&self, _: &mut Context<'_>) -> Poll<()> {
            Poll::Ready(())
        }
        fn shutdown_write(&self) {}
    }

    #[test]
    fn a_read_that_finds_nothing_holds_no_buffer() {
        use std::future::Future;
        let mut cx = Context::from_waker(Waker::noop());
        let wire = Parts(Mutex::new(vec![None, Some(b"HTTP/1.1 200 OK\r\n"), None]));
        let mut buf = Vec::new();
        {
            let mut read = std::pin::pin!(read_more(&wire, &mut buf, FIRST_READ));
            assert!(read.as_mut().poll(&mut cx).is_pending());
            assert!(matches!(read.as_mut().poll(&mut cx), Poll::Ready(Ok(17))));
        }
        // The buffer holds what arrived, not a whole read's worth.
        assert_eq!(buf, b"HTTP/1.1 200 OK\r\n");
        assert!(buf.capacity() < FIRST_READ, "{}", buf.capacity());
        let before = buf.capacity();
        {
            let mut read = std::pin::pin!(read_more(&wire, &mut buf, FIRST_READ));
            assert!(read.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(buf.capacity(), before);
    }

    #[test]
    fn body_reads_double_while_full() {
        let mut size = ReadSize::new();
        size.record(100);
        assert_eq!(size.get(), FIRST_READ);
        for _ in 0..10 {
            let n = size.get();
            size.record(n);
        }
        assert_eq!(size.get(), CHUNK);
    }
}
