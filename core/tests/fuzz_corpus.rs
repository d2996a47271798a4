//! Replays the fuzz corpora on stable: every file in `fuzz/corpus/<target>/` goes
//! through the same harness the cargo-fuzz target runs (`fuzz/harness/<target>.rs`),
//! followed by a few thousand seeded random inputs, so the harnesses' invariants are
//! checked by a plain `cargo test -p lb-core` without nightly. (The HTTP/1 codec's
//! targets replay in `lb-http1`'s own `tests/fuzz_corpus.rs`; `proxy_path`, the smol
//! build's request path, in `lb-smol`'s.)

use std::fs;
use std::path::PathBuf;

use rand::{rngs::SmallRng, Rng, SeedableRng};

#[path = "../../fuzz/harness/health.rs"]
mod health;
#[path = "../../fuzz/harness/pool_ops.rs"]
mod pool_ops;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let data = fs::read(&path).unwrap();
            (path, data)
        })
        .collect();
    files.sort();
    files
}

/// Runs every corpus file of `target`, then `random` seeded random inputs.
fn replay(target: &str, run: fn(&[u8]), random: usize) {
    let files = corpus(target);
    assert!(!files.is_empty(), "the {target} corpus is empty");
    for (path, data) in &files {
        let ok = std::panic::catch_unwind(|| run(data));
        assert!(ok.is_ok(), "{target}: {} fails", path.display());
    }
    let mut rng = SmallRng::seed_from_u64(0x1b_c0de);
    let mut buf = Vec::new();
    for i in 0..random {
        buf.clear();
        let len = rng.random_range(0..=(64 << (i % 5)));
        buf.extend((0..len).map(|_| rng.random::<u8>()));
        let ok = std::panic::catch_unwind(|| run(&buf));
        assert!(ok.is_ok(), "{target}: random input {i} fails: {buf:?}");
    }
}

#[test]
fn pool_ops_corpus() {
    replay("pool_ops", pool_ops::run, 2000);
}

#[test]
fn health_corpus() {
    replay("health", health::run, 2000);
}
