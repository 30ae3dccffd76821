"""The training service through its gRPC API when things go wrong: failing loops, changed base models, restarts,
an unreachable object store; and auto-train policies and traces."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import select

from gristmill.api.events.v1 import events_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.events import Event, Outbox, OutboxEvent
from gristmill.core.events.topics import platform_catalog
from gristmill.core.sql import Database
from gristmill.training.app import TrainingApp
from gristmill.training.domain.jobs import PublishedVersion
from gristmill.training.domain.model import Job, JobState
from gristmill.training.domain.supervisor import LOST_ON_RESTART, MAX_RESUMES, STOPPED_WITH_SERVICE
from gristmill.training.events.payloads import TrainingEvents
from gristmill.training.settings import TrainingSettings
from gristmill.training.store.sql import SqlJobStore
from services.training.tests.service_support import (
    RecordingRunner,
    ScriptedRunner,
    UnreachableStorageRunner,
    code_of,
    job_events,
    job_spec,
    start_host,
    wait_for,
)


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
    job = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(model)))
    events = await job_events(stub, job.job_id, after_sequence=0)
    final = events[-1].state_change
    assert final.state == pb.JOB_STATE_FAILED
    assert final.reason.startswith("SafetensorError: ")  # the loop's own error, named by its type


async def test_a_base_model_changed_after_submit_is_refused_at_run_time(
    tmp_path: Path, tiny_model: Path, sentiment_version: Any
) -> None:
    import shutil

    runner = ScriptedRunner()
    app, port = await start_host(tmp_path, runner, max_running_jobs=1)
    try:
        sentiment_version(app.host.platform.objects)
        model = tmp_path / "model-copy"
        shutil.copytree(tiny_model, model)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            first = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
            await asyncio.to_thread(runner.started.wait, 30)
            waiting = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(model)))
            # While the job waits its turn, its weights change: it must not train on something else.
            (model / "model.safetensors").write_bytes(b"other weights")
            await stub.CancelJob(pb.CancelJobRequest(job_id=first.job_id))
            events = await job_events(stub, waiting.job_id, after_sequence=0)
            final = events[-1].state_change
            assert final.state == pb.JOB_STATE_FAILED and "changed since the job was submitted" in final.reason
    finally:
        await app.host.stop()


async def test_restart_resumes_orphaned_runs_and_runs_queued_jobs(
    tmp_path: Path, tiny_model: Path, sentiment_version: Any
) -> None:
    runner = ScriptedRunner()
    app, port = await start_host(tmp_path, runner, max_running_jobs=1)
    sentiment_version(app.host.platform.objects)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TrainingServiceStub(channel)
        running = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
        queued = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
        await asyncio.to_thread(runner.started.wait, 30)
    # A graceful stop aborts the run and says so.
    await app.host.stop()
    stopped = app.jobs.get(running.job_id)
    assert stopped.state is JobState.FAILED and stopped.state_reason == STOPPED_WITH_SERVICE
    # A process that died leaves RUNNING behind: the next start runs it again under its Ray run name (Ray Train
    # resumes it from its last checkpoint), counting a restart, fails one resumed too often already, and picks
    # up the queued job.
    database = Database(TrainingSettings(data_dir=tmp_path / "data").resolved_database_url("training"))
    store = SqlJobStore(database, TrainingEvents(database, platform_catalog(), "training"))
    orphan, _ = store.create_job(Job("orphan", "default", stopped.spec, JobState.QUEUED, datetime.now(UTC)))
    store.transition(orphan.job_id, JobState.RUNNING, ray_run_name="orphan-run")
    worn, _ = store.create_job(Job("worn-out", "default", stopped.spec, JobState.QUEUED, datetime.now(UTC)))
    store.transition(worn.job_id, JobState.RUNNING, restart_count=MAX_RESUMES)
    database.dispose()
    second_runner = RecordingRunner()
    second, _ = await start_host(tmp_path, second_runner)
    try:
        lost = second.jobs.get("worn-out")
        assert lost.state is JobState.FAILED and lost.state_reason.startswith(LOST_ON_RESTART)
        assert f"resumed {MAX_RESUMES} times already" in lost.state_reason
        await wait_for(lambda: {"orphan", queued.job_id} <= set(second.supervisor.running()))
        await wait_for(lambda: second.jobs.get("orphan").restart_count == 1)
        resumed = second.jobs.get("orphan")
        assert resumed.state is JobState.RUNNING and "resumed from the checkpoint" in resumed.state_reason
        assert second_runner.run_names["orphan"] == "orphan-run", "the same Ray run, so its checkpoints are found"
    finally:
        await second.host.stop()


async def test_a_job_waits_out_an_unreachable_object_store_and_runs_again_under_the_same_run(
    tmp_path: Path, tiny_model: Path, sentiment_version: Any
) -> None:
    runner = UnreachableStorageRunner(outages=2)
    app, port = await start_host(tmp_path, runner, dependency_retry_s=0.05)
    sentiment_version(app.host.platform.objects)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            job = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
            await asyncio.to_thread(runner.started.wait, 30)
            running = app.jobs.get(job.job_id)
            assert running.state is JobState.RUNNING, running.state_reason
            assert len(runner.attempts) == 3 and len(set(runner.attempts)) == 1, "one Ray run, resumed"
            assert running.restart_count == 2
    finally:
        await app.host.stop()
    # An outage longer than the wait fails the job with the reason.
    runner = UnreachableStorageRunner(outages=1000)
    app, port = await start_host(tmp_path / "second", runner, dependency_retry_s=0.05, dependency_wait_s=0.3)
    sentiment_version(app.host.platform.objects)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            job = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)))
            await wait_for(lambda: app.jobs.get(job.job_id).state is JobState.FAILED)
            failed = app.jobs.get(job.job_id)
            assert "NETWORK_CONNECTION" in failed.state_reason and "still unreachable after" in failed.state_reason
    finally:
        await app.host.stop()


async def test_auto_train_policies(tmp_path: Path, tiny_model: Path, sentiment_version: Any) -> None:
    runner = ScriptedRunner()
    app, port = await start_host(tmp_path, runner)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            template = job_spec(tiny_model)
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
                assert await code_of(stub.SetAutoTrainPolicy(request)) == grpc.StatusCode.INVALID_ARGUMENT
            for call in (stub.GetAutoTrainPolicy, stub.DeleteAutoTrainPolicy):
                assert (
                    await code_of(call(pb.GetAutoTrainPolicyRequest(project_id="other"))) == grpc.StatusCode.NOT_FOUND
                )  # type: ignore[arg-type]

            # Labeling publishes a version: the policy submits one job for it, however often it is delivered.
            dataset = sentiment_version(app.host.platform.objects, "reviews", "v7")
            published = events_pb2.DatasetVersionPublished(project_id="reviews", dataset_version_id="v7")
            published.manifest.key, published.manifest.sha256 = dataset.manifest.key, dataset.manifest.sha256
            event = Event.create(published, key="reviews", source="labeling", catalog=app.host.platform.catalog)
            with app.host.platform.database.transaction() as session:
                Outbox.add(session, event)
            await asyncio.to_thread(app.host.platform.bus.publish, event)  # delivered twice
            await wait_for(lambda: app.jobs.list(_query()).jobs)
            await asyncio.sleep(0.5)
            [job] = (await stub.ListJobs(pb.ListJobsRequest())).jobs
            assert job.trigger.auto_train_dataset_version_id == "v7"
            assert job.spec.dataset_version.dataset_version_id == "v7"
            # Even past the bus's duplicate filter (a crash between submitting and marking the event
            # handled), the event id makes the submit idempotent.
            version = PublishedVersion(event.event_id, "", "reviews", "v7", None)
            assert (await asyncio.to_thread(app.jobs.on_dataset_published, version)).job_id == job.job_id

            await stub.DeleteAutoTrainPolicy(pb.DeleteAutoTrainPolicyRequest(project_id="reviews"))
            assert await code_of(stub.GetAutoTrainPolicy(pb.GetAutoTrainPolicyRequest(project_id="reviews"))) == (
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
    app, port = await start_host(tmp_path, runner)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        sentiment_version(app.host.platform.objects)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            traceparent = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
            job = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec(tiny_model)), metadata=traceparent)
            assert await asyncio.to_thread(runner.started.wait, 30)
            runner.release.set()
            await wait_for(lambda: app.jobs.get(job.job_id).state is JobState.FAILED)
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
