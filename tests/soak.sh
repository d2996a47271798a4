#!/usr/bin/env bash
# Soak test: realistic mixed traffic through lb for MINUTES per build, with faults.
#
#   tests/soak.sh MINUTES [--build tokio|smol] [--workers N] [--seed S]
#
# Per build (tokio, then smol; or the one --build names), tests/soak/driver.py starts three
# mock inference engines (mock-backend --engine), each behind a delay relay
# (tests/soak/relay.py: the backend link), and lb in front of them (--health-check-interval
# 5s, --connect-retries 2, --admin-bind off where lb has it), all on 127.0.0.1. Twelve
# clients send a weighted mix: chat completions through the OpenAI Python SDK, streamed or
# not, some streams abandoned mid-way; streamed completions; uploads of 100 to 600 KiB
# (hash checked), some abandoned mid-body; WebSocket echo round trips, some dropped. Every
# 8 to 20 s a random backend is SIGKILLed (engine and relay) and restarted on its ports 2 to
# 5 s later, at most one down at a time; every 10 to 25 s a 100 to 500 ms delay is switched
# on the link of one or all backends for 3 to 8 s.
#
# PASS needs, at the end:
#   - no 5xx and no client error (exception, timeout, wrong answer) outside the fault
#     windows: kill -> back healthy in lb's /health, delay on -> off, each + 6 s (the health
#     interval + 1 s); a failure is inside when its start..end overlaps a window;
#   - active_conns 0 in /health within 10 s after traffic stops;
#   - fds (/proc/PID/fd) end <= start + 4, and RSS (VmRSS) end <= start x 1.5 + 8 MiB,
#     start measured after a warm-up (15% of the run, 10 to 30 s), both quiet (clients
#     closed, active_conns 0, then 5 s for lb's idle backend connections to close);
#   - every backend healthy again, no backend request left in flight, no panic, lb exits 0
#     on SIGTERM.
# It prints one summary line per build and exits 1 if any build FAILs (the reasons in the
# line; details in target/soak/BUILD/report.json, lb's output in target/soak/BUILD/lb.log).
#
# Binaries: $LB_BIN_TOKIO, $LB_BIN_SMOL and $MOCK, else target/bin/lb-tokio,
# target/bin/lb-smol and target/release/mock-backend (tests/run.sh builds them). Python:
# a venv in target/soak-venv with openai, websockets and httpx, made when missing; if they
# cannot be installed (offline), it fails, or says so and exits 0 when SOAK_OPTIONAL=1.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
usage() { echo "usage: tests/soak.sh MINUTES [--build tokio|smol] [--workers N] [--seed S]" >&2; exit 2; }

[ $# -ge 1 ] || usage
MINUTES=$1; shift
[[ "$MINUTES" =~ ^[0-9]+([.][0-9]+)?$ ]] && awk -v m="$MINUTES" 'BEGIN { exit !(m >= 0.5 && m <= 1440) }' \
  || { echo "tests/soak.sh: MINUTES must be a number from 0.5 to 1440, not '$MINUTES'" >&2; exit 2; }
BUILDS=(tokio smol)
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --build) [ $# -ge 2 ] && [[ $2 == tokio || $2 == smol ]] || usage; BUILDS=("$2"); shift 2 ;;
    --workers|--seed) [ $# -ge 2 ] && [[ $2 =~ ^[0-9]+$ ]] || usage; EXTRA+=("$1" "$2"); shift 2 ;;
    *) usage ;;
  esac
done

skip_or_fail() {
  if [ "${SOAK_OPTIONAL:-0}" = 1 ]; then
    echo "soak: SKIPPED: $1"
    exit 0
  fi
  echo "soak: FAIL: $1 (SOAK_OPTIONAL=1 makes this a skip)" >&2
  exit 1
}

# Python and its packages.
VENV=$ROOT/target/soak-venv
PY=$VENV/bin/python
have_deps() { [ -x "$PY" ] && "$PY" -c 'import openai, websockets, httpx' >/dev/null 2>&1; }
if ! have_deps; then
  command -v python3 >/dev/null 2>&1 || skip_or_fail "python3 not found"
  echo "== soak: installing openai, websockets, httpx into $VENV"
  mkdir -p "$ROOT/target"
  if ! { [ -x "$PY" ] || python3 -m venv "$VENV"; } >"$ROOT/target/soak-venv.log" 2>&1 \
      || ! "$PY" -m pip install -q --disable-pip-version-check openai websockets httpx \
        >>"$ROOT/target/soak-venv.log" 2>&1 \
      || ! have_deps; then
    tail -n 5 "$ROOT/target/soak-venv.log" >&2 || true
    skip_or_fail "could not install the Python packages openai, websockets, httpx into $VENV (offline?)"
  fi
fi

MOCK=${MOCK:-$ROOT/target/release/mock-backend}
[ -x "$MOCK" ] || { echo "soak: $MOCK not found: cargo build --release -p lb-tests --bin mock-backend" >&2; exit 2; }

rc=0
SUMMARY=()
for b in "${BUILDS[@]}"; do
  if [ "$b" = tokio ]; then LB=${LB_BIN_TOKIO:-$ROOT/target/bin/lb-tokio}; else LB=${LB_BIN_SMOL:-$ROOT/target/bin/lb-smol}; fi
  [ -x "$LB" ] || { echo "soak: $LB not found: tests/run.sh builds it (or set LB_BIN_${b^^})" >&2; exit 2; }
  OUT=$ROOT/target/soak/$b
  rm -rf "$OUT" && mkdir -p "$OUT"
  echo "== soak $b: $MINUTES min ($LB)"
  set +e
  "$PY" "$ROOT/tests/soak/driver.py" --build "$b" --lb "$LB" --mock "$MOCK" --minutes "$MINUTES" \
    --out "$OUT" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$OUT/driver.log"
  st=${PIPESTATUS[0]}
  set -e
  SUMMARY+=("$(grep "^soak $b: " "$OUT/driver.log" | tail -n 1 || echo "soak $b: no summary line: FAIL")")
  if [ "$st" != 0 ]; then
    rc=1
    echo "-- last lines of $OUT/lb.log:"
    tail -n 15 "$OUT/lb.log" || true
  fi
done
if [ ${#BUILDS[@]} -gt 1 ]; then
  echo "== soak summary"
  printf '%s\n' "${SUMMARY[@]}"
fi
exit $rc
