"""The labeling domain's value types: plain dataclasses, free of gRPC, protobuf and SQL.

Enum values are the proto enum names, so conversions are a lookup by name and the dataset manifest
can carry them verbatim (``TASK_TYPE_TEXT_CLASSIFICATION``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from gristmill.core.chat import Conversation


class TaskType(StrEnum):
    TEXT_CLASSIFICATION = "TASK_TYPE_TEXT_CLASSIFICATION"
    TEXT_MULTI_LABEL_CLASSIFICATION = "TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION"
    CHAT = "TASK_TYPE_CHAT"
    PREFERENCE = "TASK_TYPE_PREFERENCE"

    @property
    def multi_label(self) -> bool:
        return self is TaskType.TEXT_MULTI_LABEL_CLASSIFICATION

    @property
    def generative(self) -> bool:
        """Whether an item is a conversation (chat, preference) rather than a text to classify."""
        return self in (TaskType.CHAT, TaskType.PREFERENCE)


class TaskOrdering(StrEnum):
    SEQUENTIAL = "TASK_ORDERING_SEQUENTIAL"
    RANDOM = "TASK_ORDERING_RANDOM"
    UNCERTAINTY_FIRST = "TASK_ORDERING_UNCERTAINTY_FIRST"


class NearDuplicatePolicy(StrEnum):
    DROP = "NEAR_DUPLICATE_POLICY_DROP"
    FLAG = "NEAR_DUPLICATE_POLICY_FLAG"
    OFF = "NEAR_DUPLICATE_POLICY_OFF"


class PiiKind(StrEnum):
    """The API's PII kinds; the report counts masks under these names (``EMAIL``, ``PAYMENT_CARD`` ...)."""

    EMAIL = "EMAIL"
    PHONE = "PHONE"
    PAYMENT_CARD = "PAYMENT_CARD"
    ID_NUMBER = "ID_NUMBER"
    IP_ADDRESS = "IP_ADDRESS"


class ItemStatus(StrEnum):
    UNLABELED = "ITEM_STATUS_UNLABELED"
    LABELED = "ITEM_STATUS_LABELED"
    CONFLICT = "ITEM_STATUS_CONFLICT"
    RESOLVED = "ITEM_STATUS_RESOLVED"


class ItemSource(StrEnum):
    IMPORT = "ITEM_SOURCE_IMPORT"
    PREDICTION_LOG = "ITEM_SOURCE_PREDICTION_LOG"
    FEEDBACK = "ITEM_SOURCE_FEEDBACK"


class DropReason(StrEnum):
    EMPTY = "DROP_REASON_EMPTY"
    TOO_LONG = "DROP_REASON_TOO_LONG"
    EXACT_DUPLICATE = "DROP_REASON_EXACT_DUPLICATE"
    NEAR_DUPLICATE = "DROP_REASON_NEAR_DUPLICATE"
    NEAR_DUPLICATE_FLAGGED = "DROP_REASON_NEAR_DUPLICATE_FLAGGED"
    EXISTING_EXTERNAL_ID = "DROP_REASON_EXISTING_EXTERNAL_ID"
    # Kept, with its oldest exchanges removed to fit ``CleaningSettings.max_tokens``.
    TRUNCATED = "DROP_REASON_TRUNCATED"
    TOO_MANY_TOKENS = "DROP_REASON_TOO_MANY_TOKENS"


class ImportFormat(StrEnum):
    JSONL = "IMPORT_FORMAT_JSONL"
    CSV = "IMPORT_FORMAT_CSV"
    ITEMS = "IMPORT_FORMAT_ITEMS"


class SplitStrategy(StrEnum):
    STRATIFIED = "SPLIT_STRATEGY_STRATIFIED"
    RANDOM = "SPLIT_STRATEGY_RANDOM"


class Split(StrEnum):
    """Dataset splits; values are the file stems used in object keys and the manifest."""

    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


# --------------------------------------------------------------------------- projects and schemas


@dataclass(frozen=True)
class LabelDefinition:
    name: str
    description: str = ""


@dataclass(frozen=True)
class LabelSchema:
    project_id: str
    version: int
    labels: tuple[LabelDefinition, ...]
    create_time: datetime

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)


@dataclass(frozen=True)
class CustomPiiPattern:
    name: str
    regex: str


@dataclass(frozen=True)
class PiiSettings:
    store_raw_text: bool = False
    # Empty means every built-in kind.
    kinds: frozenset[PiiKind] = frozenset()
    custom_patterns: tuple[CustomPiiPattern, ...] = ()

    @property
    def effective_kinds(self) -> frozenset[PiiKind]:
        return self.kinds or frozenset(PiiKind)


@dataclass(frozen=True)
class CleaningSettings:
    max_text_chars: int = 10_000
    near_duplicate_policy: NearDuplicatePolicy = NearDuplicatePolicy.DROP
    near_duplicate_threshold: float = 0.9
    pii: PiiSettings = field(default_factory=PiiSettings)
    # Chat and preference projects: the most tokens of a conversation, counted by ``tokenizer`` (a registry
    # base model's name); 0 for no token limit (see ``domain/tokens.py``).
    max_tokens: int = 0
    tokenizer: str = ""


@dataclass(frozen=True)
class ActiveLearningSettings:
    import_uncertain_predictions: bool = False


@dataclass(frozen=True)
class FeedbackSettings:
    """A chat project's use of serving's feedback on its models (see ``domain/feedback.py``)."""

    import_feedback: bool = False
    # The preference project that receives feedback pairs; "" for none.
    preference_project_id: str = ""
    # A rating at or below this (1-5) makes a chat item to review.
    review_at_or_below_rating: int = 2


@dataclass(frozen=True)
class ProjectSettings:
    """Effective settings: the API's zero values are replaced by their defaults before they get here."""

    annotations_per_item: int = 1
    task_ordering: TaskOrdering = TaskOrdering.SEQUENTIAL
    lease_seconds: int = 600
    cleaning: CleaningSettings = field(default_factory=CleaningSettings)
    active_learning: ActiveLearningSettings = field(default_factory=ActiveLearningSettings)
    feedback: FeedbackSettings = field(default_factory=FeedbackSettings)


@dataclass(frozen=True)
class ProjectStats:
    item_count: int = 0
    labeled_item_count: int = 0
    conflict_item_count: int = 0
    annotation_count: int = 0
    dataset_version_count: int = 0


@dataclass(frozen=True)
class Project:
    organization_id: str
    project_id: str
    display_name: str
    description: str
    task_type: TaskType
    label_schema: LabelSchema
    settings: ProjectSettings
    create_time: datetime
    update_time: datetime
    stats: ProjectStats = field(default_factory=ProjectStats)


# --------------------------------------------------------------------------- items, annotations, tasks


@dataclass(frozen=True)
class Prediction:
    model_name: str
    model_version: int
    labels: tuple[str, ...]
    probabilities: dict[str, float]
    create_time: datetime | None = None

    @property
    def top_probability(self) -> float | None:
        """The model's confidence: its highest probability (None when it gave none)."""
        return max(self.probabilities.values()) if self.probabilities else None


@dataclass(frozen=True)
class SpanLabel:
    start: int
    end: int
    label: str


@dataclass(frozen=True)
class Response:
    """What an annotator says about a generative item (empty for classification).

    - chat: ``reply`` is the final assistant reply as written or edited ("" keeps the item's own), ``rating``
      1..5 (0: not rated), ``flags`` from ``gristmill.core.chat.CHAT_FLAGS``;
    - preference: ``ranking`` lists candidate indices best first (one index chooses the best), or ``tie``.
    """

    reply: str = ""
    rating: int = 0
    flags: tuple[str, ...] = ()
    ranking: tuple[int, ...] = ()
    tie: bool = False

    @property
    def empty(self) -> bool:
        return self == Response()


@dataclass(frozen=True)
class Annotation:
    annotation_id: str
    project_id: str
    item_id: str
    annotator_id: str
    labels: tuple[str, ...]
    schema_version: int
    create_time: datetime
    update_time: datetime
    spans: tuple[SpanLabel, ...] = ()
    comment: str = ""
    response: Response = field(default_factory=Response)

    def repeats(
        self, labels: Sequence[str], spans: Sequence[SpanLabel], comment: str, response: Response | None = None
    ) -> bool:
        """Whether a submission with this content is a retry of this annotation (its first reply was lost:
        a timeout, a restart), to be answered as the first time; different content is a second opinion."""
        return (self.labels, self.spans, self.comment, self.response) == (
            tuple(labels),
            tuple(spans),
            comment,
            response or Response(),
        )


@dataclass(frozen=True)
class Consensus:
    labels: tuple[str, ...] = ()
    agreement: float = 0.0
    tied: bool = False
    resolved_by: str = ""


@dataclass(frozen=True)
class Item:
    item_id: str
    project_id: str
    external_id: str
    text: str
    metadata: dict[str, str]
    status: ItemStatus
    source: ItemSource
    import_id: str
    near_duplicate_of_item_id: str
    consensus: Consensus
    create_time: datetime
    annotations: tuple[Annotation, ...] = ()
    predictions: tuple[Prediction, ...] = ()
    # Chat and preference items: the conversation (``text`` is then its canonical JSON, as stored).
    conversation: Conversation | None = None
    # A reviewer's resolution of a generative item (the reply, or the ranking, that wins).
    resolved_response: Response | None = None


@dataclass(frozen=True)
class Task:
    task_id: str
    annotator_id: str
    item: Item
    label_schema: LabelSchema
    lease_expire_time: datetime


# --------------------------------------------------------------------------- imports


@dataclass(frozen=True)
class CsvOptions:
    delimiter: str = ","
    has_header: bool = True
    column_names: tuple[str, ...] = ()
    disable_quoting: bool = False


@dataclass(frozen=True)
class FieldMapping:
    external_id_field: str = "id"
    text_field: str = "text"
    label_field: str = "label"
    # Empty means every field not mapped above.
    metadata_fields: tuple[str, ...] = ()
    multi_label_separator: str = "|"


@dataclass(frozen=True)
class ImportOptions:
    project_id: str
    format: ImportFormat
    request_id: str = ""
    source_name: str = ""
    field_mapping: FieldMapping = field(default_factory=FieldMapping)
    csv: CsvOptions = field(default_factory=CsvOptions)
    existing_label_annotator_id: str = "import"


@dataclass(frozen=True)
class RawRecord:
    """One record as read from a file or a structured batch, before cleaning."""

    line_number: int
    external_id: str
    text: str
    metadata: dict[str, str]
    labels: tuple[str, ...] = ()
    # Chat and preference records: the conversation as read (``text`` is then unused), and what the source
    # already says about it (e.g. a DPO record's chosen/rejected as a ranking), recorded like existing labels.
    conversation: Conversation | None = None
    response: Response | None = None


@dataclass(frozen=True)
class DroppedRecord:
    line_number: int
    external_id: str
    reason: DropReason
    duplicate_of_item_id: str = ""
    similarity: float = 0.0
    # TRUNCATED: the turns removed and the tokens kept; TOO_MANY_TOKENS: the tokens of its shortest form.
    removed_turn_count: int = 0
    token_count: int = 0


@dataclass
class ImportReport:
    import_id: str
    project_id: str
    source_name: str
    create_time: datetime
    received_count: int = 0
    accepted_count: int = 0
    normalized_count: int = 0
    dropped_empty_count: int = 0
    dropped_too_long_count: int = 0
    dropped_exact_duplicate_count: int = 0
    dropped_near_duplicate_count: int = 0
    flagged_near_duplicate_count: int = 0
    dropped_existing_external_id_count: int = 0
    pii_masked_item_count: int = 0
    pii_masked_by_kind: dict[str, int] = field(default_factory=dict)
    imported_label_count: int = 0
    drops: list[DroppedRecord] = field(default_factory=list)
    drops_truncated: bool = False
    duration_ms: int = 0
    # Chat and preference imports: records read per detected source format ("openai", "alpaca",
    # "sharegpt", "dpo").
    records_by_format: dict[str, int] = field(default_factory=dict)
    # Conversations cut to fit ``max_tokens`` (kept), the turns they lost, and those dropped as too long even so.
    truncated_count: int = 0
    truncated_turn_count: int = 0
    dropped_too_many_tokens_count: int = 0


# --------------------------------------------------------------------------- dataset versions


@dataclass(frozen=True)
class ObjectRef:
    key: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class SplitRatios:
    train: float = 0.8
    validation: float = 0.1
    test: float = 0.1

    def of(self, split: Split) -> float:
        return {Split.TRAIN: self.train, Split.VALIDATION: self.validation, Split.TEST: self.test}[split]


@dataclass(frozen=True)
class SplitSummary:
    split: Split
    item_count: int
    item_count_by_label: dict[str, int]
    file: ObjectRef


@dataclass(frozen=True)
class DatasetVersion:
    dataset_version_id: str
    organization_id: str
    project_id: str
    version_number: int
    task_type: TaskType
    schema_version: int
    label_map: tuple[str, ...]
    ratios: SplitRatios
    seed: int
    split_strategy: SplitStrategy
    splits: tuple[SplitSummary, ...]
    manifest: ObjectRef
    content_sha256: str
    description: str
    create_time: datetime


# --------------------------------------------------------------------------- agreement


@dataclass(frozen=True)
class ConfusionMatrix:
    labels: tuple[str, ...]
    # Row-major: counts[i * len(labels) + j].
    counts: tuple[int, ...]


@dataclass(frozen=True)
class PairwiseAgreement:
    annotator_a: str
    annotator_b: str
    item_count: int
    cohen_kappa: float | None
    observed_agreement: float
    confusion: ConfusionMatrix


@dataclass(frozen=True)
class AnnotatorAgreement:
    annotator_id: str
    annotation_count: int
    consensus_agreement: float
    mean_cohen_kappa: float | None


@dataclass(frozen=True)
class AgreementReport:
    project_id: str
    item_count: int
    annotator_count: int
    fleiss_kappa: float | None
    krippendorff_alpha: float | None
    observed_agreement: float
    pairs: tuple[PairwiseAgreement, ...]
    annotators: tuple[AnnotatorAgreement, ...]
    agreed_item_count: int
    conflict_item_count: int
    resolved_item_count: int
    compute_time: datetime
    # chat: ordinal alpha of the ratings; preference: how often two annotators order a candidate pair alike.
    rating_krippendorff_alpha: float | None = None
    rated_item_count: int = 0
    ranking_pair_agreement: float | None = None
    ranked_item_count: int = 0
