//! A delaying TCP relay: the latency of a long link, in user space (the kernel's `netem`
//! is not available everywhere these tests run).
//!
//! Each accepted connection is joined to a new connection to the target, and every byte
//! is held for a delay drawn uniformly from `delay ± jitter` (per read, seeded) before it
//! is passed on, each way. Bytes keep their order (a read is never released before the
//! one before it), so jitter shows as bunching, as on a real TCP link. A FIN is passed on
//! after the same delay; a reset or error on either side closes both. Blocking I/O, two
//! threads per direction of a connection; everything stops within 100 ms of the drop.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

/// How often blocked threads look at the stop flag.
const TICK: Duration = Duration::from_millis(100);

/// A running relay; stops when dropped.
pub struct DelayRelay {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    accept: Option<thread::JoinHandle<()>>,
}

/// The delay of one read: `delay ± jitter`, uniformly.
#[derive(Clone, Copy, Debug)]
pub struct Delay {
    /// The mean.
    pub delay: Duration,
    /// The most either side of the mean.
    pub jitter: Duration,
}

impl DelayRelay {
    /// Listen on `listen` (port 0 picks one) and relay every connection to `target`,
    /// delayed by `delay`; `seed` seeds the delays. Binds and connects in the network
    /// namespace of the calling thread.
    pub fn spawn(listen: SocketAddr, target: SocketAddr, delay: Delay, seed: u64) -> DelayRelay {
        assert!(delay.jitter <= delay.delay, "jitter larger than the delay");
        let listener =
            TcpListener::bind(listen).unwrap_or_else(|e| panic!("relay: bind {listen}: {e}"));
        let addr = listener.local_addr().expect("local_addr");
        listener.set_nonblocking(true).expect("set_nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (st, acc) = (stop.clone(), accepted.clone());
        let accept = thread::spawn(move || {
            let mut n = 0u64;
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        acc.fetch_add(1, Ordering::SeqCst);
                        n += 1;
                        let st = st.clone();
                        let seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(n);
                        thread::spawn(move || join(client, target, delay, seed, st));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        DelayRelay {
            addr,
            stop,
            accepted,
            accept: Some(accept),
        }
    }

    /// How many connections it accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Relay one accepted connection to `target`, both ways.
fn join(client: TcpStream, target: SocketAddr, delay: Delay, seed: u64, stop: Arc<AtomicBool>) {
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
        return; // dropping `client` closes it: the peer sees the target refuse
    };
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(TICK));
    }
    let pumps = [
        (client.try_clone(), server.try_clone(), seed),
        (server.try_clone(), client.try_clone(), seed ^ 0x5555),
    ];
    let mut handles = Vec::new();
    for (from, to, seed) in pumps {
        let (Ok(from), Ok(to)) = (from, to) else {
            return;
        };
        let stop = stop.clone();
        handles.push(thread::spawn(move || pump(from, to, delay, seed, stop)));
    }
    for h in handles {
        let _ = h.join();
    }
}

/// What a direction's reader hands its writer.
enum Held {
    /// Bytes to write at the instant.
    Bytes(Instant, Vec<u8>),
    /// The reader saw EOF: pass the FIN on at the instant.
    Fin(Instant),
    /// The reader failed (reset): close both sides now.
    Abort,
}

/// Read `from` and write to `to`, each read held for its delay.
fn pump(from: TcpStream, to: TcpStream, delay: Delay, seed: u64, stop: Arc<AtomicBool>) {
    let (tx, rx) = mpsc::channel::<Held>();
    let writer_stop = stop.clone();
    let (w_from, w_to) = (from.try_clone(), to.try_clone());
    let writer = thread::spawn(move || {
        let (Ok(from), Ok(mut to)) = (w_from, w_to) else {
            return;
        };
        loop {
            let held = match rx.recv_timeout(TICK) {
                Ok(h) => h,
                Err(mpsc::RecvTimeoutError::Timeout) if !writer_stop.load(Ordering::SeqCst) => {
                    continue
                }
                Err(_) => Held::Abort,
            };
            match held {
                Held::Bytes(at, bytes) => {
                    sleep_until(at, &writer_stop);
                    if to.write_all(&bytes).is_err() {
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                        return;
                    }
                }
                Held::Fin(at) => {
                    sleep_until(at, &writer_stop);
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                Held::Abort => {
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    });
    let mut rng = SmallRng::seed_from_u64(seed);
    let lo = delay.delay - delay.jitter;
    let span = (delay.jitter * 2).as_micros() as u64;
    let mut last = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    let mut from = from;
    loop {
        if stop.load(Ordering::SeqCst) {
            let _ = tx.send(Held::Abort);
            break;
        }
        let d = lo + Duration::from_micros(rng.random_range(0..=span));
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(Held::Fin((Instant::now() + d).max(last)));
                break;
            }
            Ok(n) => {
                last = (Instant::now() + d).max(last);
                if tx.send(Held::Bytes(last, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                let _ = tx.send(Held::Abort);
                break;
            }
        }
    }
    let _ = writer.join();
}

fn sleep_until(at: Instant, stop: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= at || stop.load(Ordering::SeqCst) {
            return;
        }
        thread::sleep((at - now).min(TICK));
    }
}
