"""Evaluations, their item results, and exports.

Revision ID: 0001
Revises: none
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mergesearch_evaluations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study", sa.String(512), nullable=False),
        sa.Column("trial", sa.Integer, nullable=False),
        sa.Column("split", sa.String(32), nullable=False),
        sa.Column("engine", sa.String(256), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("started", sa.DateTime, nullable=False),
        sa.Column("finished", sa.DateTime, nullable=False),
    )
    op.create_index("ix_mergesearch_evaluations_trial", "mergesearch_evaluations",
                    ["study", "trial"])
    op.create_table(
        "mergesearch_item_results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("evaluation_id", sa.Integer,
                  sa.ForeignKey("mergesearch_evaluations.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("probe", sa.String(256), nullable=False),
        sa.Column("item_id", sa.String(256), nullable=False),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("scores", sa.JSON, nullable=False),
        sa.Column("latency_s", sa.Float, nullable=False),
        sa.UniqueConstraint("evaluation_id", "probe", "item_id"),
    )
    op.create_index("ix_mergesearch_item_results_evaluation_id", "mergesearch_item_results",
                    ["evaluation_id"])
    op.create_table(
        "mergesearch_exports",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study", sa.String(512), nullable=False),
        sa.Column("trial", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("verified", sa.Text, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False),
    )
    op.create_index("ix_mergesearch_exports_trial", "mergesearch_exports", ["study", "trial"])


def downgrade() -> None:
    op.drop_table("mergesearch_exports")
    op.drop_table("mergesearch_item_results")
    op.drop_table("mergesearch_evaluations")
