"""The application factory: builds the service from Settings and mounts the dialects."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr, ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.responses import PlainTextResponse, Response

from imagegate import __version__, fastjson, logs, metrics, private, web
from imagegate.accounting.billing import Billing
from imagegate.accounting.leases import LeaseRules
from imagegate.accounting.limits import MemoryLimiter, RateLimiter, RedisLimiter
from imagegate.api import admin, files
from imagegate.api.bodies import JsonBodies
from imagegate.api.dialects import DialectRouting
from imagegate.api.errors import ErrorRenderers, describe_validation, install
from imagegate.api.gemini import routes as gemini
from imagegate.api.lab import routes as lab
from imagegate.api.lab.render import OK as LAB_OK
from imagegate.api.lab.render import task_query_view
from imagegate.api.lab.translate import LAB_HINTS
from imagegate.api.middleware import AllowedHosts, RequestContext
from imagegate.api.nebula import routes as nebula
from imagegate.api.nebula.protocol import ImageGenerationRequest
from imagegate.api.nebula.render import render_error, task_view
from imagegate.api.nebula.translate import to_image_request
from imagegate.api.openai import routes as openai
from imagegate.api.openapi import (
    ADMIN,
    METRICS,
    GeminiErrorResponse,
    NebulaError,
    OpenAIErrorResponse,
    drop_fastapi_422,
    error_responses,
)
from imagegate.api.responses import JSON
from imagegate.auth.service import Authenticator
from imagegate.auth.throttle import LoginThrottle
from imagegate.auth.tokens import TokenIssuer
from imagegate.bounds import Bounds
from imagegate.catalog import Catalog
from imagegate.config import ModelConfig, Settings, load_models
from imagegate.delivery import Delivery
from imagegate.errors import AuthenticationFailed
from imagegate.events.log import EventLog
from imagegate.fetch import Fetcher
from imagegate.images import ImageLoader
from imagegate.memory import tune_allocator
from imagegate.operator import Operator
from imagegate.service import ImageService, Translate
from imagegate.storage import storage_from_settings
from imagegate.storage.signing import UrlSigner
from imagegate.storage.sweep import Sweeper
from imagegate.store.db import create_engine, session_factory, upgrade
from imagegate.store.models import Task
from imagegate.store.usage import UsageWriter
from imagegate.tasks.callbacks import CallbackSender
from imagegate.tasks.events import TaskEvents
from imagegate.tasks.execute import TaskExecutor
from imagegate.tasks.queue import InProcessQueue, QueueSettings
from imagegate.tasks.service import TaskService
from imagegate.tasks.webhooks import WebhookDispatcher
from imagegate.watermark import Watermark
from imagegate.web.session import SessionStore
from imagegate.worker.client import JobClient
from imagegate.worker.remote import remote

logger = logging.getLogger(__name__)


def create_app(settings: Settings, models: list[ModelConfig] | None = None) -> FastAPI:
    """Build the app; `models` overrides the config file (tests pass them explicitly)."""
    settings.check_hosts()
    private.protect(settings)
    # Workers mode: local models run in `imagegate worker` processes, never here (no torch).
    jobs = JobClient(settings) if settings.uses_workers else None
    if jobs is not None:
        settings.check_worker_database()
    configured = load_models(settings) if models is None else models
    catalog = Catalog(configured, settings, remote(jobs) if jobs is not None else None)
    catalog.check_all()
    signer = UrlSigner(settings.signing_key(), settings.url_ttl_seconds)
    storage = storage_from_settings(settings, signer)  # a bad S3 setting fails here, at start

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.tune_allocator:
            tune_allocator()  # in each worker process: this is where it serves
        url = settings.resolved_database_url
        if settings.auto_migrate:
            await upgrade(url)
        engine = create_engine(url)
        sessions = session_factory(engine)
        fetcher = Fetcher.from_settings(settings)
        loader = ImageLoader(settings, fetcher)
        billing = Billing(sessions, settings.credits_per_unit, lease_rules(settings))
        usage = UsageWriter(engine)
        limiter = rate_limiter(settings)
        auth = authenticator(settings, sessions, billing)
        delivery = Delivery(storage)
        sweeper = Sweeper(
            storage,
            ttl_seconds=settings.image_ttl_seconds,
            interval_seconds=settings.sweep_interval_seconds,
        )
        service = image_service(settings, catalog, billing, loader, usage, limiter)
        events = EventLog(engine, redis_url=settings.redis_url, redis_prefix=settings.redis_prefix)
        task_events = TaskEvents(events, delivery, partial(task_data, delivery=delivery))
        events.settle = task_events.settle  # a task that ended without its final event
        queue = task_queue(settings, sessions, service, auth, delivery, fetcher, task_events)
        webhooks = webhook_dispatcher(settings, sessions, queue, events)
        app.state.settings = settings
        app.state.sessions = sessions
        app.state.loader = loader
        app.state.service = service
        app.state.auth = auth
        app.state.delivery = delivery
        app.state.tasks = tasks = TaskService(sessions, service, queue, fetcher, task_events)
        app.state.events = events
        app.state.webhooks = webhooks
        app.state.task_events = task_events
        app.state.engine = engine
        app.state.web_sessions = SessionStore(sessions, auth, settings)
        app.state.operator = Operator(
            sessions, auth=auth, service=service, tasks=tasks, webhooks=webhooks
        )
        if settings.preload_models:
            await catalog.start_all()
        billing.start()
        await events.start()
        if jobs is not None:
            await jobs.start(engine, events)
        await webhooks.start(retry=settings.task_workers > 0)
        await queue.start()
        sweeper.start()
        try:
            yield
        finally:
            await sweeper.close()
            await queue.close()
            await webhooks.close()
            if jobs is not None:
                await jobs.close()
            await events.close()
            await billing.close()
            await usage.close()
            await limiter.close()
            await auth.close()
            await catalog.close()
            await fetcher.aclose()
            await engine.dispose()

    app = FastAPI(title="imagegate", version=__version__, lifespan=lifespan)
    app.state.catalog = catalog
    app.state.jobs = jobs
    renderers = ErrorRenderers(render_error)
    if settings.v1_response_shape == "openai":
        renderers.register("/v1/", openai.render_error)
    renderers.register("/openai/", openai.render_error)
    renderers.register("/v1beta/", gemini.render_error)
    renderers.register("/v1/models/", gemini.render_error)  # Gemini SDKs also call /v1/models/M:...
    install(app, renderers)
    app.add_middleware(JsonBodies)  # inside RequestContext: reads only bodies within the limit
    if settings.allowed_hosts:  # inside DialectRouting: its 400 in the dialect that would answer
        app.add_middleware(AllowedHosts, allowed=settings.allowed_hosts, renderers=renderers)
    app.add_middleware(DialectRouting)  # which dialect answers a shared /v1 path
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes)
    nebula_errors = error_responses(NebulaError)
    app.include_router(nebula.router, responses=nebula_errors)
    app.include_router(lab.router, responses=nebula_errors)
    app.include_router(openai.router, responses=error_responses(OpenAIErrorResponse))
    app.include_router(gemini.router, responses=error_responses(GeminiErrorResponse))
    app.include_router(files.router, responses=error_responses(NebulaError, (403, 404)))
    app.include_router(admin.router, responses=error_responses(NebulaError, ADMIN))
    if settings.console:
        web.install(app, renderers)
    _health(app)
    drop_fastapi_422(app)
    return app


def task_queue(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    service: ImageService,
    auth: Authenticator,
    delivery: Delivery,
    fetcher: Fetcher,
    events: TaskEvents | None = None,
    *,
    in_worker: bool = False,
) -> InProcessQueue:
    """The task queue of a gateway, or (in_worker) of an `imagegate worker`, which polls no
    tasks of its own: it runs the ones it claims as jobs."""
    local = service.catalog.local_models() if settings.uses_workers and not in_worker else None
    return InProcessQueue(
        sessions,
        TaskExecutor(service, auth, delivery, parse_task),
        CallbackSender(
            fetcher,
            settings.callback_key(),
            retry_seconds=settings.callback_retry_seconds,
            sessions=sessions,
            max_attempts=settings.callback_max_attempts,
        ),
        callback_renderer(delivery),
        QueueSettings(
            # Workers mode: the tasks of local models are the workers' to claim.
            exclude_models=local or frozenset(),
            workers=0 if in_worker else settings.task_workers,
            lease_seconds=settings.task_lease_seconds,
            poll_seconds=settings.task_poll_seconds,
            max_attempts=settings.task_max_attempts,
            callback_max_attempts=settings.callback_max_attempts,
        ),
        events,
    )


def callback_renderer(delivery: Delivery) -> Callable[[Task], Awaitable[bytes]]:
    """Renders a finished task as its callback receives it: what a query of it answers."""

    async def render(task: Task) -> bytes:
        msg = LAB_OK if task.dialect == "lab" else "Success"
        data = await task_data(task, delivery=delivery)
        return fastjson.dumps({"code": 200, "msg": msg, "data": data})

    return render


async def task_data(task: Task, *, delivery: Delivery) -> dict[str, Any]:
    """A task as a query of it answers in `data` (the Lab view for Lab tasks): what its
    callback and its `succeeded` event carry. Links are signed for the task's base_url."""
    if task.dialect == "lab":
        return await task_query_view(task, delivery, task.base_url)
    return await task_view(task, delivery, task.base_url)


def parse_task(task: Task) -> tuple[str, Translate]:
    """A stored task's body -> its model and how to translate it (when the worker runs it),
    with the hints of the dialect that submitted it."""
    try:
        body = ImageGenerationRequest.model_validate(task.request)
    except ValidationError as exc:  # the 400 a synchronous call with this body gets
        raise describe_validation(exc.errors()) from None
    hints = LAB_HINTS if task.dialect == "lab" else frozenset()
    return body.model, lambda: to_image_request(body, hints=hints)


def app_from_environment() -> FastAPI:
    """Factory for `imagegate serve --workers N`: each worker reads Settings itself."""
    settings = Settings()
    logs.configure(settings.log_format, settings.log_level, libraries=settings.log_libraries)
    return create_app(settings)


def _health(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"])
    async def healthz() -> Response:
        return JSON({"status": "ok"})

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        """Ready when the database answers, the image store takes images and a model exists."""
        checks = {
            "database": await _database_ok(app),
            "storage": await app.state.delivery.storage.ready(),
            "models": bool(app.state.catalog.models),
        }
        ready = all(checks.values())
        if app.state.jobs is not None:  # informative: a gateway without workers still serves
            checks["workers"] = await _workers(app.state.jobs, app.state.catalog)
        return JSON(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse, responses=METRICS)
    async def prometheus(request: Request) -> Response:
        _check_scraper(app.state.settings.metrics_token, request)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def _workers(jobs: JobClient, catalog: Catalog) -> dict[str, Any]:
    """Per local model: whether a live worker serves it, and how many do."""
    try:
        served = await jobs.served()
    except Exception:
        logger.exception("readiness: cannot read the workers' heartbeats")
        served = {}
    return {
        model: {"served": served.get(model, 0) > 0, "workers": served.get(model, 0)}
        for model in sorted(catalog.local_models())
    }


def _check_scraper(token: SecretStr | None, request: Request) -> None:
    """With IMAGEGATE_METRICS_TOKEN set, /metrics answers only a bearer of that token."""
    if token is None:
        return
    expected = f"Bearer {token.get_secret_value()}".encode()
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, expected):
        raise AuthenticationFailed(
            "GET /metrics needs 'Authorization: Bearer <token>' with the token set in "
            "IMAGEGATE_METRICS_TOKEN."
        )


def webhook_dispatcher(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    queue: InProcessQueue,
    events: EventLog,
) -> WebhookDispatcher:
    """The task webhooks' dispatcher, hooked onto the event log (app and worker alike)."""
    webhooks = WebhookDispatcher(
        sessions,
        queue.callbacks,
        queue.render,
        poll_seconds=max(5.0, settings.task_poll_seconds),
        hold_seconds=2 * settings.fetch_timeout_seconds + 5,
    )
    events.add_hook(webhooks.hook)
    return webhooks


def lease_rules(settings: Settings) -> LeaseRules | None:
    seconds = settings.credit_lease_seconds
    if seconds <= 0:
        return None
    return LeaseRules(
        max_age=seconds, idle=min(1.0, seconds), timeout=settings.credit_lease_timeout_seconds
    )


def rate_limiter(settings: Settings) -> RateLimiter:
    """Shared by every process through Redis when it is set, else this process's own."""
    if settings.redis_url:
        return RedisLimiter(settings.redis_url, f"{settings.redis_prefix}rl:")
    return MemoryLimiter()


def authenticator(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], billing: Billing
) -> Authenticator:
    """The authenticator of a gateway or a worker, from the settings."""
    return Authenticator(
        sessions=sessions,
        tokens=TokenIssuer(settings.signing_key(), settings.jwt_ttl_seconds),
        logins=LoginThrottle.create(
            settings.redis_url,
            prefix=f"{settings.redis_prefix}login:",
            max_failures=settings.login_max_failures,
            window_seconds=settings.login_window_seconds,
        ),
        key_cache_seconds=settings.key_cache_seconds,
        forget_account=billing.forget,
    )


async def _database_ok(app: FastAPI) -> bool:
    try:
        async with app.state.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception:
        logger.exception("readiness: the database does not answer")
        return False
    return True


def image_service(
    settings: Settings,
    catalog: Catalog,
    billing: Billing,
    loader: ImageLoader,
    usage: UsageWriter,
    limiter: RateLimiter,
) -> ImageService:
    """The image service of a gateway or a worker, from the settings."""
    return ImageService(
        catalog=catalog,
        billing=billing,
        loader=loader,
        usage=usage,
        limiter=limiter,
        bounds=Bounds(settings.max_prompt_chars, settings.max_images_per_request),
        watermark=Watermark(
            settings.watermark_text, settings.watermark_position, settings.watermark_opacity
        ),
        log_prompts=settings.log_prompts,
        usage_log=settings.usage_log,
        request_timeout_seconds=settings.request_timeout_seconds,
    )
