"""The worker tier: jobs beside tasks, and the workers' heartbeats.

`tasks.kind`: "task" (a client's async task, as before) or "job" (a synchronous request's
generation handed to an `imagegate worker`; hidden from every task list and lookup).
`ix_tasks_model_status`: workers claim by model, and KEDA counts queued jobs per model.
`workers`: one row per live worker, its models, renewed every heartbeat.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-14
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(8), nullable=False, server_default="task"),
        )
    op.create_index("ix_tasks_model_status", "tasks", ["model", "status"])
    op.create_table(
        "workers",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(100), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("held", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("ix_tasks_model_status", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("kind")
