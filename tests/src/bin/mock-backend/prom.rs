//! `GET /metrics` of `mock-backend --engine`: an engine [`Snapshot`] in the
//! Prometheus text exposition format (version 0.0.4), with vLLM's metric
//! names, help texts, histogram buckets and labels (`engine="0"`,
//! `model_name="<first --model>"`; labels sorted by name, number formatting
//! and histogram sample order as vLLM's multiprocess exporter writes them).

use std::fmt::Write as _;

use crate::engine::{Snapshot, TTFT_BUCKETS};

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders `s` for the served model `model`.
pub fn render(model: &str, s: &Snapshot) -> String {
    let model = escape_label(model);
    let labels = format!("engine=\"0\",model_name=\"{model}\"");
    let mut out = String::new();
    family(
        &mut out,
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
    );
    sample(
        &mut out,
        "vllm:num_requests_running",
        &labels,
        s.running as f64,
    );
    family(
        &mut out,
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
    );
    sample(
        &mut out,
        "vllm:num_requests_waiting",
        &labels,
        s.waiting as f64,
    );
    family(
        &mut out,
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
    );
    sample(&mut out, "vllm:kv_cache_usage_perc", &labels, s.kv_usage);
    let counters = [
        (
            "vllm:prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.",
            s.prefix_queries,
        ),
        (
            "vllm:prefix_cache_hits_total",
            "Prefix cache hits, in terms of number of cached tokens.",
            s.prefix_hits,
        ),
        (
            "vllm:prompt_tokens_total",
            "Number of prefill tokens processed.",
            s.prompt_tokens,
        ),
        (
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
            s.generation_tokens,
        ),
    ];
    for (name, help, v) in counters {
        family(&mut out, name, "counter", help);
        sample(&mut out, name, &labels, v as f64);
    }
    let name = "vllm:time_to_first_token_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Histogram of time to first token in seconds.",
    );
    let h = &s.ttft;
    sample(&mut out, &format!("{name}_sum"), &labels, h.sum);
    let mut cumulative = 0;
    let bounds = TTFT_BUCKETS.iter().map(|&b| number(b));
    for (le, n) in bounds.chain(["+Inf".to_owned()]).zip(h.counts) {
        cumulative += n;
        let labels = format!("engine=\"0\",le=\"{le}\",model_name=\"{model}\"");
        sample(
            &mut out,
            &format!("{name}_bucket"),
            &labels,
            cumulative as f64,
        );
    }
    sample(&mut out, &format!("{name}_count"), &labels, h.count as f64);
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    // Writing to a String cannot fail.
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

fn sample(out: &mut String, name: &str, labels: &str, v: f64) {
    let _ = writeln!(out, "{name}{{{labels}}} {}", number(v));
}

/// A sample value or bound as Python's `repr` writes it (`0.0`, `0.25`,
/// `2560.0`), and `+Inf`, `-Inf`, `NaN`.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// A label value: `\`, `"` and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Histogram;

    #[test]
    fn numbers_as_python_writes_them() {
        assert_eq!(number(0.0), "0.0");
        assert_eq!(number(3.0), "3.0");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(0.001), "0.001");
        assert_eq!(number(2560.0), "2560.0");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    /// The whole text for a sample state, byte for byte.
    #[test]
    fn golden_text() {
        let mut ttft = Histogram::default();
        ttft.counts[1] = 1; // one at 0.0043 s
        ttft.counts[8] = 2; // two in (0.1, 0.25]
        ttft.sum = 0.5;
        ttft.count = 3;
        let s = Snapshot {
            running: 2,
            waiting: 1,
            kv_usage: 0.25,
            prefix_queries: 20_000,
            prefix_hits: 9984,
            prompt_tokens: 20_000,
            generation_tokens: 42,
            ttft,
        };
        let text = render("mock-model", &s);
        let l = "engine=\"0\",model_name=\"mock-model\"";
        let mut want = format!(
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
             # TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{{{l}}} 2.0\n\
             # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{{{l}}} 1.0\n\
             # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
             # TYPE vllm:kv_cache_usage_perc gauge\n\
             vllm:kv_cache_usage_perc{{{l}}} 0.25\n\
             # HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.\n\
             # TYPE vllm:prefix_cache_queries_total counter\n\
             vllm:prefix_cache_queries_total{{{l}}} 20000.0\n\
             # HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.\n\
             # TYPE vllm:prefix_cache_hits_total counter\n\
             vllm:prefix_cache_hits_total{{{l}}} 9984.0\n\
             # HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n\
             # TYPE vllm:prompt_tokens_total counter\n\
             vllm:prompt_tokens_total{{{l}}} 20000.0\n\
             # HELP vllm:generation_tokens_total Number of generation tokens processed.\n\
             # TYPE vllm:generation_tokens_total counter\n\
             vllm:generation_tokens_total{{{l}}} 42.0\n\
             # HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.\n\
             # TYPE vllm:time_to_first_token_seconds histogram\n\
             vllm:time_to_first_token_seconds_sum{{{l}}} 0.5\n"
        );
        let cumulative = [
            0, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
        ];
        let les = [
            "0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5", "0.75",
            "1.0", "2.5", "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "160.0", "640.0", "2560.0",
            "+Inf",
        ];
        for (le, n) in les.iter().zip(cumulative) {
            want.push_str(&format!(
                "vllm:time_to_first_token_seconds_bucket{{engine=\"0\",le=\"{le}\",model_name=\"mock-model\"}} {n}.0\n"
            ));
        }
        want.push_str(&format!(
            "vllm:time_to_first_token_seconds_count{{{l}}} 3.0\n"
        ));
        assert_eq!(text, want);
    }
}
