"""labeling: initial schema

Revision ID: 0001
Revises: None
Create Date: 2026-12-02 14:06:07 UTC
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "gristmill_handled_events",
        sa.Column("group_id", sa.String(length=255), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("group_id", "event_id"),
    )
    op.create_table(
        "gristmill_outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("topic", sa.String(length=255), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("event_type", sa.String(length=255), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    with op.batch_alter_table("gristmill_outbox", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gristmill_outbox_published_at"), ["published_at"], unique=False)

    op.create_table(
        "labeling_projects",
        sa.Column("pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("project_id", sa.String(length=128), nullable=False),
        sa.Column("display_name", sa.String(length=512), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("task_type", sa.String(length=64), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("organization_id", "project_id", name="uq_labeling_projects_org_id"),
    )
    op.create_table(
        "labeling_dataset_versions",
        sa.Column("dataset_version_id", sa.String(length=64), nullable=False),
        sa.Column("project_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("version_number", sa.Integer(), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("task_type", sa.String(length=64), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("label_map", sa.JSON(), nullable=False),
        sa.Column("ratios", sa.JSON(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("split_strategy", sa.String(length=64), nullable=False),
        sa.Column("splits", sa.JSON(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_pk"], ["labeling_projects.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("dataset_version_id"),
        sa.UniqueConstraint("project_pk", "version_number", name="uq_labeling_dataset_versions_number"),
    )
    with op.batch_alter_table("labeling_dataset_versions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_labeling_dataset_versions_content_sha256"), ["content_sha256"], unique=False
        )

    op.create_table(
        "labeling_imports",
        sa.Column("import_id", sa.String(length=64), nullable=False),
        sa.Column("project_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("source_name", sa.String(length=512), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_pk"], ["labeling_projects.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("import_id"),
        sa.UniqueConstraint("project_pk", "request_id", name="uq_labeling_imports_request"),
    )
    with op.batch_alter_table("labeling_imports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_labeling_imports_project_pk"), ["project_pk"], unique=False)

    op.create_table(
        "labeling_items",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("item_id", sa.String(length=64), nullable=False),
        sa.Column("project_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("external_id", sa.String(length=256), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("text_hash", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("import_id", sa.String(length=64), nullable=False),
        sa.Column("near_duplicate_of", sa.String(length=64), nullable=False),
        sa.Column("annotation_count", sa.Integer(), nullable=False),
        sa.Column("consensus_labels", sa.JSON(), nullable=False),
        sa.Column("consensus_agreement", sa.Float(), nullable=False),
        sa.Column("consensus_tied", sa.Boolean(), nullable=False),
        sa.Column("resolved_by", sa.String(length=128), nullable=False),
        sa.Column("resolved_labels", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("resolution_comment", sa.Text(), nullable=False),
        sa.Column("shuffle_key", sa.BigInteger(), nullable=False),
        sa.Column("top_probability", sa.Float(), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_pk"], ["labeling_projects.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("item_id"),
        sa.UniqueConstraint("project_pk", "external_id", name="uq_labeling_items_external_id"),
        sa.UniqueConstraint("project_pk", "text_hash", name="uq_labeling_items_text_hash"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("labeling_items", schema=None) as batch_op:
        batch_op.create_index("ix_labeling_items_project_status", ["project_pk", "status"], unique=False)

    op.create_table(
        "labeling_label_schemas",
        sa.Column("project_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_pk"], ["labeling_projects.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("project_pk", "version"),
    )
    op.create_table(
        "labeling_annotations",
        sa.Column("annotation_id", sa.String(length=64), nullable=False),
        sa.Column("project_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("item_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("annotator_id", sa.String(length=128), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("spans", sa.JSON(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["item_seq"], ["labeling_items.seq"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["project_pk"], ["labeling_projects.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("annotation_id"),
        sa.UniqueConstraint("item_seq", "annotator_id", name="uq_labeling_annotations_item_annotator"),
    )
    with op.batch_alter_table("labeling_annotations", schema=None) as batch_op:
        batch_op.create_index("ix_labeling_annotations_project_annotator", ["project_pk", "annotator_id"], unique=False)

    op.create_table(
        "labeling_predictions",
        sa.Column("item_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("model_name", sa.String(length=256), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["item_seq"], ["labeling_items.seq"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("item_seq", "model_name", "model_version"),
    )
    op.create_table(
        "labeling_skips",
        sa.Column("item_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("annotator_id", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["item_seq"], ["labeling_items.seq"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("item_seq", "annotator_id"),
    )
    op.create_table(
        "labeling_tasks",
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("project_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("item_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("annotator_id", sa.String(length=128), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed", sa.Boolean(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["item_seq"], ["labeling_items.seq"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["project_pk"], ["labeling_projects.pk"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("task_id"),
    )
    with op.batch_alter_table("labeling_tasks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_labeling_tasks_item_seq"), ["item_seq"], unique=False)
        batch_op.create_index(
            "ix_labeling_tasks_project_annotator", ["project_pk", "annotator_id", "closed"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("labeling_tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_labeling_tasks_project_annotator")
        batch_op.drop_index(batch_op.f("ix_labeling_tasks_item_seq"))

    op.drop_table("labeling_tasks")
    op.drop_table("labeling_skips")
    op.drop_table("labeling_predictions")
    with op.batch_alter_table("labeling_annotations", schema=None) as batch_op:
        batch_op.drop_index("ix_labeling_annotations_project_annotator")

    op.drop_table("labeling_annotations")
    op.drop_table("labeling_label_schemas")
    with op.batch_alter_table("labeling_items", schema=None) as batch_op:
        batch_op.drop_index("ix_labeling_items_project_status")

    op.drop_table("labeling_items")
    with op.batch_alter_table("labeling_imports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_labeling_imports_project_pk"))

    op.drop_table("labeling_imports")
    with op.batch_alter_table("labeling_dataset_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_labeling_dataset_versions_content_sha256"))

    op.drop_table("labeling_dataset_versions")
    op.drop_table("labeling_projects")
    with op.batch_alter_table("gristmill_outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gristmill_outbox_published_at"))

    op.drop_table("gristmill_outbox")
    op.drop_table("gristmill_handled_events")
