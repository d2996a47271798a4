//! Proxying: traffic reaches every healthy backend, requests and responses
//! pass through unchanged (plus the X-Forwarded-* headers), slow backends are
//! waited for, and the OpenAI-style errors 400/502/503/504.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lb_tests::*;

/// `n` concurrent completions through `lb`; how many each backend answered.
fn concurrent_completions(port: u16, n: usize) -> HashMap<u16, usize> {
    let res = run_concurrently(n, move |_| try_completion(port));
    let mut by_port = HashMap::new();
    for r in res {
        let r = r.expect("completion through lb");
        assert_eq!(r.status, 200, "{}", r.text());
        *by_port
            .entry(r.backend_port().expect("backend_port"))
            .or_insert(0) += 1;
    }
    by_port
}

#[test]
fn three_healthy_backends_all_receive_traffic() {
    let mocks: Vec<Mock> = (0..3)
        .map(|_| Mock::spawn(&["--delay", "300ms", "--health-endpoint", "/v1/models"]))
        .collect();
    let urls: Vec<String> = mocks.iter().map(|m| m.url()).collect();
    let mut args = vec!["--backends".to_string()];
    args.extend(urls);
    let lb = Lb::spawn(&args);

    let h = lb.wait_healthy(3);
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["total_backends"], 3, "{h}");
    assert!(h["active_conns"].is_u64(), "active_conns in {h}");

    // Default policy (least-conn): overlapping requests spread out.
    let mut by_port = HashMap::new();
    for _ in 0..2 {
        for (p, n) in concurrent_completions(lb.port, 12) {
            *by_port.entry(p).or_insert(0) += n;
        }
    }
    for m in &mocks {
        let n = by_port.get(&m.port).copied().unwrap_or(0);
        assert!(n > 0, "backend {} got no traffic: {by_port:?}", m.port);
        assert_eq!(
            m.requests() as usize,
            n,
            "mock {} /stats requests vs responses seen",
            m.port
        );
    }
    let (status, h) = lb.health();
    assert_eq!(status, 200);
    assert_eq!(h["healthy_backends"], 3, "{h}");
}

#[test]
fn backends_delayed_half_a_second_to_three_seconds_all_answer() {
    // The mock's --delay also slows its health endpoint; lb probes /stats
    // (never delayed) so that only the proxied requests are slow.
    let delays = ["500ms", "1500ms", "3s"];
    let mocks: Vec<Mock> = delays
        .iter()
        .map(|d| Mock::spawn(&["--delay", d]))
        .collect();
    let mut args = vec!["--health-path".to_string(), "/stats".to_string()];
    for m in &mocks {
        args.push("--backends".into());
        args.push(m.url());
    }
    let lb = Lb::spawn(&args);
    lb.wait_healthy(3);

    let port = lb.port;
    let t0 = Instant::now();
    let res = run_concurrently(9, move |_| {
        let t = Instant::now();
        (try_completion(port), t.elapsed())
    });
    let mut by_port: HashMap<u16, Vec<Duration>> = HashMap::new();
    for (r, took) in res {
        let r = r.expect("completion through lb");
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert!(v["choices"].is_array(), "OpenAI completion expected: {v}");
        by_port
            .entry(r.backend_port().unwrap())
            .or_default()
            .push(took);
    }
    for (m, d) in mocks.iter().zip([0.5, 1.5, 3.0]) {
        let took = by_port
            .get(&m.port)
            .unwrap_or_else(|| panic!("backend with delay {d}s got nothing: {by_port:?}"));
        for t in took {
            assert!(
                t.as_secs_f64() >= d * 0.9,
                "a {d}s backend answered in {t:?}"
            );
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(30));
}

/// A client's `X-Forwarded-For` given on several lines is one list: the backend sees it
/// whole, in order, with the client's address appended.
#[test]
fn a_forwarded_for_list_on_several_lines_is_kept_whole() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let r = request(
        lb.port,
        "GET",
        "/x",
        &[
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-For", "10.0.0.2, 10.0.0.3"),
        ],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v["headers"]["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1",
        "{v}"
    );
}

#[test]
fn request_passes_through_with_forwarded_headers() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let lb_host = format!("127.0.0.1:{}", lb.port);

    let body = b"{\"hello\":\"world\"}";
    let r = request(
        lb.port,
        "POST",
        "/some/path?x=1&y=two",
        &[
            ("Content-Type", "application/json"),
            ("X-Custom", "kept"),
            ("Authorization", "Bearer sk-test"),
        ],
        Some(body),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/some/path");
    assert_eq!(v["uri"], "/some/path?x=1&y=two");
    assert_eq!(v["body_bytes"], body.len());
    let h = &v["headers"];
    assert_eq!(h["x-custom"], "kept", "{h}");
    assert_eq!(h["authorization"], "Bearer sk-test", "{h}");
    assert_eq!(h["content-type"], "application/json", "{h}");
    assert_eq!(
        h["host"],
        m.addr(),
        "the backend should see Host = its own host:port: {h}"
    );
    let xff = h["x-forwarded-for"].as_str().unwrap_or_default();
    assert!(xff.contains("127.0.0.1"), "x-forwarded-for: {h}");
    assert_eq!(h["x-forwarded-proto"], "http", "{h}");
    assert_eq!(h["x-forwarded-host"], lb_host.as_str(), "{h}");
    assert_eq!(
        r.header("x-backend-port"),
        Some(m.port.to_string().as_str())
    );

    // An existing X-Forwarded-For is appended to, as Go's ReverseProxy does.
    let r = request(
        lb.port,
        "GET",
        "/xff",
        &[("X-Forwarded-For", "10.1.2.3")],
        None,
    )
    .unwrap();
    let v = r.json();
    let xff = v["headers"]["x-forwarded-for"].as_str().unwrap_or_default();
    assert!(
        xff.contains("10.1.2.3") && xff.contains("127.0.0.1"),
        "x-forwarded-for should keep the client's value and add the peer: {xff:?}"
    );

    // Other methods.
    for method in ["GET", "PUT", "DELETE", "PATCH"] {
        let r = request(lb.port, method, "/m", &[], None).unwrap();
        assert_eq!(r.status, 200, "{method}: {}", r.text());
        assert_eq!(r.json()["method"], method);
    }
    let r = request(lb.port, "HEAD", "/m", &[], None).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
}

#[test]
fn openai_endpoints_and_large_responses() {
    let m = Mock::spawn(&["--response-size", "1000000", "--tokens", "5"]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let r = lb.post_json(
        "/v1/chat/completions",
        &json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion", "{}", &r.text()[..200]);
    assert_eq!(v["model"], "llama");
    assert_eq!(v["padding"].as_str().map(str::len), Some(1_000_000));
    let r = lb.get("/v1/models");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "list");
    // The backend's own 400 passes through untouched.
    let r = request(
        lb.port,
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        Some(b"{not json"),
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.backend_port(), Some(m.port), "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
}

#[test]
fn client_keep_alive_connection_is_reused() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let mut c = Conn::open(lb.port).unwrap();
    for i in 0..5 {
        let path = format!("/ka/{i}");
        let r = c.request("GET", &path, &[], None).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], path.as_str());
        let b = serde_json::to_vec(&json!({"prompt": "x"})).unwrap();
        let r = c
            .request(
                "POST",
                "/v1/completions",
                &[("Content-Type", "application/json")],
                Some(&b),
            )
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let r = c.request("GET", "/health", &[], None).unwrap();
        assert_eq!(r.status, 200);
    }
}

#[test]
fn chunked_request_body_passes_through() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let mut c = Conn::open(lb.port).unwrap();
    c.send_head(
        "POST",
        "/upload",
        &[("Transfer-Encoding", "chunked"), ("Connection", "close")],
        None,
    )
    .unwrap();
    let mut fnv = Fnv1a::default();
    let mut total = 0u64;
    let mut x: u32 = 12345;
    for i in 0..200usize {
        let len = 1 + (i * 7919) % 9000;
        let chunk: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        fnv.update(&chunk);
        total += len as u64;
        c.write_raw(format!("{len:x}\r\n").as_bytes()).unwrap();
        c.write_raw(&chunk).unwrap();
        c.write_raw(b"\r\n").unwrap();
    }
    c.write_raw(b"0\r\n\r\n").unwrap();
    let r = c.read_response("POST").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["bytes"], total, "{v}");
    assert_eq!(
        v["fnv1a"].as_str().map(str::to_lowercase),
        Some(fnv.hex()),
        "{v}"
    );
}

/// Send raw bytes on a fresh connection and read what comes back (until EOF,
/// or the first complete response head).
fn raw_exchange(port: u16, data: &[u8]) -> String {
    let mut c = Conn::open(port).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    c.write_raw(data).unwrap();
    match c.read_head("GET") {
        Ok(h) => format!("HTTP/1.1 {}", h.status),
        Err(e) => format!("no response head: {e}"),
    }
}

#[test]
fn malformed_requests_get_400_and_lb_keeps_serving() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let cases: [&[u8]; 4] = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nThis is not a header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    ];
    for raw in cases {
        let got = raw_exchange(lb.port, raw);
        assert!(
            got.starts_with("HTTP/1.1 400"),
            "{:?} should get 400, got {got}",
            String::from_utf8_lossy(raw)
        );
        // Still serving.
        let (status, _) = lb.health();
        assert_eq!(status, 200);
        assert_eq!(lb.completion().status, 200);
    }
    // A client that sends half a head and leaves does not hurt either.
    {
        let mut c = Conn::open(lb.port).unwrap();
        c.write_raw(b"GET /half HTTP/1.1\r\nHost: x\r\nX-Par")
            .unwrap();
        c.close();
    }
    assert_eq!(lb.completion().status, 200);
    assert_eq!(
        m.requests(),
        5,
        "only the well-formed requests reach the backend"
    );
}

#[test]
fn no_healthy_backend_gives_503_and_degraded_health() {
    // One port with nothing behind it, one backend that fails its probes.
    let failing = Mock::spawn(&["--mode", "failing"]);
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let lb = Lb::spawn(&["--backends", &dead, "--backends", &failing.url()]);
    let h = wait_until(
        DEADLINE,
        "/health 503 after the startup probe sweep",
        || lb.try_health(),
        |h| matches!(h, Some((503, _))),
    )
    .unwrap()
    .1;
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["healthy_backends"], 0, "{h}");
    assert_eq!(h["total_backends"], 2, "{h}");

    for _ in 0..3 {
        let r = lb.completion();
        assert_error_json(&r, 503);
    }
    let r = lb.get("/anything");
    assert_error_json(&r, 503);
    assert_eq!(
        failing.requests(),
        0,
        "no request may reach a failing backend"
    );
    assert!(
        lb.log
            .wait_for(Duration::from_secs(5), |l| is_unhealthy_line(
                l,
                failing.port
            ))
            .is_some(),
        "expected a [HEALTH] ... marked as unhealthy line for the failing backend"
    );
}

#[test]
fn timeout_gives_504_in_about_the_timeout() {
    // The mock never answers, but its /stats (used as the probe path) does,
    // so the backend stays healthy and only the request hangs.
    let m = Mock::spawn(&["--mode", "timeout"]);
    let lb = Lb::spawn(&[
        "--backends",
        &m.url(),
        "--timeout",
        "2s",
        "--health-path",
        "/stats",
    ]);
    lb.wait_healthy(1);
    let t = Instant::now();
    let r = lb.completion();
    let took = t.elapsed();
    assert_error_json(&r, 504);
    assert!(
        took >= Duration::from_millis(1500) && took <= Duration::from_secs(10),
        "--timeout 2s answered 504 after {took:?}"
    );
    // No response head before --timeout is a passive failure, but a lone backend is never
    // ejected by passive failures alone (--max-passive-ejection-percent): /health stays ok,
    // and the lease comes back (it may be released just after the 504 has gone out).
    let h = lb.wait_active(0, DEADLINE);
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["healthy_backends"], 1, "{h}");
    assert_eq!(h["total_backends"], 1, "{h}");
    let ejected = lb.log.matching(|l| is_unhealthy_line(l, m.port));
    assert!(
        ejected.is_empty(),
        "a lone backend was ejected: {ejected:?}"
    );
}

/// The same timeout with two backends: the one that timed out is ejected by passive health
/// (one of two may go; the next probe is a whole interval away and --rise 2 needs two), and
/// the next request goes to the other.
#[test]
fn a_backend_that_times_out_is_ejected_when_another_remains() {
    let m = Mock::spawn(&["--mode", "timeout"]);
    let ok = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&[
        "--backends",
        &m.url(),
        &ok.url(),
        "--routing",
        "round-robin",
        "--timeout",
        "2s",
        "--health-path",
        "/stats",
    ]);
    lb.wait_healthy(2);
    // Round robin from the first backend: the first request that times out is the ejection.
    let mut saw_504 = false;
    for _ in 0..2 {
        let r = lb.completion();
        if r.status == 504 {
            assert_error_json(&r, 504);
            saw_504 = true;
            break;
        }
        assert_eq!(r.backend_port(), Some(ok.port));
    }
    assert!(saw_504, "no request went to the backend that never answers");
    let line = lb
        .log
        .wait_for(DEADLINE, |l| is_unhealthy_line(l, m.port))
        .unwrap_or_else(|| panic!("no [HEALTH] ejection of {}:\n{}", m.url(), lb.log.text()));
    assert!(line.contains("from a proxied request"), "{line}");
    let h = lb.wait_active(0, DEADLINE);
    assert_eq!(h["healthy_backends"], 1, "{h}");
    assert_eq!(h["total_backends"], 2, "{h}");
    for _ in 0..4 {
        let r = lb.completion();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.backend_port(), Some(ok.port));
    }
}

/// A backend that is down (connect refused): the request goes to the other backend
/// (`--connect-retries`, default 2) and the client never sees the failure; the dead
/// backend is ejected by passive health (one of two may go) and every later request
/// goes to the live one. With `--connect-retries 0` the first request to the dead
/// backend gets 502, as before there was failover.
#[test]
fn connect_failure_fails_over_and_the_backend_is_ejected() {
    for retries in ["2", "0"] {
        // With a 60 s probe interval, only proxy errors can find a dead backend.
        let a = Mock::spawn::<&str>(&[]);
        let mut b = Mock::spawn::<&str>(&[]);
        let lb = Lb::spawn(&[
            "--routing",
            "round-robin",
            "--health-check-interval",
            "60s",
            "--connect-retries",
            retries,
            "--backends",
            &a.url(),
            "--backends",
            &b.url(),
        ]);
        lb.wait_healthy(2);
        // Let the startup sweep finish (both probed) before killing b.
        wait_until(
            DEADLINE,
            "startup probes",
            || (a.health_checks(), b.health_checks()),
            |(x, y)| *x >= 1 && *y >= 1,
        );
        let b_port = b.port;
        b.kill();

        let mut statuses = Vec::new();
        for _ in 0..12 {
            let r = lb.completion();
            if r.status == 502 {
                assert_error_json(&r, 502);
            } else {
                assert_eq!(r.status, 200, "{}", r.text());
                assert_eq!(r.backend_port(), Some(a.port));
            }
            statuses.push(r.status);
        }
        let n502 = statuses.iter().filter(|s| **s == 502).count();
        let retried = lb.log.matching(|l| l.contains("[RETRY]"));
        if retries == "0" {
            assert_eq!(
                n502, 1,
                "round-robin: the first request to the dead backend gets 502, then it \
                 is ejected and every later request goes to the live one; {statuses:?}"
            );
            assert!(retried.is_empty(), "{retried:?}");
        } else {
            assert_eq!(n502, 0, "the failover hides the dead backend: {statuses:?}");
            assert_eq!(retried.len(), 1, "one request failed over: {retried:?}");
            assert!(retried[0].contains(&format!(":{b_port}")), "{retried:?}");
            assert!(retried[0].contains(&format!(":{}", a.port)), "{retried:?}");
        }
        assert!(
            lb.log
                .wait_for(Duration::from_secs(5), |l| is_unhealthy_line(l, b_port))
                .is_some(),
            "the log should show the dead backend marked as unhealthy"
        );
        let (status, h) = lb.health();
        assert_eq!(status, 200);
        assert_eq!(h["healthy_backends"], 1, "{h}");
        assert_eq!(h["total_backends"], 2, "{h}");
        assert_eq!(h["active_conns"], 0, "{h}");
    }
}

/// A backend that closes the connection after reading the request, without an answer:
/// 502 (the request reached it: no failover). It is the only backend, so passive health
/// does not eject it (a lone backend never is, `--max-passive-ejection-percent`): the
/// next request gets 502 again, not 503; a probe would eject it.
#[test]
fn reset_before_response_head_gives_502() {
    // A backend that answers its health probes but closes every other
    // connection right after reading the request, without a response.
    let fake = FakeBackend::spawn(|req| {
        if req.starts_with(b"GET /v1/models ") {
            FakeReply::json(200, &[], r#"{"object":"list","data":[]}"#)
        } else {
            FakeReply::Close
        }
    });
    let lb = Lb::spawn(&["--backends", &fake.url(), "--health-check-interval", "60s"]);
    lb.wait_healthy(1);
    let r = lb.completion();
    assert_error_json(&r, 502);
    let r = lb.completion();
    assert_error_json(&r, 502);
    let unhealthy = lb.log.matching(|l| is_unhealthy_line(l, fake.port));
    assert!(
        unhealthy.is_empty(),
        "a lone backend was ejected: {unhealthy:?}"
    );
    assert_eq!(lb.health().1["healthy_backends"], 1);
}

#[test]
fn expect_100_continue_upload() {
    // curl sends `Expect: 100-continue` for bodies over 1 KiB and waits up to
    // a second for `100 Continue` before sending the body anyway.
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let body: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 256) as u8).collect();
    let mut fnv = Fnv1a::default();
    fnv.update(&body);
    let mut c = Conn::open(lb.port).unwrap();
    c.send_head(
        "POST",
        "/upload",
        &[("Expect", "100-continue"), ("Connection", "close")],
        Some(body.len() as u64),
    )
    .unwrap();
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut peek = [0u8; 16];
    let _ = c.stream().peek(&mut peek); // a `100 Continue`, or a 1 s wait
    c.set_timeout(IO_TIMEOUT).unwrap();
    c.write_raw(&body).unwrap();
    let r = c.read_response("POST").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["bytes"], body.len(), "{v}");
    assert_eq!(v["fnv1a"].as_str().map(str::to_lowercase), Some(fnv.hex()));
}

#[test]
fn http_1_0_client_is_served() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let mut c = Conn::open(lb.port).unwrap();
    c.write_raw(b"GET /old-client HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let r = c.read_response("GET").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/old-client");
}

#[test]
fn hop_by_hop_headers_are_not_forwarded() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    let r = request(
        lb.port,
        "GET",
        "/a%20b/c%2Fd?q=%26x&y",
        &[
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("X-End-To-End", "yes"),
        ],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v["uri"], "/a%20b/c%2Fd?q=%26x&y",
        "the URI is forwarded as sent"
    );
    let h = &v["headers"];
    assert_eq!(h["x-end-to-end"], "yes", "{h}");
    for hop in ["x-hop", "keep-alive", "proxy-connection"] {
        assert!(h.get(hop).is_none(), "{hop} reached the backend: {h}");
    }

    // The response direction: a backend that sends hop-by-hop fields, and fields its
    // `Connection` names (over two lines: one list, RFC 9110 §5.3).
    let body = r#"{"ok":true}"#;
    let raw = format!(
        "HTTP/1.1 200 OK\r\n\
         Content-Type: application/json\r\n\
         Content-Length: {}\r\n\
         Connection: close, X-Resp-Hop\r\n\
         Connection: X-Resp-Hop-2\r\n\
         X-Resp-Hop: secret\r\n\
         X-Resp-Hop-2: secret too\r\n\
         Keep-Alive: timeout=77, max=3\r\n\
         Proxy-Connection: keep-alive\r\n\
         Upgrade: h2c\r\n\
         TE: trailers\r\n\
         X-End-To-End: yes\r\n\
         \r\n{body}",
        body.len()
    );
    let fake = FakeBackend::spawn(move |_| FakeReply::Raw(raw.clone().into_bytes()));
    let lb = Lb::spawn(&["--backends", &fake.url()]);
    lb.wait_healthy(1);
    // A keep-alive client: the backend's `Connection: close` is about its own connection
    // and must not close this one.
    let mut c = Conn::open(lb.port).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    for _ in 0..2 {
        let r = c.request("GET", "/resp-hops", &[], None).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), body);
        assert_eq!(r.header("x-end-to-end"), Some("yes"), "{:?}", r.headers);
        for hop in [
            "x-resp-hop",
            "x-resp-hop-2",
            "keep-alive",
            "proxy-connection",
            "upgrade",
            "te",
        ] {
            assert!(
                r.header(hop).is_none(),
                "{hop} reached the client: {:?}",
                r.headers
            );
        }
        // lb may say `Connection` for its own client connection, nothing else.
        let connection: Vec<&str> = r
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .collect();
        assert!(
            connection
                .iter()
                .all(|t| t.eq_ignore_ascii_case("keep-alive")),
            "the backend's Connection reached the client: {:?}",
            r.headers
        );
    }
}

#[test]
fn large_request_heads_pass_and_huge_ones_are_refused() {
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    // 6 KiB of cookie and 40 more headers: ordinary for browsers and SDKs.
    let cookie = "c".repeat(6 * 1024);
    let names: Vec<String> = (0..40).map(|i| format!("X-Extra-{i}")).collect();
    let mut headers: Vec<(&str, &str)> = vec![("Cookie", &cookie)];
    for n in &names {
        headers.push((n, "value"));
    }
    let r = request(lb.port, "GET", "/big-head", &headers, None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v["headers"]["cookie"].as_str().map(str::len),
        Some(6 * 1024)
    );
    assert_eq!(v["headers"]["x-extra-39"], "value");

    // A 2 MiB head is refused (400/431), and lb keeps serving.
    let mut c = Conn::open(lb.port).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    let huge = "h".repeat(2 * 1024 * 1024);
    // The write may fail half-way if lb closes early.
    let _ =
        c.write_raw(format!("GET /huge HTTP/1.1\r\nHost: x\r\nX-Huge: {huge}\r\n\r\n").as_bytes());
    match c.read_head("GET") {
        Ok(h) => assert!(
            h.status == 400 || h.status == 431,
            "a 2 MiB request head got {}",
            h.status
        ),
        // lb may also just close (or reset) before the whole head is sent,
        // but not sit on it.
        Err(e) => {
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "lb neither answered nor closed within 10 s of a 2 MiB head: {e}"
            );
        }
    }
    assert_eq!(lb.completion().status, 200);
    assert_eq!(m.requests(), 2, "the huge head never reached the backend");
}

/// Keep-alive to backends: sequential requests, each on a fresh client connection,
/// reuse pooled backend connections (at most one per shard, plus the health probe's and one to spare),
/// and lb closes them itself once idle (before the 5 s after which uvicorn would).
#[test]
fn backend_connections_are_pooled_and_closed_when_idle() {
    let m = Mock::spawn(&[] as &[&str]);
    let lb = Lb::spawn(&["--backends", &m.url()]);
    lb.wait_healthy(1);
    let shards = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    for i in 0..60 {
        let r = request(lb.port, "GET", "/pooled", &[], None)
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    let s = m.stats();
    // `connections` counts this stats request's own connection too.
    let connections = s["connections"].as_u64().expect("connections in /stats") - 1;
    assert!(
        connections <= shards + 2,
        "60 sequential requests opened {connections} backend connections ({shards} shards): {s}"
    );
    // Nothing closes idle connections at the mock (no --idle-timeout): only lb's pool
    // timeout (4 s) can bring the count down to the one asking for the stats.
    let open = wait_until(
        Duration::from_secs(15),
        "lb to close its idle backend connections",
        || m.stats(),
        |s| s["open_connections"] == 1,
    );
    assert_eq!(open["idle_closes"], 0, "{open}");
}
