"""The web console: browser sessions, the playground's history, usage by model and time.

`web_sessions`: one row per signed-in browser; `id` is the SHA-256 of the cookie's secret.
`history`: the playground's generations per owner ("user:<id>" | "key:<id>"), newest first.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _when(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.Integer(), nullable=True, index=True),
        sa.Column("user_id", sa.Integer(), nullable=True, index=True),
        sa.Column("token_version", sa.Integer(), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        _when("created_at"),
        _when("last_seen_at"),
    )
    op.create_table(
        "history",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("owner", sa.String(40), nullable=False, index=True),
        sa.Column("task_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        _when("created_at"),
    )
    op.create_index("ix_history_created_at", "history", ["created_at"])
    op.create_index("ix_history_owner_created", "history", ["owner", "created_at"])
    # The console's usage log filtered by a rarely used model reads only its rows.
    op.create_index("ix_usage_model_created_at", "usage", ["model", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_model_created_at", table_name="usage")
    op.drop_table("history")
    op.drop_table("web_sessions")
