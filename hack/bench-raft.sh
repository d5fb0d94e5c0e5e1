#!/usr/bin/env bash
# A stateful workload's Raft group, without Podman (tests/raft_group.rs, release build):
# KV write and read latency through the leader and through a follower, writes per
# second from 16 writers, fail-over time, with 3 and 5 members; memory per idle group;
# then the Jepsen-style check with BEEMESH_JEPSEN_OPS operations (default 10,000)
# while the leader is cut off (members in network namespaces; needs root) and members
# are killed and restarted. Prints the BENCH lines and the check's summary, for
# BENCHMARKS.md and RELIABILITY.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export BEEMESH_JEPSEN_OPS="${BEEMESH_JEPSEN_OPS:-10000}"
echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) $(nproc) cores"
for test in bench_kv_latency_throughput_and_failover bench_idle_group_memory; do
  cargo test --release --locked --test raft_group "$test" -- --ignored --nocapture 2>&1 |
    grep -E '^BENCH|test result'
done
cargo test --release --locked --test raft_group reads_writes_and_cas -- --nocapture 2>&1 |
  grep -E 'operations \(|test result'
