#!/usr/bin/env bash
# The whole test suite: core unit/property/statistical/golden tests and fuzz-corpus replay,
# adapter and CLI unit tests, then the black-box suite against both builds of lb, the
# https:// cases again against a smol build with TLS (tests/tests/tls.rs, dns.rs), the
# conformance suite that runs the same raw exchanges through both builds and compares them,
# and last a 2-minute soak per build (tests/soak.sh; skipped, saying why, when its Python
# packages cannot be installed).
# The black-box suite includes the fault-injection cases (tests/tests/faults), which need
# root and network namespaces, and nftables for faults on a link; they skip, saying why,
# where those are missing.
#   tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && ! command -v nft >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "== installing nftables (the fault-injection suite puts faults on links with it)"
  if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables) \
      >/dev/null 2>&1; then
    echo "   could not install nftables: the cases that need it will skip"
  fi
fi
if [ "$(id -u)" = 0 ] && ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "== installing prometheus (its promtool checks a real /metrics scrape)"
  if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1; then
    echo "   could not install prometheus: the promtool check will skip"
  fi
fi
if [ "$(id -u)" = 0 ] && ! [ -x /usr/sbin/dnsmasq ] && ! command -v dnsmasq >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  echo "== installing dnsmasq (the DNS discovery suite changes its records while lb runs)"
  if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends dnsmasq-base) >/dev/null 2>&1; then
    echo "   could not install dnsmasq: the DNS discovery cases will skip"
  fi
fi
if [ "$(id -u)" = 0 ] && ! { command -v openssl && command -v python3; } >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  echo "== installing openssl and python3 (the https:// backend cases make a CA and serve TLS)"
  if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends openssl python3) >/dev/null 2>&1; then
    echo "   could not install them: the https:// backend cases will skip"
  fi
fi
# Where promtool is here, the observability suite must use it (no silent skip).
if command -v promtool >/dev/null 2>&1; then
  export LB_REQUIRE_PROMTOOL=1
fi
mkdir -p target/bin
# Both builds produce target/release/lb: smol first, tokio last, so the default build is
# what target/release/lb holds afterwards. Each is copied to target/bin/lb-<runtime>.
echo "== building lb (smol)"
cargo build --release -p lb-cli --no-default-features --features smol
cp target/release/lb target/bin/lb-smol
echo "== building lb (smol, with TLS to backends)"
cargo build --release -p lb-cli --no-default-features --features smol,lb-smol/tls
cp target/release/lb target/bin/lb-smol-tls
echo "== building lb (tokio)"
cargo build --release -p lb-cli
cp target/release/lb target/bin/lb-tokio
echo "== unit, property and corpus-replay tests"
cargo test --workspace --exclude lb-tests
for b in tokio smol; do
  echo "== black-box suite against the $b build"
  # tests/conformance.rs needs both builds at once: it skips here and runs once below.
  env -u LB_BIN_TOKIO -u LB_BIN_SMOL LB_BIN="$PWD/target/bin/lb-$b" cargo test -p lb-tests
done
echo "== https:// and dns+https:// backends against the smol build with TLS"
env -u LB_BIN_TOKIO -u LB_BIN_SMOL LB_BIN="$PWD/target/bin/lb-smol-tls" \
  cargo test -p lb-tests --test tls --test dns
echo "== conformance: the same exchanges through both builds"
LB_BIN_TOKIO="$PWD/target/bin/lb-tokio" LB_BIN_SMOL="$PWD/target/bin/lb-smol" \
  cargo test -p lb-tests --test conformance
# The soak and the container image use the release mock backend (cargo test builds only a
# debug one).
cargo build --release -p lb-tests --bin mock-backend
echo "== container: Dockerfile, docker-compose.yml, deploy/k8s (tests/container.sh)"
# container.sh skips its container part, saying why, where podman cannot run.
LB_BIN_TOKIO="$PWD/target/bin/lb-tokio" LB_BIN_SMOL="$PWD/target/bin/lb-smol" \
  MOCK_BACKEND_BIN="$PWD/target/release/mock-backend" tests/container.sh
echo "== soak, 2 minutes per build"
SOAK_OPTIONAL=1 bash tests/soak.sh 2
