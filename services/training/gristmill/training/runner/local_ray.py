"""The processes of the service's local Ray cluster end with the service, however the service ends.

Ray ties its GCS, raylet, monitor and dashboard head to the thread that started them (``PR_SET_PDEATHSIG``), but
not the raylet's own children: a SIGKILLed service left ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent``
running under init, and with a job running, its workers too, while the restarted service started a cluster of
its own beside them. Two safeguards, both keyed by the cluster's Ray session directory:

* a **watchdog** per cluster (``python -m gristmill.training.runner.local_ray watch <session> <owner>``), a small
  process in a session of its own that blocks reading a pipe only the service writes to: when the service ends,
  whatever ends it, the pipe reads end-of-file and the watchdog stops every process of the cluster's session.
* a **record** of the cluster (``ray-cluster.json`` in the service's data directory: owner pid and start time,
  session directory, watchdog pid). A service starting on that data directory first stops what its
  predecessor's cluster left behind (when the watchdog died as well: a SIGKILL of every process, an OOM kill),
  unless the owner still runs.

A process belongs to a session when it runs as the calling user and its command line names the session
directory, or one of its open files lies in it: Ray renames its agents and workers (``ray::DashboardAgent``), so
their command lines no longer show it, but they keep their logs open under ``<session>/logs``. No other process
is touched, so other clusters on the machine (other services', other users', tests') are safe.

No Ray import here: the watchdog starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RECORD_FILE = "ray-cluster.json"
_PROC = Path("/proc")


def proc_strings(pid: int, name: str, proc: Path = _PROC) -> list[str]:
    """A NUL-separated file of a process (``cmdline``, ``environ``) as its strings; OSError when it is gone."""
    return (proc / str(pid) / name).read_bytes().decode(errors="replace").split("\0")


@dataclass(frozen=True)
class ClusterRecord:
    """Which local Ray cluster a service started, kept in its data directory while the cluster runs."""

    owner_pid: int
    # The owner's start time (clock ticks after boot): a pid reused by another process is not the owner.
    owner_started: int
    session_dir: str
    watchdog_pid: int = 0


def process_started(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks after boot), or None when no such process runs (or a zombie)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _parent(pid: int) -> int:
    try:
        return int((_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _in_session(path: str, session_dirs: Collection[str]) -> bool:
    return any(path == s or path.startswith(s + "/") for s in session_dirs)


def _belongs(pid: int, session_dirs: Collection[str]) -> bool:
    base = _PROC / str(pid)
    try:
        if base.stat().st_uid != os.getuid():
            return False
        args = proc_strings(pid, "cmdline")
    except OSError:
        return False
    # "--session_dir=<session>", "--log_dir=<session>/logs", "<session>" (a watchdog's argument), ...
    if any(_in_session(a.split("=", 1)[-1], session_dirs) or any(f"{s}/" in a for s in session_dirs) for a in args):
        return True
    try:
        fds = os.listdir(base / "fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(base / "fd" / fd)
        except OSError:
            continue
        if _in_session(target, session_dirs):
            return True
    return False


def _session_dirs(session_dir: str) -> set[str]:
    return {session_dir.rstrip("/"), os.path.realpath(session_dir)}


def session_processes(session_dir: str, *, exclude: Iterable[int] = ()) -> list[int]:
    """The live processes of the calling user that belong to the Ray session ``session_dir``."""
    if not session_dir or not _PROC.is_dir():
        return []
    dirs = _session_dirs(session_dir)
    skip = {os.getpid(), *exclude}
    pids = (int(entry) for entry in os.listdir(_PROC) if entry.isdigit())
    return sorted(pid for pid in pids if pid not in skip and process_started(pid) is not None and _belongs(pid, dirs))


def _describe(pid: int) -> str:
    try:
        args = [a.strip() for a in proc_strings(pid, "cmdline")]
    except OSError:
        args = []
    if args and Path(args[0]).name.startswith("python"):
        args = [a for a in args[1:] if a and not a.startswith("-")] or args  # the script, not the interpreter
    name = Path(args[0]).name if args and args[0].startswith("/") else (args[0] if args else "?")
    return f"{pid} ({name}, parent {_parent(pid)})"


def stop_session(session_dir: str, *, exclude: Iterable[int] = (), grace_s: float = 5.0) -> list[str]:
    """Stop every process of the session: SIGTERM, then SIGKILL what is left after ``grace_s``. Returns what it
    stopped (pid, name and parent of each), for the log."""
    skip = set(exclude)
    stopped: dict[int, str] = {}
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        # Scanned again every round: a dying raylet may still have started a worker.
        pids = session_processes(session_dir, exclude=skip)
        if not pids:
            break
        for pid in pids:
            stopped.setdefault(pid, _describe(pid))
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
            except PermissionError:
                skip.add(pid)
        time.sleep(0.1)
        if sig == signal.SIGTERM and time.monotonic() >= deadline:
            sig = signal.SIGKILL
        elif sig == signal.SIGKILL and time.monotonic() >= deadline + grace_s:
            left = session_processes(session_dir, exclude=skip)
            if left:
                log.warning("Ray session %s: processes %s outlived SIGKILL", session_dir, left)
            break
    return list(stopped.values())


def read_record(state_dir: Path) -> ClusterRecord | None:
    path = Path(state_dir) / RECORD_FILE
    try:
        return ClusterRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring the unreadable Ray cluster record %s: %s", path, exc)
        return None


def write_record(state_dir: Path, record: ClusterRecord) -> None:
    path = Path(state_dir) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(asdict(record)))
    partial.replace(path)


def remove_record(state_dir: Path) -> None:
    (Path(state_dir) / RECORD_FILE).unlink(missing_ok=True)


def owner_record(session_dir: str, watchdog_pid: int) -> ClusterRecord:
    """The record of a cluster this process owns."""
    return ClusterRecord(
        owner_pid=os.getpid(),
        owner_started=process_started(os.getpid()) or 0,
        session_dir=session_dir,
        watchdog_pid=watchdog_pid,
    )


def stop_predecessor(state_dir: Path) -> list[str]:
    """Stop what the cluster recorded in ``state_dir`` left running, unless its owner still runs. Returns what it
    stopped; the record is gone afterwards."""
    record = read_record(state_dir)
    if record is None:
        return []
    if process_started(record.owner_pid) == record.owner_started and record.owner_pid != os.getpid():
        log.warning(
            "the Ray cluster of %s (session %s) belongs to process %d, which still runs: left alone",
            state_dir,
            record.session_dir,
            record.owner_pid,
        )
        return []
    stopped = stop_session(record.session_dir)
    if stopped:
        log.warning(
            "stopped %d processes of the previous local Ray cluster (session %s, owner %d gone): %s",
            len(stopped),
            record.session_dir,
            record.owner_pid,
            ", ".join(stopped),
        )
    remove_record(state_dir)
    return stopped


class SessionWatchdog:
    """The watchdog process of one session (see the module's docstring)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, session_dir: str) -> SessionWatchdog:
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, "watch", session_dir, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C (to the service's process group) reaches the service, which
            # stops Ray itself; the watchdog only acts once the service is gone.
            start_new_session=True,
        )
        return cls(process)

    def close(self, timeout_s: float = 30.0) -> None:
        """End the watchdog: it stops whatever of the session still runs (the owner excepted), then exits."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("the Ray watchdog %d did not exit in %.0fs; killing it", self.process.pid, timeout_s)
            self.process.kill()
            self.process.wait()


def _watch(session_dir: str, owner_pid: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    owner_started = process_started(owner_pid)
    while sys.stdin.buffer.read(4096):
        pass  # nothing is ever written: end-of-file means the owner closed the pipe or is gone
    # A normal stop closes the pipe while the owner still runs (it must not be stopped itself).
    owner_alive = owner_started is not None and process_started(owner_pid) == owner_started
    stopped = stop_session(session_dir, exclude={owner_pid} if owner_alive else ())
    if stopped:
        with contextlib.suppress(OSError):  # the owner's stderr may be gone with it
            print(
                f"ray watchdog: stopped {len(stopped)} processes of Ray session {session_dir} "
                f"(owner {owner_pid} {'stopping' if owner_alive else 'gone'}): {', '.join(stopped)}",
                file=sys.stderr,
                flush=True,
            )
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "watch":
        print("usage: python -m gristmill.training.runner.local_ray watch SESSION_DIR OWNER_PID", file=sys.stderr)
        return 2
    return _watch(argv[1], int(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
