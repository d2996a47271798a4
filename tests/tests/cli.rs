//! Command-line contract of `lb`: flags that are refused (with a message that
//! names the flag) before anything listens, flags that are accepted, the
//! backend list syntax and the routing policies.

use std::collections::HashMap;
use std::time::Duration;

use lb_tests::*;

/// Run `lb` with `args`, expect exit status 2, nothing on stdout, and on stderr one line
/// `lb: error: …` that contains every one of `needles` (case-insensitive).
fn refused(args: &[&str], needles: &[&str]) {
    let out = run_lb(args, Duration::from_secs(10));
    assert_eq!(
        out.status.code(),
        Some(2),
        "lb {args:?} exited with {} but should refuse its input with status 2; stderr: {:?}",
        out.status,
        out.stderr
    );
    assert_eq!(out.stdout, "", "lb {args:?}: nothing on stdout");
    let err = out.stderr.to_lowercase();
    assert!(
        !err.trim().is_empty(),
        "lb {args:?} exited with {} and an empty stderr",
        out.status
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "lb {args:?}: the error should be one line, got: {:?}",
        out.stderr
    );
    assert!(
        out.stderr.starts_with("lb: error: ")
            && !err.contains("tip:")
            && !err.contains("usage")
            && !err.contains("--help` for"),
        "lb {args:?}: the error should be one `lb: error: ` sentence, got: {:?}",
        out.stderr
    );
    for n in needles {
        assert!(
            err.contains(&n.to_lowercase()),
            "lb {args:?}: stderr should mention {n:?}, got: {:?}",
            out.stderr
        );
    }
}

/// [`refused`] for `extra` flags after the ones every run needs: a backend (nothing listens
/// there), a free port, loopback.
fn refused_with(extra: &[&str], needles: &[&str]) {
    let b = some_backend();
    let p = free_port().to_string();
    let mut args = vec!["--backends", &b, "--port", &p, "--bind", "127.0.0.1"];
    args.extend_from_slice(extra);
    refused(&args, needles);
}

/// A backend argument that refers to a port nothing listens on.
fn some_backend() -> String {
    format!("http://127.0.0.1:{}", dead_port())
}

#[test]
fn harness_finds_the_mock_backend_cargo_built() {
    assert_eq!(
        std::fs::canonicalize(mock_bin()).unwrap(),
        std::fs::canonicalize(env!("CARGO_BIN_EXE_mock-backend")).unwrap()
    );
}

#[test]
fn version_and_help() {
    let out = run_lb(&["--version"], Duration::from_secs(10));
    assert!(out.status.success(), "--version: {out:?}");
    assert!(
        out.stdout.contains(env!("CARGO_PKG_VERSION")),
        "--version should print the version, got {:?}",
        out.stdout
    );

    let out = run_lb(&["--help"], Duration::from_secs(10));
    assert!(out.status.success(), "--help: {out:?}");
    for flag in [
        "--backends",
        "--port",
        "--timeout",
        "--health-check-interval",
        "--routing",
        "--max-conns",
        "--verbose",
    ] {
        assert!(
            out.stdout.contains(flag),
            "--help should document {flag}; got:\n{}",
            out.stdout
        );
    }
    // Every routing policy, each with a few words on the same line.
    for policy in [
        "least-conn",
        "round-robin",
        "weighted-round-robin",
        "random",
        "ip-hash",
        "p2c",
        "random-two-least",
        "cache-aware",
        "consistent-hash",
    ] {
        let described = out.stdout.lines().any(|l| {
            l.split(|c: char| c.is_whitespace() || ":(),".contains(c))
                .any(|w| w == policy)
                && l.split_whitespace().count() >= 4
        });
        assert!(
            described,
            "--help should list --routing {policy} with a few words; got:\n{}",
            out.stdout
        );
    }
}

#[test]
fn refuses_missing_backends() {
    refused(&[], &["backends"]);
    let p = free_port().to_string();
    refused(&["--port", &p, "--bind", "127.0.0.1"], &["backends"]);
}

#[test]
fn refuses_malformed_backend_urls() {
    let p = free_port().to_string();
    for bad in [
        "http://",
        "http://127.0.0.1:notaport",
        "http://127.0.0.1:99999",
        "http://exa mple.com:80",
        "://127.0.0.1:80",
    ] {
        refused(
            &["--backends", bad, "--port", &p, "--bind", "127.0.0.1"],
            &["backend"],
        );
    }
}

#[test]
fn refuses_unsupported_schemes() {
    let p = free_port().to_string();
    for bad in [
        "ftp://127.0.0.1:21",
        "gopher://127.0.0.1:70",
        "file:///etc/passwd",
    ] {
        refused(
            &["--backends", bad, "--port", &p, "--bind", "127.0.0.1"],
            &["backend"],
        );
    }
}

#[test]
fn refuses_bad_ports() {
    let b = some_backend();
    for bad in ["0", "65536", "70000", "http"] {
        refused(
            &["--backends", &b, "--port", bad, "--bind", "127.0.0.1"],
            &["port"],
        );
    }
}

#[test]
fn refuses_bad_durations() {
    for (flag, value) in [
        ("--timeout", "-5s"),
        ("--timeout", "soon"),
        ("--timeout", "10 parsecs"),
        ("--connect-timeout", "-1s"),
        ("--connect-timeout", "abc"),
        ("--shutdown-timeout", "-30s"),
        ("--shutdown-timeout", "xyz"),
        ("--health-check-interval", "-30s"),
        ("--health-check-interval", "often"),
    ] {
        let name = flag.trim_start_matches("--");
        refused_with(&[flag, value], &[name]);
    }
    // The `--flag=value` spelling too.
    refused_with(&["--timeout=-5s"], &["timeout"]);
}

/// Every flag that takes a duration.
const DURATION_FLAGS: [&str; 9] = [
    "--timeout",
    "--connect-timeout",
    "--health-check-interval",
    "--health-timeout",
    "--status-interval",
    "--shutdown-timeout",
    "--head-timeout",
    "--affinity-ttl",
    "--queue-timeout",
];

#[test]
fn refuses_durations_over_30_days() {
    // `--timeout 500000000000y` was accepted, then every request panicked computing its
    // deadline and got no answer.
    for flag in DURATION_FLAGS {
        for value in ["500000000000y", "31d", "720h1s", "1y"] {
            refused_with(&[flag, value], &[flag, "30 days"]);
        }
    }
}

/// Every flag that takes a whole number.
const NUMERIC_FLAGS: [&str; 8] = [
    "--port",
    "--fall",
    "--rise",
    "--passive-threshold",
    "--max-conns",
    "--queue-size",
    "--log-body-limit",
    "--replay-buffer",
];

/// Every flag that takes a value.
const VALUE_FLAGS: [&str; 15] = [
    "--backends",
    "--port",
    "--bind",
    "--health-path",
    "--fall",
    "--rise",
    "--passive-threshold",
    "--routing",
    "--max-conns",
    "--backend-ca",
    "--hash-key",
    "--queue-size",
    "--log-to",
    "--log-body-limit",
    "--replay-buffer",
];

/// [`refused`] for `extra` after a backend, and loopback and a free port unless `extra`
/// gives `--bind` or `--port` itself (a flag given twice is refused for that).
fn refused_after(extra: &[&str], needles: &[&str]) {
    let gives = |flag: &str| extra.iter().any(|a| a.split('=').next() == Some(flag));
    let b = some_backend();
    let p = free_port().to_string();
    let mut args = vec!["--backends", &b];
    if !gives("--port") {
        args.extend(["--port", &p]);
    }
    if !gives("--bind") {
        args.extend(["--bind", "127.0.0.1"]);
    }
    args.extend_from_slice(extra);
    refused(&args, needles);
}

#[test]
fn refuses_negative_numbers_naming_the_flag() {
    // clap took "-1" for an unknown flag: "unexpected argument '-1' found tip: …".
    for flag in NUMERIC_FLAGS {
        for value in ["-1", "-5", "-1.5"] {
            refused_after(
                &[flag, value],
                &[flag, &format!("'{value}'"), "whole number"],
            );
        }
        refused_after(&[&format!("{flag}=-1")], &[flag, "'-1'", "whole number"]);
    }
}

#[test]
fn refuses_non_numeric_numbers_naming_the_flag() {
    for flag in NUMERIC_FLAGS {
        for value in ["many", "1.5", "1e3", "0x10", "5k"] {
            refused_after(
                &[flag, value],
                &[flag, &format!("'{value}'"), "whole number"],
            );
        }
        refused_after(&[flag, "99999999999999999999999"], &[flag, "too large"]);
    }
    refused_after(&["--port", "65536"], &["--port", "at most 65535"]);
    for flag in ["--port", "--fall", "--rise"] {
        refused_after(&[flag, "0"], &[flag, "'0'", "≥ 1"]);
    }
}

#[test]
fn refuses_unknown_flags() {
    let b = some_backend();
    refused(
        &["--backends", &b, "--no-such-flag"],
        &["unknown flag --no-such-flag", "lb --help"],
    );
    refused_with(&["--foo=bar"], &["unknown flag --foo "]);
    refused_with(&["-x"], &["unknown flag -x "]);
    refused_with(
        &["--max-con", "3"],
        &["unknown flag --max-con ", "--max-conns"],
    );
    refused_with(&["--verbose", "--bogus", "1"], &["unknown flag --bogus"]);
}

#[test]
fn refuses_missing_values() {
    for flag in VALUE_FLAGS.iter().chain(&DURATION_FLAGS) {
        // Last on the line, or followed by another flag.
        refused_after(&[flag], &[flag, "missing value"]);
        refused_after(&[flag, "--verbose"], &[flag, "missing value"]);
        refused_after(&[&format!("{flag}=")], &[flag]);
    }
}

#[test]
fn refuses_values_for_boolean_flags() {
    for value in ["yes", "true", "1", ""] {
        refused_with(
            &[&format!("--verbose={value}")],
            &["--verbose", "takes no value"],
        );
    }
    refused_with(&["-v=1"], &["short flags take no '=value'"]);
}

#[test]
fn refuses_a_flag_given_twice() {
    refused_with(
        &["--max-conns", "1", "--max-conns", "2"],
        &["--max-conns", "more than once"],
    );
}

#[test]
fn refuses_health_check_interval_under_5s() {
    for value in ["4s", "4999ms", "500ms", "1s"] {
        refused_with(
            &["--health-check-interval", value],
            &["health-check-interval"],
        );
    }
}

#[test]
fn refuses_a_request_log_it_cannot_open() {
    let dir = std::env::temp_dir().join(format!("lb-no-such-dir-{}", std::process::id()));
    let path = dir.join("requests.jsonl");
    let path = path.to_str().unwrap();
    refused_with(&["--log-to", path], &["--log-to", path]);
    assert!(!dir.exists());
}

#[test]
fn refuses_a_port_another_lb_listens_on() {
    // Both would listen with SO_REUSEPORT; the second must not quietly take half of the
    // first one's connections.
    let m = Mock::spawn::<&str>(&[]);
    let first = Lb::spawn(&["--backends", &m.url()]);
    let port = first.port.to_string();
    let out = run_lb(
        &[
            "--backends",
            &m.url(),
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
        ],
        Duration::from_secs(10),
    );
    assert!(!out.status.success(), "a second lb started on port {port}");
    let last = out.stderr.lines().last().unwrap_or_default().to_lowercase();
    assert!(
        last.contains("--port") && last.contains(&port) && last.contains("in use"),
        "the error should name --port, the address and say it is in use: {:?}",
        out.stderr
    );
    assert_eq!(first.completion().status, 200, "the first lb still serves");
}

#[test]
fn refuses_unknown_routing_policy() {
    refused_with(
        &["--routing", "fastest-first"],
        &["--routing", "'fastest-first'", "least-conn", "round-robin"],
    );
}

#[test]
fn refuses_bad_max_conns() {
    for value in ["many", "1.5"] {
        refused_with(&["--max-conns", value], &["--max-conns", "whole number"]);
    }
}

#[test]
fn accepts_every_documented_flag() {
    let m = Mock::spawn::<&str>(&[]);
    let url = m.url();
    let lb = Lb::spawn(&[
        "--backends",
        &url,
        "--timeout",
        "1h30m",
        "--connect-timeout",
        "500ms",
        "--health-check-interval",
        "5m",
        "--health-path",
        "/v1/models",
        "--routing",
        "random-two-least",
        "--max-conns",
        "0",
        "--shutdown-timeout",
        "30s",
        "--verbose",
    ]);
    let (status, h) = lb.health();
    assert_eq!(status, 200, "{h}");
    assert_eq!(lb.completion().status, 200);
    // Durations in other spellings.
    for t in ["4h", "5m", "30s", "2500ms", "30d"] {
        let lb = Lb::spawn(&["--backends", &url, "--timeout", t]);
        assert_eq!(lb.completion().status, 200, "--timeout {t}");
    }
}

#[test]
fn port_flag_is_honoured() {
    let m = Mock::spawn::<&str>(&[]);
    let port = free_port();
    let ps = port.to_string();
    let lb = Lb::spawn(&["--backends", &m.url(), "--port", &ps, "--bind", "127.0.0.1"]);
    assert_eq!(lb.port, port);
    let r = get(port, "/health");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["total_backends"], 1);
    let r = try_completion(port).expect("request on --port");
    assert_eq!(r.status, 200);
    assert_eq!(r.backend_port(), Some(m.port));
}

#[test]
fn bind_flag_is_honoured() {
    let m = Mock::spawn::<&str>(&[]);
    let port = free_port();
    let ps = port.to_string();
    // Any 127.0.0.0/8 address is loopback on Linux.
    let lb = Lb::spawn_with(
        &["--backends", &m.url(), "--port", &ps, "--bind", "127.0.0.2"],
        LbOptions {
            no_wait: true,
            ..LbOptions::default()
        },
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 2], port));
    let ok = poll(DEADLINE, || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()
    });
    assert!(ok.is_some(), "lb --bind 127.0.0.2 does not listen there");
    assert!(
        Conn::open_timeout(port, Duration::from_millis(500)).is_err(),
        "lb --bind 127.0.0.2 also listens on 127.0.0.1"
    );
    drop(lb);
}

#[test]
fn ipv6_backend_url() {
    let m = Mock::spawn(&["--bind", "::1"]);
    let lb = Lb::spawn(&["--backends", &format!("http://[::1]:{}", m.port)]);
    let h = lb.wait_healthy(1);
    assert_eq!(h["total_backends"], 1);
    let r = lb.completion();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.backend_port(), Some(m.port));
    let r = lb.get("/v6");
    assert_eq!(r.json()["headers"]["host"], format!("[::1]:{}", m.port));
}

#[test]
fn schemeless_backends_work() {
    let a = Mock::spawn::<&str>(&[]);
    let b = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &a.addr(), "--backends", &b.addr()]);
    let h = lb.wait_healthy(2);
    assert_eq!(h["total_backends"], 2, "{h}");
    let ports = concurrent_completions(lb.port, 12);
    assert!(
        ports.contains_key(&a.port) && ports.contains_key(&b.port),
        "both scheme-less backends should get traffic: {ports:?}"
    );
}

#[test]
fn backend_list_forms() {
    // `--backends A B` (several values, as bash expansion gives), positional
    // URLs, and repeated `--backends`, mixed.
    let a = Mock::spawn::<&str>(&[]);
    let b = Mock::spawn::<&str>(&[]);
    let c = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &a.url(), &b.url(), "--backends", &c.addr()]);
    assert_eq!(lb.health().1["total_backends"], 3);
    let lb = Lb::spawn(&[&a.url(), &b.url(), &c.url()]);
    assert_eq!(lb.health().1["total_backends"], 3);
    let lb = Lb::spawn(&[&a.url(), "--backends", &b.url()]);
    assert_eq!(lb.health().1["total_backends"], 2);
    assert_eq!(lb.completion().status, 200);
}

/// `n` concurrent completions through `lb` (the mocks should have a delay so
/// they overlap); returns how many each backend port answered.
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

/// `n` sequential completions through `lb`; how many each backend answered.
fn sequential_completions(lb: &Lb, n: usize) -> HashMap<u16, usize> {
    let mut by_port = HashMap::new();
    for _ in 0..n {
        let r = lb.completion();
        assert_eq!(r.status, 200, "{}", r.text());
        *by_port
            .entry(r.backend_port().expect("backend_port"))
            .or_insert(0) += 1;
    }
    by_port
}

#[test]
fn every_routing_policy_serves_traffic() {
    let a = Mock::spawn(&["--delay", "200ms", "--health-endpoint", "/healthz"]);
    let b = Mock::spawn(&["--delay", "200ms", "--health-endpoint", "/healthz"]);
    for policy in [
        "least-conn",
        "round-robin",
        "weighted-round-robin",
        "random",
        "ip-hash",
        "p2c",
        "random-two-least",
    ] {
        let lb = Lb::spawn(&[
            "--backends",
            &a.url(),
            "--backends",
            &b.url(),
            "--health-path",
            "/healthz",
            "--routing",
            policy,
        ]);
        lb.wait_healthy(2);
        let by_port = concurrent_completions(lb.port, 6);
        assert_eq!(by_port.values().sum::<usize>(), 6, "{policy}");
        // ip-hash pins one client to one backend, and random may pick the
        // same one six times in a row (1 in 32); the others spread overlapping
        // requests (random_reaches_every_backend checks random apart).
        if policy != "ip-hash" && policy != "random" {
            assert_eq!(
                by_port.len(),
                2,
                "--routing {policy}: 6 concurrent requests should reach both backends: {by_port:?}"
            );
        }
    }
}

#[test]
fn round_robin_rotates_evenly() {
    let mocks: Vec<Mock> = (0..3).map(|_| Mock::spawn::<&str>(&[])).collect();
    let mut args = vec!["--routing".to_string(), "round-robin".to_string()];
    for m in &mocks {
        args.push("--backends".into());
        args.push(m.url());
    }
    let lb = Lb::spawn(&args);
    lb.wait_healthy(3);
    // Until each has passed its first probe, an unprobed backend is passed over while a
    // probed one has room: the rotation would skip it.
    lb.wait_probed(3);
    let by_port = sequential_completions(&lb, 30);
    for m in &mocks {
        let n = by_port.get(&m.port).copied().unwrap_or(0);
        assert!(
            (9..=11).contains(&n),
            "round-robin over 3 backends, 30 requests: {by_port:?}"
        );
    }
}

#[test]
fn weighted_round_robin_follows_weights() {
    let a = Mock::spawn::<&str>(&[]);
    let b = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&[
        "--routing",
        "weighted-round-robin",
        "--backends",
        &format!("{}#weight=3", a.url()),
        "--backends",
        &b.url(),
    ]);
    lb.wait_healthy(2);
    lb.wait_probed(2);
    let by_port = sequential_completions(&lb, 40);
    let na = by_port.get(&a.port).copied().unwrap_or(0);
    assert!(
        (28..=32).contains(&na),
        "weights 3:1 over 40 requests should give ~30 to the first: {by_port:?}"
    );
}

#[test]
fn ip_hash_sticks_to_one_backend() {
    let a = Mock::spawn::<&str>(&[]);
    let b = Mock::spawn::<&str>(&[]);
    let c = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&[
        "--routing",
        "ip-hash",
        "--backends",
        &a.url(),
        &b.url(),
        &c.url(),
    ]);
    lb.wait_healthy(3);
    let by_port = sequential_completions(&lb, 15);
    assert_eq!(
        by_port.len(),
        1,
        "every request comes from 127.0.0.1, so ip-hash should pick one backend: {by_port:?}"
    );
}

#[test]
fn random_reaches_every_backend() {
    let a = Mock::spawn::<&str>(&[]);
    let b = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--routing", "random", "--backends", &a.url(), &b.url()]);
    lb.wait_healthy(2);
    lb.wait_probed(2);
    let by_port = sequential_completions(&lb, 40);
    assert_eq!(by_port.len(), 2, "{by_port:?}");
}

/// Start-up failures are one line too, with nothing printed before them: a port in use
/// (here by another lb), and, in the smol build without TLS, an `https://` backend.
#[test]
fn start_up_failures_are_one_line() {
    let m = Mock::spawn::<&str>(&[]);
    let first = Lb::spawn(&["--backends", &m.url()]);
    first.wait_healthy(1);
    let port = first.port.to_string();
    refused(
        &[
            "--backends",
            &m.url(),
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
        ],
        &["--port", "in use"],
    );
    if build_is("smol") {
        refused_with(
            &["--backends", "https://127.0.0.1:1"],
            &["--backends", "tls"],
        );
    }
}
