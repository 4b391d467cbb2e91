"""Lab v4 bodies: RuoYi's {code, msg, data} with "Operation successful"."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from imagegate.api.nebula.render import channel_header
from imagegate.api.responses import JSON
from imagegate.api.tasks import epoch
from imagegate.delivery import DeliveredImage, Delivery
from imagegate.store.models import Task
from imagegate.store.tasks import SUCCEEDED

OK = "Operation successful"


def ok(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSON({"code": 200, "msg": OK, "data": data}, status_code=status, headers=headers)


def render_images(images: list[DeliveredImage], channel: str = "") -> Response:
    return ok({"images": [_item(i) for i in images]}, headers=channel_header(channel))


def task_submitted(task: Task) -> Response:
    return ok({"taskId": task.id, "status": task.status}, status=202)


async def task_query_view(task: Task, delivery: Delivery, base_url: str) -> dict[str, Any]:
    images: list[dict[str, str]] = []
    if task.status == SUCCEEDED and task.result is not None:
        fmt = task.request.get("response_format", "url")
        kept = await delivery.deliver_kept(task.result["images"], fmt, base_url)
        images = [_item(i) for i in kept]
    error = task.error["message"] if task.error else None
    return {
        "id": task.id,
        "status": task.status,
        "progress": task.progress,
        "images": images,
        "error": error,
        "created": epoch(task.created_at),
        "finished": epoch(task.finished_at),
    }


def _item(image: DeliveredImage) -> dict[str, str]:
    item = {"url": image.url} if image.url else {"b64_json": image.b64_json}
    if image.revised_prompt:
        item["revised_prompt"] = image.revised_prompt
    return item
