"""Objects, their owner index and the collector's queue.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "objects",
        sa.Column("uid", sa.String(64), primary_key=True),
        sa.Column("namespace", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(63), nullable=False),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("annotations", sa.Text, nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("owner_refs", sa.Text, nullable=False),
        sa.Column("finalizers", sa.Text, nullable=False),
        sa.Column("refusals", sa.Text, nullable=False),
        sa.Column("history", sa.Text, nullable=False),
        sa.Column("deletion_ts_us", sa.BigInteger, nullable=True),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
        sa.Column("create_revision", sa.BigInteger, nullable=False),
        sa.Column("mod_revision", sa.BigInteger, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.UniqueConstraint("namespace", "kind", "name", name="uq_objects_name"),
    )
    op.create_index("ix_objects_terminating", "objects", ["namespace", "deletion_ts_us"])
    op.create_table(
        "object_owners",
        sa.Column("dependent_uid", sa.String(64), primary_key=True),
        sa.Column("owner_uid", sa.String(256), primary_key=True),
        sa.Column("namespace", sa.String(63), nullable=False),
        sa.Column("owner_kind", sa.String(63), nullable=False),
        sa.Column("block_owner_deletion", sa.Integer, nullable=False),
    )
    op.create_index("ix_object_owners_owner", "object_owners", ["owner_uid", "dependent_uid"])
    op.create_table(
        "gc_queue",
        sa.Column("namespace", sa.String(63), primary_key=True),
        sa.Column("uid", sa.String(256), primary_key=True),
        sa.Column("enqueued_at_us", sa.BigInteger, nullable=False),
        sa.Column("next_attempt_us", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=False),
    )
    op.create_index("ix_gc_queue_next", "gc_queue", ["next_attempt_us"])


def downgrade() -> None:
    op.drop_table("gc_queue")
    op.drop_table("object_owners")
    op.drop_table("objects")
