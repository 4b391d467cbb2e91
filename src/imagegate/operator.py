"""Every operator action and its rules, in one place.

The admin API, the CLI and the web console call these methods and hold no rule of their own:
an admin keeps an admin (nobody removes the last one), nobody locks out the key or user they
act as, a key's owner must exist, every change is audited with who made it, and a running
server forgets what it cached about the key or user that changed. Errors are imagegate's own
(NotFound, Conflict, InvalidRequest), with the messages the admin API gives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from imagegate import admin_rules as rules
from imagegate.admin_rules import KEY_LIMITS, RATE_LIMITS, Actor
from imagegate.config import Settings, load_models
from imagegate.errors import ConfigError, Conflict, ImagegateError, InvalidRequest, NotFound
from imagegate.store import keys as key_store
from imagegate.store import ledger
from imagegate.store import tasks as task_store
from imagegate.store import users as user_store
from imagegate.store.models import ApiKey, Task, User, WebhookDelivery
from imagegate.types import GenerationResult, ImageRequest, ResolvedRequest

if TYPE_CHECKING:  # the CLI builds an Operator without them: it need not import them
    from imagegate.auth.service import Authenticator
    from imagegate.service import ImageService
    from imagegate.tasks.service import TaskService
    from imagegate.tasks.webhooks import WebhookDispatcher

logger = logging.getLogger(__name__)
T = TypeVar("T")

TEST_PROMPT = "a red circle on a blue background"
"""What a channel test draws: simple enough for any model, easy to judge at a glance."""
TASK_STATUSES = (*(task_store.QUEUED, task_store.IN_PROGRESS), *task_store.FINAL)
MAX_TASKS = 1000
TEST_TIMEOUT = 120.0
"""How long a channel test waits without IMAGEGATE_REQUEST_TIMEOUT_SECONDS (a model that
hangs must not hold the operator's page forever)."""


@dataclass(frozen=True, slots=True)
class ChannelTest:
    """The outcome of one test image through one channel."""

    ok: bool
    latency_ms: float
    image: bytes | None = None
    mime: str | None = None
    error: str | None = None


class Operator:
    """The operator's actions; `auth` (to forget cached keys and users), `service` (models),
    `tasks` (the queue) and `webhooks` are what a server has and the CLI does not."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        auth: Authenticator | None = None,
        service: ImageService | None = None,
        tasks: TaskService | None = None,
        webhooks: WebhookDispatcher | None = None,
    ) -> None:
        self.sessions = sessions
        self.auth = auth
        self.service = service
        self.tasks = tasks
        self.webhooks = webhooks

    # Keys

    async def create_key(
        self,
        actor: Actor,
        *,
        name: str,
        is_admin: bool = False,
        allowed_models: list[str] | None = None,
        username: str | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret (shown once); `username`: the user it belongs to."""
        if not 1 <= len(name) <= 200:
            raise InvalidRequest("A key's name is 1 to 200 characters.", param="name")
        async with self.sessions.begin() as session:
            user_id = None
            if username is not None:
                user = await user_store.find_user(session, username=username)
                if user is None:
                    raise NotFound(f"No user {username!r}: create it first (POST /admin/users).")
                user_id = user.id
            key, secret = await key_store.create_key(
                session,
                name=name,
                is_admin=is_admin,
                allowed_models=allowed_models,
                user_id=user_id,
            )
            detail = {
                "name": name,
                "is_admin": is_admin,
                "allowed_models": allowed_models,
                "user": username,
            }
            await rules.record(session, actor, "key.create", f"key:{key.id}", detail)
        return key, secret

    async def list_keys(self) -> list[ApiKey]:
        async with self.sessions() as session:
            return await key_store.list_keys(session)

    async def revoke_key(self, actor: Actor, key_id: int) -> None:
        if key_id == actor.key_id:
            raise Conflict(
                "This is the key you are using: revoke it with another admin key, or with "
                f"`imagegate keys revoke {key_id}`."
            )
        async with self.sessions.begin() as session:
            key = await session.get(ApiKey, key_id)
            if key is not None and key.is_admin and key.revoked_at is None:
                await rules.keep_an_admin(session, actor, without_key=key_id)
            if not await key_store.revoke_key(session, key_id=key_id):
                raise NotFound(f"No active key with id {key_id}.")
            await rules.record(session, actor, "key.revoke", f"key:{key_id}", None)
        self._forget_key(key_id)

    async def set_key_balance(
        self, actor: Actor, key_id: int, balance: int | None
    ) -> ledger.Account:
        """Credits (None: unlimited)."""
        rules.check_balance(balance)
        async with self.sessions.begin() as session:
            if await session.get(ApiKey, key_id) is None:
                raise rules.no_key(key_id)
            account = await rules.set_balance(
                session, actor, ledger.Account("key", key_id), balance
            )
        self._forget_key(key_id)
        return account

    async def set_key_limits(self, actor: Actor, key_id: int, changes: dict[str, Any]) -> ApiKey:
        """Set the named limits (rpm, ipm, max_concurrency: None for no limit; expires_at;
        allowed_models: None for every model); those left out keep their value."""
        changes = rules.checked_limits(changes, KEY_LIMITS)
        restricts = [name for name, value in changes.items() if value is not None]
        if key_id == actor.key_id and restricts:
            raise Conflict(
                f"This is the key you are using: set {', '.join(restricts)} of it with another "
                "admin key, so that a mistake cannot lock you out."
            )
        async with self.sessions.begin() as session:
            key = await session.get(ApiKey, key_id)
            if key is None:
                raise rules.no_key(key_id)
            if key.is_admin and changes.get("expires_at") is not None:
                await rules.keep_an_admin(session, actor, without_key=key_id)
            for name, value in changes.items():
                setattr(key, name, value)
            await rules.record(
                session, actor, "key.limits", f"key:{key_id}", rules.jsonable(changes)
            )
        self._forget_key(key_id)
        return key

    # Users

    async def create_user(
        self, actor: Actor, *, username: str, password: str, is_admin: bool = False
    ) -> User:
        try:
            async with self.sessions.begin() as session:
                user = await user_store.create_user(
                    session, username=username, password=password, is_admin=is_admin
                )
                detail = {"username": username, "is_admin": is_admin}
                await rules.record(session, actor, "user.create", f"user:{user.id}", detail)
        except user_store.UserExists as exc:
            raise Conflict(str(exc), param="username") from None
        except ValueError as exc:
            param = "password" if "password" in str(exc).lower() else "username"
            raise InvalidRequest(str(exc), param=param) from None
        return user

    async def list_users(self) -> list[User]:
        async with self.sessions() as session:
            return await user_store.list_users(session)

    async def set_user_disabled(self, actor: Actor, username: str, *, disabled: bool) -> User:
        """A disabled user's keys and tokens stop working at once (in this process)."""
        async with self.sessions.begin() as session:
            if disabled:
                user = await rules.find_user(session, username)
                if user.id == actor.user_id:
                    raise Conflict(
                        f"User {username!r} is who you are acting as (your token or key "
                        "belongs to it): disable it with another admin's key."
                    )
                await rules.keep_an_admin(session, actor, without_user=user.id)
            found = await user_store.set_disabled(session, username=username, disabled=disabled)
            if found is None:
                raise rules.no_user(username)
            action = "user.disable" if disabled else "user.enable"
            await rules.record(session, actor, action, f"user:{found.id}", None)
        self._forget_user(found.id)
        return found

    async def revoke_tokens(self, actor: Actor, username: str) -> User:
        """Every getToken token of the user issued so far stops working; its keys do not."""
        async with self.sessions.begin() as session:
            user = await rules.find_user(session, username)
            await user_store.revoke_tokens(session, user)
            await rules.record(session, actor, "user.revoke_tokens", f"user:{user.id}", None)
        self._forget_user(user.id)
        return user

    async def set_password(self, actor: Actor, username: str, password: str) -> User:
        """A new password; the user's tokens issued before it stop working."""
        try:
            async with self.sessions.begin() as session:
                user = await user_store.set_password(session, username=username, password=password)
                if user is None:
                    raise rules.no_user(username)
                await rules.record(session, actor, "user.password", f"user:{user.id}", None)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="password") from None
        self._forget_user(user.id)
        return user

    async def set_user_balance(
        self, actor: Actor, username: str, balance: int | None
    ) -> ledger.Account:
        rules.check_balance(balance)
        async with self.sessions.begin() as session:
            user = await rules.find_user(session, username)
            account = await rules.set_balance(
                session, actor, ledger.Account("user", user.id), balance
            )
        self._forget_user(user.id)
        return account

    async def set_user_limits(self, actor: Actor, username: str, changes: dict[str, Any]) -> User:
        """Set the named rate limits (None: no limit); those left out keep their value."""
        changes = rules.checked_limits(changes, RATE_LIMITS)
        async with self.sessions.begin() as session:
            user = await rules.find_user(session, username)
            for name, value in changes.items():
                setattr(user, name, value)
            await rules.record(session, actor, "user.limits", f"user:{user.id}", changes)
        self._forget_user(user.id)
        return user

    # Models

    async def reload_models(self, actor: Actor, settings: Settings) -> dict[str, list[str]]:
        """Re-read the model config file and serve it without a restart."""
        service = _needs(self.service, "service")
        try:
            changes = await service.catalog.reload(load_models(settings))
        except ConfigError as exc:
            raise InvalidRequest(f"The model config was not reloaded: {exc}") from None
        async with self.sessions.begin() as session:
            await rules.record(session, actor, "models.reload", "catalog", changes)
        return changes

    async def test_channel(self, actor: Actor, model: str, channel: str) -> ChannelTest:
        """Render one small image through exactly this channel of the model, whatever the
        router's order and the channel's breaker, and say how it went. Not charged and not in
        the usage log; audited. The size is the model's default (providers declare no list
        of sizes to take the smallest from)."""
        service = _needs(self.service, "service")
        router = service.catalog.resolve(model).router
        names = [c.name for c in router.channels]
        if channel not in names:
            raise NotFound(
                f"Model {model!r} has no channel {channel!r}; its channels are "
                f"{', '.join(names)} (GET /admin/models)."
            )
        request: ResolvedRequest = ImageRequest(model=model, prompt=TEST_PROMPT, n=1)
        started = time.perf_counter()
        seconds = service.request_timeout_seconds or TEST_TIMEOUT

        async def call() -> GenerationResult:
            async with asyncio.timeout(seconds):
                return await router.attempt_channel(channel, request)

        outcome = await _attempt(call, started, seconds)
        detail = {"ok": outcome.ok, "latency_ms": outcome.latency_ms, "error": outcome.error}
        async with self.sessions.begin() as session:
            await rules.record(session, actor, "channel.test", f"channel:{model}/{channel}", detail)
        return outcome

    # Webhooks and tasks

    async def redeliver_webhook(self, actor: Actor, delivery_id: int) -> WebhookDelivery:
        """Send the delivery again now (the same webhook-id; a new attempt recorded)."""
        row = await _needs(self.webhooks, "webhooks").redeliver(delivery_id)
        async with self.sessions.begin() as session:
            detail = {"status": row.status, "response_status": row.response_status}
            await rules.record(
                session, actor, "webhook.redeliver", f"delivery:{delivery_id}", detail
            )
        return row

    async def list_tasks(
        self, status: str | None, limit: int = 50, before: str | None = None
    ) -> list[Task]:
        """Every owner's tasks, newest first; the next page: `before=<the last id seen>`."""
        if status is not None and status not in TASK_STATUSES:
            raise InvalidRequest(
                f"Unknown task status {status!r}: use one of {', '.join(TASK_STATUSES)}.",
                param="status",
            )
        if not 1 <= limit <= MAX_TASKS:
            raise InvalidRequest(f"limit is 1 to {MAX_TASKS}.", param="limit")
        async with self.sessions() as session:
            return await task_store.list_tasks(session, status=status, limit=limit, before=before)

    async def cancel_task(self, actor: Actor, task_id: str) -> Task:
        """Cancel anyone's queued or running task (409 when it already ended)."""
        tasks = _needs(self.tasks, "tasks")
        await tasks.stop(await self._task(task_id))
        async with self.sessions.begin() as session:
            await rules.record(session, actor, "task.cancel", f"task:{task_id}", None)
        return await self._task(task_id)

    async def retry_task(self, actor: Actor, task_id: str) -> Task:
        """Run a failed task again: queued afresh under the same id (409 unless it failed)."""
        task = await _needs(self.tasks, "tasks").rerun(await self._task(task_id))
        async with self.sessions.begin() as session:
            await rules.record(session, actor, "task.retry", f"task:{task_id}", None)
        return task

    async def _task(self, task_id: str) -> Task:
        async with self.sessions() as session:
            task = await task_store.get_task(session, task_id, None)
        if task is None:
            raise NotFound(f"No task {task_id!r}: list them with GET /admin/tasks.")
        return task

    def _forget_key(self, key_id: int) -> None:
        if self.auth is not None:
            self.auth.forget_key(key_id)

    def _forget_user(self, user_id: int) -> None:
        if self.auth is not None:  # its keys and tokens stop working in this process at once
            self.auth.forget_user(user_id)


def _needs(part: T | None, name: str) -> T:
    if part is None:
        raise RuntimeError(f"this Operator was built without {name} (a server has it)")
    return part


async def _attempt(
    call: Callable[[], Awaitable[GenerationResult]], started: float, seconds: float
) -> ChannelTest:
    """Run a channel call; its failure is the test's outcome, not an error of the request."""
    try:
        result = await call()
    except TimeoutError:
        return ChannelTest(False, _ms_since(started), error=f"No image within {seconds:g} s.")
    except ImagegateError as exc:
        return ChannelTest(False, _ms_since(started), error=exc.message)
    except Exception as exc:
        logger.exception("channel test failed")
        return ChannelTest(False, _ms_since(started), error=f"{type(exc).__name__}: {exc}"[:500])
    latency = _ms_since(started)
    if not result.images:
        return ChannelTest(False, latency, error="The channel answered without an image.")
    image = result.images[0]
    return ChannelTest(True, latency, image=image.data, mime=image.mime)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
