#!/usr/bin/env bash
# CPU time per request of balancers under the same wrk load, alternating, on loopback.
#   tests/load/cpu_per_request.sh ROUNDS CONNS CMD...
# Each CMD is a balancer started as
# `CMD --backends URL URL URL --port 19000 --health-check-interval 5s` (e.g.
# target/bin/lb-tokio); the word `haproxy` stands for HAProxy set up as in
# ../shared/bench/compare.sh (leastconn, http-reuse always, 2 threads). The backends are
# three nginx `return 200` server blocks on 18000-18002, as compare.sh's fast pool.
# Per run: 1 s warm-up, then wrk -t1 -cCONNS for 4 s; prints req/s, p99, and the
# balancer's user and system CPU per request (from /proc, all threads) with its
# voluntary/involuntary context switches per request. Rounds alternate the commands,
# so a phase of this shared machine hits them all. Needs wrk, nginx (and haproxy).
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,13p "$0" >&2; exit 2; }
ROUNDS=$1; CONNS=$2; shift 2
[ "$ROUNDS" -le 20 ] && [ "$CONNS" -le 4096 ] || { echo "at most 20 rounds, 4096 connections" >&2; exit 2; }
for t in wrk nginx curl python3; do command -v $t >/dev/null || { echo "$t not found" >&2; exit 2; }; done
DIR=$(mktemp -d /tmp/lb-cpu.XXXXXX)
. "$(dirname "$0")/lib.sh"

mkdir -p "$DIR/tmp"
{
  echo "worker_processes 1; daemon off; master_process on; pid $DIR/nginx.pid;"
  echo "error_log $DIR/error.log warn; events { worker_connections 8192; }"
  echo "http { access_log off; keepalive_requests 1000000; keepalive_timeout 75s;"
  echo "  client_body_temp_path $DIR/tmp; proxy_temp_path $DIR/tmp; fastcgi_temp_path $DIR/tmp;"
  echo "  uwsgi_temp_path $DIR/tmp; scgi_temp_path $DIR/tmp; default_type application/json;"
  for p in 18000 18001 18002; do
    echo "  server { listen 127.0.0.1:$p backlog=4096; location / { return 200 '{\"ok\":true,\"backend_port\":$p}'; } }"
  done
  echo "}"
} > "$DIR/nginx.conf"
nginx -e "$DIR/error.log" -p "$DIR" -c "$DIR/nginx.conf" >/dev/null 2>&1 &
PIDS+=($!)
cat > "$DIR/haproxy.cfg" <<EOF
global
  maxconn 9900
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 75s
  http-reuse always
  option http-no-delay
frontend fe
  bind 127.0.0.1:19000
  default_backend pool
backend pool
  balance leastconn
  server b0 127.0.0.1:18000
  server b1 127.0.0.1:18001
  server b2 127.0.0.1:18002
EOF
sleep 0.5

TCK=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15, $14, $15}' "/proc/$1/stat"; }
switches() {
  cat /proc/"$1"/task/*/status 2>/dev/null |
    awk '/^voluntary_ctxt/{v+=$2} /^nonvoluntary_ctxt/{n+=$2} END{print v+0, n+0}'
}
per_req() { python3 -c "print(f'{($2 - $1) / $3 * $4:.2f}')" "$@"; }

for r in $(seq "$ROUNDS"); do
  for cmd in "$@"; do
    if [ "$cmd" = haproxy ]; then
      haproxy -db -f "$DIR/haproxy.cfg" >/dev/null 2>&1 &
    else
      $cmd --backends http://127.0.0.1:18000 http://127.0.0.1:18001 http://127.0.0.1:18002 \
        --port 19000 --health-check-interval 5s >/dev/null 2>&1 &
    fi
    P=$!
    PIDS+=("$P")
    for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:19000/ && break; sleep 0.1; done
    timeout 10 wrk -t1 -c"$CONNS" -d1s http://127.0.0.1:19000/ >/dev/null
    read -r _ u0 s0 < <(cpu "$P"); read -r v0 n0 < <(switches "$P")
    out=$(timeout 20 wrk --latency -t1 -c"$CONNS" -d4s http://127.0.0.1:19000/)
    read -r _ u1 s1 < <(cpu "$P"); read -r v1 n1 < <(switches "$P")
    kill "$P"; wait "$P" 2>/dev/null || true
    n=$(awk '/requests in/{print $1}' <<< "$out")
    echo "round=$r cmd=$(basename "${cmd%% *}") conns=$CONNS" \
      "req/s=$(awk '/Requests\/sec/{print $2}' <<< "$out") p99=$(awk '/ 99%/{print $2}' <<< "$out")" \
      "usr_us=$(per_req "$u0" "$u1" "$n" "1e6/$TCK") sys_us=$(per_req "$s0" "$s1" "$n" "1e6/$TCK")" \
      "vcs=$(per_req "$v0" "$v1" "$n" 1) ivcs=$(per_req "$n0" "$n1" "$n" 1)"
    sleep 0.5
  done
done
