#!/usr/bin/env bash
# Checks the monitoring files under deploy/monitoring/ without a Prometheus server:
#   promtool check rules  alerts.yml        (the alert rules parse; PromQL valid)
#   promtool test rules   alerts_test.yml   (each alert fires on the series it is for, and not on the others)
#   promtool check config prometheus.yml    (the scrape configuration Compose loads)
# then deploy/monitoring/check_metrics.py: the Grafana dashboard parses as JSON, every gristmill_* metric (and label
# matched) in alerts.yml and the dashboard is one that the Python sources export (a renamed metric would leave an
# alert that never fires), the RPC latency alert leaves out every streaming RPC of protos/, and prometheus.yml scrapes
# every metrics port of docker-compose.yml; last, the
# dashboard's queries are parsed by promtool (written as recording rules to $GRISTMILL_RUN_DIR/monitoring/).
#
#   deploy/monitoring-check.sh                  check (exit 0) or print the problem and exit non-zero
#   deploy/monitoring-check.sh --promtool-path  only make sure promtool is built; print its path
#
# promtool is built once from the Go module proxy (`go install .../cmd/promtool@<version>`, with the build tag
# remove_all_sd: the cloud service-discovery plugins are left out, which the files here do not use and which would
# triple the build), cached at $GRISTMILL_CACHE/promtool/<version>/promtool; build log:
# $GRISTMILL_RUN_DIR/logs/promtool-build.log
set -euo pipefail

COMPONENT="monitoring-check"
# shellcheck source-path=SCRIPTDIR source=local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/local/common.sh"

# v0.316.0 (Prometheus 3.16.0): the newest release whose go.mod accepts the Go 1.26.8 on these machines (it asks
# for 1.26.7) and has no replace/exclude directives, so `go install` takes it (v0.315.x has them).
PROMETHEUS_MODULE=github.com/prometheus/prometheus
PROMETHEUS_VERSION=v0.316.0
PROMETHEUS_RELEASE=3.16.0  # the Prometheus release of that module version (v0.3XX.Y is 3.XX.Y)
PROMTOOL_DIR="$GRISTMILL_CACHE/promtool/$PROMETHEUS_VERSION"
PROMTOOL="$PROMTOOL_DIR/promtool"
BUILD_LOG="$GRISTMILL_LOG_DIR/promtool-build.log"
MONITORING="$GRISTMILL_ROOT/deploy/monitoring"
DASHBOARD="$MONITORING/grafana/gristmill.json"
METRICS_CHECK="$MONITORING/check_metrics.py"
PYTHON="$GRISTMILL_ROOT/.venv/bin/python"
OUT_DIR="$GRISTMILL_RUN_DIR/monitoring"

promtool_works() { [[ -x "$PROMTOOL" ]] && "$PROMTOOL" --version >/dev/null 2>&1; }

build_promtool() {
  need_cmd go "install Go 1.26.8 or newer to build promtool"
  mkdir -p "$PROMTOOL_DIR" "$GRISTMILL_LOG_DIR"
  exec 9>"$PROMTOOL_DIR/.lock"
  flock 9
  promtool_works && return 0
  local tmp="$PROMTOOL_DIR/bin.partial.$$" start=$SECONDS
  : >"$BUILD_LOG"
  say "building promtool $PROMETHEUS_VERSION once (a few minutes on 2 cores); log: $BUILD_LOG"
  if ! GOBIN="$tmp" go install -trimpath -tags remove_all_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_RELEASE" \
    "$PROMETHEUS_MODULE/cmd/promtool@$PROMETHEUS_VERSION" >>"$BUILD_LOG" 2>&1; then
    rm -rf "$tmp"
    die "building promtool $PROMETHEUS_VERSION failed; see $BUILD_LOG"
  fi
  mv -f "$tmp/promtool" "$PROMTOOL"
  rm -rf "$tmp"
  exec 9>&-
  say "built promtool $PROMETHEUS_VERSION in $((SECONDS - start)) s: $PROMTOOL"
}

main() {
  promtool_works || build_promtool
  if [[ "${1:-}" == "--promtool-path" ]]; then
    echo "$PROMTOOL"
    return 0
  fi
  [[ -x "$PYTHON" ]] || die "$PYTHON not found; run make install"
  say "using $("$PROMTOOL" --version 2>&1 | head -n1)"
  local out
  # promtool prints its findings on stdout: shown only when a check fails.
  out="$("$PROMTOOL" check rules "$MONITORING/alerts.yml" 2>&1)" || {
    echo "$out" >&2
    die "promtool check rules deploy/monitoring/alerts.yml failed"
  }
  out="$(cd "$MONITORING" && "$PROMTOOL" test rules alerts_test.yml 2>&1)" || {
    echo "$out" >&2
    die "promtool test rules deploy/monitoring/alerts_test.yml failed"
  }
  say "alerts.yml: $(grep -c '^  *- alert:' "$MONITORING/alerts.yml") alerts valid; alerts_test.yml passes"
  # prometheus.yml names rule_files relative to itself, as it is mounted in the container.
  out="$(cd "$MONITORING" && "$PROMTOOL" check config prometheus.yml 2>&1)" || {
    echo "$out" >&2
    die "promtool check config deploy/monitoring/prometheus.yml failed"
  }
  say "prometheus.yml is valid"
  # The dashboard parses, its queries and the alerts name only exported metrics and labels, and its queries are
  # valid PromQL (written out as recording rules for promtool).
  mkdir -p "$OUT_DIR"
  "$PYTHON" "$METRICS_CHECK" --protos "$GRISTMILL_ROOT/protos" --dashboard-rules "$OUT_DIR/dashboard-rules.yml" \
    --compose "$GRISTMILL_ROOT/docker-compose.yml" --prometheus "$MONITORING/prometheus.yml" \
    "$MONITORING/alerts.yml" "$DASHBOARD" "$GRISTMILL_ROOT/libs/gristmill" "$GRISTMILL_ROOT/services" ||
    die "alerts.yml, grafana/gristmill.json or prometheus.yml: see above"
  out="$("$PROMTOOL" check rules "$OUT_DIR/dashboard-rules.yml" 2>&1)" || {
    echo "$out" >&2
    die "a query of grafana/gristmill.json is not valid PromQL (see above; as rules: $OUT_DIR/dashboard-rules.yml)"
  }
  say "the dashboard's queries are valid PromQL; dashboard and alerts use only metrics the services export"
}

main "$@"
