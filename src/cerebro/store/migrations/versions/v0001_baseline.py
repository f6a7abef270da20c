"""Schema version 1, the baseline: the records as Cerebro wrote them before they had versions
(unchanged since commit 1f9c0c9). Frozen: later changes are later revisions.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
    )
    op.create_table(
        "models",
        sa.Column("experiment_id", sa.Integer(), primary_key=True),
        sa.Column("model_id", sa.Integer(), primary_key=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("updated", sa.Float(), nullable=False),
        sa.Column("origin", sa.String(20), nullable=False),
        sa.Column("parent", sa.Integer()),
        sa.Column("max_epochs", sa.Integer()),
    )
    op.create_table(
        "epochs",
        sa.Column("experiment_id", sa.Integer(), primary_key=True),
        sa.Column("model_id", sa.Integer(), primary_key=True),
        sa.Column("epoch", sa.Integer(), primary_key=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("finished", sa.Float(), nullable=False),
    )
    op.create_table(
        "hops",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("worker", sa.Integer(), nullable=False),
        sa.Column("start", sa.Float(), nullable=False),
        sa.Column("end", sa.Float(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("load_s", sa.Float(), nullable=False),
        sa.Column("save_s", sa.Float()),
        sa.Column("metrics", sa.JSON(), nullable=False),
    )
    op.create_index("ix_hops_experiment_id", "hops", ["experiment_id"])
    op.create_table(
        "checkpoints",
        sa.Column("experiment_id", sa.Integer(), primary_key=True),
        sa.Column("model_id", sa.Integer(), primary_key=True),
        sa.Column("epoch", sa.Integer(), primary_key=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("pruned", sa.Integer(), nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
    )
    op.create_index("ix_events_experiment_id", "events", ["experiment_id"])
    op.create_table(
        "controls",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("requested", sa.Float(), nullable=False),
        sa.Column("who", sa.String(200), nullable=False),
        sa.Column("op", sa.String(20), nullable=False),
        sa.Column("model_id", sa.Integer()),
        sa.Column("params", sa.JSON()),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("settled", sa.Float()),
        sa.Column("outcome", sa.JSON()),
        sa.Column("error", sa.Text()),
    )
    op.create_index("ix_controls_experiment_id", "controls", ["experiment_id"])


def downgrade() -> None:
    for table in ("controls", "events", "checkpoints", "hops", "epochs", "models", "experiments"):
        op.drop_table(table)
