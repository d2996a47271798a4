#!/usr/bin/env bash
# The whole test suite: core unit/property/statistical/golden tests and fuzz-corpus replay,
# CLI and adapter unit tests, then the black-box suite against every build of lb.
#   tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/bin
builds=()
echo "== building lb (tokio)"
cargo build --release -p lb-cli
cp target/release/lb target/bin/lb-tokio
builds+=(tokio)
if grep -q 'pub fn run' adapters/smol/src/lib.rs 2>/dev/null; then
  echo "== building lb (smol)"
  cargo build --release -p lb-cli --no-default-features --features smol
  cp target/release/lb target/bin/lb-smol
  builds+=(smol)
fi
echo "== unit, property and corpus-replay tests"
cargo test --workspace --exclude lb-tests
for b in "${builds[@]}"; do
  echo "== black-box suite against the $b build"
  LB_BIN="$PWD/target/bin/lb-$b" cargo test -p lb-tests
done
