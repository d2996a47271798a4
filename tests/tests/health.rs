//! Health: active probes (first sweep at startup, fall=1, rise=2), passive
//! ejection on real traffic, the `[HEALTH]`/`[STATUS]` log lines, and
//! backends that close idle keep-alive connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_tests::*;

#[test]
fn failing_backend_is_excluded_after_the_startup_sweep() {
    let a = Mock::spawn::<&str>(&[]);
    let b = Mock::spawn::<&str>(&[]);
    let bad = Mock::spawn(&["--mode", "failing"]);
    let lb = Lb::spawn(&["--backends", &a.url(), &b.url(), &bad.url()]);
    // The startup sweep finds it; the default interval (30 s) is not waited for.
    let t = Instant::now();
    let h = lb.wait_healthy_within(2, Duration::from_secs(10));
    assert_eq!(h["total_backends"], 3, "{h}");
    assert_eq!(h["status"], "ok", "{h}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "excluded after {:?}",
        t.elapsed()
    );
    let line = lb
        .log
        .wait_for(Duration::from_secs(5), |l| is_unhealthy_line(l, bad.port))
        .expect("a [HEALTH] ... marked as unhealthy line for the failing backend");
    assert!(line.contains('('), "the line should give a cause: {line:?}");

    let port = lb.port;
    let res = run_concurrently(30, move |_| try_completion(port));
    for r in res {
        let r = r.expect("completion");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_ne!(r.backend_port(), Some(bad.port));
    }
    assert_eq!(bad.requests(), 0, "the failing backend must get no traffic");
    assert_eq!(a.requests() + b.requests(), 30);
}

#[test]
fn flaky_backend_is_ejected_after_its_first_500() {
    // lb does not retry: a request that the flaky backend fails reaches the
    // client as that backend's 500, and the 5xx ejects the backend at once
    // (passively); with a 60 s probe interval (rise=2) it stays out for the
    // rest of the test. So: most requests succeed, every failure comes from
    // the flaky backend, and once it failed it gets no more traffic.
    let a = Mock::spawn::<&str>(&[]);
    let b = Mock::spawn::<&str>(&[]);
    let flaky = Mock::spawn(&["--mode", "flaky", "--failure-rate", "0.5", "--seed", "7"]);
    let lb = Lb::spawn(&[
        "--routing",
        "round-robin",
        "--health-check-interval",
        "60s",
        "--backends",
        &a.url(),
        &b.url(),
        &flaky.url(),
    ]);
    lb.wait_healthy(3);

    let mut ok = 0;
    let mut failures = Vec::new();
    let mut flaky_requests_at_first_failure = None;
    for i in 0..60 {
        let r = lb.completion();
        match r.status {
            200 => ok += 1,
            500 => {
                assert_eq!(
                    r.backend_port(),
                    Some(flaky.port),
                    "only the flaky backend fails: {}",
                    r.text()
                );
                failures.push(i);
                if flaky_requests_at_first_failure.is_none() {
                    flaky_requests_at_first_failure = Some(flaky.requests());
                }
            }
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    assert!(ok >= 57, "{ok}/60 succeeded; failures at {failures:?}");
    assert!(
        failures.len() <= 1,
        "a 500 ejects the flaky backend, so at most one request can fail; failures at {failures:?}"
    );
    if let Some(n) = flaky_requests_at_first_failure {
        assert_eq!(
            flaky.requests(),
            n,
            "the flaky backend got traffic after it was ejected"
        );
        let h = lb.wait_healthy(2);
        assert_eq!(h["total_backends"], 3);
        assert!(
            lb.log
                .wait_for(Duration::from_secs(5), |l| is_unhealthy_line(l, flaky.port))
                .is_some(),
            "the ejection should be logged"
        );
    } else {
        // Round-robin sends it every third request: with seed 7 and rate 0.5
        // twenty draws without a failure would be a broken mock or policy.
        panic!(
            "the flaky backend never failed ({} requests reached it)",
            flaky.requests()
        );
    }
}

#[test]
fn killed_backend_is_excluded_within_an_interval_and_readmitted_after_two_probes() {
    let a = Mock::spawn::<&str>(&[]);
    let mut b = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&[
        "--health-check-interval",
        "5s",
        "--backends",
        &a.url(),
        &b.url(),
    ]);
    lb.wait_healthy(2);
    // The [STATUS] line comes every interval.
    let status = lb
        .log
        .wait_for(Duration::from_secs(12), |l| l.contains("[STATUS] Active:"))
        .expect("a [STATUS] line within one interval");
    assert!(
        status.contains("Healthy: 2/2") && status.contains("Conns/node:"),
        "{status:?}"
    );

    // Active probing alone (no traffic) finds the dead backend. The [STATUS]
    // line comes with a probe sweep: kill b mid-interval, not while a probe
    // to it may be in flight, so the detection has to wait for the next sweep.
    std::thread::sleep(Duration::from_millis(2000));
    let t = Instant::now();
    b.kill();
    let line = lb
        .log
        .wait_for(Duration::from_secs(12), |l| is_unhealthy_line(l, b.port))
        .expect("the killed backend marked as unhealthy within one interval");
    let excluded_after = t.elapsed();
    assert!(
        line.contains('('),
        "the line should give the cause: {line:?}"
    );
    let h = lb.wait_healthy_within(1, Duration::from_secs(2));
    assert_eq!(h["total_backends"], 2, "{h}");
    eprintln!("excluded after {excluded_after:?}: {line}");

    // While it is out, everything goes to a.
    for _ in 0..5 {
        let r = lb.completion();
        assert_eq!(r.status, 200);
        assert_eq!(r.backend_port(), Some(a.port));
    }
    lb.log
        .wait_for(Duration::from_secs(12), |l| {
            l.contains("[STATUS]") && l.contains("Healthy: 1/2")
        })
        .expect("a [STATUS] line with Healthy: 1/2");

    // Back on the same port: two passing probes (rise=2) readmit it.
    let t = Instant::now();
    b.restart();
    lb.log
        .wait_for(Duration::from_secs(25), |l| is_healthy_line(l, b.port))
        .expect("the restarted backend marked as healthy after two passing probes");
    let back_after = t.elapsed();
    lb.wait_healthy_within(2, Duration::from_secs(2));
    assert!(
        b.health_checks() >= 2,
        "readmitted after {} probe(s); rise is 2",
        b.health_checks()
    );
    eprintln!("readmitted after {back_after:?}");

    // It gets traffic again.
    let port = lb.port;
    let mut by_port: HashMap<u16, usize> = HashMap::new();
    for _ in 0..20 {
        let r = try_completion(port).unwrap();
        assert_eq!(r.status, 200);
        *by_port.entry(r.backend_port().unwrap()).or_default() += 1;
        if by_port.contains_key(&b.port) {
            break;
        }
    }
    if !by_port.contains_key(&b.port) {
        // least-conn breaks ties at random, so 20 sequential requests reach
        // both with overwhelming probability; try overlapping ones as well.
        let res = run_concurrently(10, move |_| try_completion(port).unwrap());
        for r in res {
            *by_port.entry(r.backend_port().unwrap()).or_default() += 1;
        }
    }
    assert!(
        by_port.contains_key(&b.port),
        "the readmitted backend gets no traffic: {by_port:?}"
    );
}

/// With `--connect-retries 0` (no failover), the request that finds a backend dead gets
/// 502, and passive health takes that backend out (one of two may go).
#[test]
fn proxy_errors_alone_eject_a_killed_backend() {
    // A 60 s interval: after the startup sweep, no probe runs during the test.
    let a = Mock::spawn::<&str>(&[]);
    let mut b = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&[
        "--health-check-interval",
        "60s",
        "--connect-retries",
        "0",
        "--backends",
        &a.url(),
        &b.url(),
    ]);
    lb.wait_healthy(2);
    wait_until(
        DEADLINE,
        "startup probes of both backends",
        || (a.health_checks(), b.health_checks()),
        |(x, y)| *x >= 1 && *y >= 1,
    );
    let b_port = b.port;
    b.kill();

    // Default policy (least-conn, random ties): send until one request hits
    // the dead backend; it gets 502, every later request goes to a.
    let mut statuses = Vec::new();
    let mut first_502 = None;
    for i in 0..200 {
        let r = lb.completion();
        statuses.push(r.status);
        if r.status == 502 {
            assert_error_json(&r, 502);
            first_502 = Some(i);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.backend_port(), Some(a.port));
    }
    let first = first_502.unwrap_or_else(|| {
        panic!("no request reached the dead backend in 200 tries (least-conn should break ties at random)")
    });
    let line = lb
        .log
        .wait_for(Duration::from_secs(5), |l| is_unhealthy_line(l, b_port))
        .expect("the log shows the dead backend marked as unhealthy");
    eprintln!("first 502 at request {first}; {line}");
    for _ in 0..20 {
        let r = lb.completion();
        assert_eq!(r.status, 200, "after the 502 every request goes elsewhere");
        assert_eq!(r.backend_port(), Some(a.port));
    }
    let h = lb.wait_healthy(1);
    assert_eq!(h["total_backends"], 2, "{h}");
}

#[test]
fn all_backends_down_gives_degraded_health_and_503() {
    let mut a = Mock::spawn::<&str>(&[]);
    let mut b = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&[
        "--health-check-interval",
        "5s",
        "--backends",
        &a.url(),
        &b.url(),
    ]);
    lb.wait_healthy(2);
    a.kill();
    b.kill();
    let (status, h) = wait_until(
        Duration::from_secs(15),
        "/health 503 within one interval after both backends died",
        || lb.try_health(),
        |h| matches!(h, Some((503, _))),
    )
    .unwrap();
    assert_eq!(status, 503);
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["healthy_backends"], 0, "{h}");
    assert_eq!(h["total_backends"], 2, "{h}");
    for _ in 0..3 {
        assert_error_json(&lb.completion(), 503);
    }
    // One comes back: health recovers.
    a.restart();
    let h = lb.wait_healthy_within(1, Duration::from_secs(25));
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(lb.completion().status, 200);
}

/// Requests spaced by `gap` against a backend that closes keep-alive
/// connections idle for `idle`: every request succeeds and the backend is
/// never marked unhealthy.
fn idle_closing_backend(idle: &str, gap: Duration, rounds: usize) {
    let m = Mock::spawn(&["--idle-timeout", idle]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    lb.wait_healthy(1);
    let b = serde_json::to_vec(&json!({"prompt": "x"})).unwrap();
    for i in 0..=rounds {
        // Alternate GET and (non-idempotent) POST.
        let r = if i % 2 == 0 {
            request(lb.port, "GET", "/idle", &[], None)
        } else {
            request(
                lb.port,
                "POST",
                "/v1/completions",
                &[("Content-Type", "application/json")],
                Some(&b),
            )
        }
        .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200, "request {i} after an idle gap: {}", r.text());
        assert_eq!(r.backend_port(), Some(m.port));
        if i < rounds {
            std::thread::sleep(gap);
        }
    }
    let unhealthy = lb.log.matching(|l| is_unhealthy_line(l, m.port));
    assert!(
        unhealthy.is_empty(),
        "the backend was marked unhealthy: {unhealthy:?}"
    );
    let h = lb.wait_healthy(1);
    assert_eq!(h["healthy_backends"], 1);
    let idle_closes = m.stats()["idle_closes"].as_u64().unwrap_or(0);
    eprintln!("mock idle_closes: {idle_closes}");
}

#[test]
fn backend_closing_idle_connections_after_5s_is_fine() {
    idle_closing_backend("5s", Duration::from_millis(5200), 3);
}

#[test]
fn backend_closing_idle_connections_after_1s_is_fine() {
    // Shorter than any sensible pool idle timeout of lb: lb must notice the
    // closed pooled connection (or retry on a fresh one) rather than fail.
    idle_closing_backend("1s", Duration::from_millis(1300), 4);
}

/// A backend whose probe path answers `probe_status` and whose other paths
/// answer 200 with its port.
fn probe_answering(probe_status: u16) -> FakeBackend {
    FakeBackend::spawn(move |req| {
        if req.starts_with(b"GET /v1/models ") {
            FakeReply::json(probe_status, &[("Retry-After", "1")], r#"{"probe":true}"#)
        } else {
            FakeReply::json(200, &[], r#"{"ok":true}"#)
        }
    })
}

#[test]
fn probe_passes_on_2xx_and_429_and_fails_on_5xx() {
    let ok = probe_answering(202);
    let busy = probe_answering(429);
    let broken = probe_answering(500);
    let lb = Lb::spawn(&[
        "--health-check-interval",
        "5s",
        "--backends",
        &ok.url(),
        &busy.url(),
        &broken.url(),
    ]);
    lb.log
        .wait_for(Duration::from_secs(10), |l| {
            is_unhealthy_line(l, broken.port)
        })
        .expect("a probe answered 500 marks the backend unhealthy");
    // 2xx and 429 keep their backends in, sweep after sweep.
    let h = lb.wait_healthy(2);
    assert_eq!(h["total_backends"], 3);
    wait_until(
        Duration::from_secs(20),
        "two [STATUS] lines with Healthy: 2/3",
        || {
            lb.log
                .matching(|l| l.contains("[STATUS]") && l.contains("Healthy: 2/3"))
                .len()
        },
        |n| *n >= 2,
    );
    let (status, h) = lb.health();
    assert_eq!(status, 200);
    assert_eq!(
        h["healthy_backends"], 2,
        "probes answered 202 and 429 count as passing: {h}"
    );
    for port in [ok.port, busy.port] {
        assert!(
            lb.log.matching(|l| is_unhealthy_line(l, port)).is_empty(),
            "backend {port} was marked unhealthy: {}",
            lb.log.text()
        );
    }
}

/// A backend ejected by passive health (a 500 from real traffic) is probed again after
/// 1 s, then 2 s later (the wait doubling up to the interval): with `--rise 2` it is back
/// within seconds, though the probe interval is a minute.
#[test]
fn a_passively_ejected_backend_is_probed_again_within_seconds() {
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    // Its probes pass; its first answer to real traffic is a 500, then 200s.
    let flaky = FakeBackend::spawn(move |req| {
        if req.starts_with(b"GET /v1/models ") {
            return FakeReply::json(200, &[], r#"{"object":"list","data":[]}"#);
        }
        // lb's engine load poll is not real traffic.
        if req.starts_with(b"GET /metrics ") {
            return FakeReply::json(404, &[], r#"{"error":"no metrics"}"#);
        }
        let status = if count.fetch_add(1, SeqCst) == 0 {
            500
        } else {
            200
        };
        FakeReply::json(status, &[], r#"{"ok":true}"#)
    });
    let other = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&[
        "--backends",
        &flaky.url(),
        &other.url(),
        "--routing",
        "round-robin",
        "--health-check-interval",
        "60s",
    ]);
    lb.wait_healthy(2);
    // Round robin: one of the first two requests meets the 500.
    let statuses: Vec<u16> = (0..2).map(|_| lb.completion().status).collect();
    assert!(statuses.contains(&500), "{statuses:?}");
    let line = lb
        .log
        .wait_for(DEADLINE, |l| is_unhealthy_line(l, flaky.port))
        .expect("passively ejected");
    assert!(line.contains("from a proxied request"), "{line}");
    // Back in seconds, by two probes (1 s, then 2 s later), not at the next 60 s sweep.
    let back = lb
        .log
        .wait_for(Duration::from_secs(15), |l| is_healthy_line(l, flaky.port))
        .expect("re-probed and restored within 15 s though the interval is 60 s");
    assert!(back.contains("status 200"), "{back}");
    lb.wait_healthy(2);
}

/// At start, a backend whose first probe has not answered yet takes no traffic once
/// another backend has passed its probe (before any has, all take traffic: start-up
/// never answers 503). Here the first backend's probe hangs and it answers real traffic
/// with 500s: no request reaches it.
#[test]
fn a_backend_not_yet_probed_waits_while_a_proven_one_serves() {
    let slow = FakeBackend::spawn(|req| {
        if req.starts_with(b"GET /v1/models ") {
            std::thread::sleep(Duration::from_secs(8));
            return FakeReply::json(200, &[], r#"{"object":"list","data":[]}"#);
        }
        FakeReply::json(500, &[], r#"{"error":"not ready"}"#)
    });
    let good = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&[
        "--backends",
        &slow.url(),
        &good.url(),
        "--routing",
        "round-robin",
        "--health-check-interval",
        "60s",
        "--health-timeout",
        "10s",
    ]);
    lb.wait_healthy(2);
    poll(DEADLINE, || (good.health_checks() > 0).then_some(()))
        .expect("the good backend's start-up probe");
    // The probe's answer reaches lb a moment after the mock counts it.
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..20 {
        let r = lb.completion();
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.backend_port(), Some(good.port), "request {i}");
    }
}
