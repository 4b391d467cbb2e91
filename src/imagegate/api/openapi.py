"""What /openapi.json says about errors: each dialect's error body under each status it can answer.

FastAPI documents only the success body and its own 422 validation error, which imagegate
never sends (validation errors are 400s in the dialect's shape, see api/errors.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from imagegate.api.gemini import protocol as gemini
from imagegate.api.openai import protocol as openai


class NebulaError(BaseModel):
    """The Nebula v1 and Lab v4 error envelope."""

    code: int
    """The HTTP status."""
    msg: str
    """What was wrong and how to fix it."""
    data: None = None


class OpenAIErrorResponse(openai.ErrorResponse):
    """OpenAI's error body (/openai/...)."""


class GeminiErrorResponse(gemini.ErrorResponse):
    """Google's error body (/v1beta/..., /v1/models/...)."""


Responses = dict[int | str, dict[str, Any]]
"""FastAPI's `responses=`: status -> what the schema says about it."""
_STATUSES = {
    400: "Invalid request: a parameter is missing, malformed or not supported by the model "
    "(the message names it).",
    401: "No API key or token, or an invalid one.",
    403: "The key may not use this model or endpoint, or the balance does not cover the request.",
    404: "Unknown model, task or endpoint.",
    409: "The request conflicts with the current state (e.g. an Idempotency-Key reused for "
    "another body, a name taken).",
    413: "The request body or an image is larger than the server accepts.",
    422: "A reference image could not be decoded.",
    429: "A rate or concurrency limit was reached; Retry-After says when to retry.",
}
GENERATION = tuple(_STATUSES)
ADMIN = (400, 401, 403, 404, 409)


def error_responses(body: type[BaseModel], statuses: tuple[int, ...] = GENERATION) -> Responses:
    """The `responses=` of a router whose errors render as `body`."""
    return {status: {"model": body, "description": _STATUSES[status]} for status in statuses}


METRICS: Responses = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
    401: {"model": NebulaError, "description": "IMAGEGATE_METRICS_TOKEN is set: send it."},
}
"""GET /metrics: Prometheus' text format, or 401 without the token."""
CSV: Responses = {200: {"content": {"text/csv": {"schema": {"type": "string"}}}}}
"""An endpoint that answers CSV as well as JSON (`format=csv`)."""


def drop_fastapi_422(app: FastAPI) -> None:
    """FastAPI documents a 422 with its own body on every route that has parameters; imagegate
    answers invalid parameters with a 400 in the dialect's shape, so those 422s go."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = build()
        if fresh:
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    answers = operation.get("responses", {})
                    if "HTTPValidationError" in str(answers.get("422", "")):
                        del answers["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
