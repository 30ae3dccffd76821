"""registry: the online gate (feedback per generation, replies per version, rolled-back versions, floors)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 13:40:00 UTC
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "registry_online_feedback",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=255), nullable=False),
        sa.Column("window", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("positive", sa.Boolean(), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["registry_models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "request_id"),
    )
    op.create_index("ix_registry_online_feedback_window", "registry_online_feedback", ["model_id", "window"])
    op.create_table(
        "registry_online_outcomes",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("window", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("succeeded", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["registry_models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "window", "version"),
    )
    # Versions and policies written before this revision: not rolled back, no online gate, no more floors.
    with op.batch_alter_table("registry_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rolled_back_reason", sa.Text(), server_default=sa.text("''"), nullable=False))
    with op.batch_alter_table("registry_promotion_policies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("online_gate", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("min_metrics", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("registry_promotion_policies", schema=None) as batch_op:
        batch_op.drop_column("min_metrics")
        batch_op.drop_column("online_gate")
    with op.batch_alter_table("registry_versions", schema=None) as batch_op:
        batch_op.drop_column("rolled_back_reason")
    op.drop_table("registry_online_outcomes")
    op.drop_index("ix_registry_online_feedback_window", table_name="registry_online_feedback")
    op.drop_table("registry_online_feedback")
