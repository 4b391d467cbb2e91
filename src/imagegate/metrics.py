"""Prometheus metrics (GET /metrics). One registry per process; with `serve --workers N` each
worker answers with its own counts (scrape each, or run one worker per container)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
QUEUE_DEPTH = Gauge(
    "imagegate_task_queue_depth", "Async tasks waiting to start.", registry=REGISTRY
)
QUEUE_AGE = Gauge(
    "imagegate_task_queue_oldest_seconds",
    "Age of the oldest task waiting to start (0 when none waits).",
    registry=REGISTRY,
)


def dialect_of(endpoint: str) -> str:
    """ "v1.images.generations" -> "v1", "lab.img2imgSubmit" -> "lab"."""
    return endpoint.split(".", 1)[0]
