"""The training service through its gRPC API (submit, licence limits, reads, watch, cancel), in-process: memory
bus, SQLite, local objects, no Ray.

Real training runs use ``InProcessRunner`` (the real loop on a tiny BERT); lifecycle edge cases use a
scripted runner that waits for the test's signal.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.events import OutboxEvent
from gristmill.core.licensing import load_license
from gristmill.core.manifests import ModelManifest
from gristmill.training.app import TrainingApp
from gristmill.training.domain.model import JobState
from gristmill.training.domain.refs import DatasetRef
from gristmill.training.runner.in_process import InProcessRunner
from services.training.tests.service_support import (
    ScriptedRunner,
    code_of,
    job_events,
    job_spec,
    start_host,
    wait_for,
)
from tests.support.licences import signed_license


async def test_a_job_trains_publishes_its_model_and_announces_success(
    service: tuple[TrainingApp, pb_grpc.TrainingServiceStub], tiny_model: Path, sentiment_version: Any
) -> None:
    app, stub = service
    dataset: DatasetRef = sentiment_version(app.host.platform.objects)
    job = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
    assert job.state == pb.JOB_STATE_QUEUED and job.ray_run_name == job.job_id
    assert job.spec.dataset_version.manifest.sha256 == dataset.manifest.sha256
    assert len(job.spec.base_model.content_sha256) == 64

    events = await job_events(stub, job.job_id, after_sequence=0)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))  # no gaps, in order
    states = [e.state_change.state for e in events if e.WhichOneof("event") == "state_change"]
    assert states == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED]
    metrics = [e.metrics for e in events if e.WhichOneof("event") == "metrics"]
    assert {m.name for report in metrics for m in report.metrics} >= {
        "loss",
        "learning_rate",
        "samples_per_second",
        "tokens_per_second",
        "accuracy",
        "f1",
    }
    assert any(m.split == common_pb2.DATASET_SPLIT_TEST for report in metrics for m in report.metrics)

    done = await stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.progress.step == done.progress.total_steps == 36
    assert done.start_time.seconds > 0 and done.end_time.seconds > 0
    # The last training throughput stays on the job: every sample is a sentence of several tokens.
    assert done.progress.tokens_per_second > done.progress.samples_per_second > 0
    result = done.result
    assert result.artifact_prefix == f"jobs/{job.job_id}/model"
    accuracy = {(m.name, m.split): m.value for m in result.metrics}[("accuracy", common_pb2.DATASET_SPLIT_TEST)]
    assert accuracy >= 0.9
    final = {m.name: m.value for m in result.metrics if m.split == common_pb2.DATASET_SPLIT_UNSPECIFIED}
    assert final["train_tokens_per_second"] > final["train_samples_per_second"] > 0
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
    snapshot = await job_events(stub, job.job_id)
    assert snapshot[0].state_change.state == pb.JOB_STATE_SUCCEEDED and snapshot[0].state_change.result == result
    assert snapshot[0].sequence == events[-1].sequence


async def test_submit_refusals_change_nothing(
    service: tuple[TrainingApp, pb_grpc.TrainingServiceStub], tiny_model: Path, sentiment_version: Any
) -> None:
    app, stub = service
    sentiment_version(app.host.platform.objects)
    too_many = job_spec(tiny_model)
    too_many.resources.num_workers = 3
    bad_lr = job_spec(tiny_model, learning_rate=-1.0)
    cases = [
        (pb.SubmitJobRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SubmitJobRequest(spec=bad_lr), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SubmitJobRequest(spec=job_spec(tiny_model, dataset="v9")), grpc.StatusCode.NOT_FOUND),
        (pb.SubmitJobRequest(spec=job_spec(tiny_model.parent / "missing")), grpc.StatusCode.NOT_FOUND),
        (pb.SubmitJobRequest(spec=too_many), grpc.StatusCode.FAILED_PRECONDITION),
        (pb.SubmitJobRequest(spec=job_spec(tiny_model), request_id="Not A Slug"), grpc.StatusCode.INVALID_ARGUMENT),
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
        await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "test.jsonl" in (caught.value.details() or "")
    assert not (await stub.ListJobs(pb.ListJobsRequest())).jobs


async def test_the_licence_limits_workers_and_gpus_and_a_refusal_changes_nothing(
    tmp_path: Path, tiny_model: Path, sentiment_version: Any
) -> None:
    # The community edition (no licence file): two workers at most, no GPUs.
    app, port = await start_host(tmp_path / "community", ScriptedRunner(), license_=load_license(None, ""))
    try:
        sentiment_version(app.host.platform.objects)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            three = job_spec(tiny_model)
            three.resources.num_workers = 3
            gpu = job_spec(tiny_model)
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
            template = job_spec(tiny_model)
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
    licensed, port = await start_host(
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
    app, port = await start_host(tmp_path, runner, max_running_jobs=1)
    try:
        sentiment_version(app.host.platform.objects)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            first = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model), request_id="req-1"))
            again = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model), request_id="req-1"))
            assert again.job_id == first.job_id
            second = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
            third = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
            assert await code_of(stub.GetJob(pb.GetJobRequest(job_id="nope"))) == grpc.StatusCode.NOT_FOUND
            assert await code_of(stub.GetJob(pb.GetJobRequest(job_id="../x"))) == grpc.StatusCode.INVALID_ARGUMENT
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
                assert await code_of(stub.ListJobs(request)) == grpc.StatusCode.INVALID_ARGUMENT, request
            for job in (first, second, third):
                await stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))
    finally:
        await app.host.stop()


async def test_watch_streams_live_progress_and_resumes(
    tmp_path: Path, tiny_model: Path, sentiment_version: Any
) -> None:
    runner = ScriptedRunner(fail_with="worker 0 failed: ValueError: injected")
    app, port = await start_host(tmp_path, runner)
    try:
        sentiment_version(app.host.platform.objects)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            job = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
            assert await code_of(stub.WatchJob(pb.WatchJobRequest(job_id="nope")).read()) == grpc.StatusCode.NOT_FOUND
            await asyncio.to_thread(runner.started.wait, 30)
            stream = stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id))
            snapshot = await stream.read()
            assert snapshot.state_change.state == pb.JOB_STATE_RUNNING
            # The supervisor keeps the latest training throughput as the job's progress.
            progress = snapshot.state_change.progress
            assert (progress.samples_per_second, progress.tokens_per_second) == (12.0, 480.0)
            latest = await stream.read()  # the metrics reported so far
            assert {m.name: m.value for m in latest.metrics.metrics}["loss"] == 0.5
            assert snapshot.sequence == latest.sequence == 3
            runner.release.set()  # the run now fails: the live stream shows it and ends
            failed = await stream.read()
            assert failed.sequence == 4 and failed.state_change.state == pb.JOB_STATE_FAILED
            assert failed.state_change.reason == "worker 0 failed: ValueError: injected"
            assert await stream.read() == grpc.aio.EOF
            resumed = await job_events(stub, job.job_id, after_sequence=2)
            assert [e.sequence for e in resumed] == [3, 4] and resumed[0].metrics.step == 10
            assert await job_events(stub, job.job_id, after_sequence=4) == []
            ahead = stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id, after_sequence=5))
            assert await code_of(ahead.read()) == grpc.StatusCode.OUT_OF_RANGE
            job_view = await stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
            assert job_view.state == pb.JOB_STATE_FAILED and job_view.state_reason == failed.state_change.reason
    finally:
        await app.host.stop()


async def test_cancel(tmp_path: Path, tiny_model: Path, sentiment_version: Any) -> None:
    runner = ScriptedRunner()
    app, port = await start_host(tmp_path, runner, max_running_jobs=1)
    try:
        sentiment_version(app.host.platform.objects)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            running = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
            queued = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
            await asyncio.to_thread(runner.started.wait, 30)
            cancelled = await stub.CancelJob(pb.CancelJobRequest(job_id=running.job_id, reason="wrong data"))
            assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.state_reason == "wrong data"
            await wait_for(lambda: runner.cancelled == [running.job_id])
            # The run stopped, and the queued job took its place; cancelling it too stops it the same way.
            await wait_for(lambda: queued.job_id in app.supervisor.running())
            await stub.CancelJob(pb.CancelJobRequest(job_id=queued.job_id))
            await wait_for(lambda: runner.cancelled == [running.job_id, queued.job_id])
            again = await stub.CancelJob(pb.CancelJobRequest(job_id=running.job_id, reason="twice"))
            assert again.state == pb.JOB_STATE_CANCELLED and again.state_reason == "wrong data"
            events = await job_events(stub, running.job_id, after_sequence=0)
            assert events[-1].state_change.state == pb.JOB_STATE_CANCELLED  # the run's end changed nothing after
            assert await code_of(stub.CancelJob(pb.CancelJobRequest(job_id="nope"))) == grpc.StatusCode.NOT_FOUND
            runner.fail_with = "boom"
            failed = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
            runner.release.set()
            await wait_for(lambda: app.jobs.get(failed.job_id).state is JobState.FAILED)
            code = await code_of(stub.CancelJob(pb.CancelJobRequest(job_id=failed.job_id)))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await app.host.stop()
