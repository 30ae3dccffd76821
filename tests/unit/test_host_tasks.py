"""A service's own background work runs as a host task: at start (told it is the first run), then every
interval; an exception is retried at the next interval; the task ends with the host."""

from __future__ import annotations

import threading
import time

from gristmill.core.host import PeriodicTask


def test_a_task_runs_at_start_then_periodically_survives_errors_and_stops() -> None:
    calls: list[bool] = []
    failed_once = threading.Event()

    def work(first: bool) -> None:
        calls.append(first)
        if len(calls) == 2 and not failed_once.is_set():
            failed_once.set()
            raise RuntimeError("the object store is down")

    task = PeriodicTask("sweep", work, interval_s=0.05)
    task.start()
    deadline = time.monotonic() + 5
    while len(calls) < 4:
        assert time.monotonic() < deadline, f"the task stopped running: {calls}"
        time.sleep(0.01)
    task.stop()
    assert calls[0] is True and not any(calls[1:]), "only the first run is the start-up one"
    assert failed_once.is_set(), "an exception did not end the task"
    runs = len(calls)
    time.sleep(0.2)
    assert len(calls) == runs, "stop ends it"
