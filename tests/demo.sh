#!/usr/bin/env bash
# Starts three mock LLM backends and lb in front of them, prints what to try, and stops
# everything on Ctrl-C. Loopback only.
#   tests/demo.sh                 # lb on :8080, backends on :8001-8003
#   LB_PORT=9090 BACKEND_BASE=9000 tests/demo.sh
#   FEATURES=smol tests/demo.sh   # the tiny (smol) build
set -euo pipefail
cd "$(dirname "$0")/.."
LB_PORT=${LB_PORT:-8080}
BASE=${BACKEND_BASE:-8000}
if [ "${FEATURES:-tokio}" = smol ]; then
  cargo build --release -q -p lb-cli --no-default-features --features smol
else
  cargo build --release -q -p lb-cli
fi
cargo build --release -q -p lb-tests --bin mock-backend
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for i in 1 2 3; do
  # Unequal speeds, streaming 20 tokens 100 ms apart.
  target/release/mock-backend --port $((BASE + i)) --delay "$((i * 100))ms" --tokens 20 --token-interval 100ms >/dev/null &
  pids+=($!)
done
target/release/lb --backends "http://127.0.0.1:$((BASE + 1))" "http://127.0.0.1:$((BASE + 2))" "http://127.0.0.1:$((BASE + 3))" \
  --port "$LB_PORT" --bind 127.0.0.1 --health-check-interval 5s &
pids+=($!)
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$LB_PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done
cat <<MSG

lb is up on http://127.0.0.1:$LB_PORT in front of three mock backends. Try:

  curl -s http://127.0.0.1:$LB_PORT/health
  curl -s http://127.0.0.1:$LB_PORT/v1/completions -d '{"model":"m","prompt":"hello"}'
  curl -sN http://127.0.0.1:$LB_PORT/v1/chat/completions -d '{"stream":true,"messages":[{"role":"user","content":"hi"}]}'
  kill $(echo "${pids[0]}")   # kill a backend and watch lb's log mark it unhealthy

Ctrl-C stops everything.
MSG
wait "${pids[-1]}"
