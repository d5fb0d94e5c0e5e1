#!/usr/bin/env bash
# The standalone demo on one machine: installs Podman and the test image, builds
# BeeMesh, starts a node and three agents on loopback, hands the node the example
# pods in manifests/standalone/, and shows the mesh. Runs until Ctrl-C (or for
# BEEMESH_DEMO_SECONDS), then stops the pods and everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

bash hack/install-podman.sh
bash hack/build-test-image.sh
echo "building beemesh (release)..."
cargo build --release --locked --quiet
bin="$root/target/release/beemesh"

demo=${BEEMESH_DEMO_DIR:-/tmp/beemesh-demo}
mkdir -p "$demo/manifests"
rm -f "$demo"/manifests/*.yaml
node_port=${BEEMESH_DEMO_PORT:-4001}
node_id=$("$bin" id --state-dir "$demo/node")
node_addr="/ip4/127.0.0.1/tcp/$node_port/p2p/$node_id"
# Nothing is trusted by default: the agents enroll with a join token of the node's.
token=$("$bin" token create --state-dir "$demo/node" --ttl 1h 2>/dev/null)
status=("$bin" status --bootstrap "$node_addr" --client-key "$demo/node/client.key")

pids=()
cleanup() {
  echo
  echo "stopping: removing the demo pods, then the node and agents"
  rm -f "$demo"/manifests/*.yaml
  sleep 8
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$bin" node --state-dir "$demo/node" --listen "/ip4/127.0.0.1/tcp/$node_port" \
  --pod-manifest-path "$demo/manifests" 2>"$demo/node.log" &
pids+=($!)
zones=(a b c)
# Secrets stay in memory: /dev/shm is a tmpfs everywhere, /run not on every machine.
for i in 0 1 2; do
  "$bin" agent --state-dir "$demo/agent$i" --listen "/ip4/127.0.0.1/tcp/$((node_port + 1 + i))" \
    --bootstrap "$node_addr" --join "$token" --label "zone=${zones[$i]}" \
    --secrets-dir "/dev/shm/beemesh-demo/agent$i" \
    >"$demo/agent$i.log" 2>&1 &
  pids+=($!)
done

echo "node $node_id on $node_addr; agents in zones a, b, c (logs in $demo)"
sleep 5
cp manifests/standalone/*.yaml "$demo/manifests/"
echo "manifests handed to the node: $(find "$demo/manifests" -maxdepth 1 -type f -printf '%f\n' | sort | tr '\n' ' ')"
sleep 8
"${status[@]}"
echo
echo "the hello pod serves on its hostPort: $(curl -s --max-time 3 http://127.0.0.1:18080/ || echo '(not yet)')"
echo "its Podman pods:  podman pod ps --filter label=io.beemesh.pod.name=hello"
echo "mesh status:      ${status[*]}"
echo "phase changes follow (Ctrl-C to stop):"
if [ -n "${BEEMESH_DEMO_SECONDS:-}" ]; then
  sleep "$BEEMESH_DEMO_SECONDS"
else
  wait "${pids[0]}"
fi
