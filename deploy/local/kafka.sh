#!/usr/bin/env bash
# Local Apache Kafka broker: one JVM in KRaft combined mode (broker + controller), loopback only,
# from Maven Central jars (no download site, no Docker). With GRISTMILL_KAFKA_VOTERS set, one broker of a
# replicated cluster (one per node under deploy/cluster/; see its README).
#
#   deploy/local/kafka.sh {provision|start|stop|status|wait|clean}
#
#   provision  fetch the broker classpath with Maven into $GRISTMILL_CACHE/kafka/<version>/libs (once)
#   start      provision if needed, format storage once, start the broker, wait until it answers requests
#   stop       SIGTERM, then SIGKILL after $GRISTMILL_KAFKA_STOP_TIMEOUT s (default 30)
#   status     "kafka: up on 127.0.0.1:<port>" (exit 0) or "kafka: down" (exit 1)
#   wait       wait until the broker answers (timeout $GRISTMILL_KAFKA_START_TIMEOUT s, default 90)
#   clean      stop and delete the broker's data (not the cache)
#
# Environment: GRISTMILL_KAFKA_PORT (9092), GRISTMILL_KAFKA_CONTROLLER_PORT (kafka port + 1),
#   GRISTMILL_KAFKA_HEAP (512m), GRISTMILL_CACHE, GRISTMILL_RUN_DIR,
#   GRISTMILL_BIND_HOST (127.0.0.1; a node's own address under deploy/cluster/). Log: $GRISTMILL_RUN_DIR/logs/kafka.log
#
# Cluster mode (set all three on every broker; unset, the single broker above, nothing replicated):
#   GRISTMILL_KAFKA_VOTERS      the controller quorum: id@host:controller-port of every broker, e.g.
#                               1@10.231.0.11:9093,2@10.231.0.12:9093,3@10.231.0.13:9093 (a static quorum)
#   GRISTMILL_KAFKA_NODE_ID     this broker's id: one of the voters, at $GRISTMILL_BIND_HOST (default 1)
#   GRISTMILL_KAFKA_CLUSTER_ID  one id for all brokers, 22 base64url characters, e.g. from python3 -c
#                               'import base64,uuid;print(base64.urlsafe_b64encode(uuid.uuid4().bytes)[:22].decode())'
#   Each broker's storage is formatted once with that id. Topics get min(3, voters) replicas and
#   min.insync.replicas one less (3 and 2 for three brokers; the internal offsets, transaction and share-state
#   topics too), unclean leader election stays off: an acks=all write survives the loss of one broker.
#   Start the brokers together: each `start` returns once its broker answers, which needs a quorum of voters.
set -euo pipefail

COMPONENT=kafka
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

KAFKA_VERSION=4.3.1 # keep equal to kafka.version in deploy/local/kafka/pom.xml
KAFKA_PORT="$(port_from_env GRISTMILL_KAFKA_PORT 9092)"
KAFKA_CONTROLLER_PORT="$(port_from_env GRISTMILL_KAFKA_CONTROLLER_PORT $((KAFKA_PORT + 1)))"
KAFKA_HEAP="${GRISTMILL_KAFKA_HEAP:-512m}"
START_TIMEOUT="${GRISTMILL_KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${GRISTMILL_KAFKA_STOP_TIMEOUT:-30}"
NODE_ID="${GRISTMILL_KAFKA_NODE_ID:-1}"
VOTERS="${GRISTMILL_KAFKA_VOTERS:-}"
CLUSTER_ID="${GRISTMILL_KAFKA_CLUSTER_ID:-}"
[[ "$NODE_ID" =~ ^[0-9]+$ ]] || die "GRISTMILL_KAFKA_NODE_ID=$NODE_ID is not a broker id (a number)"
[[ -z "$CLUSTER_ID" || "$CLUSTER_ID" =~ ^[A-Za-z0-9_-]{22}$ ]] ||
  die "GRISTMILL_KAFKA_CLUSTER_ID=$CLUSTER_ID is not a Kafka cluster id (22 base64url characters)"
# Copies of each partition, and how many must have a write before it is acknowledged (acks=all).
REPLICAS=1
MIN_ISR=1
if [[ -n "$VOTERS" ]]; then
  [[ "$VOTERS" =~ ^[0-9]+@[^,@:]+:[0-9]+(,[0-9]+@[^,@:]+:[0-9]+)*$ ]] ||
    die "GRISTMILL_KAFKA_VOTERS=$VOTERS is not a list of id@host:port"
  [[ ",$VOTERS," == *",$NODE_ID@$BIND_HOST:$KAFKA_CONTROLLER_PORT,"* ]] ||
    die "GRISTMILL_KAFKA_VOTERS=$VOTERS does not name this broker ($NODE_ID@$BIND_HOST:$KAFKA_CONTROLLER_PORT)"
  [[ -n "$CLUSTER_ID" ]] ||
    die "cluster mode (GRISTMILL_KAFKA_VOTERS set) needs GRISTMILL_KAFKA_CLUSTER_ID, the same on every broker"
  VOTER_COUNT="$(tr ',' '\n' <<<"$VOTERS" | wc -l)"
  REPLICAS=$((VOTER_COUNT < 3 ? VOTER_COUNT : 3))
  MIN_ISR=$((REPLICAS > 1 ? REPLICAS - 1 : 1))
fi

POM="$GRISTMILL_ROOT/deploy/local/kafka/pom.xml"
LOG4J_CONFIG="$GRISTMILL_ROOT/deploy/local/kafka/log4j2.properties"
CACHE_DIR="$GRISTMILL_CACHE/kafka/$KAFKA_VERSION"
LIBS="$CACHE_DIR/libs"
MARKER="$CACHE_DIR/.provisioned" # holds the pom's checksum; written only after a complete download
DATA="$GRISTMILL_DATA_DIR/kafka"
PROPS="$GRISTMILL_CONF_DIR/kafka/server.properties"
PROBE_PROPS="$GRISTMILL_CONF_DIR/kafka/probe.properties"
LOG="$GRISTMILL_LOG_DIR/kafka.log"
PROVISION_LOG="$GRISTMILL_LOG_DIR/kafka-provision.log"
PROCESS_MARKER="kafka.Kafka $PROPS"

check_java() {
  need_cmd java "install OpenJDK 17 (apt-get install openjdk-17-jre-headless)"
  local version
  version="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)"
  [[ -n "$version" && "$version" -ge 17 ]] ||
    die "java ${version:-?} is too old; Kafka $KAFKA_VERSION needs Java 17+ (apt-get install openjdk-17-jre-headless)"
}

pom_sum() { sha256sum "$POM" | cut -d' ' -f1; }

provisioned() { [[ -f "$MARKER" && "$(<"$MARKER")" == "$(pom_sum)" ]]; }

cmd_provision() {
  ensure_run_dirs
  if provisioned; then
    say "Kafka $KAFKA_VERSION jars cached in $LIBS"
    return 0
  fi
  need_cmd mvn "install Maven (apt-get install maven)"
  check_java
  mkdir -p "$CACHE_DIR"
  exec 9>"$CACHE_DIR/.lock"
  flock 9 # another checkout may be provisioning the same cache
  if provisioned; then
    exec 9>&-
    say "Kafka $KAFKA_VERSION jars cached in $LIBS"
    return 0
  fi
  say "fetching Kafka $KAFKA_VERSION jars with Maven into $LIBS; log: $PROVISION_LOG"
  local tmp="$CACHE_DIR/libs.partial" start=$SECONDS
  rm -rf "$tmp"
  if ! mvn -B -q -f "$POM" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$tmp" >"$PROVISION_LOG" 2>&1; then
    rm -rf "$tmp"
    die "Maven could not fetch the Kafka $KAFKA_VERSION jars; see $PROVISION_LOG"
  fi
  [[ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] ||
    die "Maven finished but kafka_2.13-$KAFKA_VERSION.jar is missing from $tmp; see $PROVISION_LOG"
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  pom_sum >"$MARKER"
  exec 9>&-
  say "provisioned Kafka $KAFKA_VERSION ($(find "$LIBS" -name '*.jar' | wc -l) jars) in $((SECONDS - start)) s"
}

# The controller quorum: this broker alone, or the voters of cluster mode (a static quorum).
quorum_config() {
  if [[ -n "$VOTERS" ]]; then
    echo "controller.quorum.voters=$VOTERS"
  else
    echo "controller.quorum.bootstrap.servers=$BIND_HOST:$KAFKA_CONTROLLER_PORT"
  fi
}

write_config() {
  mkdir -p "$(dirname "$PROPS")" "$DATA"
  cat >"$PROPS" <<EOF
# Generated by deploy/local/kafka.sh; edits are overwritten on the next start.
process.roles=broker,controller
node.id=$NODE_ID
$(quorum_config)
listeners=PLAINTEXT://$BIND_HOST:$KAFKA_PORT,CONTROLLER://$BIND_HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$BIND_HOST:$KAFKA_PORT,CONTROLLER://$BIND_HOST:$KAFKA_CONTROLLER_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA
num.partitions=3
offsets.topic.replication.factor=$REPLICAS
transaction.state.log.replication.factor=$REPLICAS
transaction.state.log.min.isr=$MIN_ISR
share.coordinator.state.topic.replication.factor=$REPLICAS
share.coordinator.state.topic.min.isr=$MIN_ISR
group.initial.rebalance.delay.ms=0
# Local use: topics appear on first use, as the services expect.
auto.create.topics.enable=true
EOF
  if [[ -n "$VOTERS" ]]; then
    cat >>"$PROPS" <<EOF
# Cluster mode: every topic on $REPLICAS brokers, an acks=all write on $MIN_ISR of them before it is acknowledged;
# a replica that fell out of sync never becomes leader.
default.replication.factor=$REPLICAS
min.insync.replicas=$MIN_ISR
unclean.leader.election.enable=false
EOF
  fi
  cat >"$PROBE_PROPS" <<EOF
request.timeout.ms=5000
default.api.timeout.ms=8000
EOF
}

# Runs a Kafka tool class in the foreground, its log4j output going to the console (WARN and up).
kafka_tool() {
  java -Xmx256m -cp "$LIBS/*" -Dlog4j2.configurationFile="file:$LOG4J_CONFIG" \
    -Dgristmill.console.level=WARN "$@"
}

format_storage() {
  [[ -f "$DATA/meta.properties" ]] && return 0
  local cluster_id="$CLUSTER_ID" out quorum=(--standalone)
  if [[ -z "$cluster_id" ]]; then
    cluster_id="$(kafka_tool kafka.tools.StorageTool random-uuid 2>>"$LOG")" ||
      die "kafka StorageTool random-uuid failed; see $LOG"
  fi
  # Cluster mode: the voters are the configuration's (controller.quorum.voters), not this broker alone.
  [[ -z "$VOTERS" ]] || quorum=()
  say "formatting storage in $DATA (cluster id $cluster_id, node $NODE_ID)"
  if ! out="$(kafka_tool kafka.tools.StorageTool format -t "$cluster_id" -c "$PROPS" "${quorum[@]}" 2>&1)"; then
    echo "$out" >>"$LOG"
    die "formatting Kafka storage in $DATA failed; see $LOG"
  fi
  echo "$out" >>"$LOG"
}

# A real round trip: the admin client fetches metadata and asks this broker for its configuration (in cluster
# mode it answers once a quorum of voters has formed and the broker has registered).
probe() {
  port_open "$KAFKA_PORT" || return 1
  timeout 30 java -Xmx128m -XX:TieredStopAtLevel=1 -cp "$LIBS/*" \
    -Dlog4j2.configurationFile="file:$LOG4J_CONFIG" -Dgristmill.console.level=OFF \
    kafka.admin.ConfigCommand --bootstrap-server "$BIND_HOST:$KAFKA_PORT" --command-config "$PROBE_PROPS" \
    --entity-type brokers --entity-name "$NODE_ID" --describe >/dev/null 2>&1
}

# The client port of the running broker, read from the configuration it was started with.
running_port() {
  sed -n 's|^listeners=PLAINTEXT://[^:]*:\([0-9]*\),.*|\1|p' "$PROPS" 2>/dev/null
}

cmd_start() {
  ensure_run_dirs
  local pid actual
  if pid="$(running_pid)"; then
    actual="$(running_port)"
    if [[ "$actual" != "$KAFKA_PORT" ]]; then
      die "kafka is already running (pid $pid) on port ${actual:-?}, not $KAFKA_PORT; run '$0 stop' first"
    fi
    if probe; then
      say "already running (pid $pid) on $BIND_HOST:$KAFKA_PORT; log: $LOG"
      return 0
    fi
    say "running (pid $pid) but not answering yet; waiting"
    wait_ready "$START_TIMEOUT" "$LOG" probe
    say "up on $BIND_HOST:$KAFKA_PORT (pid $pid); log: $LOG"
    return 0
  fi
  provisioned || cmd_provision
  check_java
  local port
  for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
    if port_open "$port"; then
      die "port $port on $BIND_HOST is already in use by another process; set GRISTMILL_KAFKA_PORT to a free port (controller port = kafka port + 1)"
    fi
  done
  write_config
  format_storage
  say "starting broker on $BIND_HOST:$KAFKA_PORT (controller $KAFKA_CONTROLLER_PORT); log: $LOG"
  local start=$SECONDS
  spawn "$LOG" java "-Xmx$KAFKA_HEAP" -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -cp "$LIBS/*" -Dlog4j2.configurationFile="file:$LOG4J_CONFIG" \
    -Dgristmill.log.file="$LOG" -Dgristmill.console.level=OFF \
    kafka.Kafka "$PROPS"
  wait_ready "$START_TIMEOUT" "$LOG" probe
  say "up on $BIND_HOST:$KAFKA_PORT (pid $(running_pid)) after $((SECONDS - start)) s; log: $LOG"
}

cmd_wait() {
  running_pid >/dev/null || die "kafka is not running; start it with $0 start (log: $LOG)"
  wait_ready "$START_TIMEOUT" "$LOG" probe
  say "up on $BIND_HOST:$KAFKA_PORT"
}

cmd_stop() {
  stop_process "$STOP_TIMEOUT"
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    KAFKA_PORT="$(running_port)"
  fi
  if [[ -n "${pid:-}" ]] && port_open "$KAFKA_PORT"; then
    echo "kafka: up on $BIND_HOST:$KAFKA_PORT (pid $pid, log $LOG)"
    return 0
  fi
  if [[ -n "${pid:-}" ]]; then
    echo "kafka: down (pid $pid is running but port $KAFKA_PORT is closed; log $LOG)"
  elif port_open "$KAFKA_PORT"; then
    echo "kafka: down (port $KAFKA_PORT is held by a process this checkout did not start)"
  else
    echo "kafka: down"
  fi
  return 1
}

cmd_clean() {
  cmd_stop
  rm -rf "$DATA" "$GRISTMILL_CONF_DIR/kafka"
  say "deleted $DATA (jar cache kept in $CACHE_DIR)"
}

main_verbs "$@"
