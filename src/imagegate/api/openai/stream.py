"""`stream: true` on /images/generations and /images/edits: OpenAI's image event stream.

The generation runs as for a JSON answer (`ImageService.generate`), inside a `Reporter` that
asks the provider for previews when `partial_images` > 0: local models make them while they
denoise, an OpenAI channel streams its own partial images, an Ark (Seedream) channel streams
each image as it is done. At most `partial_images` of them per image are sent, spread over the
generation (the k-th once the preview's step passes k/(N+1) of the steps), as
`<kind>.partial_image` events; then one `<kind>.completed` event per final image.

Nothing is sent before the first event: an error until then (a bad parameter, a refused model,
an upstream 400) is the usual JSON error with its status. An error after that is an
`event: error`, which the SDK raises. A client that closes the connection cancels the
generation, as for a JSON answer (api/disconnect.py): nothing is charged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from PIL import Image as PILImage
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from imagegate.api.openai.protocol import ImageEditForm, ImageGenerateRequest, StreamKind
from imagegate.api.openai.render import CHANNEL_HEADER, completed_frame, error_frame, partial_frame
from imagegate.api.openai.translate import MAX_PARTIAL_IMAGES
from imagegate.delivery import DeliveredImage
from imagegate.errors import ClientDisconnected, ImagegateError, InternalError
from imagegate.progress import Preview, reporting_to
from imagegate.types import GeneratedImage, GenerationResult, ResolvedRequest

logger = logging.getLogger(__name__)

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""No cache may keep the stream, and nginx must not buffer it (it would hold every event)."""
_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}

Generation = Awaitable[tuple[ResolvedRequest, GenerationResult]]
Deliver = Callable[[tuple[GeneratedImage, ...]], Awaitable[list[DeliveredImage]]]
_Partial = tuple[Preview, int]
"""A preview to send, and its partial_image_index."""


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """What a stream's events echo of the request, and how many partial images it wants."""

    kind: StreamKind
    partial_images: int
    quality: str
    background: str
    output_format: str

    @classmethod
    def of(cls, body: ImageGenerateRequest | ImageEditForm, *, edit: bool) -> StreamSettings:
        """The settings of a body whose `partial_images` the translator checks (a value out
        of range is refused before anything streams)."""
        return cls(
            kind="image_edit" if edit else "image_generation",
            partial_images=min(max(body.partial_images or 0, 0), MAX_PARTIAL_IMAGES),
            quality=body.quality or "auto",
            background=body.background or "auto",
            output_format=body.output_format or "png",
        )

    def options(self, output_format: str | None = None) -> dict[str, str]:
        return {
            "quality": self.quality,
            "background": self.background,
            "output_format": output_format or self.output_format,
        }


class PartialImages:
    """The Reporter of a stream: previews go onto the stream's queue (from any thread), at
    most `limit` per image, the k-th once its step reaches k/(limit+1) of the steps."""

    def __init__(self, queue: asyncio.Queue[_Partial | None], limit: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = queue
        self._limit = limit
        self._sent: dict[int, int] = {}

    @property
    def wants_previews(self) -> bool:
        return self._limit > 0

    @property
    def max_previews(self) -> int | None:
        return self._limit

    def progress(self, fraction: float, step: int | None = None, steps: int | None = None) -> None:
        return None  # OpenAI's stream has no progress event

    def preview(self, preview: Preview) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self._take, preview)

    def _take(self, preview: Preview) -> None:
        sent = self._sent.get(preview.index, 0)
        if sent >= self._limit or preview.step * (self._limit + 1) < (sent + 1) * preview.steps:
            return
        self._sent[preview.index] = sent + 1
        self._queue.put_nowait((preview, sent))


async def stream_images(
    request: Request,
    generation: Callable[[], Generation],
    deliver: Deliver,
    settings: StreamSettings,
) -> Response:
    """Start `generation` and answer its event stream once it has something to send."""
    queue: asyncio.Queue[_Partial | None] = asyncio.Queue()
    with reporting_to(PartialImages(queue, settings.partial_images)):
        work = asyncio.ensure_future(generation())  # the task keeps the reporter
    work.add_done_callback(lambda _: queue.put_nowait(None))
    watcher = asyncio.ensure_future(_cancel_when_client_leaves(request, work))
    try:
        first = await queue.get()
    except BaseException:  # this request was cancelled: so is the work
        work.cancel()
        watcher.cancel()
        raise
    stream = EventStream(first, queue, work, watcher, deliver, settings)
    if first is None:  # done before any partial image: an error is still a JSON answer
        watcher.cancel()
        if work.cancelled():
            raise ClientDisconnected(
                "The client closed the connection before the images were ready; the "
                "generation was stopped and nothing was charged."
            )
        _, result = work.result()
        stream.ready = await stream.completed(result)
        if result.channel:
            stream.headers[CHANNEL_HEADER] = result.channel
    return stream


async def _cancel_when_client_leaves(request: Request, work: asyncio.Future[Any]) -> None:
    """Once the body is read, the only message an ASGI server sends is `http.disconnect`."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    work.cancel()


class EventStream(Response):
    """`text/event-stream`: the partial images as they come, then the completed ones."""

    media_type = "text/event-stream"

    def __init__(
        self,
        first: _Partial | None,
        queue: asyncio.Queue[_Partial | None],
        work: asyncio.Future[tuple[ResolvedRequest, GenerationResult]],
        watcher: asyncio.Future[None],
        deliver: Deliver,
        settings: StreamSettings,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(HEADERS)
        self.ready: list[bytes] | None = None
        """The final frames, when the generation ended before the stream started."""
        self._first = first
        self._queue = queue
        self._work = work
        self._watcher = watcher
        self._deliver = deliver
        self._settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for frame in self._frames():
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client left (ASGI 2.4 servers raise it from send)
            logger.info("an image stream's client left; its generation is cancelled")
        finally:
            self._work.cancel()  # nothing when it is done
            self._watcher.cancel()

    async def _frames(self) -> AsyncIterator[bytes]:
        if self.ready is not None:
            for frame in self.ready:
                yield frame
            return
        item = self._first
        while item is not None:
            yield await self._partial(*item)
            item = await self._queue.get()
        if self._work.cancelled():
            return  # the client left: nobody to tell
        error = self._work.exception()
        if error is not None:
            yield error_frame(_reportable(error))
            return
        _, result = self._work.result()
        try:
            frames = await self.completed(result)
        except Exception as exc:
            frames = [error_frame(_reportable(exc))]
        for frame in frames:
            yield frame

    async def _partial(self, preview: Preview, index: int) -> bytes:
        wanted = self._settings.output_format
        data = preview.data
        if _FORMATS.get(preview.mime) != wanted:  # previews are WEBP; the event says wanted
            data = await asyncio.to_thread(_convert, data, wanted)
        b64 = base64.b64encode(data).decode()
        size = f"{preview.width}x{preview.height}"
        options = self._settings.options()
        return partial_frame(self._settings.kind, b64, index=index, size=size, options=options)

    async def completed(self, result: GenerationResult) -> list[bytes]:
        """One completed event per final image, each with the request's usage."""
        delivered = await self._deliver(result.images)
        return [
            completed_frame(
                self._settings.kind,
                image.b64_json,
                size=f"{made.width}x{made.height}",
                options=self._settings.options(_FORMATS.get(made.mime)),
                usage=result.usage,
            )
            for made, image in zip(result.images, delivered, strict=True)
        ]


def _reportable(error: BaseException) -> ImagegateError:
    if isinstance(error, ImagegateError):
        return error
    logger.error("an image stream failed", exc_info=error)
    return InternalError(
        "Internal error while streaming; the request id in the x-request-id header "
        "identifies it in the server log."
    )


def _convert(data: bytes, output_format: str) -> bytes:
    """A preview in the format the stream's events name."""
    with PILImage.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB") if output_format == "jpeg" else opened.copy()
    buffer = io.BytesIO()
    image.save(buffer, format=_PIL_FORMATS.get(output_format, "PNG"))
    return buffer.getvalue()
