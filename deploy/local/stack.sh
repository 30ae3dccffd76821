#!/usr/bin/env bash
# The local stack without Docker: a PostgreSQL server, a Kafka broker and a SeaweedFS S3 server on 127.0.0.1.
#
#   deploy/local/stack.sh {up|down|status|provision|clean}
#
#   provision  install/fetch/build each one (PostgreSQL from Debian, the others into $GRISTMILL_CACHE; once; timed)
#   up         provision if needed, start each, wait until each answers real requests, print endpoints
#   down       stop each
#   status     one line per component; exit 1 if any is down
#   clean      stop each and delete its data under $GRISTMILL_RUN_DIR (not the cache)
#
# Every setting is an environment variable of deploy/local/postgres.sh, kafka.sh or seaweedfs.sh.
set -euo pipefail

COMPONENT=stack
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
HERE="$GRISTMILL_ROOT/deploy/local"
COMPONENTS=(postgres kafka seaweedfs)

provision() {
  local c start
  for c in "${COMPONENTS[@]}"; do
    start=$SECONDS
    "$HERE/$c.sh" provision
    say "provisioned $c in $((SECONDS - start)) s"
  done
}

up() {
  local c i rc=0 start=$SECONDS out
  provision
  # The three start side by side (Kafka's and SeaweedFS's waits overlap: ~7 s less than one after the other); each
  # one's lines are printed together once it is ready, in a fixed order, and any failure fails `up`.
  out=$(mktemp -d)
  local pids=()
  for c in "${COMPONENTS[@]}"; do
    ("$HERE/$c.sh" start && say "$c ready in $((SECONDS - start)) s") >"$out/$c" 2>&1 &
    pids+=($!)
  done
  for i in "${!COMPONENTS[@]}"; do
    wait "${pids[$i]}" || rc=1
    cat "$out/${COMPONENTS[$i]}"
  done
  rm -rf "$out"
  [ "$rc" = 0 ] || die "the local stack did not start (above: what failed; logs in $GRISTMILL_LOG_DIR)"
  local kafka_port="${GRISTMILL_KAFKA_PORT:-9092}" s3_port="${GRISTMILL_S3_PORT:-8333}"
  local pg_port="${GRISTMILL_POSTGRES_PORT:-5433}"
  cat <<EOF

Local stack is up (stop it with deploy/local/stack.sh down):
  PostgreSQL postgresql://gristmill@127.0.0.1:$pg_port/postgres   log $GRISTMILL_LOG_DIR/postgres.log
         (gristmill up keeps each service's store in a database of its own here)
  Kafka  127.0.0.1:$kafka_port          log $GRISTMILL_LOG_DIR/kafka.log
  S3     http://127.0.0.1:$s3_port     log $GRISTMILL_LOG_DIR/seaweedfs.log
         access key ${GRISTMILL_S3_ACCESS_KEY:-gristmill}, secret key from GRISTMILL_S3_SECRET_KEY (default gristmill-secret)
For the services and tests:
  export GRISTMILL_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$kafka_port
  export GRISTMILL_S3_ENDPOINT=127.0.0.1:$s3_port
  export GRISTMILL_S3_ACCESS_KEY=${GRISTMILL_S3_ACCESS_KEY:-gristmill}
  export GRISTMILL_TEST_POSTGRES_URL=postgresql+psycopg://gristmill@127.0.0.1:$pg_port/postgres
EOF
}

down() {
  local c rc=0
  # Reverse order; keep going when one fails so nothing is left running.
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    c="${COMPONENTS[$i]}"
    "$HERE/$c.sh" stop || rc=1
  done
  return "$rc"
}

status() {
  local c rc=0
  for c in "${COMPONENTS[@]}"; do
    "$HERE/$c.sh" status || rc=1
  done
  return "$rc"
}

clean() {
  local c rc=0
  for c in "${COMPONENTS[@]}"; do
    "$HERE/$c.sh" clean || rc=1
  done
  return "$rc"
}

case "${1:-}" in
  up | down | status | provision | clean) "$1" ;;
  *)
    echo "usage: $0 {up|down|status|provision|clean}" >&2
    exit 2
    ;;
esac
