#!/usr/bin/env bash
# Checks the Helm chart deploy/helm/gristmill without a cluster: `helm lint --strict`, then `helm template` with the
# default values and with ci/everything-values.yaml (every switch on), and every rendered manifest validated
# OFFLINE against the Kubernetes JSON schemas (strict: an unknown or misspelled field is an error).
#
#   deploy/helm-check.sh              lint, render, validate (exit 0) or print the problem and exit non-zero
#   deploy/helm-check.sh --print      also print the manifests rendered with the default values
#   deploy/helm-check.sh --helm-path  only make sure helm is built; print its path (the tests use it)
#   deploy/helm-check.sh --validator-args  fetch the CRDs; print the validator's arguments, one a line (the tests)
#
# helm is built once from the Go module proxy (`go install helm.sh/helm/v4/cmd/helm@<version>`), cached at
# $GRISTMILL_CACHE/helm/<version>/helm; build log: $GRISTMILL_RUN_DIR/logs/helm-build.log.
# Schemas: the core kinds' from the Python package kubernetes-validate (in the dev extra: `make install`), the
# custom resources' (KubeRay's RayCluster, the Prometheus Operator's ServiceMonitor and PrometheusRule) from the openAPIV3Schema of
# their CRDs, taken from those projects' Go modules and cached at $GRISTMILL_CACHE/helm/crds/. The rendered
# manifests land in $GRISTMILL_RUN_DIR/helm/. deploy/helm/validate_manifests.py does the validation.
set -euo pipefail

COMPONENT="helm-check"
# shellcheck source-path=SCRIPTDIR source=local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/local/common.sh"

# v4.3.2: the newest Helm 4 release; its go.mod asks for Go 1.26.0 and has no replace/exclude directives, so
# `go install` takes it.
HELM_MODULE=helm.sh/helm/v4
HELM_VERSION=v4.3.2
HELM_DIR="$GRISTMILL_CACHE/helm/$HELM_VERSION"
HELM="$HELM_DIR/helm"
BUILD_LOG="$GRISTMILL_LOG_DIR/helm-build.log"
# CRDs of the custom resources the chart renders: <Go module> <version> <path of the CRD in the module>.
KUBERAY_MODULE=github.com/ray-project/kuberay/ray-operator
KUBERAY_VERSION=v1.5.0
PROMETHEUS_OPERATOR_MODULE=github.com/prometheus-operator/prometheus-operator
PROMETHEUS_OPERATOR_VERSION=v0.85.0
CRD_DIR="$GRISTMILL_CACHE/helm/crds"
# Kubernetes versions the manifests are validated against: the oldest the chart supports (native gRPC probes are
# GA from 1.27, the StatefulSet pod-index label from 1.28) and the newest that kubernetes-validate ships schemas for.
read -ra KUBE_VERSIONS <<<"${GRISTMILL_HELM_KUBE_VERSIONS:-1.28 1.37}"
CHART="$GRISTMILL_ROOT/deploy/helm/gristmill"
EVERYTHING_VALUES="$CHART/ci/everything-values.yaml"
VALIDATOR="$GRISTMILL_ROOT/deploy/helm/validate_manifests.py"
PYTHON="$GRISTMILL_ROOT/.venv/bin/python"
OUT_DIR="$GRISTMILL_RUN_DIR/helm"

helm_works() { [[ -x "$HELM" ]] && "$HELM" version --short >/dev/null 2>&1; }

build_helm() {
  need_cmd go "install Go 1.26.8 or newer to build helm"
  mkdir -p "$HELM_DIR" "$GRISTMILL_LOG_DIR"
  exec 9>"$HELM_DIR/.lock"
  flock 9
  helm_works && return 0
  local tmp="$HELM_DIR/bin.partial.$$" start=$SECONDS
  : >"$BUILD_LOG"
  say "building helm $HELM_VERSION once (a few minutes on 2 cores); log: $BUILD_LOG"
  if ! GOBIN="$tmp" go install -trimpath \
    -ldflags "-s -w -X $HELM_MODULE/internal/version.version=$HELM_VERSION" \
    "$HELM_MODULE/cmd/helm@$HELM_VERSION" >>"$BUILD_LOG" 2>&1; then
    rm -rf "$tmp"
    die "building helm $HELM_VERSION failed; see $BUILD_LOG"
  fi
  mv -f "$tmp/helm" "$HELM"
  rm -rf "$tmp"
  exec 9>&-
  say "built helm $HELM_VERSION in $((SECONDS - start)) s: $HELM"
}

# Copies one file out of a Go module (fetched through the module proxy into the Go module cache) to <dest>.
module_file() { # module_file <module> <version> <path in module> <dest>
  local module="$1" version="$2" path="$3" dest="$4" json dir
  [[ -s "$dest" ]] && return 0
  mkdir -p "$(dirname "$dest")" "$GRISTMILL_LOG_DIR"
  if ! json="$(go mod download -json "$module@$version" 2>>"$BUILD_LOG")"; then
    echo "$json" >>"$BUILD_LOG"
    die "go mod download of $module@$version failed; see $BUILD_LOG"
  fi
  dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")"
  [[ -n "$dir" && -f "$dir/$path" ]] || die "$module@$version has no $path"
  cp "$dir/$path" "$dest.partial.$$"
  chmod u+w "$dest.partial.$$"
  mv -f "$dest.partial.$$" "$dest"
}

fetch_crds() {
  need_cmd go "install Go 1.26.8 or newer to fetch the CRDs"
  module_file "$KUBERAY_MODULE" "$KUBERAY_VERSION" config/crd/bases/ray.io_rayclusters.yaml \
    "$CRD_DIR/kuberay-$KUBERAY_VERSION/ray.io_rayclusters.yaml"
  module_file "$PROMETHEUS_OPERATOR_MODULE" "$PROMETHEUS_OPERATOR_VERSION" \
    example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml \
    "$CRD_DIR/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/monitoring.coreos.com_servicemonitors.yaml"
  module_file "$PROMETHEUS_OPERATOR_MODULE" "$PROMETHEUS_OPERATOR_VERSION" \
    example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml \
    "$CRD_DIR/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/monitoring.coreos.com_prometheusrules.yaml"
}

crd_files() {
  echo "$CRD_DIR/kuberay-$KUBERAY_VERSION/ray.io_rayclusters.yaml"
  echo "$CRD_DIR/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/monitoring.coreos.com_servicemonitors.yaml"
  echo "$CRD_DIR/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/monitoring.coreos.com_prometheusrules.yaml"
}

# The validator's arguments: each Kubernetes version and each CRD.
validator_args() {
  local version crd
  for version in "${KUBE_VERSIONS[@]}"; do echo "--kube-version=$version"; done
  while read -r crd; do echo "--crd=$crd"; done < <(crd_files)
}

# validate <manifest file> <label>: every document against each Kubernetes version's schemas.
validate() {
  local file="$1" label="$2" args
  mapfile -t args < <(validator_args)
  "$PYTHON" "$VALIDATOR" "${args[@]}" "$file" ||
    die "$label: the rendered manifests are not valid (see above; manifests: $file)"
}

# The validator must reject a misspelled field, in a core kind and in a custom resource; a validator that
# accepts everything would make this check worthless.
self_test() {
  local bad="$OUT_DIR/misspelled.yaml" args
  mapfile -t args < <(validator_args)
  cat >"$bad" <<'EOF'
apiVersion: v1
kind: Service
metadata:
  name: misspelled
spec:
  prots:
    - port: 80
EOF
  if "$PYTHON" "$VALIDATOR" --quiet "${args[@]}" "$bad" >/dev/null 2>&1; then
    die "the validator accepted a Service with a misspelled field (spec.prots)"
  fi
  cat >"$bad" <<'EOF'
apiVersion: ray.io/v1
kind: RayCluster
metadata:
  name: misspelled
spec:
  headGroupSpec:
    rayStartParams: {}
    templat:
      spec:
        containers: []
EOF
  if "$PYTHON" "$VALIDATOR" --quiet "${args[@]}" "$bad" >/dev/null 2>&1; then
    die "the validator accepted a RayCluster with a misspelled field (spec.headGroupSpec.templat)"
  fi
  rm -f "$bad"
}

main() {
  helm_works || build_helm
  if [[ "${1:-}" == "--helm-path" ]]; then
    echo "$HELM"
    return 0
  fi
  if [[ "${1:-}" == "--validator-args" ]]; then
    fetch_crds
    validator_args
    return 0
  fi
  [[ -f "$CHART/Chart.yaml" ]] || die "$CHART/Chart.yaml not found"
  [[ -x "$PYTHON" ]] || die "$PYTHON not found; run make install"
  "$PYTHON" -c 'import kubernetes_validate' 2>/dev/null ||
    die "the Python package kubernetes-validate is missing from .venv; run make install"
  fetch_crds
  mkdir -p "$OUT_DIR"
  say "using helm $("$HELM" version --short)"

  "$HELM" lint --strict "$CHART" >"$OUT_DIR/lint.log" 2>&1 || {
    cat "$OUT_DIR/lint.log" >&2
    die "helm lint --strict failed with the default values"
  }
  "$HELM" lint --strict "$CHART" -f "$EVERYTHING_VALUES" >"$OUT_DIR/lint.log" 2>&1 || {
    cat "$OUT_DIR/lint.log" >&2
    die "helm lint --strict failed with $EVERYTHING_VALUES"
  }
  say "helm lint --strict: no findings (default values, ci/everything-values.yaml)"

  # (helm notes at level INFO that the files under files/ are links: kept in template.log.)
  "$HELM" template gristmill "$CHART" --namespace gristmill >"$OUT_DIR/default.yaml" 2>"$OUT_DIR/template.log" || {
    cat "$OUT_DIR/template.log" >&2
    die "helm template failed with the default values"
  }
  "$HELM" template gristmill "$CHART" --namespace gristmill -f "$EVERYTHING_VALUES" >"$OUT_DIR/everything.yaml" \
    2>"$OUT_DIR/template.log" || {
    cat "$OUT_DIR/template.log" >&2
    die "helm template failed with $EVERYTHING_VALUES"
  }
  [[ "${1:-}" == "--print" ]] && cat "$OUT_DIR/default.yaml"

  self_test
  validate "$OUT_DIR/default.yaml" "default values"
  validate "$OUT_DIR/everything.yaml" "ci/everything-values.yaml"
  say "the chart renders valid manifests (Kubernetes ${KUBE_VERSIONS[*]}; default values and everything on)"
}

main "$@"
