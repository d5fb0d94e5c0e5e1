#!/usr/bin/env bash
# The scale benchmark (issue 13): one owner and thousands of simulated agents over real
# libp2p on loopback, and an owner tracking up to a million placed pods (see
# benches/scale/harness.rs for what is real and what is simulated). Builds the harness
# (release), runs it, and writes benches/results/scale.json, scale.md and the plots
# (PNG). Arguments go to the harness's `run`, e.g.
#   bash hack/bench-scale.sh --agents 1000 --rates 5,20 --track 100000:1000
# Takes about an hour with the defaults (1,000 and 10,000 agents; 10,000 to 1,000,000
# pods tracked) and up to ~10 GiB of memory.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
out=benches/results

# 10,000 agents are 10,000 connections in the owner's process and in the agents'.
ulimit -n "$(ulimit -Hn)"
cargo bench --locked --bench scale --no-run --quiet
cargo bench --locked --bench scale --quiet -- run "$@"

# The plots need matplotlib: in a virtualenv of its own, so that the machine's Python
# packages keep their versions.
venv=${BEEMESH_PLOT_VENV:-target/plot-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "matplotlib>=3.8,<4"
fi
"$venv/bin/python" hack/bench-scale-plot.py "$out/scale.json" "$out"
