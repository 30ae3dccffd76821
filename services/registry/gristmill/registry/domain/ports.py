"""The registry's store ports: one interface per aggregate, joined in one unit of work.

The domain depends on these; ``gristmill.registry.store`` implements them (the domain never imports it).

``RegistryStore.transaction()`` yields a ``RegistryTransaction``; everything done through it, including
the events it emits, commits together or not at all. Implementations return domain dataclasses, never
ORM rows, and raise ``gristmill.core.errors`` classes:

- ``AlreadyExistsError`` when inserting a name that is taken (model, base model);
- ``AbortedError`` when a concurrent writer won a race the caller may retry.

Listing methods take a ``Page`` (size and an opaque position) and return ``(items, next_position)``,
``next_position`` being ``None`` on the last page. Positions are produced and understood only by the
implementation; the domain wraps them in page tokens.

Concurrency: ``lock_model`` serialises writers of one registered model until the transaction ends (a
row lock on PostgreSQL, the database write lock on SQLite). Alias moves, card edits and promotion
decisions take it first, so a compare-and-set that reads after it sees every committed change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime

from gristmill.core.paging import Page
from gristmill.core.values import FileRef, Signature
from gristmill.registry.domain.model import (
    AliasCause,
    AliasChange,
    BaseModel,
    FeedbackCount,
    Metric,
    ModelCard,
    ModelQuery,
    ModelVersion,
    OutcomeCount,
    PendingPromotion,
    PromotionDecision,
    PromotionPolicy,
    PromotionState,
    RegisteredModel,
    VersionDraft,
    VersionQuery,
    VersionStatus,
)


class ModelRepository(ABC):
    """Registered models, and the locks that serialise their writers."""

    @abstractmethod
    def insert_model(
        self,
        org: str,
        name: str,
        *,
        description: str,
        task: str,
        label_map: tuple[str, ...],
        tags: dict[str, str],
        created_by: str,
        now: datetime,
    ) -> RegisteredModel:
        """Create a model; ``AlreadyExistsError`` when the name is taken in ``org``."""

    @abstractmethod
    def get_model(self, org: str, name: str) -> RegisteredModel | None: ...

    @abstractmethod
    def count_models(self) -> int:
        """Registered models of every organisation (what a licence's max_registered_models counts)."""

    @abstractmethod
    def lock_model_count(self) -> None:
        """Serialise creators of registered models until the transaction ends, so that a count taken after it
        stays true until the transaction commits."""

    @abstractmethod
    def lock_model(self, org: str, name: str) -> bool:
        """Serialise writers of this model until the transaction ends; False when the model does not exist."""

    @abstractmethod
    def update_model(
        self,
        org: str,
        name: str,
        *,
        now: datetime,
        description: str | None = None,
        tags: dict[str, str] | None = None,
        label_map: tuple[str, ...] | None = None,
    ) -> RegisteredModel:
        """Change the given fields (None: unchanged) of an existing model."""

    @abstractmethod
    def search_models(self, org: str, query: ModelQuery, page: Page) -> tuple[list[RegisteredModel], str | None]: ...


class VersionRepository(ABC):
    """The versions of registered models."""

    @abstractmethod
    def add_version(
        self,
        org: str,
        model_name: str,
        draft: VersionDraft,
        *,
        artifact_prefix_for: Callable[[str, str, int], str],
        created_by: str,
        now: datetime,
    ) -> ModelVersion:
        """Allocate the model's next version number and insert the version PENDING.

        ``AlreadyExistsError`` when ``draft.lineage.training_job_id`` already made a version in ``org``
        (a concurrent registration of the same job lost the race).
        """

    @abstractmethod
    def find_version_by_job(self, org: str, training_job_id: str) -> ModelVersion | None: ...

    @abstractmethod
    def get_version(self, org: str, model_name: str, version: int) -> ModelVersion | None: ...

    @abstractmethod
    def latest_ready_version(self, org: str, model_name: str) -> ModelVersion | None: ...

    @abstractmethod
    def list_versions(
        self, org: str, model_name: str, query: VersionQuery, page: Page
    ) -> tuple[list[ModelVersion], str | None]:
        """Newest first."""

    @abstractmethod
    def pending_versions(self) -> list[ModelVersion]:
        """Every PENDING version of every organisation (verification to resume after a restart)."""

    @abstractmethod
    def complete_version(
        self,
        org: str,
        model_name: str,
        version: int,
        *,
        status: VersionStatus,
        reason: str,
        files: tuple[FileRef, ...],
        manifest: FileRef | None,
        signature: Signature | None,
        task: str,
        label_map: tuple[str, ...],
        metrics: tuple[Metric, ...],
        now: datetime,
    ) -> ModelVersion | None:
        """Move a PENDING version to READY/FAILED; None (and no change) when it was no longer PENDING."""

    @abstractmethod
    def update_version(
        self,
        org: str,
        model_name: str,
        version: int,
        *,
        now: datetime,
        description: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> ModelVersion: ...


class AliasRepository(ABC):
    """Aliases and their history (sequence numbers per model)."""

    @abstractmethod
    def get_alias(self, org: str, model_name: str, alias: str) -> int | None:
        """The version the alias points to, or None."""

    @abstractmethod
    def write_alias(
        self,
        org: str,
        model_name: str,
        alias: str,
        *,
        to_version: int | None,
        actor: str,
        reason: str,
        cause: AliasCause,
        decision: PromotionDecision | None,
        now: datetime,
    ) -> AliasChange:
        """Point (or, with ``to_version=None``, delete) the alias and append the history entry with the
        model's next sequence number. Call only under ``lock_model``, after checking the current value."""

    @abstractmethod
    def latest_alias_change(self, org: str, model_name: str, alias: str) -> AliasChange | None: ...

    @abstractmethod
    def alias_history(self, org: str, model_name: str, alias: str, page: Page) -> tuple[list[AliasChange], str | None]:
        """Newest first; every alias of the model when ``alias`` is empty."""


class PromotionRepository(ABC):
    """Promotion policies and the promotions waiting for approval."""

    @abstractmethod
    def put_policy(self, org: str, policy: PromotionPolicy) -> PromotionPolicy: ...

    @abstractmethod
    def get_policy(self, org: str, model_name: str) -> PromotionPolicy | None: ...

    @abstractmethod
    def delete_policy(self, org: str, model_name: str) -> bool: ...

    @abstractmethod
    def add_pending_promotion(self, promotion: PendingPromotion) -> PendingPromotion: ...

    @abstractmethod
    def get_pending_promotion(self, org: str, promotion_id: str) -> PendingPromotion | None: ...

    @abstractmethod
    def list_pending_promotions(
        self, org: str, model_name: str, include_decided: bool, page: Page
    ) -> tuple[list[PendingPromotion], str | None]:
        """Oldest first."""

    @abstractmethod
    def decide_pending_promotion(
        self, org: str, promotion_id: str, *, state: PromotionState, decided_by: str, reason: str, now: datetime
    ) -> PendingPromotion:
        """Record the decision on a promotion (call after checking it is PENDING, under ``lock_model``)."""

    @abstractmethod
    def supersede_pending_promotions(
        self, org: str, model_name: str, *, alias: str | None, reason: str, now: datetime
    ) -> int:
        """Mark the PENDING promotions of the model (of one target alias, or all) SUPERSEDED; returns how many."""


class OnlineFeedbackRepository(ABC):
    """What the online gate counts: one verdict per generation, per canary window."""

    @abstractmethod
    def put_online_feedback(
        self, org: str, model_name: str, request_id: str, *, version: int, window: int, positive: bool, now: datetime
    ) -> None:
        """Record (or overwrite: the latest feedback on a generation wins) the verdict on ``request_id``."""

    @abstractmethod
    def online_feedback_counts(self, org: str, model_name: str, window: int) -> dict[int, FeedbackCount]:
        """Positive and negative verdicts per version within ``window``."""

    @abstractmethod
    def add_online_outcomes(
        self, org: str, model_name: str, *, window: int, version: int, succeeded: int, failed: int
    ) -> None:
        """Add to the replies counted for ``version`` within ``window``."""

    @abstractmethod
    def online_outcome_counts(self, org: str, model_name: str, window: int) -> dict[int, OutcomeCount]: ...

    @abstractmethod
    def mark_rolled_back(self, org: str, model_name: str, version: int, reason: str) -> None: ...


class CardRepository(ABC):
    """Model card revisions."""

    @abstractmethod
    def latest_card(self, org: str, model_name: str, version: int) -> ModelCard | None: ...

    @abstractmethod
    def add_card(self, org: str, card: ModelCard) -> ModelCard:
        """Store a card revision; ``AbortedError`` when that revision exists (a concurrent edit)."""


class BaseModelRepository(ABC):
    """Imported base models."""

    @abstractmethod
    def insert_base_model(self, base_model: BaseModel) -> BaseModel:
        """``AlreadyExistsError`` when the name is taken in the organisation."""

    @abstractmethod
    def get_base_model(self, org: str, name: str) -> BaseModel | None: ...

    @abstractmethod
    def list_base_models(self, org: str, task: str, page: Page) -> tuple[list[BaseModel], str | None]: ...


class RegistryEvents(ABC):
    """Events written in the transaction and published by the outbox relay."""

    @abstractmethod
    def emit_version_registered(self, version: ModelVersion) -> None: ...

    @abstractmethod
    def emit_alias_changed(self, change: AliasChange) -> None: ...


class RegistryTransaction(
    ModelRepository,
    VersionRepository,
    AliasRepository,
    PromotionRepository,
    OnlineFeedbackRepository,
    CardRepository,
    BaseModelRepository,
    RegistryEvents,
    ABC,
):
    """Operations inside one database transaction. ``org`` is the organisation every lookup is scoped to."""


class RegistryStore(ABC):
    @abstractmethod
    def transaction(self) -> AbstractContextManager[RegistryTransaction]:
        """A unit of work: committed when the block ends normally, rolled back on any exception."""
