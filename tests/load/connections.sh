#!/usr/bin/env bash
# Many client connections at once: each BIN holds CONNS keep-alive client connections
# (default 10,000), ACTIVE of them busy (default 1,000) while the rest stay idle, in front
# of three mock backends; prints tests/load/connections.py's JSON line per BIN: requests
# answered, failures, RSS with every connection idle, and peak RSS (KiB).
#   tests/load/connections.sh [CONNS [ACTIVE]] -- BIN...
# Needs target/release/mock-backend (cargo build --release -p lb-tests) and an open-files
# hard limit above CONNS + ACTIVE + 100 (the script raises the soft limit to it; lb runs with
# --max-client-conns CONNS, as its default is half the limit). The hyper floor opens a
# backend connection per client connection: it needs twice that.
set -euo pipefail
CONNS=10000; ACTIVE=1000
if [ "${1:-}" != "--" ]; then CONNS=$1; shift; fi
if [ "${1:-}" != "--" ]; then ACTIVE=$1; shift; fi
[ "${1:-}" = "--" ] && [ $# -ge 2 ] || { sed -n 2,8p "$0" >&2; exit 2; }
shift
. "$(dirname "$0")/lib.sh"
need_mock
ulimit -n "$(ulimit -Hn)"
for port in 18310 18311 18312; do
  "$MOCK" --port "$port" >/dev/null 2>&1 &
  PIDS+=($!)
done
PORT=19310
for bin in "$@"; do
  "$bin" --backends http://127.0.0.1:18310 http://127.0.0.1:18311 http://127.0.0.1:18312 \
    --port "$PORT" --admin-bind off --health-check-interval 5s --max-client-conns "$CONNS" >/dev/null 2>&1 &
  p=$!
  PIDS+=("$p")
  for _ in $(seq 150); do
    [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/" 2>/dev/null)" = 200 ] && break
    sleep 0.2
  done
  echo "$bin: $(timeout 300 python3 "$(dirname "$0")/connections.py" --port "$PORT" --pid "$p" \
    --conns "$CONNS" --active "$ACTIVE")"
  kill "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
done
