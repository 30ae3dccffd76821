#!/usr/bin/env bash
# Several "nodes" on one machine: each node is a Linux network namespace with its own address on a private
# bridge, so that a Ray cluster, a Kafka cluster or service replicas run as they would on separate hosts
# (each process sees only its node's interfaces; a killed node takes all of its processes with it).
#
#   deploy/cluster/cluster.sh up N             create the bridge and nodes 1..N (idempotent)
#   deploy/cluster/cluster.sh down             kill every process in every node, remove nodes and bridge
#   deploy/cluster/cluster.sh status           the nodes, their addresses and how many processes each runs
#   deploy/cluster/cluster.sh ip K             node K's address
#   deploy/cluster/cluster.sh exec K CMD...    run CMD in node K (foreground), with GRISTMILL_BIND_HOST set to
#                                              node K's address and GRISTMILL_RUN_DIR to .run/cluster/nK
#   deploy/cluster/cluster.sh kill K           SIGKILL every process in node K (a node crash; the node stays)
#   deploy/cluster/cluster.sh cut K | heal K   take node K's link down / up (a network partition)
#
# Isolation: nodes have no default route, so their traffic goes only to the bridge's subnet (the other nodes
# and the host's bridge address) and to their own loopback, never to any other address. Needs root (or
# CAP_NET_ADMIN) and iproute2.
#
# Environment: GRISTMILL_CLUSTER_NAME (gm: bridge "gm-br", namespaces "gm-n1".., host-side links "gm-n1-h"..),
#   GRISTMILL_CLUSTER_SUBNET (10.231.0: the host is .1, node K is .(10+K), a /24), GRISTMILL_RUN_DIR.
set -euo pipefail

COMPONENT=cluster
# shellcheck source-path=SCRIPTDIR source=../local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../local/common.sh"

NAME="${GRISTMILL_CLUSTER_NAME:-gm}"
SUBNET="${GRISTMILL_CLUSTER_SUBNET:-10.231.0}"
BRIDGE="$NAME-br"
HOST_IP="$SUBNET.1"
MAX_NODES=32

[[ "$NAME" =~ ^[a-z][a-z0-9]{0,5}$ ]] || die "GRISTMILL_CLUSTER_NAME=$NAME must be 1-6 lowercase letters or digits"
[[ "$SUBNET" =~ ^10\.[0-9]{1,3}\.[0-9]{1,3}$ ]] ||
  die "GRISTMILL_CLUSTER_SUBNET=$SUBNET must be the first three parts of a private 10.x.y address"

node_number() { # node_number <K or nK>: validated node number
  local k="${1#n}"
  [[ "$k" =~ ^[0-9]+$ ]] && ((k >= 1 && k <= MAX_NODES)) || die "no node '$1' (nodes are 1..$MAX_NODES)"
  echo "$k"
}
netns_of() { echo "$NAME-n$1"; }
ip_of() { echo "$SUBNET.$((10 + $1))"; }
node_exists() { ip netns list | awk '{print $1}' | grep -qx "$(netns_of "$1")"; }
nodes() { ip netns list | awk '{print $1}' | sed -n "s/^$NAME-n\([0-9]*\)$/\1/p" | sort -n; }

require_root() {
  need_cmd ip "install iproute2 (apt-get install iproute2)"
  [[ "$(id -u)" == 0 ]] || die "network namespaces need root; run as root (or with CAP_NET_ADMIN)"
}

cmd_up() {
  local count="${1:-}"
  [[ "$count" =~ ^[0-9]+$ ]] && ((count >= 1 && count <= MAX_NODES)) || die "usage: $0 up N (1..$MAX_NODES)"
  require_root
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$HOST_IP/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  local k ns
  for ((k = 1; k <= count; k++)); do
    ns="$(netns_of "$k")"
    node_exists "$k" && continue
    ip netns add "$ns"
    ip link add "$ns-h" type veth peer name eth0 netns "$ns"
    ip link set "$ns-h" master "$BRIDGE" up
    ip -n "$ns" addr add "$(ip_of "$k")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    # The nodes share the host's name (one UTS namespace) and /etc: `ip netns exec` mounts /etc/netns/<ns>/hosts
    # over /etc/hosts, so on each node the host name resolves to that node's own address, as on a real machine
    # (torch.distributed's Gloo, for one, advertises the address its host name resolves to).
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n%s %s\n' "$(ip_of "$k")" "$(hostname)" \
      >"/etc/netns/$ns/hosts"
    mkdir -p "$GRISTMILL_RUN_DIR/cluster/n$k"
    say "node $k up: namespace $ns, address $(ip_of "$k")"
  done
}

kill_node_processes() { # kill_node_processes <K>: SIGKILL until the node runs nothing (children may fork late)
  local ns pids tries=0
  ns="$(netns_of "$1")"
  while pids="$(ip netns pids "$ns" 2>/dev/null)" && [[ -n "$pids" ]]; do
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    ((++tries < 50)) || die "node $1 still runs processes after 5 s: $pids"
    sleep 0.1
  done
}

cmd_down() {
  require_root
  local k
  for k in $(nodes); do
    kill_node_processes "$k"
    ip link del "$(netns_of "$k")-h" 2>/dev/null || true
    ip netns del "$(netns_of "$k")"
    rm -rf "/etc/netns/$(netns_of "$k")"
    say "node $k removed"
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link del "$BRIDGE"
  fi
  say "down"
}

cmd_status() {
  local k count=0
  for k in $(nodes); do
    echo "node $k: $(ip_of "$k") namespace $(netns_of "$k"), $(ip netns pids "$(netns_of "$k")" | wc -l) processes"
    count=$((count + 1))
  done
  ((count > 0)) || {
    echo "cluster: no nodes"
    return 1
  }
}

cmd_exec() {
  local k
  k="$(node_number "${1:-}")"
  shift
  (($# > 0)) || die "usage: $0 exec K COMMAND..."
  node_exists "$k" || die "node $k does not exist; run '$0 up N' first"
  mkdir -p "$GRISTMILL_RUN_DIR/cluster/n$k"
  exec ip netns exec "$(netns_of "$k")" env GRISTMILL_BIND_HOST="$(ip_of "$k")" GRISTMILL_NODE="$k" \
    GRISTMILL_RUN_DIR="$GRISTMILL_RUN_DIR/cluster/n$k" "$@"
}

cmd_kill() {
  local k
  k="$(node_number "${1:-}")"
  node_exists "$k" || die "node $k does not exist"
  kill_node_processes "$k"
  say "node $k killed (every process in it)"
}

cmd_link() { # cmd_link <K> <up|down>
  local k
  k="$(node_number "${1:-}")"
  node_exists "$k" || die "node $k does not exist"
  ip link set "$(netns_of "$k")-h" "$2"
  say "node $k link $2"
}

verb="${1:-}"
shift || true
case "$verb" in
  up) cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  ip) ip_of "$(node_number "${1:-}")" ;;
  exec) cmd_exec "$@" ;;
  kill) cmd_kill "$@" ;;
  cut) cmd_link "${1:-}" down ;;
  heal) cmd_link "${1:-}" up ;;
  *)
    echo "usage: $0 {up N|down|status|ip K|exec K CMD...|kill K|cut K|heal K}" >&2
    exit 2
    ;;
esac
