"""imagegate's own visible "AI generated" mark, for models that cannot watermark themselves.

A request that asks for `watermark: true` is honoured on every model (docs/api.md, "Watermarks"):
a provider that accepts `watermark` (Seedream, DashScope) gets the flag and marks its images
itself; for any other model the service stamps the delivered images here. The mark is a short
text on a semi-transparent box in one corner, sized to the image, in Pillow's built-in font (no
font file to ship). The image keeps its format (PNG, JPEG or WEBP).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

from imagegate.types import GeneratedImage

Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left"]
_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


@dataclass(frozen=True, slots=True)
class Watermark:
    text: str = "AI generated"
    position: Corner = "bottom-right"
    opacity: float = 0.6
    """Of the dark box behind the text; the text itself is drawn a little more opaque."""

    def apply(self, image: GeneratedImage) -> GeneratedImage:
        """The same image with the mark drawn in its corner, in the same format."""
        with Image.open(io.BytesIO(image.data)) as opened:
            fmt = _FORMATS.get(image.mime) or opened.format or "PNG"
            marked = self.draw(opened)
        buffer = io.BytesIO()
        if fmt == "JPEG":
            marked.convert("RGB").save(buffer, format=fmt, quality=95)
        else:
            marked.save(buffer, format=fmt)
        return GeneratedImage(
            buffer.getvalue(),
            image.mime,
            image.width or marked.width,
            image.height or marked.height,
            image.seed,
            image.revised_prompt,
            image.thought_signature,
        )

    def draw(self, picture: Image.Image) -> Image.Image:
        """The mark over `picture` (RGBA when the picture has alpha, else RGB)."""
        mode = "RGBA" if "A" in picture.getbands() else "RGB"
        base = picture.convert("RGBA")
        width, height = base.size
        size = max(8, round(min(width, height) * 0.035))
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = font.getbbox(self.text)
        pad, margin = max(2, size // 3), max(2, size // 2)
        box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
        x = margin if self.position.endswith("left") else width - margin - box_w
        y = margin if self.position.startswith("top") else height - margin - box_h
        overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
        pen = ImageDraw.Draw(overlay)
        alpha = round(255 * self.opacity)
        pen.rectangle((x, y, x + box_w - 1, y + box_h - 1), fill=(0, 0, 0, alpha))
        text_alpha = round(255 * min(1.0, self.opacity + 0.3))
        pen.text(
            (x + pad - left, y + pad - top), self.text, font=font, fill=(255, 255, 255, text_alpha)
        )
        return Image.alpha_composite(base, overlay).convert(mode)
