"""Nebula v1 bodies: the {code,msg,data} envelope, or the bare OpenAI shape when configured."""

from __future__ import annotations

import time
from typing import Any, Literal

from starlette.responses import Response

from imagegate.api.responses import JSON
from imagegate.api.tasks import epoch
from imagegate.config import ModelConfig
from imagegate.delivery import DeliveredImage, Delivery
from imagegate.errors import ImagegateError
from imagegate.store.models import Task
from imagegate.store.tasks import SUCCEEDED


def render_images(
    images: list[DeliveredImage], shape: Literal["nebula", "openai"], channel: str = ""
) -> Response:
    created = int(time.time())
    if shape == "openai":
        items = [_openai_item(i) for i in images]
        return JSON({"created": created, "data": items}, headers=channel_header(channel))
    # All three keys are always present; the unused one is "" (reference/nebula-api.md §3.2).
    items = [_nebula_item(i) for i in images]
    body = {"code": 200, "msg": "Success", "data": {"data": items, "created": created}}
    return JSON(body, headers=channel_header(channel))


def _nebula_item(image: DeliveredImage) -> dict[str, str]:
    return {"url": image.url, "b64_json": image.b64_json, "revised_prompt": image.revised_prompt}


def channel_header(channel: str) -> dict[str, str]:
    """Which channel served the request, for operators debugging routing."""
    return {"x-imagegate-channel": channel} if channel else {}


def _openai_item(image: DeliveredImage) -> dict[str, str]:
    item = {"url": image.url} if image.url else {"b64_json": image.b64_json}
    if image.revised_prompt:
        item["revised_prompt"] = image.revised_prompt
    return item


def render_models(models: list[ModelConfig], *, created: int) -> Response:
    data = [
        {"id": m.name, "object": "model", "created": created, "owned_by": _owner(m.providers[0])}
        for m in models
    ]
    return JSON({"object": "list", "data": data})


def _owner(provider: str) -> str:
    return "imagegate" if provider == "diffusers" else provider.split(":")[0]


def render_accepted(task: Task) -> Response:
    body = {"code": 200, "msg": "Accepted", "data": {"task_id": task.id, "status": task.status}}
    return JSON(body, status_code=202)


async def task_view(task: Task, delivery: Delivery, base_url: str) -> dict[str, Any]:
    """GET /v1/images/tasks/{id}: `result` has the shape of a synchronous answer's `data`."""
    result = None
    if task.status == SUCCEEDED and task.result is not None:
        fmt = task.request.get("response_format", "url")
        images = await delivery.deliver_kept(task.result["images"], fmt, base_url)
        result = {"data": [_nebula_item(i) for i in images], "created": task.result["created"]}
    return {
        "task_id": task.id,
        "status": task.status,
        "progress": task.progress,
        "created": epoch(task.created_at),
        "finished": epoch(task.finished_at),
        "result": result,
        "error": task.error,
    }


def render_error(error: ImagegateError) -> Response:
    return JSON(
        {"code": error.status, "msg": error.message, "data": None}, status_code=error.status
    )
