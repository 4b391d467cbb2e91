"""Webhook deliveries in the database: one row per message, updated after each attempt.

A row is opened before the first attempt (or found again: `message_id` is unique, so a retry
after a crash, or two senders racing, share one row and one `webhook-id`). Retries of the
events before the final one are claimed like tasks: a conditional UPDATE of `next_attempt_at`
decides which process sends one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from imagegate.store.db import AsyncSession
from imagegate.store.models import Task, WebhookDelivery, utcnow

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
STATUSES = (PENDING, DELIVERED, FAILED)
COMPLETED = "completed"
"""The event name of the final callback (the task succeeded, failed or was cancelled)."""


@dataclass(frozen=True, slots=True)
class NewDelivery:
    task_id: str
    event: str
    event_id: int | None
    message_id: str
    url: str
    body: str | None = None
    hold_seconds: float = 60.0
    """Until then no other process retries it: the first attempt is this process's."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt got: the receiver's status code, or the error that stopped it."""

    response_status: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.response_status is not None and 200 <= self.response_status < 300


async def open_delivery(session: AsyncSession, new: NewDelivery) -> WebhookDelivery:
    """The message's row, inserted pending on its first attempt."""
    found = await _by_message(session, new.message_id)
    if found is not None:
        return found
    row = WebhookDelivery(
        task_id=new.task_id,
        event=new.event,
        event_id=new.event_id,
        message_id=new.message_id,
        url=new.url,
        body=new.body,
        status=PENDING,
        attempts=0,
        created_at=utcnow(),
        next_attempt_at=utcnow() + timedelta(seconds=new.hold_seconds),
    )
    session.add(row)
    try:
        await session.commit()
    except IntegrityError:  # another sender opened it first: share its row
        await session.rollback()
        found = await _by_message(session, new.message_id)
        if found is None:
            raise
        return found
    return row


async def _by_message(session: AsyncSession, message_id: str) -> WebhookDelivery | None:
    return await session.scalar(
        select(WebhookDelivery).where(WebhookDelivery.message_id == message_id)
    )


async def record_attempt(
    session: AsyncSession, delivery_id: int, attempt: Attempt, *, retry_in: float | None
) -> None:
    """After one attempt: delivered, due again after `retry_in` seconds, or failed (None)."""
    now = utcnow()
    values: dict[str, Any] = {
        "attempts": WebhookDelivery.attempts + 1,
        "response_status": attempt.response_status,
        "last_error": attempt.error,
        "last_attempt_at": now,
        "next_attempt_at": None,
    }
    if attempt.delivered:
        values["status"] = DELIVERED
    elif retry_in is None:
        values["status"] = FAILED
    else:
        values["status"] = PENDING
        values["next_attempt_at"] = now + timedelta(seconds=retry_in)
    await session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values)
    )
    await session.commit()


async def claim_retry(session: AsyncSession, hold_seconds: float) -> WebhookDelivery | None:
    """A pending delivery of an event before the final one whose retry is due, held for
    `hold_seconds` against other senders; None when none is due. (The final callback is
    retried by the task queue, from the task row.)"""
    now = utcnow()
    due = (
        (WebhookDelivery.status == PENDING)
        & (WebhookDelivery.event != COMPLETED)
        & (WebhookDelivery.next_attempt_at <= now)
    )
    candidate = await session.scalar(
        select(WebhookDelivery.id).where(due).order_by(WebhookDelivery.next_attempt_at).limit(1)
    )
    if candidate is None:
        return None
    held = await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == candidate, due)
        .values(next_attempt_at=now + timedelta(seconds=hold_seconds))
    )
    await session.commit()
    if int(getattr(held, "rowcount", 0)) != 1:
        return None
    return await session.get(WebhookDelivery, candidate, populate_existing=True)


async def next_retry_at(session: AsyncSession) -> datetime | None:
    """When the earliest pending retry (of an event before the final one) is due."""
    return await session.scalar(
        select(func.min(WebhookDelivery.next_attempt_at)).where(
            WebhookDelivery.status == PENDING, WebhookDelivery.event != COMPLETED
        )
    )


async def get_delivery(session: AsyncSession, delivery_id: int) -> WebhookDelivery | None:
    return await session.get(WebhookDelivery, delivery_id, populate_existing=True)


async def list_deliveries(
    session: AsyncSession,
    *,
    task_id: str | None = None,
    status: str | None = None,
    before: int | None = None,
    limit: int = 100,
) -> list[WebhookDelivery]:
    """Newest first; `before`: only rows with a smaller id (the next page)."""
    query = select(WebhookDelivery).order_by(WebhookDelivery.id.desc()).limit(limit)
    if task_id is not None:
        query = query.where(WebhookDelivery.task_id == task_id)
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if before is not None:
        query = query.where(WebhookDelivery.id < before)
    return list(await session.scalars(query))


async def mark_callback_delivered(session: AsyncSession, task_id: str) -> None:
    """A final callback redelivered by hand reached its receiver: the queue stops retrying."""
    await session.execute(
        update(Task)
        .where(Task.id == task_id, Task.callback_status.in_(("pending", FAILED)))
        .values(callback_status=DELIVERED)
    )
    await session.commit()
