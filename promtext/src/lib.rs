//! Reads the Prometheus text exposition format (version 0.0.4, and the OpenMetrics text
//! that engines also serve) far enough to find how loaded an LLM inference engine is.
//!
//! Pure and bounded: no I/O, no allocation, one pass over the bytes, never a panic on any
//! input (fuzzed: `fuzz/fuzz_targets/promtext.rs`). The caller bounds the input's size
//! (`lb` reads at most 1 MiB of a `/metrics` body).
//!
//! [`samples`] yields every well-formed sample line as a name and a value; [`engine_load`]
//! picks out the series `lb` routes by:
//!
//! | engine | running | waiting | KV cache usage (0..1) |
//! | --- | --- | --- | --- |
//! | vLLM | `vllm:num_requests_running` | `vllm:num_requests_waiting` | `vllm:kv_cache_usage_perc` (older: `vllm:gpu_cache_usage_perc`) |
//! | SGLang | `sglang:num_running_reqs` | `sglang:num_queue_reqs` | `sglang:token_usage` |
//!
//! A server may export several label sets of one series (one per engine or model it
//! runs): running and waiting are **summed** over them (the server's total queue), KV
//! usage takes the **largest** (the fullest cache: a sum of fractions means nothing).
//! Negative, infinite and NaN values are ignored, as are malformed lines.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fmt;
use std::str::FromStr;

/// One sample line: the metric's name and its value (labels and timestamp left out).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample<'a> {
    /// The metric name, e.g. `vllm:num_requests_running`.
    pub name: &'a [u8],
    /// The value as written (may be NaN or infinite).
    pub value: f64,
}

/// Every well-formed sample line of `text`, in order. Comments (`#`), blank lines and
/// lines that are not `name[{labels}] value [timestamp]` are skipped.
pub fn samples(text: &[u8]) -> impl Iterator<Item = Sample<'_>> {
    text.split(|&b| b == b'\n').filter_map(sample)
}

/// Parses one line; `None` for comments, blank and malformed lines.
fn sample(line: &[u8]) -> Option<Sample<'_>> {
    let line = trim(line);
    if line.is_empty() || line[0] == b'#' {
        return None;
    }
    let name_end = line
        .iter()
        .position(|&b| b == b'{' || b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || !name.iter().all(|&b| is_name_byte(b)) {
        return None;
    }
    let mut rest = &line[name_end..];
    if rest.first() == Some(&b'{') {
        rest = &rest[labels_end(rest)?..];
    }
    let rest = trim(rest);
    let value_end = rest
        .iter()
        .position(|&b| b == b' ' || b == b'\t')
        .unwrap_or(rest.len());
    let token = std::str::from_utf8(&rest[..value_end]).ok()?;
    if token.is_empty() {
        return None;
    }
    let value = parse_value(token)?;
    Some(Sample { name, value })
}

/// Prometheus writes `NaN`, `+Inf` and `-Inf`; Rust's parser takes every other form.
fn parse_value(token: &str) -> Option<f64> {
    match token {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => token.parse().ok(),
    }
}

/// Given `s` starting with `{`, the index just past the matching `}` (quoted label values
/// may hold braces, spaces and `\"`), or `None` if the line ends first.
fn labels_end(s: &[u8]) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, &b) in s.iter().enumerate().skip(1) {
        if quoted {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => quoted = false,
                _ => {}
            }
        } else if b == b'"' {
            quoted = true;
        } else if b == b'}' {
            return Some(i + 1);
        }
    }
    None
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t' | b'\r', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t' | b'\r'] = s {
        s = rest;
    }
    s
}

/// An inference engine whose metrics `lb` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Engine {
    /// vLLM (`vllm:` series).
    Vllm,
    /// SGLang (`sglang:` series).
    Sglang,
}

impl Engine {
    /// Its name in flags, logs and the admin API: `vllm` or `sglang`.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
        }
    }

    fn series(self) -> Series {
        match self {
            Engine::Vllm => Series {
                running: b"vllm:num_requests_running",
                waiting: b"vllm:num_requests_waiting",
                kv: b"vllm:kv_cache_usage_perc",
                kv_old: Some(b"vllm:gpu_cache_usage_perc"),
            },
            Engine::Sglang => Series {
                running: b"sglang:num_running_reqs",
                waiting: b"sglang:num_queue_reqs",
                kv: b"sglang:token_usage",
                kv_old: None,
            },
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

struct Series {
    running: &'static [u8],
    waiting: &'static [u8],
    kv: &'static [u8],
    kv_old: Option<&'static [u8]>,
}

/// Which engine's series to look for (`--load-signal`, less `off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Whichever the text shows: vLLM's if it has any, else SGLang's.
    Auto,
    /// Only this engine's series.
    Only(Engine),
}

/// An unknown `--load-signal` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownSignal(pub String);

impl fmt::Display for UnknownSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "'{}' is not a load signal (auto, vllm, sglang or off)",
            self.0
        )
    }
}

impl std::error::Error for UnknownSignal {}

impl FromStr for Signal {
    type Err = UnknownSignal;

    /// `auto`, `vllm` or `sglang` (`off` is the caller's: it means no polling at all).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Signal::Auto),
            "vllm" => Ok(Signal::Only(Engine::Vllm)),
            "sglang" => Ok(Signal::Only(Engine::Sglang)),
            other => Err(UnknownSignal(other.to_string())),
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signal::Auto => f.write_str("auto"),
            Signal::Only(e) => f.write_str(e.name()),
        }
    }
}

/// What one engine's `/metrics` says about its load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineLoad {
    /// Whose series these are.
    pub engine: Engine,
    /// Requests being decoded, summed over label sets (rounded, saturating).
    pub running: u32,
    /// Requests queued, summed over label sets (rounded, saturating).
    pub waiting: u32,
    /// The KV cache's usage, `0.0..=1.0`, the largest over label sets; `None` when the
    /// text has no such series.
    pub kv_usage: Option<f64>,
}

/// Running sums for one engine's series.
#[derive(Default)]
struct Tally {
    seen: bool,
    running: f64,
    waiting: f64,
    kv: Option<f64>,
    kv_old: Option<f64>,
}

impl Tally {
    fn add(&mut self, series: &Series, s: &Sample<'_>) {
        // Only finite, non-negative figures mean anything here.
        if !(s.value.is_finite() && s.value >= 0.0) {
            return;
        }
        if s.name == series.running {
            self.running += s.value;
        } else if s.name == series.waiting {
            self.waiting += s.value;
        } else if s.name == series.kv {
            self.kv = Some(self.kv.map_or(s.value, |k| k.max(s.value)));
        } else if Some(s.name) == series.kv_old {
            self.kv_old = Some(self.kv_old.map_or(s.value, |k| k.max(s.value)));
        } else {
            return;
        }
        self.seen = true;
    }

    fn load(&self, engine: Engine) -> Option<EngineLoad> {
        self.seen.then(|| EngineLoad {
            engine,
            running: count(self.running),
            waiting: count(self.waiting),
            kv_usage: self.kv.or(self.kv_old).map(|k| k.clamp(0.0, 1.0)),
        })
    }
}

/// A summed gauge as a count: rounded, saturating at `u32::MAX` (an infinite sum too).
fn count(sum: f64) -> u32 {
    // `as` saturates and maps NaN to 0.
    sum.round() as u32
}

/// The load figures in `text` for `signal`, or `None` when it shows none of the known
/// series (of that engine, unless `Auto`). With `Auto` and both engines' series present,
/// vLLM's win.
pub fn engine_load(text: &[u8], signal: Signal) -> Option<EngineLoad> {
    let (vllm, sglang) = (Engine::Vllm.series(), Engine::Sglang.series());
    let (mut v, mut g) = (Tally::default(), Tally::default());
    let want_v = matches!(signal, Signal::Auto | Signal::Only(Engine::Vllm));
    let want_g = matches!(signal, Signal::Auto | Signal::Only(Engine::Sglang));
    for s in samples(text) {
        if want_v && s.name.starts_with(b"vllm:") {
            v.add(&vllm, &s);
        } else if want_g && s.name.starts_with(b"sglang:") {
            g.add(&sglang, &s);
        }
    }
    v.load(Engine::Vllm).or_else(|| g.load(Engine::Sglang))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:prompt_tokens_total{model_name="m"} 1234.0
"#;

    #[test]
    fn vllm_sums_counts_and_takes_the_largest_kv() {
        let l = engine_load(VLLM.as_bytes(), Signal::Auto).unwrap();
        assert_eq!(l.engine, Engine::Vllm);
        assert_eq!((l.running, l.waiting, l.kv_usage), (7, 2, Some(0.5)));
        assert_eq!(
            engine_load(VLLM.as_bytes(), Signal::Only(Engine::Vllm)),
            Some(l)
        );
        assert_eq!(
            engine_load(VLLM.as_bytes(), Signal::Only(Engine::Sglang)),
            None
        );
    }

    #[test]
    fn older_vllm_kv_name_and_sglang() {
        let old = "vllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 0.9\n";
        let l = engine_load(old.as_bytes(), Signal::Auto).unwrap();
        assert_eq!((l.running, l.waiting, l.kv_usage), (1, 0, Some(0.9)));
        let both = "vllm:gpu_cache_usage_perc 0.9\nvllm:kv_cache_usage_perc 0.1\n";
        assert_eq!(
            engine_load(both.as_bytes(), Signal::Auto).unwrap().kv_usage,
            Some(0.1),
            "the current name wins"
        );
        let sg = "# TYPE sglang:num_running_reqs gauge\r\nsglang:num_running_reqs{model_name=\"q\",tp_rank=\"0\"} 5\r\nsglang:num_queue_reqs{model_name=\"q\"} 11\r\nsglang:token_usage{model_name=\"q\"} 0.97\r\n";
        let l = engine_load(sg.as_bytes(), Signal::Auto).unwrap();
        assert_eq!(l.engine, Engine::Sglang);
        assert_eq!((l.running, l.waiting, l.kv_usage), (5, 11, Some(0.97)));
        assert_eq!(engine_load(sg.as_bytes(), Signal::Only(Engine::Vllm)), None);
    }

    #[test]
    fn labels_may_hold_braces_quotes_and_spaces() {
        let t = r#"vllm:num_requests_waiting{model_name="a } b \" {c}",x="\\"} 6 1712345678000"#;
        let l = engine_load(t.as_bytes(), Signal::Auto).unwrap();
        assert_eq!(l.waiting, 6);
        let s: Vec<_> = samples(t.as_bytes()).collect();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, b"vllm:num_requests_waiting");
    }

    #[test]
    fn garbage_and_bad_values_are_ignored() {
        for t in [
            "",
            "\n\n#\n",
            "<html>not metrics</html>",
            "{\"ok\":true}",
            "vllm:num_requests_running{unclosed=\"x 3",
            "vllm:num_requests_running",
            "vllm:num_requests_running{} ",
            "vllm:num_requests_running NaN",
            "vllm:num_requests_running -Inf",
            "vllm:num_requests_running -1",
            "vllm:num_requests_running 1e",
            "vllm-num_requests_running 4",
            "\u{0}\u{ff}",
        ] {
            assert_eq!(engine_load(t.as_bytes(), Signal::Auto), None, "{t:?}");
        }
        // A bad line among good ones costs only itself.
        let t = "vllm:num_requests_running oops\nvllm:num_requests_running 2\n";
        assert_eq!(engine_load(t.as_bytes(), Signal::Auto).unwrap().running, 2);
    }

    #[test]
    fn huge_figures_saturate_and_kv_is_clamped() {
        let t = "vllm:num_requests_running 1e300\nvllm:num_requests_running 1e308\nvllm:num_requests_running 1.7e308\nvllm:num_requests_waiting 2.6\nvllm:kv_cache_usage_perc 3\n";
        let l = engine_load(t.as_bytes(), Signal::Auto).unwrap();
        assert_eq!((l.running, l.waiting, l.kv_usage), (u32::MAX, 3, Some(1.0)));
    }

    #[test]
    fn signal_names_round_trip() {
        for s in ["auto", "vllm", "sglang"] {
            assert_eq!(s.parse::<Signal>().unwrap().to_string(), s);
        }
        let e = "off".parse::<Signal>().unwrap_err().to_string();
        assert!(e.contains("auto, vllm, sglang or off"), "{e}");
    }
}
