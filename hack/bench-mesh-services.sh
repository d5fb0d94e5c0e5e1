#!/usr/bin/env bash
# Mesh pod to mesh pod on two agents through a standalone Service (the client's agent,
# a libp2p stream to the server's agent, the pod) against a direct connection to the
# server's mesh IP, from inside the client pod's network namespace, in one run
# (release build): one GET of BEEMESH_BENCH_MIB MiB (default 256) and the median time
# of BEEMESH_BENCH_REQUESTS small GETs (default 200), with a real node, agents and
# Podman. Prints a Markdown table for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/install-podman.sh >/dev/null
bash hack/build-test-image.sh >/dev/null
export BEEMESH_BENCH_MIB="${BEEMESH_BENCH_MIB:-256}"
export BEEMESH_BENCH_REQUESTS="${BEEMESH_BENCH_REQUESTS:-200}"
cargo test --release --locked --test mesh_services \
  mesh_pod_to_mesh_pod_throughput_and_latency_through_a_service_and_direct -- --nocapture 2>&1 |
  grep -E '^\||throughput /|test result'
