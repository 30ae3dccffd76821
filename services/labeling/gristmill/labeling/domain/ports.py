"""The labeling store's interfaces (ports), one per aggregate: what the service persists, as domain
dataclasses (never ORM rows). ``store/`` implements them; the domain depends only on this module.

Every method is one transaction: it either changes everything it describes or nothing. Errors are the
shared ``gristmill.core.errors`` classes: ``NotFoundError`` for an unknown project/item/annotation/task,
``AlreadyExistsError`` for a taken id or a second annotation by the same annotator,
``FailedPreconditionError`` for a rule about existing state, ``AbortedError`` when a concurrent change
won (the caller may retry). Projects are addressed by ``(organization_id, project_id)``.

Rules are the domain's: where a decision must be taken inside a store's transaction (an item's consensus,
whether a schema change is allowed), the caller passes the rule in and the store applies it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime

from gristmill.labeling.domain.agreement import RatedItem
from gristmill.labeling.domain.consensus import ConsensusRule
from gristmill.labeling.domain.model import (
    Annotation,
    DatasetVersion,
    ImportReport,
    Item,
    ItemSource,
    ItemStatus,
    LabelDefinition,
    LabelSchema,
    Prediction,
    Project,
    ProjectSettings,
    Response,
    SpanLabel,
    Task,
)
from gristmill.labeling.domain.ordering import OfferRule
from gristmill.labeling.domain.splits import DatasetItem

# Whether proposed labels make a new schema version, given the current schema and the labels in use
# (raises to refuse the change): ``gristmill.labeling.domain.schema.schema_change_needed``.
SchemaChangeRule = Callable[[LabelSchema, Sequence[LabelDefinition], Iterable[str]], bool]


@dataclass(frozen=True)
class NewItem:
    """An item that passed cleaning, ready to store (with its existing labels, if the import had any)."""

    item_id: str
    external_id: str
    text: str
    text_hash: str
    signature: bytes | None
    metadata: dict[str, str]
    near_duplicate_of_item_id: str
    shuffle_key: int
    labels: tuple[str, ...] = ()
    prediction: Prediction | None = None
    # Chat and preference items: what the source already said (e.g. a DPO record's chosen over rejected),
    # stored as the import annotator's response beside ``labels``.
    response: Response | None = None


@dataclass(frozen=True)
class StoredRange:
    """The sequence numbers the items of one write got (for the near-duplicate index's high-water mark)."""

    first_seq: int
    last_seq: int
    count: int


@dataclass(frozen=True)
class PredictionTarget:
    """Which item a prediction is for: by item id or by external id (exactly one set)."""

    item_id: str = ""
    external_id: str = ""


class ItemWriter(ABC):
    """One import's writes and lookups, all inside one transaction (see ``ItemStore.open_import``)."""

    @abstractmethod
    def existing_external_ids(self, external_ids: Sequence[str]) -> set[str]:
        """Those of ``external_ids`` the project already has."""

    @abstractmethod
    def existing_hashes(self, text_hashes: Sequence[str]) -> dict[str, str]:
        """Text hash → item id, for those of ``text_hashes`` the project already has."""

    @abstractmethod
    def signatures_of(self, item_ids: Sequence[str]) -> dict[str, bytes]:
        """Stored MinHash signatures of these items of the project (missing ones left out)."""

    @abstractmethod
    def add_items(self, items: Sequence[NewItem], *, source: ItemSource, import_id: str, annotator_id: str) -> None:
        """Stage items (and their labels as annotations by ``annotator_id``, and their predictions); an item
        with labels gets the status and consensus of the writer's ``ConsensusRule``."""

    @abstractmethod
    def finish(self, report: ImportReport | None, request_id: str) -> StoredRange:
        """Record the import (when ``report`` is given) and commit everything staged."""


class ProjectStore(ABC):
    """Projects and their label schema versions."""

    @abstractmethod
    def create_project(self, project: Project) -> Project:
        """Store a new project with its first schema (version 1). ``AlreadyExistsError`` if the id is taken."""

    @abstractmethod
    def get_project(self, organization_id: str, project_id: str, *, with_stats: bool = True) -> Project:
        """The project with its current schema and stats (``with_stats=False``: zero stats, which cost a count
        over the project's items: the annotation calls need only the schema and settings)."""

    @abstractmethod
    def list_projects(self, organization_id: str, *, offset: int, limit: int) -> list[Project]:
        """Newest first."""

    @abstractmethod
    def update_project(
        self,
        organization_id: str,
        project_id: str,
        *,
        display_name: str | None,
        description: str | None,
        settings: ProjectSettings | None,
        now: datetime,
    ) -> Project:
        """Change the given fields (None: unchanged)."""

    @abstractmethod
    def update_label_schema(
        self,
        organization_id: str,
        project_id: str,
        labels: Sequence[LabelDefinition],
        now: datetime,
        *,
        rule: SchemaChangeRule,
    ) -> LabelSchema:
        """Make ``labels`` the current schema (a new version) when ``rule(current, labels, labels in use)``
        says so; otherwise return the current schema as is. Whatever ``rule`` raises refuses the change."""

    @abstractmethod
    def get_label_schema(self, organization_id: str, project_id: str, version: int | None) -> LabelSchema:
        """One schema version; None means the current one."""

    @abstractmethod
    def list_label_schemas(
        self, organization_id: str, project_id: str, *, offset: int, limit: int
    ) -> list[LabelSchema]:
        """Newest first."""


class ItemStore(ABC):
    """Items, the imports that brought them and the predictions attached to them."""

    @abstractmethod
    def find_import(self, organization_id: str, project_id: str, request_id: str) -> ImportReport | None:
        """The import made with this idempotency key, if any."""

    @abstractmethod
    def get_import(self, organization_id: str, project_id: str, import_id: str) -> ImportReport:
        """One import's report, drops included."""

    @abstractmethod
    def list_imports(self, organization_id: str, project_id: str, *, offset: int, limit: int) -> list[ImportReport]:
        """Newest first, without the drop lists."""

    @abstractmethod
    def open_import(
        self, organization_id: str, project_id: str, now: datetime, *, consensus: ConsensusRule
    ) -> AbstractContextManager[ItemWriter]:
        """A writer whose lookups and writes share one transaction; it commits in ``finish``, rolls back on error.

        A concurrent write of the same external id or text makes ``finish`` raise ``AbortedError``.
        """

    @abstractmethod
    def iter_signatures(
        self, organization_id: str, project_id: str, *, after_seq: int
    ) -> Iterator[tuple[int, str, bytes]]:
        """(sequence number, item id, signature) of the project's items after ``after_seq``, in order."""

    @abstractmethod
    def get_item(self, organization_id: str, project_id: str, item_id: str) -> Item:
        """The item with its annotations and latest predictions."""

    @abstractmethod
    def list_items(
        self,
        organization_id: str,
        project_id: str,
        *,
        statuses: Sequence[ItemStatus],
        source: ItemSource | None,
        include_annotations: bool,
        offset: int,
        limit: int,
    ) -> list[Item]:
        """In import order."""

    @abstractmethod
    def attach_predictions(
        self, organization_id: str, project_id: str, predictions: Sequence[tuple[PredictionTarget, Prediction]]
    ) -> int:
        """Attach all or none (``NotFoundError`` naming the first unknown item); returns how many were attached."""


class AnnotationStore(ABC):
    """Task leases, annotations, skips and reviewers' resolutions."""

    @abstractmethod
    def next_task(
        self,
        organization_id: str,
        project_id: str,
        annotator_id: str,
        *,
        lease_seconds: int,
        now: datetime,
        offer: OfferRule,
    ) -> tuple[Task | None, int]:
        """Lease the next item ``offer`` allows the annotator (or return their unexpired lease).

        Returns the task (None when nothing is left) and how many items the annotator could still get.
        """

    @abstractmethod
    def submit_annotation(
        self,
        organization_id: str,
        project_id: str,
        item_id: str,
        annotator_id: str,
        *,
        task_id: str,
        labels: Sequence[str],
        spans: Sequence[SpanLabel],
        comment: str,
        now: datetime,
        consensus: ConsensusRule,
        response: Response | None = None,
    ) -> Annotation:
        """Record the annotation, close the annotator's lease on the item, recompute the item's consensus.

        The same submission again (``Annotation.repeats``) returns the first annotation; other labels by the
        same annotator are ``AlreadyExistsError``.
        """

    @abstractmethod
    def update_annotation(
        self,
        organization_id: str,
        project_id: str,
        annotation_id: str,
        annotator_id: str,
        *,
        labels: Sequence[str],
        spans: Sequence[SpanLabel],
        comment: str,
        now: datetime,
        consensus: ConsensusRule,
        response: Response | None = None,
    ) -> Annotation:
        """Replace the labels (and the response); ``PermissionDeniedError`` if the annotation is another annotator's."""

    @abstractmethod
    def annotation_item_id(self, organization_id: str, project_id: str, annotation_id: str) -> str:
        """The id of the item an annotation is about (``NotFoundError`` for an unknown annotation)."""

    @abstractmethod
    def skip_task(
        self, organization_id: str, project_id: str, task_id: str, annotator_id: str, reason: str, now: datetime
    ) -> None:
        """Close the lease and never offer the item to this annotator again."""

    @abstractmethod
    def renew_task(
        self,
        organization_id: str,
        project_id: str,
        task_id: str,
        annotator_id: str,
        *,
        lease_seconds: int,
        now: datetime,
    ) -> datetime:
        """Extend the annotator's open, unexpired lease to ``now + lease_seconds``; returns the new expiry
        (``NotFoundError``: unknown task; ``FailedPreconditionError``: another's, closed or expired)."""

    @abstractmethod
    def resolve_item(
        self,
        organization_id: str,
        project_id: str,
        item_id: str,
        reviewer_id: str,
        labels: Sequence[str],
        comment: str,
        now: datetime,
        *,
        consensus: ConsensusRule,
        response: Response | None = None,
    ) -> Item:
        """Set the item's final labels, and for a generative item the winning response (status RESOLVED)."""

    @abstractmethod
    def rated_items(
        self, organization_id: str, project_id: str, annotator_ids: Sequence[str]
    ) -> tuple[list[RatedItem], dict[str, int], dict[ItemStatus, int]]:
        """Items with their (selected annotators') labels and consensus, annotation counts per annotator, and
        item counts per status."""

    @abstractmethod
    def rated_responses(
        self, organization_id: str, project_id: str, annotator_ids: Sequence[str]
    ) -> list[tuple[str, int, dict[str, Response]]]:
        """Chat and preference items with responses: ``(item_id, candidate count, {annotator_id: response})``
        for the selected annotators (all when empty), in import order."""


class DatasetStore(ABC):
    """Published dataset versions: immutable once recorded."""

    @abstractmethod
    def consensus_items(self, organization_id: str, project_id: str) -> list[DatasetItem]:
        """Items with a consensus (LABELED or RESOLVED) and their consensus labels."""

    @abstractmethod
    def find_dataset_version(self, organization_id: str, project_id: str, content_sha256: str) -> DatasetVersion | None:
        """The version with this fingerprint, if one was published."""

    @abstractmethod
    def next_version_number(self, organization_id: str, project_id: str) -> int:
        """The number the next published version will get."""

    @abstractmethod
    def add_dataset_version(self, version: DatasetVersion) -> DatasetVersion:
        """Record the version and announce it (outbox) in one transaction.

        ``AbortedError`` when its number was taken meanwhile.
        """

    @abstractmethod
    def get_dataset_version(
        self, organization_id: str, project_id: str, *, dataset_version_id: str = "", version_number: int = 0
    ) -> DatasetVersion:
        """By id or by number."""

    @abstractmethod
    def list_dataset_versions(
        self, organization_id: str, project_id: str, *, offset: int, limit: int
    ) -> list[DatasetVersion]:
        """Newest first."""


class LabelingStore(ProjectStore, ItemStore, AnnotationStore, DatasetStore, ABC):
    """Everything the labeling service persists (one implementation serves every aggregate)."""
