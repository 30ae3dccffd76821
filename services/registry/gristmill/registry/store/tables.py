"""The registry's tables (SQLAlchemy ORM). Names and column types are what migrations are written from.

Structured values that are only ever read whole (signature, lineage, file lists, decisions) are JSON
columns; what the API filters on (tags, final metrics, aliases) has tables of its own so that searches
and their paging run in SQL on both back-ends.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

_NAME = 128
_KEY = 1024


class RegistryBase(DeclarativeBase):
    metadata = MetaData()


class LockRow(RegistryBase):
    """Named installation-wide locks: ``lock_model_count`` bumps ``registered_models`` so that counting the models
    and inserting one is a single step for every registry process (the licence's max_registered_models)."""

    __tablename__ = "registry_locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    counter: Mapped[int] = mapped_column(BigInteger, default=0)


MODEL_COUNT_LOCK = "registered_models"


class ModelRow(RegistryBase):
    __tablename__ = "registry_models"
    __table_args__ = (UniqueConstraint("organization_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(String(_NAME))
    name: Mapped[str] = mapped_column(String(_NAME))
    description: Mapped[str] = mapped_column(Text, default="")
    task: Mapped[str] = mapped_column(String(64))
    label_map: Mapped[list[str]] = mapped_column(JSON)
    latest_version: Mapped[int] = mapped_column(Integer, default=0)
    alias_sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    # Bumped by lock_model: an UPDATE is the one statement that takes a row lock on PostgreSQL and the
    # write lock on SQLite, so every writer of a model queues behind it.
    lock_counter: Mapped[int] = mapped_column(BigInteger, default=0)
    created_by: Mapped[str] = mapped_column(String(255))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ModelTagRow(RegistryBase):
    __tablename__ = "registry_model_tags"

    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(_NAME), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class VersionRow(RegistryBase):
    __tablename__ = "registry_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version"),
        # NULL for manual registrations (NULLs never collide): one version per training job.
        UniqueConstraint("organization_id", "training_job_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), index=True)
    organization_id: Mapped[str] = mapped_column(String(_NAME))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    status_reason: Mapped[str] = mapped_column(Text, default="")
    artifact_prefix: Mapped[str] = mapped_column(String(_KEY))
    source_prefix: Mapped[str] = mapped_column(String(_KEY))
    source_manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    signature: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    task: Mapped[str] = mapped_column(String(64))
    label_map: Mapped[list[str]] = mapped_column(JSON)
    metrics: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON)
    # "" unless the online gate rolled the version back (its reason).
    rolled_back_reason: Mapped[str] = mapped_column(Text, server_default=text("''"))
    training_job_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(255))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class VersionTagRow(RegistryBase):
    __tablename__ = "registry_version_tags"

    version_id: Mapped[int] = mapped_column(ForeignKey("registry_versions.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(_NAME), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class VersionMetricRow(RegistryBase):
    """The final value of each (metric, split) of a version, for metric filters."""

    __tablename__ = "registry_version_metrics"

    version_id: Mapped[int] = mapped_column(ForeignKey("registry_versions.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(_NAME), primary_key=True)
    split: Mapped[str] = mapped_column(String(16), primary_key=True)
    value: Mapped[float] = mapped_column(Float)


class AliasRow(RegistryBase):
    __tablename__ = "registry_aliases"

    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(_NAME), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AliasHistoryRow(RegistryBase):
    __tablename__ = "registry_alias_history"
    __table_args__ = (UniqueConstraint("model_id", "sequence"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), index=True)
    sequence: Mapped[int] = mapped_column(BigInteger)
    alias: Mapped[str] = mapped_column(String(_NAME))
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text, default="")
    cause: Mapped[str] = mapped_column(String(16))
    decision: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    change_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PolicyRow(RegistryBase):
    __tablename__ = "registry_promotion_policies"

    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    target_alias: Mapped[str] = mapped_column(String(_NAME))
    metric_name: Mapped[str] = mapped_column(String(_NAME))
    split: Mapped[str] = mapped_column(String(16))
    goal: Mapped[str] = mapped_column(String(16))
    baseline_alias: Mapped[str] = mapped_column(String(_NAME))
    min_improvement: Mapped[float] = mapped_column(Float)
    min_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    mode: Mapped[str] = mapped_column(String(32))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Read whole: NULL means no online gate / no further floors.
    online_gate: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    min_metrics: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)


class OnlineFeedbackRow(RegistryBase):
    """One generation's verdict for the online gate: the latest feedback on it wins.

    ``window`` is the canary alias's history sequence when the feedback arrived: the gate compares the two
    versions within the current window, so both are judged on the same period's traffic.
    """

    __tablename__ = "registry_online_feedback"
    __table_args__ = (Index("ix_registry_online_feedback_window", "model_id", "window"),)

    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    window: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer)
    positive: Mapped[bool] = mapped_column(Boolean)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class OnlineOutcomeRow(RegistryBase):
    """Replies of one version within one canary window (summed from serving's GenerationOutcomes)."""

    __tablename__ = "registry_online_outcomes"

    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), primary_key=True)
    window: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    succeeded: Mapped[int] = mapped_column(BigInteger)
    failed: Mapped[int] = mapped_column(BigInteger)


class PendingPromotionRow(RegistryBase):
    __tablename__ = "registry_pending_promotions"

    ordinal: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    promotion_id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(String(_NAME), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), index=True)
    target_alias: Mapped[str] = mapped_column(String(_NAME))
    version: Mapped[int] = mapped_column(Integer)
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    decision: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), index=True)
    decided_by: Mapped[str] = mapped_column(String(255), default="")
    decision_reason: Mapped[str] = mapped_column(Text, default="")
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decide_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ModelCardRow(RegistryBase):
    __tablename__ = "registry_model_cards"

    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True)
    intended_use: Mapped[str] = mapped_column(Text)
    limitations: Mapped[str] = mapped_column(Text)
    ethical_considerations: Mapped[str] = mapped_column(Text)
    training_summary: Mapped[str] = mapped_column(Text)
    metrics: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    markdown: Mapped[str] = mapped_column(Text)
    object: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    updated_by: Mapped[str] = mapped_column(String(255))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BaseModelRow(RegistryBase):
    __tablename__ = "registry_base_models"
    __table_args__ = (UniqueConstraint("organization_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(String(_NAME))
    name: Mapped[str] = mapped_column(String(_NAME))
    model_type: Mapped[str] = mapped_column(String(_NAME))
    architectures: Mapped[list[str]] = mapped_column(JSON)
    tasks: Mapped[list[str]] = mapped_column(JSON)
    parameter_count: Mapped[int] = mapped_column(BigInteger)
    license: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    artifact_prefix: Mapped[str] = mapped_column(String(_KEY))
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    content_sha256: Mapped[str] = mapped_column(String(64))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # "" for no chat template (and for base models imported before it was recorded). The default is SQL text:
    # Alembic's SQLite comparison reads a plain "" back as a difference.
    chat_template_sha256: Mapped[str] = mapped_column(String(64), server_default=text("''"))


REGISTRY_TABLES = RegistryBase.metadata
