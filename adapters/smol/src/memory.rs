//! One client connection of a shard, in memory (the `memory` feature): for tests and the
//! `proxy_path` fuzz target. Not a stable API.
//!
//! [`Sim`] runs this build's real request path (`conn::serve_on`, `exchange`, `pump`,
//! `io`) for one client connection whose bytes, like those of every backend connection
//! it opens, go through in-memory pipes. No socket, no thread, no clock: the caller plays
//! the client and the backends ([`Peer`]), steps the connection's task until it waits
//! ([`Sim::step`]), and makes time pass when it wants ([`Sim::fire_timers`]: every
//! pending deadline fires).
//!
//! What is real: the proxy layer and the core (an `lb_proxy::Proxy` made from the
//! settings given, its backends those of the settings), the shard's deadlines (`Timers`,
//! which only fire when told), and one shard reactor (an epoll descriptor that `Smol`
//! holds; nothing is registered with it). What is the sim's: the streams, and the
//! `Shard` that hands out backend connections (new ones in memory, or refused when told;
//! idle ones from a pool of its own, which like the server's drops a connection the
//! backend closed or wrote to while it was idle).
//!
//! The task is polled only when woken, as an executor would: a wake-up the request path
//! fails to arrange shows as a connection that never ends.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use lb_core::BackendId;
use lb_proxy::{Settings, StartError};

use crate::conn;
use crate::reactor::Reactor;
use crate::rt::{Proxy, Shard, Smol, Upstream};
use crate::stream::Wire;
use crate::timers::Timers;

/// The client's address, as the proxy sees it.
const PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 40000);

/// Most polls in one [`Sim::step`]: a task woken this often without ever waiting spins.
const SPIN_LIMIT: usize = 100_000;

/// One end of the simulation's connections, as the caller plays it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The client.
    Client,
    /// The backend side of the `n`th connection the proxy opened (from 0).
    Backend(usize),
}

/// How the peers' streams behave.
#[derive(Clone, Copy, Debug)]
pub struct Wires {
    /// Most bytes the proxy may have written to a peer and the peer not yet taken (its
    /// receive window): past it, the proxy's writes wait. At least 1.
    pub window: usize,
    /// Most bytes one read of the proxy returns (a peer that trickles). At least 1.
    pub segment: usize,
}

/// See the module's documentation.
pub struct Sim {
    proxy: Arc<Proxy>,
    shard: Rc<MemShard>,
    client: Rc<RefCell<Pipes>>,
    task: Option<Pin<Box<dyn Future<Output = ()>>>>,
    woken: Arc<Flag>,
    waker: Waker,
}

impl Sim {
    /// A proxy for `settings` (its backends those of the settings), with one client
    /// connection open on it, not yet polled.
    pub fn new(settings: Settings, wires: Wires) -> Result<Sim, StartError> {
        let reactor =
            Reactor::new().map_err(|e| StartError::runtime("create an event loop (epoll)", e))?;
        let rt = Smol::new(&settings, vec![reactor])?;
        let proxy = Proxy::new(settings, Arc::new(|_| {}), rt, Instant::now())?;
        let wires = Wires {
            window: wires.window.max(1),
            segment: wires.segment.max(1),
        };
        let shard = Rc::new(MemShard {
            timers: Timers::new(),
            wires,
            conns: RefCell::new(Vec::new()),
            pool: RefCell::new(Vec::new()),
            refuse: Cell::new(0),
        });
        let client = Rc::new(RefCell::new(Pipes::new(wires, None)));
        let task = {
            let (proxy, shard, end) = (proxy.clone(), shard.clone(), End(client.clone()));
            Box::pin(async move {
                let open = proxy.admit().await;
                conn::serve_on(open, &*shard, end, PEER).await;
            })
        };
        let woken = Arc::new(Flag(AtomicBool::new(true)));
        Ok(Sim {
            proxy,
            shard,
            client,
            task: Some(task),
            waker: Waker::from(woken.clone()),
            woken,
        })
    }

    /// Polls the connection's task while it is woken; says whether it has ended (the
    /// connection closed).
    ///
    /// # Panics
    ///
    /// When the task wakes itself up more than 100 000 times in a row: it spins.
    pub fn step(&mut self) -> bool {
        let Some(task) = &mut self.task else {
            return true;
        };
        let mut cx = Context::from_waker(&self.waker);
        for _ in 0..SPIN_LIMIT {
            if !self.woken.0.swap(false, Ordering::AcqRel) {
                return false;
            }
            if task.as_mut().poll(&mut cx).is_ready() {
                self.task = None;
                return true;
            }
        }
        panic!("the connection's task spins: woken {SPIN_LIMIT} times without waiting");
    }

    /// Whether the connection has ended.
    pub fn ended(&self) -> bool {
        self.task.is_none()
    }

    /// Backend connections the proxy has opened so far.
    pub fn backends(&self) -> usize {
        self.shard.conns.borrow().len()
    }

    /// The index, in the settings' backends, of the backend that `Peer::Backend(n)` is.
    pub fn backend_slot(&self, n: usize) -> usize {
        self.shard.conns.borrow()[n].borrow().slot.unwrap_or(0)
    }

    fn pipes(&self, peer: Peer) -> Rc<RefCell<Pipes>> {
        match peer {
            Peer::Client => self.client.clone(),
            Peer::Backend(n) => self.shard.conns.borrow()[n].clone(),
        }
    }

    /// `peer` sends `data` (lost if the proxy has closed the connection).
    pub fn send(&mut self, peer: Peer, data: &[u8]) {
        let pipes = self.pipes(peer);
        let mut p = pipes.borrow_mut();
        if !p.dropped && !p.reset && !p.inbound.closed {
            p.inbound.data.extend(data);
            p.inbound.wake();
        }
    }

    /// Bytes sent by `peer` the proxy has not read yet.
    pub fn unread(&self, peer: Peer) -> usize {
        self.pipes(peer).borrow().inbound.data.len()
    }

    /// `peer` shuts its side down for writing: the proxy reads the end of the stream once
    /// it has read what came before.
    pub fn shut(&mut self, peer: Peer) {
        let pipes = self.pipes(peer);
        let mut p = pipes.borrow_mut();
        p.inbound.closed = true;
        p.inbound.wake();
    }

    /// `peer` resets the connection: the proxy's reads and writes on it fail.
    pub fn reset(&mut self, peer: Peer) {
        let pipes = self.pipes(peer);
        let mut p = pipes.borrow_mut();
        p.reset = true;
        p.inbound.wake();
        p.outbound.wake();
    }

    /// Takes at most `max` of the bytes the proxy wrote to `peer` (making room for more).
    pub fn take(&mut self, peer: Peer, max: usize) -> Vec<u8> {
        let pipes = self.pipes(peer);
        let mut p = pipes.borrow_mut();
        let n = max.min(p.outbound.data.len());
        let (front, back) = p.outbound.data.as_slices();
        let m = n.min(front.len());
        let mut taken = Vec::with_capacity(n);
        taken.extend_from_slice(&front[..m]);
        taken.extend_from_slice(&back[..n - m]);
        p.outbound.data.drain(..n);
        if n > 0 {
            p.outbound.wake();
        }
        taken
    }

    /// Whether the proxy has shut the connection to `peer` down for writing, or closed
    /// it: nothing more will come (once what is there is taken).
    pub fn finished(&self, peer: Peer) -> bool {
        let pipes = self.pipes(peer);
        let p = pipes.borrow();
        p.outbound.closed || p.dropped
    }

    /// Whether the proxy has closed (dropped) its end of the connection to `peer`.
    pub fn dropped(&self, peer: Peer) -> bool {
        self.pipes(peer).borrow().dropped
    }

    /// For each time the proxy kept the connection to `peer` for another request (put it
    /// in its pool), how many bytes it had written to it by then.
    pub fn kept_at(&self, peer: Peer) -> Vec<usize> {
        self.pipes(peer).borrow().kept.clone()
    }

    /// How many bytes the proxy's reads from `peer` asked for, in all (the sizes of the
    /// buffers it read into, which it zeroes first): what its reads cost it.
    pub fn asked(&self, peer: Peer) -> usize {
        self.pipes(peer).borrow().asked
    }

    /// The next `n` connection attempts are refused.
    pub fn refuse(&mut self, n: usize) {
        self.shard.refuse.set(n);
    }

    /// Time passes: every deadline pending now (`--timeout`, `--head-timeout`, the stall
    /// limits, a lingering close) fires.
    pub fn fire_timers(&mut self) {
        self.shard.timers.fire_all();
    }

    /// Shutdown begins (SIGTERM).
    pub fn shutdown(&mut self) {
        self.proxy.begin_shutdown();
    }

    /// Requests whose lease on a backend is not yet released.
    pub fn in_flight(&self) -> u64 {
        self.proxy.in_flight()
    }

    /// Client connections the proxy counts as open (1 until the connection ends).
    pub fn open_connections(&self) -> usize {
        self.proxy.connections()
    }

    /// Idle backend connections the proxy keeps.
    pub fn pooled(&self) -> usize {
        self.shard.pool.borrow().len()
    }
}

/// The task's waker: a flag.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

/// One direction of a connection.
#[derive(Default)]
struct Pipe {
    data: VecDeque<u8>,
    /// Its writer shut it down: end of stream once `data` is read.
    closed: bool,
    /// The proxy's side, waiting on it (to read, or for room to write).
    waiter: Option<Waker>,
}

impl Pipe {
    fn wake(&mut self) {
        if let Some(w) = self.waiter.take() {
            w.wake();
        }
    }
}

/// A connection between the proxy and a peer.
struct Pipes {
    /// Peer → proxy.
    inbound: Pipe,
    /// Proxy → peer.
    outbound: Pipe,
    /// The peer reset it.
    reset: bool,
    /// The proxy closed its end.
    dropped: bool,
    /// Bytes the proxy wrote to it, in all.
    written: usize,
    /// See [`Sim::asked`].
    asked: usize,
    /// See [`Sim::kept_at`].
    kept: Vec<usize>,
    /// The backend it goes to (for a backend connection).
    slot: Option<usize>,
    wires: Wires,
}

impl Pipes {
    fn new(wires: Wires, slot: Option<usize>) -> Self {
        Pipes {
            inbound: Pipe::default(),
            outbound: Pipe::default(),
            reset: false,
            dropped: false,
            written: 0,
            asked: 0,
            kept: Vec::new(),
            slot,
            wires,
        }
    }
}

/// The proxy's end of a connection.
struct End(Rc<RefCell<Pipes>>);

impl Drop for End {
    fn drop(&mut self) {
        let mut p = self.0.borrow_mut();
        p.dropped = true;
        p.inbound.waiter = None;
        p.outbound.waiter = None;
    }
}

fn reset_error() -> io::Error {
    io::ErrorKind::ConnectionReset.into()
}

impl Wire for End {
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut p = self.0.borrow_mut();
        if p.reset {
            return Poll::Ready(Err(reset_error()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        p.asked += buf.len();
        let segment = p.wires.segment;
        let n = buf.len().min(segment).min(p.inbound.data.len());
        if n > 0 {
            let (front, back) = p.inbound.data.as_slices();
            let m = n.min(front.len());
            buf[..m].copy_from_slice(&front[..m]);
            buf[m..n].copy_from_slice(&back[..n - m]);
            p.inbound.data.drain(..n);
            return Poll::Ready(Ok(n));
        }
        if p.inbound.closed {
            return Poll::Ready(Ok(0));
        }
        p.inbound.waiter = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut p = self.0.borrow_mut();
        if p.reset {
            return Poll::Ready(Err(reset_error()));
        }
        if p.outbound.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let room = p.wires.window.saturating_sub(p.outbound.data.len());
        if room == 0 && !buf.is_empty() {
            p.outbound.waiter = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(buf.len());
        p.outbound.data.extend(&buf[..n]);
        p.written += n;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut p = self.0.borrow_mut();
        if p.reset {
            return Poll::Ready(Err(reset_error()));
        }
        p.outbound.closed = true;
        Poll::Ready(Ok(()))
    }

    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut p = self.0.borrow_mut();
        if p.reset || p.inbound.closed || !p.inbound.data.is_empty() {
            return Poll::Ready(());
        }
        p.inbound.waiter = Some(cx.waker().clone());
        Poll::Pending
    }

    fn shutdown_write(&self) {
        self.0.borrow_mut().outbound.closed = true;
    }
}

/// The sim's [`Shard`]: real deadlines (fired when told), backend connections in memory.
struct MemShard {
    timers: Timers,
    wires: Wires,
    /// Every backend connection opened, in order.
    conns: RefCell<Vec<Rc<RefCell<Pipes>>>>,
    /// Idle connections, oldest first.
    pool: RefCell<Vec<(BackendId, End)>>,
    /// Connection attempts still to refuse.
    refuse: Cell<usize>,
}

impl Shard for MemShard {
    type Conn = End;

    fn timers(&self) -> &Timers {
        &self.timers
    }

    fn pooled(&self, up: &Upstream) -> Option<End> {
        let mut pool = self.pool.borrow_mut();
        while let Some(i) = pool.iter().rposition(|(id, _)| *id == up.id()) {
            let (_, end) = pool.remove(i);
            let stale = {
                let p = end.0.borrow();
                p.reset || p.inbound.closed || !p.inbound.data.is_empty()
            };
            if !stale {
                return Some(end);
            }
        }
        None
    }

    fn connect(&self, _: &Proxy, up: &Upstream) -> impl Future<Output = Result<End, String>> {
        let refused = self.refuse.get() > 0;
        let made = if refused {
            self.refuse.set(self.refuse.get() - 1);
            let e = io::Error::from(io::ErrorKind::ConnectionRefused);
            Err(lb_proxy::words::connect_error(&e))
        } else {
            let pipes = Rc::new(RefCell::new(Pipes::new(self.wires, Some(up.id().slot()))));
            self.conns.borrow_mut().push(pipes.clone());
            Ok(End(pipes))
        };
        std::future::ready(made)
    }

    fn keep(&self, up: &Upstream, conn: End) {
        if up.idle.get().is_zero() {
            return;
        }
        {
            let mut p = conn.0.borrow_mut();
            let written = p.written;
            p.kept.push(written);
        }
        self.pool.borrow_mut().push((up.id(), conn));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_core::BackendSpec;

    fn sim() -> Sim {
        sim_with(1 << 16)
    }

    /// A sim whose peers send `segment` bytes per read of the proxy.
    fn sim_with(segment: usize) -> Sim {
        custom(|_| {}, 1 << 16, segment)
    }

    fn custom(change: impl FnOnce(&mut Settings), window: usize, segment: usize) -> Sim {
        let listen = "127.0.0.1:0".parse().unwrap();
        let backend = BackendSpec {
            max_conns: 8,
            ..BackendSpec::new("http://10.0.0.1:8000")
        };
        let mut settings = Settings::new(listen, vec![backend]);
        change(&mut settings);
        Sim::new(settings, Wires { window, segment }).unwrap()
    }

    /// Takes what the proxy writes to `peer` (a byte at a time when its window is 1)
    /// until it has nothing more.
    fn drain(sim: &mut Sim, peer: Peer) -> String {
        let mut got = Vec::new();
        loop {
            sim.step();
            let more = sim.take(peer, usize::MAX);
            if more.is_empty() {
                return String::from_utf8(got).unwrap();
            }
            got.extend(more);
        }
    }

    const EXPECTS: &[u8] = b"POST /v1/completions HTTP/1.1\r\nHost: lb\r\n\
        Expect: 100-continue\r\nContent-Length: 2\r\n\r\n";

    /// Routing by body, the proxy answers `Expect` itself before it reads the body; the
    /// client does not read it (its window holds one byte). When the request's deadline
    /// passes meanwhile, the cut `100 Continue` is not followed by an error reply (which
    /// used to come out as `HHTTP/1.1 400 ...`): the connection just closes.
    #[test]
    fn a_cut_interim_response_is_followed_by_nothing() {
        let by_body = |s: &mut Settings| s.core.policy = lb_core::Policy::CacheAware;
        let mut sim = custom(by_body, 1, 1 << 16);
        sim.send(Peer::Client, EXPECTS);
        assert!(!sim.step());
        sim.fire_timers();
        sim.step();
        let got = drain(&mut sim, Peer::Client);
        assert!("HTTP/1.1 100 Continue\r\n\r\n".starts_with(&got), "{got:?}");
        sim.shut(Peer::Client);
        sim.fire_timers();
        assert!(sim.step());
        assert_eq!(sim.in_flight(), 0);
    }

    /// The upload's `100 Continue` and the response head are written by two futures: a
    /// backend that answers while the `100 Continue` waits for the client's window gets
    /// its head sent after it, not into it.
    #[test]
    fn an_interim_response_and_the_final_one_do_not_interleave() {
        let mut sim = custom(|_| {}, 1, 1 << 16);
        sim.send(Peer::Client, EXPECTS);
        assert!(!sim.step());
        let head = drain(&mut sim, Peer::Backend(0));
        assert!(
            head.starts_with("POST /v1/completions HTTP/1.1\r\n"),
            "{head}"
        );
        sim.send(
            Peer::Backend(0),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        );
        assert!(!sim.step());
        let got = drain(&mut sim, Peer::Client);
        let (interim, last) = got.split_at(25);
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n", "{got:?}");
        assert!(last.starts_with("HTTP/1.1 200 OK\r\n"), "{got:?}");
        assert!(last.ends_with("\r\n\r\nok"), "{got:?}");
    }

    fn text(b: Vec<u8>) -> String {
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn a_request_and_its_response_on_kept_connections() {
        let mut sim = sim();
        for round in 0..2 {
            sim.send(Peer::Client, b"GET /a HTTP/1.1\r\nHost: lb\r\n\r\n");
            assert!(!sim.step());
            assert_eq!(sim.backends(), 1, "round {round}: one connection, kept");
            let head = text(sim.take(Peer::Backend(0), usize::MAX));
            assert!(head.starts_with("GET /a HTTP/1.1\r\n"), "{head}");
            sim.send(
                Peer::Backend(0),
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            );
            assert!(!sim.step());
            let resp = text(sim.take(Peer::Client, usize::MAX));
            assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
            assert!(resp.ends_with("\r\n\r\nok"), "{resp}");
            assert_eq!(sim.pooled(), 1);
            assert_eq!(sim.in_flight(), 0);
        }
        assert_eq!(sim.kept_at(Peer::Backend(0)).len(), 2);
        sim.shut(Peer::Client);
        assert!(sim.step());
        assert_eq!(sim.open_connections(), 0);
    }

    #[test]
    fn deadlines_fire_when_told() {
        let mut sim = sim();
        sim.send(Peer::Client, b"GET /a HTTP/1.1\r\n");
        assert!(!sim.step());
        sim.fire_timers();
        assert!(!sim.step(), "lingers after its 408");
        let resp = text(sim.take(Peer::Client, usize::MAX));
        assert!(resp.starts_with("HTTP/1.1 408 "), "{resp}");
        assert!(sim.finished(Peer::Client));
        sim.fire_timers();
        assert!(sim.step());
    }

    /// A head that trickles in a byte per read costs reads of a total size linear in its
    /// length (each read zeroes the room it asks for). Read sizes used to grow with the
    /// head held: 30 KiB heads cost about 450 MB zeroed each way.
    #[test]
    fn heads_trickling_in_cost_linear_reads() {
        let mut sim = sim_with(1);
        let filler = "x".repeat(30_000);
        let req = format!("GET / HTTP/1.1\r\nHost: lb\r\nX-Filler: {filler}\r\n\r\n");
        sim.send(Peer::Client, req.as_bytes());
        assert!(!sim.step());
        let sent = sim.take(Peer::Backend(0), usize::MAX);
        assert!(sent.starts_with(b"GET / HTTP/1.1\r\n"));
        let asked = sim.asked(Peer::Client);
        assert!(
            asked <= 4096 * req.len(),
            "{asked} bytes asked for a {}-byte head",
            req.len()
        );

        let resp = format!("HTTP/1.1 200 OK\r\nX-Filler: {filler}\r\nContent-Length: 0\r\n\r\n");
        sim.send(Peer::Backend(0), resp.as_bytes());
        assert!(!sim.step());
        let got = text(sim.take(Peer::Client, usize::MAX));
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        let asked = sim.asked(Peer::Backend(0));
        assert!(
            asked <= 4096 * resp.len(),
            "{asked} bytes asked for a {}-byte head",
            resp.len()
        );
    }

    /// A client that sends requests and reads none of the answers (its window holds a
    /// byte) cannot hold its connection open: the proxy's own replies are written within
    /// `--client-write-timeout` like response bodies. (They had no bound: the connection
    /// stayed open, its `--max-client-conns` slot taken, for good.)
    #[test]
    fn a_client_that_reads_no_reply_is_let_go() {
        for req in [
            &b"GET /health HTTP/1.1\r\nHost: lb\r\n\r\n"[..],
            b"\x01\r\n\r\n",
        ] {
            let mut sim = custom(|_| {}, 1, 1 << 16);
            sim.send(Peer::Client, req);
            assert!(!sim.step());
            // The write's limit, then (after a refused head) the lingering close's.
            for _ in 0..2 {
                sim.fire_timers();
                sim.step();
            }
            assert!(sim.ended(), "{:?}", String::from_utf8_lossy(req));
            assert_eq!(sim.take(Peer::Client, usize::MAX), b"H");
        }
    }
}
