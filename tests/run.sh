#!/usr/bin/env bash
# The whole test suite: core unit/property/statistical/golden tests and fuzz-corpus replay,
# adapter and CLI unit tests, then the black-box suite against both builds of lb.
#   tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/bin
# Both builds produce target/release/lb: smol first, tokio last, so the default build is
# what target/release/lb holds afterwards. Each is copied to target/bin/lb-<runtime>.
echo "== building lb (smol)"
cargo build --release -p lb-cli --no-default-features --features smol
cp target/release/lb target/bin/lb-smol
echo "== building lb (tokio)"
cargo build --release -p lb-cli
cp target/release/lb target/bin/lb-tokio
echo "== unit, property and corpus-replay tests"
cargo test --workspace --exclude lb-tests
for b in tokio smol; do
  echo "== black-box suite against the $b build"
  LB_BIN="$PWD/target/bin/lb-$b" cargo test -p lb-tests
done
