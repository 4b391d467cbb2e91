"""Tables. Schema changes go through Alembic migrations (store/migrations/versions)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import BigInteger


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_utc(moment: datetime | None) -> datetime | None:
    """An aware time in UTC (naive ones are taken as UTC): SQLite keeps the wall-clock part
    only, so every time must be UTC before it is stored or compared."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(100), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    """argon2id hash (PHC string); the password itself is never stored."""
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    balance: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """Credits; None means unlimited. Changed only through store/ledger.py."""
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Requests per minute; None: no limit."""
    ipm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Images per minute (images asked for); None: no limit."""
    max_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Requests in flight at once; None: no limit."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    token_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """getToken JWTs carry the version they were issued at; bumped (so older tokens stop
    working) when the user is disabled, its password changes or an admin revokes its tokens."""


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    """sha256 hex of the secret; the secret itself is shown once and never stored."""
    prefix: Mapped[str] = mapped_column(String(16))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True, index=True)
    """The user the key belongs to: disabling the user stops the key at once."""
    balance: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """Credits; None: the key's user pays (if it has a balance) or nobody (unlimited)."""
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Requests per minute; None: no limit."""
    ipm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Images per minute (images asked for); None: no limit."""
    max_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Requests in flight at once; None: no limit."""
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Usage(Base):
    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_model_created_at", "model", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    task_id: Mapped[str | None] = mapped_column(String(32), nullable=True, unique=True)
    """Set for async tasks: the unique index makes a second charge for one task impossible."""
    model: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(100))
    images: Mapped[int] = mapped_column(Integer, default=0)
    """Images delivered."""
    n_requested: Mapped[int | None] = mapped_column(Integer, nullable=True)
    size: Mapped[str | None] = mapped_column(String(40), nullable=True)
    channel: Mapped[str | None] = mapped_column(String(200), nullable=True)
    overhead_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    error_class: Mapped[str | None] = mapped_column(String(60), nullable=True)
    charge: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """Credits kept for this request (None: nobody was charged)."""
    latency_ms: Mapped[float] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )


class Task(Base):
    """An async generation job. The row is committed before the client hears of the task.

    `status` moves queued -> in_progress -> succeeded | failed | cancelled. A worker holds a task
    through a lease (`lease_owner`, `lease_expires_at`) that it renews while it runs; a task whose
    lease expired (its process died) is claimed again. Only the lease holder can finish a task.
    """

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_tasks_idempotency"),
        Index("ix_tasks_model_status", "model", "status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), default="task", server_default="task")
    """task: an async task (a client's). job: a synchronous request's generation handed to the
    worker tier (worker/): its payload is the resolved request, the gateway that made it
    waits for it and deletes it, and no task list or task lookup ever shows it."""
    owner: Mapped[str] = mapped_column(String(40), index=True)
    """"user:<id>" for a user's keys and tokens, else "key:<id>"."""
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dialect: Mapped[str] = mapped_column(String(16))
    endpoint: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The normalised v1 request body, re-parsed by whichever worker runs the task."""
    base_url: Mapped[str] = mapped_column(String(500))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    run_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    """A queued task is not claimed before this (it waits for its owner's concurrency slot)."""
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    callback_status: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    """pending (to send once the task ends) | delivered | failed; None without a callback_url."""
    callback_attempts: Mapped[int] = mapped_column(Integer, default=0)
    callback_due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    callback_events: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    """Events POSTed to callback_url (tasks/webhooks.py); None: ["completed"] only."""


class LedgerEntry(Base):
    """Every change of a balance: reserve (before a call), settle (after it: the unused part
    of the reservation comes back, `charge` is what was kept), refund (a failed call), set."""

    __tablename__ = "ledger"
    __table_args__ = (
        # A task's reservations by the start of their id, under any collation (migration 0012).
        Index(
            "ix_ledger_request_id_prefix",
            "request_id",
            postgresql_ops={"request_id": "varchar_pattern_ops"},
        ).ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account: Mapped[str] = mapped_column(String(40), index=True)
    """"key:<id>" or "user:<id>"."""
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)
    """Signed change of the balance in credits."""
    charge: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )


class CreditLease(Base):
    """An open credit lease (accounting/leases.py): its `reserve` ledger row has the same id.

    Written in the transaction that reserves the lease, deleted in the one that settles it.
    The owner renews `heartbeat_at`; a lease whose owner stopped renewing it (the process
    died) is refunded by whichever process sees it first (deleting the row decides who)."""

    __tablename__ = "credit_leases"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account: Mapped[str] = mapped_column(String(40))
    granted: Mapped[int] = mapped_column(BigInteger)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    """"<host>:<pid>:<random>" of the process that holds it."""
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEntry(Base):
    """Who changed what through the admin API or CLI, and when."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(100))
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )


class TaskEventRow(Base):
    """One event of a task (events/log.py): `seq` numbers a task's events 1, 2, 3... and is
    the event's public id; the unique (task_id, seq) index settles racing writers."""

    __tablename__ = "task_events"
    __table_args__ = (UniqueConstraint("task_id", "seq", name="uq_task_events_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(Base):
    """One webhook message to a task's callback_url (tasks/webhooks.py) and its attempts.

    `message_id` is the `webhook-id` header, the same on every attempt of the message.
    `status`: pending (being sent or due again at `next_attempt_at`) | delivered | failed.
    `body` is kept for the events before the final one; the final callback is rendered from
    the task at each attempt (its links signed afresh)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(32), index=True)
    event: Mapped[str] = mapped_column(String(16))
    """started | progress | image | completed."""
    event_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """The task event's id (None for the final callback)."""
    message_id: Mapped[str] = mapped_column(String(64), unique=True)
    url: Mapped[str] = mapped_column(Text)
    body: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WebSession(Base):
    """A signed-in browser (web/session.py). `id` is the SHA-256 of the cookie's secret, so a
    copy of this table signs nobody in. Exactly one of `key_id` / `user_id` says who; a user
    session also keeps the user's `token_version`, so a new password or a revoke-tokens ends it."""

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    token_version: Mapped[int] = mapped_column(Integer, default=0)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class HistoryEntry(Base):
    """One generation made in the playground, for its owner's History (store/history.py)."""

    __tablename__ = "history"
    __table_args__ = (Index("ix_history_owner_created", "owner", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(40), index=True)
    task_id: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The request as sent, without image data."""
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )


class WorkerRow(Base):
    """A live `imagegate worker` (worker/): what it serves, renewed every heartbeat. A row
    whose `expires_at` passed belongs to a worker that stopped without saying so."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(100))
    pid: Mapped[int] = mapped_column(Integer)
    models: Mapped[list[str]] = mapped_column(JSON)
    concurrency: Mapped[int] = mapped_column(Integer)
    held: Mapped[int] = mapped_column(Integer, default=0)
    """Jobs and tasks it held at its last heartbeat."""
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
