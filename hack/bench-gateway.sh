#!/usr/bin/env bash
# A Service's traffic through the node's gateway (node, libp2p stream, agent, pod)
# against a direct connection to the pod's address on its agent, in one run (release
# build): one GET of BEEMESH_BENCH_MIB MiB (default 256) and the median time of
# BEEMESH_BENCH_REQUESTS small GETs (default 200), against the test fake API server
# with a real node, agent and Podman. Prints a Markdown table for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/install-podman.sh >/dev/null
bash hack/build-test-image.sh >/dev/null
export BEEMESH_BENCH_MIB="${BEEMESH_BENCH_MIB:-256}"
export BEEMESH_BENCH_REQUESTS="${BEEMESH_BENCH_REQUESTS:-200}"
cargo test --release --locked --test kubernetes \
  service_throughput_and_latency_through_the_gateway_and_direct -- --nocapture 2>&1 |
  grep -E '^\||throughput /|test result'
