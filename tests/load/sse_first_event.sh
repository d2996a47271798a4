#!/usr/bin/env bash
# Time to the first server-sent event, direct and through balancers, alternating, loopback.
#   tests/load/sse_first_event.sh ROUNDS CMD...
# Each CMD is started fresh per round as `CMD --backends URL URL URL --port 19000` in front
# of ../shared/bench/slow_backend.py (3 ports from 18100); each measurement is
# ../shared/bench/sse_probe.py's median over 5 probes of a 3-event stream. Prints one line
# per round and candidate, `direct` first, in ms.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,7p "$0" >&2; exit 2; }
ROUNDS=$1; shift
[ "$ROUNDS" -le 20 ] || { echo "at most 20 rounds" >&2; exit 2; }
BENCH=$(cd "$(dirname "$0")/../../.." && pwd)/shared/bench
[ -f "$BENCH/sse_probe.py" ] || { echo "$BENCH/sse_probe.py not found (../shared beside the repo)" >&2; exit 2; }
. "$(dirname "$0")/lib.sh"

python3 "$BENCH/slow_backend.py" --port 18100 --port 18101 --port 18102 --delay 2 \
  --max-seconds 900 >/dev/null 2>&1 &
PIDS+=($!)
sleep 0.5
probe() {
  timeout 60 python3 "$BENCH/sse_probe.py" --port "$1" --probes 5 \
    --path '/stream?events=3&interval_ms=100' |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["first_ms"])'
}
for r in $(seq "$ROUNDS"); do
  echo "round=$r direct first_event_ms=$(probe 18100)"
  for cmd in "$@"; do
    $cmd --backends http://127.0.0.1:18100 http://127.0.0.1:18101 http://127.0.0.1:18102 \
      --port 19000 --health-check-interval 5s >/dev/null 2>&1 &
    P=$!
    PIDS+=("$P")
    for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:19000/v1/models && break; sleep 0.1; done
    echo "round=$r cmd=$(basename "${cmd%% *}") first_event_ms=$(probe 19000)"
    kill "$P"; wait "$P" 2>/dev/null || true
  done
done
