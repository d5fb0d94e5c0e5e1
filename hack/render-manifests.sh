#!/usr/bin/env bash
# Renders manifests/install/beemesh.yaml, the plain-YAML install, from the Helm chart, so
# that the two never drift. With --check, fails if the committed file differs from a
# fresh render (CI runs that). Needs helm (bash hack/install-helm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

out=manifests/install/beemesh.yaml
namespace=beemesh

render() {
  cat <<HEADER
# BeeMesh virtual node: the plain-manifest install, generated from charts/beemesh by
# hack/render-manifests.sh (do not edit; change the chart and run the script).
#
# The node's mesh identity key is not in this file (it would be the same private key for
# everyone): create it once before applying, then apply:
#   kubectl create namespace $namespace
#   openssl genpkey -algorithm ed25519 -out identity.key
#   kubectl -n $namespace create secret generic beemesh-identity --from-file=identity.key
#   kubectl apply -f manifests/install/beemesh.yaml
apiVersion: v1
kind: Namespace
metadata:
  name: $namespace
HEADER
  # Labels naming the chart release are dropped: nothing manages these objects but kubectl.
  helm template beemesh charts/beemesh --namespace "$namespace" --skip-tests \
    --set identity.existingSecret=beemesh-identity |
    grep -v -e '^    helm.sh/chart:' -e '^    app.kubernetes.io/managed-by:'
}

if [ "${1:-}" = --check ]; then
  if ! diff -u "$out" <(render); then
    echo "$out is out of date with charts/beemesh: run bash hack/render-manifests.sh" >&2
    exit 1
  fi
  echo "$out matches the chart"
else
  render >"$out"
  echo "wrote $out"
fi
