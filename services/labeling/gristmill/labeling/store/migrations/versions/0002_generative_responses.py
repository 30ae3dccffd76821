"""labeling: responses of chat and preference annotations, and reviewers' resolved responses

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 00:40:00 UTC
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable columns with no default: existing rows (classification) read as "no response", and the
    # ALTER is a metadata-only change on PostgreSQL and SQLite alike.
    with op.batch_alter_table("labeling_annotations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("response", sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table("labeling_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("resolved_response", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("labeling_items", schema=None) as batch_op:
        batch_op.drop_column("resolved_response")
    with op.batch_alter_table("labeling_annotations", schema=None) as batch_op:
        batch_op.drop_column("response")
