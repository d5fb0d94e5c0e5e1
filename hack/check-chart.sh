#!/usr/bin/env bash
# Checks the Helm chart and the plain manifests: `helm lint --strict`, and every
# rendering (the defaults, and charts/beemesh/ci/*.yaml, which take every optional branch;
# each also as on a 1.30 cluster, with the admission policy) validated against the
# Kubernetes schemas with `kubernetes-validate --strict`, as are
# manifests/; manifests/install/beemesh.yaml must be the chart's current rendering.
# Installs its tools first (hack/install-helm.sh, hack/install-python-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/install-helm.sh >/dev/null
bash hack/install-python-tools.sh >/dev/null
validate() { "${BEEMESH_PYTHON_TOOLS:-/opt/beemesh-python-tools}/bin/kubernetes-validate" --strict --quiet "$@"; }

for values in charts/beemesh/ci/*.yaml; do
  echo "chart with $values"
  helm lint --strict charts/beemesh --values "$values" | grep -v '^$'
  helm template beemesh charts/beemesh --namespace beemesh --values "$values" |
    validate -
  # As on a cluster with ValidatingAdmissionPolicy (1.30 and later): the chart adds its
  # admission policy, validated against the first version that has it.
  helm template beemesh charts/beemesh --namespace beemesh --values "$values" \
    --api-versions admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy |
    validate --kubernetes-version 1.30.0 -
done
bash hack/render-manifests.sh --check
for manifest in manifests/install/*.yaml manifests/examples/*.yaml manifests/standalone/*.yaml; do
  validate "$manifest"
done
echo "chart and manifests valid"
