"""Fast JSON responses (orjson): image payloads can be megabytes of base64."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from imagegate import fastjson


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return fastjson.dumps(content)
