//! Replays the `promtext` fuzz corpus on stable: every file in `fuzz/corpus/promtext/`
//! goes through the harness the cargo-fuzz target runs (`fuzz/harness/promtext.rs`),
//! then a few thousand seeded random inputs, some of them built from metric-like pieces.

use std::fs;
use std::path::PathBuf;

use rand::{rngs::SmallRng, Rng, SeedableRng};

#[path = "../../fuzz/harness/promtext.rs"]
mod promtext;

#[test]
fn promtext_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/promtext");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the promtext corpus is empty");
    for path in &files {
        let data = fs::read(path).unwrap();
        let ok = std::panic::catch_unwind(|| promtext::run(&data));
        assert!(ok.is_ok(), "promtext: {} fails", path.display());
    }
    let pieces: [&[u8]; 14] = [
        b"vllm:num_requests_running",
        b"vllm:num_requests_waiting",
        b"vllm:kv_cache_usage_perc",
        b"sglang:num_queue_reqs",
        b"sglang:token_usage",
        b"{a=\"",
        b"\\\"",
        b"}",
        b" ",
        b"\n",
        b"# ",
        b"1.5",
        b"NaN",
        b"-3e9",
    ];
    let mut rng = SmallRng::seed_from_u64(0x1b_c0de);
    let mut buf = Vec::new();
    for i in 0..4000 {
        buf.clear();
        let len = rng.random_range(0..=(16 << (i % 5)));
        if i % 2 == 0 {
            buf.extend((0..len).map(|_| rng.random::<u8>()));
        } else {
            for _ in 0..len / 4 {
                buf.extend_from_slice(pieces[rng.random_range(0..pieces.len())]);
            }
        }
        let ok = std::panic::catch_unwind(|| promtext::run(&buf));
        assert!(ok.is_ok(), "promtext: random input {i} fails: {buf:?}");
    }
}
