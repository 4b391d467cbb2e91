"""What an `imagegate worker` process runs with: its local models (loaded here, once), and,
for the async tasks it claims, the same service a gateway runs them with (owner checks,
limits, reservation and settlement, delivery into the shared image store, task events), so a
task finishes on a worker exactly as it would on a gateway.

Built like the app's lifespan (app.py) minus everything HTTP: no dialects, no sweeper, no
callback loop (gateways send the final callbacks of every task, wherever it ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from imagegate.accounting.billing import Billing
from imagegate.accounting.limits import RateLimiter
from imagegate.app import (
    authenticator,
    image_service,
    lease_rules,
    rate_limiter,
    task_data,
    task_queue,
    webhook_dispatcher,
)
from imagegate.auth.service import Authenticator
from imagegate.catalog import Catalog
from imagegate.config import ModelConfig, Settings
from imagegate.delivery import Delivery
from imagegate.events.log import EventLog
from imagegate.fetch import Fetcher
from imagegate.images import ImageLoader
from imagegate.service import ImageService
from imagegate.storage import storage_from_settings
from imagegate.storage.signing import UrlSigner
from imagegate.store.db import create_engine, session_factory
from imagegate.store.usage import UsageWriter
from imagegate.tasks.events import TaskEvents
from imagegate.tasks.queue import InProcessQueue
from imagegate.tasks.webhooks import WebhookDispatcher


@dataclass
class Stack:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    catalog: Catalog
    fetcher: Fetcher
    billing: Billing
    usage: UsageWriter
    limiter: RateLimiter
    auth: Authenticator
    service: ImageService
    events: EventLog
    task_events: TaskEvents
    queue: InProcessQueue
    """Runs the tasks this worker claims (no loops of its own: the worker claims)."""
    webhooks: WebhookDispatcher

    async def start(self) -> None:
        await self.catalog.start_all()  # load every pipeline before saying we serve it
        self.billing.start()
        await self.events.start()
        await self.webhooks.start(retry=False)  # the gateways retry failed deliveries

    async def close(self) -> None:
        await self.webhooks.close()
        await self.events.close()
        await self.billing.close()
        await self.usage.close()
        await self.limiter.close()
        await self.auth.close()
        await self.catalog.close()
        await self.fetcher.aclose()
        await self.engine.dispose()


def build(settings: Settings, models: list[ModelConfig], worker_id: str) -> Stack:
    """Everything, unstarted (no I/O yet); the queue's lease owner is `worker_id`."""
    engine = create_engine(settings.resolved_database_url)
    sessions = session_factory(engine)
    catalog = Catalog(models, settings)
    catalog.check_all()
    fetcher = Fetcher.from_settings(settings)
    billing = Billing(sessions, settings.credits_per_unit, lease_rules(settings))
    limiter = rate_limiter(settings)
    signer = UrlSigner(settings.signing_key(), settings.url_ttl_seconds)
    delivery = Delivery(storage_from_settings(settings, signer))
    auth = authenticator(settings, sessions, billing)
    usage = UsageWriter(engine)
    service = image_service(
        settings, catalog, billing, ImageLoader(settings, fetcher), usage, limiter
    )
    events = EventLog(engine, redis_url=settings.redis_url, redis_prefix=settings.redis_prefix)
    task_events = TaskEvents(events, delivery, partial(task_data, delivery=delivery))
    events.settle = task_events.settle
    queue = task_queue(
        settings, sessions, service, auth, delivery, fetcher, task_events, in_worker=True
    )
    queue.worker_id = worker_id
    webhooks = webhook_dispatcher(settings, sessions, queue, events)
    return Stack(
        settings,
        engine,
        sessions,
        catalog,
        fetcher,
        billing,
        usage,
        limiter,
        auth,
        service,
        events,
        task_events,
        queue,
        webhooks,
    )
