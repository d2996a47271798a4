//! Faults of the network between `lb` and a backend: a SYN black hole, a slow and lossy
//! link, a partition mid-stream, and a backend whose receive window stays full.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::relay::{Delay, DelayRelay};
use lb_tests::*;

use crate::{
    completion_got, nft_or_skip, percentile_ms, read_got, report, topology, weighted, Got, Health,
    Rig,
};

/// Case 1. A backend whose host drops every SYN to its port: connecting times out
/// (`--connect-timeout 1s`). With `--connect-retries` the request is sent to the healthy
/// backend instead and the client never sees a 502; without the flag (today's `lb`), the
/// one request that picked the black hole gets `502` after the connect timeout. Either
/// way the black-holed backend is ejected at once (a connect failure is its own) and
/// stays out (its re-probes time out too).
#[test]
fn syn_black_hole_fails_over_to_the_healthy_backend() {
    let case = "syn black hole";
    if !nft_or_skip(case) {
        return;
    }
    let topo = topology(2);
    let _inside = topo.lb.enter();
    let (h0, h1) = (&topo.hosts[0], &topo.hosts[1]);
    let a = h0.ns.run(|| Mock::spawn(&["--bind", &h0.ip.to_string()]));
    let b = h1.ns.run(|| Mock::spawn(&["--bind", &h1.ip.to_string()]));
    let args = [
        "--routing",
        "round-robin",
        "--connect-timeout",
        "1s",
        "--timeout",
        "10s",
        "--connect-retries",
        "2",
    ];
    let rig = Rig::start(&args, &[a.url(), b.url()], || {
        a.health_checks() >= 1 && b.health_checks() >= 1
    });
    h0.black_hole_syns(a.port);

    // Round-robin over two: one of the first two requests picks the black hole.
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        let (got, took) = completion_got(rig.lb.port, Duration::from_secs(15));
        outcomes.push((got, took));
    }
    let summary: Vec<String> = outcomes
        .iter()
        .map(|(g, t)| format!("{:?} in {t:.2?}", g.status()))
        .collect();
    report!("faults: {case}: 4 requests: {summary:?}");
    for (got, _) in &outcomes {
        assert!(
            matches!(got, Got::Whole { .. }),
            "{case}: every request must end cleanly: {got:?}"
        );
    }
    let slow = outcomes
        .iter()
        .filter(|(_, t)| *t >= Duration::from_millis(900))
        .count();
    assert_eq!(
        slow, 1,
        "{case}: exactly one request should have waited for the 1 s connect timeout: {summary:?}"
    );
    for (got, t) in &outcomes {
        assert_eq!(
            got.status(),
            Some(200),
            "{case}: no 502 with --connect-retries ({t:?}): {got:?}"
        );
    }
    for (got, _) in outcomes.iter().filter(|(g, _)| g.status() == Some(200)) {
        let port = serde_json::from_str::<Value>(&got.body_text())
            .ok()
            .and_then(|v| v["backend_port"].as_u64());
        assert_eq!(
            port,
            Some(u64::from(b.port)),
            "{case}: 200 from the healthy backend"
        );
    }
    rig.after_case(case, Health::Ejected(a.port), Duration::from_secs(5));
    h0.heal();
}

/// Case 2. 200 ms ± 50 ms each way (a delaying relay in front of the backend) and 5 %
/// packet loss each way on the backend's link: 60 SSE streams (12 at a time) all arrive
/// whole, every event and `[DONE]`, through a clean end. The first-event and total times
/// are printed (p50, p99, max), not asserted.
#[test]
fn sse_streams_complete_over_a_slow_lossy_link() {
    let case = "slow lossy link";
    if !nft_or_skip(case) {
        return;
    }
    const STREAMS: usize = 60;
    const AT_ONCE: usize = 12;
    const EVENTS: usize = 20;
    let topo = topology(2);
    let _inside = topo.lb.enter();
    let (h0, h1) = (&topo.hosts[0], &topo.hosts[1]);
    // On the slow host the mock listens on its loopback, behind the relay.
    let slow = h0.ns.run(|| Mock::spawn::<&str>(&[]));
    let relay = h0.ns.run(|| {
        DelayRelay::spawn(
            SocketAddr::new(h0.addr(), 0),
            slow.socket_addr(),
            Delay {
                delay: Duration::from_millis(200),
                jitter: Duration::from_millis(50),
            },
            7,
        )
    });
    h0.lose(5);
    let other = h1.ns.run(|| Mock::spawn(&["--bind", &h1.ip.to_string()]));
    // Weights 1000:1 send every stream over the slow link (smooth weighted round robin
    // gives the other backend its one pick in the middle of 1001).
    let rig = Rig::start(
        &["--routing", "weighted-round-robin", "--timeout", "60s"],
        &[
            weighted(&format!("http://{}", relay.addr), 1000),
            weighted(&other.url(), 1),
        ],
        || h0.ns.run(|| slow.health_checks() >= 1) && other.health_checks() >= 1,
    );

    let port = rig.lb.port;
    let started = Instant::now();
    let results = run_concurrently(AT_ONCE, move |worker| {
        (0..STREAMS / AT_ONCE)
            .map(|i| one_stream(port, EVENTS, (worker * 1000 + i) as u64))
            .collect::<Vec<_>>()
    });
    let wall = started.elapsed();
    let results: Vec<_> = results.into_iter().flatten().collect();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{case}: {} of {STREAMS} streams failed: {failures:#?}",
        failures.len()
    );
    let mut first: Vec<Duration> = results.iter().flatten().map(|s| s.first).collect();
    let mut total: Vec<Duration> = results.iter().flatten().map(|s| s.total).collect();
    let slow_port = u64::from(slow.port);
    assert!(
        results
            .iter()
            .flatten()
            .all(|s| s.backend_port == slow_port),
        "{case}: every stream should cross the slow link"
    );
    report!(
        "faults: {case}: {STREAMS} SSE streams of {EVENTS} events ({AT_ONCE} at a time, \
         200±50 ms each way, 5% loss each way) in {wall:.1?}: first event p50 {} ms, \
         p99 {} ms, max {} ms; whole stream p50 {} ms, p99 {} ms, max {} ms",
        percentile_ms(&mut first, 50),
        percentile_ms(&mut first, 99),
        percentile_ms(&mut first, 100),
        percentile_ms(&mut total, 50),
        percentile_ms(&mut total, 99),
        percentile_ms(&mut total, 100),
    );
    h0.heal();
    rig.after_case(case, Health::Kept, Duration::from_secs(5));
    drop(relay);
}

/// One stream's times.
struct StreamTimes {
    first: Duration,
    total: Duration,
    backend_port: u64,
}

/// `GET /sse` through `lb`: the times of its first event and of its clean end, or what
/// went wrong.
fn one_stream(port: u16, events: usize, n: u64) -> Result<StreamTimes, String> {
    let t = Instant::now();
    let mut c = Conn::open(port).map_err(|e| format!("stream {n}: connect: {e}"))?;
    c.set_timeout(Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    c.send_head(
        "GET",
        &format!("/sse?events={events}&interval_ms=20"),
        &[("Accept", "text/event-stream")],
        None,
    )
    .map_err(|e| format!("stream {n}: send: {e}"))?;
    let head = c
        .read_head("GET")
        .map_err(|e| format!("stream {n}: head: {e}"))?;
    if head.status != 200 {
        return Err(format!("stream {n}: status {}", head.status));
    }
    let mut body = c.body(&head);
    let mut data = Vec::new();
    let mut first = None;
    loop {
        match body.read_line() {
            Ok(Some(line)) => {
                if let Some(d) = line.strip_prefix("data:") {
                    first.get_or_insert(t.elapsed());
                    data.push(d.trim().to_string());
                }
            }
            Ok(None) => break,
            Err(e) => return Err(format!("stream {n}: cut after {} events: {e}", data.len())),
        }
    }
    let total = t.elapsed();
    if data.len() != events + 1 || data.last().map(String::as_str) != Some("[DONE]") {
        return Err(format!("stream {n}: {} data lines: {data:?}", data.len()));
    }
    let mut backend_port = 0;
    for (i, d) in data[..events].iter().enumerate() {
        let v: Value = serde_json::from_str(d).map_err(|e| format!("stream {n}: {d:?}: {e}"))?;
        if v["event"].as_u64() != Some(i as u64) {
            return Err(format!("stream {n}: event {i} is {d}"));
        }
        backend_port = v["backend_port"].as_u64().unwrap_or(0);
    }
    Ok(StreamTimes {
        first: first.unwrap_or(total),
        total,
        backend_port,
    })
}

/// Case 3. The backend's link goes silent (every packet dropped both ways) in the middle
/// of an SSE stream that would end after 3 s. No FIN or reset reaches `lb`, so the request
/// deadline (`--timeout 5s`, counted from the request) ends it: the client sees the stream
/// cut (no `[DONE]`, no terminating chunk) by then, the request is released
/// (`active_conns` 0), and the backend stays in (a deadline reached after the head says
/// nothing about the backend). `lb`'s backend socket must have TCP keep-alive on.
#[test]
fn partition_mid_stream_cuts_it_by_the_timeout() {
    partition_mid_stream(
        "partition mid-stream",
        "5s",
        "/sse?events=30&interval_ms=100",
        Duration::from_secs(5) + Duration::from_secs(2),
    );
}

/// Case 3 with no deadline to help (`--timeout 1h`) and a stream that would run for an
/// hour: TCP keep-alive on `lb`'s backend socket finds the dead peer (first probe 15 s
/// after the last segment, then 3 probes 5 s apart: about 30 s), cuts the stream and
/// releases the request. A connection that timed out is the backend's failure: it is
/// ejected (passively; probes bring it back once the link heals).
#[test]
fn partition_mid_stream_is_found_by_tcp_keepalive() {
    partition_mid_stream(
        "partition, no deadline",
        "1h",
        "/sse?events=36000&interval_ms=100",
        Duration::from_secs(60),
    );
}

/// Partitions the backend's link after 5 events of `sse`, with `--timeout timeout`; the
/// client must see the stream cut within `bound` of the request.
fn partition_mid_stream(case: &str, timeout: &str, sse: &str, bound: Duration) {
    if !nft_or_skip(case) {
        return;
    }
    let topo = topology(2);
    let _inside = topo.lb.enter();
    let (h0, h1) = (&topo.hosts[0], &topo.hosts[1]);
    let p = h0.ns.run(|| Mock::spawn(&["--bind", &h0.ip.to_string()]));
    let q = h1.ns.run(|| Mock::spawn(&["--bind", &h1.ip.to_string()]));
    let rig = Rig::start(
        &["--routing", "weighted-round-robin", "--timeout", timeout],
        &[weighted(&p.url(), 1000), weighted(&q.url(), 1)],
        || p.health_checks() >= 1 && q.health_checks() >= 1,
    );

    let mut c = Conn::open(rig.lb.port).unwrap();
    c.set_timeout(bound + Duration::from_secs(20)).unwrap();
    let t0 = Instant::now();
    c.send_head("GET", sse, &[], None).unwrap();
    let head = c.read_head("GET").unwrap();
    assert_eq!(head.status, 200, "{case}");
    let mut body = c.body(&head);
    let mut events = Vec::new();
    while events.len() < 5 {
        let line = body
            .read_line()
            .unwrap_or_else(|e| panic!("{case}: before the partition: {e}"))
            .unwrap_or_else(|| panic!("{case}: the stream ended early"));
        if let Some(d) = line.strip_prefix("data:") {
            events.push(d.trim().to_string());
        }
    }
    h0.partition();
    let partitioned = t0.elapsed();
    // While it hangs: lb's socket to the backend has TCP keep-alive on.
    thread::sleep(Duration::from_millis(300));
    let ss = topo.lb.exec(
        "ss",
        &[
            "-tnoH",
            "state",
            "established",
            "dst",
            &format!("{}:{}", h0.ip, p.port),
        ],
    );
    let ss = String::from_utf8_lossy(&ss.stdout).into_owned();
    let keepalive = ss
        .split_whitespace()
        .find(|w| w.starts_with("timer:(keepalive"))
        .map(str::to_string);
    assert!(
        keepalive.is_some(),
        "{case}: lb's backend socket has no TCP keep-alive timer: {ss:?}"
    );
    let end = loop {
        match body.read_line() {
            Ok(Some(line)) => {
                if let Some(d) = line.strip_prefix("data:") {
                    events.push(d.trim().to_string());
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let cut_at = t0.elapsed();
    assert!(
        end.is_err(),
        "{case}: the stream must end cut, not cleanly; events: {events:?}"
    );
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "{case}: [DONE] cannot have crossed the partition: {events:?}"
    );
    assert!(
        cut_at <= bound,
        "{case}: cut {cut_at:.1?} after the request; it must be cut within {bound:?}"
    );
    report!(
        "faults: {case}: partition {partitioned:.2?} after the request (5 events in), \
         stream cut at {cut_at:.2?} (--timeout {timeout}) with {:?}; lb's backend socket: {}",
        end.err().map(|e| e.kind()).unwrap_or(ErrorKind::Other),
        keepalive.unwrap_or_default(),
    );
    drop(c);
    h0.heal();
    // The request deadline says nothing about the backend; a connection that timed
    // out does.
    let health = if timeout == "1h" {
        Health::Ejected(p.port)
    } else {
        Health::Kept
    };
    rig.after_case(case, health, Duration::from_secs(3));
}

/// A backend that reads request heads (to answer `lb`'s probes) and, for any other
/// request, never reads again: its receive window fills and stays full. It holds the
/// connections open until dropped.
struct Sink {
    addr: SocketAddr,
    probes: Arc<AtomicUsize>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Sink {
    /// Listen on a free port of `ip` (in the calling thread's namespace).
    fn spawn(ip: std::net::IpAddr) -> Sink {
        let listener = TcpListener::bind((ip, 0)).expect("bind the sink");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let probes = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (pr, hd, st) = (probes.clone(), held.clone(), stop.clone());
        let accept = thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (pr, hd) = (pr.clone(), hd.clone());
                        thread::spawn(move || sink_one(s, &pr, &hd));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Sink {
            addr,
            probes,
            held,
            stop,
            accept: Some(accept),
        }
    }
}

/// Read one request head; answer a probe, hold anything else unread.
fn sink_one(s: TcpStream, probes: &AtomicUsize, held: &Mutex<Vec<TcpStream>>) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: not one byte past the head is taken off the socket.
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match (&s).read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    if String::from_utf8_lossy(&head).contains("health-check") {
        probes.fetch_add(1, Ordering::SeqCst);
        let _ = (&s).write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"data\":[]}",
        );
        let _ = s.shutdown(Shutdown::Write);
        return;
    }
    held.lock().unwrap().push(s);
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.held.lock().unwrap().clear();
    }
}

/// Case 4. A 64 MiB upload (generated as it is sent) to a backend that accepted the
/// connection but never reads the body: once its window and `lb`'s buffers are full
/// nothing moves. `lb` must end the exchange by `--timeout 5s` (`504`, `502`, or the
/// connection cut), not hang, and let go of the backend connection; the backend is
/// ejected (no response head before the deadline is its failure).
#[test]
fn upload_to_a_backend_that_never_reads_ends_by_the_timeout() {
    let case = "never-reading backend";
    if !crate::namespaces_or_skip(case) {
        return;
    }
    const TIMEOUT: Duration = Duration::from_secs(5);
    const SIZE: u64 = 64 << 20;
    let topo = topology(2);
    let _inside = topo.lb.enter();
    let (h0, h1) = (&topo.hosts[0], &topo.hosts[1]);
    let sink = h0.ns.run(|| Sink::spawn(h0.addr()));
    let other = h1.ns.run(|| Mock::spawn(&["--bind", &h1.ip.to_string()]));
    let rig = Rig::start(
        &["--routing", "weighted-round-robin", "--timeout", "5s"],
        &[
            weighted(&format!("http://{}", sink.addr), 1000),
            weighted(&other.url(), 1),
        ],
        || sink.probes.load(Ordering::SeqCst) >= 1 && other.health_checks() >= 1,
    );

    let mut c = Conn::open(rig.lb.port).unwrap();
    let t0 = Instant::now();
    c.send_head(
        "POST",
        "/upload",
        &[("Content-Type", "application/octet-stream")],
        Some(SIZE),
    )
    .unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let mut w = c.stream().try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let sent_w = sent.clone();
    let writer = thread::spawn(move || {
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut left = SIZE as usize;
        while left > 0 {
            let n = left.min(chunk.len());
            if w.write_all(&chunk[..n]).is_err() {
                return;
            }
            sent_w.fetch_add(n, Ordering::SeqCst);
            left -= n;
        }
    });
    let got = read_got(&mut c, "POST", Duration::from_secs(20));
    let ended = t0.elapsed();
    let _ = c.stream().shutdown(Shutdown::Both);
    writer.join().unwrap();
    let sent = sent.load(Ordering::SeqCst);
    report!(
        "faults: {case}: after {:.1} MiB of 64 MiB the client got {} at {ended:.2?} (--timeout 5s)",
        sent as f64 / f64::from(1 << 20),
        match &got {
            Got::Nothing { error } => format!("no response ({error})"),
            g => format!("{:?}", g.status()),
        }
    );
    assert!(
        (sent as u64) < SIZE,
        "{case}: the whole upload went through a backend that never reads"
    );
    assert!(
        matches!(got.status(), Some(502 | 504) | None),
        "{case}: want 504/502 or a cut: {got:?}"
    );
    assert!(
        ended <= TIMEOUT + Duration::from_secs(2),
        "{case}: ended {ended:.1?} after the request; --timeout is {TIMEOUT:?}"
    );
    drop(c);
    // Gone before the last checks: a re-probe that brought it back would take the normal
    // request (weight 1000) and hold it too.
    let sink_port = sink.addr.port();
    drop(sink);
    rig.after_case(case, Health::Ejected(sink_port), Duration::from_secs(3));
}
