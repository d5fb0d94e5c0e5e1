#!/usr/bin/env bash
# The k3s agent tunnel against the direct path, in one run (release build): `kubectl exec
# -i … cat` of BEEMESH_BENCH_MIB MiB (default 100) echoed back, and the median latency of
# `kubectl logs --tail=1` over BEEMESH_BENCH_LOG_RUNS calls (default 50), against the
# test fake API server (plain, then as k3s) with a real node, agent and Podman.
# Prints a Markdown table for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/install-podman.sh >/dev/null
bash hack/build-test-image.sh >/dev/null
export BEEMESH_BENCH_MIB="${BEEMESH_BENCH_MIB:-100}"
export BEEMESH_BENCH_LOG_RUNS="${BEEMESH_BENCH_LOG_RUNS:-50}"
cargo test --release --locked --test kubernetes \
  exec_throughput_and_logs_latency_through_the_tunnel_and_direct -- --nocapture 2>&1 |
  grep -E '^\||tunnel throughput|test result'
