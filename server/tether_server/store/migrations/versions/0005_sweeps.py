"""Sweeps: their reports, the fencing-token floor, and indexes the purges walk.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ENDED = sa.text("ended_at_us IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "sweep_reports",
        sa.Column("sweep_id", sa.String(64), primary_key=True),
        sa.Column("started_at_us", sa.BigInteger, nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("dry_run", sa.Integer, nullable=False),
        sa.Column("replica", sa.String(256), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_index("ix_sweep_reports_started", "sweep_reports", ["started_at_us", "sweep_id"])
    with op.batch_alter_table("revisions") as batch:
        batch.add_column(
            sa.Column("token_floor", sa.BigInteger, nullable=False, server_default="0")
        )
    # Partial: live rows (the heartbeat's and the claim's) never enter these indexes.
    op.create_index(
        "ix_leases_ended",
        "leases",
        ["ended_at_us"],
        postgresql_where=_ENDED,
        sqlite_where=_ENDED,
    )
    op.create_index(
        "ix_sagas_ended",
        "sagas",
        ["ended_at_us"],
        postgresql_where=_ENDED,
        sqlite_where=_ENDED,
    )


def downgrade() -> None:
    op.drop_index("ix_sagas_ended", "sagas")
    op.drop_index("ix_leases_ended", "leases")
    with op.batch_alter_table("revisions") as batch:
        batch.drop_column("token_floor")
    op.drop_index("ix_sweep_reports_started", "sweep_reports")
    op.drop_table("sweep_reports")
