#!/usr/bin/env bash
# Sets up everything the tests need (Podman with its config and REST service, the
# local busybox test image) and runs every check and test: formatting, clippy, unit,
# mesh, Podman and end-to-end tests. Idempotent; run as root on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/install-podman.sh
bash hack/build-test-image.sh

cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
# End-to-end tests start several processes each; two at a time suit 2 cores.
cargo test --locked -- --test-threads=2
