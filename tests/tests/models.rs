//! Model pools, end to end: `lb` learns each backend's models from `/v1/models` (the
//! probe's body, or one more GET per sweep when `--health-path` is something else),
//! routes a request only among the backends that list its `"model"`, routes a model no
//! backend lists among all (or answers `404 model_not_found` with `--strict-models`),
//! and answers `GET /v1/models` itself with the union when every healthy backend gave a
//! list.

use std::collections::HashSet;
use std::time::Duration;

use lb_tests::*;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(10);

fn chat(lb: &Lb, model: &str) -> Resp {
    lb.post_json(
        "/v1/chat/completions",
        &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
    )
}

/// The ids of a model list.
fn ids(v: &Value) -> Vec<String> {
    v["data"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|e| e["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `lb` answers `GET /v1/models` itself (no backend port) with `want`.
fn wait_merged(lb: &Lb, want: &[&str]) -> Resp {
    wait_until(
        DEADLINE,
        "lb's own merged /v1/models",
        || lb.get("/v1/models"),
        |r| r.status == 200 && r.backend_port().is_none() && ids(&r.json()) == want,
    )
}

/// The backend ports that served `n` chat requests for `model` (each a 200).
fn served(lb: &Lb, model: &str, n: usize) -> HashSet<u16> {
    (0..n)
        .map(|i| {
            let r = chat(lb, model);
            assert_eq!(r.status, 200, "{model} #{i}: {}", r.text());
            r.backend_port().expect("a backend answered")
        })
        .collect()
}

#[test]
fn requests_go_only_to_backends_that_list_their_model() {
    let llama: Vec<Mock> = (0..2)
        .map(|_| Mock::spawn(&["--model", "llama", "--model", "shared"]))
        .collect();
    let qwen: Vec<Mock> = (0..2)
        .map(|_| Mock::spawn(&["--model", "qwen", "--model", "shared"]))
        .collect();
    let mut args = vec!["--backends".to_string()];
    args.extend(llama.iter().chain(&qwen).map(Mock::url));
    args.extend(["--routing", "round-robin"].map(String::from));
    let lb = Lb::spawn(&args);
    lb.wait_healthy(4);
    let merged = wait_merged(&lb, &["llama", "qwen", "shared"]);
    let v = merged.json();
    assert_eq!(v["object"], "list");
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["object"] == "model"),
        "{v}"
    );

    let admin = lb.admin_get("/admin/backends").json();
    let lists: Vec<Value> = admin["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["models"].clone())
        .collect();
    assert_eq!(lists[0], json!(["llama", "shared"]), "{admin}");
    assert_eq!(lists[3], json!(["qwen", "shared"]), "{admin}");
    let ports = |ms: &[Mock]| -> HashSet<u16> { ms.iter().map(|m| m.port).collect() };
    assert_eq!(served(&lb, "llama", 8), ports(&llama));
    assert_eq!(served(&lb, "qwen", 8), ports(&qwen));
    // Listed by all: round robin over all four.
    assert_eq!(served(&lb, "shared", 8).len(), 4);
    // Listed by none: routed among all as before (the backend answers as it would).
    assert_eq!(served(&lb, "phi", 8).len(), 4);
    // A request without a model, or with a body that is not JSON, goes anywhere too.
    let r = lb.post_json("/v1/completions", &json!({"prompt": "x"}));
    assert_eq!(r.status, 200, "{}", r.text());
    // Model-list fetches are not requests: the mocks counted only the chats.
    let total: u64 = llama.iter().chain(&qwen).map(Mock::requests).sum();
    assert_eq!(total, 8 * 4 + 1);
}

#[test]
fn strict_models_answers_404_for_a_model_nobody_lists() {
    let a = Mock::spawn(&["--model", "llama"]);
    let b = Mock::spawn(&["--model", "qwen"]);
    let lb = Lb::spawn(&["--backends", &a.url(), &b.url(), "--strict-models"]);
    lb.wait_healthy(2);
    wait_merged(&lb, &["llama", "qwen"]);
    let r = chat(&lb, "phi");
    let e = assert_error_json(&r, 404);
    assert_eq!(e["code"], "model_not_found", "{e}");
    assert_eq!(e["type"], "invalid_request_error", "{e}");
    assert!(r.header("x-request-id").is_some());
    assert_eq!(served(&lb, "llama", 3), HashSet::from([a.port]));
    assert_eq!(served(&lb, "qwen", 3), HashSet::from([b.port]));
    assert_eq!(a.requests() + b.requests(), 6, "the 404 reached no backend");
    let m = lb.metrics();
    assert_eq!(
        m.value("lb_rejections_total", &[("reason", "unknown_model")]),
        1.0
    );
}

/// A backend whose `/v1/models` gives no list serves every model, and then `lb` proxies
/// `GET /v1/models`. With `--health-path` elsewhere, the lists come from a GET of their
/// own at each sweep.
#[test]
fn a_backend_without_a_list_serves_every_model() {
    let mock = Mock::spawn(&["--model", "llama", "--health-endpoint", "/healthz"]);
    // Answers 404 to /v1/models, 200 to everything else (its probes included).
    let bare = FakeBackend::spawn(|req| {
        if req.starts_with(b"GET /v1/models ") {
            FakeReply::json(404, &[], r#"{"error":"no"}"#)
        } else {
            FakeReply::json(200, &[], r#"{"ok":true,"backend_port":1}"#)
        }
    });
    let lb = Lb::spawn(&[
        "--backends",
        &mock.url(),
        &bare.url(),
        "--health-path",
        "/healthz",
        "--strict-models",
    ]);
    lb.wait_healthy(2);
    // The mock's list arrives by the sweep's own GET /v1/models.
    wait_until(
        DEADLINE,
        "lb to read the mock's model list",
        || mock.stats()["model_lists"].as_u64().unwrap_or(0),
        |n| *n > 0,
    );
    // Not every healthy backend listed: /v1/models is proxied (to whichever backend).
    let seen: HashSet<Option<u16>> = (0..6)
        .map(|_| {
            let r = lb.get("/v1/models");
            match r.backend_port() {
                Some(p) => Some(p),
                None => {
                    assert_eq!(r.status, 404, "the bare backend's own answer: {}", r.text());
                    None
                }
            }
        })
        .collect();
    assert!(seen.contains(&Some(mock.port)), "{seen:?}");
    // qwen: only the bare backend (it serves every model), and strict does not refuse it.
    for _ in 0..4 {
        let r = chat(&lb, "qwen");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.backend_port(), Some(1), "the bare backend: {}", r.text());
    }
    assert_eq!(mock.requests(), 0);
}

/// Existing clients that name models the backends do not list keep working, whatever the
/// policy that reads the body.
#[test]
fn unlisted_models_keep_working_under_content_policies() {
    let mocks: Vec<Mock> = (0..2).map(|_| Mock::spawn::<&str>(&[])).collect();
    for policy in ["cache-aware", "prefix-hash", "consistent-hash"] {
        let mut args = vec!["--backends".to_string()];
        args.extend(mocks.iter().map(Mock::url));
        args.extend(["--routing", policy, "--max-conns", "4"].map(String::from));
        let lb = Lb::spawn(&args);
        lb.wait_healthy(2);
        wait_merged(&lb, &["mock-model"]);
        for model in ["llama", "m", "mock-model"] {
            let r = chat(&lb, model);
            assert_eq!(r.status, 200, "{policy} {model}: {}", r.text());
        }
    }
}
