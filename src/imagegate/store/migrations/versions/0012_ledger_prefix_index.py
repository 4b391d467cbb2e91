"""An index for finding a task's reservations by the start of their request id.

A retried task refunds what its earlier attempts left reserved: their ledger rows' request
ids start with "<task id>.". PostgreSQL's ordinary index on `ledger.request_id` follows the
database's collation, which a `LIKE 'prefix%'` can only use under the C collation; this index
(varchar_pattern_ops) serves it under any collation. SQLite needs nothing new: the lookup
there is a range on the ordinary index (ledger.refund_open).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_ledger_request_id_prefix"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(
            INDEX, "ledger", ["request_id"], postgresql_ops={"request_id": "varchar_pattern_ops"}
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index(INDEX, table_name="ledger")
