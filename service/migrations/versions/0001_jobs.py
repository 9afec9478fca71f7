"""The job store's first schema: jobs and their reports.

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
    """Create ``jobs`` and ``job_reports`` (see service.jobs.models)."""
    timestamp = sa.DateTime(timezone=True)
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("spec_hash", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("stop_reason", sa.Text(), nullable=True),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("updated_at", timestamp, nullable=False),
        sa.Column("ended_at", timestamp, nullable=True),
        sa.Column("last_report_json", sa.Text(), nullable=True),
        sa.Column("last_report_at", timestamp, nullable=True),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("last_checkpoint_step", sa.BigInteger(), nullable=True),
        sa.Column("last_checkpoint_at", timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_created_at_id", "jobs", ["created_at", "id"])
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_table(
        "job_reports",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("run", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("at", timestamp, nullable=False),
        sa.Column("report_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_job_reports"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_reports_job_id_jobs", ondelete="CASCADE"),
        sa.UniqueConstraint("job_id", "run", "seq", name="uq_job_reports_job_id_run_seq"),
    )
    op.create_index("ix_job_reports_job_id", "job_reports", ["job_id"])


def downgrade() -> None:
    """Drop both tables (and every stored job)."""
    op.drop_table("job_reports")
    op.drop_table("jobs")
