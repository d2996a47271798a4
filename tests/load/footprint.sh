#!/usr/bin/env bash
# Footprint of lb binaries: stripped size, and resident memory when idle (one backend, a
# real mock-backend on 127.0.0.1:18200, read 2.5 s after start), over RUNS fresh starts.
#   tests/load/footprint.sh RUNS BIN...
# Prints per binary: stripped MiB, then VmRSS (total and anonymous) per run and the median,
# and the thread count. Needs target/release/mock-backend (cargo build --release -p lb-tests).
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,6p "$0" >&2; exit 2; }
RUNS=$1; shift
[ "$RUNS" -ge 1 ] && [ "$RUNS" -le 20 ] || { echo "RUNS: 1 to 20" >&2; exit 2; }
. "$(dirname "$0")/lib.sh"
need_mock
"$MOCK" --port 18200 >/dev/null 2>&1 &
PIDS+=($!)
TMP=$(mktemp -d)
kib() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$2/status"; }
for bin in "$@"; do
  cp "$bin" "$TMP/lb" && strip "$TMP/lb"
  size=$(stat -c %s "$TMP/lb")
  rss=()
  for _ in $(seq "$RUNS"); do
    "$bin" --backends http://127.0.0.1:18200 --port 19200 >/dev/null 2>&1 &
    p=$!
    sleep 2.5
    rss+=("$(kib VmRSS $p)")
    echo "  $bin: VmRSS $(kib VmRSS $p) KiB, RssAnon $(kib RssAnon $p) KiB, threads $(kib Threads $p)"
    kill "$p"
    wait "$p" 2>/dev/null || true
  done
  median=$(printf '%s\n' "${rss[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  awk -v b="$bin" -v s="$size" -v m="$median" \
    'BEGIN { printf "%s: stripped %.2f MiB, idle VmRSS median %.2f MiB\n", b, s / 1048576, m / 1024 }'
done
rm -rf "$TMP"
