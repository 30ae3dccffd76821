#!/usr/bin/env bash
# The networked end-to-end test on brand-new brokers, N times in a row:
#
#   deploy/local/soak.sh [N]        (default 10)
#
# Each round wipes a PostgreSQL server, a Kafka broker and a SeaweedFS server of the soak's own (their data: the
# services' databases, consumer groups, __consumer_offsets, everything a new install starts without), starts
# them, and runs tests/e2e (the demo on the local stack, a process per service, the registry killed
# mid-training). A developer's running stack is left alone: the soak uses its own run directory and ports. A
# failed round keeps its logs under the soak directory: round-N.log (pytest), round-N-logs/ (PostgreSQL, Kafka,
# SeaweedFS), round-N-tmp/ (every service's log). Ends with one line per round and "N passed, M failed"; exits 1
# if any round failed.
#
# Environment: GRISTMILL_SOAK_DIR (<run dir>/soak), GRISTMILL_SOAK_KAFKA_PORT (9192), GRISTMILL_SOAK_S3_PORT
#   (8433; its other ports are derived from it as in seaweedfs.sh), GRISTMILL_SOAK_POSTGRES_PORT (5533),
#   PYTEST_ARGS (extra pytest arguments).
set -euo pipefail

COMPONENT=soak
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
HERE="$GRISTMILL_ROOT/deploy/local"

rounds="${1:-10}"
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 [N]  (N = how many rounds, a positive number; got '$rounds')"
SOAK_DIR="${GRISTMILL_SOAK_DIR:-$GRISTMILL_RUN_DIR/soak}"
PY="$GRISTMILL_ROOT/.venv/bin/python"
[[ -x "$PY" ]] || die "$PY not found: run 'make install' first"

# Everything below talks to the soak's own brokers.
export GRISTMILL_RUN_DIR="$SOAK_DIR/stack"
GRISTMILL_KAFKA_PORT="$(port_from_env GRISTMILL_SOAK_KAFKA_PORT 9192)"
GRISTMILL_S3_PORT="$(port_from_env GRISTMILL_SOAK_S3_PORT 8433)"
GRISTMILL_POSTGRES_PORT="$(port_from_env GRISTMILL_SOAK_POSTGRES_PORT 5533)"
export GRISTMILL_KAFKA_PORT GRISTMILL_S3_PORT GRISTMILL_POSTGRES_PORT
export GRISTMILL_TEST_POSTGRES_URL="postgresql+psycopg://gristmill@127.0.0.1:$GRISTMILL_POSTGRES_PORT/postgres"
export HF_HUB_OFFLINE=1
mkdir -p "$SOAK_DIR"
trap '"$HERE/stack.sh" down >/dev/null 2>&1 || true' EXIT

passed=0 failed=0 results=()
for ((round = 1; round <= rounds; round++)); do
  say "round $round/$rounds: wiping and starting PostgreSQL (127.0.0.1:$GRISTMILL_POSTGRES_PORT), Kafka (:$GRISTMILL_KAFKA_PORT) and SeaweedFS (:$GRISTMILL_S3_PORT)"
  "$HERE/stack.sh" clean >/dev/null
  "$HERE/stack.sh" up >"$SOAK_DIR/stack-up.log" 2>&1 || { cat "$SOAK_DIR/stack-up.log" >&2; die "the soak's stack did not start"; }
  log="$SOAK_DIR/round-$round.log"
  # The test's temporary directory holds the services' logs, pid files and databases: kept for a failed round.
  basetemp="$SOAK_DIR/round-$round-tmp"
  rm -rf "$basetemp"
  start=$SECONDS
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of arguments
  if (cd "$GRISTMILL_ROOT" && CI=true "$PY" -m pytest tests/e2e -x -q -p no:cacheprovider --basetemp "$basetemp" ${PYTEST_ARGS:-} >"$log" 2>&1); then
    outcome=passed
    passed=$((passed + 1))
    rm -rf "$basetemp"
  else
    outcome=FAILED
    failed=$((failed + 1))
    mkdir -p "$SOAK_DIR/round-$round-logs"
    cp -r "$GRISTMILL_RUN_DIR/logs/." "$SOAK_DIR/round-$round-logs/" 2>/dev/null || true
  fi
  results+=("round $round: $outcome in $((SECONDS - start)) s ($(tail -n 1 "$log"))")
  say "${results[-1]}"
done

echo
printf '%s\n' "${results[@]}"
echo "soak: $passed passed, $failed failed"
((failed == 0))
