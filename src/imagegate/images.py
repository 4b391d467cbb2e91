"""Decode and verify reference images once, whatever form a client sent them in.

Every image a client sends (data URI, http(s) URL or raw base64) passes through `verify_image`,
which checks the size, the real format (by content, never by the claimed MIME type) and that the
pixels decode, so providers only ever see an `InputImage` they can trust.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import io
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, cast
from urllib.parse import unquote_to_bytes

from PIL import ExifTags, Image, ImageFile, ImageOps
from PIL.JpegImagePlugin import JpegImageFile
from PIL.PngImagePlugin import PngImageFile
from PIL.WebPImagePlugin import WebPImageFile

from imagegate.config import Settings
from imagegate.decoding import DecodeBudget, charge_request, counting_pixels
from imagegate.errors import ImagegateError, InvalidRequest, PayloadTooLarge, UnreadableImage
from imagegate.fetch import Fetcher
from imagegate.memory import map_large_images
from imagegate.types import (
    ImageRef,
    ImageRequest,
    InputImage,
    Part,
    ResolvedRequest,
    Turn,
    UnresolvedRequest,
)

# Pillow's name for a format -> the plugin class that reads it and the MIME type we report.
# The classes are used directly instead of Image.open: Image.open checks the size against
# Pillow's process-wide MAX_IMAGE_PIXELS and warns (DecompressionBombWarning) before we can
# apply our own limit, and silencing that warning with warnings.catch_warnings() is not
# thread-safe (verify_image runs in worker threads). JpegImageFile rather than Pillow's JPEG
# factory, which may turn the file into an MPO and warn about malformed MPO headers.
_ACCEPTED: dict[str, tuple[type[ImageFile.ImageFile], str]] = {
    "PNG": (PngImageFile, "image/png"),
    "JPEG": (JpegImageFile, "image/jpeg"),
    "WEBP": (WebPImageFile, "image/webp"),
}
_FIX = "send PNG, JPEG or WEBP"
_FORMS = "a data URI (data:image/png;base64,...), an http(s) URL, or raw base64-encoded image bytes"
# Work on more bytes than this (base64, a JPEG's markers) happens off the event loop.
_THREAD_BYTES = 256 * 1024
# Decoding takes time by pixels, whatever the bytes (a 6000x6000 PNG of one colour is 100 KB and
# takes 0.1-1 s): only images up to 256x256 (under a millisecond) are decoded on the event loop.
_LOOP_PIXELS = 256 * 256
_WHITESPACE = re.compile(r"\s+")
_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_PATHLIKE = re.compile(r"^(\.{0,2}/|~|\\)")
# EXIF orientations 5-8 rotate by 90 degrees: width and height swap when displayed.
_TRANSPOSED = frozenset({5, 6, 7, 8})


@dataclass(frozen=True, slots=True)
class Header:
    """What an image's first bytes say, before any pixel is decoded."""

    fmt: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def verify_image(
    data: bytes, *, max_bytes: int, max_pixels: int, label: str = "image"
) -> InputImage:
    """Check that data is a PNG, JPEG or WEBP within the limits and that it decodes fully.

    The size in the header is checked before any pixel is decoded, so a small file that
    claims a huge canvas (a decompression bomb) is refused without allocating it.
    """
    header = read_header(data, max_bytes=max_bytes, max_pixels=max_pixels, label=label)
    return decode_image(data, header, label=label)


def read_header(data: bytes, *, max_bytes: int, max_pixels: int, label: str = "image") -> Header:
    """The format and canvas size of data, read from its header, within the byte and pixel
    limits. PNG and WEBP sizes sit at fixed offsets; a JPEG's is found by walking its
    markers (Pillow, without decoding), which costs time in proportion to its bytes."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"{_title(label)} is {len(data)} bytes; the limit is {max_bytes} bytes: "
            "send a smaller or more compressed image."
        )
    fmt = detect_format(data)
    if fmt not in _ACCEPTED:
        what = f"a {fmt}" if fmt else "not a recognizable image"
        raise UnreadableImage(f"{_title(label)} is {what}: {_FIX}.")
    size = _header_size(data, fmt)
    if size is None:
        raise UnreadableImage(
            f"{_title(label)} is a damaged {fmt} file (its header gives no size): {_FIX} that "
            "opens in an image viewer."
        )
    _check_pixels(*size, max_pixels=max_pixels, label=label)
    return Header(fmt, *size)


def decode_image(data: bytes, header: Header, *, label: str = "image") -> InputImage:
    """Decode data, whose header `read_header` checked, fully: the InputImage if it decodes."""
    fmt = header.fmt
    try:
        with _open(data, fmt) as image:
            width, height = image.size
            if (width, height) != (header.width, header.height):
                # Such as a second IHDR chunk: what was checked (and budgeted) must be
                # what gets decoded.
                raise UnreadableImage(
                    f"{_title(label)} is a damaged {fmt} file: it claims two different sizes; "
                    f"{_FIX} that opens in an image viewer."
                )
            image.load()
            oriented = _orientation(image) in _TRANSPOSED
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{_title(label)} has too many pixels: downscale it.") from exc
    except UnreadableImage:
        raise
    # Pillow's plugins raise a zoo of exception types on hostile input (OSError, SyntaxError,
    # ValueError, EOFError, struct.error, ...): any of them means the file is unreadable.
    except Exception as exc:
        raise UnreadableImage(
            f"{_title(label)} is a damaged or truncated {fmt} file: {_FIX} that opens in an "
            "image viewer."
        ) from exc
    if oriented:
        width, height = height, width
    return InputImage(data=data, mime=_ACCEPTED[fmt][1], width=width, height=height)


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    if fmt == "PNG":  # IHDR is the first chunk, by the spec
        if data[12:16] != b"IHDR" or len(data) < 24:
            return None
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if fmt == "WEBP":  # Pillow's reader allocates the canvas to learn its size: never ask it
        return _webp_size(data)
    try:
        with _open(data, fmt) as image:
            return image.size
    except Exception:  # the zoo again: a header Pillow cannot walk
        return None


def detect_format(data: bytes) -> str | None:
    """Pillow's name for the format of data ("PNG", "GIF", ...), judged by its first bytes."""
    Image.init()
    prefix = data[:16]
    # Ours first, so that no other plugin's looser check can claim one of them.
    for name in dict.fromkeys([*_ACCEPTED, *Image.ID]):
        accept = Image.OPEN[name][1]
        # accept() returns a string (not True) when Pillow recognises a format it cannot read.
        if accept is not None and _accepts(accept, prefix):
            return name
    return None


def _accepts(accept: Callable[[bytes], bool | str], prefix: bytes) -> bool:
    try:
        return accept(prefix) is True
    # Some checks index into the prefix and fail on very short input, as Image.open allows.
    except (IndexError, TypeError, struct.error):
        return False


def _open(data: bytes, fmt: str) -> ImageFile.ImageFile:
    plugin = _ACCEPTED[fmt][0]
    return plugin(io.BytesIO(data))


def _check_pixels(width: int, height: int, *, max_pixels: int, label: str) -> None:
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"{_title(label)} is {width}x{height} ({width * height} pixels); the limit is "
            f"{max_pixels} pixels: downscale it first."
        )


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    # Broken EXIF must not make an otherwise good image unreadable: treat it as upright.
    except Exception:
        return 1
    return value if isinstance(value, int) else 1


def _title(label: str) -> str:
    """A label opening a sentence: "Image ...", but a field path stays as the client wrote it
    (`contents[0].parts[1].image`, never `Contents[0]...`)."""
    if re.search(r"[.\[]", label):
        return label
    return label[:1].upper() + label[1:]


@contextlib.contextmanager
def _about(label: str) -> Iterator[None]:
    """Errors about a request's image name it as their param (dialects rename it)."""
    try:
        yield
    except ImagegateError as exc:
        if exc.param is None:
            exc.param = label
        raise


def decode_data_uri(uri: str, *, label: str = "image") -> tuple[bytes, str | None]:
    """The bytes and media type of a data URI like data:image/png;base64,iVBOR..."""
    if uri[:5].lower() != "data:" or "," not in uri:
        raise InvalidRequest(
            f"{_title(label)} is a malformed data URI: expected 'data:image/png;base64,<data>'."
        )
    header, payload = uri[5:].split(",", 1)
    params = [p.strip().lower() for p in header.split(";")]
    mime = params[0] or None
    if "base64" in params[1:]:
        return decode_base64(payload, label=label), mime
    return unquote_to_bytes(payload), mime


def decode_base64(data: str, *, label: str = "image") -> bytes:
    """Decode base64, tolerating line breaks, the URL-safe alphabet and missing padding."""
    compact = _WHITESPACE.sub("", data)
    if not compact:
        raise InvalidRequest(f"{_title(label)} is empty: send the base64-encoded image bytes.")
    if not _BASE64.match(compact) or len(compact.rstrip("=")) % 4 == 1:
        raise InvalidRequest(
            f"{_title(label)} is not valid base64: send the image bytes base64-encoded "
            "(standard or URL-safe alphabet)."
        )
    standard = compact.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except binascii.Error as exc:
        raise InvalidRequest(f"{_title(label)} is not valid base64.") from exc


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of a PIL image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def to_pil(img: InputImage) -> Image.Image:
    """The verified image as an upright RGB PIL image, transparency flattened onto white.

    Dropping alpha instead would reveal whatever colour transparent pixels happen to store
    (often black), which the model would then take as content.
    """
    fmt = detect_format(img.data)
    if fmt not in _ACCEPTED:
        raise UnreadableImage(f"The image is not a PNG, JPEG or WEBP but {fmt or 'unknown'}.")
    with _open(img.data, fmt) as image:
        upright = ImageOps.exif_transpose(image)
    if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
        rgba = upright.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return upright.convert("RGB")


class ImageLoader:
    """Resolves the image references the dialects receive into verified InputImages.

    One per process: it holds the process's `DecodeBudget`. Each image's header is read
    first; its pixels are charged to the request (`decoding.charge_request`) and, unless it is
    tiny, decoded in a worker thread within the budget, so the event loop never decodes
    pixels however few bytes carry them.
    """

    def __init__(self, settings: Settings, fetcher: Fetcher) -> None:
        self._max_bytes = settings.max_image_bytes
        self._max_pixels = settings.max_image_pixels
        self._max_request_pixels = settings.max_request_pixels
        self._fetch_seconds = settings.fetch_timeout_seconds
        self._fetcher = fetcher
        self.decoding = DecodeBudget(settings.max_decoding_pixels)
        map_large_images()  # decoded pixels go back to the kernel when dropped

    async def resolve(self, request: UnresolvedRequest) -> ResolvedRequest:
        """The request with every image reference loaded and verified.

        All refs load at once (a ref that is both in `images` and in a conversation part is
        loaded once), within one deadline for every URL (IMAGEGATE_FETCH_TIMEOUT_SECONDS from
        now) and one pixel budget for the request (IMAGEGATE_MAX_REQUEST_PIXELS). The first
        failure, in the order the images were given, stops the rest and is raised."""
        refs = list(dict.fromkeys(_refs_of(request)))
        if not refs:  # nothing to load: the same request, already of the resolved kind
            return cast(ResolvedRequest, request)
        deadline = asyncio.get_running_loop().time() + self._fetch_seconds
        with counting_pixels():  # the loads' tasks copy this context: they share the counter
            loaded = await _all_or_first_error([self._load_ref(ref, deadline) for ref in refs])
        return _with_images(request, dict(zip(refs, loaded, strict=True)))

    async def _load_ref(self, ref: ImageRef, deadline: float) -> InputImage:
        if isinstance(ref.source, bytes):  # an upload: its field names it already
            return await self.verify(ref.source, label=ref.label)
        with _about(ref.label):
            if ref.form == "base64":
                return await self._verify_text(ref.source, is_uri=False, label=ref.label)
            return await self._load(ref.source, label=ref.label, deadline=deadline)

    async def load(self, ref: str, *, label: str) -> InputImage:
        """Load a data URI, an http(s) URL or raw base64; errors name `label` as their param."""
        with _about(label):
            return await self._load(ref, label=label)

    async def _load(self, ref: str, *, label: str, deadline: float | None = None) -> InputImage:
        ref = ref.strip()
        match = _SCHEME.match(ref)
        scheme = match[1].lower() if match else None
        if scheme == "data":
            return await self._verify_text(ref, is_uri=True, label=label)
        if scheme in ("http", "https"):
            body = await self._fetch(ref, label=label, deadline=deadline)
            return await self.verify(body, label=label)
        if scheme is not None:
            raise InvalidRequest(
                f"{_title(label)} uses the unsupported scheme '{scheme[:20]}:': send {_FORMS}."
            )
        return await self._load_raw(ref, label=label)

    async def _fetch(self, url: str, *, label: str, deadline: float | None) -> bytes:
        """The body of an image URL; with a `deadline` (the loop's clock), a URL still
        arriving then fails the request, naming it."""
        if deadline is None:
            return (await self._fetcher.fetch(url))[0]
        try:
            async with asyncio.timeout_at(deadline):
                return (await self._fetcher.fetch(url))[0]
        except TimeoutError:
            raise InvalidRequest(
                f"{_title(label)} did not arrive: its URL was still loading after "
                f"{self._fetch_seconds:g} seconds (IMAGEGATE_FETCH_TIMEOUT_SECONDS, one "
                "deadline for all the images of a request). Send a faster URL, or the image "
                "inline as base64."
            ) from None

    async def load_base64(self, data: str, mime: str | None, *, label: str) -> InputImage:
        """Load raw base64 (e.g. Gemini inline_data); the format comes from the bytes, not mime."""
        with _about(label):
            return await self._verify_text(data, is_uri=False, label=label)

    async def verify(self, data: bytes, *, label: str) -> InputImage:
        """`verify_image` for a request's image: header first, then its pixels charged to the
        request, then decoded (off the event loop unless tiny, within the process's budget)."""
        big = len(data) > _THREAD_BYTES
        header = (
            await asyncio.to_thread(self._header, data, label) if big else self._header(data, label)
        )
        charge_request(header.pixels, limit=self._max_request_pixels, label=label)
        if not big and header.pixels <= _LOOP_PIXELS:
            return decode_image(data, header, label=label)
        return await self.decoding.run(
            header.pixels, functools.partial(decode_image, data, header, label=label)
        )

    def _header(self, data: bytes, label: str) -> Header:
        return read_header(
            data, max_bytes=self._max_bytes, max_pixels=self._max_pixels, label=label
        )

    async def _load_raw(self, ref: str, *, label: str) -> InputImage:
        # Raw base64 has no prefix to recognise it by, so anything else (a file path, a bare
        # host name) only shows up as undecodable: name the accepted forms in that case.
        try:
            data = await self._bytes_of(ref, is_uri=False, label=label)
        except InvalidRequest as exc:
            raise InvalidRequest(
                f"{_title(label)} is not a supported reference: send {_FORMS}."
            ) from exc
        try:
            return await self.verify(data, label=label)
        except UnreadableImage as exc:
            if _PATHLIKE.match(ref):
                raise InvalidRequest(
                    f"{_title(label)} looks like a file path; the server cannot read files: "
                    f"send {_FORMS}."
                ) from exc
            raise

    async def _verify_text(self, text: str, *, is_uri: bool, label: str) -> InputImage:
        return await self.verify(
            await self._bytes_of(text, is_uri=is_uri, label=label), label=label
        )

    async def _bytes_of(self, text: str, *, is_uri: bool, label: str) -> bytes:
        # Refuse before decoding what cannot fit: base64 spends 4 characters on 3 bytes; the
        # slack covers line breaks and a data URI header (read_header checks exactly later).
        if len(text) > self._max_bytes * 4 // 3 * 11 // 10 + 1024:
            raise PayloadTooLarge(
                f"{_title(label)} is larger than the limit of {self._max_bytes} bytes: "
                "send a smaller or more compressed image."
            )
        if len(text) > _THREAD_BYTES:
            return await asyncio.to_thread(_text_bytes, text, is_uri, label)
        return _text_bytes(text, is_uri, label)


def _refs_of(request: UnresolvedRequest) -> Iterator[ImageRef]:
    """Every image reference of a request, in the order the client gave them."""
    for turn in request.conversation:
        yield from (part.image for part in turn.parts if part.image is not None)
    yield from request.images
    if request.mask is not None:
        yield request.mask


async def _all_or_first_error(loads: list[Any]) -> list[InputImage]:
    """Run the loads concurrently; on a failure cancel the others and raise the failure of
    the earliest load that failed (errors name the same image whatever finished first)."""
    tasks = [asyncio.ensure_future(load) for load in loads]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
    return [task.result() for task in tasks]


def _with_images(request: UnresolvedRequest, loaded: dict[ImageRef, InputImage]) -> ResolvedRequest:
    """`request` with each ref replaced by its loaded image."""

    def part(p: Part[ImageRef]) -> Part[InputImage]:
        image = loaded[p.image] if p.image is not None else None
        return Part(p.text, image, p.thought_signature)

    values: dict[str, Any] = {f.name: getattr(request, f.name) for f in fields(request)}
    values["images"] = tuple(loaded[ref] for ref in request.images)
    values["mask"] = loaded[request.mask] if request.mask is not None else None
    values["conversation"] = tuple(
        Turn(t.role, tuple(part(p) for p in t.parts)) for t in request.conversation
    )
    # Not ImageRequest[InputImage](...): calling a subscripted generic sets __orig_class__ on
    # the instance, which a slots dataclass refuses at run time.
    resolved: ResolvedRequest = ImageRequest(**values)
    return resolved


def _text_bytes(text: str, is_uri: bool, label: str) -> bytes:
    return decode_data_uri(text, label=label)[0] if is_uri else decode_base64(text, label=label)


def sniff_b64(b64: str) -> tuple[str, int, int] | None:
    """MIME type and size of a base64 image from its first bytes, without decoding it all.

    For relaying provider output as-is; None when the header is not a PNG, JPEG or WEBP
    that Pillow can size from its first 48 KB. The first 4 KB of text are tried first: they
    hold a PNG's or WEBP's header and most JPEGs' (a JPEG with large metadata needs more).
    """
    for chars in (4 * 1024, 64 * 1024):
        sniffed = _sniff_head(b64[:chars])
        if sniffed is not None or len(b64) <= chars:
            return sniffed
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sniff_head(head: str) -> tuple[str, int, int] | None:
    head = head.rstrip("=")
    head = head[: len(head) - len(head) % 4]
    try:
        data = base64.b64decode(head)
    except ValueError:
        return None
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])  # the first chunk, by the spec
        return ("image/png", width, height) if width and height else None
    fmt = detect_format(data)
    if fmt == "WEBP":  # Pillow's WEBP reader decodes the whole file to learn its size
        size = _webp_size(data)
        return ("image/webp", *size) if size else None
    if fmt not in _ACCEPTED:
        return None
    try:
        with _open(data, fmt) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError):
        return None
    return _ACCEPTED[fmt][1], width, height


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from a WEBP header (RIFF container; VP8X, VP8 or VP8L first chunk)."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None
