"""Schema version 2: ``hops.unit``, the id of the unit that ran a hop (a unit may hold several
models). Nullable: hops recorded before it have none.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("hops", sa.Column("unit", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("hops") as batch:
        batch.drop_column("unit")
