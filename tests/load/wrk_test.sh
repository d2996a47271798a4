#!/usr/bin/env bash
# Bounded throughput test with wrk against a running lb (loopback only).
#   tests/load/wrk_test.sh [URL] [DURATION_S] [CONNECTIONS] [THREADS]
# Defaults: http://127.0.0.1:8080/ for 10 s with 64 connections on 2 threads, with the
# latency distribution. Needs wrk (apt-get install -y wrk).
set -euo pipefail
URL=${1:-http://127.0.0.1:8080/}
D=${2:-10}
C=${3:-64}
T=${4:-2}
case $URL in http://127.*|http://localhost*|http://\[::1\]*) ;; *) echo "loopback URLs only" >&2; exit 2;; esac
[ "$D" -le 600 ] || { echo "at most 600 s" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 2; }
exec timeout $((D + 30)) wrk -t"$T" -c"$C" -d"${D}s" --latency "$URL"
