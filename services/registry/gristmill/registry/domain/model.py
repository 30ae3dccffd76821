"""The registry's domain objects: plain frozen dataclasses, no protobuf, no ORM.

Enumerations mirror the proto enums by member name (``VersionStatus.READY`` is
``MODEL_VERSION_STATUS_READY``) so the API layer converts them by name. Tasks and dataset splits
keep their proto/manifest spelling as strings (``TASK_TYPE_TEXT_CLASSIFICATION``, ``test``): the
model manifest and the lineage already use those spellings across services.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from gristmill.core.values import DEFAULT_ORGANIZATION, FileRef, Signature

# Splits as they appear in metrics ("accuracy/test") and dataset manifests; "" means "no split".
SPLITS = ("train", "validation", "test")


class VersionStatus(StrEnum):
    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"


class AliasCause(StrEnum):
    MANUAL = "MANUAL"
    POLICY = "POLICY"
    APPROVAL = "APPROVAL"
    ONLINE_GATE = "ONLINE_GATE"


class OnlineTest(StrEnum):
    TWO_PROPORTION_Z = "TWO_PROPORTION_Z"
    POINT_ESTIMATE = "POINT_ESTIMATE"


class PromotionMode(StrEnum):
    AUTOMATIC = "AUTOMATIC"
    MANUAL_APPROVAL = "MANUAL_APPROVAL"


class MetricGoal(StrEnum):
    MAXIMIZE = "MAXIMIZE"
    MINIMIZE = "MINIMIZE"


class PromotionState(StrEnum):
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    SUPERSEDED = "SUPERSEDED"


class Comparison(StrEnum):
    GREATER_OR_EQUAL = "GREATER_OR_EQUAL"
    GREATER = "GREATER"
    LESS_OR_EQUAL = "LESS_OR_EQUAL"
    LESS = "LESS"


@dataclass(frozen=True)
class Caller:
    """Who makes a request: an RPC's API key (organisation, ``key/<id>``), or, for events, their own
    organisation and the producing service as actor."""

    actor: str = "anonymous"
    organization_id: str = DEFAULT_ORGANIZATION


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    # "" (no split), "train", "validation" or "test".
    split: str = ""
    step: int | None = None

    @property
    def label(self) -> str:
        return f"{self.name}/{self.split}" if self.split else self.name


@dataclass(frozen=True)
class BaseModelSource:
    """Exactly one of the three is set (or none when unknown)."""

    base_model_name: str = ""
    object_prefix: str = ""
    local_path: str = ""
    content_sha256: str = ""

    @property
    def description(self) -> str:
        return self.base_model_name or self.object_prefix or self.local_path


@dataclass(frozen=True)
class Lineage:
    training_job_id: str = ""
    project_id: str = ""
    dataset_version_id: str = ""
    dataset_manifest: FileRef | None = None
    dataset_files: tuple[FileRef, ...] = ()
    base_model: BaseModelSource | None = None
    hyper_parameters: dict[str, str] = field(default_factory=dict)
    ray_run_name: str = ""
    code_version: str = ""


@dataclass(frozen=True)
class RegisteredModel:
    organization_id: str
    name: str
    description: str
    task: str
    label_map: tuple[str, ...]
    tags: dict[str, str]
    aliases: dict[str, int]
    latest_version: int
    created_by: str
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class ModelVersion:
    organization_id: str
    model_name: str
    version: int
    status: VersionStatus
    status_reason: str
    # Registry-owned prefix models/<model>/<version>/ (where the verified copies live).
    artifact_prefix: str
    # Where the artifacts came from, and their manifest there (kept so verification can resume).
    source_prefix: str
    source_manifest: FileRef
    files: tuple[FileRef, ...]
    manifest: FileRef | None
    signature: Signature | None
    task: str
    label_map: tuple[str, ...]
    metrics: tuple[Metric, ...]
    lineage: Lineage
    aliases: tuple[str, ...]
    description: str
    tags: dict[str, str]
    created_by: str
    create_time: datetime
    update_time: datetime
    # Set when the online gate rolled the version back; the automatic policy never aliases it again.
    rolled_back_reason: str = ""

    def metric(self, name: str, split: str) -> float | None:
        """The value of ``name`` on ``split`` (the last one reported when there are several)."""
        found = None
        for metric in self.metrics:
            if metric.name == name and metric.split == split:
                found = metric.value
        return found


@dataclass(frozen=True)
class VersionDraft:
    """What a registration knows before its artifacts are verified."""

    source_prefix: str
    source_manifest: FileRef
    signature: Signature | None
    task: str
    label_map: tuple[str, ...]
    metrics: tuple[Metric, ...]
    lineage: Lineage
    description: str
    tags: dict[str, str]


@dataclass(frozen=True)
class VerificationOutcome:
    """The result of checking and copying a version's artifacts. ``reason`` is set exactly when it failed."""

    status: VersionStatus
    reason: str = ""
    files: tuple[FileRef, ...] = ()
    manifest: FileRef | None = None
    # Values the manifest supplied where the registration left them empty.
    signature: Signature | None = None
    task: str = ""
    label_map: tuple[str, ...] = ()
    metrics: tuple[Metric, ...] = ()
    card: ModelCard | None = None


@dataclass(frozen=True)
class OnlineComparison:
    """Feedback counted per version since the canary alias moved, and the test's numbers."""

    test: OnlineTest
    candidate_positive: int
    candidate_negative: int
    baseline_positive: int
    baseline_negative: int
    z: float
    p_value: float
    alpha: float
    max_rate_drop: float
    candidate_succeeded: int = 0
    candidate_failed: int = 0
    baseline_succeeded: int = 0
    baseline_failed: int = 0
    # 1.0 when the error rates were not tested (a version without counted replies).
    error_p_value: float = 1.0
    max_error_rate_increase: float = 0.0


@dataclass(frozen=True)
class PromotionDecision:
    metric_name: str
    split: str
    candidate_version: int
    candidate_value: float
    baseline_version: int | None
    baseline_value: float | None
    min_improvement: float
    passed: bool
    explanation: str
    # Online gate decisions only (passed = promoted, not passed = rolled back).
    online: OnlineComparison | None = None


@dataclass(frozen=True)
class AliasChange:
    organization_id: str
    model_name: str
    alias: str
    sequence: int
    from_version: int | None
    to_version: int | None
    actor: str
    reason: str
    cause: AliasCause
    decision: PromotionDecision | None
    change_time: datetime


@dataclass(frozen=True)
class PromotionPolicy:
    model_name: str
    enabled: bool
    target_alias: str
    metric_name: str
    split: str
    goal: MetricGoal
    baseline_alias: str
    min_improvement: float
    min_value: float | None
    mode: PromotionMode
    update_time: datetime | None = None
    online_gate: OnlineGate | None = None
    # More floors besides min_value, each a (metric, split) the candidate must reach.
    min_metrics: tuple[Metric, ...] = ()

    @property
    def effective_baseline_alias(self) -> str:
        return self.baseline_alias or self.target_alias

    @property
    def online(self) -> OnlineGate | None:
        """The online gate when it is enabled."""
        return self.online_gate if self.online_gate is not None and self.online_gate.enabled else None


DEFAULT_ALPHA = 0.05


@dataclass(frozen=True)
class OnlineGate:
    """Promote the canary (``target_alias``) to ``baseline_alias`` or roll it back, on production feedback."""

    enabled: bool
    min_feedback: int
    test: OnlineTest = OnlineTest.TWO_PROPORTION_Z
    alpha: float = DEFAULT_ALPHA
    max_rate_drop: float = 0.0
    max_error_rate_increase: float = 0.0


@dataclass(frozen=True)
class FeedbackCount:
    """Positive and negative feedback on one version within the current canary window."""

    positive: int = 0
    negative: int = 0

    @property
    def total(self) -> int:
        return self.positive + self.negative

    @property
    def rate(self) -> float:
        return self.positive / self.total if self.total else 0.0


@dataclass(frozen=True)
class OutcomeCount:
    """How one version's replies ended within the current canary window (serving's GenerationOutcomes)."""

    succeeded: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.succeeded + self.failed

    @property
    def error_rate(self) -> float:
        return self.failed / self.total if self.total else 0.0


@dataclass(frozen=True)
class PendingPromotion:
    promotion_id: str
    organization_id: str
    model_name: str
    target_alias: str
    version: int
    from_version: int | None
    decision: PromotionDecision
    state: PromotionState
    decided_by: str
    decision_reason: str
    create_time: datetime
    decide_time: datetime | None


@dataclass(frozen=True)
class CardText:
    """The editable parts of a model card."""

    intended_use: str = ""
    limitations: str = ""
    ethical_considerations: str = ""


@dataclass(frozen=True)
class ModelCard:
    model_name: str
    version: int
    revision: int
    text: CardText
    training_summary: str
    metrics: tuple[Metric, ...]
    markdown: str
    object: FileRef | None
    updated_by: str
    update_time: datetime


@dataclass(frozen=True)
class BaseModel:
    organization_id: str
    name: str
    model_type: str
    architectures: tuple[str, ...]
    tasks: tuple[str, ...]
    parameter_count: int
    license: str
    description: str
    artifact_prefix: str
    files: tuple[FileRef, ...]
    content_sha256: str
    create_time: datetime
    # sha256 of the default chat template's text; "" when the tokenizer has none (basemodels.read_chat_template).
    chat_template_sha256: str = ""


@dataclass(frozen=True)
class MetricFilter:
    metric_name: str
    split: str
    comparison: Comparison
    value: float

    def matches(self, actual: float) -> bool:
        if self.comparison is Comparison.GREATER_OR_EQUAL:
            return actual >= self.value
        if self.comparison is Comparison.GREATER:
            return actual > self.value
        if self.comparison is Comparison.LESS_OR_EQUAL:
            return actual <= self.value
        return actual < self.value


@dataclass(frozen=True)
class ModelQuery:
    name_prefix: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    has_alias: str = ""
    task: str = ""


@dataclass(frozen=True)
class VersionQuery:
    statuses: tuple[VersionStatus, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    alias: str = ""
    metric_filters: tuple[MetricFilter, ...] = ()
