"""The training service in-process for its API tests: scripted runners, a host on port 0, request helpers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.host import Infrastructure
from gristmill.core.licensing import License
from gristmill.core.security import embedded_security
from gristmill.training.app import TrainingApp, build_app
from gristmill.training.domain.resolve import ClusterCapacity
from gristmill.training.domain.runs import (
    RunCancelledError,
    RunFailedError,
    RunListener,
    RunOutcome,
    RunRequest,
    RunUnavailableError,
)
from gristmill.training.settings import TrainingSettings
from tests.support.licences import signed_license


@dataclass
class ScriptedRunner:
    """Reports ``started``, then waits until the test releases it (or the run is cancelled)."""

    supports_search = False
    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    fail_with: str = ""
    cancelled: list[str] = field(default_factory=list)

    def capacity(self) -> ClusterCapacity:
        return ClusterCapacity(cpus=4, gpus=0, max_node_cpus=4, max_node_gpus=0)

    def run(self, request: RunRequest, listener: RunListener, cancel: threading.Event) -> RunOutcome:
        listener.on_records([{"type": "started", "step": 0, "total_steps": 100}])
        metrics = {"loss": 0.5, "learning_rate": 1e-3, "samples_per_second": 12.0, "tokens_per_second": 480.0}
        listener.on_records([{"type": "train", "step": 10, "epoch": 0.1, "metrics": metrics}])
        self.started.set()
        while not self.release.wait(0.02):
            if cancel.is_set():
                self.cancelled.append(request.job_id)
                raise RunCancelledError("cancelled")
        raise RunFailedError(self.fail_with or "scripted runs never succeed")

    def cleanup(self, outcome: RunOutcome) -> None:
        raise AssertionError("no outcome to clean up")


@dataclass
class RecordingRunner(ScriptedRunner):
    """A ``ScriptedRunner`` that remembers the Ray run name each job ran under."""

    run_names: dict[str, str] = field(default_factory=dict)

    def run(self, request: RunRequest, listener: RunListener, cancel: threading.Event) -> RunOutcome:
        self.run_names[request.job_id] = request.run_name
        return super().run(request, listener, cancel)


@dataclass
class UnreachableStorageRunner(ScriptedRunner):
    """Fails its first ``outages`` runs as Ray does when the S3 server is down, then runs as scripted."""

    outages: int = 1
    attempts: list[str] = field(default_factory=list)

    def run(self, request: RunRequest, listener: RunListener, cancel: threading.Event) -> RunOutcome:
        self.attempts.append(request.run_name)
        if len(self.attempts) <= self.outages:
            listener.on_records([{"type": "started", "step": 0, "total_steps": 100}])
            raise RunUnavailableError("the checkpoint storage could not be reached: AWS Error NETWORK_CONNECTION")
        return super().run(request, listener, cancel)


# Every licensed feature, no limit (the licence tests below pass their own).
ENTERPRISE = signed_license()


async def start_host(
    tmp_path: Path, runner: Any, *, license_: License = ENTERPRISE, **settings: Any
) -> tuple[TrainingApp, int]:
    config = TrainingSettings(data_dir=tmp_path / "data", grpc_port=0, **settings)
    app = build_app(config, Infrastructure(), embedded_security("training", license_), runner=runner)
    return app, await app.host.start()


def job_spec(model: Path, dataset: str = "v1", **hyper: Any) -> pb.JobSpec:
    spec = pb.JobSpec(display_name="sentiment", registered_model_name="sentiment")
    spec.base_model.local_path = str(model)
    spec.dataset_version.project_id = "reviews"
    spec.dataset_version.dataset_version_id = dataset
    hp = spec.hyper_parameters
    hp.learning_rate, hp.per_worker_batch_size, hp.epochs = 1e-2, 8, 3
    hp.eval_every_steps, hp.log_every_steps = 12, 6
    for name, value in hyper.items():
        setattr(hp, name, value)
    return spec


async def job_events(stub: pb_grpc.TrainingServiceStub, job_id: str, **kwargs: Any) -> list[pb.JobEvent]:
    return [event async for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id, **kwargs), timeout=120)]


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(predicate):
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def card_hyper_parameters(card: str) -> dict[str, str]:
    """The hyper-parameter table of a model card written by the training service."""
    section = card.split("## Hyper-parameters", 1)[1].split("## Metrics", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {name.strip(): value.strip() for name, value in rows[2:]}  # after the header and its rule
