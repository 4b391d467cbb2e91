"""`imagegate worker`: one process per GPU that loads its local models once and runs their
jobs and tasks, claimed from the PostgreSQL the gateways share (worker/runtime.py)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import secrets
import signal
import socket

from prometheus_client import start_http_server

from imagegate import metrics
from imagegate.catalog import Catalog
from imagegate.config import ModelConfig, Settings, load_models
from imagegate.errors import ConfigError
from imagegate.providers.registry import is_local
from imagegate.providers.runner import wait_stopped
from imagegate.store.db import upgrade
from imagegate.worker.runtime import Worker
from imagegate.worker.stack import build

logger = logging.getLogger(__name__)
DEFAULT_CONCURRENCY = 4
"""Jobs held at once when no model of the worker says its batch size."""


def served_models(settings: Settings, wanted: list[str]) -> list[ModelConfig]:
    """The configured local models this worker serves: `wanted`, else all of them."""
    configured = load_models(settings)
    local = {m.name: m for m in configured if any(map(is_local, m.providers))}
    if not wanted:
        if not local:
            raise ConfigError(
                "No local model to serve: the model config has no `provider: diffusers` model. "
                "Add one to imagegate.yaml (IMAGEGATE_CONFIG_FILE), or install the local extra "
                "for the demo model: pip install 'imagegate[local]'."
            )
        return list(local.values())
    unknown = [name for name in wanted if name not in local]
    if unknown:
        known = ", ".join(sorted(local)) or "none"
        raise ConfigError(
            f"Cannot serve {', '.join(unknown)}: a worker serves local models of the model "
            f"config (IMAGEGATE_CONFIG_FILE), and those are: {known}."
        )
    return [local[name] for name in wanted]


def run(settings: Settings, models: list[ModelConfig], concurrency: int) -> None:
    """Serve until SIGTERM or SIGINT (then drain); raises ConfigError before doing anything
    when the settings cannot work."""
    settings.check_worker_database()
    # Nothing here forks; should a library start processes, they must not fork a process that
    # holds CUDA state.
    multiprocessing.set_start_method("spawn", force=True)
    asyncio.run(_serve(settings, models, concurrency))


async def _serve(settings: Settings, models: list[ModelConfig], concurrency: int) -> None:
    if settings.auto_migrate:
        await upgrade(settings.resolved_database_url)
    worker_id = f"{socket.gethostname()[:30]}:{os.getpid()}:{secrets.token_hex(4)}"
    stack = build(settings, models, worker_id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        _serve_metrics(settings)  # before loading models: a taken port fails at once
        await stack.start()
        held = concurrency or _batch_size(stack.catalog, [m.name for m in models])
        await Worker(stack, [m.name for m in models], held).serve(stop)
    finally:
        await stack.close()
        await asyncio.to_thread(wait_stopped, 30.0)  # a batch still stepping, then exit
    logger.info("worker %s: stopped", worker_id)


def _batch_size(catalog: Catalog, models: list[str]) -> int:
    """The largest batch a model of this worker runs: one claim can fill it."""
    sizes = []
    for name in models:
        router = catalog.resolve(name).router
        sizes += [getattr(c.provider, "max_batch", 0) for c in router.channels]
    return max([s for s in sizes if isinstance(s, int) and s > 0], default=DEFAULT_CONCURRENCY)


def _serve_metrics(settings: Settings) -> None:
    port = settings.worker_metrics_port
    if not port:
        return
    host = settings.worker_metrics_host
    try:
        start_http_server(port, addr=host, registry=metrics.REGISTRY)
    except OSError as exc:
        raise ConfigError(
            f"Cannot serve worker metrics on {host}:{port} ({exc.strerror}): choose another "
            "port with --metrics-port (IMAGEGATE_WORKER_METRICS_PORT), or 0 for none."
        ) from exc
    logger.info("metrics on http://%s:%d/metrics", host, port)
