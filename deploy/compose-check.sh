#!/usr/bin/env bash
# Validates docker-compose.yml, and docker-compose.tls.yml (the mTLS override) on top of it, with the real Docker
# Compose v2 CLI: `docker compose config -q`.
# No Docker engine is needed (config only reads and resolves the file).
#
#   deploy/compose-check.sh            validate (exit 0) or print the problem and exit non-zero
#   deploy/compose-check.sh --print    also print the resolved configuration
#
# Where `docker compose` is missing, the Compose CLI plugin is built once from the Go module proxy
# (github.com/docker/compose/v5, built in a copy of its source: `go install` refuses it), cached at
# $GRISTMILL_CACHE/compose/<version>/docker-compose and installed as
# ~/.docker/cli-plugins/docker-compose (only when no plugin is there yet). Build log:
# $GRISTMILL_RUN_DIR/logs/compose-build.log
set -euo pipefail

COMPONENT="compose-check"
# shellcheck source-path=SCRIPTDIR source=local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/local/common.sh"

# v5.6.0 is the newest release whose go.mod accepts the Go 1.26.8 on these machines (5.7.x wants 1.26.10).
COMPOSE_MODULE=github.com/docker/compose/v5
COMPOSE_VERSION=v5.6.0
BIN_DIR="$GRISTMILL_CACHE/compose/$COMPOSE_VERSION"
PLUGIN="$BIN_DIR/docker-compose"
SRC="$GRISTMILL_CACHE/src/compose-$COMPOSE_VERSION"
PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
BUILD_LOG="$GRISTMILL_LOG_DIR/compose-build.log"
COMPOSE_FILE="$GRISTMILL_ROOT/docker-compose.yml"
TLS_OVERRIDE="$GRISTMILL_ROOT/docker-compose.tls.yml"

plugin_works() { [[ -x "$1" ]] && "$1" version >/dev/null 2>&1; }

build_plugin() {
  need_cmd go "install Go 1.26.8 or newer to build the Docker Compose CLI, or install the docker-compose-plugin package"
  mkdir -p "$BIN_DIR" "$GRISTMILL_LOG_DIR"
  exec 9>"$BIN_DIR/.lock"
  flock 9
  plugin_works "$PLUGIN" && return 0
  local tmp="$PLUGIN.partial.$$" start=$SECONDS
  : >"$BUILD_LOG"
  # `go install ...@version` refuses this module (its go.mod has exclude directives): build in a copy.
  go_module_source "$COMPOSE_MODULE" "$COMPOSE_VERSION" "$SRC" "$BUILD_LOG"
  say "building Docker Compose $COMPOSE_VERSION once (about 3-5 minutes on 2 cores); log: $BUILD_LOG"
  if ! (cd "$SRC" && go build -buildvcs=false -trimpath \
    -ldflags "-s -w -X $COMPOSE_MODULE/internal.Version=$COMPOSE_VERSION" -o "$tmp" ./cmd) >>"$BUILD_LOG" 2>&1; then
    rm -f "$tmp"
    die "building Docker Compose $COMPOSE_VERSION failed; see $BUILD_LOG"
  fi
  mv -f "$tmp" "$PLUGIN"
  exec 9>&-
  say "built Docker Compose $COMPOSE_VERSION in $((SECONDS - start)) s: $PLUGIN"
}

# Prints the command that runs `compose`: the docker CLI with its plugin, or the plugin binary alone.
find_compose() {
  if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    echo "docker compose"
    return 0
  fi
  plugin_works "$PLUGIN" || build_plugin >&2
  if command -v docker >/dev/null 2>&1; then
    if [[ ! -e "$PLUGIN_DIR/docker-compose" ]]; then
      mkdir -p "$PLUGIN_DIR"
      cp "$PLUGIN" "$PLUGIN_DIR/docker-compose"
      say "installed $PLUGIN_DIR/docker-compose" >&2
    fi
    if docker compose version >/dev/null 2>&1; then
      echo "docker compose"
      return 0
    fi
  fi
  # No docker CLI (or it ignores the plugin): the plugin binary also runs on its own.
  echo "$PLUGIN"
}

main() {
  [[ -f "$COMPOSE_FILE" ]] || die "$COMPOSE_FILE not found"
  local compose
  compose="$(find_compose)"
  say "using $($compose version 2>/dev/null | head -n1)"
  # Service folders may not exist yet; `config` does not need the build contexts.
  if [[ "${1:-}" == "--print" ]]; then
    (cd "$GRISTMILL_ROOT" && $compose -f "$COMPOSE_FILE" config)
  else
    (cd "$GRISTMILL_ROOT" && $compose -f "$COMPOSE_FILE" config -q) || die "docker-compose.yml is not valid (see above)"
  fi
  say "docker-compose.yml is valid"
  if [[ -f "$TLS_OVERRIDE" ]]; then
    (cd "$GRISTMILL_ROOT" && $compose -f "$COMPOSE_FILE" -f "$TLS_OVERRIDE" config -q) ||
      die "docker-compose.tls.yml (over docker-compose.yml) is not valid (see above)"
    say "docker-compose.tls.yml is valid"
  fi
}

main "$@"
