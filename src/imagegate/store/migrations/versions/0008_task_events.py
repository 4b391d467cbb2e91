"""Task events: the ordered, replayable history of each task (events/log.py).

One row per event of a task: `seq` numbers a task's events 1, 2, 3... (the SSE `id:`), and the
unique (task_id, seq) index is what makes two writers that race for the same number safe (the
loser retries with the next one). `data` is the event's JSON body.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("task_id", "seq", name="uq_task_events_seq"),
    )


def downgrade() -> None:
    op.drop_table("task_events")
