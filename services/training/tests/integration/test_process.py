"""``python -m gristmill.training`` as a process with its own local Ray: the cluster's processes end with the
service, however it ends.

* SIGKILL of the service *and* its watchdog: Ray's agents stay behind (Ray's own ``PR_SET_PDEATHSIG`` takes only
  the GCS, raylet, monitor and dashboard head), and the next service on the same data directory stops them (found
  by the session directory recorded there) before it starts its own cluster, which then trains a job.
* SIGKILL of the service: its watchdog stops the whole Ray session.

Processes are matched by their Ray session directory only, so the other Ray clusters on the machine are safe.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.storage import LocalObjectStore
from gristmill.training.runner.local_ray import (
    RECORD_FILE,
    ClusterRecord,
    read_record,
    session_processes,
    stop_session,
)
from services.training.tests.conftest import write_sentiment_version
from services.training.tests.service_support import job_spec

pytestmark = pytest.mark.integration

T = TypeVar("T")

# How long the processes of a session may take to go once their owner is gone.
GONE_WITHIN_S = 30.0


class ServiceProcess:
    """One ``python -m gristmill.training`` on ``data_dir``, its stderr collected on a thread (never blocking it)."""

    def __init__(self, data_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GRISTMILL_KAFKA", "GRISTMILL_S3"))}
        env |= {
            "GRISTMILL_TRAINING_DATA_DIR": str(data_dir),
            "GRISTMILL_TRAINING_GRPC_PORT": "0",
            "GRISTMILL_TRAINING_RAY_NUM_CPUS": "1",
            "GRISTMILL_TRAINING_SHUTDOWN_GRACE_S": "2",
            "GRISTMILL_AUTH_DISABLED": "true",  # embedded (no Kafka): no admin service to verify keys
        }
        self.data_dir = data_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gristmill.training"], env=env, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def ready(self, timeout_s: float = 180.0) -> tuple[int, ClusterRecord]:
        """The gRPC port and the record of the service's Ray cluster, once both are there."""
        port = wait_until(lambda: _port(self.log), timeout_s, lambda: f"no gRPC port:\n{self.log[-4000:]}")
        record = wait_until(
            lambda: r if (r := read_record(self.data_dir)) and r.owner_pid == self.process.pid else None,
            timeout_s,
            lambda: f"no Ray cluster recorded:\n{self.log[-4000:]}",
        )
        return port, record

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def _port(log: str) -> int | None:
    found = re.search(r"serving gRPC on 127\.0\.0\.1:(\d+)", log)
    return int(found.group(1)) if found else None


def wait_until(value: Callable[[], T | None], timeout_s: float, message: Callable[[], str]) -> T:
    deadline = time.monotonic() + timeout_s
    while (result := value()) is None or result == []:
        assert time.monotonic() < deadline, message()
        time.sleep(0.2)
    return result


def gone(session_dir: str) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    while left := session_processes(session_dir):
        assert time.monotonic() < deadline, f"still running after {GONE_WITHIN_S:.0f}s: {_names(left)}"
        time.sleep(0.2)


def _names(pids: list[int]) -> list[str]:
    names = []
    for pid in pids:
        try:
            names.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip() or str(pid))
        except OSError:
            names.append(str(pid))
    return names


@pytest.fixture
def sessions() -> Iterator[list[str]]:
    """Session directories the test started; whatever of them is left is stopped at the end."""
    started: list[str] = []
    yield started
    for session_dir in started:
        stop_session(session_dir, grace_s=2.0)


def test_a_restart_stops_what_a_killed_service_left_and_a_killed_service_leaves_nothing(
    tmp_path: Path, tiny_model: Path, sessions: list[str]
) -> None:
    data_dir = tmp_path / "data"
    processes: list[ServiceProcess] = []
    try:
        # 1. SIGKILL of the service and its watchdog (a kill of every process, the OOM killer): Ray's agents stay.
        first = ServiceProcess(data_dir)
        processes.append(first)
        _, record = first.ready()
        sessions.append(record.session_dir)
        running = _names(session_processes(record.session_dir))
        assert any("raylet" in name for name in running), running
        assert record.watchdog_pid in session_processes(record.session_dir)
        os.kill(record.watchdog_pid, signal.SIGKILL)
        first.kill()
        time.sleep(3)  # what Ray stops by itself (GCS, raylet, monitor, dashboard: PR_SET_PDEATHSIG) is gone by now
        orphans = session_processes(record.session_dir)
        assert orphans, "Ray left nothing behind: this test no longer shows the restart's clean-up"
        assert (data_dir / RECORD_FILE).exists()

        # 2. The next service on the data directory stops them before it starts its own cluster, which trains a job.
        second = ServiceProcess(data_dir)
        processes.append(second)
        port, new_record = second.ready()
        sessions.append(new_record.session_dir)
        assert new_record.session_dir != record.session_dir
        gone(record.session_dir)
        assert f"session {record.session_dir}, owner {first.process.pid} gone" in second.log, second.log[-4000:]
        write_sentiment_version(LocalObjectStore(data_dir / "objects"))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.TrainingServiceStub(channel)
            job = stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model, epochs=1)), timeout=60)

            def ended() -> pb.Job | None:
                current = stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=10)
                return current if current.end_time.seconds else None

            done = wait_until(ended, 240, lambda: f"the job did not end:\n{second.log[-4000:]}")
            assert done.state == pb.JOB_STATE_SUCCEEDED, done.state_reason

        # 3. SIGKILL of the service alone: its watchdog stops the whole session (workers of the job included).
        second.process.send_signal(signal.SIGKILL)
        second.process.wait(30)
        gone(new_record.session_dir)
    finally:
        for service in processes:
            service.kill()
