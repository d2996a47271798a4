//! Property tests: any bytes are read without a panic, and a rendered exposition of the
//! known series (any label sets, any order, noise between) reads back as its sums.

use lb_promtext::{engine_load, Engine, Signal};
use proptest::prelude::*;

/// A label value with the characters that make label parsing hard.
fn label_value() -> impl Strategy<Value = String> {
    "[a-z {}\"\\\\=,]{0,12}".prop_map(|s| s.replace('\\', "\\\\").replace('"', "\\\""))
}

proptest! {
    #[test]
    fn any_bytes_are_read_without_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        for signal in [Signal::Auto, Signal::Only(Engine::Vllm), Signal::Only(Engine::Sglang)] {
            if let Some(l) = engine_load(&data, signal) {
                prop_assert!(l.kv_usage.is_none_or(|k| (0.0..=1.0).contains(&k)));
            }
        }
    }

    #[test]
    fn rendered_series_read_back_as_their_sums(
        running in proptest::collection::vec((0u32..1000, label_value()), 1..5),
        waiting in proptest::collection::vec((0u32..1000, label_value()), 0..5),
        kv in proptest::collection::vec((0u32..=100, label_value()), 0..4),
        sglang in any::<bool>(),
        crlf in any::<bool>(),
    ) {
        let (r, w, k) = if sglang {
            ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage")
        } else {
            ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
        };
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut text = String::from("# HELP other_total noise\nother_total{x=\"vllm:num_requests_running 9\"} 9");
        text.push_str(eol);
        for (v, l) in &running {
            text.push_str(&format!("{r}{{model_name=\"{l}\",engine=\"0\"}} {v}.0{eol}"));
        }
        for (v, l) in &waiting {
            text.push_str(&format!("# TYPE {w} gauge{eol}{w}{{model_name=\"{l}\"}} {v} 1712345678{eol}"));
        }
        for (v, l) in &kv {
            text.push_str(&format!("{k}{{m=\"{l}\"}} {}{eol}", f64::from(*v) / 100.0));
        }
        let l = engine_load(text.as_bytes(), Signal::Auto).expect("the series are there");
        prop_assert_eq!(l.engine, if sglang { Engine::Sglang } else { Engine::Vllm });
        prop_assert_eq!(l.running, running.iter().map(|x| x.0).sum::<u32>());
        prop_assert_eq!(l.waiting, waiting.iter().map(|x| x.0).sum::<u32>());
        let max_kv = kv.iter().map(|x| f64::from(x.0) / 100.0).fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        prop_assert_eq!(l.kv_usage, max_kv);
    }
}
