"""Rate limits of keys and users, and key expiry.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIMITS = ("rpm", "ipm", "max_concurrency")


def upgrade() -> None:
    for table in ("api_keys", "users"):
        with op.batch_alter_table(table) as batch:
            for name in LIMITS:
                batch.add_column(sa.Column(name, sa.Integer(), nullable=True))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("expires_at")
    for table in ("users", "api_keys"):
        with op.batch_alter_table(table) as batch:
            for name in LIMITS:
                batch.drop_column(name)
