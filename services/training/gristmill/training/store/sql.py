"""SQLAlchemy implementation of the job store (a SQLite file by default, PostgreSQL by URL).

The spec, progress, metrics and result are JSON columns written by the domain's generic converter; the
columns that queries filter on (state, project, organisation, request id) are real columns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gristmill.core.auth_quota import UsageKind, UsageRecord
from gristmill.core.errors import FailedPreconditionError, NotFoundError
from gristmill.core.serialization import from_plain, to_plain
from gristmill.core.sql import Database, utc
from gristmill.core.values import utc_now as _now
from gristmill.training.domain.model import (
    ALLOWED_FROM,
    AutoTrainPolicy,
    EventKind,
    Job,
    JobEvent,
    JobProgress,
    JobResult,
    JobState,
    JobTrigger,
    Metric,
    MetricsReport,
    merge_latest,
)
from gristmill.training.domain.ports import JobPage, JobQuery, JobStore
from gristmill.training.domain.spec import JobSpec
from gristmill.training.store.tables import JobEventRow, JobRow, PolicyRow, TrainingBase

# TrainingBase: what the migrations (``store/migrations``) import from here.
__all__ = ["SqlJobStore", "TrainingBase", "worker_seconds"]


def _utc(value: datetime | None) -> datetime | None:
    # SQLite drops the zone of DateTime(timezone=True) values, keeping the wall-clock time it is given; so every
    # time is written in UTC (``utc``) and read back as UTC.
    if value is None:
        return None
    return utc(value)


def worker_seconds(job: Job) -> list[UsageRecord]:
    """The training worker-seconds an ended job used (none if it never ran), for whoever submitted it."""
    if job.start_time is None or job.end_time is None:
        return []
    seconds = max(0.0, (job.end_time - job.start_time).total_seconds()) * job.spec.resources.num_workers
    return [
        UsageRecord(
            job.organization_id,
            job.trigger.api_key_id,
            UsageKind.TRAINING_WORKER_SECONDS,
            seconds,
            f"training-job/{job.job_id}",
        )
    ]


def _to_job(row: JobRow) -> Job:
    create_time = _utc(row.create_time)
    assert create_time is not None
    return Job(
        job_id=row.job_id,
        organization_id=row.organization_id,
        spec=from_plain(JobSpec, row.spec),
        state=JobState(row.state),
        state_reason=row.state_reason,
        trigger=from_plain(JobTrigger, row.trigger),
        progress=from_plain(JobProgress, row.progress),
        latest_metrics=tuple(from_plain(Metric, m) for m in row.latest_metrics),
        result=None if row.result is None else from_plain(JobResult, row.result),
        ray_run_name=row.ray_run_name,
        restart_count=row.restart_count,
        create_time=create_time,
        start_time=_utc(row.start_time),
        end_time=_utc(row.end_time),
        request_id=row.request_id or "",
        last_sequence=row.last_sequence,
    )


def _to_event(row: JobEventRow) -> JobEvent:
    data = dict(row.payload)
    data.update(job_id=row.job_id, sequence=row.sequence, time=row.time.isoformat(), kind=row.kind)
    event = from_plain(JobEvent, data)
    time = _utc(event.time)
    assert time is not None
    return JobEvent(**{**event.__dict__, "time": time})


def _event_payload(event: JobEvent) -> dict[str, Any]:
    data: dict[str, Any] = to_plain(event)
    for column in ("job_id", "sequence", "time", "kind"):
        data.pop(column)
    return data


class JobEvents(Protocol):
    """Writes training's events into the outbox of ``session`` (implemented in ``training.events``)."""

    def job_state_changed(self, session: Session, job: Job, previous: JobState | None) -> None: ...

    def usage_recorded(self, session: Session, records: Sequence[UsageRecord]) -> None: ...


class SqlJobStore(JobStore):
    def __init__(self, database: Database, events: JobEvents) -> None:
        self._db = database
        self._events = events
        # One writer at a time in this process: a job's event sequence is read and incremented in one
        # transaction, after ``_row(lock=True)`` locked the job's row for every process.
        self._write_lock = threading.Lock()

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        with self._write_lock, self._db.transaction() as session:
            yield session

    def _row(self, session: Session, job_id: str, *, lock: bool = False) -> JobRow:
        query = select(JobRow).where(JobRow.job_id == job_id)
        if lock:
            # Lock before reading, so that the state and sequence read are the latest committed: FOR UPDATE on
            # PostgreSQL; SQLite ignores it, so there a no-op UPDATE takes the database write lock first (without
            # it, two processes could both move the job from the same state and reuse a sequence).
            if session.get_bind().dialect.name == "sqlite":
                session.execute(
                    update(JobRow)
                    .where(JobRow.job_id == job_id)
                    .values(last_sequence=JobRow.last_sequence)
                    .execution_options(synchronize_session=False)
                )
            query = query.with_for_update()
        row = session.execute(query).scalar_one_or_none()
        if row is None:
            raise NotFoundError(f"training job {job_id[:64]!r} not found", details={"job_id": job_id[:64]})
        return row

    def _append(self, session: Session, row: JobRow, event: JobEvent) -> None:
        session.add(
            JobEventRow(
                job_id=row.job_id,
                sequence=event.sequence,
                time=event.time,
                kind=event.kind.value,
                payload=_event_payload(event),
            )
        )
        row.last_sequence = event.sequence

    # -- jobs ---------------------------------------------------------------------------------------------

    def create_job(self, job: Job) -> tuple[Job, bool]:
        try:
            with self._writing() as session:
                row = JobRow(
                    job_id=job.job_id,
                    organization_id=job.organization_id,
                    request_id=job.request_id or None,
                    project_id=job.spec.project_id,
                    state=JobState.QUEUED.value,
                    state_reason=job.state_reason,
                    spec=to_plain(job.spec),
                    trigger=to_plain(job.trigger),
                    progress=to_plain(job.progress),
                    latest_metrics=[],
                    ray_run_name=job.ray_run_name,
                    restart_count=0,
                    last_sequence=0,
                    create_time=utc(job.create_time),
                )
                session.add(row)
                session.flush()
                event = JobEvent(
                    job.job_id,
                    1,
                    utc(job.create_time),
                    EventKind.STATE,
                    state=JobState.QUEUED,
                    reason=job.state_reason,
                    progress=job.progress,
                )
                self._append(session, row, event)
                created = _to_job(row)
                self._events.job_state_changed(session, created, None)
            return created, True
        except IntegrityError:
            existing = self.find_by_request_id(job.organization_id, job.request_id) if job.request_id else None
            if existing is None:
                raise
            return existing, False

    def find_by_request_id(self, organization_id: str, request_id: str) -> Job | None:
        with self._db.transaction() as session:
            row = session.execute(
                select(JobRow).where(JobRow.organization_id == organization_id, JobRow.request_id == request_id)
            ).scalar_one_or_none()
            return None if row is None else _to_job(row)

    def get_job(self, job_id: str) -> Job:
        with self._db.transaction() as session:
            return _to_job(self._row(session, job_id))

    def list_jobs(self, query: JobQuery) -> JobPage:
        stmt = select(JobRow).where(JobRow.organization_id == query.organization_id)
        if query.states:
            stmt = stmt.where(JobRow.state.in_([s.value for s in query.states]))
        if query.project_id:
            stmt = stmt.where(JobRow.project_id == query.project_id)
        stmt = stmt.order_by(JobRow.create_time.desc(), JobRow.job_id.desc())
        stmt = stmt.offset(query.offset).limit(query.page_size + 1)
        with self._db.transaction() as session:
            rows = list(session.execute(stmt).scalars())
            jobs = tuple(_to_job(r) for r in rows[: query.page_size])
        more = len(rows) > query.page_size
        return JobPage(jobs=jobs, next_offset=query.offset + query.page_size if more else None)

    def transition(
        self,
        job_id: str,
        to: JobState,
        *,
        reason: str = "",
        progress: JobProgress | None = None,
        result: JobResult | None = None,
        restart_count: int | None = None,
        ray_run_name: str | None = None,
        started_at: datetime | None = None,
    ) -> tuple[Job, JobState]:
        with self._writing() as session:
            row = self._row(session, job_id, lock=True)
            previous = JobState(row.state)
            if previous not in ALLOWED_FROM[to]:
                raise FailedPreconditionError(
                    f"training job {job_id} is {previous.value} and cannot become {to.value}",
                    details={"job_id": job_id, "state": previous.value},
                )
            now = _now()
            row.state = to.value
            row.state_reason = reason
            if progress is not None:
                row.progress = to_plain(progress)
            if result is not None:
                row.result = to_plain(result)
            if restart_count is not None:
                row.restart_count = restart_count
            if ray_run_name is not None:
                row.ray_run_name = ray_run_name
            if to is JobState.RUNNING and row.start_time is None:
                created = _utc(row.create_time)
                assert created is not None
                row.start_time = now if started_at is None else min(max(started_at.astimezone(UTC), created), now)
            if to.terminal:
                row.end_time = now
            event = JobEvent(
                job_id,
                row.last_sequence + 1,
                now,
                EventKind.STATE,
                state=to,
                reason=reason,
                progress=from_plain(JobProgress, row.progress),
                result=result,
            )
            self._append(session, row, event)
            job = _to_job(row)
            self._events.job_state_changed(session, job, previous)
            if to.terminal:
                # A job that ran and ended publishes its worker-seconds (metering) with its final state change.
                self._events.usage_recorded(session, worker_seconds(job))
        return job, previous

    def record_metrics(self, job_id: str, reports: Sequence[MetricsReport], progress: JobProgress) -> Job:
        with self._writing() as session:
            row = self._row(session, job_id, lock=True)
            if JobState(row.state) is not JobState.RUNNING:
                return _to_job(row)
            now = _now()
            latest = tuple(from_plain(Metric, m) for m in row.latest_metrics)
            for report in reports:
                event = JobEvent(
                    job_id,
                    row.last_sequence + 1,
                    now,
                    EventKind.METRICS,
                    step=report.step,
                    epoch=report.epoch,
                    metrics=report.metrics,
                    trial=report.trial,
                )
                self._append(session, row, event)
                latest = merge_latest(latest, report.metrics)
            row.latest_metrics = [to_plain(m) for m in latest]
            row.progress = to_plain(progress)
            job = _to_job(row)
            if reports:
                self._events.job_state_changed(session, job, JobState.RUNNING)
        return job

    def events_after(self, job_id: str, after_sequence: int, limit: int = 500) -> list[JobEvent]:
        with self._db.transaction() as session:
            self._row(session, job_id)
            rows = session.execute(
                select(JobEventRow)
                .where(JobEventRow.job_id == job_id, JobEventRow.sequence > after_sequence)
                .order_by(JobEventRow.sequence)
                .limit(limit)
            ).scalars()
            return [_to_event(r) for r in rows]

    def jobs_in_states(self, states: Sequence[JobState]) -> list[Job]:
        with self._db.transaction() as session:
            rows = session.execute(
                select(JobRow)
                .where(JobRow.state.in_([s.value for s in states]))
                .order_by(JobRow.create_time, JobRow.job_id)
            ).scalars()
            return [_to_job(r) for r in rows]

    # -- auto-train policies ------------------------------------------------------------------------------

    def put_policy(self, policy: AutoTrainPolicy) -> AutoTrainPolicy:
        with self._writing() as session:
            row = session.get(PolicyRow, (policy.organization_id, policy.project_id))
            if row is None:
                row = PolicyRow(organization_id=policy.organization_id, project_id=policy.project_id)
                session.add(row)
            row.enabled = policy.enabled
            row.template = to_plain(policy.job_template)
            row.update_time = utc(policy.update_time)
        return policy

    def get_policy(self, organization_id: str, project_id: str) -> AutoTrainPolicy:
        with self._db.transaction() as session:
            row = session.get(PolicyRow, (organization_id, project_id))
            if row is None:
                raise NotFoundError(
                    f"project {project_id[:64]!r} has no auto-train policy", details={"project_id": project_id[:64]}
                )
            update_time = _utc(row.update_time)
            assert update_time is not None
            return AutoTrainPolicy(
                project_id=row.project_id,
                organization_id=row.organization_id,
                enabled=row.enabled,
                job_template=from_plain(JobSpec, row.template),
                update_time=update_time,
            )

    def delete_policy(self, organization_id: str, project_id: str) -> None:
        with self._writing() as session:
            deleted = session.execute(
                delete(PolicyRow).where(
                    PolicyRow.organization_id == organization_id, PolicyRow.project_id == project_id
                )
            )
            if getattr(deleted, "rowcount", 0) == 0:
                raise NotFoundError(
                    f"project {project_id[:64]!r} has no auto-train policy", details={"project_id": project_id[:64]}
                )
