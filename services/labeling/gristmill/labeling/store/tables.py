"""The labeling service's tables (SQLAlchemy Core). Owned by this service alone; no other service reads them."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)

from gristmill.core.sql import utc


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every back-end (SQLite keeps no offset: it is put back on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use timezone-aware UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if not isinstance(value, datetime):
            return None
        return utc(value)


# Integer primary keys are 64-bit on PostgreSQL; SQLite's ROWID alias must be spelled INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

projects = Table(
    "labeling_projects",
    metadata,
    Column("pk", BigId, primary_key=True, autoincrement=True),
    Column("organization_id", String(128), nullable=False),
    Column("project_id", String(128), nullable=False),
    Column("display_name", String(512), nullable=False),
    Column("description", Text, nullable=False),
    Column("task_type", String(64), nullable=False),
    Column("settings", JSON, nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("update_time", UtcDateTime, nullable=False),
    UniqueConstraint("organization_id", "project_id", name="uq_labeling_projects_org_id"),
)

label_schemas = Table(
    "labeling_label_schemas",
    metadata,
    Column("project_pk", ForeignKey("labeling_projects.pk", ondelete="CASCADE"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("labels", JSON, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
)

imports = Table(
    "labeling_imports",
    metadata,
    Column("import_id", String(64), primary_key=True),
    Column("project_pk", ForeignKey("labeling_projects.pk", ondelete="CASCADE"), nullable=False, index=True),
    Column("request_id", String(128), nullable=True),
    Column("source_name", String(512), nullable=False),
    Column("report", JSON, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    UniqueConstraint("project_pk", "request_id", name="uq_labeling_imports_request"),
)

items = Table(
    "labeling_items",
    metadata,
    Column("seq", BigId, primary_key=True, autoincrement=True),
    Column("item_id", String(64), nullable=False, unique=True),
    Column("project_pk", ForeignKey("labeling_projects.pk", ondelete="CASCADE"), nullable=False),
    Column("external_id", String(256), nullable=False),
    Column("text", Text, nullable=False),
    # SHA-256 of the stored (normalised, masked) text: the exact-duplicate key.
    Column("text_hash", String(64), nullable=False),
    # MinHash signature (NUM_PERM little-endian uint32): rebuilds the near-duplicate index without text.
    Column("signature", LargeBinary, nullable=True),
    Column("metadata", JSON, nullable=False),
    Column("status", String(32), nullable=False),
    Column("source", String(32), nullable=False),
    Column("import_id", String(64), nullable=False),
    Column("near_duplicate_of", String(64), nullable=False),
    Column("annotation_count", Integer, nullable=False),
    Column("consensus_labels", JSON, nullable=False),
    Column("consensus_agreement", Float, nullable=False),
    Column("consensus_tied", Boolean, nullable=False),
    Column("resolved_by", String(128), nullable=False),
    Column("resolved_labels", JSON(none_as_null=True), nullable=True),
    Column("resolution_comment", Text, nullable=False),
    # A reviewer's resolution of a chat or preference item (reply or ranking); NULL otherwise.
    Column("resolved_response", JSON(none_as_null=True), nullable=True),
    Column("shuffle_key", BigInteger, nullable=False),
    # Top probability of the latest attached prediction (uncertainty-first ordering); NULL without one.
    Column("top_probability", Float, nullable=True),
    Column("create_time", UtcDateTime, nullable=False),
    UniqueConstraint("project_pk", "external_id", name="uq_labeling_items_external_id"),
    UniqueConstraint("project_pk", "text_hash", name="uq_labeling_items_text_hash"),
    Index("ix_labeling_items_project_status", "project_pk", "status"),
    # Never reuse a rolled-back sequence number: the near-duplicate index's high-water mark relies on it.
    sqlite_autoincrement=True,
)

annotations = Table(
    "labeling_annotations",
    metadata,
    Column("annotation_id", String(64), primary_key=True),
    Column("project_pk", ForeignKey("labeling_projects.pk", ondelete="CASCADE"), nullable=False),
    Column("item_seq", ForeignKey("labeling_items.seq", ondelete="CASCADE"), nullable=False),
    Column("annotator_id", String(128), nullable=False),
    Column("labels", JSON, nullable=False),
    Column("spans", JSON, nullable=False),
    Column("comment", Text, nullable=False),
    # Chat and preference annotations: the reply, rating, flags, ranking or tie; NULL for classification.
    Column("response", JSON(none_as_null=True), nullable=True),
    Column("schema_version", Integer, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("update_time", UtcDateTime, nullable=False),
    UniqueConstraint("item_seq", "annotator_id", name="uq_labeling_annotations_item_annotator"),
    Index("ix_labeling_annotations_project_annotator", "project_pk", "annotator_id"),
)

skips = Table(
    "labeling_skips",
    metadata,
    Column("item_seq", ForeignKey("labeling_items.seq", ondelete="CASCADE"), primary_key=True),
    Column("annotator_id", String(128), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
)

tasks = Table(
    "labeling_tasks",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("project_pk", ForeignKey("labeling_projects.pk", ondelete="CASCADE"), nullable=False),
    Column("item_seq", ForeignKey("labeling_items.seq", ondelete="CASCADE"), nullable=False, index=True),
    Column("annotator_id", String(128), nullable=False),
    Column("expire_time", UtcDateTime, nullable=False),
    # Set when the annotator submitted or skipped; an open lease past its expire_time is simply ignored.
    Column("closed", Boolean, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Index("ix_labeling_tasks_project_annotator", "project_pk", "annotator_id", "closed"),
)

predictions = Table(
    "labeling_predictions",
    metadata,
    Column("item_seq", ForeignKey("labeling_items.seq", ondelete="CASCADE"), primary_key=True),
    Column("model_name", String(256), primary_key=True),
    Column("model_version", Integer, primary_key=True),
    Column("labels", JSON, nullable=False),
    Column("probabilities", JSON, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
)

dataset_versions = Table(
    "labeling_dataset_versions",
    metadata,
    Column("dataset_version_id", String(64), primary_key=True),
    Column("project_pk", ForeignKey("labeling_projects.pk", ondelete="CASCADE"), nullable=False),
    Column("version_number", Integer, nullable=False),
    Column("content_sha256", String(64), nullable=False, index=True),
    Column("task_type", String(64), nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("label_map", JSON, nullable=False),
    Column("ratios", JSON, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("split_strategy", String(64), nullable=False),
    Column("splits", JSON, nullable=False),
    Column("manifest", JSON, nullable=False),
    Column("description", Text, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    UniqueConstraint("project_pk", "version_number", name="uq_labeling_dataset_versions_number"),
)
