"""What a restarted service stops of its predecessor's local Ray cluster: exactly the processes of the recorded
session (named on their command line, or with a file open in it, as Ray's renamed agents and workers have),
nothing of another session, and nothing while the recorded owner still runs. Stand-in processes, no Ray."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gristmill.training.runner.local_ray import (
    RECORD_FILE,
    ClusterRecord,
    SessionWatchdog,
    owner_record,
    process_started,
    read_record,
    session_processes,
    stop_predecessor,
    write_record,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")


class Spawner:
    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def plain(self) -> subprocess.Popen[bytes]:
        return self._start(["sleep", "60"])

    def holding(self, session: Path) -> subprocess.Popen[bytes]:
        """Like ``ray::DashboardAgent``: a log file of the session open, nothing on its command line."""
        (session / "logs").mkdir(parents=True, exist_ok=True)
        return self._start(["sh", "-c", f"exec 3>>{session}/logs/agent.out; exec sleep 60"])

    def with_argument(self, session: Path) -> subprocess.Popen[bytes]:
        """Like the raylet: the session directory is on its command line."""
        return self._start([sys.executable, "-c", "import time; time.sleep(60)", f"--log_dir={session}/logs"])

    def _start(self, args: list[str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(args)
        self.started.append(process)
        return process

    def finished_pid(self) -> tuple[int, int]:
        """A pid and start time of a process that has ended (an owner that was killed)."""
        process = subprocess.Popen(["sleep", "60"])
        started = process_started(process.pid)
        assert started is not None
        process.kill()
        process.wait()
        return process.pid, started


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    spawner = Spawner()
    yield spawner
    for process in spawner.started:
        process.kill()
        process.wait()


def _wait_ended(process: subprocess.Popen[bytes]) -> int:
    return process.wait(15)


def test_a_dead_owners_session_is_stopped_and_nothing_else(tmp_path: Path, spawn: Spawner) -> None:
    session, other = tmp_path / "ray" / "session_a", tmp_path / "ray" / "session_a2"
    agent, worker = spawn.holding(session), spawn.with_argument(session)
    bystander = spawn.holding(other)  # another cluster, its name a prefix match of the first
    time.sleep(0.5)  # the shell has opened its file and exec'd sleep
    assert session_processes(str(session)) == sorted([agent.pid, worker.pid])
    owner, started = spawn.finished_pid()
    write_record(tmp_path, ClusterRecord(owner_pid=owner, owner_started=started, session_dir=str(session)))

    stopped = stop_predecessor(tmp_path)

    assert len(stopped) == 2 and any(f"{agent.pid} (sleep" in s for s in stopped), stopped
    assert _wait_ended(agent) and _wait_ended(worker)
    assert bystander.poll() is None
    assert not (tmp_path / RECORD_FILE).exists()
    assert stop_predecessor(tmp_path) == []  # nothing recorded any more


def test_a_live_owners_session_is_left_alone(tmp_path: Path, spawn: Spawner) -> None:
    session = tmp_path / "ray" / "session_b"
    agent = spawn.holding(session)
    owner = spawn.plain()
    started = process_started(owner.pid)
    assert started is not None
    write_record(tmp_path, ClusterRecord(owner_pid=owner.pid, owner_started=started, session_dir=str(session)))
    time.sleep(0.5)

    assert stop_predecessor(tmp_path) == []
    assert agent.poll() is None
    # The same pid with another start time is another process: the owner is gone.
    write_record(tmp_path, ClusterRecord(owner_pid=owner.pid, owner_started=started - 1, session_dir=str(session)))
    assert stop_predecessor(tmp_path)
    assert _wait_ended(agent)


def test_the_watchdog_stops_the_session_when_its_pipe_closes_but_not_its_owner(tmp_path: Path, spawn: Spawner) -> None:
    session = tmp_path / "ray" / "session_c"
    agent = spawn.holding(session)
    time.sleep(0.5)
    watchdog = SessionWatchdog.start(str(session))
    write_record(tmp_path, owner_record(str(session), watchdog.pid))
    record = read_record(tmp_path)
    assert record is not None and record.watchdog_pid == watchdog.pid
    time.sleep(0.5)
    assert agent.poll() is None  # the owner (this process) runs: the watchdog waits

    watchdog.close()

    assert _wait_ended(agent)
    assert watchdog.process.returncode == 0
