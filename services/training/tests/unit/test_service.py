"""The training service through its gRPC API, in-process: memory bus, SQLite, local objects, no Ray.

Real training runs use ``InProcessRunner`` (the real loop on a tiny BERT); lifecycle edge cases use a
scripted runner that waits for the test's signal.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.events import Event, Outbox, OutboxEvent, OutboxWriter
from gristmill.core.events.topics import platform_catalog
from gristmill.core.licensing import License, load_license
from gristmill.core.manifests import ModelManifest
from gristmill.core.security import embedded_security
from gristmill.core.settings import KafkaSettings, S3Settings
from gristmill.core.sql import Database
from gristmill.training.app import TrainingApp, build_app
from gristmill.training.domain.jobs import PublishedVersion
from gristmill.training.domain.model import Job, JobState
from gristmill.training.domain.refs import DatasetRef
from gristmill.training.domain.resolve import ClusterCapacity
from gristmill.training.domain.runs import (
    RunCancelledError,
    RunFailedError,
    RunListener,
    RunOutcome,
    RunRequest,
    RunUnavailableError,
)
from gristmill.training.domain.supervisor import LOST_ON_RESTART, MAX_RESUMES, STOPPED_WITH_SERVICE
from gristmill.training.runner.in_process import InProcessRunner
from gristmill.training.settings import TrainingSettings
from gristmill.training.store.sql import SqlJobStore
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
        metrics = {"loss": 0.5, "learning_rate": 1e-3, "samples_per_second": 12.0}
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


async def _host(
    tmp_path: Path, runner: Any, *, license_: License = ENTERPRISE, **settings: Any
) -> tuple[TrainingApp, int]:
    config = TrainingSettings(data_dir=tmp_path / "data", grpc_port=0, **settings)
    app = build_app(
        config,
        kafka=KafkaSettings(),
        s3=S3Settings(),
        security=embedded_security("training", license_),
        runner=runner,
    )
    return app, await app.host.start()


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[TrainingApp, pb_grpc.TrainingServiceStub]]:
    app, port = await _host(tmp_path, InProcessRunner(tmp_path / "runs", cpus=2))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield app, pb_grpc.TrainingServiceStub(channel)
    await app.host.stop()


def _spec(model: Path, dataset: str = "v1", **hyper: Any) -> pb.JobSpec:
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


async def _events(stub: pb_grpc.TrainingServiceStub, job_id: str, **kwargs: Any) -> list[pb.JobEvent]:
    return [event async for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id, **kwargs), timeout=120)]


async def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def _wait_for(predicate: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(predicate):
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_a_job_trains_publishes_its_model_and_announces_success(
    service: tuple[TrainingApp, pb_grpc.TrainingServiceStub], tiny_model: Path, sentiment_version: Any
) -> None:
    app, stub = service
    dataset: DatasetRef = sentiment_version(app.host.platform.objects)
    job = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
    assert job.state == pb.JOB_STATE_QUEUED and job.ray_run_name == job.job_id
    assert job.spec.dataset_version.manifest.sha256 == dataset.manifest.sha256
    assert len(job.spec.base_model.content_sha256) == 64

    events = await _events(stub, job.job_id, after_sequence=0)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))  # no gaps, in order
    states = [e.state_change.state for e in events if e.WhichOneof("event") == "state_change"]
    assert states == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED]
    metrics = [e.metrics for e in events if e.WhichOneof("event") == "metrics"]
    assert {m.name for report in metrics for m in report.metrics} >= {
        "loss",
        "learning_rate",
        "samples_per_second",
        "accuracy",
        "f1",
    }
    assert any(m.split == common_pb2.DATASET_SPLIT_TEST for report in metrics for m in report.metrics)

    done = await stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.progress.step == done.progress.total_steps == 36
    assert done.start_time.seconds > 0 and done.end_time.seconds > 0
    result = done.result
    assert result.artifact_prefix == f"jobs/{job.job_id}/model"
    accuracy = {(m.name, m.split): m.value for m in result.metrics}[("accuracy", common_pb2.DATASET_SPLIT_TEST)]
    assert accuracy >= 0.9
    assert list(result.label_map.labels) == ["negative", "positive"]
    assert result.trainable_parameter_count == result.total_parameter_count > 0
    assert result.lineage.dataset_version.manifest.sha256 == dataset.manifest.sha256
    assert len(result.lineage.dataset_files) == 3 and result.lineage.code_version.startswith("gristmill-training")
    assert result.lineage.hyper_parameters["learning_rate"] == "0.01" and result.lineage.ray_run_name == job.job_id

    # The manifest lists every file with its checksum, and every file verifies on download.
    objects = app.host.platform.objects
    manifest = ModelManifest.from_json(objects.get_bytes(result.manifest.key, expected_sha256=result.manifest.sha256))
    assert {"config.json", "model.safetensors", "tokenizer.json", "model-card.md"} <= set(manifest.files)
    assert "training_state.json" not in manifest.files
    assert manifest.signature["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}
    assert manifest.lineage["training_job_id"] == job.job_id and manifest.metrics["test_accuracy"] == accuracy
    local = manifest.download(objects, Path(app.host.settings.data_dir) / "download")
    card = (local / "model-card.md").read_text()
    assert "reviews/v1" in card and "| accuracy | test |" in card

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(local))
    assert model.config.id2label == {0: "negative", 1: "positive"}

    # Every state change and progress update went to the outbox; success carries the registry's inputs.
    with app.host.platform.database.transaction() as session:
        rows = session.execute(select(OutboxEvent).order_by(OutboxEvent.id)).scalars().all()
        announced = [events_pb2.JobStateChanged.FromString(r.payload) for r in rows if r.key == job.job_id]
    assert announced[0].state == pb.JOB_STATE_QUEUED and announced[-1].state == pb.JOB_STATE_SUCCEEDED
    assert any(a.state == a.previous_state == pb.JOB_STATE_RUNNING and a.metrics for a in announced)
    success = announced[-1]
    assert success.artifact_prefix == result.artifact_prefix and success.manifest == result.manifest
    assert success.registered_model_name == "sentiment" and success.lineage == result.lineage
    assert len(success.artifacts) == len(manifest.files)

    # A watcher arriving after the end gets the snapshot and the stream ends.
    snapshot = await _events(stub, job.job_id)
    assert snapshot[0].state_change.state == pb.JOB_STATE_SUCCEEDED and snapshot[0].state_change.result == result
    assert snapshot[0].sequence == events[-1].sequence


async def test_submit_refusals_change_nothing(
    service: tuple[TrainingApp, pb_grpc.TrainingServiceStub], tiny_model: Path, sentiment_version: Any
) -> None:
    app, stub = service
    sentiment_version(app.host.platform.objects)
    too_many = _spec(tiny_model)
    too_many.resources.num_workers = 3
    bad_lr = _spec(tiny_model, learning_rate=-1.0)
    cases = [
        (pb.SubmitJobRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SubmitJobRequest(spec=bad_lr), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SubmitJobRequest(spec=_spec(tiny_model, dataset="v9")), grpc.StatusCode.NOT_FOUND),
        (pb.SubmitJobRequest(spec=_spec(tiny_model.parent / "missing")), grpc.StatusCode.NOT_FOUND),
        (pb.SubmitJobRequest(spec=too_many), grpc.StatusCode.FAILED_PRECONDITION),
        (pb.SubmitJobRequest(spec=_spec(tiny_model), request_id="Not A Slug"), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for request, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SubmitJob(request)
        assert caught.value.code() == code, request
        assert caught.value.details() and "internal" not in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitJob(pb.SubmitJobRequest(spec=too_many))
    assert "the Ray cluster has 2 CPUs" in (caught.value.details() or "")
    # A tampered dataset file: FAILED_PRECONDITION naming the file.
    app.host.platform.objects.put_bytes("datasets/reviews/v1/test.jsonl", b"{}\n", overwrite=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "test.jsonl" in (caught.value.details() or "")
    assert not (await stub.ListJobs(pb.ListJobsRequest())).jobs


async def test_the_licence_limits_workers_and_gpus_and_a_refusal_changes_nothing(
    tmp_path: Path, tiny_model: Path, sentiment_version: Any
) -> None:
    # The community edition (no licence file): two workers at most, no GPUs.
    app, port = await _host(tmp_path / "community", ScriptedRunner(), license_=load_license(None, ""))
    try:
        sentiment_version(app.host.platform.objects)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            three = _spec(tiny_model)
            three.resources.num_workers = 3
            gpu = _spec(tiny_model)
            gpu.resources.use_gpu = True
            for spec, message in (
                (three, "max_training_workers is 2 under the community edition"),
                (gpu, "training.gpu needs an enterprise licence"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert message in (caught.value.details() or "")
            # An auto-train policy is checked when it is set, not when a dataset version triggers it.
            template = _spec(tiny_model)
            template.resources.num_workers = 3
            template.ClearField("dataset_version")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SetAutoTrainPolicy(
                    pb.SetAutoTrainPolicyRequest(
                        policy=pb.AutoTrainPolicy(project_id="reviews", enabled=True, job_template=template)
                    )
                )
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert not (await stub.ListJobs(pb.ListJobsRequest())).jobs
    finally:
        await app.host.stop()
    # A licence with four workers lets three through to the next check (this cluster's two CPUs).
    licensed, port = await _host(
        tmp_path / "licensed",
        InProcessRunner(tmp_path / "runs", cpus=2),
        license_=signed_license(limits={"max_training_workers": 4}),
    )
    try:
        sentiment_version(licensed.host.platform.objects)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.TrainingServiceStub(channel).SubmitJob(pb.SubmitJobRequest(spec=three))
            assert "the Ray cluster has 2 CPUs" in (caught.value.details() or "")
    finally:
        await licensed.host.stop()


async def test_reads_and_lists(tmp_path: Path, tiny_model: Path, sentiment_version: Any) -> None:
    runner = ScriptedRunner()
    app, port = await _host(tmp_path, runner, max_running_jobs=1)
    try:
        sentiment_version(app.host.platform.objects)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            first = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model), request_id="req-1"))
            again = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model), request_id="req-1"))
            assert again.job_id == first.job_id
            second = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
            third = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
            assert await _code(stub.GetJob(pb.GetJobRequest(job_id="nope"))) == grpc.StatusCode.NOT_FOUND
            assert await _code(stub.GetJob(pb.GetJobRequest(job_id="../x"))) == grpc.StatusCode.INVALID_ARGUMENT
            page = await stub.ListJobs(pb.ListJobsRequest(page=common_pb2.PageRequest(page_size=2)))
            assert [j.job_id for j in page.jobs] == [third.job_id, second.job_id] and page.next_page_token
            rest = await stub.ListJobs(
                pb.ListJobsRequest(page=common_pb2.PageRequest(page_size=2, page_token=page.next_page_token))
            )
            assert [j.job_id for j in rest.jobs] == [first.job_id] and not rest.next_page_token
            await asyncio.to_thread(runner.started.wait, 30)
            queued = await stub.ListJobs(pb.ListJobsRequest(states=[pb.JOB_STATE_QUEUED], project_id="reviews"))
            assert {j.job_id for j in queued.jobs} == {second.job_id, third.job_id}  # the first one is running
            assert not (await stub.ListJobs(pb.ListJobsRequest(project_id="other"))).jobs
            bad = [
                pb.ListJobsRequest(page=common_pb2.PageRequest(page_size=-1)),
                pb.ListJobsRequest(page=common_pb2.PageRequest(page_token="garbage!")),
                pb.ListJobsRequest(project_id="other", page=common_pb2.PageRequest(page_token=page.next_page_token)),
                pb.ListJobsRequest(states=[pb.JOB_STATE_UNSPECIFIED]),
                pb.ListJobsRequest(project_id="Bad Project"),
            ]
            for request in bad:
                assert await _code(stub.ListJobs(request)) == grpc.StatusCode.INVALID_ARGUMENT, request
            for job in (first, second, third):
                await stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))
    finally:
        await app.host.stop()


async def test_watch_streams_live_progress_and_resumes(
    tmp_path: Path, tiny_model: Path, sentiment_version: Any
) -> None:
    runner = ScriptedRunner(fail_with="worker 0 failed: ValueError: injected")
    app, port = await _host(tmp_path, runner)
    try:
        sentiment_version(app.host.platform.objects)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            job = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
            assert await _code(stub.WatchJob(pb.WatchJobRequest(job_id="nope")).read()) == grpc.StatusCode.NOT_FOUND
            await asyncio.to_thread(runner.started.wait, 30)
            stream = stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id))
            snapshot = await stream.read()
            assert snapshot.state_change.state == pb.JOB_STATE_RUNNING
            latest = await stream.read()  # the metrics reported so far
            assert {m.name: m.value for m in latest.metrics.metrics}["loss"] == 0.5
            assert snapshot.sequence == latest.sequence == 3
            runner.release.set()  # the run now fails: the live stream shows it and ends
            failed = await stream.read()
            assert failed.sequence == 4 and failed.state_change.state == pb.JOB_STATE_FAILED
            assert failed.state_change.reason == "worker 0 failed: ValueError: injected"
            assert await stream.read() == grpc.aio.EOF
            resumed = await _events(stub, job.job_id, after_sequence=2)
            assert [e.sequence for e in resumed] == [3, 4] and resumed[0].metrics.step == 10
            assert await _events(stub, job.job_id, after_sequence=4) == []
            ahead = stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id, after_sequence=5))
            assert await _code(ahead.read()) == grpc.StatusCode.OUT_OF_RANGE
            job_view = await stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
            assert job_view.state == pb.JOB_STATE_FAILED and job_view.state_reason == failed.state_change.reason
    finally:
        await app.host.stop()


async def test_cancel(tmp_path: Path, tiny_model: Path, sentiment_version: Any) -> None:
    runner = ScriptedRunner()
    app, port = await _host(tmp_path, runner, max_running_jobs=1)
    try:
        sentiment_version(app.host.platform.objects)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            running = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
            queued = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
            await asyncio.to_thread(runner.started.wait, 30)
            cancelled = await stub.CancelJob(pb.CancelJobRequest(job_id=running.job_id, reason="wrong data"))
            assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.state_reason == "wrong data"
            await _wait_for(lambda: runner.cancelled == [running.job_id])
            # The run stopped, and the queued job took its place; cancelling it too stops it the same way.
            await _wait_for(lambda: queued.job_id in app.supervisor.running())
            await stub.CancelJob(pb.CancelJobRequest(job_id=queued.job_id))
            await _wait_for(lambda: runner.cancelled == [running.job_id, queued.job_id])
            again = await stub.CancelJob(pb.CancelJobRequest(job_id=running.job_id, reason="twice"))
            assert again.state == pb.JOB_STATE_CANCELLED and again.state_reason == "wrong data"
            events = await _events(stub, running.job_id, after_sequence=0)
            assert events[-1].state_change.state == pb.JOB_STATE_CANCELLED  # the run's end changed nothing after
            assert await _code(stub.CancelJob(pb.CancelJobRequest(job_id="nope"))) == grpc.StatusCode.NOT_FOUND
            runner.fail_with = "boom"
            failed = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
            runner.release.set()
            await _wait_for(lambda: app.jobs.get(failed.job_id).state is JobState.FAILED)
            code = await _code(stub.CancelJob(pb.CancelJobRequest(job_id=failed.job_id)))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await app.host.stop()


async def test_a_failing_training_loop_ends_the_job_failed_with_its_error(
    service: tuple[TrainingApp, pb_grpc.TrainingServiceStub], tiny_model: Path, sentiment_version: Any, tmp_path: Path
) -> None:
    import shutil

    app, stub = service
    sentiment_version(app.host.platform.objects)
    model = tmp_path / "broken-weights"
    shutil.copytree(tiny_model, model)
    # Config and tokenizer are fine (SubmitJob accepts the model); the weights only fail when the loop loads them.
    (model / "model.safetensors").write_bytes(b"not weights")
    job = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(model)))
    events = await _events(stub, job.job_id, after_sequence=0)
    final = events[-1].state_change
    assert final.state == pb.JOB_STATE_FAILED
    assert final.reason.startswith("SafetensorError: ")  # the loop's own error, named by its type


async def test_a_base_model_changed_after_submit_is_refused_at_run_time(
    tmp_path: Path, tiny_model: Path, sentiment_version: Any
) -> None:
    import shutil

    runner = ScriptedRunner()
    app, port = await _host(tmp_path, runner, max_running_jobs=1)
    try:
        sentiment_version(app.host.platform.objects)
        model = tmp_path / "model-copy"
        shutil.copytree(tiny_model, model)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            first = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
            await asyncio.to_thread(runner.started.wait, 30)
            waiting = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(model)))
            # While the job waits its turn, its weights change: it must not train on something else.
            (model / "model.safetensors").write_bytes(b"other weights")
            await stub.CancelJob(pb.CancelJobRequest(job_id=first.job_id))
            events = await _events(stub, waiting.job_id, after_sequence=0)
            final = events[-1].state_change
            assert final.state == pb.JOB_STATE_FAILED and "changed since the job was submitted" in final.reason
    finally:
        await app.host.stop()


async def test_restart_resumes_orphaned_runs_and_runs_queued_jobs(
    tmp_path: Path, tiny_model: Path, sentiment_version: Any
) -> None:
    runner = ScriptedRunner()
    app, port = await _host(tmp_path, runner, max_running_jobs=1)
    sentiment_version(app.host.platform.objects)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TrainingServiceStub(channel)
        running = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
        queued = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
        await asyncio.to_thread(runner.started.wait, 30)
    # A graceful stop aborts the run and says so.
    await app.host.stop()
    stopped = app.jobs.get(running.job_id)
    assert stopped.state is JobState.FAILED and stopped.state_reason == STOPPED_WITH_SERVICE
    # A process that died leaves RUNNING behind: the next start runs it again under its Ray run name (Ray Train
    # resumes it from its last checkpoint), counting a restart, fails one resumed too often already, and picks
    # up the queued job.
    database = Database(TrainingSettings(data_dir=tmp_path / "data").resolved_database_url("training"))
    store = SqlJobStore(database, OutboxWriter(platform_catalog(), "training"))
    orphan, _ = store.create_job(Job("orphan", "default", stopped.spec, JobState.QUEUED, datetime.now(UTC)))
    store.transition(orphan.job_id, JobState.RUNNING, ray_run_name="orphan-run")
    worn, _ = store.create_job(Job("worn-out", "default", stopped.spec, JobState.QUEUED, datetime.now(UTC)))
    store.transition(worn.job_id, JobState.RUNNING, restart_count=MAX_RESUMES)
    database.dispose()
    second_runner = RecordingRunner()
    second, _ = await _host(tmp_path, second_runner)
    try:
        lost = second.jobs.get("worn-out")
        assert lost.state is JobState.FAILED and lost.state_reason.startswith(LOST_ON_RESTART)
        assert f"resumed {MAX_RESUMES} times already" in lost.state_reason
        await _wait_for(lambda: {"orphan", queued.job_id} <= set(second.supervisor.running()))
        await _wait_for(lambda: second.jobs.get("orphan").restart_count == 1)
        resumed = second.jobs.get("orphan")
        assert resumed.state is JobState.RUNNING and "resumed from the checkpoint" in resumed.state_reason
        assert second_runner.run_names["orphan"] == "orphan-run", "the same Ray run, so its checkpoints are found"
    finally:
        await second.host.stop()


async def test_a_job_waits_out_an_unreachable_object_store_and_runs_again_under_the_same_run(
    tmp_path: Path, tiny_model: Path, sentiment_version: Any
) -> None:
    runner = UnreachableStorageRunner(outages=2)
    app, port = await _host(tmp_path, runner, dependency_retry_s=0.05)
    sentiment_version(app.host.platform.objects)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            job = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
            await asyncio.to_thread(runner.started.wait, 30)
            running = app.jobs.get(job.job_id)
            assert running.state is JobState.RUNNING, running.state_reason
            assert len(runner.attempts) == 3 and len(set(runner.attempts)) == 1, "one Ray run, resumed"
            assert running.restart_count == 2
    finally:
        await app.host.stop()
    # An outage longer than the wait fails the job with the reason.
    runner = UnreachableStorageRunner(outages=1000)
    app, port = await _host(tmp_path / "second", runner, dependency_retry_s=0.05, dependency_wait_s=0.3)
    sentiment_version(app.host.platform.objects)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            job = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)))
            await _wait_for(lambda: app.jobs.get(job.job_id).state is JobState.FAILED)
            failed = app.jobs.get(job.job_id)
            assert "NETWORK_CONNECTION" in failed.state_reason and "still unreachable after" in failed.state_reason
    finally:
        await app.host.stop()


async def test_auto_train_policies(tmp_path: Path, tiny_model: Path, sentiment_version: Any) -> None:
    runner = ScriptedRunner()
    app, port = await _host(tmp_path, runner)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            template = _spec(tiny_model)
            template.ClearField("dataset_version")
            policy = pb.AutoTrainPolicy(project_id="reviews", enabled=True, job_template=template)
            saved = await stub.SetAutoTrainPolicy(pb.SetAutoTrainPolicyRequest(policy=policy))
            assert saved.enabled and saved.job_template.base_model.content_sha256 and saved.update_time.seconds
            assert (await stub.GetAutoTrainPolicy(pb.GetAutoTrainPolicyRequest(project_id="reviews"))) == saved
            no_model = pb.AutoTrainPolicy(project_id="reviews", job_template=pb.JobSpec())
            bad = [
                pb.SetAutoTrainPolicyRequest(),
                pb.SetAutoTrainPolicyRequest(policy=no_model),
                pb.SetAutoTrainPolicyRequest(policy=pb.AutoTrainPolicy(project_id="Bad Id", job_template=template)),
            ]
            for request in bad:
                assert await _code(stub.SetAutoTrainPolicy(request)) == grpc.StatusCode.INVALID_ARGUMENT
            for call in (stub.GetAutoTrainPolicy, stub.DeleteAutoTrainPolicy):
                assert await _code(call(pb.GetAutoTrainPolicyRequest(project_id="other"))) == grpc.StatusCode.NOT_FOUND  # type: ignore[arg-type]

            # Labeling publishes a version: the policy submits one job for it, however often it is delivered.
            dataset = sentiment_version(app.host.platform.objects, "reviews", "v7")
            published = events_pb2.DatasetVersionPublished(project_id="reviews", dataset_version_id="v7")
            published.manifest.key, published.manifest.sha256 = dataset.manifest.key, dataset.manifest.sha256
            event = Event.create(published, key="reviews", source="labeling", catalog=app.host.platform.catalog)
            with app.host.platform.database.transaction() as session:
                Outbox.add(session, event)
            await asyncio.to_thread(app.host.platform.bus.publish, event)  # delivered twice
            await _wait_for(lambda: app.jobs.list(_query()).jobs)
            await asyncio.sleep(0.5)
            [job] = (await stub.ListJobs(pb.ListJobsRequest())).jobs
            assert job.trigger.auto_train_dataset_version_id == "v7"
            assert job.spec.dataset_version.dataset_version_id == "v7"
            # Even past the bus's duplicate filter (a crash between submitting and marking the event
            # handled), the event id makes the submit idempotent.
            version = PublishedVersion(event.event_id, "", "reviews", "v7", None)
            assert (await asyncio.to_thread(app.jobs.on_dataset_published, version)).job_id == job.job_id

            await stub.DeleteAutoTrainPolicy(pb.DeleteAutoTrainPolicyRequest(project_id="reviews"))
            assert await _code(stub.GetAutoTrainPolicy(pb.GetAutoTrainPolicyRequest(project_id="reviews"))) == (
                grpc.StatusCode.NOT_FOUND
            )
            await stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))
    finally:
        await app.host.stop()


def _query() -> Any:
    from gristmill.training.domain.ports import JobQuery

    return JobQuery(organization_id="")


async def test_job_events_continue_the_trace_the_job_was_submitted_in(
    tmp_path: Path, tiny_model: Path, sentiment_version: Any
) -> None:
    # The driver thread writes RUNNING and the end state long after SubmitJob returned: those events must
    # still carry the caller's trace, so that the registry's registration and serving's swap join it.
    runner = ScriptedRunner(fail_with="scripted failure")
    app, port = await _host(tmp_path, runner)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        sentiment_version(app.host.platform.objects)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            traceparent = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
            job = await stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(tiny_model)), metadata=traceparent)
            assert await asyncio.to_thread(runner.started.wait, 30)
            runner.release.set()
            await _wait_for(lambda: app.jobs.get(job.job_id).state is JobState.FAILED)
        with app.host.platform.database.transaction() as session:
            rows = [
                r
                for r in session.execute(select(OutboxEvent).order_by(OutboxEvent.id)).scalars()
                if r.key == job.job_id
            ]
            states = [events_pb2.JobStateChanged.FromString(r.payload).state for r in rows]
            trace_ids = {r.headers["traceparent"].split("-")[1] for r in rows}
        assert states[0] == pb.JOB_STATE_QUEUED and states[-1] == pb.JOB_STATE_FAILED and pb.JOB_STATE_RUNNING in states
        assert trace_ids == {trace_id}
    finally:
        await app.host.stop()
