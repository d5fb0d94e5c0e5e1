#!/usr/bin/env bash
# Installs the Python tools the checks and tests use, pinned: kubernetes-validate (the
# chart's rendered manifests against the Kubernetes schemas) and the official kubernetes
# client (a second, independent client of the kubelet API's WebSocket port-forward).
# They go into their own virtualenv, so that the machine's other Python packages keep
# their versions. Idempotent.
set -euo pipefail

VENV=${BEEMESH_PYTHON_TOOLS:-/opt/beemesh-python-tools}
REQUIREMENTS=(kubernetes-validate==1.37.0 kubernetes==37.0.2)

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
installed=$("$VENV/bin/python" -m pip freeze 2>/dev/null || true)
for requirement in "${REQUIREMENTS[@]}"; do
  if ! grep -qxF "$requirement" <<<"$installed"; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
    break
  fi
done
echo "python tools in $VENV: ${REQUIREMENTS[*]}"
