"""Generated images to what a client asked for: signed links to stored files, or base64."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from imagegate.errors import NotFound
from imagegate.fastjson import Base64Text
from imagegate.storage.base import Storage
from imagegate.types import GeneratedImage, ResponseFormat


@dataclass(frozen=True, slots=True)
class DeliveredImage:
    """An image as a client receives it: one of url / b64_json is set, the other is ""."""

    url: str
    b64_json: str
    revised_prompt: str


class Delivery:
    """Stores images and links to them; generation knows nothing of either. A link always
    points into our own store: an upstream's links expire, so they are never passed on."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def deliver(
        self, images: tuple[GeneratedImage, ...], response_format: ResponseFormat, base_url: str
    ) -> list[DeliveredImage]:
        """Turn generated images into what the client asked for: signed links or base64."""
        delivered = []
        for image in images:
            if response_format == "b64_json":
                b64 = Base64Text.of(image.b64)
                delivered.append(DeliveredImage("", b64, image.revised_prompt))
            else:
                key = await self.storage.put(image.data, mime=image.mime)
                url = await self.storage.link(key, base_url)
                delivered.append(DeliveredImage(url, "", image.revised_prompt))
        return delivered

    async def keep(self, images: tuple[GeneratedImage, ...]) -> list[dict[str, str]]:
        """Store a task's images; what is kept is rendered as links or base64 when asked."""
        kept = []
        for image in images:
            key = await self.storage.put(image.data, mime=image.mime)
            kept.append({"key": key, "mime": image.mime, "revised_prompt": image.revised_prompt})
        return kept

    async def deliver_kept(
        self, kept: list[dict[str, str]], response_format: ResponseFormat, base_url: str
    ) -> list[DeliveredImage]:
        """Kept images as the client asked for them; links are made afresh on every read."""
        delivered = []
        for item in kept:
            revised = item.get("revised_prompt", "")
            if response_format != "b64_json":
                url = await self.storage.link(item["key"], base_url)
                delivered.append(DeliveredImage(url, "", revised))
                continue
            data = await self.storage.read(item["key"])
            if data is None:
                raise NotFound(
                    "A result image of this task is no longer stored (images are kept "
                    "IMAGEGATE_IMAGE_TTL_SECONDS): generate it again."
                )
            delivered.append(DeliveredImage("", base64.b64encode(data).decode(), revised))
        return delivered
