"""admin: initial schema

Revision ID: 0001
Revises: None
Create Date: 2026-12-02 14:05:47 UTC
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
        "admin_api_keys",
        sa.Column("ordinal", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("api_key_id", sa.String(length=128), nullable=False),
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("secret_hash", sa.String(length=255), nullable=False),
        sa.Column("secret_prefix", sa.String(length=32), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoke_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rotated_from", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("ordinal"),
        sa.UniqueConstraint("api_key_id"),
    )
    with op.batch_alter_table("admin_api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_admin_api_keys_organization_id"), ["organization_id"], unique=False)

    op.create_table(
        "admin_organizations",
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("organization_id"),
    )
    op.create_table(
        "admin_usage_hourly",
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("api_key_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("hour_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("quantity", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "api_key_id", "kind", "hour_start"),
    )


def downgrade() -> None:
    op.drop_table("admin_usage_hourly")
    op.drop_table("admin_organizations")
    with op.batch_alter_table("admin_api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_admin_api_keys_organization_id"))

    op.drop_table("admin_api_keys")
    with op.batch_alter_table("gristmill_outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gristmill_outbox_published_at"))

    op.drop_table("gristmill_outbox")
    op.drop_table("gristmill_handled_events")
