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
    waiting_processes,
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


def _process(proc: Path, pid: int, *args: str, env: dict[str, str] | None = None) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cmdline").write_bytes("\0".join(args).encode() + b"\0")
    environ = {"PATH": "/usr/bin", **(env or {})}
    (proc / str(pid) / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items()))


def _warm_env(threads: int) -> dict[str, str]:
    return {SETUP_HOOK_ENV: PRELOAD_HOOK, "OMP_NUM_THREADS": str(threads)}


def test_idle_worker_processes_are_the_registered_idle_ones_and_those_still_starting(tmp_path: Path) -> None:
    _process(tmp_path, 10, "ray::IDLE")
    _process(
        tmp_path, 11, "/venv/bin/python", "/venv/lib/ray/_private/workers/default_worker.py", "--node-ip-address=x"
    )
    _process(tmp_path, 12, "ray::RayTrainWorker.__init__")
    _process(tmp_path, 13, "/venv/bin/raylet", "--python_worker_command=python default_worker.py")
    assert idle_worker_processes([10, 11, 12, 13, 14], proc=tmp_path) == [10, 11]  # 14: gone


def test_waiting_processes_are_the_idle_ones_started_with_the_setup_hook_and_their_threads(tmp_path: Path) -> None:
    _process(tmp_path, 10, "ray::IDLE", env=_warm_env(2))
    _process(tmp_path, 11, "ray::IDLE")  # a task worker of the service's own: it cannot host a train worker
    _process(tmp_path, 12, "ray::RayTrainWorker.__init__", env=_warm_env(2))  # a run's worker, busy
    _process(tmp_path, 13, "/venv/bin/python", "/venv/ray/_private/workers/default_worker.py", env=_warm_env(1))
    _process(tmp_path, 14, "ray::IDLE", env={SETUP_HOOK_ENV: PRELOAD_HOOK})
    assert waiting_processes([10, 11, 12, 13, 14, 15], proc=tmp_path) == {10: 2, 13: 1, 14: 0}


class _Raylet:
    """Starts a fake idle process for every process asked for; a run takes one with ``take``."""

    def __init__(self, proc: Path, idle: list[int] | None = None, fail: bool = False) -> None:
        self.proc = proc
        self.idle = idle or []
        self.fail = fail
        self.calls: list[tuple[str, int, int]] = []
        self.called = threading.Event()

    def prestart(self, env: str, count: int, keep_alive_s: int) -> None:
        self.calls.append((env, count, keep_alive_s))
        if self.fail:
            self.called.set()
            raise ConnectionError("raylet gone")
        for _ in range(count):
            pid = 100 + len(self.idle) + len(self.calls) * 10
            _process(self.proc, pid, "ray::IDLE", env=json.loads(env)["env_vars"])
            self.idle.append(pid)
        self.called.set()

    def take(self) -> None:
        self.idle.pop()


def _pool(raylet: _Raylet, size: int = 2, kill: Callable[[int], None] | None = None) -> WarmPool:
    for pid in raylet.idle:
        if not (raylet.proc / str(pid)).exists():
            _process(raylet.proc, pid, "ray::IDLE")  # Ray's own idle workers: no train worker takes them
    return WarmPool(
        size=size,
        threads=2,
        job_env_vars={"HF_HUB_OFFLINE": "1"},
        session_processes=lambda: list(raylet.idle),
        delay_s=0.05,
        keep_alive_s=600,
        prestart=raylet.prestart,
        proc=raylet.proc,
        kill=kill,
    )


def test_an_idle_cluster_is_topped_up_to_its_size(tmp_path: Path) -> None:
    raylet = _Raylet(tmp_path, idle=[7])  # Ray's own idle worker does not count
    _process(tmp_path, 8, "ray::IDLE", env=_warm_env(2))  # one waits already
    raylet.idle.append(8)
    _pool(raylet, size=3).schedule()
    assert raylet.called.wait(5)
    (env, count, keep_alive), *_ = raylet.calls
    assert (count, keep_alive) == (2, 600) and json.loads(env)["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_nothing_starts_beside_a_run_or_when_a_run_came_and_went_during_the_delay(tmp_path: Path) -> None:
    raylet = _Raylet(tmp_path)
    pool = _pool(raylet)
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
    raylet = _Raylet(tmp_path)
    pool = _pool(raylet, size=1)
    pool.schedule()
    assert raylet.called.wait(5)
    pool.run_began(2)  # the process waits, and the run's worker came from elsewhere
    pool.run_ended(warm_worker=False)
    assert "runtime environment" in pool.disabled_reason and pool.last_run_warm is False
    time.sleep(0.3)
    assert len(raylet.calls) == 1


@pytest.mark.parametrize("taker", [True, None], ids=["a-single-worker-run", "a-run-of-several-workers"])
def test_a_run_begun_before_the_pool_was_topped_up_again_is_not_judged(tmp_path: Path, taker: bool | None) -> None:
    # What CI caught: a run took the warm process, and the next began within the delay, before another was asked
    # for. That run's worker was started for it, rightly, and the pool must stay on. (A run of several workers is
    # not judged itself: only rank 0 reports its start.)
    raylet = _Raylet(tmp_path)
    pool = _pool(raylet, size=1)
    pool.schedule()
    assert raylet.called.wait(5)
    pool.run_began(2)
    raylet.take()
    pool.run_ended(warm_worker=taker)
    pool.run_began(2)
    pool.run_ended(warm_worker=False)
    assert pool.disabled_reason == "" and pool.last_run_warm is False


def test_a_run_of_other_threads_stops_the_unfit_process_and_the_next_one_is_made_for_its_threads(
    tmp_path: Path,
) -> None:
    raylet = _Raylet(tmp_path, idle=[7])
    killed: list[int] = []
    pool = _pool(raylet, size=1, kill=killed.append)
    pool.schedule()
    assert raylet.called.wait(5)
    raylet.called.clear()
    (two_threads,) = set(raylet.idle) - {7}
    pool.run_began(1)  # a one-CPU job: Ray gives its worker one thread, so the two-thread process does not fit
    assert killed == [two_threads]  # stopped before the run's processes start: it would only wake beside them
    raylet.idle.remove(two_threads)
    pool.run_ended(warm_worker=False)
    assert pool.disabled_reason == ""  # no verdict: nothing that fitted waited
    assert raylet.called.wait(5)
    assert json.loads(raylet.calls[-1][0])["env_vars"]["OMP_NUM_THREADS"] == "1"
    pool.run_began(1)  # this one fits: nothing is stopped (Ray's own idle worker 7 never is)
    assert killed == [two_threads]


def test_a_raylet_that_refuses_costs_nothing_but_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raylet = _Raylet(tmp_path, fail=True)
    pool = _pool(raylet, size=1)
    pool.schedule()
    assert raylet.called.wait(5)
    time.sleep(0.1)
    assert "could not start a warm Ray worker process" in caplog.text
    pool.run_began(2)
    pool.run_ended(warm_worker=False)  # nothing waited: no verdict on Ray's environment
    assert pool.disabled_reason == ""
