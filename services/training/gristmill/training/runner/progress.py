"""A run's progress between its rank 0, its controller and the service: the ``ProgressHub`` actor and a run's
``RunChannel`` to it.

Both travel to the run's controller (a fresh process per run, in the controller callback that registers its actor
handle) and the hub is an actor of its own; neither process needs torch, so nothing here imports it (or any module
that does): the controller would otherwise import torch before it starts the run's workers.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback


@ray.remote(num_cpus=0)
class ProgressHub:
    """Progress records from the runs' rank 0 to the service, and each run's controller handle, by job.

    One long-lived actor per runner (0 CPUs): starting an actor process per run would add seconds to
    every job's start. An asyncio actor, so that a driver's ``drain`` can wait for the next record (a long poll:
    a record reaches the service as soon as it is pushed, not at the driver's next poll) while pushes go on."""

    def __init__(self) -> None:
        self._records: dict[str, list[dict[str, Any]]] = {}
        self._controllers: dict[str, Any] = {}
        self._arrived: dict[str, asyncio.Event] = {}

    async def push(self, job_id: str, record: dict[str, Any]) -> None:
        self._records.setdefault(job_id, []).append(record)
        if job_id in self._arrived:
            self._arrived[job_id].set()

    async def wake(self, job_id: str) -> None:
        """Ends the job's waiting drain now, with whatever records there are (none, perhaps)."""
        if job_id in self._arrived:
            self._arrived[job_id].set()

    async def drain(self, job_id: str, wait_s: float = 0.0) -> list[dict[str, Any]]:
        """The job's records so far; when there are none, waits up to ``wait_s`` for the first to arrive (or a
        ``wake``)."""
        if not self._records.get(job_id) and wait_s > 0:
            arrived = self._arrived.setdefault(job_id, asyncio.Event())
            arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), wait_s)
        return self._records.pop(job_id, [])

    async def set_controller(self, job_id: str, handle: Any) -> None:
        self._controllers[job_id] = handle

    async def controller(self, job_id: str) -> Any:
        return self._controllers.get(job_id)

    async def forget(self, job_id: str) -> None:
        self._records.pop(job_id, None)
        self._controllers.pop(job_id, None)
        self._arrived.pop(job_id, None)


class RunChannel:
    """One run's view of the hub; picklable, so it travels to the controller and the workers. In the
    workers it is the loop's ``ProgressSink``: pushes are fire-and-forget, so the loop never waits on them."""

    def __init__(self, hub: Any, job_id: str) -> None:
        self._hub = hub
        self._job_id = job_id

    def push(self, record: dict[str, Any]) -> None:
        self._hub.push.remote(self._job_id, record)

    def set_controller(self, handle: Any) -> None:
        ray.get(self._hub.set_controller.remote(self._job_id, handle))

    def drain(self, wait_s: float = 0.0) -> list[dict[str, Any]]:
        """The records pushed since the last drain; with none yet, waits up to ``wait_s`` for one."""
        records: list[dict[str, Any]] = ray.get(self.drain_later(wait_s), timeout=30 + wait_s)
        return records

    def drain_later(self, wait_s: float) -> Any:
        """``drain`` without waiting here: the ``ObjectRef`` of its records."""
        return self._hub.drain.remote(self._job_id, wait_s)

    def wake(self) -> None:
        """Ends a waiting drain now."""
        self._hub.wake.remote(self._job_id)

    def controller(self) -> Any:
        return ray.get(self._hub.controller.remote(self._job_id), timeout=30)

    def close(self) -> None:
        self._hub.forget.remote(self._job_id)


class RegisterController(ControllerCallback):
    """Runs on the controller: hands its own actor handle to the channel, so a cancel can abort the run."""

    def __init__(self, channel: RunChannel) -> None:
        self._channel = channel

    def after_controller_start(self, train_run_context: Any) -> None:
        self._channel.set_controller(ray.get_runtime_context().current_actor)
