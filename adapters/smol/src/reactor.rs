//! A shard's own reactor: one edge-triggered epoll per shard, on Linux.
//!
//! async-io's reactor, which the proxy's sockets used before, cost the smol build its
//! throughput (measured under `wrk -c256`): it is one reactor for the whole process, so
//! whichever thread polls it wakes the other shards' tasks across threads (and its
//! fallback thread polls in a backoff loop while any `block_on` runs); and it arms each
//! wait one-shot, so every wait for a socket cost an `epoll_ctl` (5.5% of the CPU).
//!
//! Here each socket is registered once, for reading and writing, edge-triggered. An event
//! bumps a counter per direction and wakes the task waiting on that direction. A read that
//! fills less than its buffer has emptied the socket (TCP's `recv` returns short only when
//! its queue is empty), so the next read waits for the next edge instead of making a
//! syscall that would answer `EAGAIN`: HAProxy does the same. Except once the peer has
//! closed or reset the connection, or sent urgent data: then the end of stream (or the
//! bytes past the urgent mark) may wait behind a short read with no edge to come, so every
//! read goes to the kernel.
//!
//! A shard thread blocks in its own reactor ([`Reactor::block_on`]); a wake from another
//! thread writes to an eventfd. [`crate::serve`] runs the first shard on the caller's
//! executor: there the reactor's epoll descriptor is itself registered with async-io
//! ([`Reactor::nest`]), so that `serve` still runs under any executor. Timers and signals
//! stay on async-io: they are rare.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use futures_lite::ready;
use rustix::event::{epoll, eventfd, EventfdFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags, SocketFlags, SocketType};
use slab::Slab;

use crate::listen::family;

/// The event key of the eventfd that wakes a sleeping shard thread.
const WAKE: u64 = u64::MAX;
const READ: usize = 0;
const WRITE: usize = 1;
/// `Io::drained` when it is not known whether the socket holds bytes.
const UNKNOWN: u64 = u64::MAX;
/// Events taken per `epoll_wait`.
const BATCH: usize = 256;
/// An `epoll_wait` timeout that takes what is ready without sleeping.
const NOW: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 0,
};

pub(crate) struct Reactor {
    epoll: Arc<OwnedFd>,
    /// An eventfd, registered under [`WAKE`].
    wake: OwnedFd,
    sources: Mutex<Slab<Arc<Source>>>,
    /// The wakers of one poll's events; its lock also makes one poller at a time.
    woken: Mutex<Vec<Waker>>,
    /// Set by a wake; cleared by `block_on` before each poll of its future.
    notified: AtomicBool,
    /// Whether `block_on` is (about to be) blocked in `epoll_wait`.
    sleeping: AtomicBool,
}

/// One registered socket's readiness: a counter of events per direction, and the task
/// waiting on each.
#[derive(Default)]
struct Source {
    ticks: [AtomicU64; 2],
    /// Set for good by a hang-up, an error or urgent data: a short read then no longer
    /// shows that nothing more is to be read.
    closed: AtomicBool,
    wakers: Mutex<[Option<Waker>; 2]>,
}

impl Source {
    fn tick(&self, dir: usize) -> u64 {
        self.ticks[dir].load(Ordering::Acquire)
    }

    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ready once an event came after the count `seen`; until then the task waits.
    fn poll_ready(&self, dir: usize, seen: u64, cx: &mut Context<'_>) -> Poll<()> {
        let mut wakers = lock(&self.wakers);
        // Events are counted under this lock, so none slips between the check and the
        // waker's registration.
        if self.tick(dir) != seen {
            return Poll::Ready(());
        }
        match &mut wakers[dir] {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn fire(&self, flags: epoll::EventFlags, out: &mut Vec<Waker>) {
        use epoll::EventFlags as F;
        let mut wakers = lock(&self.wakers);
        let read = flags.intersects(F::IN | F::PRI | F::RDHUP | F::HUP | F::ERR);
        let write = flags.intersects(F::OUT | F::HUP | F::ERR);
        if flags.intersects(F::RDHUP | F::HUP | F::ERR | F::PRI) {
            // Before the count: a reader that sees the count sees this too.
            self.closed.store(true, Ordering::Release);
        }
        for (dir, on) in [(READ, read), (WRITE, write)] {
            if on {
                self.ticks[dir].fetch_add(1, Ordering::AcqRel);
                out.extend(wakers[dir].take());
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Reactor {
    pub(crate) fn new() -> io::Result<Arc<Reactor>> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        epoll::add(
            &epoll,
            &wake,
            epoll::EventData::new_u64(WAKE),
            epoll::EventFlags::IN | epoll::EventFlags::ET,
        )?;
        Ok(Arc::new(Reactor {
            epoll: Arc::new(epoll),
            wake,
            sources: Mutex::new(Slab::new()),
            woken: Mutex::new(Vec::new()),
            notified: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
        }))
    }

    /// Registers a non-blocking socket for both directions, edge-triggered.
    pub(crate) fn register<T: AsFd>(self: &Arc<Self>, sock: T) -> io::Result<Io<T>> {
        use epoll::EventFlags as F;
        let source = Arc::new(Source::default());
        let key = lock(&self.sources).insert(source.clone());
        let data = epoll::EventData::new_u64(key as u64);
        let interest = F::IN | F::PRI | F::OUT | F::RDHUP | F::ET;
        if let Err(e) = epoll::add(&*self.epoll, &sock, data, interest) {
            lock(&self.sources).remove(key);
            return Err(e.into());
        }
        Ok(Io {
            sock,
            key,
            source,
            reactor: self.clone(),
            drained: AtomicU64::new(UNKNOWN),
        })
    }

    /// Runs `fut` on this thread, blocking in `epoll_wait` whenever it waits.
    pub(crate) fn block_on<T>(self: &Arc<Self>, fut: impl Future<Output = T>) -> T {
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = pin!(fut);
        loop {
            self.notified.store(false, Ordering::SeqCst);
            if let Poll::Ready(t) = fut.as_mut().poll(&mut cx) {
                return t;
            }
            self.sleeping.store(true, Ordering::SeqCst);
            // A wake that came during the poll (the executor yielding, or a task woken
            // meanwhile) only takes what is ready; otherwise sleep until an event or a
            // wake, which sees `sleeping` and writes the eventfd.
            let timeout = self.notified.load(Ordering::SeqCst).then_some(&NOW);
            self.poll(timeout);
        }
    }

    /// For the shard that runs on the caller's executor: registers this reactor's epoll
    /// descriptor with async-io, and returns the task that polls the reactor whenever
    /// that descriptor is readable. The task never returns.
    pub(crate) fn nest(self: &Arc<Self>) -> io::Result<impl Future<Output = ()> + Send + 'static> {
        let epoll = async_io::Async::new(self.epoll.clone())?;
        let reactor = self.clone();
        Ok(async move {
            // `readable` fails only if async-io's own epoll does; then nothing would work.
            while epoll.readable().await.is_ok() {
                reactor.poll(Some(&NOW));
            }
            std::future::pending().await
        })
    }

    /// Waits for events (up to `timeout`; `None` is for ever) and wakes their tasks.
    fn poll(&self, timeout: Option<&Timespec>) {
        let mut wakers = lock(&self.woken);
        let mut buf = [const { MaybeUninit::<epoll::Event>::uninit() }; BATCH];
        // Errors are EINTR (a signal: return, the caller polls again) and faults that
        // cannot happen with a valid descriptor and buffer.
        let waited = epoll::wait(&*self.epoll, &mut buf[..], timeout);
        // Awake: the wakes below (mostly of this thread's own tasks) need no eventfd write.
        self.sleeping.store(false, Ordering::SeqCst);
        let Ok((events, _)) = waited else {
            return;
        };
        {
            let sources = lock(&self.sources);
            for ev in events.iter() {
                let (key, flags) = (ev.data.u64(), ev.flags);
                if key == WAKE {
                    let mut count = [0u8; 8];
                    let _ = rustix::io::read(&self.wake, &mut count);
                } else if let Some(source) = sources.get(key as usize) {
                    source.fire(flags, &mut wakers);
                }
            }
        }
        for w in wakers.drain(..) {
            w.wake();
        }
    }

    fn notify(&self) {
        if !self.notified.swap(true, Ordering::SeqCst) && self.sleeping.load(Ordering::SeqCst) {
            let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
        }
    }
}

/// `block_on`'s waker: a task woken on any thread gets the shard thread out of
/// `epoll_wait`.
impl Wake for Reactor {
    fn wake(self: Arc<Self>) {
        self.notify();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.notify();
    }
}

/// A socket registered with a shard's reactor; deregistered when dropped.
pub(crate) struct Io<T: AsFd> {
    sock: T,
    key: usize,
    source: Arc<Source>,
    reactor: Arc<Reactor>,
    /// The read-event count at which the socket was last seen empty (an `EAGAIN`, or a
    /// read shorter than its buffer), or [`UNKNOWN`].
    drained: AtomicU64,
}

impl<T: AsFd> Io<T> {
    pub(crate) fn get_ref(&self) -> &T {
        &self.sock
    }

    /// Waits until the socket may have something to read (bytes, its end or an error),
    /// without reading: ready at once unless it was seen empty and no event came since.
    pub(crate) fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()> {
        let tick = self.source.tick(READ);
        if self.drained.load(Ordering::Relaxed) != tick {
            return Poll::Ready(());
        }
        self.source.poll_ready(READ, tick, cx)
    }

    /// Whether nothing has happened on the socket since a read found it empty: no bytes,
    /// no end of stream, no error. Free (no syscall): an idle pooled connection that is
    /// quiet was not closed by its peer, as far as the kernel has told.
    pub(crate) fn is_quiet(&self) -> bool {
        !self.source.closed() && self.drained.load(Ordering::Relaxed) == self.source.tick(READ)
    }
}

impl<T: AsFd> Drop for Io<T> {
    fn drop(&mut self) {
        let _ = epoll::delete(&*self.reactor.epoll, &self.sock);
        lock(&self.reactor.sources).remove(self.key);
    }
}

impl Io<TcpStream> {
    /// Reads with `recv` (rustix, straight to the kernel: glibc's wrapper enters and
    /// leaves a thread-cancellation point around each call, 2% of the CPU under load).
    pub(crate) fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let tick = self.source.tick(READ);
            if self.drained.load(Ordering::Relaxed) != tick {
                match rustix::net::recv(&self.sock, &mut *buf, RecvFlags::empty()) {
                    Ok((n, _)) => {
                        let empty = n > 0 && n < buf.len() && !self.source.closed();
                        let drained = if empty { tick } else { UNKNOWN };
                        self.drained.store(drained, Ordering::Relaxed);
                        return Poll::Ready(Ok(n));
                    }
                    Err(Errno::AGAIN) => self.drained.store(tick, Ordering::Relaxed),
                    Err(Errno::INTR) => continue,
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
            }
            ready!(self.source.poll_ready(READ, tick, cx));
        }
    }

    /// Writes with `send` (rustix, without `SIGPIPE`).
    pub(crate) fn poll_send(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let tick = self.source.tick(WRITE);
            match rustix::net::send(&self.sock, buf, SendFlags::NOSIGNAL) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(Errno::AGAIN) => {}
                Err(Errno::INTR) => continue,
                Err(e) => return Poll::Ready(Err(e.into())),
            }
            ready!(self.source.poll_ready(WRITE, tick, cx));
        }
    }

    /// A new TCP connection to `addr`, registered with `reactor`.
    pub(crate) async fn connect(reactor: &Arc<Reactor>, addr: SocketAddr) -> io::Result<Self> {
        let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
        let fd = rustix::net::socket_with(family(addr), SocketType::STREAM, flags, None)?;
        // A backend that vanishes mid-stream is found by keep-alive probes (see
        // BACKEND_KEEPALIVE_IDLE).
        {
            use lb_proxy::settings::{
                BACKEND_KEEPALIVE_IDLE, BACKEND_KEEPALIVE_INTERVAL, BACKEND_KEEPALIVE_PROBES,
            };
            use rustix::net::sockopt;
            sockopt::set_socket_keepalive(&fd, true)?;
            sockopt::set_tcp_keepidle(&fd, BACKEND_KEEPALIVE_IDLE)?;
            sockopt::set_tcp_keepintvl(&fd, BACKEND_KEEPALIVE_INTERVAL)?;
            sockopt::set_tcp_keepcnt(&fd, BACKEND_KEEPALIVE_PROBES)?;
        }
        match rustix::net::connect(&fd, &addr) {
            Ok(()) | Err(Errno::INPROGRESS) => {}
            Err(e) => return Err(e.into()),
        }
        // Registered after `connect` began, so the first event says how it went.
        let io = reactor.register(TcpStream::from(fd))?;
        let mut seen = 0;
        loop {
            poll_fn(|cx| io.source.poll_ready(WRITE, seen, cx)).await;
            seen = io.source.tick(WRITE);
            if let Some(e) = io.sock.take_error()? {
                return Err(e);
            }
            match io.sock.peer_addr() {
                Ok(_) => return Ok(io),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Io<TcpListener> {
    /// The next connection, non-blocking and not yet registered. Like a read, it waits
    /// for the next event once the queue was seen empty: the executor polls the accept
    /// loop whenever it wakes, and that would otherwise be an `accept4` each time.
    pub(crate) async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        poll_fn(|cx| loop {
            let tick = self.source.tick(READ);
            if self.drained.load(Ordering::Relaxed) != tick {
                let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
                match rustix::net::acceptfrom_with(&self.sock, flags) {
                    Ok((fd, peer)) => {
                        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
                        let peer = peer.and_then(|a| SocketAddr::try_from(a).ok());
                        return Poll::Ready(Ok((TcpStream::from(fd), peer.unwrap_or(unknown))));
                    }
                    Err(Errno::AGAIN) => self.drained.store(tick, Ordering::Relaxed),
                    Err(Errno::INTR | Errno::CONNABORTED) => continue,
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
            }
            ready!(self.source.poll_ready(READ, tick, cx));
        })
        .await
    }
}

impl futures_lite::AsyncRead for Io<TcpStream> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_recv(cx, buf)
    }
}

impl futures_lite::AsyncWrite for Io<TcpStream> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, buf)
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.sock.shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use futures_lite::future;
    use rustix::net::AddressFamily;

    /// Runs `f` on a thread of its own: a lost wake-up fails the test instead of hanging it.
    fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("hung: a wake-up was lost")
    }

    /// A connection made through `reactor`, and its other end (a plain blocking socket).
    fn pair(reactor: &Arc<Reactor>) -> (Io<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let io = reactor.block_on(Io::connect(reactor, addr)).unwrap();
        let (peer, _) = listener.accept().unwrap();
        (io, peer)
    }

    async fn read(io: &Io<TcpStream>, buf: &mut [u8]) -> io::Result<usize> {
        poll_fn(|cx| io.poll_recv(cx, buf)).await
    }

    /// A short read whose bytes and whatever follows them (`then`, done by the peer before
    /// the reactor polls) raised one edge between them: the read after it must still see
    /// what followed. Returns the first read's count and the second read's result.
    fn short_read_then(
        then: impl FnOnce(TcpStream) + Send + 'static,
    ) -> (usize, io::Result<usize>) {
        within(move || {
            let reactor = Reactor::new().unwrap();
            let (io, mut peer) = pair(&reactor);
            peer.write_all(b"abc").unwrap();
            then(peer);
            let mut buf = [0u8; 16];
            // Yielding first makes `block_on` poll the reactor once before the read.
            let first = reactor.block_on(async {
                future::yield_now().await;
                read(&io, &mut buf).await.unwrap()
            });
            (first, reactor.block_on(read(&io, &mut buf)))
        })
    }

    /// An idle pooled connection: quiet while nothing arrives, not once the peer closed it
    /// (seen without a syscall, from the reactor's events).
    #[test]
    fn a_connection_is_quiet_until_its_peer_closes() {
        within(|| {
            let reactor = Reactor::new().unwrap();
            let (io, mut peer) = pair(&reactor);
            peer.write_all(b"response").unwrap();
            let mut buf = [0u8; 64];
            let n = reactor.block_on(read(&io, &mut buf)).unwrap();
            assert_eq!(n, 8);
            reactor.block_on(future::yield_now());
            assert!(io.is_quiet(), "read empty, nothing since");
            drop(peer);
            // Let the reactor take the hang-up's event.
            for _ in 0..100 {
                reactor.block_on(future::yield_now());
                if !io.is_quiet() {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
            assert!(!io.is_quiet(), "the peer closed it");
        });
    }

    #[test]
    fn after_a_short_read_the_next_read_waits_for_the_next_edge() {
        within(|| {
            let reactor = Reactor::new().unwrap();
            let (io, mut peer) = pair(&reactor);
            let mut buf = [0u8; 16];
            peer.write_all(b"abc").unwrap();
            let n = reactor.block_on(read(&io, &mut buf)).unwrap();
            assert_eq!(&buf[..n], b"abc");
            // Three bytes in a 16-byte buffer: the socket was emptied, no event came since.
            assert_eq!(io.drained.load(Ordering::Relaxed), io.source.tick(READ));
            // Collect the edges raised so far, then send more.
            reactor.block_on(future::yield_now());
            let seen = io.source.tick(READ);
            peer.write_all(b"de").unwrap();
            // Until the reactor has polled, the new bytes are not looked for: no `recv`.
            let before_poll = future::block_on(future::poll_once(read(&io, &mut buf)));
            assert!(before_poll.is_none());
            // The edge they raised brings them.
            let n = reactor.block_on(read(&io, &mut buf)).unwrap();
            assert_eq!(&buf[..n], b"de");
            assert!(io.source.tick(READ) > seen);
        });
    }

    #[test]
    fn a_full_read_does_not_mark_the_socket_empty() {
        within(|| {
            let reactor = Reactor::new().unwrap();
            let (io, mut peer) = pair(&reactor);
            peer.write_all(b"abcdef").unwrap();
            let mut buf = [0u8; 6];
            let mut got = 0;
            while got < 6 {
                got += reactor.block_on(read(&io, &mut buf[got..])).unwrap();
            }
            assert_eq!(&buf, b"abcdef");
            assert_eq!(io.drained.load(Ordering::Relaxed), UNKNOWN);
            drop(peer);
            assert_eq!(reactor.block_on(read(&io, &mut buf)).unwrap(), 0);
        });
    }

    #[test]
    fn the_end_of_stream_behind_a_short_read_is_seen() {
        let (first, second) = short_read_then(drop);
        assert_eq!(first, 3);
        assert_eq!(second.unwrap(), 0);
    }

    #[test]
    fn a_reset_behind_a_short_read_is_seen() {
        let (first, second) = short_read_then(|peer| {
            rustix::net::sockopt::set_socket_linger(&peer, Some(Duration::ZERO)).unwrap();
            drop(peer);
        });
        assert_eq!(first, 3);
        assert_eq!(second.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn bytes_past_urgent_data_behind_a_short_read_are_read() {
        let (tx, rx) = mpsc::channel();
        let (first, second) = short_read_then(move |mut peer| {
            rustix::net::send(&peer, b"d", SendFlags::OOB).unwrap();
            peer.write_all(b"efg").unwrap();
            let _ = tx.send(peer);
        });
        // `recv` stops at the urgent mark: "abc", then the rest ("efg"; the urgent byte is
        // out of band).
        assert_eq!(first, 3);
        assert_eq!(second.unwrap(), 3);
        drop(rx);
    }

    #[test]
    fn a_write_that_found_the_buffer_full_resumes_when_the_peer_reads() {
        within(|| {
            let reactor = Reactor::new().unwrap();
            let (io, mut peer) = pair(&reactor);
            let chunk = vec![7u8; 64 * 1024];
            // Fill the socket buffers until `send` would block.
            let mut cx = Context::from_waker(Waker::noop());
            let mut sent = 0;
            while let Poll::Ready(n) = io.poll_send(&mut cx, &chunk) {
                sent += n.unwrap();
            }
            let reader = thread::spawn(move || {
                let mut all = Vec::new();
                peer.read_to_end(&mut all).unwrap();
                all.len()
            });
            let more = reactor
                .block_on(poll_fn(|cx| io.poll_send(cx, &chunk)))
                .unwrap();
            assert!(more > 0);
            io.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
            assert_eq!(reader.join().unwrap(), sent + more);
        });
    }

    #[test]
    fn a_wake_from_another_thread_ends_the_wait() {
        within(|| {
            let reactor = Reactor::new().unwrap();
            let done = Arc::new(AtomicBool::new(false));
            let event = Arc::new(event_listener::Event::new());
            let (d, e, r) = (done.clone(), event.clone(), reactor.clone());
            let other = thread::spawn(move || {
                // Most often the reactor is asleep by the time this runs: the case to test.
                // If not, the wait ends without sleeping, which is also right.
                while !r.sleeping.load(Ordering::SeqCst) {
                    thread::yield_now();
                }
                d.store(true, Ordering::SeqCst);
                e.notify(usize::MAX);
            });
            reactor.block_on(async {
                loop {
                    let listener = event.listen();
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    listener.await;
                }
            });
            other.join().unwrap();
        });
    }

    #[test]
    fn accepts_and_connects_and_reports_a_refused_connect() {
        within(|| {
            let reactor = Reactor::new().unwrap();
            let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = std_listener.local_addr().unwrap();
            std_listener.set_nonblocking(true).unwrap();
            let listener = reactor.register(std_listener).unwrap();
            let client = reactor.block_on(Io::connect(&reactor, addr)).unwrap();
            let (accepted, peer) = reactor.block_on(listener.accept()).unwrap();
            assert_eq!(peer, client.get_ref().local_addr().unwrap());
            assert_eq!(accepted.peer_addr().unwrap(), peer);
            // A port nobody listens on: bound, never listening, so no one else takes it.
            let closed =
                rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
            rustix::net::bind(&closed, &SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
            let closed_addr = rustix::net::getsockname(&closed).unwrap();
            let closed_addr = SocketAddr::try_from(closed_addr).unwrap();
            let refused = reactor.block_on(Io::connect(&reactor, closed_addr));
            let kind = refused.err().map(|e| e.kind());
            assert_eq!(kind, Some(io::ErrorKind::ConnectionRefused));
        });
    }

    #[test]
    fn a_dropped_socket_leaves_the_reactor() {
        let reactor = Reactor::new().unwrap();
        let (io, _peer) = pair(&reactor);
        assert_eq!(lock(&reactor.sources).len(), 1);
        drop(io);
        assert_eq!(lock(&reactor.sources).len(), 0);
    }

    #[test]
    fn runs_nested_under_async_io() {
        within(|| {
            let reactor = Reactor::new().unwrap();
            let (io, mut peer) = pair(&reactor);
            let mut buf = [0u8; 16];
            // Empty the socket first, so that the next read depends on the reactor's event.
            peer.write_all(b"a").unwrap();
            assert_eq!(reactor.block_on(read(&io, &mut buf)).unwrap(), 1);
            let poller = reactor.nest().unwrap();
            let writer = thread::spawn(move || {
                thread::sleep(Duration::from_millis(50));
                peer.write_all(b"nested").unwrap();
                peer
            });
            let n = async_io::block_on(future::or(
                async {
                    poller.await;
                    0
                },
                async { read(&io, &mut buf).await.unwrap() },
            ));
            assert_eq!(&buf[..n], b"nested");
            drop(writer.join());
        });
    }
}
