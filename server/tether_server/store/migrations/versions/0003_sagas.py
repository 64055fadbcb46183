"""Sagas: the saga rows, their step logs, compensation records and annotations; event
object ids as long as saga ids.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.alter_column("object_id", type_=sa.String(256), existing_nullable=False)
    op.create_table(
        "sagas",
        sa.Column("namespace", sa.String(63), primary_key=True),
        sa.Column("saga_id", sa.String(256), primary_key=True),
        sa.Column("kind", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("input", sa.Text, nullable=False),
        sa.Column("owner", sa.Text, nullable=True),
        sa.Column("on_stale", sa.String(16), nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("attempt_base", sa.Integer, nullable=False),
        sa.Column("claim_lease_id", sa.String(64), nullable=True),
        sa.Column("claim_token", sa.BigInteger, nullable=True),
        sa.Column("claim_purpose", sa.String(16), nullable=True),
        sa.Column("claim_holder", sa.String(256), nullable=True),
        sa.Column("claim_principal", sa.String(256), nullable=True),
        sa.Column("claim_active", sa.Integer, nullable=False),
        sa.Column("claim_owns_lease", sa.Integer, nullable=False),
        sa.Column("progress", sa.LargeBinary, nullable=False),
        sa.Column("output", sa.Text, nullable=True),
        sa.Column("failure_reason", sa.Text, nullable=False),
        sa.Column("not_before_us", sa.BigInteger, nullable=False),
        sa.Column("deadline_us", sa.BigInteger, nullable=True),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
        sa.Column("updated_at_us", sa.BigInteger, nullable=False),
        sa.Column("ended_at_us", sa.BigInteger, nullable=True),
        sa.Column("create_revision", sa.BigInteger, nullable=False),
        sa.Column("mod_revision", sa.BigInteger, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
    )
    op.create_index("ix_sagas_queue", "sagas", ["namespace", "kind", "state", "created_at_us"])
    op.create_index("ix_sagas_deadline", "sagas", ["state", "deadline_us"])
    op.create_index("ix_sagas_claim", "sagas", ["claim_lease_id"])
    op.create_table(
        "saga_steps",
        sa.Column("namespace", sa.String(63), primary_key=True),
        sa.Column("saga_id", sa.String(256), primary_key=True),
        sa.Column("step_index", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("output", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("compensation", sa.Text, nullable=True),
        sa.Column("started_at_us", sa.BigInteger, nullable=True),
        sa.Column("finished_at_us", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "saga_compensations",
        sa.Column("namespace", sa.String(63), primary_key=True),
        sa.Column("saga_id", sa.String(256), primary_key=True),
        sa.Column("step_index", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("payload", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("updated_at_us", sa.BigInteger, nullable=False),
        sa.Column("marked_by", sa.String(256), nullable=False),
    )
    op.create_table(
        "saga_annotations",
        sa.Column("namespace", sa.String(63), primary_key=True),
        sa.Column("saga_id", sa.String(256), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
        sa.Column("author", sa.String(256), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("attributes", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("saga_annotations")
    op.drop_table("saga_compensations")
    op.drop_table("saga_steps")
    op.drop_index("ix_sagas_claim", "sagas")
    op.drop_index("ix_sagas_deadline", "sagas")
    op.drop_index("ix_sagas_queue", "sagas")
    op.drop_table("sagas")
    with op.batch_alter_table("events") as batch:
        batch.alter_column("object_id", type_=sa.String(64), existing_nullable=False)
