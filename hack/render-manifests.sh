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
# The node's mesh identity key and its first join token are not in this file (they would
# be the same secrets for everyone): create them once before applying, then apply:
#   kubectl create namespace $namespace
#   openssl genpkey -algorithm ed25519 -out identity.key
#   kubectl -n $namespace create secret generic beemesh-identity --from-file=identity.key
#   token=\$(tr -dc a-z0-9 </dev/urandom | head -c 22 | sed 's/^....../&./')
#   kubectl -n $namespace create secret generic beemesh-trust --from-literal=join-token=\$token
#   kubectl apply -f manifests/install/beemesh.yaml
# Agents join with that token (hack/install-agent.sh --join \$token).
apiVersion: v1
kind: Namespace
metadata:
  name: $namespace
HEADER
  # Labels naming the chart release are dropped: nothing manages these objects but kubectl.
  helm template beemesh charts/beemesh --namespace "$namespace" --skip-tests \
    --set identity.existingSecret=beemesh-identity --set trust.existingSecret=beemesh-trust |
    grep -v -e '^    helm.sh/chart:' -e '^    app.kubernetes.io/managed-by:'
}

# The admission policy, for clusters with ValidatingAdmissionPolicy (Kubernetes 1.30 and
# later) only: a separate file, as `kubectl apply` of it fails on older clusters.
policy_out=manifests/install/beemesh-admission-policy.yaml
render_policy() {
  cat <<HEADER
# BeeMesh virtual node: its admission policy, generated from charts/beemesh by
# hack/render-manifests.sh (do not edit; change the chart and run the script). For
# clusters with admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy (Kubernetes
# 1.30 and later), after beemesh.yaml:
#   kubectl apply -f manifests/install/beemesh-admission-policy.yaml
# It limits the node's requests as the NodeRestriction admission plugin limits a
# kubelet's (see the README, "What the node may do in your cluster").
HEADER
  helm template beemesh charts/beemesh --namespace "$namespace" --skip-tests \
    --api-versions admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy \
    --show-only templates/admission-policy.yaml |
    grep -v -e '^    helm.sh/chart:' -e '^    app.kubernetes.io/managed-by:'
}

if [ "${1:-}" = --check ]; then
  if ! diff -u "$out" <(render) || ! diff -u "$policy_out" <(render_policy); then
    echo "manifests/install is out of date with charts/beemesh: run bash hack/render-manifests.sh" >&2
    exit 1
  fi
  echo "manifests/install matches the chart"
else
  render >"$out"
  render_policy >"$policy_out"
  echo "wrote $out and $policy_out"
fi
