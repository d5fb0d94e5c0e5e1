#!/usr/bin/env bash
# The standalone demo on one machine: installs Podman and the test image, builds
# BeeMesh, starts a node and three agents on loopback, hands the node the example
# pods in manifests/standalone/, and shows the mesh. Runs until Ctrl-C or SIGTERM (or
# for BEEMESH_DEMO_SECONDS), then removes the pods through the mesh, stops the node and
# agents, and leaves everything else (the Podman service above all) as it was.
# BEEMESH_BIN: a binary to use instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

bash hack/install-podman.sh
bash hack/build-test-image.sh
if [ -n "${BEEMESH_BIN:-}" ]; then
  bin=$BEEMESH_BIN
else
  echo "building beemesh (release): a first build takes about 6 minutes on 2 idle cores"
  echo "once the crates are downloaded (more on a busy machine), later ones a few;"
  echo "cargo shows its progress below"
  cargo build --release --locked
  bin="$root/target/release/beemesh"
fi

demo=${BEEMESH_DEMO_DIR:-/tmp/beemesh-demo}
mkdir -p "$demo/manifests"
rm -f "$demo"/manifests/*.yaml
node_port=${BEEMESH_DEMO_PORT:-4001}
node_id=$("$bin" id --state-dir "$demo/node")
node_addr="/ip4/127.0.0.1/tcp/$node_port/p2p/$node_id"
# Nothing is trusted by default: the agents enroll with a join token of the node's.
token=$("$bin" token create --state-dir "$demo/node" --ttl 1h 2>/dev/null)
status=("$bin" status --bootstrap "$node_addr" --client-key "$demo/node/client.key")

# The node and agents run in sessions of their own: a Ctrl-C at the terminal reaches
# only this script, which stops them in order (they would otherwise exit at once and
# leave their pods running).
pids=()
start() {
  local log=$1
  shift
  setsid "$@" </dev/null 2>>"$log" &
  pids+=($!)
}

# Signals interrupt a wait, not a foreground sleep.
pause() {
  sleep "$1" &
  wait $!
}

demo_pods() {
  local view
  view=$("${status[@]}" -o json --timeout-seconds 5 2>/dev/null) || { echo "?"; return; }
  grep -c '"namespace"' <<<"$view" || true
}

stopped=0
stop() {
  [ "$stopped" = 1 ] && return
  stopped=1
  trap '' INT TERM
  echo
  rm -f "$demo"/manifests/*.yaml
  # A node that is running releases every pod; the agents stop them (each pod's grace
  # period). One that never started has nothing to remove.
  if [ "${#pids[@]}" -gt 0 ] && kill -0 "${pids[0]}" 2>/dev/null; then
    echo "stopping: removing the demo pods through the mesh"
    for _ in $(seq 1 60); do
      [ "$(demo_pods)" = 0 ] && break
      sleep 1
    done
    left=$(demo_pods)
    [ "$left" = 0 ] || echo "the node still lists $left pod(s); stopping anyway"
  fi
  echo "stopping the node and agents"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "stopped; logs in $demo"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The node's stdout (each pod's changes) comes here; logs go to files.
start "$demo/node.log" "$bin" node --state-dir "$demo/node" \
  --listen "/ip4/127.0.0.1/tcp/$node_port" --pod-manifest-path "$demo/manifests"
node_pid=${pids[0]}
sleep 1
if ! kill -0 "$node_pid" 2>/dev/null; then
  echo "the node did not start (is port $node_port in use? BEEMESH_DEMO_PORT picks another):" >&2
  tail -n 5 "$demo/node.log" >&2
  exit 1
fi
zones=(a b c)
# Secrets stay in memory: /dev/shm is a tmpfs everywhere, /run not on every machine.
for i in 0 1 2; do
  start "$demo/agent$i.log" "$bin" agent --state-dir "$demo/agent$i" \
    --listen "/ip4/127.0.0.1/tcp/$((node_port + 1 + i))" \
    --bootstrap "$node_addr" --join "$token" --label "zone=${zones[$i]}" \
    --secrets-dir "/dev/shm/beemesh-demo/agent$i" >/dev/null
done

echo "node $node_id on $node_addr; agents in zones a, b, c (logs in $demo)"
pause 5
cp manifests/standalone/*.yaml "$demo/manifests/"
echo "manifests handed to the node: $(find "$demo/manifests" -maxdepth 1 -type f -printf '%f\n' | sort | tr '\n' ' ')"
pause 8
"${status[@]}"
echo
echo "the hello pod serves on its hostPort: $(curl -s --max-time 3 http://127.0.0.1:18080/ || echo '(not yet)')"
echo "its Podman pods:  podman pod ps --filter label=io.beemesh.pod.name=hello"
echo "mesh status:      ${status[*]} --watch"
echo "changes follow (Ctrl-C to stop):"
if [ -n "${BEEMESH_DEMO_SECONDS:-}" ]; then
  pause "$BEEMESH_DEMO_SECONDS"
else
  wait "$node_pid"
fi
