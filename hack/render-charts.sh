#!/usr/bin/env bash
# Renders the chart catalogue (tests/fixtures/charts/*.yaml) from the charts' own
# repositories, with their default values, release "demo" in namespace "default":
# the chart and version are read from each file's first line (`# <repo>/<chart>
# <version> ...`). Needs Helm (hack/install-helm.sh) and access to the repositories,
# which the machines these files were first written on did not have (see
# tests/fixtures/charts/README.md). After rendering, `cargo test --test catalogue`
# says where BeeMesh's expectations (tests/chart_catalogue/mod.rs) no longer hold, and
# `BEEMESH_UPDATE_README=1 cargo test --test readme` rewrites the README's table.
set -euo pipefail

cd "$(dirname "$0")/.."
declare -A SOURCES=(
  [bitnami]=oci://registry-1.docker.io/bitnamicharts
  [grafana]=https://grafana.github.io/helm-charts
  [prometheus-community]=https://prometheus-community.github.io/helm-charts
)

for file in tests/fixtures/charts/*.yaml; do
  read -r _ ref version _ < "$file"
  repo=${ref%%/*}
  chart=${ref#*/}
  source=${SOURCES[$repo]:-}
  if [[ -z $source ]]; then
    echo "$file: no source known for $ref" >&2
    exit 1
  fi
  if [[ $source == oci://* ]]; then
    args=("$source/$chart")
  else
    args=(--repo "$source" "$chart")
  fi
  rendered=$(helm template demo "${args[@]}" --version "$version" --namespace default)
  {
    echo "# $ref $version, default values, release \"demo\" in namespace \"default\"."
    echo "# Rendered by hack/render-charts.sh with helm $(helm version --short) on $(date -u +%F)."
    echo "$rendered"
  } > "$file.new"
  mv "$file.new" "$file"
  echo "$file: $ref $version"
done
