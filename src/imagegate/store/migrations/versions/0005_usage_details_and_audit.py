"""Usage details (n asked, size, channel, overhead, error class) and the audit table.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

USAGE_COLUMNS = (
    ("n_requested", sa.Integer()),
    ("size", sa.String(40)),
    ("channel", sa.String(200)),
    ("overhead_ms", sa.Float()),
    ("error_class", sa.String(60)),
)


def upgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        for name, kind in USAGE_COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("action", sa.String(100), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_audit_created_at", "audit", ["created_at"])


def downgrade() -> None:
    op.drop_table("audit")
    with op.batch_alter_table("usage") as batch:
        for name, _ in reversed(USAGE_COLUMNS):
            batch.drop_column(name)
