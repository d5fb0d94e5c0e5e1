#!/usr/bin/env bash
# Sets up Podman and the test image, builds BeeMesh (the dist profile: what is installed) and runs the pod start
# benchmark. Extra arguments go to hack/bench-pod-start.py (e.g. --pods 40).
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/install-podman.sh >/dev/null
bash hack/build-test-image.sh >/dev/null
cargo build --profile dist --locked --quiet
python3 hack/bench-pod-start.py --bin target/dist/beemesh "$@"
