#!/usr/bin/env bash
# A Service's traffic through the node's gateway (node, libp2p stream, agent, pod)
# against a direct connection to the pod's address on its agent, in one run (release
# build): one GET of BEEMESH_BENCH_MIB MiB (default 256) and the median time of
# BEEMESH_BENCH_REQUESTS small GETs (default 200), against the test fake API server
# with a real node, agent and Podman. Prints a Markdown table for BENCHMARKS.md.
# Arguments, for another path of the same kind: the test file and the test.
set -euo pipefail
cd "$(dirname "$0")/.."
test_file="${1:-kubernetes}"
test_name="${2:-service_throughput_and_latency_through_the_gateway_and_direct}"
bash hack/install-podman.sh >/dev/null
bash hack/build-test-image.sh >/dev/null
export BEEMESH_BENCH_MIB="${BEEMESH_BENCH_MIB:-256}"
export BEEMESH_BENCH_REQUESTS="${BEEMESH_BENCH_REQUESTS:-200}"
cargo test --release --locked --test "$test_file" "$test_name" -- --nocapture 2>&1 |
  grep -E '^\||throughput /|test result'
