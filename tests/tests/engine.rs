//! `mock-backend --engine`, black-box: continuous batching with a FIFO queue,
//! the prefix cache and what it saves in time to first token, the queue cap,
//! model names, and `GET /metrics` as strict Prometheus text with vLLM's names.
//!
//! These talk to the mock directly (no `lb`). Times are scaled by `--speed`;
//! where a test depends on order or on a time, the engine's own (logical)
//! times decide it, read back from its TTFT histogram, and the margins
//! against the test's own pace are a second or more.

use std::collections::HashSet;
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::*;

// ---------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------

/// One sample: metric name, labels (in the order written), value.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

/// A family declared by `# TYPE`.
#[derive(Debug)]
struct Family {
    name: String,
    kind: String,
    help: Option<String>,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad value {s:?}")),
    }
}

type Labels = Vec<(String, String)>;

/// `{a="x",b="y"}` (after the name) → labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parses the text exposition format (0.0.4) strictly: every line a
/// `# HELP`, a `# TYPE` or a sample; every sample in the family of the last
/// `# TYPE` (with `_total` for counters as written, `_bucket`/`_sum`/`_count`
/// for histograms), families not interleaved or repeated, no duplicate
/// series, histogram buckets cumulative and ending at `+Inf` = `_count`.
fn parse_prometheus(text: &str) -> Result<(Vec<Family>, Vec<Sample>), String> {
    if !text.ends_with('\n') {
        return Err("the text must end with a newline".into());
    }
    let mut families: Vec<Family> = Vec::new();
    let mut samples: Vec<Sample> = Vec::new();
    let mut series = HashSet::new();
    let mut helps: Vec<(String, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let err = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix("# ") {
            let mut parts = c.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), help) => {
                    if !is_metric_name(name) || helps.iter().any(|(h, _)| h == name) {
                        return Err(err("bad or repeated HELP".into()));
                    }
                    helps.push((name.to_string(), help.unwrap_or("").to_string()));
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    let known = ["counter", "gauge", "histogram", "summary", "untyped"];
                    if !is_metric_name(name) || !known.contains(&kind) {
                        return Err(err("bad TYPE".into()));
                    }
                    if families.iter().any(|f| f.name == name) {
                        return Err(err("family declared twice".into()));
                    }
                    if samples.iter().any(|s| s.name.starts_with(name)) {
                        return Err(err("TYPE after the family's samples".into()));
                    }
                    let help = helps
                        .iter()
                        .find(|(h, _)| h == name)
                        .map(|(_, t)| t.clone());
                    families.push(Family {
                        name: name.to_string(),
                        kind: kind.to_string(),
                        help,
                    });
                }
                _ => {} // Other comments are allowed.
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(err("bad metric name".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (Vec::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before the value".into()))?
            .split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| err("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        let fam = families
            .last()
            .ok_or_else(|| err("sample before any TYPE".into()))?;
        let suffix_ok = match fam.kind.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name == format!("{}{s}", fam.name)),
            _ => name == fam.name,
        };
        if !suffix_ok {
            return Err(err(format!("not in the family {} being written", fam.name)));
        }
        let mut key = labels.clone();
        key.sort();
        if !series.insert((name.to_string(), key)) {
            return Err(err("duplicate series".into()));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    for f in families.iter().filter(|f| f.kind == "histogram") {
        let buckets: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == format!("{}_bucket", f.name))
            .collect();
        let mut last_le = f64::NEG_INFINITY;
        let mut last_n = 0.0;
        for b in &buckets {
            let le = label(b, "le")
                .ok_or(format!("{} bucket without le", f.name))
                .and_then(parse_value)?;
            if le <= last_le || b.value < last_n {
                return Err(format!("{}: buckets not cumulative in le order", f.name));
            }
            (last_le, last_n) = (le, b.value);
        }
        let count = samples
            .iter()
            .find(|s| s.name == format!("{}_count", f.name))
            .ok_or(format!("{} without _count", f.name))?;
        if last_le != f64::INFINITY || last_n != count.value {
            return Err(format!("{}: no +Inf bucket equal to _count", f.name));
        }
    }
    Ok((families, samples))
}

fn label<'a>(s: &'a Sample, name: &str) -> Option<&'a str> {
    s.labels
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The mock's `/metrics`, checked and parsed.
struct Metrics {
    families: Vec<Family>,
    samples: Vec<Sample>,
}

impl Metrics {
    fn get(port: u16) -> Metrics {
        let r = get(port, "/metrics");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let text = r.text();
        let (families, samples) =
            parse_prometheus(&text).unwrap_or_else(|e| panic!("{e}\nin:\n{text}"));
        Metrics { families, samples }
    }

    /// The value of the one sample called `name` with labels `extra` (besides
    /// `engine` and `model_name`).
    fn value(&self, name: &str, extra: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && s.labels.len() == 2 + extra.len()
                    && extra.iter().all(|(k, v)| label(s, k) == Some(v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {extra:?} in {:?}", self.samples);
        found[0].value
    }

    fn running_waiting(&self) -> (f64, f64) {
        (
            self.value("vllm:num_requests_running", &[]),
            self.value("vllm:num_requests_waiting", &[]),
        )
    }

    /// TTFT observations at or below `le` (as written, e.g. `"1.0"`).
    fn ttft_le(&self, le: &str) -> f64 {
        self.value("vllm:time_to_first_token_seconds_bucket", &[("le", le)])
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// A streamed completion: the arrival time (since its start) and payload of
/// each `data:` line.
fn stream_completion(port: u16, body: &Value) -> Vec<(Duration, String)> {
    let mut c = Conn::open(port).expect("connect to the mock");
    let b = serde_json::to_vec(body).unwrap();
    let t0 = Instant::now();
    c.send_head(
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        Some(b.len() as u64),
    )
    .unwrap();
    c.write_raw(&b).unwrap();
    let head = c.read_head("POST").unwrap();
    assert_eq!(head.status, 200);
    let mut body = c.body(&head);
    let mut events = Vec::new();
    while let Some(line) = body.read_line().expect("read the stream") {
        if let Some(data) = line.strip_prefix("data:") {
            events.push((t0.elapsed(), data.trim().to_string()));
        }
    }
    events
}

/// Opens a streamed completion and reads up to its first event; the
/// connection stays open until dropped.
fn open_stream(port: u16, body: &Value) -> Conn {
    let mut c = Conn::open(port).expect("connect to the mock");
    let b = serde_json::to_vec(body).unwrap();
    c.send_head(
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        Some(b.len() as u64),
    )
    .unwrap();
    c.write_raw(&b).unwrap();
    let head = c.read_head("POST").unwrap();
    assert_eq!(head.status, 200);
    let first = c.body(&head).read_line().unwrap();
    assert!(first.is_some_and(|l| l.starts_with("data: {")));
    c
}

fn wait_for_metrics(port: u16, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let m = wait_until(
        DEADLINE,
        what,
        || {
            let m = Metrics::get(port);
            let ok = done(&m);
            (ok, m.running_waiting(), m)
        },
        |(ok, _, _)| *ok,
    );
    m.2
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} samples", self.samples.len())
    }
}

/// A 40,000-byte prompt: 10,000 tokens at 4 bytes a token, 625 blocks.
fn long_prompt(seed: &str) -> String {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < 40_000 {
        s.push_str(&format!("{seed} word{i} "));
        i += 1;
    }
    s.truncate(40_000);
    s
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn metrics_are_strict_prometheus_text_with_vllm_names() {
    let m = Mock::spawn(&["--engine", "--speed", "100", "--model", "org/my-\"model\""]);
    let before = Metrics::get(m.port);
    let want = [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:prefix_cache_queries_total", "counter"),
        ("vllm:prefix_cache_hits_total", "counter"),
        ("vllm:prompt_tokens_total", "counter"),
        ("vllm:generation_tokens_total", "counter"),
        ("vllm:time_to_first_token_seconds", "histogram"),
    ];
    for (name, kind) in want {
        let f = before
            .families
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no family {name}"));
        assert_eq!(f.kind, kind, "{name}");
        assert!(f.help.as_ref().is_some_and(|h| !h.is_empty()), "{name}");
    }
    for s in &before.samples {
        assert_eq!(label(s, "model_name"), Some("org/my-\"model\""), "{s:?}");
        assert_eq!(label(s, "engine"), Some("0"), "{s:?}");
        assert_eq!(s.value, 0.0, "{s:?}");
    }
    // vLLM's 22 TTFT buckets and +Inf.
    let buckets = before
        .samples
        .iter()
        .filter(|s| s.name == "vllm:time_to_first_token_seconds_bucket")
        .count();
    assert_eq!(buckets, 23);

    for max_tokens in [3, 4] {
        let r = post_json(
            m.port,
            "/v1/completions",
            &json!({"prompt": "one two three four", "max_tokens": max_tokens}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let after = Metrics::get(m.port);
    assert_eq!(after.value("vllm:generation_tokens_total", &[]), 7.0);
    // 18 bytes: 5 tokens each.
    assert_eq!(after.value("vllm:prompt_tokens_total", &[]), 10.0);
    assert_eq!(after.value("vllm:prefix_cache_queries_total", &[]), 10.0);
    assert_eq!(
        after.value("vllm:time_to_first_token_seconds_count", &[]),
        2.0
    );
    assert_eq!(after.ttft_le("+Inf"), 2.0);
    assert!(after.value("vllm:time_to_first_token_seconds_sum", &[]) > 0.0);
    assert_eq!(after.running_waiting(), (0.0, 0.0));
    assert_eq!(after.value("vllm:kv_cache_usage_perc", &[]), 0.0);
    // `/metrics` is a control endpoint: not counted as a request.
    assert_eq!(m.requests(), 2);
}

#[test]
fn requests_beyond_the_slots_wait_in_fifo_order() {
    // Decode steps of ~0.41 ms at batch 2: 5000 tokens take ~2 s.
    let m = Mock::spawn(&["--engine", "--speed", "50", "--slots", "2"]);
    let port = m.port;
    let long = json!({"prompt": "tell me a long story", "max_tokens": 5000, "stream": true});
    let short = json!({"prompt": "and a short one", "max_tokens": 10, "stream": true});
    let a = {
        let long = long.clone();
        thread::spawn(move || stream_completion(port, &long))
    };
    wait_for_metrics(port, "the first request running", |m| {
        m.running_waiting().0 == 1.0
    });
    let b = thread::spawn(move || stream_completion(port, &long));
    wait_for_metrics(port, "two requests running", |m| {
        m.running_waiting().0 == 2.0
    });
    let c = thread::spawn(move || stream_completion(port, &short));
    let seen = wait_for_metrics(port, "the third request waiting", |m| {
        m.running_waiting() == (2.0, 1.0)
    });
    assert_eq!(seen.running_waiting(), (2.0, 1.0));
    assert!(seen.value("vllm:kv_cache_usage_perc", &[]) > 0.0);

    let (a, b, c) = (a.join().unwrap(), b.join().unwrap(), c.join().unwrap());
    for (events, n) in [(&a, 5000), (&b, 5000), (&c, 10)] {
        assert_eq!(events.len(), n + 1, "{n} tokens and [DONE]");
        assert_eq!(events[n].1, "[DONE]");
        let last: Value = serde_json::from_str(&events[n - 1].1).unwrap();
        assert_eq!(last["choices"][0]["text"], format!(" token{}", n - 1));
    }
    // The long streams were paced by the decode steps, not sent at once.
    assert!(
        a[4999].0 > a[0].0 + Duration::from_secs(1),
        "{:?} .. {:?}",
        a[0].0,
        a[4999].0
    );
    let done = Metrics::get(port);
    assert_eq!(done.running_waiting(), (0.0, 0.0));
    assert_eq!(done.value("vllm:kv_cache_usage_perc", &[]), 0.0);
    assert_eq!(done.value("vllm:generation_tokens_total", &[]), 10_010.0);
    // A and B started within a step of arriving; C waited for A to finish
    // (~2 s after A arrived, and C arrived well under a second after A).
    assert_eq!(done.ttft_le("0.1"), 2.0);
    assert_eq!(done.ttft_le("1.0"), 2.0);
    assert_eq!(done.ttft_le("2.5"), 3.0);
}

#[test]
fn a_repeated_long_prompt_hits_the_prefix_cache_and_starts_sooner() {
    // Cold: 10,000 tokens x 0.1 ms + a 20 ms step = 1.02 s, / 5 = 0.204 s.
    // Warm: 16 uncached tokens: 21.6 ms / 5 = 4.3 ms.
    let m = Mock::spawn(&["--engine", "--speed", "5"]);
    let prompt = long_prompt("alpha");
    let ask = |prompt: &str| {
        let t0 = Instant::now();
        let r = post_json(
            m.port,
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 1}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let usage = r.json()["usage"].clone();
        (t0.elapsed(), usage)
    };
    let (cold, usage) = ask(&prompt);
    assert_eq!(usage["prompt_tokens"], 10_000);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    let m1 = Metrics::get(m.port);
    assert_eq!(m1.value("vllm:prefix_cache_queries_total", &[]), 10_000.0);
    assert_eq!(m1.value("vllm:prefix_cache_hits_total", &[]), 0.0);

    let (warm, usage) = ask(&prompt);
    // Every block but the one holding the last token: 624 x 16.
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 9984);
    let m2 = Metrics::get(m.port);
    assert_eq!(m2.value("vllm:prefix_cache_queries_total", &[]), 20_000.0);
    assert_eq!(m2.value("vllm:prefix_cache_hits_total", &[]), 9984.0);
    // The engine's own TTFTs: one in (0.1, 0.25], one at or below 5 ms.
    assert_eq!(m2.ttft_le("0.005"), 1.0);
    assert_eq!(m2.ttft_le("0.1"), 1.0);
    assert_eq!(m2.ttft_le("0.25"), 2.0);
    // And the client sees it.
    assert!(cold >= Duration::from_millis(200), "{cold:?}");
    assert!(warm < cold / 2, "cold {cold:?}, warm {warm:?}");

    // Another prompt shares nothing.
    let (_, usage) = ask(&long_prompt("beta"));
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    // Chat: the same long system prompt, different questions. The shared
    // canonical bytes are "system\0<prompt>\x01user\0"; whole 64-byte blocks
    // of them are cached.
    let chat = |q: &str| {
        let body = json!({"messages": [
            {"role": "system", "content": prompt},
            {"role": "user", "content": q},
        ], "max_tokens": 1});
        let r = post_json(m.port, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["usage"].clone()
    };
    let first = chat("what is alpha?");
    let shared = "system\0".len() + prompt.len() + "\u{1}user\0".len();
    let canonical = shared + "what is alpha?\u{1}".len();
    assert_eq!(first["prompt_tokens"], canonical.div_ceil(4));
    let second = chat("and beta?");
    assert_eq!(
        second["prompt_tokens_details"]["cached_tokens"],
        shared / 64 * 16
    );
}

#[test]
fn a_full_queue_answers_503_and_a_client_that_leaves_frees_its_slot() {
    let m = Mock::spawn(&[
        "--engine",
        "--speed",
        "50",
        "--slots",
        "1",
        "--max-waiting",
        "1",
    ]);
    let port = m.port;
    // A holds the only slot for ~100 s unless it leaves.
    let a = open_stream(
        port,
        &json!({"prompt": "a", "max_tokens": 200_000, "stream": true}),
    );
    let b = thread::spawn(move || {
        post_json(
            port,
            "/v1/completions",
            &json!({"prompt": "b", "max_tokens": 5}),
        )
    });
    wait_for_metrics(port, "B waiting", |m| m.running_waiting() == (1.0, 1.0));
    let c = post_json(
        port,
        "/v1/completions",
        &json!({"prompt": "c", "max_tokens": 5}),
    );
    let e = assert_error_json(&c, 503);
    assert!(
        e["message"].as_str().unwrap().contains("--max-waiting"),
        "{e}"
    );
    // A leaves: its request is cancelled and B runs.
    a.close();
    let b = b.join().unwrap();
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(
        b.json()["choices"][0]["text"],
        "token0 token1 token2 token3 token4"
    );
    let after = wait_for_metrics(port, "the engine idle", |m| {
        m.running_waiting() == (0.0, 0.0)
    });
    assert_eq!(after.value("vllm:kv_cache_usage_perc", &[]), 0.0);
    assert!(after.value("vllm:generation_tokens_total", &[]) < 100_000.0);
}

#[test]
fn models_max_tokens_and_context_limits() {
    let m = Mock::spawn(&[
        "--engine",
        "--speed",
        "100",
        "--kv-blocks",
        "8",
        "--model",
        "a",
        "--model",
        "b",
    ]);
    let ids = |port| -> Vec<String> {
        get(port, "/v1/models").json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(m.port), ["a", "b"]);
    let r = post_json(
        m.port,
        "/v1/chat/completions",
        &json!({"model": "c", "messages": [{"role": "user", "content": "hi"}]}),
    );
    let e = assert_error_json(&r, 404);
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["type"], "invalid_request_error");
    let ask = |body: Value| post_json(m.port, "/v1/completions", &body);
    let r = ask(json!({"model": "b", "prompt": "hi", "max_tokens": 3}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "b");
    assert_eq!(r.json()["choices"][0]["text"], "token0 token1 token2");
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    // No model: the first; no max_tokens: --tokens (10).
    let r = ask(json!({"prompt": "hi"}));
    assert_eq!(r.json()["model"], "a");
    assert_eq!(r.json()["usage"]["completion_tokens"], 10);
    assert_error_json(&ask(json!({"prompt": "hi", "max_tokens": 0})), 400);
    // 8 blocks = 128 tokens of context.
    let r = ask(json!({"prompt": "x".repeat(400), "max_tokens": 29}));
    let e = assert_error_json(&r, 400);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 128 tokens"),
        "{e}"
    );
    assert_eq!(
        ask(json!({"prompt": "x".repeat(400), "max_tokens": 28})).status,
        200
    );

    // Without --engine: --model is listed, any model is still served, and
    // /metrics is a 404 (a control endpoint: a load balancer's polls count nowhere).
    let plain = Mock::spawn(&["--model", "x"]);
    assert_eq!(ids(plain.port), ["x"]);
    let r = post_json(
        plain.port,
        "/v1/completions",
        &json!({"model": "zzz", "prompt": "hi"}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["model"], "zzz");
    let r = get(plain.port, "/metrics");
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(plain.requests(), 1, "only the completion counts");
}

/// The checker above rejects what it should, so its passing means something.
#[test]
fn the_prometheus_checker_rejects_malformed_text() {
    let good = "# HELP x_total Things.\n# TYPE x_total counter\nx_total{a=\"1\"} 3.0\n\
                # TYPE h histogram\nh_sum 1.5\nh_bucket{le=\"1.0\"} 1\nh_bucket{le=\"+Inf\"} 2\n\
                h_count 2\n";
    let (families, samples) = parse_prometheus(good).unwrap();
    assert_eq!(families.len(), 2);
    assert_eq!(samples.len(), 5);
    let bad = [
        ("no newline at the end", "# TYPE x gauge\nx 1"),
        ("no TYPE", "x 1\n"),
        ("foreign sample", "# TYPE x gauge\ny 1\n"),
        (
            "duplicate series",
            "# TYPE x gauge\nx{a=\"1\"} 1\nx{a=\"1\"} 2\n",
        ),
        ("bad escape", "# TYPE x gauge\nx{a=\"\\t\"} 1\n"),
        ("bad value", "# TYPE x gauge\nx one\n"),
        ("bad name", "# TYPE 1x gauge\n1x 1\n"),
        ("repeated family", "# TYPE x gauge\nx 1\n# TYPE x gauge\n"),
        (
            "non-cumulative buckets",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        ),
        (
            "+Inf bucket not the count",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 2\n",
        ),
    ];
    for (what, text) in bad {
        assert!(parse_prometheus(text).is_err(), "{what} accepted: {text:?}");
    }
}
