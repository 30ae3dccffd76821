"""The job store port: jobs, their event streams and auto-train policies.

The domain depends on this interface; ``gristmill.training.store`` implements it (the domain never imports it).

Every write that changes a job also appends to the job's event stream (``JobEvent``, sequence 1, 2, ...)
and stages a ``JobStateChanged`` event in the outbox, in one transaction, so a watcher, the registry and
the database never disagree. Implementations return domain dataclasses, never ORM rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from gristmill.training.domain.model import (
    AutoTrainPolicy,
    Job,
    JobEvent,
    JobProgress,
    JobResult,
    JobState,
    MetricsReport,
)


@dataclass(frozen=True)
class JobQuery:
    organization_id: str
    states: tuple[JobState, ...] = ()
    project_id: str = ""
    page_size: int = 50
    # Jobs to skip (decoded from a page token by the caller).
    offset: int = 0


@dataclass(frozen=True)
class JobPage:
    jobs: tuple[Job, ...]
    # Offset of the next page; None on the last page.
    next_offset: int | None


class JobStore(ABC):
    """Errors: ``NotFoundError`` for an unknown job or policy, ``FailedPreconditionError`` for a transition
    the lifecycle does not allow.

    A write to a job (``transition``, ``record_metrics``) locks its row first, for every process sharing the
    database: the state check is a compare-and-set, and the job's event sequence stays gapless. Times may be
    given in any zone and come back as the same instants in UTC."""

    @abstractmethod
    def create_job(self, job: Job) -> tuple[Job, bool]:
        """Insert a QUEUED job (its first event included). When ``job.request_id`` was already used by the
        organisation, return that job instead and ``False``."""

    @abstractmethod
    def find_by_request_id(self, organization_id: str, request_id: str) -> Job | None: ...

    @abstractmethod
    def get_job(self, job_id: str) -> Job: ...

    @abstractmethod
    def list_jobs(self, query: JobQuery) -> JobPage:
        """Newest first."""

    @abstractmethod
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
        """Move the job to ``to`` (as ``ALLOWED_FROM`` permits) and return it with its previous state.

        ``started_at``: when training really began (the worker's clock), for the first move to RUNNING; the
        job's start time is then that moment (kept between its creation and now), not the moment the service
        heard of it."""

    @abstractmethod
    def record_metrics(self, job_id: str, reports: Sequence[MetricsReport], progress: JobProgress) -> Job:
        """Append metrics events and update progress and latest metrics of a RUNNING job (else no change)."""

    @abstractmethod
    def events_after(self, job_id: str, after_sequence: int, limit: int = 500) -> list[JobEvent]: ...

    @abstractmethod
    def jobs_in_states(self, states: Sequence[JobState]) -> list[Job]:
        """Every job in one of ``states``, oldest first (recovery at start-up, the dispatch queue)."""

    @abstractmethod
    def put_policy(self, policy: AutoTrainPolicy) -> AutoTrainPolicy: ...

    @abstractmethod
    def get_policy(self, organization_id: str, project_id: str) -> AutoTrainPolicy: ...

    @abstractmethod
    def delete_policy(self, organization_id: str, project_id: str) -> None: ...
