#!/usr/bin/env bash
# The container and Kubernetes files, checked for real. Run by tests/run.sh at its end.
#
#   tests/container.sh
#
# 1. Manifests (tests/container_manifests.py, needs python3 with PyYAML): parses
#    docker-compose.yml and every YAML file in deploy/k8s, runs `lb --check` on lb's
#    arguments from the compose `command:` and the Deployment's `args:`, and checks the
#    fields the deployment relies on (replicas, probes, preStop sleep, grace period,
#    non-root, read-only root, PDB and Service selectors).
# 2. Containers (podman; this needs no Docker daemon and no registry): builds a local
#    stand-in for the Dockerfile's runtime base image (a rootfs of the host-built binaries'
#    shared libraries and bash, for the HEALTHCHECK) under the exact name the Dockerfile
#    uses, builds the Dockerfile's `prebuilt` (per build: tokio, smol) and `mock-prebuilt`
#    stages from the host's binaries, runs three mocks and lb as containers (host network,
#    loopback addresses, free ports, read-only, no capabilities) and checks /live, /health
#    (3 healthy backends), /metrics (lb_build_info), a streamed chat completion through lb
#    (SSE ending in `data: [DONE]`), the image's HEALTHCHECK, that lb runs as uid 65532, and
#    a graceful stop on SIGTERM. Every container, image and the podman store it used are
#    removed at the end.
#
# Each part skips with one line saying why when what it needs is missing here (python3 with
# PyYAML; podman, or podman unable to run a container); it never fails for a missing tool.
# As root with apt-get, it installs python3-yaml and podman + runc when they are missing.
# Binaries: target/bin/lb-tokio, target/bin/lb-smol, target/release/mock-backend (what
# tests/run.sh builds), or $LB_BIN_TOKIO, $LB_BIN_SMOL, $MOCK_BACKEND_BIN. The base rootfs is
# cached in target/container-cache/ ($LB_CONTAINER_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LB_TOKIO=${LB_BIN_TOKIO:-$ROOT/target/bin/lb-tokio}
LB_SMOL=${LB_BIN_SMOL:-$ROOT/target/bin/lb-smol}
MOCK=${MOCK_BACKEND_BIN:-$ROOT/target/release/mock-backend}
CACHE=${LB_CONTAINER_CACHE:-$ROOT/target/container-cache}
T0=$SECONDS

say() { echo "   $*"; }
die() { echo "container: FAIL: $*" >&2; exit 1; }
am_root() { [ "$(id -u)" = 0 ]; }
apt_install() { # apt_install PKG...: quietly, bounded; status only
  am_root && command -v apt-get >/dev/null 2>&1 || return 1
  timeout 600 bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$@"' _ "$@" >/dev/null 2>&1
}

for bin in "$LB_TOKIO" "$MOCK"; do
  [ -x "$bin" ] || die "$bin not found: run tests/run.sh (it builds it) or set LB_BIN_TOKIO / MOCK_BACKEND_BIN"
done

# --- 1. manifests -----------------------------------------------------------------------
echo "== container: manifests (docker-compose.yml, deploy/k8s) with lb --check"
PY=
find_py() {
  for p in python3 /usr/bin/python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import yaml' >/dev/null 2>&1; then
      PY=$p; return 0
    fi
  done
  return 1
}
if ! find_py; then
  say "installing python3-yaml"
  apt_install python3 python3-yaml || true
  find_py || true
fi
if [ -z "$PY" ]; then
  echo "== container: manifest checks SKIPPED: no python3 with PyYAML here (and it could not be installed)"
else
  if ! out=$("$PY" tests/container_manifests.py "$ROOT" "$LB_TOKIO" 2>&1); then
    echo "$out" | sed 's/^/   /'
    die "manifest checks failed (FAIL lines above)"
  fi
  say "$(echo "$out" | grep -c '^ok') checks passed"
fi

# --- 2. containers ----------------------------------------------------------------------
echo "== container: the image from the Dockerfile, run with podman"
skip() { echo "== container: container run SKIPPED: $*"; exit 0; }
if ! command -v podman >/dev/null 2>&1; then
  say "installing podman and runc"
  apt_install podman runc || true
fi
command -v podman >/dev/null 2>&1 || skip "podman is not installed (and could not be installed here)"
command -v curl >/dev/null 2>&1 || skip "curl is not installed"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/lb-container.XXXXXX")
# A podman store of its own for this run: nothing of the user's images is touched, and all
# of it goes at the end. vfs needs no overlay mounts, so it works inside containers and VMs.
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
PODMAN=(podman --root "$WORK/storage" --runroot "$WORK/run" --tmpdir "$WORK/libpod"
        --storage-driver vfs --cgroup-manager cgroupfs)
command -v runc >/dev/null 2>&1 && PODMAN+=(--runtime runc)
pm() { timeout "${PM_TIMEOUT:-60}" "${PODMAN[@]}" "$@"; }
TAG=lb-container-test-$$
CONTAINERS=()
cleanup() {
  set +e
  for c in "${CONTAINERS[@]}"; do pm rm -f -t 2 "$c" >/dev/null 2>&1; done
  pm rmi -f -a >/dev/null 2>&1   # only this run's store: the images it built or imported
  if am_root; then rm -rf "$WORK"; else pm unshare rm -rf "$WORK/storage" 2>/dev/null; rm -rf "$WORK"; fi
}
trap cleanup EXIT

# The stand-in for the runtime base image: the shared libraries of the host-built binaries
# (ldd), bash and its libraries (the HEALTHCHECK), in Debian 12's merged-/usr layout.
BASE_NAME=$(sed -n 's/^FROM[[:space:]]\{1,\}\([^[:space:]]*\)[[:space:]]\{1,\}AS[[:space:]]\{1,\}runtime-base.*/\1/Ip' Dockerfile)
[ -n "$BASE_NAME" ] || die "Dockerfile: no 'FROM <image> AS runtime-base' line"
case "$BASE_NAME" in # podman's fully qualified form of the name, as FROM resolves it
  */*/*|localhost/*) BASE_REF=$BASE_NAME ;;
  */*) first=${BASE_NAME%%/*}
       case "$first" in *.*|*:*) BASE_REF=$BASE_NAME ;; *) BASE_REF=docker.io/$BASE_NAME ;; esac ;;
  *) BASE_REF=docker.io/library/$BASE_NAME ;;
esac
BASH_BIN=$(readlink -f "$(command -v bash)")
BINS=("$LB_TOKIO" "$MOCK" "$BASH_BIN")
[ -x "$LB_SMOL" ] && BINS+=("$LB_SMOL")
FILES=()
for b in "${BINS[@]}"; do
  while read -r lib; do FILES+=("$lib"); done < <(ldd "$b" 2>/dev/null | grep -o '/[^ ]*' || true)
done
mapfile -t FILES < <(printf '%s\n' "${FILES[@]}" | sort -u)
mkdir -p "$CACHE"
KEY=$( { echo "$BASE_REF"; for f in "${FILES[@]}" "$BASH_BIN"; do echo "$f"; sha256sum <"$f"; done; } | sha256sum | cut -c1-16)
BASE_TAR=$CACHE/base-rootfs-$KEY.tar
if [ ! -s "$BASE_TAR" ]; then
  say "building the base rootfs ($BASE_NAME stand-in) into $BASE_TAR"
  rm -f "$CACHE"/base-rootfs-*.tar
  R=$WORK/rootfs
  mkdir -p "$R"/usr/bin "$R"/usr/lib "$R"/usr/lib64 "$R"/usr/sbin "$R"/usr/local/bin "$R"/etc "$R"/tmp "$R"/root
  ln -s usr/bin "$R/bin"; ln -s usr/lib "$R/lib"; ln -s usr/lib64 "$R/lib64"; ln -s usr/sbin "$R/sbin"
  chmod 1777 "$R/tmp"
  for f in "${FILES[@]}" "$BASH_BIN"; do # /lib/x.so -> usr/lib/x.so (the /lib link finds it)
    rel=${f#/}; rel=${rel#usr/}
    mkdir -p "$(dirname "$R/usr/$rel")"; cp -L "$f" "$R/usr/$rel"
  done
  [ -e "$R/usr/bin/bash" ] || cp -L "$BASH_BIN" "$R/usr/bin/bash"
  echo 'root:x:0:0:root:/root:/bin/bash' >"$R/etc/passwd"
  echo 'root:x:0:' >"$R/etc/group"
  [ -r /etc/os-release ] && cp -L /etc/os-release "$R/etc/os-release"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$R" -cf "$BASE_TAR.part" .
  mv "$BASE_TAR.part" "$BASE_TAR"
fi

# Can podman run a container here at all? Anything failing up to here is a skip.
last_line() { # the last non-empty line of $2, else "exit status $1"
  local l; l=$(grep -v '^[[:space:]]*$' <<<"$2" | tail -1)
  echo "${l:-exit status $1}"
}
rc=0; err=$(pm import --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$BASE_TAR" "$BASE_REF" 2>&1 >/dev/null) || rc=$?
[ "$rc" = 0 ] || skip "podman cannot import an image here: $(last_line "$rc" "$err")"
# As the tests below run them: as the image's user (rootless podman needs subordinate ids
# for that), read-only, without capabilities, on the host's network.
IMAGE_USER=$(sed -n 's/^USER[[:space:]]\{1,\}\([^[:space:]]*\).*/\1/p' Dockerfile | tail -1)
SEC=(--network host --read-only --cap-drop ALL --security-opt no-new-privileges --pull=never)
rc=0; out=$(pm run --rm "${SEC[@]}" --user "${IMAGE_USER:-65532}" "$BASE_REF" \
  /usr/bin/bash -c 'echo container-ok' 2>&1) || rc=$?
if [ "$rc" != 0 ] || ! grep -q container-ok <<<"$out"; then
  skip "podman cannot run a container (as uid ${IMAGE_USER%%:*}) here: $(last_line "$rc" "$out")"
fi
say "podman $(podman --version | awk '{print $3}') runs containers here (store in $WORK, vfs)"

# From here on, a failure is the test's failure.
LOG=$WORK/podman.log
fail() {
  echo "container: FAIL: $*" >&2
  for c in "${CONTAINERS[@]}"; do
    echo "--- podman logs $c" >&2; pm logs "$c" 2>&1 | tail -20 >&2
  done
  [ -s "$LOG" ] && { echo "--- podman (last lines)" >&2; tail -20 "$LOG" >&2; }
  echo "container: FAIL: $*" >&2
  exit 1
}

# The build context: the Dockerfile, .dockerignore and the host's binaries where the
# prebuilt stages look for them, plus files .dockerignore must keep out.
CTX=$WORK/ctx
mkdir -p "$CTX/target/bin" "$CTX/target/release/deps" "$CTX/.git" "$CTX/fuzz/target"
cp Dockerfile .dockerignore "$CTX/"
cp "$LB_TOKIO" "$CTX/target/bin/lb-tokio"
[ -x "$LB_SMOL" ] && cp "$LB_SMOL" "$CTX/target/bin/lb-smol"
cp "$MOCK" "$CTX/target/release/mock-backend"
touch "$CTX/target/release/lb" "$CTX/target/release/deps/junk" "$CTX/.git/HEAD" "$CTX/fuzz/target/junk"

# .dockerignore: from target/, exactly the three binaries reach the build.
printf 'FROM %s\nCOPY . /ctx\n' "$BASE_REF" >"$WORK/Containerfile.ctx"
pm build --pull=never -q -f "$WORK/Containerfile.ctx" -t "localhost/$TAG-ctx" "$CTX" >>"$LOG" 2>&1 \
  || fail "podman build of the context check"
got=$(pm run --rm --pull=never --network host "localhost/$TAG-ctx" /usr/bin/bash -c \
  'cd /ctx; shopt -s globstar dotglob nullglob; for f in **; do [ -f "$f" ] && echo "$f"; done' 2>>"$LOG" | sort | tr '\n' ' ')
want=".dockerignore Dockerfile target/bin/lb-tokio $([ -x "$LB_SMOL" ] && echo 'target/bin/lb-smol ')target/release/mock-backend"
want=$(echo "$want" | tr ' ' '\n' | sort | tr '\n' ' ')
[ "$got" = "$want" ] || fail ".dockerignore lets through [$got], expected [$want]"
say ".dockerignore: the context holds only [${got% }]"

BUILDS=(tokio)
if [ -x "$LB_SMOL" ]; then BUILDS+=(smol); else say "no $LB_SMOL: the smol image is not checked"; fi
PM_TIMEOUT=180 pm build --pull=never --format docker --target mock-prebuilt \
  -t "localhost/$TAG-mock" "$CTX" >>"$LOG" 2>&1 || fail "podman build --target mock-prebuilt"
for b in "${BUILDS[@]}"; do
  PM_TIMEOUT=180 pm build --pull=never --format docker --target prebuilt --build-arg "BUILD=$b" \
    -t "localhost/$TAG-$b" "$CTX" >>"$LOG" 2>&1 || fail "podman build --target prebuilt --build-arg BUILD=$b"
  cfg=$(pm image inspect --format '{{.Config.User}}|{{json .Config.Entrypoint}}|{{json .Config.ExposedPorts}}|{{json .HealthCheck}}' "localhost/$TAG-$b")
  case "$cfg" in
    65532:65532\|'["lb"]'\|*8080/tcp*9901/tcp*\|*/live*) ;;
    *) fail "image lb ($b): user, entrypoint, exposed ports or healthcheck not as the Dockerfile says: $cfg" ;;
  esac
done
say "built: prebuilt (${BUILDS[*]}) and mock-prebuilt from $BASE_NAME (user 65532, ENTRYPOINT lb, EXPOSE 8080 9901, HEALTHCHECK /live)"

free_port() { # a port nothing answers on (loopback), below the ephemeral range (32768-)
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
}
running() { [ "$(pm inspect --format '{{.State.Running}}' "$1" 2>/dev/null)" = true ]; }
wait_for() { # wait_for SECONDS CONTAINER WHAT CMD...: until CMD succeeds, while CONTAINER runs
  local secs=$1 end=$((SECONDS + $1)) ctr=$2 what=$3; shift 3
  until "$@" >/dev/null 2>&1; do
    running "$ctr" || fail "$ctr stopped while waiting for $what"
    [ "$SECONDS" -lt "$end" ] || fail "timed out after ${secs}s waiting for $what"
    sleep 0.2
  done
}

listening() { pm logs "$1" 2>/dev/null | grep -q '^listening on '; }
healthy() { curl -fsS --max-time 2 "$1/health" | grep -q "\"healthy_backends\":$2,"; }
BACKENDS=()
for i in 1 2 3; do
  c=$TAG-mock$i
  pm run -d --name "$c" "${SEC[@]}" "localhost/$TAG-mock" \
    --bind 127.0.0.1 --port 0 --tokens 5 --token-interval 20ms >>"$LOG" 2>&1 || fail "podman run mock $i"
  CONTAINERS+=("$c")
done
for i in 1 2 3; do
  wait_for 20 "$TAG-mock$i" "mock $i to listen" listening "$TAG-mock$i"
  addr=$(pm logs "$TAG-mock$i" 2>/dev/null | sed -n 's/^listening on //p' | head -1)
  BACKENDS+=("http://$addr")
done
say "3 mock backends in containers: ${BACKENDS[*]}"

for b in "${BUILDS[@]}"; do
  c=$TAG-lb-$b
  CONTAINERS+=("$c")
  for attempt in 1 2 3; do # new ports if another process took one meanwhile
    P=$(free_port); A=$(free_port)
    [ "$P" != "$A" ] || A=$(free_port)
    if [ -z "$P" ] || [ -z "$A" ]; then fail "no free port found"; fi
    U=http://127.0.0.1:$A
    pm run -d --name "$c" "${SEC[@]}" -e "LB_ADMIN_PORT=$A" "localhost/$TAG-$b" \
      --bind 127.0.0.1 --port "$P" --admin-bind "127.0.0.1:$A" --health-check-interval 5s \
      --backends "${BACKENDS[@]}" >>"$LOG" 2>&1 || fail "podman run lb ($b)"
    end=$((SECONDS + 20))
    until curl -fsS --max-time 2 "$U/live" >/dev/null 2>&1; do
      if ! running "$c"; then
        if [ "$attempt" -lt 3 ] && pm logs "$c" 2>&1 | grep -q 'in use'; then
          pm rm -f "$c" >>"$LOG" 2>&1; continue 2
        fi
        fail "lb ($b) stopped before /live answered"
      fi
      [ "$SECONDS" -lt "$end" ] || fail "timed out after 20s waiting for lb ($b) /live"
      sleep 0.2
    done
    break
  done
  wait_for 30 "$c" "lb ($b) /health to count 3 healthy backends" healthy "$U" 3
  metrics=$(curl -fsS --max-time 5 "$U/metrics") || fail "lb ($b): GET /metrics"
  grep -q "^lb_build_info{.*runtime=\"$b\".*} 1\$" <<<"$metrics" \
    || fail "lb ($b): /metrics has no lb_build_info{runtime=\"$b\"} 1"
  body=$WORK/sse-$b
  code=$(curl -sS -N --max-time 20 -o "$body" -w '%{http_code} %{content_type}' \
    -H 'content-type: application/json' "http://127.0.0.1:$P/v1/chat/completions" \
    -d '{"model":"mock-model","stream":true,"messages":[{"role":"user","content":"hi"}]}') \
    || fail "lb ($b): streamed chat completion"
  chunks=$(grep -c '^data: {' "$body" || true)
  last=$(grep -v '^\s*$' "$body" | tail -1)
  [[ $code == "200 text/event-stream"* && $chunks -ge 5 && $last == "data: [DONE]" ]] \
    || fail "lb ($b): stream: status/type '$code', $chunks data chunks, last line '$last'"
  # The image's own HEALTHCHECK, as the engine runs it; and its probe against a closed port.
  pm healthcheck run "$c" >>"$LOG" 2>&1 || fail "lb ($b): the image's HEALTHCHECK reports unhealthy"
  hc=$(pm image inspect --format '{{index .HealthCheck.Test 0}} {{index .HealthCheck.Test 1}} {{index .HealthCheck.Test 2}}' "localhost/$TAG-$b")
  probe=$(pm image inspect --format '{{index .HealthCheck.Test 3}}' "localhost/$TAG-$b")
  [ "$hc" = "CMD /bin/bash -c" ] && [ -n "$probe" ] \
    || fail "lb ($b): HEALTHCHECK is not [\"CMD\", \"/bin/bash\", \"-c\", ...]: $hc"
  if pm exec -e "LB_ADMIN_PORT=$(free_port)" "$c" /bin/bash -c "$probe" >>"$LOG" 2>&1; then
    fail "lb ($b): the HEALTHCHECK command passes against a closed port"
  fi
  user=$(pm top "$c" user 2>/dev/null | awk 'NR==2 {print $1}')
  [ "$user" = 65532 ] || fail "lb ($b): runs as '$user', not 65532"
  pm stop -t 15 "$c" >>"$LOG" 2>&1 || fail "lb ($b): podman stop"
  rc=$(pm inspect --format '{{.State.ExitCode}}' "$c")
  [ "$rc" = 0 ] && pm logs "$c" 2>&1 | grep -q 'stopped' \
    || fail "lb ($b): after SIGTERM exit code $rc (want 0 and a 'stopped' line)"
  say "lb ($b) in a container: /live 200, /health 3 healthy, lb_build_info, SSE stream of $chunks chunks + [DONE], HEALTHCHECK healthy, uid 65532, SIGTERM exit 0"
done

echo "== container: all checks passed ($((SECONDS - T0))s)"
