"""The warm worker pool of a local cluster (runner/warm.py) without Ray: what it asks the raylet for, and when."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gristmill.training.runner.warm import (
    PRELOAD_HOOK,
    SETUP_HOOK_ENV,
    WarmPool,
    idle_worker_processes,
    worker_environment,
)


def test_the_worker_environment_is_the_merge_ray_writes_compact_with_sorted_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Ray Train variable set in the driver travels to the controller and on to every worker.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    text = worker_environment({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}, threads=2)
    assert text == json.dumps(json.loads(text), separators=(",", ":"), sort_keys=True)
    assert json.loads(text) == {
        "env_vars": {
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "2",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3",
            "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0",
            "TOKENIZERS_PARALLELISM": "false",
            SETUP_HOOK_ENV: PRELOAD_HOOK,
        }
    }


def _process(proc: Path, pid: int, *args: str) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cmdline").write_bytes("\0".join(args).encode() + b"\0")


def test_idle_worker_processes_are_the_registered_idle_ones_and_those_still_starting(tmp_path: Path) -> None:
    _process(tmp_path, 10, "ray::IDLE")
    _process(
        tmp_path, 11, "/venv/bin/python", "/venv/lib/ray/_private/workers/default_worker.py", "--node-ip-address=x"
    )
    _process(tmp_path, 12, "ray::RayTrainWorker.__init__")
    _process(tmp_path, 13, "/venv/bin/raylet", "--python_worker_command=python default_worker.py")
    assert idle_worker_processes([10, 11, 12, 13, 14], proc=tmp_path) == [10, 11]  # 14: gone


class _Raylet:
    def __init__(self, idle: list[int] | None = None, fail: bool = False) -> None:
        self.idle = idle or []
        self.fail = fail
        self.calls: list[tuple[str, int, int]] = []
        self.called = threading.Event()

    def prestart(self, env: str, count: int, keep_alive_s: int) -> None:
        self.calls.append((env, count, keep_alive_s))
        self.called.set()
        if self.fail:
            raise ConnectionError("raylet gone")


def _pool(raylet: _Raylet, tmp_path: Path, size: int = 2, kill: Callable[[int], None] | None = None) -> WarmPool:
    for pid in raylet.idle:
        _process(tmp_path, pid, "ray::IDLE")
    return WarmPool(
        size=size,
        threads=2,
        job_env_vars={"HF_HUB_OFFLINE": "1"},
        session_processes=lambda: raylet.idle,
        delay_s=0.05,
        keep_alive_s=600,
        prestart=raylet.prestart,
        proc=tmp_path,
        kill=kill,
    )


def test_an_idle_cluster_is_topped_up_to_its_size(tmp_path: Path) -> None:
    raylet = _Raylet(idle=[7])
    _pool(raylet, tmp_path).schedule()
    assert raylet.called.wait(5)
    (env, count, keep_alive), *_ = raylet.calls
    assert (count, keep_alive) == (1, 600) and json.loads(env)["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_nothing_starts_beside_a_run_or_when_a_run_came_and_went_during_the_delay(tmp_path: Path) -> None:
    raylet = _Raylet()
    pool = _pool(raylet, tmp_path)
    pool.schedule()
    pool.run_began(2)  # a job was submitted within the delay: it must not share the CPUs with a starting process
    time.sleep(0.3)
    assert raylet.calls == []
    pool.run_ended(warm_worker=None)
    pool.run_began(2)
    pool.run_ended(warm_worker=None)  # the first timer of these two is stale; the second tops up
    assert raylet.called.wait(5)
    time.sleep(0.2)
    assert [count for _, count, _ in raylet.calls] == [2]


def test_a_run_that_ignored_a_waiting_warm_process_turns_the_pool_off(tmp_path: Path) -> None:
    raylet = _Raylet()
    pool = _pool(raylet, tmp_path, size=1)
    pool.schedule()
    assert raylet.called.wait(5)
    pool.run_began(2)
    pool.run_ended(warm_worker=False)
    assert "runtime environment" in pool.disabled_reason and pool.last_run_warm is False
    time.sleep(0.3)
    assert len(raylet.calls) == 1


def test_a_run_of_other_threads_stops_the_unfit_process_and_the_next_one_is_made_for_its_threads(
    tmp_path: Path,
) -> None:
    raylet = _Raylet()
    killed: list[int] = []
    pool = _pool(raylet, tmp_path, size=1, kill=killed.append)
    pool.schedule()
    assert raylet.called.wait(5)
    raylet.called.clear()
    _process(tmp_path, 21, "ray::IDLE")  # the two-thread process the raylet started
    raylet.idle.append(21)
    pool.run_began(1)  # a one-CPU job: Ray gives its worker one thread, so the two-thread process does not fit
    assert killed == [21]  # stopped before the run's processes start: it would only wake beside them
    raylet.idle.remove(21)
    pool.run_ended(warm_worker=False)
    assert pool.disabled_reason == ""  # no verdict: nothing that fitted was offered
    assert raylet.called.wait(5)
    assert json.loads(raylet.calls[-1][0])["env_vars"]["OMP_NUM_THREADS"] == "1"
    pool.run_began(1)  # this one fits: nothing is stopped
    assert killed == [21]


def test_a_raylet_that_refuses_costs_nothing_but_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raylet = _Raylet(fail=True)
    pool = _pool(raylet, tmp_path, size=1)
    pool.schedule()
    assert raylet.called.wait(5)
    time.sleep(0.1)
    assert "could not start a warm Ray worker process" in caplog.text
    pool.run_began(2)
    pool.run_ended(warm_worker=False)  # nothing was offered: no verdict on Ray's environment
    assert pool.disabled_reason == ""
