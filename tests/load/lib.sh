# Sourced by the load scripts in this directory (not run on its own).
# ROOT: the repository. PIDS: background processes the script started; cleanup kills them
# when the script exits, however it exits.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Sets MOCK to the release mock backend, or exits saying how to build it.
need_mock() {
  MOCK=$ROOT/target/release/mock-backend
  [ -x "$MOCK" ] || { echo "$MOCK not found: cargo build --release -p lb-tests" >&2; exit 2; }
}
