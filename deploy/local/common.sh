# shellcheck shell=bash
# Shared helpers for deploy/local/*.sh. Sourced, never executed.
#
# Directories (both overridable by environment):
#   GRISTMILL_CACHE    downloads and builds that survive between clones  (default $HOME/.cache/gristmill)
#   GRISTMILL_RUN_DIR  data, logs and pid files of this checkout          (default <repo root>/.run, git-ignored)

GRISTMILL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
GRISTMILL_CACHE="${GRISTMILL_CACHE:-$HOME/.cache/gristmill}"
GRISTMILL_RUN_DIR="${GRISTMILL_RUN_DIR:-$GRISTMILL_ROOT/.run}"
GRISTMILL_LOG_DIR="$GRISTMILL_RUN_DIR/logs"
GRISTMILL_PID_DIR="$GRISTMILL_RUN_DIR/pids"
GRISTMILL_DATA_DIR="$GRISTMILL_RUN_DIR/data"
GRISTMILL_CONF_DIR="$GRISTMILL_RUN_DIR/conf"
export GRISTMILL_CACHE GRISTMILL_RUN_DIR
# The address servers listen on: loopback for the local stack; a node's own address when deploy/cluster/ starts
# them inside a node's network namespace.
BIND_HOST="${GRISTMILL_BIND_HOST:-127.0.0.1}"

# The one line a failing script prints on stderr.
die() {
  echo "error: $*" >&2
  exit 1
}

# Progress for people; stdout so that `status` output and progress read the same way.
say() {
  echo "$COMPONENT: $*"
}

need_cmd() { # need_cmd <command> <hint>
  command -v "$1" >/dev/null 2>&1 || die "$1 not found; $2"
}

apt_install() { # apt_install <log> <package...>: Debian packages, as root; dies naming the log on failure
  local log=$1
  shift
  # A stale package list is the usual reason an install fails on a fresh machine: update once, then retry.
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"$log" 2>&1; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; } >>"$log" 2>&1 ||
      die "apt-get install $* failed; see $log"
  fi
}

# A port number from an environment variable, validated.
port_from_env() { # port_from_env <var name> <default>
  local value="${!1:-$2}"
  if ! [[ "$value" =~ ^[0-9]+$ ]] || ((value < 1 || value > 65535)); then
    die "$1=$value is not a TCP port number"
  fi
  echo "$value"
}

ensure_run_dirs() {
  mkdir -p "$GRISTMILL_LOG_DIR" "$GRISTMILL_PID_DIR" "$GRISTMILL_DATA_DIR" "$GRISTMILL_CONF_DIR"
}

port_open() { # port_open <port>: something accepts TCP connections on $BIND_HOST:<port>
  (exec 3<>"/dev/tcp/$BIND_HOST/$1") 2>/dev/null
}

pid_file() { echo "$GRISTMILL_PID_DIR/$COMPONENT.pid"; }

# Prints the pid of our running process, or fails. A stale pid file (process gone, or the pid reused by an
# unrelated program) counts as not running. $PROCESS_MARKER is a string that the process's command line holds.
running_pid() {
  local file pid
  file="$(pid_file)"
  [[ -f "$file" ]] || return 1
  pid="$(<"$file")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$PROCESS_MARKER" || return 1
  echo "$pid"
}

# Starts "$@" in its own session, detached from this shell, output appended to <log>; writes the pid file.
spawn() { # spawn <log> <command...>
  local log="$1"
  shift
  {
    echo
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) starting $COMPONENT: $*"
  } >>"$log"
  # No job control in a script, so the background child is not a group leader and setsid does not fork:
  # $! is the server's own pid (and its process group id).
  nohup setsid "$@" >>"$log" 2>&1 </dev/null &
  local pid=$! tries=0
  echo "$pid" >"$(pid_file)"
  # Until the child has exec'd, its command line is this shell's; wait for it so running_pid is reliable. Up to
  # 30 s: three Kafka brokers starting at once on two cores (deploy/cluster/) once took longer than 5 s to get
  # there, and the start then took the server for dead ("exited during start-up") while it came up.
  while ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$PROCESS_MARKER"; do
    kill -0 "$pid" 2>/dev/null || break
    ((++tries < 600)) || break
    sleep 0.05
  done
}

# <signal> (default TERM), wait up to <timeout> seconds, then SIGKILL. No-op when not running.
stop_process() { # stop_process <timeout seconds> [signal]
  local timeout="$1" signal="${2:-TERM}" pid waited=0
  if ! pid="$(running_pid)"; then
    rm -f "$(pid_file)"
    say "not running"
    return 0
  fi
  say "stopping (pid $pid)"
  kill "-$signal" "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do
    if ((waited >= timeout * 2)); then
      say "still running after ${timeout} s, sending SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
  rm -f "$(pid_file)"
  say "stopped"
}

# Calls <probe> every second until it succeeds; fails when the process dies or after <timeout> seconds.
wait_ready() { # wait_ready <timeout seconds> <log> <probe function>
  local timeout="$1" log="$2" probe="$3" start=$SECONDS pid
  while true; do
    if "$probe"; then
      return 0
    fi
    if ! pid="$(running_pid)"; then
      local last
      last="$(grep -v '^[[:space:]]*$' "$log" 2>/dev/null | tail -n1 | cut -c1-200)"
      die "$COMPONENT exited during start-up${last:+ ($last)}; see $log"
    fi
    if ((SECONDS - start >= timeout)); then
      die "$COMPONENT (pid $pid) not ready after ${timeout} s; see $log"
    fi
    sleep 1
  done
}

# A writable copy of a Go module's source at <dest>, for modules that `go install pkg@version` refuses
# (their go.mod has replace or exclude directives, which only apply to a main module): the module is
# fetched through the Go module proxy into the module cache (read-only), then copied. No-op when done.
go_module_source() { # go_module_source <module> <version> <dest> <log>
  local module="$1" version="$2" dest="$3" log="$4" json dir
  [[ -f "$dest/.complete" ]] && return 0
  if ! json="$(go mod download -json "$module@$version" 2>>"$log")"; then
    echo "$json" >>"$log"
    die "go mod download of $module@$version failed; see $log"
  fi
  dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")"
  if [[ -z "$dir" || ! -f "$dir/go.mod" ]]; then
    echo "$json" >>"$log"
    die "go mod download gave no source directory for $module@$version; see $log"
  fi
  rm -rf "$dest.partial"
  mkdir -p "$(dirname "$dest")"
  cp -r "$dir" "$dest.partial"
  chmod -R u+w "$dest.partial"
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
  touch "$dest/.complete"
}

# Dispatches the standard verbs to cmd_<verb> functions.
main_verbs() {
  local verb="${1:-}"
  case "$verb" in
    provision | start | stop | status | wait | clean) "cmd_$verb" ;;
    *)
      echo "usage: $0 {provision|start|stop|status|wait|clean}" >&2
      exit 2
      ;;
  esac
}
