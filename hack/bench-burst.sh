#!/usr/bin/env bash
# Pods in bursts through Kubernetes against the same pods standalone, in one run each
# (release build): a Deployment's pods created through the test fake API server as the
# ReplicaSet controller creates them, and the same number of manifests written at once
# into a standalone node's directory.
# - With real agents and Podman: bursts of BEEMESH_BENCH_BURSTS pods (default
#   "100 1000"), BEEMESH_BENCH_BURST_AGENTS agents (default 2).
# - With the scale harness's simulated agents, which "run" a pod when it is assigned:
#   bursts of BEEMESH_BENCH_SIM_BURSTS pods (default "100 1000"), one agent per 100
#   pods unless BEEMESH_BENCH_SIM_BURST_AGENTS says otherwise.
# Either list may be empty (""). Prints Markdown tables for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/install-podman.sh >/dev/null
bash hack/build-test-image.sh >/dev/null
cargo build --release --locked --quiet
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# burst <test name prefix> <the variable that sizes it> <pods>
burst() {
  if ! env "$2=$3" cargo test --release --locked --test kubernetes "$1" -- --nocapture \
    >"$log" 2>&1; then
    echo "burst of $3 pods ($1) failed:" >&2
    tail -n 80 "$log" >&2
    exit 1
  fi
  grep -E '^\||/ standalone' "$log"
}

for pods in ${BEEMESH_BENCH_BURSTS-100 1000}; do
  burst a_deployments_burst_runs_every_pod_once BEEMESH_BENCH_BURST_PODS "$pods"
done
for pods in ${BEEMESH_BENCH_SIM_BURSTS-100 1000}; do
  burst a_deployments_burst_among_simulated_agents BEEMESH_BENCH_SIM_BURST_PODS "$pods"
done
