//! Replays the `proxy_path` fuzz corpus on stable: every file in
//! `fuzz/corpus/proxy_path/` goes through the harness the cargo-fuzz target runs
//! (`fuzz/harness/proxy_path.rs`: the whole request path of this build, in memory),
//! followed by seeded random inputs. (The other targets replay in `lb-core` and
//! `lb-http1`.) The harness installs this test binary's global allocator.

use std::fs;
use std::path::PathBuf;

use rand::{rngs::SmallRng, Rng, SeedableRng};

#[path = "../../../fuzz/harness/proxy_path.rs"]
mod proxy_path;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
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

#[test]
fn proxy_path_corpus() {
    let files = corpus("proxy_path");
    assert!(!files.is_empty(), "the proxy_path corpus is empty");
    for (path, data) in &files {
        let ok = std::panic::catch_unwind(|| proxy_path::run(data));
        assert!(ok.is_ok(), "proxy_path: {} fails", path.display());
    }
}

#[test]
fn proxy_path_random() {
    let mut rng = SmallRng::seed_from_u64(0x1b_c0de);
    let mut buf = Vec::new();
    for i in 0..500 {
        buf.clear();
        let len = rng.random_range(0..=(64 << (i % 5)));
        buf.extend((0..len).map(|_| rng.random::<u8>()));
        let ok = std::panic::catch_unwind(|| proxy_path::run(&buf));
        assert!(ok.is_ok(), "proxy_path: random input {i} fails: {buf:?}");
    }
}
