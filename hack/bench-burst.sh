#!/usr/bin/env bash
# Pods in bursts through Kubernetes against the same pods standalone, in one run each
# (release build): a Deployment's pods created through the test fake API server as the
# ReplicaSet controller creates them, and the same number of manifests written at once
# into a standalone node's directory, with the same agents and Podman. Bursts of
# BEEMESH_BENCH_BURSTS pods (default "100 1000"), BEEMESH_BENCH_BURST_AGENTS agents
# (default 2). Prints Markdown tables for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/install-podman.sh >/dev/null
bash hack/build-test-image.sh >/dev/null
cargo build --release --locked --quiet
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for pods in ${BEEMESH_BENCH_BURSTS:-100 1000}; do
  if ! BEEMESH_BENCH_BURST_PODS="$pods" cargo test --release --locked --test kubernetes \
    a_deployments_burst_runs_every_pod_once -- --nocapture >"$log" 2>&1; then
    echo "burst of $pods pods failed:" >&2
    tail -n 80 "$log" >&2
    exit 1
  fi
  grep -E '^\||/ standalone' "$log"
done
