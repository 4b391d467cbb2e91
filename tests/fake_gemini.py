"""A fake Gemini API on loopback, for the provider and dialect tests.

It speaks `POST /v1beta/models/{model}:generateContent` over real HTTP (uvicorn in a thread),
checks the API key like Google does (a 400 "API key not valid"), validates every body with the
official google-genai SDK's types (unknown or malformed fields are a 400, as upstream), records
what it received, and answers from a per-model script of outcomes:

  ok            text + image, each with a thoughtSignature (Gemini 3 style); the image
                alone when responseModalities is ["IMAGE"]                    (the default)
  image         one image part only, no text, no signature
  thought       a thought part (text and image) first, then the answer
  429 / 500 / 503   Google's error bodies; 429 carries Retry-After: <retry_after>
  slow          waits `slow_seconds`, then answers ok
  truncated     a JSON body cut in half
  html          200 with an HTML page
  blocked       promptFeedback.blockReason SAFETY, no candidates
  image_safety  a candidate with finishReason IMAGE_SAFETY and no content
  no_image      text only ("I cannot draw that"), finishReason STOP
  no_candidates an empty 200
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.genai import types
from PIL import Image
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from tests.loopback import LoopbackServer

API_KEY = "g-fake-key"
RATIOS = {"1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"}
TIER_SIDES = {"1K": 64, "2K": 128, "4K": 256}  # tiny stand-ins for 1024/2048/4096
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
TOP_LEVEL = {"contents", "generationConfig", "systemInstruction", "safetySettings"}


def signature(label: str) -> str:
    """A thoughtSignature as Google sends it: opaque bytes, standard base64."""
    return base64.b64encode(b"\xfb\xef" + label.encode()).decode()


@dataclass
class Received:
    """One validated request, parsed with the SDK's types."""

    model: str
    headers: dict[str, str]
    body: dict[str, Any]
    contents: list[types.Content]
    config: types.GenerateContentConfig

    @property
    def generation_config(self) -> dict[str, Any]:
        config: dict[str, Any] = self.body.get("generationConfig", {})
        return config

    @property
    def image_config(self) -> dict[str, Any]:
        image: dict[str, Any] = self.generation_config.get("imageConfig", {})
        return image

    @property
    def last_text(self) -> str:
        return " ".join(p.text or "" for p in self.contents[-1].parts or [] if p.text)


@dataclass
class FakeGemini:
    api_key: str = API_KEY
    slow_seconds: float = 1.0
    retry_after: str = "0"
    received: list[Received] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    scripts: dict[str, list[str]] = field(default_factory=dict)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, model: str, *outcomes: str) -> None:
        """Outcomes for calls to `model`, one per call; the last one repeats."""
        with self._lock:
            self.scripts[model] = list(outcomes)

    def reset(self) -> None:
        with self._lock:
            self.received.clear()
            self.rejected.clear()
            self.scripts.clear()
        self.slow_seconds, self.retry_after = 1.0, "0"

    def calls(self, model: str) -> list[Received]:
        return [r for r in self.received if r.model == model]

    def _next(self, model: str) -> str:
        with self._lock:
            script = self.scripts.get(model)
            if not script:
                return "ok"
            return script.pop(0) if len(script) > 1 else script[0]

    def app(self) -> ASGIApp:
        return Starlette(
            routes=[Route("/v1beta/models/{target:path}", self._handle, methods=["POST"])]
        )

    async def _handle(self, request: Request) -> Response:
        model, _, method = request.path_params["target"].rpartition(":")
        if method != "generateContent":
            return _error(404, "NOT_FOUND", f"Method {method} not found.")
        if request.headers.get("x-goog-api-key") != self.api_key:
            return _error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                reason="API_KEY_INVALID",
            )
        if "json" not in request.headers.get("content-type", ""):
            return _error(400, "INVALID_ARGUMENT", "Content-Type must be application/json.")
        try:
            received = _validate(model, dict(request.headers), await request.body())
        except (ValueError, ValidationError) as exc:
            self.rejected.append(str(exc))
            return _error(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}")
        with self._lock:
            self.received.append(received)
        return await self._answer(self._next(model), received)

    async def _answer(self, outcome: str, received: Received) -> Response:
        if outcome == "429":
            return _error(
                429,
                "RESOURCE_EXHAUSTED",
                "Resource has been exhausted (e.g. check quota).",
                headers={"retry-after": self.retry_after},
            )
        if outcome in ("500", "503"):
            status = "INTERNAL" if outcome == "500" else "UNAVAILABLE"
            return _error(int(outcome), status, "An internal error has occurred.")
        if outcome == "slow":
            await asyncio.sleep(self.slow_seconds)
            outcome = "ok"
        if outcome == "html":
            return Response(b"<html><body>502 Bad Gateway</body></html>", media_type="text/html")
        body = _success(outcome, received)
        raw = orjson.dumps(body)
        if outcome == "truncated":
            raw = raw[: len(raw) // 2]
        else:  # the fake's own answers must be what the SDK can read
            types.GenerateContentResponse.model_validate_json(raw)
        return Response(raw, media_type="application/json")


def _validate(model: str, headers: dict[str, str], raw: bytes) -> Received:
    body = orjson.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(body) - TOP_LEVEL
    if unknown:
        raise ValueError(f"Unknown name {sorted(unknown)[0]!r}: Cannot find field.")
    contents = [
        types.Content.model_validate_json(orjson.dumps(c)) for c in body.get("contents", [])
    ]
    if not contents or contents[-1].role != "user":
        raise ValueError("contents must be non-empty and end with a user turn")
    for content in contents:
        if content.role not in ("user", "model") or not content.parts:
            raise ValueError(f"bad turn: role {content.role!r}, {len(content.parts or [])} parts")
        for part in content.parts or []:
            _check_part(part, content.role)
    config = types.GenerateContentConfig.model_validate_json(
        orjson.dumps(body.get("generationConfig", {}))
    )
    image = config.image_config
    if image and image.aspect_ratio and image.aspect_ratio not in RATIOS:
        raise ValueError(f"Unsupported aspect ratio {image.aspect_ratio}")
    if image and image.image_size and image.image_size not in TIER_SIDES:
        raise ValueError(f"Unsupported image size {image.image_size}")
    if "systemInstruction" in body:
        types.Content.model_validate_json(orjson.dumps(body["systemInstruction"]))
    for setting in body.get("safetySettings", []):
        types.SafetySetting.model_validate_json(orjson.dumps(setting))
    return Received(model, headers, body, contents, config)


def _check_part(part: types.Part, role: str | None) -> None:
    if part.inline_data is not None:
        blob = part.inline_data
        if not (blob.mime_type or "").startswith("image/") or not blob.data:
            raise ValueError(f"inline_data must be an image, got {blob.mime_type}")
        with Image.open(io.BytesIO(blob.data)) as image:
            image.verify()
    elif part.text is None:
        raise ValueError("a part needs text or inline_data")
    if part.thought_signature is not None and role != "model":
        raise ValueError("thoughtSignature belongs on model parts")


def _success(outcome: str, received: Received) -> dict[str, Any]:
    usage = {"promptTokenCount": 10, "candidatesTokenCount": 1290, "totalTokenCount": 1300}
    if outcome == "blocked":
        return {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage}
    if outcome == "no_candidates":
        return {"usageMetadata": usage}
    if outcome == "image_safety":
        return {
            "candidates": [{"finishReason": "IMAGE_SAFETY", "index": 0}],
            "usageMetadata": usage,
        }
    if outcome == "no_image":
        parts = [{"text": "I cannot draw that, but here is a description."}]
    else:
        parts = _answer_parts(outcome, received)
    content = {"role": "model", "parts": parts}
    return {
        "candidates": [{"content": content, "finishReason": "STOP", "index": 0}],
        "usageMetadata": usage,
        "modelVersion": received.model,
        "responseId": f"fake-{time.monotonic_ns()}",
    }


def _answer_parts(outcome: str, received: Received) -> list[dict[str, Any]]:
    n = len(received.contents)
    image = {"mimeType": "image/png", "data": base64.b64encode(_png(received)).decode()}
    if outcome == "image":
        return [{"inlineData": image}]
    parts: list[dict[str, Any]] = []
    if outcome == "thought":
        parts += [
            {"text": "Thinking about composition", "thought": True},
            {"inlineData": image, "thought": True},
        ]
    if "TEXT" in (received.config.response_modalities or ["TEXT"]):
        text = f"Here is your image ({n} turns)."
        parts.append({"text": text, "thoughtSignature": signature(f"text-{n}")})
    parts.append({"inlineData": image, "thoughtSignature": signature(f"image-{n}")})
    return parts


def _png(received: Received) -> bytes:
    """A small image whose shape follows aspectRatio and imageSize and whose colour follows
    the prompt, so tests can see what reached the fake in what came back."""
    ratio = received.image_config.get("aspectRatio", "1:1")
    side = TIER_SIDES[received.image_config.get("imageSize", "1K")]
    w, h = (int(x) for x in ratio.split(":"))
    width, height = (side, round(side * h / w)) if w >= h else (round(side * w / h), side)
    colour = next(
        (c for word, c in COLOURS.items() if word in received.last_text.lower()), (90, 90, 90)
    )
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _error(
    code: int,
    status: str,
    message: str,
    *,
    reason: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if reason:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "googleapis.com",
            }
        ]
    return Response(
        orjson.dumps({"error": error}),
        status_code=code,
        headers=headers,
        media_type="application/json",
    )


@contextmanager
def running_fake() -> Iterator[FakeGemini]:
    fake = FakeGemini()
    with LoopbackServer(fake.app()).running() as server:
        fake.url = server.url
        yield fake
