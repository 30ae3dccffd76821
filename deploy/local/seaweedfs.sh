#!/usr/bin/env bash
# Local S3 server: SeaweedFS (Apache-2.0) built once from the Go module proxy, run as one `weed server`
# process (master + volume + filer + S3 gateway) on loopback only.
#
#   deploy/local/seaweedfs.sh {provision|start|stop|status|wait|clean}
#
#   provision  build the `weed` binary once into $GRISTMILL_CACHE/seaweedfs/<version>/weed (minutes)
#   start      provision if needed, start the server, wait until an authenticated S3 ListBuckets succeeds
#   stop       SIGTERM, then SIGKILL after $GRISTMILL_S3_STOP_TIMEOUT s (default 30)
#   status     "seaweedfs: up on 127.0.0.1:<port>" (exit 0) or "seaweedfs: down" (exit 1)
#   wait       wait until S3 answers (timeout $GRISTMILL_S3_START_TIMEOUT s, default 90)
#   clean      stop and delete the server's data (not the cache)
#
# Environment: GRISTMILL_S3_PORT (8333), GRISTMILL_S3_ACCESS_KEY (gristmill),
#   GRISTMILL_S3_SECRET_KEY (gristmill-secret), GRISTMILL_SEAWEEDFS_MASTER_PORT (S3 port + 1000),
#   GRISTMILL_SEAWEEDFS_VOLUME_PORT (S3 port + 1001), GRISTMILL_SEAWEEDFS_FILER_PORT (S3 port + 1002);
#   each gRPC port is its HTTP port + 10000. GRISTMILL_CACHE, GRISTMILL_RUN_DIR,
#   GRISTMILL_BIND_HOST (127.0.0.1; a node's own address under deploy/cluster/).
#   Log: $GRISTMILL_RUN_DIR/logs/seaweedfs.log
set -euo pipefail

COMPONENT=seaweedfs
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# `go install ...@version` is refused for this module (its go.mod has replace directives), so provision
# downloads the module source and builds ./weed inside it.
SEAWEEDFS_MODULE=github.com/seaweedfs/seaweedfs
SEAWEEDFS_VERSION=v0.0.0-20261109003541-7506e5f91cd6
S3_PORT="$(port_from_env GRISTMILL_S3_PORT 8333)"
MASTER_PORT="$(port_from_env GRISTMILL_SEAWEEDFS_MASTER_PORT $((S3_PORT + 1000)))"
VOLUME_PORT="$(port_from_env GRISTMILL_SEAWEEDFS_VOLUME_PORT $((S3_PORT + 1001)))"
FILER_PORT="$(port_from_env GRISTMILL_SEAWEEDFS_FILER_PORT $((S3_PORT + 1002)))"
S3_GRPC_PORT=$((S3_PORT + 10000))
ACCESS_KEY="${GRISTMILL_S3_ACCESS_KEY:-gristmill}"
SECRET_KEY="${GRISTMILL_S3_SECRET_KEY:-gristmill-secret}"
START_TIMEOUT="${GRISTMILL_S3_START_TIMEOUT:-90}"
STOP_TIMEOUT="${GRISTMILL_S3_STOP_TIMEOUT:-30}"

BIN_DIR="$GRISTMILL_CACHE/seaweedfs/$SEAWEEDFS_VERSION"
WEED="$BIN_DIR/weed"
SRC="$GRISTMILL_CACHE/src/seaweedfs-$SEAWEEDFS_VERSION"
DATA="$GRISTMILL_DATA_DIR/seaweedfs"
CONF="$GRISTMILL_CONF_DIR/seaweedfs"
IDENTITIES="$CONF/s3-identities.json"
LOG="$GRISTMILL_LOG_DIR/seaweedfs.log"
BUILD_LOG="$GRISTMILL_LOG_DIR/seaweedfs-build.log"
PROCESS_MARKER="-s3.config=$IDENTITIES"

binary_works() { [[ -x "$WEED" ]] && "$WEED" version >/dev/null 2>&1; }

cmd_provision() {
  ensure_run_dirs
  if binary_works; then
    say "SeaweedFS $SEAWEEDFS_VERSION cached at $WEED"
    return 0
  fi
  need_cmd go "install Go 1.25 or newer (the Go toolchain) to build SeaweedFS"
  mkdir -p "$BIN_DIR"
  exec 9>"$BIN_DIR/.lock"
  if ! flock -n 9; then
    say "another process is building SeaweedFS into $BIN_DIR; waiting for it"
    flock 9
  fi
  if binary_works; then
    exec 9>&-
    say "SeaweedFS $SEAWEEDFS_VERSION cached at $WEED"
    return 0
  fi
  local start=$SECONDS
  : >"$BUILD_LOG"
  if [[ ! -f "$SRC/.complete" ]]; then
    say "downloading $SEAWEEDFS_MODULE@$SEAWEEDFS_VERSION source; log: $BUILD_LOG"
    go_module_source "$SEAWEEDFS_MODULE" "$SEAWEEDFS_VERSION" "$SRC" "$BUILD_LOG"
  fi
  local tmp="$WEED.partial.$$"
  say "building SeaweedFS once, this takes ~4-10 minutes on 2 cores (cached afterwards); log: $BUILD_LOG"
  (cd "$SRC" && exec go build -buildvcs=false -trimpath -ldflags='-s -w' -o "$tmp" ./weed) >>"$BUILD_LOG" 2>&1 &
  local build_pid=$!
  # A killed provision must not leave the build running, nor a half-written binary behind.
  trap 'kill "$build_pid" 2>/dev/null; rm -f "$tmp"' EXIT
  while kill -0 "$build_pid" 2>/dev/null; do
    sleep 5
    if (((SECONDS - start) % 60 < 5)) && kill -0 "$build_pid" 2>/dev/null; then
      say "still building ($((SECONDS - start)) s so far)"
    fi
  done
  local rc=0
  wait "$build_pid" || rc=$?
  trap - EXIT
  if ((rc != 0)) || ! "$tmp" version >>"$BUILD_LOG" 2>&1; then
    rm -f "$tmp"
    die "building SeaweedFS failed (exit $rc); see $BUILD_LOG"
  fi
  mv -f "$tmp" "$WEED"
  exec 9>&-
  say "provisioned SeaweedFS $SEAWEEDFS_VERSION at $WEED in $((SECONDS - start)) s"
}

write_config() {
  [[ "$ACCESS_KEY" =~ ^[A-Za-z0-9._/+=-]+$ ]] ||
    die "GRISTMILL_S3_ACCESS_KEY may hold only letters, digits and ._/+=-"
  [[ "$SECRET_KEY" =~ ^[A-Za-z0-9._/+=-]+$ ]] ||
    die "GRISTMILL_S3_SECRET_KEY may hold only letters, digits and ._/+=-"
  mkdir -p "$CONF" "$DATA"
  (
    umask 077
    cat >"$IDENTITIES" <<EOF
{
  "identities": [
    {
      "name": "gristmill",
      "credentials": [{"accessKey": "$ACCESS_KEY", "secretKey": "$SECRET_KEY"}],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    }
  ]
}
EOF
  )
}

# A real round trip: an authenticated (SigV4) ListBuckets answered with S3 XML, then a small write through
# the filer (to a path outside /buckets, so S3 never shows it). The write matters after a restart: the
# master refuses volume assignments for a fixed warm-up (3 heartbeats of 5 s) while volume servers report
# in, and "ready" should mean that uploads work.
probe() {
  port_open "$S3_PORT" || return 1
  local body
  body="$(curl -fsS --max-time 5 --aws-sigv4 "aws:amz:us-east-1:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
    "http://$BIND_HOST:$S3_PORT/" 2>/dev/null)" || return 1
  [[ "$body" == *"<ListAllMyBucketsResult"* ]] || return 1
  probe_write
}

probe_write() {
  local url="http://$BIND_HOST:$FILER_PORT/.gristmill/readiness-probe"
  printf 'ok' | curl -fsS --max-time 20 -F "file=@-;filename=readiness-probe" "$url" >/dev/null 2>&1 || return 1
  curl -fsS --max-time 5 -X DELETE "$url" >/dev/null 2>&1 || true
}

# The S3 port of the running server, read from the command line it was started with.
running_port() {
  local pid="$1"
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | sed -n 's/^-s3\.port=//p'
}

cmd_start() {
  ensure_run_dirs
  local pid actual
  if pid="$(running_pid)"; then
    actual="$(running_port "$pid")"
    if [[ "$actual" != "$S3_PORT" ]]; then
      die "seaweedfs is already running (pid $pid) on port ${actual:-?}, not $S3_PORT; run '$0 stop' first"
    fi
    if probe; then
      say "already running (pid $pid) on $BIND_HOST:$S3_PORT; log: $LOG"
      return 0
    fi
    say "running (pid $pid) but not answering yet; waiting"
    wait_ready "$START_TIMEOUT" "$LOG" probe
    say "up on $BIND_HOST:$S3_PORT (pid $pid); log: $LOG"
    return 0
  fi
  binary_works || cmd_provision
  need_cmd curl "install curl (apt-get install curl)"
  local port
  for port in "$S3_PORT" "$S3_GRPC_PORT" "$MASTER_PORT" $((MASTER_PORT + 10000)) "$VOLUME_PORT" \
    $((VOLUME_PORT + 10000)) "$FILER_PORT" $((FILER_PORT + 10000)); do
    ((port < 65536)) || die "port $port is out of range; choose a lower GRISTMILL_S3_PORT"
    if port_open "$port"; then
      die "port $port on $BIND_HOST is already in use by another process; set GRISTMILL_S3_PORT (or GRISTMILL_SEAWEEDFS_*_PORT) to free ports"
    fi
  done
  write_config
  say "starting S3 on $BIND_HOST:$S3_PORT (master $MASTER_PORT, volume $VOLUME_PORT, filer $FILER_PORT); log: $LOG"
  local start=$SECONDS
  # -config_dir points at our own folder so that no ~/.seaweedfs or /etc/seaweedfs toml is picked up.
  # Iceberg and Lance catalogs are off (they would take ports 8181 and 9101); telemetry is off.
  (
    cd "$DATA"
    spawn "$LOG" "$WEED" -logtostderr=true -config_dir="$CONF" server \
      -dir="$DATA" -ip=$BIND_HOST -ip.bind=$BIND_HOST -idleTimeout=5 \
      -master.port="$MASTER_PORT" -master.port.grpc=$((MASTER_PORT + 10000)) \
      -master.volumeSizeLimitMB=64 -master.telemetry=false -master.electionTimeout=1s \
      -volume.port="$VOLUME_PORT" -volume.port.grpc=$((VOLUME_PORT + 10000)) \
      -volume.max=0 -volume.preStopSeconds=0 \
      -filer -filer.port="$FILER_PORT" -filer.port.grpc=$((FILER_PORT + 10000)) \
      -s3 -s3.port="$S3_PORT" -s3.port.grpc="$S3_GRPC_PORT" -s3.port.iceberg=0 -s3.port.lance=0 \
      -s3.config="$IDENTITIES"
  )
  wait_ready "$START_TIMEOUT" "$LOG" probe
  say "up on $BIND_HOST:$S3_PORT (pid $(running_pid)) after $((SECONDS - start)) s; log: $LOG"
}

cmd_wait() {
  running_pid >/dev/null || die "seaweedfs is not running; start it with $0 start (log: $LOG)"
  wait_ready "$START_TIMEOUT" "$LOG" probe
  say "up on $BIND_HOST:$S3_PORT"
}

cmd_stop() {
  stop_process "$STOP_TIMEOUT"
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    S3_PORT="$(running_port "$pid")"
  fi
  if [[ -n "${pid:-}" ]] && port_open "$S3_PORT"; then
    echo "seaweedfs: up on $BIND_HOST:$S3_PORT (pid $pid, log $LOG)"
    return 0
  fi
  if [[ -n "${pid:-}" ]]; then
    echo "seaweedfs: down (pid $pid is running but port $S3_PORT is closed; log $LOG)"
  elif port_open "$S3_PORT"; then
    echo "seaweedfs: down (port $S3_PORT is held by a process this checkout did not start)"
  else
    echo "seaweedfs: down"
  fi
  return 1
}

cmd_clean() {
  cmd_stop
  rm -rf "$DATA" "$CONF"
  say "deleted $DATA (binary kept in $BIN_DIR)"
}

main_verbs "$@"
