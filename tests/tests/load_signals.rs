//! Engine load signals, black-box (run against both builds through `LB_BIN`): `lb` polls
//! each backend's `/metrics`, reads vLLM's or SGLang's load figures, skips a saturated
//! engine while another can take the request, shows the last report in
//! `/admin/backends` and `/metrics`, and changes nothing when the metrics are missing or
//! garbage. Load polls are not requests: they count nowhere.
//!
//! The backends are small scripted servers ([`FakeBackend`]) whose `/metrics` text the
//! test sets, and `mock-backend --engine` for the real vLLM exposition.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lb_tests::*;

/// A scripted backend: `/metrics` answers the text the test sets (200), `/v1/models`
/// answers 200, anything else 200 `{"backend":NAME}`; it counts both kinds.
struct Engine {
    fake: FakeBackend,
    metrics: Arc<Mutex<String>>,
    scrapes: Arc<AtomicU64>,
    served: Arc<AtomicU64>,
}

impl Engine {
    fn spawn(name: &'static str, metrics: &str) -> Engine {
        let text = Arc::new(Mutex::new(metrics.to_string()));
        let scrapes = Arc::new(AtomicU64::new(0));
        let served = Arc::new(AtomicU64::new(0));
        let (t, s, n) = (text.clone(), scrapes.clone(), served.clone());
        let fake = FakeBackend::spawn(move |head| {
            let line = String::from_utf8_lossy(head);
            let line = line.lines().next().unwrap_or("");
            if line.starts_with("GET /metrics ") {
                s.fetch_add(1, Ordering::SeqCst);
                let body = t.lock().unwrap().clone();
                let r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                return FakeReply::Raw(r.into_bytes());
            }
            if line.starts_with("GET /v1/models ") {
                return FakeReply::json(200, &[], r#"{"object":"list","data":[]}"#);
            }
            n.fetch_add(1, Ordering::SeqCst);
            FakeReply::json(200, &[], &format!(r#"{{"backend":"{name}"}}"#))
        });
        Engine {
            fake,
            metrics: text,
            scrapes,
            served,
        }
    }

    fn url(&self) -> String {
        self.fake.url()
    }

    fn set_metrics(&self, text: &str) {
        *self.metrics.lock().unwrap() = text.to_string();
    }
}

/// `/admin/backends`' entry for `url`.
fn admin_backend(lb: &Lb, url: &str) -> Value {
    let r = lb.admin_get("/admin/backends");
    assert_eq!(r.status, 200, "{}", r.text());
    let list = r.json()["backends"].clone();
    list.as_array()
        .and_then(|l| l.iter().find(|b| b["url"] == url).cloned())
        .unwrap_or_else(|| panic!("{url} not listed: {list}"))
}

/// Sends `n` requests, one at a time; how many each backend (by name) answered.
fn spread(lb: &Lb, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for i in 0..n {
        let r = lb.get("/work");
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        let name = r.json()["backend"].as_str().unwrap_or("?").to_string();
        *seen.entry(name).or_insert(0) += 1;
    }
    seen
}

const IDLE: &str = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 0\nvllm:num_requests_waiting{model_name=\"m\"} 0\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.1\n";
const SATURATED: &str = "vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 8\nvllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 4\nvllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 5\n";

/// One engine reports a queue (waiting 9 over two engines, above the default 5): every
/// new request goes to the other backend, under round robin too; once it reports an
/// empty queue, it takes its turn again. Load polls count in no request figure.
#[test]
fn a_saturated_engine_gets_no_new_requests_while_another_is_free() {
    let busy = Engine::spawn("busy", SATURATED);
    let free = Engine::spawn("free", IDLE);
    let lb = Lb::spawn(&[
        "--backends",
        &busy.url(),
        &free.url(),
        "--routing",
        "round-robin",
        "--load-interval",
        "50ms",
    ]);
    lb.wait_probed(2);
    let entry = wait_until(
        Duration::from_secs(10),
        "the busy engine's report",
        || admin_backend(&lb, &busy.url()),
        |b| b["engine"]["saturated"] == true,
    );
    let e = &entry["engine"];
    assert_eq!(
        (&e["signal"], &e["running"], &e["waiting"]),
        (&json!("vllm"), &json!(8), &json!(9)),
        "{entry}"
    );
    assert!(e["kv_usage"].is_null() && e["fresh"] == true, "{entry}");
    assert!(
        entry["last_load_poll"]["result"]
            .as_str()
            .is_some_and(|r| r.contains("vllm")),
        "{entry}"
    );
    assert_eq!(
        spread(&lb, 8),
        HashMap::from([("free".to_string(), 8)]),
        "the saturated backend took requests"
    );
    // The engine drains its queue: both take turns again.
    busy.set_metrics(IDLE);
    wait_until(
        Duration::from_secs(10),
        "the busy engine's new report",
        || admin_backend(&lb, &busy.url()),
        |b| b["engine"]["saturated"] == false && b["engine"]["waiting"] == 0,
    );
    let seen = spread(&lb, 8);
    assert_eq!(seen.get("busy"), Some(&4), "{seen:?}");

    // Polled many times by now (every 50 ms), yet only the 16 requests count.
    assert!(busy.scrapes.load(Ordering::SeqCst) >= 2);
    let m = lb.metrics();
    assert_eq!(m.value("lb_requests_total", &[]), 16.0);
    assert_eq!(
        busy.served.load(Ordering::SeqCst) + free.served.load(Ordering::SeqCst),
        16
    );
    assert_eq!(
        m.value("lb_backend_engine_running", &[("backend", &busy.url())]),
        0.0
    );
    assert_eq!(
        m.value("lb_backend_engine_kv_usage", &[("backend", &free.url())]),
        0.1
    );
    assert!(m.has("lb_backend_engine_report_age_seconds"));
}

/// Every backend saturated: requests are still served (the skip never turns one away),
/// and `--max-conns` still counts only lb's own requests.
#[test]
fn when_every_engine_is_saturated_requests_still_go_through() {
    let a = Engine::spawn("a", SATURATED);
    let b = Engine::spawn(
        "b",
        "sglang:num_running_reqs 1\nsglang:num_queue_reqs 0\nsglang:token_usage 0.99\n",
    );
    let lb = Lb::spawn(&[
        "--backends",
        &a.url(),
        &b.url(),
        "--load-interval",
        "50ms",
        "--max-conns",
        "1",
    ]);
    lb.wait_probed(2);
    for url in [a.url(), b.url()] {
        wait_until(
            Duration::from_secs(10),
            "both reports",
            || admin_backend(&lb, &url),
            |b| b["engine"]["saturated"] == true,
        );
    }
    assert_eq!(admin_backend(&lb, &b.url())["engine"]["signal"], "sglang");
    let seen = spread(&lb, 6);
    assert_eq!(seen.values().sum::<usize>(), 6, "{seen:?}");
}

/// Metrics that are garbage, or not there: routing is exactly as without engine
/// signals, and under `auto` such a backend is not asked again for a minute.
#[test]
fn garbage_or_missing_metrics_change_nothing() {
    let garbage = Engine::spawn(
        "garbage",
        "<html>\u{0}vllm:num_requests_waiting{ 99\n{\"ok\":true}",
    );
    let plain = Mock::spawn(&[] as &[&str]);
    let lb = Lb::spawn(&[
        "--backends",
        &garbage.url(),
        &plain.url(),
        "--routing",
        "round-robin",
        "--load-interval",
        "50ms",
    ]);
    lb.wait_probed(2);
    for url in [garbage.url(), plain.url()] {
        let entry = wait_until(
            Duration::from_secs(10),
            "a load poll's verdict",
            || admin_backend(&lb, &url),
            |b| b["last_load_poll"].is_object(),
        );
        let result = entry["last_load_poll"]["result"].as_str().unwrap_or("");
        assert!(result.contains("not polled again for 60s"), "{entry}");
        assert!(entry["engine"].is_null(), "{entry}");
    }
    let mut a = 0;
    for i in 0..8 {
        let r = lb.get("/work");
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        a += usize::from(r.json()["backend"] == "garbage");
    }
    assert_eq!(a, 4, "round robin as always");
    // One scrape each (then quiet for a minute), none of it counted by the mock.
    assert_eq!(garbage.scrapes.load(Ordering::SeqCst), 1);
    assert_eq!(plain.requests(), 4);
    assert!(!lb.metrics().has("lb_backend_engine_running"));
}

/// `mock-backend --engine` serves vLLM's real exposition: lb reads it, and its polls
/// count neither as the mock's requests nor as its connections.
#[test]
fn the_mock_engine_reports_and_polls_count_nowhere() {
    let engine = Mock::spawn(&["--engine"]);
    let lb = Lb::spawn(&["--backends", &engine.url(), "--load-interval", "50ms"]);
    lb.wait_probed(1);
    let entry = wait_until(
        Duration::from_secs(10),
        "the engine's report",
        || admin_backend(&lb, &engine.url()),
        |b| b["engine"]["signal"] == "vllm",
    );
    assert_eq!(entry["engine"]["running"], 0, "{entry}");
    assert!(entry["engine"]["kv_usage"].is_number(), "{entry}");
    let before = engine.stats();
    std::thread::sleep(Duration::from_millis(300));
    let after = engine.stats();
    assert_eq!(after["requests"], 0, "{after}");
    // About six polls went by; the count grew by the second /stats request's own
    // connection (and at most one poll's, caught between its accept and its request).
    let grew = after["connections"].as_u64().unwrap() - before["connections"].as_u64().unwrap();
    assert!((1..=2).contains(&grew), "{before} -> {after}");
    assert_eq!(lb.metrics().value("lb_requests_total", &[]), 0.0);
}

/// `--load-signal off`: no polls at all; bad values are refused naming the flag.
#[test]
fn load_signal_off_polls_nothing_and_bad_flags_are_refused() {
    let e = Engine::spawn("e", SATURATED);
    let lb = Lb::spawn(&[
        "--backends",
        &e.url(),
        "--load-signal",
        "off",
        "--load-interval",
        "50ms",
    ]);
    lb.wait_probed(1);
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(e.scrapes.load(Ordering::SeqCst), 0);
    assert!(admin_backend(&lb, &e.url())["engine"].is_null());
    drop(lb);
    for (flag, value) in [
        ("--load-interval", "10ms"),
        ("--load-signal", "triton"),
        ("--saturation-kv", "2"),
        ("--load-path", "metrics"),
    ] {
        let out = std::process::Command::new(lb_bin())
            .args(["--backends", &e.url(), flag, value, "--check"])
            .output()
            .expect("run lb");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(flag),
            "{flag} {value}: {err}"
        );
    }
}
