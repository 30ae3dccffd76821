"""The SQL job store on SQLite: lifecycle rules, event streams and the outbox written in one transaction."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.message import Message
from sqlalchemy import select

from gristmill.api.admin.v1 import admin_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.core.errors import FailedPreconditionError, NotFoundError
from gristmill.core.events import OutboxEvent
from gristmill.core.events.topics import platform_catalog
from gristmill.core.sql import Database
from gristmill.training.domain import spec as d
from gristmill.training.domain.model import (
    AutoTrainPolicy,
    EventKind,
    Job,
    JobProgress,
    JobResult,
    JobState,
    Lineage,
    Metric,
    MetricsReport,
    Split,
    classification_signature,
)
from gristmill.training.domain.refs import BaseModelRef, DatasetRef, FileRef
from gristmill.training.store.base import JobQuery
from gristmill.training.store.sql import SqlJobStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _spec(project: str = "reviews") -> d.JobSpec:
    return d.build_spec(
        display_name="t",
        base_model=BaseModelRef(local_path="/m"),
        dataset=DatasetRef(project, "v1"),
        task=d.TaskType.TEXT_CLASSIFICATION,
        method=d.Method.FULL,
        lora=None,
        hyper_parameters=d.build_hyper_parameters(method=d.Method.FULL),
        resources=d.build_resources(),
        search=None,
        registered_model_name="sentiment",
        tags={"team": "ml"},
    )


def _job(job_id: str, *, project: str = "reviews", request_id: str = "", minutes: int = 0) -> Job:
    return Job(
        job_id, "default", _spec(project), JobState.QUEUED, NOW + timedelta(minutes=minutes), request_id=request_id
    )


@pytest.fixture
def database(tmp_path: Path) -> Database:
    return Database(f"sqlite:///{tmp_path / 'training.db'}")


@pytest.fixture
def store(database: Database) -> SqlJobStore:
    return SqlJobStore(database, platform_catalog(), source="training")


def _outbox(database: Database) -> list[events_pb2.JobStateChanged]:
    return [events_pb2.JobStateChanged.FromString(p) for p in _payloads(database, events_pb2.JobStateChanged)]


def _usage(database: Database) -> list[events_pb2.UsageRecorded]:
    return [events_pb2.UsageRecorded.FromString(p) for p in _payloads(database, events_pb2.UsageRecorded)]


def _payloads(database: Database, message: type[Message]) -> list[bytes]:
    with database.transaction() as session:
        rows = session.execute(select(OutboxEvent).order_by(OutboxEvent.id)).scalars().all()
        return [r.payload for r in rows if r.event_type == message.DESCRIPTOR.full_name]


def test_create_writes_the_first_event_and_its_outbox_record(store: SqlJobStore, database: Database) -> None:
    job, created = store.create_job(_job("j1"))
    assert created and job.state is JobState.QUEUED and job.last_sequence == 1
    [event] = store.events_after("j1", 0)
    assert event.kind is EventKind.STATE and event.state is JobState.QUEUED and event.sequence == 1
    [message] = _outbox(database)
    assert message.job_id == "j1" and message.state == pb.JOB_STATE_QUEUED
    assert message.previous_state == pb.JOB_STATE_UNSPECIFIED and message.tags == {"team": "ml"}


def test_a_request_id_returns_the_first_job(store: SqlJobStore) -> None:
    first, created = store.create_job(_job("j1", request_id="req-1"))
    again, created_again = store.create_job(_job("j2", request_id="req-1"))
    assert created and not created_again and again.job_id == first.job_id == "j1"
    assert store.find_by_request_id("default", "req-1") == first
    assert store.find_by_request_id("other-org", "req-1") is None
    with pytest.raises(NotFoundError):
        store.get_job("j2")


def test_the_start_time_is_when_training_began_kept_between_creation_and_now(store: SqlJobStore) -> None:
    created, _ = store.create_job(_job("early"))
    began = created.create_time + timedelta(milliseconds=250)
    running, _ = store.transition("early", JobState.RUNNING, started_at=began)
    assert running.start_time == began
    # A worker clock behind the service's, or ahead of it, cannot put the start outside the job's life.
    store.create_job(_job("skewed-back"))
    behind, _ = store.transition("skewed-back", JobState.RUNNING, started_at=began - timedelta(days=1))
    assert behind.start_time == behind.create_time
    store.create_job(_job("skewed-ahead"))
    before = datetime.now(UTC)
    ahead, _ = store.transition("skewed-ahead", JobState.RUNNING, started_at=before + timedelta(days=1))
    assert ahead.start_time is not None and before <= ahead.start_time <= datetime.now(UTC)


def test_transitions_follow_the_lifecycle(store: SqlJobStore, database: Database) -> None:
    store.create_job(_job("j1"))
    running, previous = store.transition("j1", JobState.RUNNING, progress=JobProgress(total_steps=10))
    assert previous is JobState.QUEUED and running.start_time is not None and running.progress.total_steps == 10
    with pytest.raises(FailedPreconditionError, match="is RUNNING and cannot become QUEUED"):
        store.transition("j1", JobState.QUEUED)
    restarted, _ = store.transition("j1", JobState.RUNNING, reason="resumed", restart_count=1)
    assert restarted.restart_count == 1 and restarted.start_time == running.start_time
    failed, _ = store.transition("j1", JobState.FAILED, reason="worker 0 failed: boom")
    assert failed.end_time is not None and failed.state_reason == "worker 0 failed: boom"
    for target in (JobState.RUNNING, JobState.SUCCEEDED, JobState.CANCELLED, JobState.FAILED):
        with pytest.raises(FailedPreconditionError):
            store.transition("j1", target)
    assert [e.state for e in store.events_after("j1", 0)] == [
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.RUNNING,
        JobState.FAILED,
    ]
    states = [(m.previous_state, m.state) for m in _outbox(database)]
    assert states[-1] == (pb.JOB_STATE_RUNNING, pb.JOB_STATE_FAILED)
    # The job ran and ended: its worker-seconds went out with the final state change, once.
    [usage] = _usage(database)
    seconds = (failed.end_time - running.start_time).total_seconds() * failed.spec.resources.num_workers
    assert usage.kind == admin_pb2.USAGE_KIND_TRAINING_WORKER_SECONDS and usage.resource == "training-job/j1"
    assert usage.organization_id == failed.organization_id and usage.quantity == pytest.approx(seconds)
    with pytest.raises(NotFoundError, match="training job 'nope' not found"):
        store.transition("nope", JobState.RUNNING)


def test_metrics_become_events_latest_values_and_progress(store: SqlJobStore, database: Database) -> None:
    store.create_job(_job("j1"))
    # Before the run starts, reports are ignored (nothing is running to report them).
    assert store.record_metrics("j1", [MetricsReport(1, 0.1, (Metric("loss", 0.9),))], JobProgress()).last_sequence == 1
    store.transition("j1", JobState.RUNNING)
    reports = [
        MetricsReport(10, 0.5, (Metric("loss", 0.7, step=10),)),
        MetricsReport(10, 0.5, (Metric("accuracy", 0.6, Split.VALIDATION, 10),)),
        MetricsReport(20, 1.0, (Metric("loss", 0.4, step=20),)),
    ]
    job = store.record_metrics("j1", reports, JobProgress(step=20, total_steps=40, epoch=1.0))
    assert job.last_sequence == 5 and job.progress.step == 20
    assert {(m.name, m.split, m.value) for m in job.latest_metrics} == {
        ("loss", Split.NONE, 0.4),
        ("accuracy", Split.VALIDATION, 0.6),
    }
    events = store.events_after("j1", 2)
    assert [(e.kind, e.step) for e in events] == [
        (EventKind.METRICS, 10),
        (EventKind.METRICS, 10),
        (EventKind.METRICS, 20),
    ]
    assert store.events_after("j1", 4) == events[2:]
    progress = _outbox(database)[-1]
    assert progress.state == progress.previous_state == pb.JOB_STATE_RUNNING and progress.progress.step == 20


def test_success_carries_what_the_registry_needs(store: SqlJobStore, database: Database) -> None:
    store.create_job(_job("j1"))
    store.transition("j1", JobState.RUNNING)
    result = JobResult(
        artifact_prefix="jobs/j1/model",
        files=(FileRef("jobs/j1/model/config.json", "a" * 64, 10),),
        manifest=FileRef("jobs/j1/model/manifest.json", "b" * 64, 20),
        metrics=(Metric("accuracy", 0.93, Split.TEST),),
        signature=classification_signature(2),
        label_map=("negative", "positive"),
        lineage=Lineage(
            "j1", DatasetRef("reviews", "v1"), (), BaseModelRef(local_path="/m"), {"seed": "42"}, "j1", "v"
        ),
        trainable_parameter_count=5,
        total_parameter_count=10,
    )
    job, _ = store.transition("j1", JobState.SUCCEEDED, result=result)
    assert store.get_job("j1").result == result == job.result
    message = _outbox(database)[-1]
    assert message.state == pb.JOB_STATE_SUCCEEDED and message.registered_model_name == "sentiment"
    assert message.artifact_prefix == "jobs/j1/model" and message.manifest.sha256 == "b" * 64
    assert [a.key for a in message.artifacts] == ["jobs/j1/model/config.json"]
    assert list(message.label_map.labels) == ["negative", "positive"] and message.lineage.training_job_id == "j1"
    assert [(o.name, list(o.shape)) for o in message.signature.outputs] == [
        ("probabilities", [-1, 2]),
        ("label", [-1]),
        ("label_index", [-1]),
    ]
    assert [(m.name, m.value) for m in message.metrics] == [("accuracy", 0.93)]


def test_listing_is_newest_first_filtered_and_paged(store: SqlJobStore) -> None:
    for i in range(5):
        store.create_job(_job(f"j{i}", project="a" if i % 2 else "b", minutes=i))
    store.transition("j4", JobState.CANCELLED)
    page = store.list_jobs(JobQuery("default", page_size=2))
    assert [j.job_id for j in page.jobs] == ["j4", "j3"] and page.next_offset == 2
    last = store.list_jobs(JobQuery("default", page_size=2, offset=4))
    assert [j.job_id for j in last.jobs] == ["j0"] and last.next_offset is None
    assert [j.job_id for j in store.list_jobs(JobQuery("default", project_id="a")).jobs] == ["j3", "j1"]
    queued_b = store.list_jobs(JobQuery("default", states=(JobState.QUEUED,), project_id="b"))
    assert [j.job_id for j in queued_b.jobs] == ["j2", "j0"]
    assert store.list_jobs(JobQuery("another-org")).jobs == ()
    assert [j.job_id for j in store.jobs_in_states([JobState.QUEUED])] == ["j0", "j1", "j2", "j3"]


def test_policies(store: SqlJobStore) -> None:
    policy = AutoTrainPolicy("reviews", "default", True, _spec(), NOW)
    store.put_policy(policy)
    assert store.get_policy("default", "reviews") == policy
    store.put_policy(AutoTrainPolicy("reviews", "default", False, _spec(), NOW))
    assert not store.get_policy("default", "reviews").enabled
    store.delete_policy("default", "reviews")
    with pytest.raises(NotFoundError, match="has no auto-train policy"):
        store.get_policy("default", "reviews")
    with pytest.raises(NotFoundError):
        store.delete_policy("default", "reviews")
