#!/usr/bin/env bash
# End-to-end benchmark: lb in front of 4 mock inference engines, per routing policy, with 1
# and 3 lb replicas, on loopback. A benchmark, not a test (not in tests/run.sh).
#   tests/load/llm_bench.sh [LB_BINARY]        (default target/bin/lb-tokio)
#   QUICK=1 tests/load/llm_bench.sh            (about 1 minute: 4 s windows, cold, noisy;
#                                               a smoke run, not figures to quote)
# Engines: 4 x `mock-backend --engine --slots 16 --kv-blocks 3000 --speed 4` (a 7-8 B model
# on one GPU each, see tests/src/bin/mock-backend.rs; 3000 blocks = 48 k tokens of KV cache,
# less than the 56 k tokens of all the system prompts: an engine cannot hold them all).
# --speed X divides every modelled time by X: the run is X times shorter than the fleet it
# models, and the client multiplies what it measures back by X, so the table is in the
# modelled engines' time (ms, requests per modelled second). lb's --load-interval is
# divided by X too (500ms / X: as fresh, relative to the engines, as the default is).
# lb: one process, or 3 with identical flags, each --routing P --max-conns 64 (cache-aware
# needs a cap; every policy gets the same one) --admin-bind off; the engine signals are
# lb's default (--load-signal auto) except in the `least-conn, signals off` row.
# Client: target/release/llm-bench (tests/src/bin/llm-bench.rs documents the workload):
# multi-turn chat sessions arriving as a Poisson process, sharing 32 system prompts of 4 to
# 10 KiB (Zipf popularity), 2 to 8 turns, 5 s mean think time, streamed answers of 16 to 64
# tokens; requests spread round robin over the lb replicas; same seed for every cell.
# Every cell starts fresh engines (cold caches) and fresh lbs; the first $WARMUP s are not
# measured. Prints a markdown table (also in target/llm_bench/table.md; logs beside it).
# A full run takes about 6 minutes (12 cells of ~31 s). Knobs (environment): SPEED (4), RATE
# (new sessions per modelled second, 4: ~19 requests/s, ~75 through lb per wall second),
# KV_BLOCKS (3000), DURATION (wall s of arrivals, 30; QUICK 4), WARMUP (wall s, 8; QUICK 1),
# SEED (1), LOAD_INTERVAL_MS (500 / SPEED), POLICIES (a space-separated subset of the rows'
# keys: lc lc-off p2c ca ch ph ph4), REPLICAS ("1 3", each 1 to 8).
# Needs: cargo build --release -p lb-tests (mock-backend, llm-bench), curl, python3.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
LB=${1:-$ROOT/target/bin/lb-tokio}
[ -x "$LB" ] || { echo "llm_bench: lb binary $LB not found (cargo build --release -p lb-cli; cp target/release/lb target/bin/lb-tokio)" >&2; exit 2; }
need_mock
CLIENT=$ROOT/target/release/llm-bench
[ -x "$CLIENT" ] || { echo "llm_bench: $CLIENT not found: cargo build --release -p lb-tests" >&2; exit 2; }
for t in curl python3; do command -v $t >/dev/null || { echo "llm_bench: $t not found" >&2; exit 2; }; done

if [ "${QUICK:-0}" = 1 ]; then
  DURATION=${DURATION:-4}; WARMUP=${WARMUP:-1}
else
  DURATION=${DURATION:-30}; WARMUP=${WARMUP:-8}
fi
SPEED=${SPEED:-4}; RATE=${RATE:-4}; SEED=${SEED:-1}; KV_BLOCKS=${KV_BLOCKS:-3000}
POLICIES=${POLICIES:-lc lc-off p2c ca ch ph ph4}
REPLICAS=${REPLICAS:-1 3}
DRAIN=20
ENGINES=4
LOAD_INTERVAL_MS=${LOAD_INTERVAL_MS:-$(python3 -c "print(max(50, round(500 / float('$SPEED'))))")}
OUT=$ROOT/target/llm_bench
rm -rf "$OUT" && mkdir -p "$OUT"

die() { echo "llm_bench: FAIL: $*" >&2; exit 1; }

# Kills the processes of one cell (by the ids this script recorded) and forgets them.
stop_cell() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}

# Starts the engines; sets ENGINE_ADDRS.
start_engines() {
  ENGINE_ADDRS=()
  for i in $(seq 0 $((ENGINES - 1))); do
    rm -f "$OUT/engine$i.out"
    "$MOCK" --engine --port 0 --slots 16 --kv-blocks "$KV_BLOCKS" --speed "$SPEED" \
      >"$OUT/engine$i.out" 2>"$OUT/engine$i.err" &
    PIDS+=($!)
    local addr=""
    for _ in $(seq 100); do
      addr=$(sed -n 's/^listening on //p' "$OUT/engine$i.out" 2>/dev/null || true)
      [ -n "$addr" ] && break
      sleep 0.05
    done
    [ -n "$addr" ] || die "engine $i did not come up within 5 s: $(tail -n 3 "$OUT/engine$i.err")"
    curl -sf -m 2 -o /dev/null "http://$addr/metrics" || die "engine $i ($addr) does not answer /metrics"
    ENGINE_ADDRS+=("$addr")
  done
}

# Free loopback ports (released at once; a collision shows as an lb that does not come up).
free_ports() {
  python3 -c '
import socket, sys
ss = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))' "$1"
}

# start_lbs NAME R FLAGS...: R lb processes; sets LB_ADDRS; waits until each sees every
# engine healthy.
start_lbs() {
  local name=$1 r=$2; shift 2
  local backends=() ports
  for a in "${ENGINE_ADDRS[@]}"; do backends+=("http://$a"); done
  read -r -a ports <<< "$(free_ports "$r")"
  LB_ADDRS=()
  for i in $(seq 0 $((r - 1))); do
    local log=$OUT/lb-$name-r$r-$i.log
    "$LB" --backends "${backends[@]}" --bind 127.0.0.1 --port "${ports[$i]}" \
      --max-conns 64 --admin-bind off --health-check-interval 5s \
      --load-interval "${LOAD_INTERVAL_MS}ms" "$@" >"$log" 2>&1 &
    PIDS+=($!)
    local pid=$! ok=""
    for _ in $(seq 100); do
      if curl -sf -m 1 "http://127.0.0.1:${ports[$i]}/health" 2>/dev/null | grep -q "\"healthy_backends\":$ENGINES,"; then
        ok=1; break
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if [ -z "$ok" ]; then
      kill -0 "$pid" 2>/dev/null || die "lb ($name, replica $i) exited at start: $(tail -n 3 "$log")"
      die "lb ($name, replica $i, port ${ports[$i]}) did not see $ENGINES healthy engines within 10 s: $(tail -n 3 "$log")"
    fi
    LB_ADDRS+=("127.0.0.1:${ports[$i]}")
  done
}

row_name() {
  case $1 in
    lc) echo "least-conn" ;;
    lc-off) echo "least-conn, signals off" ;;
    p2c) echo "p2c" ;;
    ca) echo "cache-aware" ;;
    ch) echo "consistent-hash (user)" ;;
    ph) echo "prefix-hash" ;;
    ph4) echo "prefix-hash, --prefix-units 4" ;;
    *) echo "llm_bench: unknown policy key '$1' in POLICIES (lc lc-off p2c ca ch ph ph4)" >&2; exit 2 ;;
  esac
}
row_flags() {
  case $1 in
    lc) echo "--routing least-conn" ;;
    lc-off) echo "--routing least-conn --load-signal off" ;;
    p2c) echo "--routing p2c" ;;
    ca) echo "--routing cache-aware" ;;
    ch) echo "--routing consistent-hash --hash-key user" ;;
    ph) echo "--routing prefix-hash" ;;
    ph4) echo "--routing prefix-hash --prefix-units 4" ;;
  esac
}
for p in $POLICIES; do row_name "$p" >/dev/null; done
for r in $REPLICAS; do [[ $r =~ ^[1-8]$ ]] || { echo "llm_bench: REPLICAS: 1 to 8 each, not '$r'" >&2; exit 2; }; done

{
  echo "lb: $LB ($("$LB" --version 2>/dev/null || echo '?'))"
  echo "engines: $ENGINES x mock-backend --engine --slots 16 --kv-blocks "$KV_BLOCKS" --speed $SPEED;" \
    "lb --max-conns 64 --load-interval ${LOAD_INTERVAL_MS}ms; sessions: $RATE/s (modelled)," \
    "arrivals for ${DURATION}s wall, measured after ${WARMUP}s, seed $SEED;" \
    "$(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "times in the modelled engines' time (wall x $SPEED)"
  echo
  echo "| policy | lb replicas | req/s | TTFT p50 (ms) | TTFT p99 (ms) | e2e p99 (ms) | prefix-cache hit rate | errors |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
} | tee "$OUT/table.md"

for r in $REPLICAS; do
  for p in $POLICIES; do
    name=$(row_name "$p")
    start_engines
    # shellcheck disable=SC2046
    start_lbs "$p" "$r" $(row_flags "$p")
    lbargs=(); for a in "${LB_ADDRS[@]}"; do lbargs+=(--lb "$a"); done
    engargs=(); for a in "${ENGINE_ADDRS[@]}"; do engargs+=(--engine "$a"); done
    set +e
    timeout $((DURATION + DRAIN + 30)) "$CLIENT" "${lbargs[@]}" "${engargs[@]}" --label "$name" \
      --speed "$SPEED" --duration "$DURATION" --warmup "$WARMUP" --drain "$DRAIN" \
      --session-rate "$RATE" --seed "$SEED" >"$OUT/row" 2>"$OUT/client-$p-r$r.log"
    st=$?
    set -e
    for i in "${!LB_ADDRS[@]}"; do
      grep -q 'panicked' "$OUT/lb-$p-r$r-$i.log" && die "lb ($name, replica $i) panicked: see $OUT/lb-$p-r$r-$i.log"
    done
    stop_cell
    [ "$st" = 0 ] || die "client failed for $name x$r (exit $st): $(tail -n 3 "$OUT/client-$p-r$r.log")"
    tee -a "$OUT/table.md" < "$OUT/row"
    sed 's/^/    /' "$OUT/client-$p-r$r.log" >&2
  done
done
