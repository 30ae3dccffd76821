#!/usr/bin/env bash
# Local PostgreSQL server: Debian's PostgreSQL binaries, one cluster in the run directory, loopback TCP only.
# The services' stores of the local stack live here, a database per service (gristmill up creates them).
#
#   deploy/local/postgres.sh {provision|start|stop|status|wait|clean}
#
#   provision  install Debian's postgresql package when its binaries are missing (root only; once)
#   start      provision if needed, initdb once (superuser role gristmill, trust on loopback), start the server,
#              wait until it answers a query as gristmill (a role that may CREATE DATABASE)
#   stop       fast shutdown (SIGINT: sessions are cut), SIGKILL after $GRISTMILL_POSTGRES_STOP_TIMEOUT s (30)
#   status     "postgres: up on 127.0.0.1:<port>" (exit 0) or "postgres: down" (exit 1)
#   wait       wait until the server answers (timeout $GRISTMILL_POSTGRES_START_TIMEOUT s, default 60)
#   clean      stop and delete the cluster (every database in it)
#
# initdb and postgres refuse to run as root: as root, both run as the unprivileged $GRISTMILL_POSTGRES_OS_USER
# (default postgres, the Debian package's user), which owns the data directory; otherwise as the current user.
#
# Environment: GRISTMILL_POSTGRES_PORT (5433), GRISTMILL_POSTGRES_OS_USER (postgres), GRISTMILL_POSTGRES_BIN
#   (the newest /usr/lib/postgresql/*/bin), GRISTMILL_RUN_DIR, GRISTMILL_BIND_HOST (127.0.0.1), GRISTMILL_POSTGRES_TRUST_CIDR
#   (a subnet trusted besides loopback; for deploy/cluster/). Log: $GRISTMILL_RUN_DIR/logs/postgres.log
#   Clients: postgresql://gristmill@127.0.0.1:<port>/postgres (no password: trust on loopback, a dev stack).
set -euo pipefail

COMPONENT=postgres
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PG_PORT="$(port_from_env GRISTMILL_POSTGRES_PORT 5433)"
PG_ROLE=gristmill
OS_USER="${GRISTMILL_POSTGRES_OS_USER:-postgres}"
START_TIMEOUT="${GRISTMILL_POSTGRES_START_TIMEOUT:-60}"
STOP_TIMEOUT="${GRISTMILL_POSTGRES_STOP_TIMEOUT:-30}"
DATA="$GRISTMILL_DATA_DIR/postgres"
LOG="$GRISTMILL_LOG_DIR/postgres.log"
PROVISION_LOG="$GRISTMILL_LOG_DIR/postgres-provision.log"
PROCESS_MARKER="-D $DATA "

# The newest installed server's bin directory (Debian keeps them under /usr/lib/postgresql/<major>/bin).
pg_bin() {
  if [[ -n "${GRISTMILL_POSTGRES_BIN:-}" ]]; then
    echo "$GRISTMILL_POSTGRES_BIN"
    return 0
  fi
  local dir
  dir="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n1)"
  echo "${dir:-/usr/lib/postgresql/bin}"
}

binaries_present() {
  local bin tool
  bin="$(pg_bin)"
  for tool in initdb postgres pg_isready psql; do
    [[ -x "$bin/$tool" ]] || return 1
  done
}

# The prefix that runs a command as the server's owner: the unprivileged OS user when we are root, else nothing
# (ourselves). setpriv execs (no intermediate process), so a spawned server's pid is the postmaster's own.
AS_OWNER=()
if ((EUID == 0)); then
  AS_OWNER=(setpriv --reuid="$OS_USER" --regid="$OS_USER" --init-groups --)
fi

cmd_provision() {
  ensure_run_dirs
  if binaries_present; then
    say "PostgreSQL binaries in $(pg_bin)"
    return 0
  fi
  ((EUID == 0)) ||
    die "PostgreSQL server binaries (initdb, postgres, pg_isready, psql) not found in $(pg_bin); install them (as root: apt-get install -y postgresql) or set GRISTMILL_POSTGRES_BIN"
  need_cmd apt-get "install the PostgreSQL server (initdb, postgres, pg_isready, psql) and set GRISTMILL_POSTGRES_BIN"
  say "installing Debian's postgresql package; log: $PROVISION_LOG"
  local start=$SECONDS
  apt_install "$PROVISION_LOG" postgresql
  binaries_present || die "postgresql is installed but initdb/postgres/pg_isready/psql are missing from $(pg_bin)"
  say "provisioned PostgreSQL in $(pg_bin) in $((SECONDS - start)) s"
}

# The data directory belongs to the server's owner, mode 0700 (initdb and postgres insist on both).
prepare_data_dir() {
  mkdir -p "$DATA"
  if ((EUID == 0)); then
    id -u "$OS_USER" >/dev/null 2>&1 ||
      die "the OS user $OS_USER does not exist; create it or set GRISTMILL_POSTGRES_OS_USER to an unprivileged user"
    chown "$OS_USER:" "$DATA"
  fi
  chmod 700 "$DATA"
  "${AS_OWNER[@]}" test -w "$DATA" ||
    die "$OS_USER cannot reach $DATA (a parent directory is not searchable by it, e.g. a mode-0700 temporary directory); use a GRISTMILL_RUN_DIR under a world-searchable path"
}

init_cluster() {
  [[ -f "$DATA/PG_VERSION" ]] && return 0
  say "creating the cluster in $DATA (superuser role $PG_ROLE, trust on loopback)"
  local out
  # Trust on loopback only (the server listens on 127.0.0.1 alone): a development and test server.
  if ! out="$("${AS_OWNER[@]}" "$(pg_bin)/initdb" -D "$DATA" -U "$PG_ROLE" --auth=trust --encoding=UTF8 --locale=C \
    --no-sync 2>&1)"; then
    echo "$out" >>"$LOG"
    die "initdb in $DATA failed; see $LOG"
  fi
  echo "$out" >>"$LOG"
  # A cluster node (deploy/cluster/) listens on its own address: trust the cluster's private subnet too.
  if [[ -n "${GRISTMILL_POSTGRES_TRUST_CIDR:-}" ]]; then
    echo "host all all $GRISTMILL_POSTGRES_TRUST_CIDR trust" >>"$DATA/pg_hba.conf"
  fi
}

psql_as() { # psql_as <role> <sql>: one query, tuples only, on this server's postgres database
  "$(pg_bin)/psql" -X -q -t -A -w -v ON_ERROR_STOP=1 -h "$BIND_HOST" -p "$PG_PORT" -U "$1" -d postgres -c "$2"
}

accepting() { "$(pg_bin)/pg_isready" -q -h "$BIND_HOST" -p "$PG_PORT" -t 2 >/dev/null 2>&1; }

# A real round trip: a query answered as the role the services use.
probe() { accepting && [[ "$(psql_as "$PG_ROLE" 'SELECT 1' 2>/dev/null)" == 1 ]]; }

# The role the services and tests use, allowed to create their databases. initdb makes it the superuser; a
# cluster made otherwise (by hand, an older script) gets it through its bootstrap superuser.
ensure_role() {
  local may
  may="$(psql_as "$PG_ROLE" "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = '$PG_ROLE'" 2>/dev/null)" ||
    may=""
  [[ "$may" == t ]] && return 0
  say "creating the role $PG_ROLE (LOGIN CREATEDB)"
  psql_as "$OS_USER" "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ROLE') THEN CREATE ROLE $PG_ROLE LOGIN CREATEDB;
      ELSE ALTER ROLE $PG_ROLE LOGIN CREATEDB; END IF; END \$\$" >>"$LOG" 2>&1 ||
    die "could not create the role $PG_ROLE on $BIND_HOST:$PG_PORT; see $LOG"
}

# The port of the running server, read from the command line it was started with.
running_port() {
  local pid="$1"
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | sed -n '/^-p$/{n;p;}'
}

# Accepting connections, then the role exists (a cluster without it accepts connections too), then a query.
wait_up() {
  wait_ready "$START_TIMEOUT" "$LOG" accepting
  ensure_role
  probe || die "postgres on $BIND_HOST:$PG_PORT accepts connections but does not answer queries as $PG_ROLE; see $LOG"
}

cmd_start() {
  ensure_run_dirs
  local pid actual
  if pid="$(running_pid)"; then
    actual="$(running_port "$pid")"
    if [[ "$actual" != "$PG_PORT" ]]; then
      die "postgres is already running (pid $pid) on port ${actual:-?}, not $PG_PORT; run '$0 stop' first"
    fi
    if probe; then
      say "already running (pid $pid) on $BIND_HOST:$PG_PORT; log: $LOG"
      return 0
    fi
    say "running (pid $pid) but not answering yet; waiting"
    wait_up
    say "up on $BIND_HOST:$PG_PORT (pid $pid); log: $LOG"
    return 0
  fi
  binaries_present || cmd_provision
  if port_open "$PG_PORT"; then
    die "port $PG_PORT on $BIND_HOST is already in use by another process; set GRISTMILL_POSTGRES_PORT to a free port"
  fi
  prepare_data_dir
  init_cluster
  say "starting on $BIND_HOST:$PG_PORT; log: $LOG"
  local start=$SECONDS
  # A development and test server whose data can be rebuilt at will: fsync, synchronous commit and full-page
  # writes trade crash safety of the whole cluster (an OS crash or power loss may corrupt it; a killed
  # server does not) for speed, which is what two shared cores and hundreds of test databases need. Never
  # copy these settings to a server whose data matters. TCP on loopback only; no Unix socket (stacks of
  # other run directories then never meet in a shared socket directory).
  spawn "$LOG" "${AS_OWNER[@]}" "$(pg_bin)/postgres" -D "$DATA" \
    -p "$PG_PORT" -c "listen_addresses=$BIND_HOST" -c unix_socket_directories= \
    -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
    -c max_connections=300 -c shared_buffers=64MB -c log_min_messages=warning
  wait_up
  say "up on $BIND_HOST:$PG_PORT (pid $(running_pid)) after $((SECONDS - start)) s; log: $LOG"
}

cmd_wait() {
  running_pid >/dev/null || die "postgres is not running; start it with $0 start (log: $LOG)"
  wait_up
  say "up on $BIND_HOST:$PG_PORT"
}

# Fast shutdown (SIGINT): open sessions are rolled back and cut. SIGTERM would be a "smart" shutdown that
# waits for every client (services keep pooled connections) to disconnect.
cmd_stop() {
  stop_process "$STOP_TIMEOUT" INT
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    PG_PORT="$(running_port "$pid")"
  fi
  if [[ -n "${pid:-}" ]] && port_open "$PG_PORT"; then
    echo "postgres: up on $BIND_HOST:$PG_PORT (pid $pid, log $LOG)"
    return 0
  fi
  if [[ -n "${pid:-}" ]]; then
    echo "postgres: down (pid $pid is running but port $PG_PORT is closed; log $LOG)"
  elif port_open "$PG_PORT"; then
    echo "postgres: down (port $PG_PORT is held by a process this checkout did not start)"
  else
    echo "postgres: down"
  fi
  return 1
}

cmd_clean() {
  cmd_stop
  rm -rf "$DATA"
  say "deleted $DATA (every database of this stack)"
}

main_verbs "$@"
