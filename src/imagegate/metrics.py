"""Prometheus metrics (GET /metrics).

Label values come only from the configuration and the code: a model or dialect name a client
made up is counted as `other`, so no caller can add series (or megabytes to every scrape).

One process: one registry in memory. With `serve --workers N` the workers share their counts
through files in a folder (prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR,
set by `serve` before the workers start), and every worker answers /metrics with the sum.
"""

from __future__ import annotations

import os
from collections.abc import Container

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"
"""The label value of every name that is not configured."""
DIALECTS = frozenset({"v1", "lab", "openai", "gemini"})

REGISTRY = CollectorRegistry(auto_describe=True)
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_MILLISECONDS = (0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000)

REQUESTS = Counter(
    "imagegate_requests",
    "Generation requests by dialect, model and HTTP status.",
    ["dialect", "model", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "imagegate_request_seconds",
    "Time to answer a generation request, by dialect and model.",
    ["dialect", "model"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
OVERHEAD = Histogram(
    "imagegate_overhead_milliseconds",
    "Time spent in the gateway itself (the request minus the time waiting on models).",
    buckets=_MILLISECONDS,
    registry=REGISTRY,
)
IMAGES = Counter(
    "imagegate_images_generated", "Images delivered, by model.", ["model"], registry=REGISTRY
)
PROVIDER_ERRORS = Counter(
    "imagegate_provider_errors",
    "Failed upstream attempts, by channel and HTTP status of the error.",
    ["channel", "status"],
    registry=REGISTRY,
)
BALANCE_REJECTIONS = Counter(
    "imagegate_balance_rejections",
    "Requests refused for insufficient balance.",
    registry=REGISTRY,
)
RATE_LIMIT_REJECTIONS = Counter(
    "imagegate_rate_limit_rejections",
    "Requests refused by a rate limit.",
    registry=REGISTRY,
)
# Read from the database by every worker alike: across workers, the largest is the answer.
QUEUE_DEPTH = Gauge(
    "imagegate_task_queue_depth",
    "Async tasks waiting to start.",
    registry=REGISTRY,
    multiprocess_mode="max",
)
QUEUE_AGE = Gauge(
    "imagegate_task_queue_oldest_seconds",
    "Age of the oldest task waiting to start (0 when none waits).",
    registry=REGISTRY,
    multiprocess_mode="max",
)

# Local models (providers/runner.py), wherever they run: in `serve` (inline) or in a worker.
LOCAL_BATCH_IMAGES = Histogram(
    "imagegate_local_batch_images",
    "Images per pipeline call of a local model (dynamic batching at work).",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
    registry=REGISTRY,
)
LOCAL_STEP_SECONDS = Histogram(
    "imagegate_local_step_seconds",
    "Seconds per denoising step of a local model's pipeline call (the whole batch).",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
# The worker tier (`imagegate worker`, served on its own port).
WORKER_QUEUE_WAIT = Histogram(
    "imagegate_worker_queue_wait_seconds",
    "From a job or task queued (or due again) to a worker claiming it, by model.",
    ["model"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
WORKER_FINISHED = Counter(
    "imagegate_worker_finished",
    "Jobs (synchronous requests) and tasks a worker ran to an end, by model and kind.",
    ["model", "kind"],
    registry=REGISTRY,
)
WORKER_HELD = Gauge(
    "imagegate_worker_held",
    "Jobs and tasks the worker holds now (claimed, not yet ended).",
    registry=REGISTRY,
)
WORKER_QUEUED = Gauge(
    "imagegate_worker_queued",
    "Jobs and tasks waiting for a worker, by model (read from the database).",
    ["model"],
    registry=REGISTRY,
)
GPU_MEMORY = Gauge(
    "imagegate_gpu_memory_bytes",
    "CUDA memory of the worker process, by device and kind (allocated, reserved).",
    ["device", "kind"],
    registry=REGISTRY,
)


def exposition() -> bytes:
    """The text /metrics answers: this process's registry, or all workers' sums."""
    folder = os.environ.get(MULTIPROCESS_ENV)
    if not folder:
        return generate_latest(REGISTRY)
    shared = CollectorRegistry()
    MultiProcessCollector(shared, path=folder)  # type: ignore[no-untyped-call]
    return generate_latest(shared)


def dialect_of(endpoint: str) -> str:
    """ "v1.images.generations" -> "v1", "lab.img2imgSubmit" -> "lab"."""
    dialect = endpoint.split(".", 1)[0]
    return dialect if dialect in DIALECTS else OTHER


def known(name: str, names: Container[str]) -> str:
    """`name` as a label value: itself when configured, else `other`."""
    return name if name in names else OTHER
