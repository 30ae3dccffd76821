"""The local Ray cluster's scheduling policy: the thread that starts it, and what that thread starts, run as
SCHED_BATCH; the rest of the service keeps the default policy."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from gristmill.training.runner.ray_runner import batch_scheduling

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="scheduling policies are Linux's")

CHILD = "import os; print('batch' if os.sched_getscheduler(0) == os.SCHED_BATCH else 'other')"


def test_the_calling_thread_and_the_processes_it_starts_run_as_batch_the_others_do_not() -> None:
    seen: dict[str, str] = {}

    def start_cluster() -> None:
        batch_scheduling()
        seen["thread"] = "batch" if os.sched_getscheduler(0) == os.SCHED_BATCH else "other"
        seen["child"] = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True).stdout.strip()

    thread = threading.Thread(target=start_cluster)
    thread.start()
    thread.join(60)
    outside = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True).stdout.strip()

    assert seen == {"thread": "batch", "child": "batch"}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert outside == "other"
