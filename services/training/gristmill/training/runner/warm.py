"""A warm train-worker process waiting in the local cluster, so that a job submitted to an idle service skips the
worker's process start and its imports (~4-5 s of its start on two cores).

Ray Train starts a new worker process for every run (an actor per worker), and that process imports torch,
transformers and PEFT (~2.5-3 s), then the loop, before it can load a model. Ray keeps idle worker processes for
tasks; an actor takes one only if it waits with the very runtime environment the actor asks for, which never
happens by itself. So, on a cluster this service started itself:

* every train worker's runtime environment names a **setup hook** (``preload``, Ray's
  ``worker_process_setup_hook`` mechanism) that imports those modules when the process starts. A worker started
  for a run does what it did before, a little earlier; a process started ahead of time does it while nobody
  waits.
* when the cluster has been idle for a moment (no run for ``delay_s``: never beside a run, whose CPUs it would
  take), the pool asks the raylet to start ``size`` processes with exactly that environment and keep them for
  ``keep_alive_s`` (Ray's ``PrestartWorkers``). The next run's worker actor takes one.

The environment must be byte-identical to the one Ray builds for the worker actor (Ray matches idle processes by a
hash of the serialized environment): the job's, merged by Ray's core worker with the run controller's and then the
worker's, written as compact JSON with sorted keys (``worker_environment``). A Ray version that builds it
otherwise leaves the process unused: the pool notices (a single-worker run's worker came from no warm process
while one of its threads waited), logs it once and stops warming, and ``test_ray_training`` fails on it. A run of
other threads (the environment carries ``OMP_NUM_THREADS``) cannot take the process either: it is stopped when such
a run begins and the next one is made for that run's threads.

Which processes wait is read from ``/proc`` each time, never remembered: a process the pool asked for may have
been taken by a run of several workers, or a run may begin before the next is asked for (CI caught a pool that
judged a run begun just after another as if the process it once asked for still waited). A waiting process is an
idle worker process whose environment names the setup hook: train workers start no tasks, so such a process is one
the pool asked for or one Ray started for a worker that another process served first; either serves the next run.

No torch or Ray import at module level: the hook's module is imported by every train worker first.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gristmill.training.runner.local_ray import proc_strings

log = logging.getLogger(__name__)

# Ray's environment variable that names a worker's setup hook (ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR): a
# "module.function" path the worker imports and calls before it takes any work.
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
PRELOAD_HOOK = f"{__name__}.preload"
# What every train worker imports before its loop runs: the loop module brings torch and transformers' base;
# PEFT and the auto classes are what a fine-tuning run loads next.
PRELOAD_MODULES = ("torch", "transformers", "peft", "gristmill.training.ml.loop")


def preload() -> None:
    """The train workers' setup hook: import what every run needs. A module that is not installed is skipped
    (PEFT on a classification-only install): the run reports its own error if it needs it."""
    for name in PRELOAD_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.debug("warm worker: %s not imported: %s", name, exc)


def worker_threads(cpus_per_worker: float) -> int:
    """The OpenMP threads Ray gives a worker of ``cpus_per_worker`` CPUs (``OMP_NUM_THREADS``: the floor, >= 1)."""
    return max(1, math.floor(cpus_per_worker))


def worker_runtime_env(threads: int) -> dict[str, Any]:
    """``RunConfig.worker_runtime_env`` of a run whose workers have ``threads`` OpenMP threads: the setup hook, and
    ``OMP_NUM_THREADS`` from the process's start. Ray sets that variable itself only when the actor's first task
    runs, after the hook imported torch, and OpenMP reads it once, when torch loads it (one benchmark run each:
    LoRA SFT on SmolLM2 at 0.86x the plain loop without it, 0.92x with it; the plain loop sets it for this reason)."""
    return {"env_vars": {SETUP_HOOK_ENV: PRELOAD_HOOK, "OMP_NUM_THREADS": str(threads)}}


def worker_environment(job_env_vars: Mapping[str, str], threads: int) -> str:
    """The serialized runtime environment Ray gives a run's train worker of ``threads`` threads on a cluster whose
    job environment has ``job_env_vars``: the job's variables, the controller's (Ray Train's variables set in this
    process, and its blocking-get switch), the worker's own (the same, plus ``worker_runtime_env``), merged as
    Ray's core worker merges a child's environment into its parent's, and written as it writes it."""
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
        get_env_vars_to_propagate,
    )

    # As DataParallelTrainer builds the controller's, and the worker group each worker's; a child's variables win.
    controller = get_env_vars_to_propagate()
    controller.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    worker = {**get_env_vars_to_propagate(), **worker_runtime_env(threads)["env_vars"]}
    env_vars = {**job_env_vars, **controller, **worker}
    return json.dumps({"env_vars": env_vars}, separators=(",", ":"), sort_keys=True)


def idle_worker_processes(pids: list[int], proc: Path = Path("/proc")) -> list[int]:
    """Of a cluster's processes, the worker processes that take no work yet: titled ``ray::IDLE`` once
    registered, or still starting (``default_worker.py`` on their command line)."""
    idle = []
    for pid in pids:
        try:
            args = proc_strings(pid, "cmdline", proc)
        except OSError:
            continue
        if args and (args[0].startswith("ray::IDLE") or any(a.endswith("/default_worker.py") for a in args)):
            idle.append(pid)
    return idle


def waiting_processes(pids: list[int], proc: Path = Path("/proc")) -> dict[int, int]:
    """Of a cluster's processes, the idle train-worker processes (``idle_worker_processes`` whose environment
    names the setup hook) and the OpenMP threads each was started with (0: not set)."""
    waiting = {}
    for pid in idle_worker_processes(pids, proc):
        try:
            environ = proc_strings(pid, "environ", proc)
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in environ if "=" in item)
        if env.get(SETUP_HOOK_ENV) == PRELOAD_HOOK:
            threads = env.get("OMP_NUM_THREADS", "")
            waiting[pid] = int(threads) if threads.isdigit() else 0
    return waiting


class WarmPool:
    """Keeps ``size`` warm train-worker processes in an idle local cluster (see the module's docstring)."""

    def __init__(
        self,
        *,
        size: int,
        threads: int,
        job_env_vars: Mapping[str, str],
        session_processes: Callable[[], list[int]],
        delay_s: float = 3.0,
        keep_alive_s: int = 1800,
        prestart: Callable[[str, int, int], None] | None = None,
        proc: Path = Path("/proc"),
        kill: Callable[[int], None] | None = None,
    ) -> None:
        self.size = size
        # The threads of the workers it starts: the last run's (a run of other threads cannot take them).
        self.threads = threads
        self.delay_s = delay_s
        self.keep_alive_s = keep_alive_s
        self._job_env_vars = dict(job_env_vars)
        self._session_processes = session_processes
        self._prestart = prestart or prestart_local_workers
        self._proc = proc
        self._kill = kill or _terminate
        self._lock = threading.Lock()
        self._active_runs = 0
        self._generation = 0
        self._run_fits = False  # whether a process of the running run's threads waited when it began
        self._closed = False
        self.disabled_reason = ""
        # Whether the last run's worker came from a warm process (None: not known, a search).
        self.last_run_warm: bool | None = None

    @property
    def active_runs(self) -> int:
        return self._active_runs

    def run_began(self, threads: int) -> None:
        """A run of workers with ``threads`` threads began. Waiting processes of other threads cannot serve it nor,
        most likely, the next run: they are stopped now, before the run's processes start, rather than wake
        beside its worker and stand in for a fitting process that would never be started."""
        try:
            waiting = self._waiting()
        except Exception:  # an optimisation: a run is judged and served as if nothing waited
            log.warning("could not list the warm Ray worker processes", exc_info=True)
            waiting = {}
        unfit = [pid for pid, started_for in waiting.items() if started_for != threads]
        with self._lock:
            self._active_runs += 1
            self._generation += 1
            self._run_fits = len(unfit) < len(waiting)
            self.threads = threads
        if unfit:
            try:
                for pid in unfit:
                    self._kill(pid)
            except Exception:  # an optimisation again: at worst the process waits out its keep-alive
                log.warning("could not stop the warm Ray worker processes of other threads", exc_info=True)
            else:
                log.info("stopped %d warm Ray worker process(es) made for other threads", len(unfit))

    def run_ended(self, *, warm_worker: bool | None = None) -> None:
        """A run ended; ``warm_worker``: whether its worker came from a warm process (None: not known)."""
        with self._lock:
            self._active_runs = max(0, self._active_runs - 1)
            self._generation += 1
            self.last_run_warm = warm_worker
            if warm_worker is False and self._run_fits and not self.disabled_reason:
                self.disabled_reason = (
                    "a run's worker did not take the warm process that waited for it: this Ray version builds the "
                    "worker's runtime environment differently; jobs start without a warm process"
                )
                log.warning("warm worker pool off: %s", self.disabled_reason)
        self.schedule()

    def schedule(self) -> None:
        """Top the pool up after ``delay_s`` if no run has begun or ended meanwhile."""
        with self._lock:
            if self._closed or self.size <= 0 or self.disabled_reason:
                return
            generation = self._generation
        timer = threading.Timer(self.delay_s, self._top_up, args=(generation,))
        timer.daemon = True
        timer.name = "ray-warm-pool"
        timer.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _waiting(self) -> dict[int, int]:
        return waiting_processes(self._session_processes(), self._proc)

    def _top_up(self, generation: int) -> None:
        with self._lock:
            if self._closed or self._active_runs or generation != self._generation or self.disabled_reason:
                return
            threads = self.threads
        try:
            fitting = sum(started_for == threads for started_for in self._waiting().values())
            missing = self.size - fitting
            if missing <= 0:
                return
            self._prestart(worker_environment(self._job_env_vars, threads), missing, self.keep_alive_s)
        except Exception:  # warming is an optimisation: a run without it starts as it always did
            log.warning("could not start a warm Ray worker process", exc_info=True)
            return
        log.info("started %d warm Ray worker process(es) for the next run", missing)


def _terminate(pid: int) -> None:
    """Stop an idle worker process: Ray's raylet sees it go and forgets it, as it does for any worker that exits."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def prestart_local_workers(serialized_env: str, count: int, keep_alive_s: int) -> None:
    """Ask this node's raylet to start ``count`` idle Python worker processes of this driver's job with the
    runtime environment ``serialized_env``, kept ``keep_alive_s`` seconds while unused (Ray's ``PrestartWorkers``)."""
    import ray
    from ray._private.grpc_utils import init_grpc_channel
    from ray._private.utils import get_runtime_env_info
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc
    from ray.runtime_env import RuntimeEnv

    context = ray.get_runtime_context()
    node = next(n for n in ray.nodes() if n.get("NodeID") == context.get_node_id())  # type: ignore[no-untyped-call]
    info: Any = get_runtime_env_info(RuntimeEnv(), is_job_runtime_env=False, serialize=False)
    info.serialized_runtime_env = serialized_env
    request = node_manager_pb2.PrestartWorkersRequest(  # type: ignore[attr-defined]  # generated, untyped
        language=common_pb2.PYTHON,  # type: ignore[attr-defined]
        job_id=bytes.fromhex(context.get_job_id()),
        runtime_env_info=info,
        keep_alive_duration_secs=keep_alive_s,
        num_workers=count,
    )
    channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}", asynchronous=False)
    try:
        stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)  # type: ignore[no-untyped-call]  # generated
        stub.PrestartWorkers(request, timeout=10)
    finally:
        channel.close()
