#!/usr/bin/env bash
# Mesh pod to mesh pod on two agents through a standalone Service (the client's agent,
# a libp2p stream to the server's agent, the pod) against a direct connection to the
# server's mesh IP, from inside the client pod's network namespace, in one run
# (release build, sizes as hack/bench-gateway.sh), with a real node, agents and Podman.
# Prints a Markdown table for BENCHMARKS.md. BEEMESH_TEST_TRANSPORT=quic runs node and
# agents over the mesh's QUIC transport instead of TCP.
set -euo pipefail
exec bash "$(dirname "$0")/bench-gateway.sh" mesh_services \
  mesh_pod_to_mesh_pod_throughput_and_latency_through_a_service_and_direct
