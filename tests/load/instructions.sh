#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: a figure that machine noise does
# not move, for comparing builds (and the hyper_floor example) where req/s differ by a few
# percent. Each BIN runs under valgrind in front of three real mock backends; after a warm-up
# the counters are zeroed, N tiny requests go through (hey, 32 connections, keep-alive), and
# the counters are dumped: everything the process executed in between, divided by the
# requests answered 200 (hey sends N rounded down to a multiple of its 32 connections).
#   tests/load/instructions.sh N BIN...
# BIN is started as `BIN --backends URL... --port PORT` (lb, or
# target/release/examples/hyper_floor). Needs valgrind, hey and target/release/mock-backend
# (cargo build --release -p lb-tests). N from 1000 to 200000; a run takes about N/3000 s.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,11p "$0" >&2; exit 2; }
N=$1; shift
[ "$N" -ge 1000 ] && [ "$N" -le 200000 ] || { echo "N: 1000 to 200000" >&2; exit 2; }
for t in valgrind callgrind_control hey curl; do
  command -v "$t" >/dev/null || { echo "$t not found (apt-get install -y valgrind hey curl)" >&2; exit 2; }
done
. "$(dirname "$0")/lib.sh"
need_mock
for port in 18210 18211 18212; do
  "$MOCK" --port "$port" >/dev/null 2>&1 &
  PIDS+=($!)
done
TMP=$(mktemp -d)
PORT=19210
URL=http://127.0.0.1:$PORT/
up() {  # waits up to 30 s for a 200 through the proxy
  for _ in $(seq 150); do
    [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "$URL" 2>/dev/null)" = 200 ] && return 0
    sleep 0.2
  done
  return 1
}
for bin in "$@"; do
  out=$TMP/callgrind.out
  valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$bin" --backends http://127.0.0.1:18210 http://127.0.0.1:18211 http://127.0.0.1:18212 \
    --port "$PORT" >"$TMP/log" 2>&1 &
  p=$!
  PIDS+=("$p")
  up || { echo "$bin did not come up on :$PORT (log: $TMP/log)" >&2; exit 1; }
  timeout 120 hey -n 2000 -c 32 "$URL" >/dev/null || { echo "warm-up through $bin failed" >&2; exit 1; }
  callgrind_control -z "$p" >"$TMP/ctl" 2>&1 || { cat "$TMP/ctl" >&2; exit 1; }
  ok=$(timeout 600 hey -n "$N" -c 32 "$URL" | awk '/\[200\]/ { print $2 }') || true
  callgrind_control -d "$p" >"$TMP/ctl" 2>&1 || { cat "$TMP/ctl" >&2; exit 1; }
  kill -INT "$p" 2>/dev/null || true
  sleep 1
  kill "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  # Zeroing writes nothing; the dump after it is part 1 ("$out.1"), the exit's is "$out".
  [ -s "$out.1" ] || { echo "no callgrind dump from $bin ($out.1)" >&2; exit 1; }
  ir=$(awk '/^totals:/ { t = $2 } END { print t + 0 }' "$out.1")
  [ "${ok:-0}" -gt 0 ] || { echo "no request through $bin answered 200" >&2; exit 1; }
  awk -v b="$bin" -v ir="$ir" -v n="$ok" \
    'BEGIN { printf "%s: %.0f instructions per request (%d requests answered 200)\n", b, ir / n, n }'
  rm -f "$out" "$out".*
done
rm -rf "$TMP"
