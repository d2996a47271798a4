//! LLM-aware routing, end to end: cache-aware routing (`--routing cache-aware`,
//! prefix chains over chat messages and prompt blocks, the OpenAI `user`
//! field, overflow, `--affinity-ttl`, the `Affinity:` status line),
//! consistent hashing (`--routing consistent-hash --hash-key ..`), the hard
//! `--max-conns` limit with its optional queue (`--queue-timeout`,
//! `--queue-size`), and the JSON request log (`--log-to`).
//!
//! Everything runs real `mock-backend` processes behind the real `lb`; the
//! mocks' simulated prefix cache (`/prefixstats`) measures what cache-aware
//! routing buys. Conditions are polled with deadlines; where routing has a
//! random part (least-connections ties), assertions are built so that a
//! correct `lb` passes whatever the draws, and a wrong one fails but for odds
//! of a few in a million or less.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `n` mocks started with `args`.
fn spawn_mocks(n: usize, args: &[&str]) -> Vec<Mock> {
    (0..n).map(|_| Mock::spawn(args)).collect()
}

/// `--backends <every mock>` followed by `extra`.
fn lb_args(mocks: &[Mock], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--backends".to_string()];
    args.extend(mocks.iter().map(Mock::url));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Start `lb` in front of `mocks` and wait until it sees them all healthy.
fn spawn_lb(mocks: &[Mock], extra: &[&str]) -> Lb {
    let lb = Lb::spawn(&lb_args(mocks, extra));
    lb.wait_healthy(mocks.len() as u64);
    lb
}

/// The port of the mock that served `r`, which must be a 200.
fn served_by(r: &Resp, what: &str) -> u16 {
    assert_eq!(
        r.status,
        200,
        "{what}: status {}; body: {}",
        r.status,
        r.text()
    );
    r.backend_port()
        .unwrap_or_else(|| panic!("{what}: no backend_port in {}", r.text()))
}

/// `POST /v1/completions` with `prompt` (and `user`, if given).
fn completion(port: u16, prompt: &str, user: Option<&str>) -> Resp {
    let mut body = json!({"model": "m", "prompt": prompt, "max_tokens": 4});
    if let Some(u) = user {
        body["user"] = json!(u);
    }
    post_json(port, "/v1/completions", &body)
}

/// `POST /v1/completions` with a prompt and extra request headers.
fn completion_with_headers(port: u16, prompt: &str, headers: &[(&str, &str)]) -> Resp {
    let body = serde_json::to_vec(&json!({"model": "m", "prompt": prompt, "max_tokens": 4}))
        .expect("serialise");
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    request(port, "POST", "/v1/completions", &h, Some(&body))
        .unwrap_or_else(|e| panic!("POST /v1/completions through lb: {e}"))
}

/// Deterministic filler text of about `chars` characters, different for
/// different `(a, b)`.
fn filler(a: usize, b: usize, chars: usize) -> String {
    const WORDS: [&str; 16] = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    ];
    let mut s = String::new();
    let mut x = (a as u64) << 32 | b as u64;
    while s.len() < chars {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        s.push_str(WORDS[(x >> 33) as usize % WORDS.len()]);
        s.push(' ');
    }
    s.truncate(chars);
    s
}

/// A chat conversation: the whole history is sent every turn, as OpenAI
/// clients do.
#[derive(Clone, Debug)]
struct Convo {
    messages: Vec<Value>,
}

impl Convo {
    fn new(system: &str, first_user: &str) -> Convo {
        Convo {
            messages: vec![
                json!({"role": "system", "content": system}),
                json!({"role": "user", "content": first_user}),
            ],
        }
    }

    fn body(&self) -> Value {
        json!({"model": "m", "messages": self.messages, "max_tokens": 16})
    }

    /// Send the conversation so far.
    fn send(&self, port: u16) -> Resp {
        post_json(port, "/v1/chat/completions", &self.body())
    }

    /// Append the assistant's answer in `r` and the next user turn.
    fn advance(&mut self, r: &Resp, next_user: &str) {
        let v = r.json();
        let answer = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("no choices[0].message.content in {v}"))
            .to_string();
        self.messages
            .push(json!({"role": "assistant", "content": answer}));
        self.messages
            .push(json!({"role": "user", "content": next_user}));
    }

    /// Send, check the 200, append the answer and `next_user`; returns the
    /// port that served it.
    fn turn(&mut self, port: u16, next_user: &str, what: &str) -> u16 {
        let r = self.send(port);
        let p = served_by(&r, what);
        self.advance(&r, next_user);
        p
    }
}

/// The backends `ports` landed on, with counts.
fn histogram(ports: &[u16]) -> HashMap<u16, usize> {
    let mut h = HashMap::new();
    for p in ports {
        *h.entry(*p).or_insert(0) += 1;
    }
    h
}

/// Cache-aware counters summed over `Affinity:` status lines (counts, not
/// percentages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Affinity {
    reqs: u64,
    warm: u64,
    cold: u64,
    ovfl: u64,
    /// `K keys` of the last line.
    last_keys: u64,
    lines: usize,
}

/// Parse `... Affinity: warm X% cold Y% ovfl Z% (N reqs, K keys) ...` into
/// (X, Y, Z, N, K).
fn parse_affinity(line: &str) -> Option<(u64, u64, u64, u64, u64)> {
    let rest = &line[line.find("Affinity:")? + "Affinity:".len()..];
    let cleaned: String = rest
        .chars()
        .map(|c| if "%(),".contains(c) { ' ' } else { c })
        .collect();
    let t: Vec<&str> = cleaned.split_whitespace().collect();
    if t.len() < 10
        || t[0] != "warm"
        || t[2] != "cold"
        || t[4] != "ovfl"
        || t[7] != "reqs"
        || t[9] != "keys"
    {
        return None;
    }
    let n = |i: usize| t[i].parse::<u64>().ok();
    Some((n(1)?, n(3)?, n(5)?, n(6)?, n(8)?))
}

/// Every `Affinity:` line `lb` printed so far (stderr and stdout), summed.
/// Panics on a line that mentions `Affinity:` but does not parse, or whose
/// percentages do not add up.
fn affinity_totals(lb: &Lb) -> Affinity {
    let mut lines = lb.log.matching(|l| l.contains("Affinity:"));
    lines.extend(lb.stdout.matching(|l| l.contains("Affinity:")));
    let mut a = Affinity::default();
    for l in &lines {
        let (w, c, o, n, k) =
            parse_affinity(l).unwrap_or_else(|| panic!("unparsable Affinity status line: {l:?}"));
        if n > 0 {
            let sum = w + c + o;
            assert!(
                (98..=102).contains(&sum),
                "warm + cold + ovfl should be 100% (rounded): {l:?}"
            );
        }
        // Percentages are rounded to whole numbers: for the small counts of
        // these tests, round(pct * n / 100) recovers the exact count.
        let count = |pct: u64| (pct * n + 50) / 100;
        a.reqs += n;
        a.warm += count(w);
        a.cold += count(c);
        a.ovfl += count(o);
        a.last_keys = k;
        a.lines += 1;
    }
    a
}

/// Wait until the `Affinity:` lines account for `reqs` requests; returns the
/// totals (which must then account for exactly `reqs`).
fn wait_affinity(lb: &Lb, reqs: u64) -> Affinity {
    let a = wait_until(
        Duration::from_secs(10),
        &format!("[STATUS] Affinity lines accounting for {reqs} requests"),
        || affinity_totals(lb),
        |a| a.reqs >= reqs,
    );
    assert_eq!(
        a.reqs, reqs,
        "Affinity lines count more requests than sent: {a:?}"
    );
    a
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("lb-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Non-empty lines of a file (empty when it does not exist yet).
fn file_lines(p: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------
// Cache-aware routing
// ---------------------------------------------------------------------------

const CACHE_AWARE: [&str; 4] = ["--routing", "cache-aware", "--max-conns", "8"];

#[test]
fn growing_conversation_stays_on_one_backend() {
    let mocks = spawn_mocks(3, &[]);
    let lb = spawn_lb(&mocks, &CACHE_AWARE);
    let mut c = Convo::new(
        "You are a terse assistant for the growing-conversation test.",
        "Hello, what is a load balancer?",
    );
    let mut ports = Vec::new();
    for t in 1..=6 {
        let next = format!("Follow-up question number {t}: tell me more.");
        ports.push(c.turn(lb.port, &next, &format!("turn {t}")));
    }
    let first = ports[0];
    assert!(
        ports.iter().all(|p| *p == first),
        "every turn of one conversation should go to the backend of the first: {ports:?}"
    );
    for m in &mocks {
        let expect = if m.port == first { 6 } else { 0 };
        assert_eq!(m.requests(), expect, "requests seen by mock {}", m.port);
    }
    // The served mock's prefix cache saw each turn extend the previous one.
    let ps = get(first, "/prefixstats").json();
    assert!(
        ps["ratio"].as_f64().unwrap_or(0.0) > 0.5,
        "the pinned backend should reuse most of each turn: {ps}"
    );
}

#[test]
fn new_conversation_sharing_the_first_turn_joins_the_warm_backend() {
    let mocks = spawn_mocks(3, &[]);
    let lb = spawn_lb(&mocks, &CACHE_AWARE);
    let system = "You are the support bot of ACME Corp. Answer briefly and politely.";
    let first_user = "My order has not arrived yet, what can I do?";
    let mut a = Convo::new(system, first_user);
    let warm = a.turn(lb.port, "It was order 1234.", "conversation A turn 1");
    for t in 2..=3 {
        let p = a.turn(
            lb.port,
            &format!("Anything else for turn {t}?"),
            &format!("conversation A turn {t}"),
        );
        assert_eq!(p, warm, "conversation A turn {t} left its backend");
    }
    // New conversations: the same system prompt and first user turn, then a
    // second turn of their own. Both requests of each join A's backend.
    let mut ports = Vec::new();
    for i in 0..4 {
        let mut c = Convo::new(system, first_user);
        ports.push(c.turn(
            lb.port,
            &format!(
                "Different follow-up of new conversation {i}: order {}.",
                9000 + i
            ),
            &format!("new conversation {i} turn 1"),
        ));
        ports.push(c.turn(lb.port, "thanks", &format!("new conversation {i} turn 2")));
    }
    assert!(
        ports.iter().all(|p| *p == warm),
        "conversations sharing the first turn should join the warm backend {warm}: {ports:?}"
    );
}

#[test]
fn same_prompt_always_hits_one_backend_and_distinct_prompts_spread() {
    let mocks = spawn_mocks(3, &[]);
    let lb = spawn_lb(&mocks, &CACHE_AWARE);
    // About 3 KiB: three prompt blocks.
    let prompt = format!("Summarise this document. {}", filler(1, 1, 3000));
    let ports: Vec<u16> = (0..10)
        .map(|i| served_by(&completion(lb.port, &prompt, None), &format!("request {i}")))
        .collect();
    assert!(
        ports.iter().all(|p| *p == ports[0]),
        "the same prompt should always hit one backend: {:?}",
        histogram(&ports)
    );
    // Unknown prompts go by least connections (ties at random): twelve
    // unrelated prompts, sent one at a time, do not all land on one backend
    // (odds 3^-11 for a correct lb).
    let spread: Vec<u16> = (0..12)
        .map(|i| {
            let p = format!("{i} unrelated prompt {}", filler(100 + i, 2, 1500));
            served_by(
                &completion(lb.port, &p, None),
                &format!("distinct prompt {i}"),
            )
        })
        .collect();
    let distinct: HashSet<u16> = spread.iter().copied().collect();
    assert!(
        distinct.len() > 1,
        "unrelated prompts should spread (least connections, random ties): {:?}",
        histogram(&spread)
    );
}

#[test]
fn user_field_keys_cache_aware_routing() {
    let mocks = spawn_mocks(3, &[]);
    let lb = spawn_lb(&mocks, &CACHE_AWARE);
    // Five unrelated prompts of one user: one backend (odds 3^-4 by chance).
    let ports: Vec<u16> = (0..5)
        .map(|i| {
            let p = format!(
                "{i}: a prompt unrelated to the others, {}",
                filler(i, 9, 200)
            );
            served_by(&completion(lb.port, &p, Some("user-42")), "user-42")
        })
        .collect();
    assert!(
        ports.iter().all(|p| *p == ports[0]),
        "all requests with user \"user-42\" should share one backend: {:?}",
        histogram(&ports)
    );
    // The chat form too: a conversation with the same user field follows it.
    let c = Convo::new("unrelated system prompt", "unrelated question");
    let mut body = c.body();
    body["user"] = json!("user-42");
    let r = post_json(lb.port, "/v1/chat/completions", &body);
    assert_eq!(served_by(&r, "chat with user-42"), ports[0]);
}

#[test]
fn hot_prefix_overflows_to_the_idle_backend() {
    // 2 s per request; --max-conns 2: a backend one request ahead of the
    // least loaded is ahead by 50% of its cap (> 20%), so a warm request
    // overflows.
    let mocks = spawn_mocks(2, &["--delay", "2s"]);
    let lb = spawn_lb(
        &mocks,
        &[
            "--routing",
            "cache-aware",
            "--max-conns",
            "2",
            "--health-path",
            "/stats",
            "--status-interval",
            "1s",
        ],
    );
    let system = "You are the overflow test assistant.";
    let first_user = "First question.";
    let mut c = Convo::new(system, first_user);
    let pinned = c.turn(lb.port, "Second question, variant X.", "turn 1");
    let other = mocks
        .iter()
        .map(|m| m.port)
        .find(|p| *p != pinned)
        .expect("two mocks");
    let pinned_mock = mocks.iter().find(|m| m.port == pinned).unwrap();
    // Turn 1's slot is released before X is sent, so X sees both idle.
    lb.wait_active(0, DEADLINE);

    // X: warm, goes to the pinned backend, stays in flight there for 2 s.
    let x_body = c.body();
    let port = lb.port;
    let x = thread::spawn(move || post_json(port, "/v1/chat/completions", &x_body));
    wait_until(
        DEADLINE,
        "request X in flight on the pinned backend",
        || pinned_mock.in_flight(),
        |n| *n == 1,
    );
    // Y: same prefix up to X's last user turn; the pinned backend is now one
    // request ahead, so Y overflows to the other one.
    let mut y = c.clone();
    y.messages.pop();
    y.messages
        .push(json!({"role": "user", "content": "Second question, variant Y."}));
    let ry = y.send(lb.port);
    let rx = x.join().expect("request X thread");
    assert_eq!(served_by(&rx, "X (warm)"), pinned, "X should stay warm");
    assert_eq!(
        served_by(&ry, "Y (overflow)"),
        other,
        "Y shares X's prefix but its backend was ahead by 1 of --max-conns 2: it should overflow"
    );

    // The status lines: turn 1 cold, X warm, Y overflow.
    let a = wait_affinity(&lb, 3);
    assert_eq!(
        (a.warm, a.cold, a.ovfl),
        (1, 1, 1),
        "Affinity counters (warm, cold, ovfl) summed over the status lines: {a:?}"
    );
    assert!(
        a.last_keys > 0,
        "the affinity table should hold keys: {a:?}"
    );
}

#[test]
fn prefix_is_repointed_to_the_backend_that_served_it_last() {
    // Every request re-points its whole chain to the backend that served it:
    // after an overflow moved a conversation's prefix to the other backend,
    // that prefix goes there (while it is within the load guard), not back to
    // the backend that held it first.
    //
    // --max-conns 10: a backend may be up to 2 requests ahead of the least
    // loaded (20% of 10) before a warm request overflows.
    let mocks = spawn_mocks(2, &["--delay", "2s"]);
    let lb = spawn_lb(
        &mocks,
        &[
            "--routing",
            "cache-aware",
            "--max-conns",
            "10",
            "--health-path",
            "/stats",
        ],
    );
    let in_flight = |port: u16| {
        mocks
            .iter()
            .find(|m| m.port == port)
            .expect("a mock")
            .in_flight()
    };
    let system = "You are the re-point test assistant.";
    let first_user = "First question.";
    let mut c = Convo::new(system, first_user);
    let first = c.turn(lb.port, "placeholder", "turn 1");
    let other = mocks
        .iter()
        .map(|m| m.port)
        .find(|p| *p != first)
        .expect("two mocks");
    lb.wait_active(0, DEADLINE);

    // Four second turns sharing the first, started one after the other: the
    // first three are warm on `first` (ahead by 0, 1, 2 of 10); the fourth
    // finds `first` ahead by 3 (30% > 20%) and overflows to `other`.
    let bodies: Vec<Value> = (0..4)
        .map(|i| {
            let mut b = c.clone();
            b.messages.pop();
            b.messages
                .push(json!({"role": "user", "content": format!("Second question, variant {i}.")}));
            b.body()
        })
        .collect();
    let mut handles = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let body = body.clone();
        let port = lb.port;
        handles.push(thread::spawn(move || {
            post_json(port, "/v1/chat/completions", &body)
        }));
        wait_until(
            DEADLINE,
            &format!("second turn {i} in flight at a backend"),
            || in_flight(first) + in_flight(other),
            |n| *n == i as u64 + 1,
        );
    }
    let ports: Vec<u16> = handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| served_by(&h.join().expect("thread"), &format!("second turn {i}")))
        .collect();
    assert_eq!(
        ports,
        vec![first, first, first, other],
        "three warm on the first backend, the fourth overflows (ports: first {first}, other {other})"
    );
    lb.wait_active(0, DEADLINE);

    // Keep `other` one request busy with the overflowed conversation (its
    // deepest unit is known only there)...
    let port = lb.port;
    let last = bodies[3].clone();
    let busy = thread::spawn(move || post_json(port, "/v1/chat/completions", &last));
    wait_until(
        DEADLINE,
        "the overflowed conversation in flight again",
        || (in_flight(first), in_flight(other)),
        |n| n.0 + n.1 == 1,
    );
    // ...then send the shared first turn. Its chain was last re-pointed at
    // `other` (by the overflowed request), which is only 1 ahead (10% of
    // --max-conns 10): it goes to `other`, not to the idle first backend.
    let again = Convo::new(system, first_user).send(lb.port);
    let busy = busy.join().expect("thread");
    assert_eq!(served_by(&busy, "overflowed conversation again"), other);
    assert_eq!(
        served_by(&again, "the first turn again"),
        other,
        "the shared prefix should follow the backend that served it last ({other}, 1 request \
         in flight), not go back to the earlier holder {first} (idle)"
    );
}

#[test]
fn pinned_backend_dies_next_request_fails_over_to_a_healthy_one() {
    let mut mocks = spawn_mocks(3, &[]);
    let lb = spawn_lb(
        &mocks,
        &[
            "--routing",
            "cache-aware",
            "--max-conns",
            "8",
            "--health-check-interval",
            "60s",
        ],
    );
    let mut c = Convo::new("You are the failover assistant.", "Question one.");
    let pinned = c.turn(lb.port, "Question two.", "turn 1");
    assert_eq!(c.turn(lb.port, "Question three.", "turn 2"), pinned);

    mocks
        .iter_mut()
        .find(|m| m.port == pinned)
        .expect("pinned mock")
        .kill();

    // Turn 3 still goes to the pinned backend (no probe has run); it cannot be reached,
    // so the request fails over to a healthy backend (--connect-retries) and the client
    // sees no error; passive health ejects the dead one.
    let moved = c.turn(lb.port, "Question four.", "turn 3, failed over");
    assert_ne!(moved, pinned, "the request stayed on the dead backend");
    lb.log
        .wait_for(DEADLINE, |l| is_unhealthy_line(l, pinned))
        .unwrap_or_else(|| panic!("no [HEALTH] line ejecting {pinned}"));
    assert!(lb
        .log
        .wait_for(DEADLINE, |l| l.contains("[RETRY]")
            && l.contains(&format!(":{pinned}")))
        .is_some());
    lb.wait_healthy(2);

    // The conversation stays on its new backend.
    assert_eq!(
        c.turn(lb.port, "Question five.", "turn 4"),
        moved,
        "after the failover the conversation should stay on its new backend"
    );
}

#[test]
fn affinity_ttl_expires_and_routing_still_works() {
    let mocks = spawn_mocks(3, &[]);
    let lb = spawn_lb(
        &mocks,
        &[
            "--routing",
            "cache-aware",
            "--max-conns",
            "8",
            "--affinity-ttl",
            "2s",
            "--status-interval",
            "1s",
        ],
    );
    let ports: HashSet<u16> = mocks.iter().map(|m| m.port).collect();
    let mut c = Convo::new("You are the TTL assistant.", "Question one.");
    let pinned = c.turn(lb.port, "Question two.", "turn 1");
    assert_eq!(c.turn(lb.port, "Question three.", "turn 2"), pinned);

    thread::sleep(Duration::from_secs(3));

    // The entry expired: the request is cold but served by a healthy backend,
    // and the conversation is pinned again to whichever served it.
    let after = c.turn(lb.port, "Question four.", "turn 3 (after the TTL)");
    assert!(ports.contains(&after), "served by an unknown port {after}");
    assert_eq!(
        c.turn(lb.port, "Question five.", "turn 4"),
        after,
        "after expiry the conversation should be pinned again"
    );
    let (status, h) = lb.health();
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["healthy_backends"], 3, "{h}");

    // turn 1 cold, turn 2 warm, turn 3 cold (expired), turn 4 warm.
    let a = wait_affinity(&lb, 4);
    assert_eq!(
        (a.warm, a.cold, a.ovfl),
        (2, 2, 0),
        "with --affinity-ttl 2s the turn sent 3 s later should be cold: {a:?}"
    );
}

/// Run 12 conversations × 5 turns, interleaved and sequential, through a
/// fresh `lb` (with `routing`) in front of 3 fresh mocks; returns the mocks'
/// prefix reuse `(sum matched_chars / sum total_chars, per-mock requests)`.
fn prefix_reuse(routing: &[&str]) -> (f64, Vec<u64>) {
    const CONVERSATIONS: usize = 12;
    const TURNS: usize = 5;
    let mocks = spawn_mocks(3, &[]);
    let lb = spawn_lb(&mocks, routing);
    for m in &mocks {
        let r = request(m.port, "POST", "/prefixstats/reset", &[], None).expect("reset");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let mut convos: Vec<Convo> = (0..CONVERSATIONS)
        .map(|c| {
            Convo::new(
                &format!(
                    "System prompt {c}: you are assistant {c}. {}",
                    filler(c, 0, 250)
                ),
                &format!("Conversation {c}, question 1: {}", filler(c, 1, 200)),
            )
        })
        .collect();
    for t in 1..=TURNS {
        for (c, convo) in convos.iter_mut().enumerate() {
            let next = format!(
                "Conversation {c}, question {}: {}",
                t + 1,
                filler(c, t + 1, 200)
            );
            convo.turn(lb.port, &next, &format!("conversation {c} turn {t}"));
        }
    }
    let (mut matched, mut total) = (0u64, 0u64);
    let mut requests = Vec::new();
    for m in &mocks {
        let ps = get(m.port, "/prefixstats").json();
        matched += ps["matched_chars"].as_u64().expect("matched_chars");
        total += ps["total_chars"].as_u64().expect("total_chars");
        requests.push(ps["requests"].as_u64().expect("requests"));
    }
    assert_eq!(
        requests.iter().sum::<u64>(),
        (CONVERSATIONS * TURNS) as u64,
        "every request should reach exactly one mock: {requests:?}"
    );
    assert!(total > 0);
    (matched as f64 / total as f64, requests)
}

#[test]
fn cache_aware_beats_least_conn_on_prefix_reuse() {
    let (aware, aware_split) = prefix_reuse(&CACHE_AWARE);
    let (lc, lc_split) = prefix_reuse(&["--routing", "least-conn"]);
    eprintln!(
        "prefix reuse: cache-aware {aware:.3} (requests per mock {aware_split:?}), \
         least-conn {lc:.3} ({lc_split:?})"
    );
    assert!(
        aware > 0.4,
        "cache-aware routing should reuse over 40% of prompt chars, got {aware:.3}"
    );
    assert!(
        aware >= lc + 0.1,
        "cache-aware ({aware:.3}) should beat least-conn ({lc:.3}) by at least 0.1"
    );
}

#[test]
fn cache_aware_without_max_conns_is_refused() {
    let backend = format!("http://127.0.0.1:{}", dead_port());
    let port = free_port().to_string();
    for extra in [&[][..], &["--max-conns", "0"][..]] {
        let mut args = vec![
            "--backends",
            backend.as_str(),
            "--port",
            port.as_str(),
            "--bind",
            "127.0.0.1",
            "--routing",
            "cache-aware",
        ];
        args.extend_from_slice(extra);
        let out = run_lb(&args, Duration::from_secs(10));
        assert!(
            !out.status.success(),
            "lb {args:?} exited with {} but should refuse cache-aware without --max-conns; stderr: {:?}",
            out.status,
            out.stderr
        );
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "lb {args:?}: expected a one-line error, got {:?}",
            out.stderr
        );
        assert!(
            lines[0].contains("max-conns"),
            "lb {args:?}: the error should name --max-conns: {:?}",
            lines[0]
        );
    }
    // With a cap it starts and serves.
    let m = Mock::spawn::<&str>(&[]);
    let lb = spawn_lb(std::slice::from_ref(&m), &CACHE_AWARE);
    served_by(&lb.completion(), "cache-aware with --max-conns 8");
}

// ---------------------------------------------------------------------------
// Consistent hashing
// ---------------------------------------------------------------------------

#[test]
fn consistent_hash_on_a_header_keeps_each_session_on_one_backend() {
    let mocks = spawn_mocks(3, &[]);
    let lb = spawn_lb(
        &mocks,
        &[
            "--routing",
            "consistent-hash",
            "--hash-key",
            "header:x-session",
        ],
    );
    let mut first_ports = Vec::new();
    for s in 0..20 {
        let session = format!("session-{s}");
        let ports: Vec<u16> = (0..3)
            .map(|i| {
                // Different prompts: only the header decides.
                let r = completion_with_headers(
                    lb.port,
                    &format!("prompt {i} of {session}"),
                    &[("x-session", session.as_str())],
                );
                served_by(&r, &session)
            })
            .collect();
        assert!(
            ports.iter().all(|p| *p == ports[0]),
            "x-session: {session} should always land on one backend: {ports:?}"
        );
        first_ports.push(ports[0]);
    }
    let distinct: HashSet<u16> = first_ports.iter().copied().collect();
    assert!(
        distinct.len() > 1,
        "20 session values should spread over more than one backend: {:?}",
        histogram(&first_ports)
    );
}

#[test]
fn consistent_hash_default_key_is_the_user_then_the_client_ip() {
    let mocks = spawn_mocks(3, &[]);
    let lb = spawn_lb(&mocks, &["--routing", "consistent-hash"]);
    let mut first_ports = Vec::new();
    for u in 0..20 {
        let user = format!("user-{u}");
        let ports: Vec<u16> = (0..3)
            .map(|i| {
                served_by(
                    &completion(lb.port, &format!("prompt {i}"), Some(user.as_str())),
                    &user,
                )
            })
            .collect();
        assert!(
            ports.iter().all(|p| *p == ports[0]),
            "user {user} should always land on one backend: {ports:?}"
        );
        first_ports.push(ports[0]);
    }
    let distinct: HashSet<u16> = first_ports.iter().copied().collect();
    assert!(
        distinct.len() > 1,
        "20 users should spread over more than one backend: {:?}",
        histogram(&first_ports)
    );
    // No user field: the client address (always 127.0.0.1 here) is the key.
    let ports: Vec<u16> = (0..10)
        .map(|i| served_by(&completion(lb.port, &format!("anon {i}"), None), "no user"))
        .collect();
    assert!(
        ports.iter().all(|p| *p == ports[0]),
        "without a user field one client should stay on one backend: {:?}",
        histogram(&ports)
    );
}

// ---------------------------------------------------------------------------
// --max-conns as a hard limit, and the queue
// ---------------------------------------------------------------------------

/// `n` concurrent completions with distinct prompts; (response, time taken).
fn concurrent_distinct(port: u16, n: usize) -> Vec<(Resp, Duration)> {
    run_concurrently(n, move |i| {
        let t = Instant::now();
        let r = completion(port, &format!("distinct prompt number {i}"), None);
        (r, t.elapsed())
    })
}

fn assert_rate_limited(r: &Resp) {
    let e = assert_error_json(r, 429);
    assert_eq!(e["type"], "rate_limit_error", "{e}");
    assert_eq!(
        r.header("retry-after"),
        Some("1"),
        "headers: {:?}",
        r.headers
    );
}

#[test]
fn max_conns_full_fleet_refuses_the_fifth_at_once() {
    let mocks = spawn_mocks(2, &["--delay", "3s"]);
    let lb = spawn_lb(&mocks, &["--max-conns", "2", "--health-path", "/stats"]);
    let res = concurrent_distinct(lb.port, 5);
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for (r, took) in &res {
        match r.status {
            200 => ok.push(served_by(r, "admitted request")),
            429 => {
                assert_rate_limited(r);
                refused.push(*took);
            }
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    assert_eq!(
        (ok.len(), refused.len()),
        (4, 1),
        "four fit (2 per backend), the fifth is refused; 200s on {ok:?}"
    );
    let h = histogram(&ok);
    for m in &mocks {
        assert_eq!(h.get(&m.port), Some(&2), "two per backend: {h:?}");
    }
    assert!(
        refused[0] < Duration::from_millis(2000),
        "the 429 should come at once, took {:?}",
        refused[0]
    );
    let h = lb.wait_healthy(2);
    assert_eq!(h["healthy_backends"], 2, "429s must not eject: {h}");
}

#[test]
fn queue_timeout_lets_the_fifth_wait_for_a_slot() {
    let mocks = spawn_mocks(2, &["--delay", "3s"]);
    let lb = spawn_lb(
        &mocks,
        &[
            "--max-conns",
            "2",
            "--queue-timeout",
            "10s",
            "--health-path",
            "/stats",
        ],
    );
    let mut res = concurrent_distinct(lb.port, 5);
    for (r, _) in &res {
        served_by(r, "queued or admitted request");
    }
    res.sort_by_key(|(_, took)| *took);
    let times: Vec<Duration> = res.iter().map(|(_, t)| *t).collect();
    // Four start at once and take 3 s; the fifth waits ~3 s for a slot, then
    // takes its own 3 s.
    assert!(
        times[3] < Duration::from_millis(5000),
        "the first four should not wait: {times:?}"
    );
    assert!(
        times[4] >= Duration::from_millis(5000) && times[4] < Duration::from_secs(12),
        "the fifth should wait for a slot (~3 s) and then take 3 s: {times:?}"
    );
    let served: u64 = mocks.iter().map(Mock::requests).sum();
    assert_eq!(served, 5);
}

#[test]
fn queue_timeout_expires_with_429() {
    let mocks = spawn_mocks(1, &["--delay", "3s"]);
    let lb = spawn_lb(
        &mocks,
        &[
            "--max-conns",
            "1",
            "--queue-timeout",
            "1s",
            "--health-path",
            "/stats",
        ],
    );
    let res = concurrent_distinct(lb.port, 2);
    let (ok, limited): (Vec<_>, Vec<_>) = res.iter().partition(|(r, _)| r.status == 200);
    assert_eq!(
        (ok.len(), limited.len()),
        (1, 1),
        "statuses: {:?}",
        res.iter().map(|(r, _)| r.status).collect::<Vec<_>>()
    );
    let (r, took) = limited[0];
    assert_rate_limited(r);
    assert!(
        *took >= Duration::from_millis(900) && *took < Duration::from_millis(2900),
        "the queued request should give up after --queue-timeout 1s, took {took:?}"
    );
    assert_eq!(
        mocks[0].requests(),
        1,
        "the timed-out request never reached the backend"
    );
}

#[test]
fn full_queue_refuses_at_once() {
    let mocks = spawn_mocks(1, &["--delay", "2s"]);
    let lb = spawn_lb(
        &mocks,
        &[
            "--max-conns",
            "1",
            "--queue-timeout",
            "10s",
            "--queue-size",
            "1",
            "--health-path",
            "/stats",
        ],
    );
    let mut res = concurrent_distinct(lb.port, 3);
    res.sort_by_key(|(_, took)| *took);
    let statuses: Vec<u16> = res.iter().map(|(r, _)| r.status).collect();
    let times: Vec<Duration> = res.iter().map(|(_, t)| *t).collect();
    // One runs (2 s), one waits in the queue (4 s), one finds it full (429 at once).
    assert_eq!(statuses, vec![429, 200, 200], "times {times:?}");
    assert_rate_limited(&res[0].0);
    assert!(times[0] < Duration::from_millis(1500), "{times:?}");
    assert!(times[2] >= Duration::from_millis(3500), "{times:?}");
}

// ---------------------------------------------------------------------------
// Request log
// ---------------------------------------------------------------------------

#[test]
fn requests_a_graceful_stop_lets_finish_are_logged() {
    // The last request ends just before lb exits, its entry still queued for the log
    // writer: it must reach the file all the same. A 4 MiB response keeps the writer busy
    // for a while (it checks and embeds the JSON), so an lb that does not wait for it
    // exits first.
    let dir = TempDir::new("llm-log-stop");
    let m = Mock::spawn(&["--delay", "200ms", "--response-size", "4194304"]);
    for i in 0..3 {
        let path = dir.0.join(format!("stop-{i}.jsonl"));
        let path_s = path.to_str().expect("utf-8 temp path").to_string();
        // Bodies logged whole (the default cap is 64 KiB).
        let mut lb = Lb::spawn(&[
            "--backends",
            &m.url(),
            "--log-to",
            &path_s,
            "--log-body-limit",
            "8388608",
        ]);
        let port = lb.port;
        let inflight = thread::spawn(move || try_completion(port));
        wait_until(
            DEADLINE,
            "the request in flight at the backend",
            || m.in_flight(),
            |n| *n >= 1,
        );
        lb.signal("TERM");
        let r = inflight
            .join()
            .unwrap()
            .expect("the in-flight request completes");
        assert_eq!(r.status, 200, "{}", r.text());
        let st = lb
            .wait_exit(Duration::from_secs(10))
            .expect("lb exits after draining");
        assert!(st.success(), "lb exited with {st}");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let logged = text
            .lines()
            .filter(|l| l.contains("/v1/completions"))
            .count();
        assert_eq!(logged, 1, "stop {i}: the log holds {text:?}");
    }
}

#[test]
fn request_log_memory_does_not_grow_with_body_size() {
    // One 200 MiB upload with --log-to took lb's peak RSS to 617 MB: the capture kept
    // every byte (the cap was 1 GiB), then the writer copied them into the line.
    const SIZE: u64 = 64 << 20;
    const RSS_LIMIT_KIB: u64 = 64 * 1024;
    let dir = TempDir::new("llm-log-big");
    let path = dir.0.join("requests.jsonl");
    let path_s = path.to_str().expect("utf-8 temp path").to_string();
    let m = Mock::spawn::<&str>(&[]);
    let lb = Lb::spawn(&["--backends", &m.url(), "--log-to", &path_s]);
    let mut c = Conn::open(lb.port).unwrap();
    c.send_head(
        "POST",
        "/upload",
        &[("Content-Type", "text/plain"), ("Connection", "close")],
        Some(SIZE),
    )
    .unwrap();
    // ASCII, so the logged string is exactly the bytes kept; each MiB numbered.
    let mut block: Vec<u8> = (0..1 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let mut fnv = Fnv1a::default();
    for i in 0..SIZE >> 20 {
        block[..8].copy_from_slice(format!("{i:08}").as_bytes());
        fnv.update(&block);
        c.write_raw(&block).unwrap();
    }
    let r = c.read_response("POST").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["bytes"], SIZE, "{v}");
    assert_eq!(v["fnv1a"].as_str(), Some(fnv.hex().as_str()), "{v}");

    let line = wait_until(
        DEADLINE,
        "the upload's line in the request log",
        || {
            // A whole line: the writer may be halfway through it.
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .split_inclusive('\n')
                .find(|l| l.ends_with('\n') && l.contains("\"/upload\""))
                .map(str::to_string)
        },
        Option::is_some,
    )
    .unwrap();
    let logged: Value = serde_json::from_str(&line).expect("one JSON line");
    assert_eq!(logged["status"], 200);
    assert_eq!(logged["request_truncated"], true, "cut at the cap");
    let kept = logged["request"].as_str().expect("the body as a string");
    assert_eq!(kept.len(), 64 * 1024, "the default cap is 64 KiB");
    assert!(kept.starts_with("00000000ijklmnop"), "{}", &kept[..32]);

    let hwm = lb.vm_hwm_kib();
    eprintln!(
        "lb VmHWM after a {} MiB upload with --log-to: {hwm} KiB",
        SIZE >> 20
    );
    assert!(
        hwm < RSS_LIMIT_KIB,
        "lb's peak RSS {hwm} KiB: --log-to should keep 64 KiB of the body, not all of it"
    );
}

#[test]
fn request_log_has_one_json_line_per_request() {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = TempDir::new("llm-log");
    let path = dir.0.join("requests.jsonl");
    let m = Mock::spawn(&["--token-interval", "150ms"]);
    let path_s = path.to_str().expect("utf-8 temp path").to_string();
    let lb = spawn_lb(
        std::slice::from_ref(&m),
        &["--max-conns", "1", "--log-to", &path_s],
    );
    // /health calls (spawn_lb made some already): never logged.
    for _ in 0..3 {
        assert_eq!(lb.get("/health").status, 200);
    }

    // 1. A plain JSON completion.
    let req1 = json!({"model": "m", "prompt": "log me", "max_tokens": 4});
    let r1 = post_json(lb.port, "/v1/completions", &req1);
    served_by(&r1, "plain completion");
    // The only slot is free again before the next request (--max-conns 1).
    lb.wait_active(0, DEADLINE);

    // 2. A streamed chat completion, held open while 3. is refused.
    let req2 = json!({"model": "m", "stream": true,
        "messages": [{"role": "user", "content": "stream me"}]});
    let body2 = serde_json::to_vec(&req2).unwrap();
    let mut c = Conn::open(lb.port).expect("connect");
    c.send_head(
        "POST",
        "/v1/chat/completions",
        &[
            ("Content-Type", "application/json"),
            ("Connection", "close"),
        ],
        Some(body2.len() as u64),
    )
    .unwrap();
    c.write_raw(&body2).unwrap();
    let head = c.read_head("POST").expect("stream head");
    assert_eq!(head.status, 200);
    let mut stream = c.body(&head);
    let first = stream.read_line().unwrap().expect("first SSE line");
    assert!(first.starts_with("data:"), "{first:?}");

    // 3. The only slot is taken: 429.
    let r3 = completion(lb.port, "refused", None);
    assert_rate_limited(&r3);

    let mut sse = first;
    while let Some(l) = stream.read_line().expect("read stream") {
        sse.push('\n');
        sse.push_str(&l);
    }
    assert!(sse.contains("[DONE]"), "{sse}");
    drop(c);
    lb.wait_active(0, DEADLINE);

    // 4. A body that is not JSON.
    let r4 = request(
        lb.port,
        "POST",
        "/echo",
        &[("Content-Type", "text/plain")],
        Some(b"hello plain text"),
    )
    .expect("POST /echo");
    served_by(&r4, "text body");
    lb.wait_active(0, DEADLINE);

    // 5. No body at all. (Not `GET /v1/models`: `lb` answers that itself when every
    // backend lists its models, as the mocks do.)
    let r5 = lb.get("/v1/files");
    served_by(&r5, "GET /v1/files");
    assert_eq!(lb.get("/health").status, 200);

    let lines = wait_until(
        DEADLINE,
        "5 lines in the request log",
        || file_lines(&path),
        |l| l.len() >= 5,
    );
    // Nothing more trickles in (e.g. a /health entry written late).
    thread::sleep(Duration::from_millis(500));
    let lines_after = file_lines(&path);
    assert_eq!(
        lines_after.len(),
        5,
        "exactly one line per proxied request (health excluded): {lines_after:#?}"
    );
    assert_eq!(lines, lines_after[..lines.len()].to_vec());

    let entries: Vec<Value> = lines_after
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l:?}"))
        })
        .collect();
    for e in &entries {
        assert!(e.is_object(), "{e}");
        for k in [
            "time",
            "duration_ms",
            "method",
            "path",
            "status",
            "backend",
            "request",
            "response",
            "request_truncated",
            "response_truncated",
        ] {
            assert!(e.get(k).is_some(), "log entry without {k:?}: {e}");
        }
        assert!(!e["time"].is_null(), "{e}");
        assert!(e["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{e}");
        assert!(e["method"].is_string() && e["path"].is_string(), "{e}");
        assert!(e["status"].is_u64(), "{e}");
        assert_eq!(e["request_truncated"], false, "{e}");
        assert_eq!(e["response_truncated"], false, "{e}");
        assert_ne!(e["path"], "/health", "/health must not be logged: {e}");
    }
    let find = |pred: &dyn Fn(&Value) -> bool, what: &str| -> Value {
        let hits: Vec<&Value> = entries.iter().filter(|e| pred(e)).collect();
        assert_eq!(hits.len(), 1, "log entries for {what}: {entries:#?}");
        hits[0].clone()
    };
    let backend_ok = |e: &Value| {
        e["backend"]
            .as_str()
            .is_some_and(|b| b.contains(&format!("127.0.0.1:{}", m.port)))
    };

    let e1 = find(
        &|e: &Value| e["status"] == 200 && e["path"] == "/v1/completions",
        "the plain completion",
    );
    assert_eq!(e1["method"], "POST");
    assert!(backend_ok(&e1), "backend should be the mock's URL: {e1}");
    assert_eq!(e1["request"], req1, "request logged as raw JSON: {e1}");
    assert_eq!(
        e1["response"],
        r1.json(),
        "response logged as raw JSON: {e1}"
    );

    let e2 = find(
        &|e: &Value| e["path"] == "/v1/chat/completions",
        "the stream",
    );
    assert_eq!(e2["status"], 200);
    assert!(backend_ok(&e2), "{e2}");
    assert_eq!(e2["request"], req2, "{e2}");
    let resp2 = e2["response"]
        .as_str()
        .unwrap_or_else(|| panic!("an SSE response is logged as a string: {e2}"));
    assert!(
        resp2.contains("data: ") && resp2.contains("[DONE]"),
        "the whole stream should be logged: {resp2:?}"
    );

    let e3 = find(&|e: &Value| e["status"] == 429, "the refused request");
    assert_eq!(e3["path"], "/v1/completions");
    assert!(
        e3["backend"].is_null(),
        "a refused request has backend null: {e3}"
    );
    assert_eq!(
        e3["response"]["error"]["type"], "rate_limit_error",
        "the 429 body (JSON) is the logged response: {e3}"
    );

    let e4 = find(&|e: &Value| e["path"] == "/echo", "the text body");
    assert_eq!(e4["request"], "hello plain text", "{e4}");
    assert_eq!(e4["response"]["path"], "/echo", "{e4}");
    assert!(backend_ok(&e4), "{e4}");

    let e5 = find(&|e: &Value| e["path"] == "/v1/files", "the bodiless GET");
    assert_eq!(e5["method"], "GET");
    assert!(
        e5["request"].is_null(),
        "an empty request body is null: {e5}"
    );
    assert_eq!(e5["response"]["path"], "/v1/files", "{e5}");

    let mode = std::fs::metadata(&path)
        .expect("log file metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640, "log file mode is {:o}", mode & 0o777);
}
