"""The service's own local Ray cluster, started in the background as the service does, stays alive, and its
processes run under SCHED_BATCH while the service's own threads keep the default policy, and it runs no log
monitor (nothing reads the worker logs it would stream).

In a subprocess: ``ray.init`` is process-wide, and this must be the process's first cluster.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import os
    import time
    import psutil
    import ray
    from gristmill.training.runner.ray_runner import RayCluster

    cluster = RayCluster(num_cpus=1, object_store_mb=100)
    cluster.start_in_background().join(120)  # the starting thread has ended, as in the service
    time.sleep(3)  # a raylet killed with its starting thread is gone by now

    @ray.remote(num_cpus=1)
    def answer() -> tuple[int, int]:
        return 42, os.sched_getscheduler(0)

    value, policy = ray.get(answer.remote(), timeout=60)
    print("answer", value, flush=True)
    print("worker policy", "batch" if policy == os.SCHED_BATCH else policy, flush=True)
    started = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
    print("log monitor", "running" if any("log_monitor.py" in c for c in started) else "stopped", flush=True)
    print("service policy", "other" if os.sched_getscheduler(0) == os.SCHED_OTHER else "changed", flush=True)
    cluster.stop()
    print("stopped", flush=True)
    """
)


def test_a_cluster_started_in_the_background_outlives_its_starting_thread_and_runs_as_batch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={"RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert "answer 42" in done.stdout and "stopped" in done.stdout, done.stderr[-3000:]
    assert "worker policy batch" in done.stdout, done.stdout
    assert "service policy other" in done.stdout, done.stdout
    assert "log monitor stopped" in done.stdout, done.stdout
    assert done.returncode == 0
