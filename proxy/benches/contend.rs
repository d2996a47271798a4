//! `cargo bench -p lb-proxy --bench contend`: the core's lock on the request path.
//!
//! Every request takes the `Proxy`'s one lock twice: `Proxy::select` (the core's pick and
//! the backend's handle) and `Proxy::release` (the core's release, then the hand-over of
//! queue admissions and the core's events). These benches run exactly that path, through
//! the public API the adapters call (`select`, then `LeaseGuard::respond`), on a proxy
//! with three backends and the CLI's defaults (`least-conn`, no `--max-conns`) unless the
//! name says otherwise; no probes run (the runtime here never runs a task).
//!
//! - `request/select_release`: one request's select + release on one thread: the
//!   uncontended cost, lock included.
//! - `lock_hold/*`: how long the lock is held, the holds timed from inside (the
//!   `lock-timing` feature: the clock read after the lock is taken and just before it is
//!   let go). The time reported is the holds' sum per request (per call for `empty`).
//!   `empty` is `Proxy::in_flight` (the lock held to read one counter): what the two
//!   clock reads add to each hold, to subtract. `per_request` is one thread;
//!   `per_request_2_threads` has two threads on one proxy, so the lock and the core's
//!   data move between cores as they would past one core (on a 2-core machine only).
//!   `capped`: `--max-conns 100 --queue-timeout 1s` (the cap checked, the queue on).
//! - `threads/N`: N threads run select + release on one shared proxy; the time is the
//!   wall time per request, all threads together (the inverse of the throughput). On a
//!   machine with fewer than N cores this shows what contention costs (lock hand-offs,
//!   a holder descheduled while others wait), not how it scales. `LB_BENCH_THREADS=1,2,16`
//!   picks other counts (1, 2, 4 and 8 by default), for a machine with more cores.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lb_core::RequestMeta;
use lb_proxy::settings::parse_backend;
use lb_proxy::{Fetched, Proxy, Runtime, Settings, StartError, Target, Upstream};

/// A runtime that never runs anything: the proxy serves `select` and `release` only.
struct Idle;

impl Runtime for Idle {
    const NAME: &'static str = "bench";
    type Backend = ();

    fn backend(&self, _: &Target) -> Result<(), StartError> {
        Ok(())
    }

    fn sleep_until(&self, _: Instant) -> impl std::future::Future<Output = ()> + Send + 'static {
        std::future::pending()
    }

    fn spawn(&self, _: impl std::future::Future<Output = ()> + Send + 'static) {}

    #[allow(clippy::manual_async_fn)]
    fn get(
        &self,
        _: &Arc<Upstream<Self>>,
        _: &str,
        _: usize,
    ) -> impl std::future::Future<Output = Result<Fetched, String>> + Send + 'static {
        async { Err("no".into()) }
    }
}

/// A proxy with three backends; `capped`: `--max-conns 100 --queue-timeout 1s`.
fn proxy(capped: bool) -> Arc<Proxy<Idle>> {
    let max_conns = if capped { 100 } else { 0 };
    let backends = (0..3)
        .map(|i| parse_backend(&format!("http://127.0.0.1:{}", 9001 + i), max_conns).unwrap())
        .collect();
    let mut settings = Settings::new("127.0.0.1:0".parse().unwrap(), backends);
    if capped {
        settings.max_conns = max_conns;
        settings.core.queue.timeout = Some(Duration::from_secs(1));
    }
    Proxy::new(settings, Arc::new(|_| {}), Idle, Instant::now()).unwrap()
}

/// One request's pass through the core, as the adapters make it.
fn request(p: &Arc<Proxy<Idle>>, ip: IpAddr) {
    let meta = RequestMeta::from_ip(ip);
    let guard = p.select(black_box(&meta)).expect("a backend is free");
    guard.respond(200);
}

fn ip(thread: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, thread as u8 + 1))
}

/// Runs `per_thread` requests on each of `threads` threads at once on `p`; the wall time
/// from their common start to the last one's end.
fn run_threads(p: &Arc<Proxy<Idle>>, threads: usize, per_thread: u64) -> Duration {
    let start = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    for _ in 0..per_thread {
                        request(p, ip(t));
                    }
                })
            })
            .collect();
        start.wait();
        let began = Instant::now();
        for w in workers {
            w.join().unwrap();
        }
        began.elapsed()
    })
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

fn uncontended(c: &mut Criterion) {
    let p = proxy(false);
    c.bench_function("request/select_release", |b| b.iter(|| request(&p, ip(0))));
}

fn lock_hold(c: &mut Criterion) {
    let mut group = c.benchmark_group("lock_hold");
    let p = proxy(false);
    group.bench_function("empty", |b| {
        b.iter_custom(|iters| {
            lb_proxy::hold::start();
            for _ in 0..iters {
                black_box(p.in_flight());
            }
            let holds = lb_proxy::hold::stop();
            assert_eq!(holds.count, iters);
            holds.total
        })
    });
    for (name, capped) in [("per_request", false), ("per_request_capped", true)] {
        let p = proxy(capped);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                lb_proxy::hold::start();
                for _ in 0..iters {
                    request(&p, ip(0));
                }
                let holds = lb_proxy::hold::stop();
                // Two holds per request (select, release), nothing else on the way.
                assert_eq!(holds.count, 2 * iters);
                holds.total
            })
        });
    }
    group.bench_function("per_request_2_threads", |b| {
        b.iter_custom(|iters| {
            lb_proxy::hold::start();
            run_threads(&p, 2, iters);
            let holds = lb_proxy::hold::stop();
            assert_eq!(holds.count, 2 * 2 * iters);
            holds.total / 2
        })
    });
    group.finish();
}

fn threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("threads");
    let p = proxy(false);
    let counts: Vec<usize> = match std::env::var("LB_BENCH_THREADS") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("LB_BENCH_THREADS: counts like 1,2,4,8")
            })
            .collect(),
        Err(_) => vec![1, 2, 4, 8],
    };
    for n in counts {
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| run_threads(&p, n, iters) / n as u32)
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = uncontended, lock_hold, threads
}
criterion_main!(benches);
