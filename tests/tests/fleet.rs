//! Fleets that change, black-box against the build in `LB_BIN`: the admin API
//! (`/admin/backends`: add, drain, reweight, remove, with a stream running on the drained
//! backend), its access rules (loopback, `--admin-token-file`), and `lb --check`.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use lb_tests::*;
use serde_json::{json, Value};

/// An admin request: (status, JSON body).
fn admin(
    port: u16,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let b = body.map(|v| serde_json::to_vec(&v).unwrap());
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut h: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        h.push(("Authorization", a));
    }
    let r = request(port, method, path, &h, b.as_deref())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let v = if r.body.is_empty() {
        Value::Null
    } else {
        r.json()
    };
    (r.status, v)
}

fn wait_state(port: u16, id: u64, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = admin(port, "GET", &format!("/admin/backends/{id}"), None, None);
        assert_eq!(s, 200, "{v}");
        if v["state"] == state || Instant::now() > deadline {
            assert_eq!(v["state"], state, "backend {id}: {v}");
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_admin_api_changes_the_pool_while_a_stream_runs() {
    let a = Mock::spawn::<&str>(&[]);
    let b = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &a.url(), "--routing", "round-robin"]);
    lb.wait_healthy(1);
    let ap = lb.admin_port().expect("an admin listener");

    let (s, v) = admin(ap, "GET", "/admin/backends", None, None);
    assert_eq!(s, 200, "{v}");
    let list = v["backends"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["id"], 1);
    assert_eq!(list[0]["source"], "flag");
    assert_eq!(list[0]["url"], a.url().as_str());
    assert_eq!(list[0]["host"], a.addr(), "{v}");

    // A stream on a (the only backend so far).
    let mut c = Conn::open(lb.port).unwrap();
    c.send_head("GET", "/sse?events=10&interval_ms=150", &[], None)
        .unwrap();
    let head = c.read_head("GET").unwrap();
    assert_eq!(head.status, 200);
    let mut body = c.body(&head);
    let first = body.read_line().unwrap().expect("first event");
    assert!(first.starts_with("data:"), "{first:?}");

    // b joins (trusted: at once), a drains under its stream.
    let (s, added) = admin(
        ap,
        "POST",
        "/admin/backends",
        Some(json!({"url": b.url(), "weight": 2, "trust": true})),
        None,
    );
    assert_eq!(s, 201, "{added}");
    assert_eq!(added["id"], 2);
    assert_eq!(added["source"], "api");
    assert_eq!(added["weight"], 2);
    let (s, v) = admin(ap, "POST", "/admin/backends/1/drain", None, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "draining", "the stream still runs: {v}");
    assert_eq!(v["in_flight"], 1, "{v}");

    // New requests go to b only.
    let before = a.requests();
    for _ in 0..4 {
        let r = try_completion(lb.port).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.backend_port(), Some(b.port));
    }
    assert_eq!(
        a.requests(),
        before,
        "a drained backend gets no new request"
    );

    // The stream finishes whole.
    let mut events = 1;
    let mut done = false;
    while let Some(line) = body.read_line().unwrap() {
        if line == "data: [DONE]" {
            done = true;
        } else if line.starts_with("data:") {
            events += 1;
        }
    }
    assert_eq!((events, done), (10, true), "every event, then [DONE]");
    let v = wait_state(ap, 1, "drained");
    assert_eq!(v["in_flight"], 0, "{v}");

    // Reweight; bad input; duplicates.
    let (s, v) = admin(
        ap,
        "PATCH",
        "/admin/backends/2",
        Some(json!({"weight": 5})),
        None,
    );
    assert_eq!((s, &v["weight"]), (200, &json!(5)), "{v}");
    let (s, v) = admin(
        ap,
        "PATCH",
        "/admin/backends/2",
        Some(json!({"weight": 0})),
        None,
    );
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    let (s, v) = admin(
        ap,
        "POST",
        "/admin/backends",
        Some(json!({"url": b.url()})),
        None,
    );
    assert_eq!(s, 409, "{v}");
    let (s, v) = admin(
        ap,
        "POST",
        "/admin/backends",
        Some(json!({"url": "ftp://x"})),
        None,
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = admin(
        ap,
        "POST",
        "/admin/backends",
        Some(json!({"weight": 1})),
        None,
    );
    assert_eq!(s, 400, "{v}");
    let (s, _) = admin(ap, "PUT", "/admin/backends/2", None, None);
    assert_eq!(s, 405);
    let (s, _) = admin(ap, "GET", "/admin/backends/99", None, None);
    assert_eq!(s, 404);

    // Remove the drained one: gone from the listing, its id not reused.
    let (s, v) = admin(ap, "DELETE", "/admin/backends/1", None, None);
    assert_eq!(s, 200, "{v}");
    let (s, _) = admin(ap, "GET", "/admin/backends/1", None, None);
    assert_eq!(s, 404);
    let (_, v) = admin(ap, "GET", "/admin/backends", None, None);
    let ids: Vec<&Value> = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| &b["id"])
        .collect();
    assert_eq!(ids, vec![&json!(2)], "{v}");
    let (s, v) = admin(
        ap,
        "POST",
        "/admin/backends",
        Some(json!({"url": a.url()})),
        None,
    );
    assert_eq!(
        (s, &v["id"]),
        (201, &json!(3)),
        "a new id, never a reused one: {v}"
    );
    // Forced removal: at once.
    let (s, v) = admin(ap, "DELETE", "/admin/backends/3?force=true", None, None);
    assert_eq!(s, 200, "{v}");
    let (s, _) = admin(ap, "GET", "/admin/backends/3", None, None);
    assert_eq!(s, 404);

    lb.wait_active(0, Duration::from_secs(10));
    let m = lb.metrics();
    for (change, n) in [
        ("added", 2.0),
        ("drained", 1.0),
        ("removed", 2.0),
        ("weight", 1.0),
    ] {
        assert_eq!(
            m.value(
                "lb_backend_changes_total",
                &[("source", "api"), ("change", change)]
            ),
            n,
            "{change}"
        );
    }
    let log = lb.log.text();
    assert!(log.contains("added (api from 127.0.0.1:"), "{log}");
}

#[test]
fn admin_access_needs_loopback_or_the_token() {
    let m = Mock::spawn::<&str>(&[]);
    // Off loopback, no token: /admin/* is closed, the rest open.
    let lb = Lb::spawn(&["--backends", &m.url(), "--admin-bind", "0.0.0.0:0"]);
    let ap = lb.admin_port().expect("an admin listener");
    let (s, v) = admin(ap, "GET", "/admin/backends", None, None);
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["type"], "permission_error", "{v}");
    assert_eq!(get(ap, "/metrics").status, 200);
    assert_eq!(get(ap, "/live").status, 200);
    drop(lb);

    // With a token: 401 without it or with another, 200 with it.
    let dir = std::env::temp_dir().join(format!("lb-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    let token = "s3cret-token-0123456789";
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let lb = Lb::spawn(&[
        "--backends",
        &m.url(),
        "--admin-bind",
        "0.0.0.0:0",
        "--admin-token-file",
        file.to_str().unwrap(),
    ]);
    let ap = lb.admin_port().expect("an admin listener");
    let (s, v) = admin(ap, "GET", "/admin/backends", None, None);
    assert_eq!(s, 401, "{v}");
    let (s, _) = admin(
        ap,
        "GET",
        "/admin/backends",
        None,
        Some("s3cret-token-0123456788"),
    );
    assert_eq!(s, 401);
    let (s, v) = admin(ap, "GET", "/admin/backends", None, Some(token));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["backends"].as_array().unwrap().len(), 1);
    assert_eq!(
        get(ap, "/metrics").status,
        200,
        "no token needed for /metrics"
    );
    drop(lb);

    // A token too short is refused at start, naming the flag.
    std::fs::write(&file, "short\n").unwrap();
    let out = run_lb(
        &[
            "--backends",
            &m.url(),
            "--admin-token-file",
            file.to_str().unwrap(),
        ],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--admin-token-file"), "{}", out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_validates_without_listening() {
    // The port is held here: lb --check must not try to bind it.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let ok = run_lb(
        &[
            "--check",
            "--backends",
            "http://127.0.0.1:1",
            "vllm-0.example:8000#weight=2",
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--routing",
            "cache-aware",
            "--max-conns",
            "8",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(ok.status.code(), Some(0), "{}", ok.stderr);
    assert!(
        ok.stdout.contains("configuration ok (2 backends)"),
        "{}",
        ok.stdout
    );
    assert_eq!(ok.stderr, "", "nothing on stderr");

    let bad: &[(&[&str], &str)] = &[
        (&["--check", "--backends", "ftp://x:1"], "--backends"),
        (
            &["--check", "--backends", "a:1", "--routing", "cache-aware"],
            "max-conns",
        ),
        (
            &[
                "--check",
                "--backends",
                "a:1",
                "--access-log",
                "/nonexistent-dir/a.log",
            ],
            "--access-log",
        ),
        (
            &[
                "--check",
                "--backends",
                "a:1",
                "--log-to",
                "/nonexistent-dir/r.jsonl",
            ],
            "--log-to",
        ),
    ];
    for (args, flag) in bad {
        let out = run_lb(args, Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(flag), "{args:?}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    }
    drop(held);
}

/// Writes `text` to `path` at once (a rename), as a config tool would.
fn write_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn listed(port: u16) -> Vec<(String, String, u64)> {
    let (s, v) = admin(port, "GET", "/admin/backends", None, None);
    assert_eq!(s, 200, "{v}");
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["url"].as_str().unwrap().to_string(),
                b["source"].as_str().unwrap().to_string(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn wait_listed(port: u16, want: &[(String, String, u64)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = listed(port);
        if got == want || Instant::now() > deadline {
            assert_eq!(got, want);
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_backends_file_is_followed_and_a_bad_one_keeps_the_set() {
    let a = Mock::spawn::<&str>(&[]);
    let b = Mock::spawn::<&str>(&[]);
    let dir = std::env::temp_dir().join(format!("lb-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("backends.txt");
    write_file(&file, &format!("# the fleet\n{}\n", a.url()));
    let path = file.to_str().unwrap();

    // No --backends: the file is the only source.
    let check = run_lb(
        &["--check", "--backends-file", path],
        Duration::from_secs(10),
    );
    assert_eq!(check.status.code(), Some(0), "{}", check.stderr);
    assert!(check.stdout.contains("(1 backends)"), "{}", check.stdout);
    let lb = Lb::spawn(&["--backends-file", path, "--routing", "round-robin"]);
    lb.wait_healthy(1);
    let ap = lb.admin_port().expect("an admin listener");
    let file_ = "file".to_string();
    wait_listed(ap, &[(a.url(), file_.clone(), 1)]);

    // A line added (with a weight and a trailing comment) joins.
    write_file(
        &file,
        &format!("{}\n{}#weight=3  # bigger\n", a.url(), b.url()),
    );
    wait_listed(
        ap,
        &[(a.url(), file_.clone(), 1), (b.url(), file_.clone(), 3)],
    );
    lb.wait_healthy(2);

    // An invalid file keeps the set, and says which line.
    write_file(&file, &format!("{}\nftp://nope:1\n", a.url()));
    lb.log
        .wait_for(Duration::from_secs(10), |l| {
            l.contains("--backends-file") && l.contains("line 2")
        })
        .unwrap_or_else(|| panic!("no error line for the bad file: {}", lb.log.text()));
    assert_eq!(listed(ap).len(), 2, "the set is kept");
    // So does an empty one.
    write_file(&file, "# nothing here\n");
    lb.log
        .wait_for(Duration::from_secs(10), |l| {
            l.contains("no backend in the file")
        })
        .unwrap_or_else(|| panic!("no error line for the empty file: {}", lb.log.text()));
    assert_eq!(listed(ap).len(), 2, "the set is kept");

    // A line removed: that backend drains and leaves; traffic goes to the other.
    write_file(&file, &format!("{}#weight=3\n", b.url()));
    wait_listed(ap, &[(b.url(), file_.clone(), 3)]);
    let before = a.requests();
    for _ in 0..3 {
        let r = try_completion(lb.port).unwrap();
        assert_eq!(
            (r.status, r.backend_port()),
            (200, Some(b.port)),
            "{}",
            r.text()
        );
    }
    assert_eq!(a.requests(), before);
    let m = lb.metrics();
    assert_eq!(
        m.value(
            "lb_backend_changes_total",
            &[("source", "file"), ("change", "added")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "lb_backend_changes_total",
            &[("source", "file"), ("change", "removed")]
        ),
        1.0
    );
    drop(lb);

    // A bad file at start is refused, naming the flag and the line.
    write_file(&file, &format!("{}\nnot a url\n", a.url()));
    let out = run_lb(&["--backends-file", path], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("--backends-file") && out.stderr.contains("line 2"),
        "{}",
        out.stderr
    );
    let _ = std::fs::remove_dir_all(&dir);
}
