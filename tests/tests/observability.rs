//! Observability, black-box against the build in `LB_BIN`: the admin listener
//! (`/metrics`, `/health`, `/live`, `--admin-bind`), exact metric values after a scripted
//! mix of outcomes, the exposition checked by a real parser (`promtool check metrics`
//! where Debian's `prometheus` package is installed), `--log-format json`,
//! `--access-log`, request ids.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lb_tests::*;

/// Polls `check` (which panics with what is wrong) until it passes or `within` ends;
/// then runs it once more, so a failure shows its own message.
fn eventually(within: Duration, check: impl Fn()) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(&check)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check();
}

const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

fn chat(c: &mut Conn) -> Resp {
    c.request(
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        Some(BODY.as_bytes()),
    )
    .unwrap()
}

/// `promtool check metrics` on `text`, where promtool is installed; `false` when it is
/// not (said on stderr). With `LB_REQUIRE_PROMTOOL` set (tests/run.sh sets it where
/// promtool is), a missing promtool fails instead.
fn promtool_check(text: &str) -> bool {
    use std::io::Write as _;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("LB_REQUIRE_PROMTOOL").is_none(),
            "LB_REQUIRE_PROMTOOL is set but promtool cannot be run"
        );
        eprintln!("observability: promtool not installed (apt-get install prometheus): skipped");
        return false;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// The issue's scripted mix: successes over three backends, 429s at `--max-conns`, a 502
/// from a backend that failed after the request reached it, 503s with every backend down,
/// a 400; then one backend back. Every counter is checked against the exact value.
#[test]
fn metrics_count_a_scripted_mix_exactly() {
    let a = Mock::spawn(&["--tokens", "10", "--token-interval", "50ms"]);
    let b = Mock::spawn(&["--tokens", "10", "--token-interval", "50ms"]);
    let mut c = Mock::spawn(&["--tokens", "10", "--token-interval", "50ms"]);
    let (ua, ub, uc) = (a.url(), b.url(), c.url());
    let lb = Lb::spawn(&[
        "--backends",
        &ua,
        &ub,
        &uc,
        "--routing",
        "round-robin",
        "--max-conns",
        "1",
        "--health-check-interval",
        "5s",
        "--rise",
        "1",
    ]);
    // Every backend proven by a probe: round-robin then cycles over all three.
    eventually(Duration::from_secs(10), || {
        assert!(a.health_checks() >= 1 && b.health_checks() >= 1 && c.health_checks() >= 1)
    });
    lb.wait_healthy(3);

    // 1. Nine successes, three per backend.
    let mut conn = Conn::open(lb.port).unwrap();
    for _ in 0..9 {
        assert_eq!(chat(&mut conn).status, 200);
    }
    drop(conn);

    // 2. Three streams hold every backend at its cap; two more requests get 429.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = Conn::open(lb.port).unwrap();
        s.send_head("GET", "/sse?events=20&interval_ms=50", &[], None)
            .unwrap();
        let head = s.read_head("GET").unwrap();
        assert_eq!(head.status, 200);
        streams.push((s, head));
    }
    for _ in 0..2 {
        let r = request(lb.port, "GET", "/x", &[], None).unwrap();
        assert_eq!(r.status, 429, "{}", r.text());
    }
    for (mut s, head) in streams {
        let mut body = s.body(&head);
        while body.read_line().unwrap().is_some() {}
    }

    // 3. The third backend fails after the request reached it: part of a head, then a
    //    reset. A, B, then C in turn.
    let c_addr = c.socket_addr();
    c.kill();
    let sb = ScriptedBackend::spawn_on(c_addr);
    sb.set_script(Script::new(&b"HTTP/1.1 200 OK\r\nContent-Type: text/pl"[..]).resetting());
    let mut conn = Conn::open(lb.port).unwrap();
    assert_eq!(chat(&mut conn).status, 200);
    assert_eq!(chat(&mut conn).status, 200);
    drop(conn);
    let r = request(
        lb.port,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(BODY.as_bytes()),
    )
    .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    drop(sb); // C stays down: its probes fail from now on

    // 4. Every backend down: probes eject A and B (C is out already); 503s.
    let (mut a, mut b) = (a, b);
    a.kill();
    b.kill();
    lb.wait_healthy_within(0, Duration::from_secs(20));
    for _ in 0..2 {
        let r = request(lb.port, "GET", "/x", &[], None).unwrap();
        assert_eq!(r.status, 503, "{}", r.text());
    }

    // 5. A malformed request (two Host fields): 400.
    let r = request(lb.port, "GET", "/x", &[("Host", "a"), ("Host", "b")], None).unwrap();
    assert_eq!(r.status, 400);

    // The backends are down: up 0 for each.
    let m = lb.metrics();
    for u in [&ua, &ub, &uc] {
        assert_eq!(m.value("lb_backend_up", &[("backend", u)]), 0.0, "{u}");
    }

    // 6. A comes back after its probe.
    a.restart();
    lb.wait_healthy_within(1, Duration::from_secs(20));

    let want = |m: &Metrics, name: &str, labels: &[(&str, &str)], v: f64| {
        assert_eq!(m.value(name, labels), v, "{name}{labels:?}");
    };
    eventually(Duration::from_secs(5), || {
        let m = lb.metrics();
        let req = "lb_requests_total";
        want(&m, req, &[("backend", &ua), ("code", "200")], 5.0);
        want(&m, req, &[("backend", &ub), ("code", "200")], 5.0);
        want(&m, req, &[("backend", &uc), ("code", "200")], 4.0);
        want(&m, req, &[("backend", &uc), ("code", "502")], 1.0);
        want(&m, req, &[("backend", "none"), ("code", "429")], 2.0);
        want(&m, req, &[("backend", "none"), ("code", "503")], 2.0);
        want(&m, req, &[("backend", "none"), ("code", "400")], 1.0);
        want(&m, req, &[], 20.0);
        let rej = "lb_rejections_total";
        want(&m, rej, &[("reason", "at_capacity")], 2.0);
        want(&m, rej, &[("reason", "no_healthy")], 2.0);
        want(&m, rej, &[("reason", "bad_request")], 1.0);
        want(&m, rej, &[], 5.0);
        let dur = "lb_request_duration_seconds_count";
        want(&m, dur, &[("backend", &ua)], 5.0);
        want(&m, dur, &[("backend", &ub)], 5.0);
        want(&m, dur, &[("backend", &uc)], 5.0);
        want(&m, dur, &[("backend", "none")], 5.0);
        let ttfb = "lb_response_first_byte_seconds_count";
        want(&m, ttfb, &[("backend", &ua)], 5.0);
        want(&m, ttfb, &[("backend", &ub)], 5.0);
        want(&m, ttfb, &[("backend", &uc)], 4.0);
        want(&m, "lb_backend_up", &[("backend", &ua)], 1.0);
        want(&m, "lb_backend_up", &[("backend", &ub)], 0.0);
        want(&m, "lb_backend_up", &[("backend", &uc)], 0.0);
        want(&m, "lb_backend_in_flight", &[], 0.0);
        want(&m, "lb_backend_max_conns", &[("backend", &ua)], 1.0);
        want(&m, "lb_backend_weight", &[("backend", &ub)], 1.0);
        let tr = "lb_health_transitions_total";
        want(&m, tr, &[("backend", &ua), ("to", "unhealthy")], 1.0);
        want(&m, tr, &[("backend", &ua), ("to", "healthy")], 1.0);
        want(&m, tr, &[("backend", &ub), ("to", "unhealthy")], 1.0);
        want(&m, tr, &[("backend", &uc), ("to", "unhealthy")], 1.0);
        want(&m, tr, &[("backend", &uc), ("to", "healthy")], 0.0);
        want(&m, "lb_passive_ejections_total", &[("backend", &uc)], 1.0);
        want(&m, "lb_passive_ejections_total", &[("backend", &ua)], 0.0);
        want(&m, "lb_queue_depth", &[], 0.0);
        want(&m, "lb_client_connections", &[], 0.0);
        // Request bodies: the 9 + 2 + 1 chats that went up.
        want(
            &m,
            "lb_bytes_total",
            &[("direction", "in")],
            12.0 * BODY.len() as f64,
        );
        assert!(m.value("lb_bytes_total", &[("direction", "out")]) > 0.0);
        want(
            &m,
            "lb_upstream_connections_total",
            &[("result", "failed")],
            0.0,
        );
        // Each proxied request used a connection: new or reused.
        for (u, n) in [(&ua, 5.0), (&ub, 5.0), (&uc, 5.0)] {
            let used = m.value("lb_upstream_connections_total", &[("backend", u)]);
            assert!(used >= n, "{u}: {used} connections for {n} requests");
        }
        assert!(m.value("lb_probe_duration_seconds_count", &[("backend", &ua)]) >= 2.0);
        assert!(m.value("lb_client_connections_total", &[]) >= 10.0);
        let info: Vec<_> = m
            .samples
            .iter()
            .filter(|(n, _, _)| n == "lb_build_info")
            .collect();
        assert_eq!(info.len(), 1, "{info:?}");
        assert!(
            info[0]
                .1
                .iter()
                .any(|(k, v)| k == "runtime" && (v == "tokio" || v == "smol")),
            "{info:?}"
        );
        assert!(m.value("process_resident_memory_bytes", &[]) > 0.0);
        assert!(m.value("process_open_fds", &[]) > 0.0);
        assert!(m.value("process_start_time_seconds", &[]) > 1e9);
    });
    // Histogram buckets are cumulative and end with +Inf = _count.
    let m = lb.metrics();
    let inf = m.value(
        "lb_request_duration_seconds_bucket",
        &[("backend", &ua), ("le", "+Inf")],
    );
    assert_eq!(inf, 5.0);
    let text = lb.admin_get("/metrics").text();
    promtool_check(&text);
}

/// The admin listener's routes, and what the proxy port does with `/metrics`.
#[test]
fn admin_routes_and_the_proxy_port() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    lb.wait_healthy(1);
    let port = lb.admin_port().expect("an admin listener");
    let live = get(port, "/live");
    assert_eq!(
        (live.status, live.json()["status"].clone()),
        (200, "live".into())
    );
    let health = get(port, "/health");
    assert_eq!(health.status, 200);
    let (_, proxied) = lb.health();
    assert_eq!(
        health.json()["healthy_backends"],
        proxied["healthy_backends"]
    );
    assert_eq!(get(port, "/nope").status, 404);
    let r = request(port, "POST", "/metrics", &[], Some(b"x")).unwrap();
    assert_eq!(r.status, 405);
    let r = get(port, "/metrics");
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.headers
    );
    let om = request(
        port,
        "GET",
        "/metrics",
        &[("Accept", "application/openmetrics-text; version=1.0.0")],
        None,
    )
    .unwrap();
    assert!(om
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(om.text().trim_end().ends_with("# EOF"), "{}", om.text());
    // On the proxy port /metrics is a path like any other: the backend answers it.
    let r = lb.get("/metrics");
    assert_eq!(r.backend_port(), Some(m.port), "{}", r.text());
}

/// `--admin-bind off` starts no admin listener; an explicit address that collides with
/// the proxy's or cannot be bound stops the start, naming the flag; a taken default only
/// costs a warning.
#[test]
fn admin_bind_off_collisions_and_a_taken_default() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url(), "--admin-bind", "off"]);
    lb.wait_healthy(1);
    assert!(
        lb.log.matching(|l| l.contains("admin")).is_empty(),
        "{}",
        lb.log.text()
    );

    let port = free_port();
    let out = run_lb(
        &[
            "--backends",
            &m.url(),
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--admin-bind",
            &format!("127.0.0.1:{port}"),
        ],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--admin-bind"), "{}", out.stderr);

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = run_lb(
        &[
            "--backends",
            &m.url(),
            "--port",
            &free_port().to_string(),
            "--admin-bind",
            &addr.to_string(),
        ],
        Duration::from_secs(10),
    );
    assert_ne!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("--admin-bind") && out.stderr.lines().count() == 1,
        "{}",
        out.stderr
    );

    // The default address, taken: lb warns and serves.
    let _default = TcpListener::bind("127.0.0.1:9901");
    let lb = Lb::spawn_with(
        &["--backends", &m.url()],
        LbOptions {
            default_admin: true,
            ..LbOptions::default()
        },
    );
    lb.wait_healthy(1);
    assert_eq!(lb.completion().status, 200);
    if _default.is_ok() {
        assert!(
            lb.log
                .wait_for(Duration::from_secs(5), |l| l
                    .contains("[WARN] admin listener not started"))
                .is_some(),
            "{}",
            lb.log.text()
        );
    }
}

/// Request ids: a sane client id goes to the backend and back unchanged; a missing or
/// insane one (a control character) is replaced by lb's own, on both sides; error
/// bodies carry it; `traceparent` and `tracestate` pass untouched.
#[test]
fn request_ids_round_trip_and_trace_context_passes() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    lb.wait_healthy(1);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = request(
        lb.port,
        "GET",
        "/echo",
        &[
            ("X-Request-Id", "client-id-42"),
            ("traceparent", tp),
            ("tracestate", "vendor=x"),
        ],
        None,
    )
    .unwrap();
    assert_eq!(r.header("x-request-id"), Some("client-id-42"));
    let seen = r.json()["headers"].clone();
    assert_eq!(seen["x-request-id"], "client-id-42");
    assert_eq!(seen["traceparent"], tp);
    assert_eq!(seen["tracestate"], "vendor=x");

    for sent in [None, Some("has\tcontrol"), Some("has space")] {
        let headers: Vec<(&str, &str)> = sent.map(|v| ("X-Request-Id", v)).into_iter().collect();
        let r = request(lb.port, "GET", "/echo", &headers, None).unwrap();
        let id = r.header("x-request-id").expect("an id").to_string();
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        assert_eq!(r.json()["headers"]["x-request-id"], id.as_str(), "{sent:?}");
    }

    // An error reply carries the id in its header and body.
    let dead = Mock::spawn::<&str>(&[]);
    let url = dead.url();
    drop(dead);
    let lb = Lb::spawn(&["--backends", &url, "--connect-retries", "0"]);
    let r = request(lb.port, "GET", "/x", &[("X-Request-Id", "err-7")], None).unwrap();
    assert!(r.status >= 500, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("err-7"));
    assert_eq!(r.json()["request_id"], "err-7");
    assert_error_json(&r, r.status);
    if r.status == 502 {
        assert!(
            lb.log
                .wait_for(Duration::from_secs(5), |l| l.contains("[request id err-7]"))
                .is_some(),
            "{}",
            lb.log.text()
        );
    }
}

/// `--log-format json`: every stderr line is one JSON object with `ts`, `level` and
/// `event`.
#[test]
fn json_logs_are_one_object_per_line() {
    let m = Mock::spawn::<&str>(&[]);
    let mut lb = Lb::spawn(&[
        "--backends",
        &m.url(),
        "--log-format",
        "json",
        "--status-interval",
        "1s",
    ]);
    lb.wait_healthy(1);
    assert_eq!(lb.completion().status, 200);
    lb.log
        .wait_for(Duration::from_secs(5), |l| {
            l.contains(r#""event":"status""#)
        })
        .expect("a status record");
    lb.signal("TERM");
    lb.wait_exit(Duration::from_secs(10)).expect("lb exits");
    lb.log.wait_closed(Duration::from_secs(5));
    let text = lb.log.text();
    let mut events = Vec::new();
    for line in text.lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
        assert!(
            ["info", "warn", "error"].contains(&v["level"].as_str().unwrap()),
            "{line}"
        );
        events.push(v["event"].as_str().unwrap().to_string());
    }
    for e in [
        "starting",
        "listening",
        "admin_listening",
        "status",
        "shutting_down",
        "stopped",
    ] {
        assert!(events.iter().any(|x| x == e), "no {e} in {events:?}");
    }
}

/// `--access-log`: one line per request with the documented fields (JSON with
/// `--log-format json`, a combined-log-style line otherwise), the query left out unless
/// `--access-log-query`; reopened on SIGHUP.
#[test]
fn access_log_lines_and_reopen_on_sighup() {
    let m = Mock::spawn::<&str>(&[]);
    let dir = std::env::temp_dir().join(format!("lb-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("access.log");
    let _ = std::fs::remove_file(&path);
    let p = path.to_string_lossy().to_string();
    let lb = Lb::spawn(&[
        "--backends",
        &m.url(),
        "--access-log",
        &p,
        "--log-format",
        "json",
    ]);
    lb.wait_healthy(1);
    let r = request(
        lb.port,
        "GET",
        "/v1/x?secret=1",
        &[("X-Request-Id", "acc-1")],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let lines = || -> Vec<Value> {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    eventually(Duration::from_secs(5), || assert_eq!(lines().len(), 1));
    let l = &lines()[0];
    for k in [
        "ts",
        "client",
        "method",
        "path",
        "status",
        "backend",
        "bytes_in",
        "bytes_out",
        "duration_s",
        "first_byte_s",
        "request_id",
        "policy",
        "route",
    ] {
        assert!(l.get(k).is_some(), "no {k} in {l}");
    }
    assert_eq!(l["path"], "/v1/x");
    assert_eq!(l["request_id"], "acc-1");
    assert_eq!(l["status"], 200);
    assert_eq!(l["backend"], m.url().as_str());
    assert!(l["bytes_out"].as_u64().unwrap() > 0);

    // Rotation: the file is renamed, SIGHUP, and the next line goes to a new file.
    let rotated = dir.join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    lb.signal("HUP");
    lb.log
        .wait_for(Duration::from_secs(5), |l| {
            l.contains(r#""event":"reopened""#)
        })
        .expect("the reopen is logged");
    eventually(Duration::from_secs(5), || assert!(path.exists()));
    assert_eq!(lb.get("/after").status, 200);
    eventually(Duration::from_secs(5), || assert_eq!(lines().len(), 1));
    assert_eq!(lines()[0]["path"], "/after");
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap().lines().count(),
        1
    );

    // Text lines, with the query kept.
    let _ = std::fs::remove_file(&path);
    let lb = Lb::spawn(&[
        "--backends",
        &m.url(),
        "--access-log",
        &p,
        "--access-log-query",
    ]);
    lb.wait_healthy(1);
    assert_eq!(lb.get("/q?x=1").status, 200);
    eventually(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let line = text.lines().next().expect("a line");
        assert!(line.contains(r#""GET /q?x=1 HTTP/1.1" 200 "#), "{line}");
        assert!(
            line.contains(" id=") && line.contains(" backend=http://"),
            "{line}"
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}
