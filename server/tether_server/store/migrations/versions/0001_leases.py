"""Leases, lease keys, the lease event log, the revision counter and the replica registry.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "lease_keys",
        sa.Column("namespace", sa.String(63), primary_key=True),
        sa.Column("key", sa.String(512), primary_key=True),
        sa.Column("last_fencing_token", sa.BigInteger, nullable=False),
        sa.Column("available_at_us", sa.BigInteger, nullable=False),
        sa.Column("current_lease_id", sa.String(64), nullable=True),
    )
    op.create_table(
        "leases",
        sa.Column("lease_id", sa.String(64), primary_key=True),
        sa.Column("namespace", sa.String(63), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("holder", sa.String(256), nullable=False),
        sa.Column("principal", sa.String(256), nullable=False),
        sa.Column("ttl_us", sa.BigInteger, nullable=False),
        sa.Column("fencing_token", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("acquired_at_us", sa.BigInteger, nullable=False),
        sa.Column("renewed_at_us", sa.BigInteger, nullable=False),
        sa.Column("expires_at_us", sa.BigInteger, nullable=False),
        sa.Column("ended_at_us", sa.BigInteger, nullable=True),
        sa.Column("lock_delay_us", sa.BigInteger, nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("progress", sa.LargeBinary, nullable=False),
        sa.Column("stream_id", sa.String(64), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("create_revision", sa.BigInteger, nullable=False),
        sa.Column("mod_revision", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("namespace", "key", "fencing_token", name="uq_leases_key_token"),
    )
    op.create_index("ix_leases_state_expires", "leases", ["state", "expires_at_us"])
    op.create_index("ix_leases_holder", "leases", ["namespace", "holder"])
    op.create_index("ix_leases_stream", "leases", ["stream_id"])
    op.create_table(
        "lease_requests",
        sa.Column("namespace", sa.String(63), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("lease_id", sa.String(64), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
    )
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
    revisions = op.create_table(
        "revisions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("current", sa.BigInteger, nullable=False),
        sa.Column("compacted", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(revisions, [{"id": 1, "current": 0, "compacted": 0}])
    op.create_table(
        "replicas",
        sa.Column("instance_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("started_at_us", sa.BigInteger, nullable=False),
        sa.Column("heartbeat_at_us", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_replicas_name", "replicas", ["name"])


def downgrade() -> None:
    op.drop_index("ix_replicas_name", "replicas")
    op.drop_table("replicas")
    op.drop_table("revisions")
    op.drop_table("lease_requests")
    op.drop_index("ix_lease_events_ns_rev", "lease_events")
    op.drop_table("lease_events")
    op.drop_index("ix_leases_stream", "leases")
    op.drop_index("ix_leases_holder", "leases")
    op.drop_index("ix_leases_state_expires", "leases")
    op.drop_table("leases")
    op.drop_table("lease_keys")
