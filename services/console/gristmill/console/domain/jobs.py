"""What the training pages show: the organisation's jobs, one job, and its events as plain dicts (the live curve's
points and state changes), from the training service's API and the signed-in session.

No HTML and no gRPC here: ``JobCalls`` is what this needs of the services (``gristmill.console.gateway`` gives
it), so the rules are tested with a fake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gristmill.api.common.v1 import common_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.console.domain.sessions import Session
from gristmill.core.errors import InvalidArgumentError

R = TypeVar("R")

# Jobs listed on the jobs page (newest first): one page of the service's listing.
JOBS_PAGE = 100
TERMINAL = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})


class JobCalls(Protocol):
    training: Any

    def call(self, service: str, method: Callable[..., Awaitable[R]], request: Any, api_key: str) -> Awaitable[R]: ...

    def stream(self, service: str, method: Callable[..., Any], request: Any, api_key: str) -> AsyncIterator[Any]: ...


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """``JOB_STATE_RUNNING`` -> ``running``; "" for the UNSPECIFIED value."""
    name = str(enum.Name(value)).removeprefix(prefix).lower()
    return "" if name == "unspecified" else name


def state_name(state: int) -> str:
    return enum_name(pb.JobState, state, "JOB_STATE_") or "unknown"


def metric_name(metric: common_pb2.Metric) -> str:
    """A metric's series name: ``loss``, or ``validation loss`` / ``test accuracy`` when measured on a held-out
    split."""
    split = enum_name(common_pb2.DatasetSplit, metric.split, "DATASET_SPLIT_")
    return metric.name if split in ("", "train") else f"{split} {metric.name}"


@dataclass(frozen=True)
class JobView:
    job: pb.Job

    @property
    def state(self) -> str:
        return state_name(self.job.state)

    @property
    def finished(self) -> bool:
        return self.job.state in TERMINAL

    @property
    def name(self) -> str:
        return self.job.spec.display_name or self.job.job_id

    @property
    def progress(self) -> float:
        p = self.job.progress
        if self.job.state == pb.JOB_STATE_SUCCEEDED:
            return 1.0
        return min(1.0, p.step / p.total_steps) if p.total_steps else 0.0

    @property
    def method(self) -> str:
        """``lora, sft``; ``full, from the data`` for a spec that left both to their defaults."""
        method = enum_name(pb.TrainingMethod, self.job.spec.method, "TRAINING_METHOD_") or "full"
        objective = enum_name(pb.Objective, self.job.spec.objective, "OBJECTIVE_") or "from the data"
        return f"{method}, {objective}"

    @property
    def base_model(self) -> str:
        ref = self.job.spec.base_model
        return next((str(getattr(ref, f.name)) for f in ref.DESCRIPTOR.fields if getattr(ref, f.name)), "")

    @property
    def metrics(self) -> list[tuple[str, float]]:
        final = self.job.result.metrics if self.job.HasField("result") else self.job.latest_metrics
        return sorted((metric_name(m), m.value) for m in final)


class Trainers:
    """The training pages' reads for one signed-in user (the console starts no job: the CLI and policies do)."""

    def __init__(self, calls: JobCalls) -> None:
        self.calls = calls

    async def jobs(self, session: Session, project_id: str = "") -> list[JobView]:
        request = pb.ListJobsRequest(project_id=project_id, page=common_pb2.PageRequest(page_size=JOBS_PAGE))
        response = await self.calls.call("training", self.calls.training.ListJobs, request, session.api_key)
        return [JobView(job) for job in response.jobs]

    async def job(self, session: Session, job_id: str) -> JobView:
        job = await self.calls.call(
            "training", self.calls.training.GetJob, pb.GetJobRequest(job_id=job_id), session.api_key
        )
        return JobView(job)

    async def events(self, session: Session, job_id: str, after: str | None) -> AsyncIterator[dict[str, Any]]:
        """The job's events from WatchJob as dicts, in order; ``after``: the last sequence the page saw (a
        reconnecting EventSource's ``Last-Event-ID``), None for all of them. Ends after the terminal state."""
        request = pb.WatchJobRequest(job_id=job_id)
        if after:
            if not after.isdigit():
                raise InvalidArgumentError(f"Last-Event-ID must be an event sequence number, not {after!r}")
            request.after_sequence = int(after)
        async for event in self.calls.stream("training", self.calls.training.WatchJob, request, session.api_key):
            yield event_dict(event)


def event_dict(event: pb.JobEvent) -> dict[str, Any]:
    """One JobEvent for the page's script: a state change or a metrics report with its points."""
    out: dict[str, Any] = {"sequence": event.sequence}
    if event.HasField("state_change"):
        change = event.state_change
        out |= {
            "kind": "state",
            "state": state_name(change.state),
            "finished": change.state in TERMINAL,
            "reason": change.reason,
            "step": change.progress.step,
            "total_steps": change.progress.total_steps,
        }
    elif event.HasField("metrics"):
        report = event.metrics
        out |= {
            "kind": "metrics",
            "step": report.step,
            "epoch": report.epoch,
            # Searches report per trial: each trial is its own series.
            "metrics": {
                (f"trial {report.trial}: " if report.HasField("trial") else "") + metric_name(m): m.value
                for m in report.metrics
            },
        }
    return out
