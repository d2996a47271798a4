//! Limits and lifecycle: many concurrent slow requests, `--max-conns` (429),
//! and graceful shutdown on SIGTERM/SIGINT.

use std::time::{Duration, Instant};

use lb_tests::*;

#[test]
fn thousand_concurrent_slow_requests_all_succeed() {
    const N: usize = 1000;
    raise_fd_limit();
    assert!(
        fd_limit() >= 2 * N as u64 + 100,
        "the test process needs {} open files, has {}",
        2 * N + 100,
        fd_limit()
    );
    let a = Mock::spawn(&["--delay", "1s"]);
    let b = Mock::spawn(&["--delay", "1s"]);
    // lb starts with a soft limit of 1024 open files: 1000 clients plus 1000
    // upstream connections need more, so lb must raise its own limit.
    let lb = Lb::spawn_with(
        &["--backends", &a.url(), &b.url(), "--health-path", "/stats"],
        LbOptions {
            nofile_soft: Some(1024),
            ..LbOptions::default()
        },
    );
    lb.wait_healthy(2);
    let port = lb.port;
    let t = Instant::now();
    let res = run_concurrently(N, move |_| {
        try_completion(port).map(|r| (r.status, r.backend_port()))
    });
    let took = t.elapsed();
    let mut ok = 0;
    let mut errors = Vec::new();
    for r in &res {
        match r {
            Ok((200, _)) => ok += 1,
            other => errors.push(format!("{other:?}")),
        }
    }
    errors.sort();
    errors.dedup();
    assert_eq!(
        ok,
        N,
        "{} of {N} failed (took {took:?}); distinct outcomes: {errors:?}",
        N - ok
    );
    eprintln!("{N} concurrent 1 s requests took {took:?}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert_eq!(a.requests() + b.requests(), N as u64);
    assert!(a.requests() > 0 && b.requests() > 0);
    lb.wait_active(0, DEADLINE);
    let h = lb.wait_healthy(2);
    assert_eq!(h["status"], "ok");
}

#[test]
fn max_conns_gives_exactly_the_expected_429s() {
    let a = Mock::spawn(&["--delay", "2s"]);
    let b = Mock::spawn(&["--delay", "2s"]);
    let lb = Lb::spawn(&[
        "--backends",
        &a.url(),
        &b.url(),
        "--max-conns",
        "1",
        "--health-path",
        "/stats",
    ]);
    lb.wait_healthy(2);
    lb.wait_probed(2);
    let port = lb.port;
    let res = run_concurrently(3, move |_| {
        let t = Instant::now();
        (try_completion(port).expect("request"), t.elapsed())
    });
    let mut ok = Vec::new();
    let mut limited = Vec::new();
    for (r, took) in res {
        match r.status {
            200 => ok.push(r.backend_port().unwrap()),
            429 => {
                assert_eq!(r.header("retry-after"), Some("1"), "{:?}", r.headers);
                let e = assert_error_json(&r, 429);
                assert_eq!(e["type"], "rate_limit_error", "{e}");
                assert!(
                    took < Duration::from_millis(1500),
                    "the 429 should be immediate, took {took:?}"
                );
                limited.push(took);
            }
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    assert_eq!(ok.len(), 2, "two requests fit (one per backend)");
    assert_eq!(limited.len(), 1, "the third is refused with 429");
    ok.sort();
    let mut expected = vec![a.port, b.port];
    expected.sort();
    assert_eq!(ok, expected, "one request on each backend");

    // Capacity comes back once they finish.
    lb.wait_active(0, DEADLINE);
    let res = run_concurrently(2, move |_| try_completion(port).expect("request").status);
    assert_eq!(res, vec![200, 200]);
    let h = lb.wait_healthy(2);
    assert_eq!(
        h["healthy_backends"], 2,
        "429s must not eject backends: {h}"
    );
}

#[test]
fn sigterm_lets_the_in_flight_request_finish() {
    let m = Mock::spawn(&["--delay", "3s"]);
    let mut lb = Lb::spawn(&["--backends", &m.url(), "--health-path", "/stats"]);
    lb.wait_healthy(1);
    let port = lb.port;
    let inflight = std::thread::spawn(move || {
        let t = Instant::now();
        (try_completion(port), t.elapsed())
    });
    wait_until(
        DEADLINE,
        "the request in flight at the backend",
        || m.in_flight(),
        |n| *n == 1,
    );
    let t = Instant::now();
    lb.signal("TERM");

    // lb stops accepting: within a moment new connections are refused (or,
    // at least, not served).
    let stopped = poll(Duration::from_millis(2000), || {
        match Conn::open_timeout(port, Duration::from_millis(300)) {
            Err(_) => Some("refused"),
            Ok(mut c) => {
                let _ = c.set_timeout(Duration::from_millis(300));
                match c.request("GET", "/health", &[("Connection", "close")], None) {
                    Err(_) => Some("not answered"),
                    Ok(r) if r.status == 503 => Some("503"),
                    Ok(_) => None,
                }
            }
        }
    });
    assert!(
        stopped.is_some(),
        "lb still served new requests 2 s after SIGTERM"
    );

    let (r, took) = inflight.join().unwrap();
    let r = r.expect("the in-flight request completes");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(took >= Duration::from_millis(2500), "took {took:?}");
    let st = lb
        .wait_exit(Duration::from_secs(10))
        .expect("lb exits after draining");
    assert!(st.success(), "lb exited with {st} after SIGTERM");
    eprintln!("lb exited {:?} after SIGTERM", t.elapsed());
    assert_eq!(m.requests(), 1, "nothing new was proxied after SIGTERM");
}

#[test]
fn sigint_on_an_idle_lb_exits_0() {
    let m = Mock::spawn::<&str>(&[]);
    let mut lb = Lb::spawn(&["--backends", &m.url()]);
    assert_eq!(lb.completion().status, 200);
    lb.signal("INT");
    let st = lb
        .wait_exit(Duration::from_secs(10))
        .expect("lb exits on SIGINT");
    assert!(st.success(), "lb exited with {st} after SIGINT");
}

#[test]
fn sigterm_with_no_traffic_exits_promptly() {
    let m = Mock::spawn::<&str>(&[]);
    let mut lb = Lb::spawn(&["--backends", &m.url()]);
    let t = Instant::now();
    lb.signal("TERM");
    let st = lb
        .wait_exit(Duration::from_secs(10))
        .expect("lb exits on SIGTERM");
    assert!(st.success(), "lb exited with {st}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "an idle lb took {:?} to exit",
        t.elapsed()
    );
}

#[test]
fn shutdown_timeout_bounds_the_drain() {
    let m = Mock::spawn(&["--delay", "30s"]);
    let mut lb = Lb::spawn(&[
        "--backends",
        &m.url(),
        "--health-path",
        "/stats",
        "--shutdown-timeout",
        "1s",
    ]);
    lb.wait_healthy(1);
    let port = lb.port;
    let inflight = std::thread::spawn(move || try_completion(port));
    wait_until(
        DEADLINE,
        "the request in flight at the backend",
        || m.in_flight(),
        |n| *n == 1,
    );
    let t = Instant::now();
    lb.signal("TERM");
    let st = lb
        .wait_exit(Duration::from_secs(10))
        .expect("lb exits once --shutdown-timeout passes");
    let took = t.elapsed();
    eprintln!("lb exited with {st} {took:?} after SIGTERM (--shutdown-timeout 1s)");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(8),
        "--shutdown-timeout 1s: lb exited {took:?} after SIGTERM"
    );
    // The cut-off request fails rather than hangs.
    let r = inflight.join().unwrap();
    assert!(
        !matches!(&r, Ok(r) if r.status == 200),
        "the request cut off by the shutdown timeout cannot have succeeded: {r:?}"
    );
}

#[test]
fn sigterm_lets_an_sse_stream_finish() {
    let m = Mock::spawn::<&str>(&[]);
    let mut lb = Lb::spawn(&["--backends", &m.url()]);
    let mut c = Conn::open(lb.port).unwrap();
    c.send_head("GET", "/sse?events=12&interval_ms=200", &[], None)
        .unwrap();
    let head = c.read_head("GET").unwrap();
    assert_eq!(head.status, 200);
    let mut body = c.body(&head);
    let first = body.read_line().unwrap().expect("first event");
    assert!(first.starts_with("data:"), "{first:?}");
    lb.signal("TERM");
    let mut events = 1;
    let mut done = false;
    while let Some(line) = body
        .read_line()
        .unwrap_or_else(|e| panic!("stream cut by SIGTERM after {events} events: {e}"))
    {
        if line == "data: [DONE]" {
            done = true;
        } else if line.starts_with("data:") {
            events += 1;
        }
    }
    assert_eq!(events, 12, "every event arrives");
    assert!(done, "the stream ends with [DONE]");
    let st = lb
        .wait_exit(Duration::from_secs(10))
        .expect("lb exits after the stream");
    assert!(st.success(), "lb exited with {st}");
}

#[test]
fn sigterm_as_soon_as_lb_accepts_exits_0() {
    // Once lb accepts connections, SIGTERM must mean a graceful exit (0),
    // not death by the signal: handlers go in before the listener opens.
    let m = Mock::spawn::<&str>(&[]);
    let mut lb = Lb::spawn_with(
        &["--backends", &m.url()],
        LbOptions {
            no_wait: true,
            ..LbOptions::default()
        },
    );
    let port = lb.port;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let up = poll(DEADLINE, || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
    });
    assert!(up.is_some(), "lb never accepted a connection");
    lb.signal("TERM");
    let st = lb
        .wait_exit(Duration::from_secs(10))
        .expect("lb exits on SIGTERM");
    assert!(
        st.success(),
        "lb accepted a connection, then a SIGTERM made it exit with {st}"
    );
}

/// Content-based routing reads a body prefix before choosing a backend. A client that
/// sends one-byte chunks each with a 4 KB chunk extension used to grow the smol build's
/// memory without bound (the prefix was bounded in data, not in bytes read: 3 MB to 304
/// MB of RSS after 300 MiB sent). Now the body's extensions are bounded (16 KiB in all,
/// as hyper bounds them): the request gets 400 in both builds (what the client sent
/// before that sits in socket buffers, not in lb), and memory stays small.
#[test]
fn chunk_extensions_cannot_grow_memory() {
    use std::io::{Read, Write};
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&[
        "--backends",
        &m.url(),
        "--routing",
        "cache-aware",
        "--max-conns",
        "8",
    ]);
    lb.wait_healthy(1);
    let before = lb.vm_hwm_kib();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", lb.port)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\n",
    )
    .unwrap();
    let chunk = format!("1;{}\r\n{{\r\n", "e".repeat(4000));
    let mut sent = 0usize;
    // Until lb answers or closes (a write fails), at most 8 MiB.
    while sent < 8 << 20 {
        if s.write_all(chunk.as_bytes()).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 400"),
        "after {sent} bytes of extensions: {reply:?}"
    );
    let grew = lb.vm_hwm_kib().saturating_sub(before);
    assert!(grew < 16 * 1024, "peak RSS grew by {grew} KiB");
    // Nothing reached the backend, and lb still serves.
    assert_eq!(m.requests(), 0);
    assert_eq!(lb.completion().status, 200);
}
