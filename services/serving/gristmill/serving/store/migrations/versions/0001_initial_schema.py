"""serving: initial schema

Revision ID: 0001
Revises: None
Create Date: 2026-12-02 14:05:52 UTC
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
        "serving_alias_sequences",
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("registered_model_name", sa.String(length=128), nullable=False),
        sa.Column("alias", sa.String(length=128), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "registered_model_name", "alias"),
    )
    op.create_table(
        "serving_deployments",
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("registered_model_name", sa.String(length=128), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "name"),
    )
    with op.batch_alter_table("serving_deployments", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_serving_deployments_registered_model_name"), ["registered_model_name"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("serving_deployments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_serving_deployments_registered_model_name"))

    op.drop_table("serving_deployments")
    op.drop_table("serving_alias_sequences")
    with op.batch_alter_table("gristmill_outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gristmill_outbox_published_at"))

    op.drop_table("gristmill_outbox")
    op.drop_table("gristmill_handled_events")
