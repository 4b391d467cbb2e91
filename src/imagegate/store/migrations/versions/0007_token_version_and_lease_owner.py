"""Revocable tokens and self-healing credit leases.

`users.token_version`: every getToken JWT carries the version it was issued at; disabling a
user, changing its password or revoking its tokens bumps it, so older tokens stop working
(re-enabling a user no longer revives them).

`credit_leases`: one row per open credit lease (accounting/leases.py), written in the
transaction that reserves it and deleted in the one that settles it. Its owner renews
`heartbeat_at` while it lives; any process refunds a lease whose owner stopped renewing it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("token_version", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_table(
        "credit_leases",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("account", sa.String(40), nullable=False),
        sa.Column("granted", sa.BigInteger(), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False, index=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("credit_leases")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("token_version")
