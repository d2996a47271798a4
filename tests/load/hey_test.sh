#!/usr/bin/env bash
# Bounded load with hey against a running lb (loopback only).
#   tests/load/hey_test.sh [URL] [REQUESTS] [CONCURRENCY]
# Defaults: http://127.0.0.1:8080/v1/completions, 2000 requests, 100 concurrent; each
# request is a small OpenAI completion POST. Needs hey (apt-get install -y hey).
set -euo pipefail
URL=${1:-http://127.0.0.1:8080/v1/completions}
N=${2:-2000}
C=${3:-100}
case $URL in http://127.*|http://localhost*|http://\[::1\]*) ;; *) echo "loopback URLs only" >&2; exit 2;; esac
command -v hey >/dev/null || { echo "hey not found: apt-get install -y hey" >&2; exit 2; }
exec timeout 300 hey -n "$N" -c "$C" -t 60 -m POST -T application/json \
  -d '{"model":"mock","prompt":"hello","max_tokens":8}' "$URL"
