"""The training service's use cases: submit, read, list, watch and cancel jobs; auto-train policies.

Organisations are a plain field for now (auth comes later): an empty organisation is "default", and a job
of another organisation answers NOT_FOUND, as it will once keys carry organisations.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import datetime

from gristmill.core.auth import Principal
from gristmill.core.auth_quota import QuotaGuard, UsageKind
from gristmill.core.errors import FailedPreconditionError, GristmillError, InvalidArgumentError, NotFoundError
from gristmill.core.ids import new_id, validate_id
from gristmill.core.licensing import License, load_license
from gristmill.core.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from gristmill.core.values import utc_now as _now
from gristmill.training.domain.model import (
    DEFAULT_ORGANIZATION,
    AutoTrainPolicy,
    EventKind,
    Job,
    JobEvent,
    JobState,
    JobTrigger,
)
from gristmill.training.domain.ports import JobPage, JobQuery, JobStore
from gristmill.training.domain.refs import DatasetRef, FileRef
from gristmill.training.domain.resolve import SpecResolver
from gristmill.training.domain.signal import JobSignal
from gristmill.training.domain.spec import JobSpec
from gristmill.training.domain.supervisor import JobSupervisor


class SequenceAheadError(GristmillError):
    """WatchJob's after_sequence is ahead of the job's last event (the API answers OUT_OF_RANGE)."""


def organization(value: str) -> str:
    return value or DEFAULT_ORGANIZATION


@dataclass(frozen=True)
class PublishedVersion:
    """A ``dataset version published`` event, as the auto-train policy needs it."""

    event_id: str
    organization_id: str
    project_id: str
    dataset_version_id: str
    manifest: FileRef | None


class JobService:
    def __init__(
        self,
        store: JobStore,
        resolver: SpecResolver,
        supervisor: JobSupervisor,
        signal: JobSignal,
        *,
        watch_poll_s: float = 5.0,
        clock: Callable[[], datetime] = _now,
        license_: License | None = None,
        quota: QuotaGuard | None = None,
    ) -> None:
        self._store = store
        # The plan's worker-seconds quota (None: not limited, the embedded dev mode). Usage itself is
        # published by the store when a job that ran ends.
        self._quota = quota
        self._license = license_ or load_license(None, "")
        self._resolver = resolver
        self._supervisor = supervisor
        self._signal = signal
        self._watch_poll_s = watch_poll_s
        self._clock = clock

    # -- jobs ----------------------------------------------------------------------------------------------

    def submit(
        self,
        spec: JobSpec,
        *,
        request_id: str = "",
        organization_id: str = "",
        trigger: JobTrigger | None = None,
        caller: Principal | None = None,
    ) -> Job:
        """Validate the whole spec against the dataset, base model and cluster, then queue the job.

        RESOURCE_EXHAUSTED (with a retry-after) when ``caller``'s organisation has used up its training
        worker-seconds for the period."""
        org = organization(organization_id)
        if request_id:
            validate_id(request_id, what="request_id")
            existing = self._store.find_by_request_id(org, request_id)
            if existing is not None:
                return existing
        self.check_licensed(spec)
        if self._quota is not None and caller is not None and not caller.auth_disabled:
            # Worker-seconds are known only when the job ends: refuse once earlier jobs used the quota up.
            self._quota.reserve(
                caller, {UsageKind.TRAINING_WORKER_SECONDS: 0}, resource="training", rate_limited=False
            ).release()
        resolved = self._resolver.resolve(spec, org)
        job_id = new_id()
        job = Job(
            job_id=job_id,
            organization_id=org,
            spec=resolved.spec,
            state=JobState.QUEUED,
            create_time=self._clock(),
            trigger=trigger or JobTrigger(),
            # The Ray run (and its checkpoint directory) is named after the job.
            ray_run_name=job_id,
            request_id=request_id,
        )
        job, created = self._store.create_job(job)
        if created:
            self._supervisor.enqueue(job.job_id)
            self._signal.notify(job.job_id)
        return job

    def check_licensed(self, spec: JobSpec) -> None:
        """FAILED_PRECONDITION naming the licence for more workers than licensed, or GPUs without training.gpu."""
        self._license.check_limit("max_training_workers", spec.resources.num_workers)
        if spec.resources.use_gpu:
            self._license.require_feature("training.gpu")

    def get(self, job_id: str, *, organization_id: str = "") -> Job:
        validate_id(job_id, what="job_id")
        job = self._store.get_job(job_id)
        if job.organization_id != organization(organization_id):
            raise NotFoundError(f"training job {job_id!r} not found", details={"job_id": job_id})
        return job

    def list(self, query: JobQuery) -> JobPage:
        if query.project_id:
            validate_id(query.project_id, what="project_id")
        if query.page_size < 0:
            raise InvalidArgumentError(f"page.page_size must be >= 0 (got {query.page_size})")
        size = min(query.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        return self._store.list_jobs(
            replace(query, organization_id=organization(query.organization_id), page_size=size)
        )

    def cancel(self, job_id: str, *, reason: str = "", organization_id: str = "") -> Job:
        job = self.get(job_id, organization_id=organization_id)
        if job.state is JobState.CANCELLED:
            return job
        if job.state.terminal:
            raise FailedPreconditionError(
                f"training job {job_id} already {job.state.value.lower()}; only queued or running jobs can be "
                "cancelled",
                details={"job_id": job_id, "state": job.state.value},
            )
        job, _ = self._store.transition(job_id, JobState.CANCELLED, reason=reason[:1000] or "cancelled on request")
        self._supervisor.cancel(job_id)
        self._signal.notify(job_id)
        return job

    async def watch(
        self, job_id: str, after_sequence: int | None, *, organization_id: str = ""
    ) -> AsyncIterator[JobEvent]:
        """The job's events: a snapshot (state, then latest metrics) when ``after_sequence`` is None, else
        the stored events after it; then live events until the terminal state's event."""
        job = await asyncio.to_thread(self.get, job_id, organization_id=organization_id)
        if after_sequence is None:
            now = self._clock()
            yield JobEvent(
                job_id,
                job.last_sequence,
                now,
                EventKind.STATE,
                state=job.state,
                reason=job.state_reason,
                progress=job.progress,
                result=job.result,
            )
            if job.latest_metrics:
                yield JobEvent(
                    job_id,
                    job.last_sequence,
                    now,
                    EventKind.METRICS,
                    step=job.progress.step,
                    epoch=job.progress.epoch,
                    metrics=job.latest_metrics,
                )
            if job.state.terminal:
                return
            cursor = job.last_sequence
        else:
            if after_sequence < 0:
                raise InvalidArgumentError(f"after_sequence must be >= 0 (got {after_sequence})")
            if after_sequence > job.last_sequence:
                raise SequenceAheadError(
                    f"after_sequence {after_sequence} is ahead of job {job_id}'s last event ({job.last_sequence})"
                )
            cursor = after_sequence
        with self._signal.subscribe(job_id) as wake:
            while True:
                wake.clear()
                events = await asyncio.to_thread(self._store.events_after, job_id, cursor)
                for event in events:
                    yield event
                    cursor = event.sequence
                    if event.kind is EventKind.STATE and event.state is not None and event.state.terminal:
                        return
                if not events:
                    current = await asyncio.to_thread(self._store.get_job, job_id)
                    if current.state.terminal and cursor >= current.last_sequence:
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), self._watch_poll_s)

    # -- auto-train policies -------------------------------------------------------------------------------

    def set_policy(
        self, project_id: str, *, enabled: bool, template: JobSpec, organization_id: str = ""
    ) -> AutoTrainPolicy:
        validate_id(project_id, what="policy.project_id")
        self.check_licensed(template)
        resolved = self._resolver.resolve_template(template, organization(organization_id))
        policy = AutoTrainPolicy(
            project_id=project_id,
            organization_id=organization(organization_id),
            enabled=enabled,
            job_template=replace(resolved, dataset=DatasetRef(project_id=project_id, dataset_version_id="")),
            update_time=self._clock(),
        )
        return self._store.put_policy(policy)

    def get_policy(self, project_id: str, *, organization_id: str = "") -> AutoTrainPolicy:
        validate_id(project_id, what="project_id")
        return self._store.get_policy(organization(organization_id), project_id)

    def delete_policy(self, project_id: str, *, organization_id: str = "") -> None:
        validate_id(project_id, what="project_id")
        self._store.delete_policy(organization(organization_id), project_id)

    def on_dataset_published(self, version: PublishedVersion) -> Job | None:
        """Submit the project's auto-train job for a published version (once per event, however often it is
        delivered). Returns None when the project has no enabled policy."""
        try:
            policy = self._store.get_policy(organization(version.organization_id), version.project_id)
        except NotFoundError:
            return None
        if not policy.enabled:
            return None
        spec = replace(
            policy.job_template,
            dataset=DatasetRef(version.project_id, version.dataset_version_id, version.manifest),
            base_model=replace(policy.job_template.base_model, content_sha256=""),
        )
        return self.submit(
            spec,
            request_id=f"auto-{version.event_id}",
            organization_id=version.organization_id,
            trigger=JobTrigger(auto_train_dataset_version_id=version.dataset_version_id),
        )
