//! `--routing prefix-hash`, end to end: three `lb` replicas with the same flags in front
//! of the same three mocks send each prompt to the same backend, with no shared state;
//! a conversation's turns (its opening, or its first `--prefix-units` units, unchanged)
//! stay on one backend; and a prefix that is hot walks on to the next backend in its
//! order.
//!
//! Requests go one at a time and each replica is idle (no request in flight) before the
//! next, so every replica sees the same loads (zero) and the same healthy set.

use std::collections::HashSet;
use std::time::Duration;

use lb_tests::*;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(10);

fn replicas(mocks: &[Mock], extra: &[&str]) -> Vec<Lb> {
    (0..3)
        .map(|_| {
            let mut args = vec!["--backends".to_string()];
            args.extend(mocks.iter().map(Mock::url));
            args.extend(["--routing", "prefix-hash"].map(String::from));
            args.extend(extra.iter().map(|s| s.to_string()));
            let lb = Lb::spawn(&args);
            lb.wait_healthy(mocks.len() as u64);
            lb.wait_probed(mocks.len());
            lb
        })
        .collect()
}

/// The backend port that served `body` through `lb`, once `lb` is idle again.
fn served(lb: &Lb, path: &str, body: &Value) -> u16 {
    let r = lb.post_json(path, body);
    assert_eq!(r.status, 200, "{}", r.text());
    lb.wait_active(0, DEADLINE);
    r.backend_port().expect("a backend answered")
}

fn chat(system: &str, turns: usize) -> Value {
    let mut messages = vec![json!({"role": "system", "content": system})];
    for t in 0..turns {
        messages.push(json!({"role": "user", "content": format!("question {t}")}));
        if t + 1 < turns {
            messages.push(json!({"role": "assistant", "content": format!("answer {t}")}));
        }
    }
    json!({"model": "mock-model", "messages": messages})
}

#[test]
fn replicas_agree_on_every_prompt() {
    let mocks: Vec<Mock> = (0..3).map(|_| Mock::spawn::<&str>(&[])).collect();
    let lbs = replicas(&mocks, &[]);
    let mut used = HashSet::new();
    for i in 0..20 {
        let body = json!({"model": "mock-model", "prompt": format!("document {i}: {}", "lorem ipsum ".repeat(50))});
        let picks: Vec<u16> = lbs
            .iter()
            .map(|lb| served(lb, "/v1/completions", &body))
            .collect();
        assert!(
            picks.iter().all(|&p| p == picks[0]),
            "prompt {i}: replicas disagree: {picks:?}"
        );
        used.insert(picks[0]);
    }
    // 20 prompts over 3 backends: all on one would be a broken hash (odds 3^-19).
    assert!(used.len() > 1, "{used:?}");
}

#[test]
fn a_conversation_stays_on_one_backend_through_any_replica() {
    let mocks: Vec<Mock> = (0..3).map(|_| Mock::spawn::<&str>(&[])).collect();
    let lbs = replicas(&mocks, &["--prefix-units", "4"]);
    // A 5 KiB system prompt: its first 4 blocks are the key of every turn.
    for s in 0..4 {
        let system = format!("system prompt {s} ").repeat(300);
        let mut ports = HashSet::new();
        for turn in 1..=6 {
            let lb = &lbs[turn % lbs.len()];
            ports.insert(served(lb, "/v1/chat/completions", &chat(&system, turn)));
        }
        assert_eq!(ports.len(), 1, "system prompt {s}: turns went to {ports:?}");
    }
    // The user field does not override the prompt.
    let system = "shared ".repeat(1000);
    let a = served(&lbs[0], "/v1/chat/completions", &chat(&system, 1));
    let mut with_user = chat(&system, 2);
    with_user["user"] = json!("alice");
    assert_eq!(served(&lbs[1], "/v1/chat/completions", &with_user), a);
}

/// The default key is a chat's opening: with a short shared system prompt and short
/// messages, every turn of a conversation (whose chain grows by two units a turn) goes
/// to one backend through any replica, and conversations spread.
#[test]
fn a_chat_is_keyed_by_its_opening() {
    let mocks: Vec<Mock> = (0..3).map(|_| Mock::spawn::<&str>(&[])).collect();
    let lbs = replicas(&mocks, &[]);
    let mut homes = HashSet::new();
    for c in 0..12 {
        let mut ports = HashSet::new();
        for turns in 1..=5 {
            let mut body = chat("You are brief.", turns);
            body["messages"][1]["content"] = json!(format!("conversation {c}: hello"));
            ports.insert(served(
                &lbs[(c + turns) % lbs.len()],
                "/v1/chat/completions",
                &body,
            ));
        }
        assert_eq!(ports.len(), 1, "conversation {c}: turns went to {ports:?}");
        homes.extend(ports);
    }
    // 12 conversations over 3 backends, all on one: a key past the opening's system
    // prompt only (odds 3^-11 otherwise).
    assert!(homes.len() > 1, "{homes:?}");
}

/// A hot prefix: while its backend has a request in flight (a slow stream), the next
/// request with the prefix walks on, and every replica agrees on where to when loads are
/// the same.
#[test]
fn a_loaded_backend_is_walked_past() {
    let mocks: Vec<Mock> = (0..3)
        .map(|_| Mock::spawn(&["--tokens", "40", "--token-interval", "50ms"]))
        .collect();
    let lbs = replicas(&mocks, &[]);
    let body = json!({"model": "mock-model", "prompt": "hot ".repeat(400)});
    let home = served(&lbs[0], "/v1/completions", &body);
    // A 2 s stream keeps `home` busy on replica 0 only.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let port = lbs[0].port;
    let slow = std::thread::spawn(move || {
        request(
            port,
            "POST",
            "/v1/completions",
            &[("Content-Type", "application/json")],
            Some(stream.to_string().as_bytes()),
        )
    });
    wait_until(
        DEADLINE,
        "the stream in flight",
        || lbs[0].health().1["active_conns"].as_u64(),
        |n| *n == Some(1),
    );
    let r = lbs[0].post_json("/v1/completions", &body);
    assert_eq!(r.status, 200);
    let walked = r.backend_port().unwrap();
    assert_ne!(walked, home, "the loaded backend is walked past");
    // The other replicas see no load: the prefix's own backend.
    assert_eq!(served(&lbs[1], "/v1/completions", &body), home);
    assert_eq!(served(&lbs[2], "/v1/completions", &body), home);
    let done = slow.join().unwrap().expect("the stream");
    assert_eq!(done.status, 200);
    lbs[0].wait_active(0, DEADLINE);
    assert_eq!(served(&lbs[0], "/v1/completions", &body), home);
}
