//! Fuzz harness: `lb_promtext`, the Prometheus text reader that engine load polls use.
//!
//! `run` must never panic. It checks that the figures found are within their documented
//! ranges, that `Auto` agrees with asking for the engine it found, and that the input cut
//! at a line break reads as its lines do (each line stands alone).

use lb_promtext::{engine_load, samples, Engine, Signal};

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let lines = data.split(|&b| b == b'\n').count();
    assert!(samples(data).count() <= lines);
    let auto = engine_load(data, Signal::Auto);
    for engine in [Engine::Vllm, Engine::Sglang] {
        let only = engine_load(data, Signal::Only(engine));
        if let Some(l) = only {
            assert_eq!(l.engine, engine);
            assert!(l.kv_usage.is_none_or(|k| (0.0..=1.0).contains(&k)));
        }
        if auto.is_some_and(|a| a.engine == engine) {
            assert_eq!(auto, only);
        }
    }
    if let Some(a) = auto {
        if a.engine == Engine::Sglang {
            assert_eq!(engine_load(data, Signal::Only(Engine::Vllm)), None);
        }
    }
    // Samples split at a line break are those of the two halves.
    if let Some(cut) = data.iter().position(|&b| b == b'\n') {
        let whole = samples(data).count();
        let parts = samples(&data[..cut]).count() + samples(&data[cut + 1..]).count();
        assert_eq!(whole, parts);
    }
}
