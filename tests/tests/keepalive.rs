//! The keep-alive race (both builds): a backend that closes an idle keep-alive connection
//! just as `lb` reuses it, or that closes right after every response without saying so,
//! must cost no request and never eject the backend. Requests that lose the race are sent
//! again on a new connection (`lb` holds them whole); `Keep-Alive: timeout=N` lowers the
//! backend's pool idle limit.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_tests::*;
use serde_json::json;

/// `n` requests, alternating GET and a small (non-idempotent) POST, each on a new client
/// connection, with `gap` (a range, from a seeded sequence) between them. Every one must
/// get 200 from the one backend, and it must never be marked unhealthy.
fn every_request_succeeds(mock_args: &[&str], n: usize, gap_ms: (u64, u64)) {
    let m = Mock::spawn(mock_args);
    let lb = Lb::spawn(&["--backends", &m.url(), "--health-check-interval", "60s"]);
    lb.wait_healthy(1);
    let body = serde_json::to_vec(&json!({"prompt": "x"})).unwrap();
    let mut failed = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..n {
        let r = if i % 2 == 0 {
            request(lb.port, "GET", "/race", &[], None)
        } else {
            request(
                lb.port,
                "POST",
                "/v1/completions",
                &[("Content-Type", "application/json")],
                Some(&body),
            )
        };
        match r {
            Ok(r) if r.status == 200 => {}
            Ok(r) => failed.push((i, r.status, r.text())),
            Err(e) => failed.push((i, 0, e.to_string())),
        }
        if gap_ms.1 > 0 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let span = gap_ms.1 - gap_ms.0;
            let us = gap_ms.0 * 1000 + seed % (span * 1000 + 1);
            std::thread::sleep(Duration::from_micros(us));
        }
    }
    let closes = m.stats()["idle_closes"].as_u64().unwrap_or(0);
    assert!(
        failed.is_empty(),
        "{} of {n} requests failed (backend closed {closes} connections): {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // The backend did close connections under lb's feet: the race was run.
    assert!(closes > 0, "the backend closed no connection");
    let unhealthy = lb.log.matching(|l| is_unhealthy_line(l, m.port));
    assert!(unhealthy.is_empty(), "marked unhealthy: {unhealthy:?}");
    assert_eq!(lb.health().1["healthy_backends"], 1);
}

/// The backend's idle limit (25 ms) runs out just as the next request arrives: the
/// 300 ms edge of the repro, scaled down so 1000 requests take half a minute.
#[test]
fn requests_at_the_backends_idle_limit_all_succeed() {
    every_request_succeeds(&["--idle-timeout", "25ms"], 1000, (24, 26));
}

/// The backend closes each connection 1 ms after its response, without `Connection:
/// close`; the next request comes 0 to 2 ms after the last, so it often meets the close.
#[test]
fn a_backend_closing_after_every_response_costs_nothing() {
    every_request_succeeds(&["--close-after", "1ms"], 1000, (0, 2));
}

/// The same backend, closing at once: the close races the very next request.
#[test]
fn a_backend_closing_at_once_after_every_response_costs_nothing() {
    every_request_succeeds(&["--close-after", "0ms"], 500, (0, 1));
}

/// `Keep-Alive: timeout=1` lowers the backend's idle limit to 500 ms: a connection idle
/// for 800 ms is not reused (the default limit, 4 s, would reuse it). Both requests go on
/// one client connection, so through one shard's pool.
#[test]
fn keep_alive_timeout_lowers_the_idle_limit() {
    for (announce, reused) in [(Some("1"), false), (None, true)] {
        let mut args = vec![];
        if let Some(n) = announce {
            args.extend(["--keep-alive-header", n]);
        }
        let m = Mock::spawn(&args);
        let lb = Lb::spawn(&["--backends", &m.url(), "--health-check-interval", "60s"]);
        lb.wait_healthy(1);
        // The start-up probe's connection is counted before the requests'.
        poll(Duration::from_secs(10), || {
            (m.health_checks() > 0).then_some(())
        })
        .expect("the start-up probe");
        let mut c = Conn::open(lb.port).unwrap();
        assert_eq!(c.request("GET", "/first", &[], None).unwrap().status, 200);
        let before = m.stats()["connections"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(c.request("GET", "/second", &[], None).unwrap().status, 200);
        let after = m.stats()["connections"].as_u64().unwrap();
        // One new connection is the stats request's own.
        let was_reused = after == before + 1;
        assert_eq!(
            was_reused, reused,
            "announce {announce:?}: connections {before} -> {after}"
        );
    }
}

/// A backend that answers its first `/race` request on a connection, and on the second
/// stops listening (new connections are refused) and then closes that connection without
/// an answer: it died just as `lb` reused the connection. Everything else gets 200
/// (`/healthz`, the probe) or 404.
struct Dying {
    port: u16,
    /// `/race` requests it read, answered or not.
    races: Arc<AtomicUsize>,
}

impl Dying {
    fn spawn() -> Dying {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let races = Arc::new(AtomicUsize::new(0));
        // Set by a connection to close the listener; then the listener is gone.
        let (die, dead) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (r, d, gone) = (races.clone(), die.clone(), dead.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            while !d.load(Ordering::Acquire) && started.elapsed() < Duration::from_secs(120) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (r, d, gone) = (r.clone(), d.clone(), gone.clone());
                        std::thread::spawn(move || Dying::serve(s, &r, &d, &gone));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            drop(listener);
            gone.store(true, Ordering::Release);
        });
        Dying { port, races }
    }

    fn serve(s: TcpStream, races: &AtomicUsize, die: &AtomicBool, dead: &AtomicBool) {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut mine = 0;
        for _ in 0..100 {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let path = line.split(' ').nth(1).unwrap_or("").to_string();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 {
                    return;
                }
                if h == "\r\n" {
                    break;
                }
            }
            let answer: &[u8] = if path == "/race" {
                races.fetch_add(1, Ordering::AcqRel);
                mine += 1;
                if mine == 2 {
                    die.store(true, Ordering::Release);
                    let t = Instant::now();
                    while !dead.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(10) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    return; // the connection closes unanswered
                }
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nA-ok"
            } else if path == "/healthz" {
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
            };
            if (&s).write_all(answer).is_err() {
                return;
            }
        }
    }
}

/// The keep-alive race where the backend died: the request is sent again on a new
/// connection, which is refused; like any request that reached no backend, it goes to
/// another one (both builds, one rule). Round robin over the dying backend and a mock, on
/// one client connection (one shard, so one pool): the second request that reaches the
/// dying backend meets the race.
#[test]
fn a_race_with_a_dead_backend_fails_over() {
    let a = Dying::spawn();
    let b = Mock::spawn(&["--health-endpoint", "/healthz"]);
    let lb = Lb::spawn(&[
        "--backends",
        &format!("http://127.0.0.1:{}", a.port),
        &b.url(),
        "--routing",
        "round-robin",
        "--health-path",
        "/healthz",
        "--health-check-interval",
        "60s",
    ]);
    lb.wait_healthy(2);
    let mut c = Conn::open(lb.port).unwrap();
    let mut answers = Vec::new();
    for _ in 0..6 {
        let before = a.races.load(Ordering::Acquire);
        let r = c.request("GET", "/race", &[], None).unwrap();
        let reached_a = a.races.load(Ordering::Acquire) > before;
        answers.push((
            r.status,
            reached_a,
            String::from_utf8_lossy(&r.body).into_owned(),
        ));
        if a.races.load(Ordering::Acquire) == 2 {
            break;
        }
    }
    assert_eq!(a.races.load(Ordering::Acquire), 2, "{answers:?}");
    let (status, _, body) = answers.last().unwrap();
    assert_eq!(*status, 200, "{answers:?}");
    assert_ne!(body, "A-ok", "the last answer came from the mock");
    assert!(answers.iter().all(|(s, _, _)| *s == 200), "{answers:?}");
    // The mock served its own share plus the failed-over request.
    let served = b.stats()["requests"].as_u64().unwrap();
    let to_a = answers.iter().filter(|(_, at_a, _)| *at_a).count() as u64;
    assert_eq!(served, answers.len() as u64 - to_a + 1, "{answers:?}");
}
