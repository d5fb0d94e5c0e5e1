#!/usr/bin/env bash
# The quickstart as a user runs it, twice in a row, with a prebuilt binary
# (BEEMESH_BIN, default the debug build): it must bring its pods up, and a Ctrl-C
# (SIGINT to its process group, as a terminal sends it) must remove every pod it
# started and leave the Podman service answering.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BEEMESH_BIN:-$PWD/target/debug/beemesh}
[ -x "$bin" ] || { echo "no binary at $bin (cargo build first, or set BEEMESH_BIN)" >&2; exit 1; }
work=$(mktemp -d)
demo=$work/demo
quickstart=
# Whatever happens here, nothing of the demo outlives the test.
cleanup() {
  if [ -n "$quickstart" ] && kill -0 "$quickstart" 2>/dev/null; then
    kill -INT -- "-$quickstart" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$quickstart" 2>/dev/null || break; sleep 1; done
  fi
  pkill -KILL -f "$bin (node|agent) --state-dir $demo" 2>/dev/null || true
  # Pods a failed run left behind would hold the next run's host port.
  demo_podman_pods 2>/dev/null | xargs -r podman pod rm -f -t 0 >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
socket=${BEEMESH_PODMAN_SOCKET_PATH:-/run/podman/podman.sock}

fail() {
  echo "quickstart test: $*" >&2
  echo "--- quickstart output" >&2
  cat "$work/out" >&2 || true
  tail -n 30 "$demo"/*.log >&2 || true
  exit 1
}

# Podman pods of the demo's agents.
demo_podman_pods() {
  local agent
  for i in 0 1 2; do
    agent=$("$bin" id --state-dir "$demo/agent$i")
    podman pod ps -q --filter "label=io.beemesh.agent=$agent"
  done
}

for run in 1 2; do
  # Started in the background, a script would ignore SIGINT (and could not trap it);
  # at a terminal it does not, so neither does it here.
  BEEMESH_BIN=$bin BEEMESH_DEMO_DIR=$demo setsid env --default-signal=INT \
    bash hack/quickstart.sh >"$work/out" 2>&1 &
  quickstart=$!
  up=0
  for _ in $(seq 1 120); do
    # Served, shown Running and ready, and the status table printed after it.
    if curl -fsS --max-time 2 http://127.0.0.1:18080/ >/dev/null 2>&1 &&
      grep -q "default/hello .*Running 2/2 ready" "$work/out" &&
      grep -q "^NAMESPACE" "$work/out"; then
      up=1
      break
    fi
    kill -0 "$quickstart" 2>/dev/null || fail "run $run: exited before its pods ran"
    sleep 1
  done
  [ "$up" = 1 ] || fail "run $run: the hello pod did not serve, or no status table, within 120 s"
  [ -n "$(demo_podman_pods)" ] || fail "run $run: no Podman pods of the demo's agents"

  kill -INT -- "-$quickstart"
  for _ in $(seq 1 90); do
    kill -0 "$quickstart" 2>/dev/null || break
    sleep 1
  done
  kill -0 "$quickstart" 2>/dev/null && fail "run $run: still running 90 s after Ctrl-C"
  grep -q "^stopped" "$work/out" || fail "run $run: did not say it stopped"
  left=$(demo_podman_pods)
  [ -z "$left" ] || fail "run $run: Podman pods left after Ctrl-C: $left"
  pgrep -f "$bin (node|agent) --state-dir $demo" >/dev/null &&
    fail "run $run: node or agents still running"
  curl -fsS --max-time 5 --unix-socket "$socket" http://d/v4.0.0/libpod/_ping >/dev/null ||
    fail "run $run: the Podman API no longer answers"
  echo "quickstart run $run: pods up, Ctrl-C removed them, Podman answers"
done
