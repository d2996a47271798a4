#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time.
#
#   .ci/fuzz.sh [SECONDS_PER_TARGET]      (default 60)
#
# Needs a nightly toolchain (cargo-fuzz is installed if missing); without one it says so
# and exits 0. Each target starts from its seed corpus fuzz/corpus/<target>/ and writes
# what it finds to a scratch directory, so the checked-in corpus does not grow; with
# FUZZ_UPDATE_CORPUS=1 the inputs that add coverage are merged back into it.
# Debug assertions are on (the core's lease drop-bomb and underflow checks); no sanitizer
# is needed, the core is safe Rust. Crashes are kept in fuzz/artifacts/<target>/ and make
# the script fail. Stable CI replays the corpora with `cargo test` (lb-core, lb-http1 and
# lb-smol each have a tests/fuzz_corpus.rs).
#
# The fuzz crate builds from its committed lock, fuzz/Cargo.lock, and leaves it as it is:
# cargo-fuzz has no --locked (rust-fuzz/cargo-fuzz#312) and cargo no setting for it
# (rust-lang/cargo#8207), so `cargo fetch --locked` runs first. It fails when the lock
# does not satisfy the manifests (update it with `cargo +nightly update` in fuzz/ and commit
# it); when it passes, the builds below resolve to exactly that lock.
set -euo pipefail

secs="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! command -v rustup >/dev/null 2>&1 || ! rustup run nightly cargo --version >/dev/null 2>&1; then
    echo "skipping fuzzing: no nightly toolchain"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

flags=(--sanitizer none --debug-assertions)
targets=$(cargo +nightly fuzz list)
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cp Cargo.lock "$scratch/Cargo.lock"
cargo +nightly fetch --locked
cargo +nightly fuzz build "${flags[@]}"
if ! cmp -s Cargo.lock "$scratch/Cargo.lock"; then
    diff -u "$scratch/Cargo.lock" Cargo.lock || true
    echo "the fuzz build changed fuzz/Cargo.lock"
    exit 1
fi

failed=()
for t in $targets; do
    mkdir -p "corpus/$t" "$scratch/$t"
    echo "== fuzzing $t for ${secs}s"
    if ! cargo +nightly fuzz run "${flags[@]}" "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
        failed+=("$t")
        continue
    fi
    if [ "${FUZZ_UPDATE_CORPUS:-0}" = 1 ]; then
        cargo +nightly fuzz run "${flags[@]}" "$t" "corpus/$t" "$scratch/$t" -- -merge=1
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found failures in: ${failed[*]} (see fuzz/artifacts/)"
    exit 1
fi
echo "fuzzing: all targets ran ${secs}s without a failure"
