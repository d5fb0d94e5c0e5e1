#!/usr/bin/env bash
# Sets up everything the tests need (Podman with its config and REST service, the
# local busybox test image, Helm, shellcheck) and runs every check and test: the chart
# and manifests, the scripts, formatting, clippy, unit, mesh, Podman and end-to-end
# tests, the quickstart. Idempotent; run as root on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# A build needs a few GB (a CI run once ran out of disk): said first, for the log.
df -h . | awk 'NR == 2 { print "disk: " $4 " free on " $6 }'

bash hack/install-podman.sh
bash hack/build-test-image.sh
# The private-image tests start their own registry.
bash hack/install-registry.sh
# Helm and kubernetes-validate; the chart's lint and schema checks.
bash hack/check-chart.sh
if ! command -v shellcheck >/dev/null; then
  apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null
fi
shellcheck hack/*.sh .ci/run

# Incremental state would roughly double target/'s size and buys nothing in one-shot runs.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
# End-to-end tests start several processes each; two at a time suit 2 cores.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"

# The quickstart as a user runs it (twice, each stopped with Ctrl-C), with the
# binary the tests built.
quickstart=0
BEEMESH_BIN="$PWD/target/debug/beemesh" bash hack/test-quickstart.sh || quickstart=$?

# The fault suite's short version (an agent partitioned and healed, an agent killed
# under load, the Podman service killed and restarted) on separate network hosts, with
# the binary the tests built; the full suite is bash hack/faults/run.sh (RELIABILITY.md).
faults=0
BEEMESH_BIN="$PWD/target/debug/beemesh" bash hack/faults/run.sh --short || faults=$?
if [ "$faults" != 0 ]; then
  echo "fault suite (short) failed: exit $faults"
fi
[ "$status" = 0 ] && [ "$quickstart" = 0 ] && [ "$faults" = 0 ]
