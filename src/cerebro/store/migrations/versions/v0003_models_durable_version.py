"""Schema version 3: ``models.durable_version``, the newest version of a model's training state
written to its state file (its current version, handed from worker to worker in memory, may be
ahead of it). Nullable: models recorded before it have none (their state file was always
current).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("models", sa.Column("durable_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("durable_version")
