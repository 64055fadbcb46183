"""The index every Acquire counts a principal's active leases with (its live-lease cap).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-20
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACTIVE = sa.text("state = 'ACTIVE'")


def upgrade() -> None:
    # Partial: ended leases, most of the table, never enter it.
    op.create_index(
        "ix_leases_principal_active",
        "leases",
        ["principal", "expires_at_us"],
        postgresql_where=_ACTIVE,
        sqlite_where=_ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("ix_leases_principal_active", "leases")
