#!/usr/bin/env bash
# Checks the Helm chart and the plain manifests: `helm lint --strict`, and every
# rendering (the defaults, and charts/beemesh/ci/*.yaml, which take every optional branch)
# validated against the Kubernetes schemas with `kubernetes-validate --strict`, as are
# manifests/; manifests/install/beemesh.yaml must be the chart's current rendering.
# Installs its tools first (hack/install-helm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/install-helm.sh >/dev/null

for values in charts/beemesh/ci/*.yaml; do
  echo "chart with $values"
  helm lint --strict charts/beemesh --values "$values" | grep -v '^$'
  helm template beemesh charts/beemesh --namespace beemesh --values "$values" |
    kubernetes-validate --strict --quiet -
done
bash hack/render-manifests.sh --check
for manifest in manifests/install/*.yaml manifests/examples/*.yaml manifests/standalone/*.yaml; do
  kubernetes-validate --strict --quiet "$manifest"
done
echo "chart and manifests valid"
