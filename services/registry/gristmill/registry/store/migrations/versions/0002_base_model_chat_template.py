"""registry: base models record their chat template hash

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 00:35:25 UTC
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Base models imported before this revision read as "no chat template recorded" (""); a NOT NULL column
    # with a server default is a metadata-only change on PostgreSQL 11+ and a table copy on SQLite (batch).
    with op.batch_alter_table("registry_base_models", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("chat_template_sha256", sa.String(length=64), server_default=sa.text("''"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("registry_base_models", schema=None) as batch_op:
        batch_op.drop_column("chat_template_sha256")
