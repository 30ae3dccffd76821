"""Training store contract: ``gristmill.training.domain.ports.JobStore`` behaves the same on SQLite and
PostgreSQL (``database_url`` is a fresh, empty database of each).

Jobs (create, request-id idempotency, get, list with filters and paging), the lifecycle (transitions that
``ALLOWED_FROM`` permits, under a row lock, so that racing writers of one job leave one gapless event
stream), metrics events, auto-train policies, and the outbox events written in the same transaction as the
change (and rolled back with it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from typing import Any

import pytest
from google.protobuf.message import Message
from sqlalchemy import event, select
from sqlalchemy.orm import Session

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
)
from gristmill.training.domain.ports import JobQuery, JobStore
from gristmill.training.domain.refs import BaseModelRef, DatasetRef, FileRef
from gristmill.training.events.payloads import TrainingEvents
from gristmill.training.store.sql import SqlJobStore
from gristmill.training.tasks.text_classification import classification_signature
from tests.support.databases import migrated_database

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


def _job(job_id: str, *, project: str = "reviews", request_id: str = "", minutes: int = 0, org: str = "default") -> Job:
    return Job(job_id, org, _spec(project), JobState.QUEUED, NOW + timedelta(minutes=minutes), request_id=request_id)


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    database = migrated_database(database_url, "training")
    yield database
    database.dispose()


def _new_store(database: Database) -> SqlJobStore:
    return SqlJobStore(database, TrainingEvents(database, platform_catalog(), "training"))


@pytest.fixture
def store(database: Database) -> SqlJobStore:
    return _new_store(database)


def _outbox(database: Database) -> list[events_pb2.JobStateChanged]:
    return [events_pb2.JobStateChanged.FromString(p) for p in _payloads(database, events_pb2.JobStateChanged)]


def _usage(database: Database) -> list[events_pb2.UsageRecorded]:
    return [events_pb2.UsageRecorded.FromString(p) for p in _payloads(database, events_pb2.UsageRecorded)]


def _payloads(database: Database, message: type[Message]) -> list[bytes]:
    with database.transaction() as session:
        rows = session.execute(select(OutboxEvent).order_by(OutboxEvent.id)).scalars().all()
        return [r.payload for r in rows if r.event_type == message.DESCRIPTOR.full_name]


@contextmanager
def _failing_commits() -> Iterator[None]:
    """Every transaction that tries to commit meanwhile fails (and rolls back) instead."""

    def fail(_session: Session) -> None:
        raise RuntimeError("commit refused by the test")

    event.listen(Session, "before_commit", fail)
    try:
        yield
    finally:
        event.remove(Session, "before_commit", fail)


def _race(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls at once, one thread each; each one's result or the exception it raised."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:  # the test inspects what each racer got
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


# -- jobs ---------------------------------------------------------------------------------------------------


def test_create_writes_the_first_event_and_its_outbox_record(store: JobStore, database: Database) -> None:
    job, created = store.create_job(_job("j1"))
    assert created and job.state is JobState.QUEUED and job.last_sequence == 1
    [event_] = store.events_after("j1", 0)
    assert event_.kind is EventKind.STATE and event_.state is JobState.QUEUED and event_.sequence == 1
    [message] = _outbox(database)
    assert message.job_id == "j1" and message.state == pb.JOB_STATE_QUEUED
    assert message.previous_state == pb.JOB_STATE_UNSPECIFIED and message.tags == {"team": "ml"}


def test_a_job_round_trips_with_utc_times(store: JobStore) -> None:
    created, _ = store.create_job(_job("j1"))
    got = store.get_job("j1")
    assert got == created
    assert got.create_time == NOW and got.create_time.utcoffset() == timedelta(0)
    assert got.spec == _spec() and got.start_time is None and got.end_time is None
    [event_] = store.events_after("j1", 0)
    assert event_.time == NOW and event_.time.utcoffset() == timedelta(0)
    with pytest.raises(NotFoundError, match="training job 'nope' not found"):
        store.get_job("nope")
    with pytest.raises(NotFoundError):
        store.events_after("nope", 0)
    # A creation time in another zone is the same instant, and sorts as one.
    zoned = replace(
        _job("zoned", minutes=30), create_time=(NOW + timedelta(minutes=30)).astimezone(timezone(-timedelta(hours=9)))
    )
    store.create_job(zoned)
    assert store.get_job("zoned").create_time == NOW + timedelta(minutes=30)
    assert store.events_after("zoned", 0)[0].time == NOW + timedelta(minutes=30)
    store.create_job(_job("j2", minutes=10))
    assert [j.job_id for j in store.list_jobs(JobQuery("default")).jobs] == ["zoned", "j2", "j1"]


def test_a_request_id_returns_the_first_job(store: JobStore, database: Database) -> None:
    first, created = store.create_job(_job("j1", request_id="req-1"))
    again, created_again = store.create_job(_job("j2", request_id="req-1"))
    assert created and not created_again and again.job_id == first.job_id == "j1"
    assert store.find_by_request_id("default", "req-1") == first
    assert store.find_by_request_id("other-org", "req-1") is None
    # The request id is unique per organisation only; jobs without one never collide.
    _, created_elsewhere = store.create_job(_job("j3", request_id="req-1", org="other-org"))
    assert created_elsewhere
    assert store.create_job(_job("j4"))[1] and store.create_job(_job("j5"))[1]
    with pytest.raises(NotFoundError):
        store.get_job("j2")
    # The refused duplicate wrote nothing: one QUEUED event per created job.
    assert [m.job_id for m in _outbox(database)] == ["j1", "j3", "j4", "j5"]


def test_concurrent_creates_with_one_request_id_make_one_job(database: Database) -> None:
    stores = [_new_store(database), _new_store(database)]  # two processes, each with its own lock
    results = _race([partial(stores[i % 2].create_job, _job(f"j{i}", request_id="req")) for i in range(4)])
    assert not [r for r in results if isinstance(r, Exception)], results
    created = [job for job, was_created in results if was_created]
    assert len(created) == 1
    assert {job.job_id for job, _ in results} == {created[0].job_id}
    assert len(stores[0].list_jobs(JobQuery("default")).jobs) == 1


def test_the_start_time_is_when_training_began_kept_between_creation_and_now(store: JobStore) -> None:
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
    # A worker reporting in another zone means the same instant.
    store.create_job(_job("zoned"))
    zoned, _ = store.transition("zoned", JobState.RUNNING, started_at=began.astimezone(timezone(timedelta(hours=5))))
    assert zoned.start_time == began and store.get_job("zoned").start_time == began


def test_transitions_follow_the_lifecycle(store: JobStore, database: Database) -> None:
    store.create_job(_job("j1"))
    running, previous = store.transition("j1", JobState.RUNNING, progress=JobProgress(total_steps=10))
    assert previous is JobState.QUEUED and running.start_time is not None and running.progress.total_steps == 10
    with pytest.raises(FailedPreconditionError, match="is RUNNING and cannot become QUEUED"):
        store.transition("j1", JobState.QUEUED)
    restarted, _ = store.transition("j1", JobState.RUNNING, reason="resumed", restart_count=1, ray_run_name="r-1")
    assert restarted.restart_count == 1 and restarted.start_time == running.start_time
    assert store.get_job("j1").ray_run_name == "r-1"
    failed, _ = store.transition("j1", JobState.FAILED, reason="worker 0 failed: boom")
    assert failed.end_time is not None and failed.state_reason == "worker 0 failed: boom"
    for target in (JobState.RUNNING, JobState.SUCCEEDED, JobState.CANCELLED, JobState.FAILED):
        with pytest.raises(FailedPreconditionError):
            store.transition("j1", target)
    events = store.events_after("j1", 0)
    assert [e.sequence for e in events] == [1, 2, 3, 4]
    assert [e.state for e in events] == [JobState.QUEUED, JobState.RUNNING, JobState.RUNNING, JobState.FAILED]
    assert store.get_job("j1").last_sequence == 4
    states = [(m.previous_state, m.state) for m in _outbox(database)]
    assert states == [
        (pb.JOB_STATE_UNSPECIFIED, pb.JOB_STATE_QUEUED),
        (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING),
        (pb.JOB_STATE_RUNNING, pb.JOB_STATE_RUNNING),
        (pb.JOB_STATE_RUNNING, pb.JOB_STATE_FAILED),
    ]
    # The job ran and ended: its worker-seconds went out with the final state change, once.
    [usage] = _usage(database)
    assert failed.end_time is not None and running.start_time is not None
    seconds = (failed.end_time - running.start_time).total_seconds() * failed.spec.resources.num_workers
    assert usage.kind == admin_pb2.USAGE_KIND_TRAINING_WORKER_SECONDS and usage.resource == "training-job/j1"
    assert usage.organization_id == failed.organization_id and usage.quantity == pytest.approx(seconds)
    with pytest.raises(NotFoundError, match="training job 'nope' not found"):
        store.transition("nope", JobState.RUNNING)


def test_a_queued_job_may_end_without_running_and_uses_nothing(store: JobStore, database: Database) -> None:
    store.create_job(_job("j1"))
    cancelled, previous = store.transition("j1", JobState.CANCELLED, reason="by alice")
    assert previous is JobState.QUEUED and cancelled.start_time is None and cancelled.end_time is not None
    with pytest.raises(FailedPreconditionError, match="is CANCELLED and cannot become SUCCEEDED"):
        store.transition("j1", JobState.SUCCEEDED)
    assert _usage(database) == []


def test_racing_writers_of_one_job_leave_one_ending_and_a_gapless_stream(database: Database) -> None:
    """Two processes (stores with their own in-process locks) end the same RUNNING job at once: the row lock
    makes the state check a compare-and-set, so one wins and the others see the ended job."""
    stores = [_new_store(database), _new_store(database)]
    stores[0].create_job(_job("j1"))
    stores[0].transition("j1", JobState.RUNNING)
    ends = [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.CANCELLED]
    results = _race([partial(stores[i % 2].transition, "j1", ends[i], reason=f"racer {i}") for i in range(4)])
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and all(isinstance(e, FailedPreconditionError) for e in lost), results
    job, previous = won[0]
    assert previous is JobState.RUNNING and job.state.terminal
    events = stores[1].events_after("j1", 0)
    assert [e.sequence for e in events] == [1, 2, 3] and events[-1].state is job.state
    assert stores[1].get_job("j1").last_sequence == 3
    assert len(_outbox(database)) == 3 and len(_usage(database)) == 1


def test_racing_metrics_and_progress_keep_the_sequence_gapless(database: Database) -> None:
    stores = [_new_store(database), _new_store(database)]
    stores[0].create_job(_job("j1"))
    stores[0].transition("j1", JobState.RUNNING)

    def report(i: int) -> Any:
        reports = [MetricsReport(i, 0.1, (Metric("loss", 1.0 / (i + 1), step=i),))]
        return stores[i % 2].record_metrics("j1", reports, JobProgress(step=i))

    results = _race([partial(report, i) for i in range(6)])
    assert not [r for r in results if isinstance(r, Exception)], results
    events = stores[0].events_after("j1", 0)
    assert [e.sequence for e in events] == list(range(1, 9))
    assert sorted(e.step for e in events if e.kind is EventKind.METRICS) == list(range(6))
    assert stores[0].get_job("j1").last_sequence == 8


def test_metrics_become_events_latest_values_and_progress(store: JobStore, database: Database) -> None:
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
    assert store.get_job("j1") == job
    events = store.events_after("j1", 2)
    assert [(e.kind, e.step) for e in events] == [
        (EventKind.METRICS, 10),
        (EventKind.METRICS, 10),
        (EventKind.METRICS, 20),
    ]
    assert store.events_after("j1", 4) == events[2:]
    assert store.events_after("j1", 0, limit=2) == store.events_after("j1", 0)[:2]
    assert store.events_after("j1", 5) == []
    progress = _outbox(database)[-1]
    assert progress.state == progress.previous_state == pb.JOB_STATE_RUNNING and progress.progress.step == 20
    # No report: progress is kept, and nothing is announced.
    announced = len(_outbox(database))
    store.record_metrics("j1", [], JobProgress(step=21, total_steps=40))
    assert len(_outbox(database)) == announced and store.get_job("j1").progress.step == 21


def test_success_carries_what_the_registry_needs(store: JobStore, database: Database) -> None:
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
    [last] = store.events_after("j1", 2)
    assert last.state is JobState.SUCCEEDED and last.result == result
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


def test_events_roll_back_with_the_change(store: JobStore, database: Database) -> None:
    with _failing_commits(), pytest.raises(RuntimeError, match="commit refused"):
        store.create_job(_job("j0"))
    with pytest.raises(NotFoundError):
        store.get_job("j0")
    assert _outbox(database) == []
    store.create_job(_job("j1"))
    store.transition("j1", JobState.RUNNING)
    with _failing_commits():
        with pytest.raises(RuntimeError, match="commit refused"):
            store.transition("j1", JobState.SUCCEEDED, reason="done")
        with pytest.raises(RuntimeError, match="commit refused"):
            store.record_metrics("j1", [MetricsReport(1, 0.1, (Metric("loss", 0.5),))], JobProgress(step=1))
    job = store.get_job("j1")
    assert job.state is JobState.RUNNING and job.last_sequence == 2 and job.latest_metrics == ()
    assert [e.sequence for e in store.events_after("j1", 0)] == [1, 2]
    assert [m.state for m in _outbox(database)] == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING]
    assert _usage(database) == []
    # The refused writes consumed nothing: the next one is sequence 3, announced once.
    done, _ = store.transition("j1", JobState.SUCCEEDED)
    assert done.last_sequence == 3 and len(_outbox(database)) == 3 and len(_usage(database)) == 1


def test_listing_is_newest_first_filtered_and_paged(store: JobStore) -> None:
    for i in range(5):
        store.create_job(_job(f"j{i}", project="a" if i % 2 else "b", minutes=i))
    store.transition("j4", JobState.CANCELLED)
    page = store.list_jobs(JobQuery("default", page_size=2))
    assert [j.job_id for j in page.jobs] == ["j4", "j3"] and page.next_offset == 2
    middle = store.list_jobs(JobQuery("default", page_size=2, offset=2))
    assert [j.job_id for j in middle.jobs] == ["j2", "j1"] and middle.next_offset == 4
    last = store.list_jobs(JobQuery("default", page_size=2, offset=4))
    assert [j.job_id for j in last.jobs] == ["j0"] and last.next_offset is None
    assert store.list_jobs(JobQuery("default", page_size=5)).next_offset is None
    assert [j.job_id for j in store.list_jobs(JobQuery("default", project_id="a")).jobs] == ["j3", "j1"]
    queued_b = store.list_jobs(JobQuery("default", states=(JobState.QUEUED,), project_id="b"))
    assert [j.job_id for j in queued_b.jobs] == ["j2", "j0"]
    ended = store.list_jobs(JobQuery("default", states=(JobState.CANCELLED, JobState.FAILED)))
    assert [j.job_id for j in ended.jobs] == ["j4"]
    assert store.list_jobs(JobQuery("another-org")).jobs == ()
    assert [j.job_id for j in store.jobs_in_states([JobState.QUEUED])] == ["j0", "j1", "j2", "j3"]


def test_jobs_created_at_the_same_time_list_in_a_stable_order(store: JobStore) -> None:
    for job_id in ("b", "d", "a", "c"):
        store.create_job(_job(job_id))
    store.create_job(_job("z", org="other"))
    pages = [store.list_jobs(JobQuery("default", page_size=2, offset=o)).jobs for o in (0, 2)]
    assert [j.job_id for page in pages for j in page] == ["d", "c", "b", "a"]
    # Recovery sees every organisation's jobs, oldest first, ties by id.
    assert [j.job_id for j in store.jobs_in_states([JobState.QUEUED])] == ["a", "b", "c", "d", "z"]
    assert store.jobs_in_states([JobState.RUNNING]) == []


# -- auto-train policies ------------------------------------------------------------------------------------


def test_policies(store: JobStore) -> None:
    policy = AutoTrainPolicy("reviews", "default", True, _spec(), NOW)
    store.put_policy(policy)
    assert store.get_policy("default", "reviews") == policy
    assert store.get_policy("default", "reviews").update_time.utcoffset() == timedelta(0)
    later = AutoTrainPolicy("reviews", "default", False, _spec("other"), NOW + timedelta(hours=1))
    store.put_policy(later)
    assert store.get_policy("default", "reviews") == later
    store.put_policy(AutoTrainPolicy("reviews", "acme", True, _spec(), NOW.astimezone(timezone(timedelta(hours=3)))))
    assert store.get_policy("acme", "reviews").update_time == NOW
    with pytest.raises(NotFoundError, match="has no auto-train policy"):
        store.get_policy("default", "missing")
    store.delete_policy("default", "reviews")
    with pytest.raises(NotFoundError, match="has no auto-train policy"):
        store.get_policy("default", "reviews")
    with pytest.raises(NotFoundError):
        store.delete_policy("default", "reviews")
    assert store.get_policy("acme", "reviews").enabled  # another organisation's policy is its own
