"""Training jobs, their events and results, as the domain sees them (no protobuf, no ORM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from gristmill.core.values import DEFAULT_ORGANIZATION, Signature, TensorSpec
from gristmill.training.domain.refs import BaseModelRef, DatasetRef, FileRef
from gristmill.training.domain.spec import JobSpec

__all__ = ["DEFAULT_ORGANIZATION", "Signature", "TensorSpec"]


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# Which transitions the lifecycle allows (QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED; QUEUED may
# also end directly). RUNNING -> RUNNING is a progress update (a restart from a checkpoint).
ALLOWED_FROM: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset(),
    JobState.RUNNING: frozenset({JobState.QUEUED, JobState.RUNNING}),
    JobState.SUCCEEDED: frozenset({JobState.RUNNING}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.RUNNING}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.RUNNING}),
}


class Split(StrEnum):
    NONE = ""
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    split: Split = Split.NONE
    # None for final metrics.
    step: int | None = None


@dataclass(frozen=True)
class JobProgress:
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    samples_per_second: float = 0.0
    # Input tokens trained on per second (padding left out), over all workers.
    tokens_per_second: float = 0.0
    trials_completed: int = 0
    trials_total: int = 0


@dataclass(frozen=True)
class Lineage:
    training_job_id: str
    dataset: DatasetRef
    dataset_files: tuple[FileRef, ...]
    base_model: BaseModelRef
    hyper_parameters: dict[str, str]
    ray_run_name: str
    code_version: str


@dataclass(frozen=True)
class JobResult:
    artifact_prefix: str
    files: tuple[FileRef, ...]
    manifest: FileRef
    metrics: tuple[Metric, ...]
    signature: Signature
    label_map: tuple[str, ...]
    lineage: Lineage
    trainable_parameter_count: int = 0
    total_parameter_count: int = 0
    best_trial: int | None = None


@dataclass(frozen=True)
class JobTrigger:
    """What started the job: an API call (its key id; empty with auth off) or an auto-train policy."""

    api_key_id: str = ""
    auto_train_dataset_version_id: str = ""


@dataclass(frozen=True)
class Job:
    job_id: str
    organization_id: str
    spec: JobSpec
    state: JobState
    create_time: datetime
    state_reason: str = ""
    trigger: JobTrigger = field(default_factory=JobTrigger)
    progress: JobProgress = field(default_factory=JobProgress)
    latest_metrics: tuple[Metric, ...] = ()
    result: JobResult | None = None
    ray_run_name: str = ""
    restart_count: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None
    request_id: str = ""
    # Sequence of the job's latest event (WatchJob resumes after it).
    last_sequence: int = 0


class EventKind(StrEnum):
    STATE = "state"
    METRICS = "metrics"


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event stream (1, 2, ... per job, without gaps)."""

    job_id: str
    sequence: int
    time: datetime
    kind: EventKind
    # STATE events.
    state: JobState | None = None
    reason: str = ""
    progress: JobProgress | None = None
    result: JobResult | None = None
    # METRICS events.
    step: int = 0
    epoch: float = 0.0
    metrics: tuple[Metric, ...] = ()
    trial: int | None = None


@dataclass(frozen=True)
class MetricsReport:
    """Metrics the training loop reported at one step."""

    step: int
    epoch: float
    metrics: tuple[Metric, ...]
    trial: int | None = None


def merge_latest(current: tuple[Metric, ...], new: tuple[Metric, ...]) -> tuple[Metric, ...]:
    """The latest value of each (name, split), newest winning, in a stable order."""
    latest = {(m.name, m.split): m for m in current}
    for metric in new:
        latest[(metric.name, metric.split)] = metric
    return tuple(sorted(latest.values(), key=lambda m: (m.split.value, m.name)))


@dataclass(frozen=True)
class AutoTrainPolicy:
    """Submit a job from ``job_template`` whenever ``project_id`` publishes a dataset version."""

    project_id: str
    organization_id: str
    enabled: bool
    # Its dataset is ignored: each job trains on the version that was published.
    job_template: JobSpec
    update_time: datetime
