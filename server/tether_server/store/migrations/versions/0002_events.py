"""One event log for every area: ``lease_events`` becomes ``events`` with an area column.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("area", sa.String(16), nullable=False),
        sa.Column("namespace", sa.String(63), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("object_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("occurred_at_us", sa.BigInteger, nullable=False),
        sa.Column("snapshot", sa.Text, nullable=False),
    )
    op.create_index("ix_events_area_ns_rev", "events", ["area", "namespace", "revision"])
    op.execute(
        "INSERT INTO events (revision, area, namespace, key, object_id, type, occurred_at_us,"
        " snapshot) SELECT revision, 'lease', namespace, key, lease_id, type, occurred_at_us,"
        " snapshot FROM lease_events"
    )
    op.drop_index("ix_lease_events_ns_rev", "lease_events")
    op.drop_table("lease_events")


def downgrade() -> None:
    op.create_table(
        "lease_events",
        sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("namespace", sa.String(63), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("lease_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("occurred_at_us", sa.BigInteger, nullable=False),
        sa.Column("snapshot", sa.Text, nullable=False),
    )
    op.create_index("ix_lease_events_ns_rev", "lease_events", ["namespace", "revision"])
    op.execute(
        "INSERT INTO lease_events SELECT revision, namespace, key, object_id, type,"
        " occurred_at_us, snapshot FROM events WHERE area = 'lease'"
    )
    op.drop_index("ix_events_area_ns_rev", "events")
    op.drop_table("events")
