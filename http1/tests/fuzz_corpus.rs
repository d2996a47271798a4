//! Replays the fuzz corpora on stable: every file in `fuzz/corpus/<target>/` goes
//! through the same harness the cargo-fuzz target runs (`fuzz/harness/<target>.rs`),
//! followed by a few thousand seeded random inputs, so the harnesses' invariants are
//! checked by a plain `cargo test -p lb-http1` without nightly.

use std::fs;
use std::path::PathBuf;

use rand::{rngs::SmallRng, Rng, SeedableRng};

#[path = "../../fuzz/harness/http1_chunked.rs"]
mod http1_chunked;
#[path = "../../fuzz/harness/http1_request.rs"]
mod http1_request;
#[path = "../../fuzz/harness/http1_response.rs"]
mod http1_response;

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
fn http1_request_corpus() {
    replay("http1_request", http1_request::run, 2000);
}

#[test]
fn http1_response_corpus() {
    replay("http1_response", http1_response::run, 2000);
}

#[test]
fn http1_chunked_corpus() {
    replay("http1_chunked", http1_chunked::run, 2000);
}
