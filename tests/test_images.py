"""Reference images: format by content, size limits before decoding, every accepted form."""

from __future__ import annotations

import asyncio
import base64
import io
import random
import struct
import zlib
from collections.abc import AsyncIterator

import pytest
from PIL import ExifTags, Image

from imagegate.config import Settings
from imagegate.errors import InvalidRequest, PayloadTooLarge, UnreadableImage
from imagegate.fetch import Fetcher
from imagegate.images import (
    ImageLoader,
    decode_base64,
    decode_data_uri,
    detect_format,
    encode_png,
    to_pil,
    verify_image,
)
from imagegate.types import InputImage
from tests.test_fetch import LoopbackServer, respond


def check(data: bytes, *, label: str = "image") -> InputImage:
    return verify_image(data, max_bytes=1_000_000, max_pixels=4_000_000, label=label)


def encoded(
    fmt: str, size: tuple[int, int] = (30, 20), mode: str = "RGB", **options: object
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise_png(side: int) -> bytes:
    """A PNG that does not compress, so its file size follows its pixel count."""
    pixels = random.Random(side).randbytes(side * side * 3)
    return encode_png(Image.frombytes("RGB", (side, side), pixels))


def png_bomb(side: int, *, with_pixels: bool) -> bytes:
    """A 1-bit PNG of side x side zeros: a few tens of KB that claim a huge canvas."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    pixels = b""
    if with_pixels:
        compressor = zlib.compressobj(9)
        row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
        pieces = (compressor.compress(row * min(400, side - n)) for n in range(0, side, 400))
        pixels = b"".join(pieces) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_accepted_formats(fmt: str, mime: str) -> None:
    image = check(encoded(fmt))
    assert (image.mime, image.width, image.height) == (mime, 30, 20)


def test_format_comes_from_the_content() -> None:
    # A JPEG sent in a data URI that claims PNG is still a JPEG.
    data, claimed = decode_data_uri(
        "data:image/png;base64," + base64.b64encode(encoded("JPEG")).decode()
    )
    assert claimed == "image/png"
    assert check(data).mime == "image/jpeg"


@pytest.mark.parametrize(("fmt", "mode"), [("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB")])
def test_other_formats_are_refused_by_name(fmt: str, mode: str) -> None:
    with pytest.raises(UnreadableImage, match=f"^Image 2 is a {fmt}: send PNG, JPEG or WEBP"):
        check(encoded(fmt, mode=mode), label="image 2")


@pytest.mark.parametrize(
    "data", [random.Random(7).randbytes(2000), b"", b"<svg xmlns='http://www.w3.org/2000/svg'/>"]
)
def test_non_images_are_unreadable(data: bytes) -> None:
    with pytest.raises(UnreadableImage, match="not a recognizable image"):
        check(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_file_is_unreadable(fmt: str) -> None:
    pixels = random.Random(3).randbytes(64 * 64 * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (64, 64), pixels).save(buffer, format=fmt)
    data = buffer.getvalue()
    with pytest.raises(UnreadableImage, match=f"damaged or truncated {fmt}"):
        check(data[: len(data) // 2])


def test_too_many_bytes() -> None:
    data = encoded("PNG")
    with pytest.raises(PayloadTooLarge, match=f"is {len(data)} bytes; the limit is 50 bytes"):
        verify_image(data, max_bytes=50, max_pixels=10_000)


def test_too_many_pixels() -> None:
    with pytest.raises(PayloadTooLarge, match=r"30x20 \(600 pixels\); the limit is 599"):
        verify_image(encoded("WEBP"), max_bytes=10_000, max_pixels=599)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb(20_000, with_pixels=True)


def test_decompression_bomb_is_refused(bomb: bytes) -> None:
    assert len(bomb) < 100_000  # 400 million pixels in a small file
    with pytest.raises(PayloadTooLarge, match="20000x20000"):
        verify_image(bomb, max_bytes=1_000_000, max_pixels=40_000_000)


def test_bomb_is_refused_from_its_header_alone() -> None:
    # No pixel data at all: were it decoded, it would be unreadable (422), not too large (413).
    # 10000x10000 is also where Pillow's own check would only warn.
    with pytest.raises(PayloadTooLarge, match="10000x10000"):
        check(png_bomb(10_000, with_pixels=False))


def test_our_limit_not_pillows_global_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow's Image.open would raise (or warn) for this image; the operator's limit allows it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    image = verify_image(encoded("PNG"), max_bytes=10_000, max_pixels=1_000)
    assert (image.width, image.height) == (30, 20)
    assert to_pil(image).size == (30, 20)


def test_exif_rotation_is_applied() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored landscape, displayed portrait
    image = check(encoded("JPEG", (40, 20), exif=exif))
    assert (image.width, image.height) == (20, 40)
    assert to_pil(image).size == (20, 40)


def test_to_pil_flattens_transparency_onto_white() -> None:
    transparent = encode_png(Image.new("RGBA", (8, 8), (0, 0, 0, 0)))
    pil = to_pil(check(transparent))
    assert pil.mode == "RGB"
    assert pil.getpixel((0, 0)) == (255, 255, 255)


def test_to_pil_of_a_palette_image() -> None:
    image = check(encoded("PNG", mode="P", transparency=90))
    pil = to_pil(image)
    assert (pil.mode, pil.size) == ("RGB", (30, 20))


def test_encode_png_round_trips() -> None:
    original = Image.new("RGB", (5, 7), (1, 2, 3))
    data = encode_png(original)
    assert detect_format(data) == "PNG"
    assert to_pil(check(data)).getpixel((4, 6)) == (1, 2, 3)


PNG = encoded("PNG")
PNG_B64 = base64.b64encode(PNG).decode()


@pytest.mark.parametrize(
    ("uri", "mime"),
    [
        (f"data:image/png;base64,{PNG_B64}", "image/png"),
        (f"DATA:Image/PNG;BASE64,{PNG_B64}", "image/png"),
        (f"data:image/png;name=a.png;base64,{PNG_B64}", "image/png"),
        (
            "data:image/png;base64," + "\n".join(PNG_B64[i : i + 76] for i in range(0, 999, 76)),
            "image/png",
        ),
        (f"data:;base64,{PNG_B64.rstrip('=')}", None),
        (f"data:image/png;base64,{base64.urlsafe_b64encode(PNG).decode()}", "image/png"),
        ("data:image/png," + "".join(f"%{b:02x}" for b in PNG), "image/png"),
    ],
)
def test_data_uri_variants(uri: str, mime: str | None) -> None:
    assert decode_data_uri(uri) == (PNG, mime)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("data:image/png;base64", "malformed data URI"),
        ("image/png;base64,AAAA", "malformed data URI"),
        ("data:image/png;base64,iVBOR!!!", "not valid base64"),
        ("data:image/png;base64,", "empty"),
        ("data:image/png;base64,abcde", "not valid base64"),
        ("data:image/png;base64,ab=cd", "not valid base64"),
    ],
)
def test_bad_data_uri(uri: str, problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        decode_data_uri(uri)


def test_decode_base64_tolerates_url_safe_alphabet_and_missing_padding() -> None:
    raw = b"\xfb\xff\xbf\xfe\x01"
    assert decode_base64(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    assert decode_base64(" " + base64.b64encode(raw).decode() + "\r\n") == raw


@pytest.fixture
async def loader() -> AsyncIterator[ImageLoader]:
    settings = Settings(max_image_bytes=1_000_000, max_image_pixels=4_000_000)
    fetcher = Fetcher(timeout=2, max_bytes=1_000_000, allow_networks=["127.0.0.1/32"])
    yield ImageLoader(settings, fetcher)
    await fetcher.aclose()


async def test_loader_reads_data_uris_and_raw_base64(loader: ImageLoader) -> None:
    expected = InputImage(PNG, "image/png", 30, 20)
    assert await loader.load(f"  data:image/png;base64,{PNG_B64}\n", label="image") == expected
    assert await loader.load(PNG_B64, label="image") == expected
    assert await loader.load_base64(PNG_B64, "image/jpeg", label="inline_data") == expected


async def test_loader_fetches_urls(loader: ImageLoader) -> None:
    async def serve(writer: asyncio.StreamWriter) -> None:
        await respond(writer, 200, PNG, {"Content-Type": "application/octet-stream"})

    async with LoopbackServer({"/a.png": serve}) as server:
        image = await loader.load(server.url("/a.png"), label="image")
    assert (image.mime, image.width) == ("image/png", 30)


async def test_loader_verifies_what_it_fetches(loader: ImageLoader) -> None:
    async def serve(writer: asyncio.StreamWriter) -> None:
        await respond(writer, 200, encoded("GIF", mode="P"), {"Content-Type": "image/png"})

    async with LoopbackServer({"/a.png": serve}) as server:
        with pytest.raises(UnreadableImage, match="Image 3 is a GIF"):
            await loader.load(server.url("/a.png"), label="image 3")


async def test_loader_decodes_large_images_off_the_event_loop(loader: ImageLoader) -> None:
    data = noise_png(320)
    text = base64.b64encode(data).decode()
    assert len(text) > 256 * 1024
    image = await loader.load_base64(text, None, label="image")
    assert (image.data, image.width, image.height) == (data, 320, 320)


async def test_loader_refuses_oversized_base64_before_decoding(loader: ImageLoader) -> None:
    with pytest.raises(PayloadTooLarge, match="limit of 1000000 bytes"):
        await loader.load_base64("A" * 2_000_000, "image/png", label="image")


@pytest.mark.parametrize(
    "ref",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.png",
        "javascript:alert(1)",
        "C:\\images\\cat.png",
        "../cat.png",
        "images/cat.png",
        "~/cat.png",
        "/etc/passwd",
        "/var/lib/imagegate",
        "",
    ],
)
async def test_loader_refuses_other_references(ref: str, loader: ImageLoader) -> None:
    with pytest.raises(InvalidRequest, match=r"data URI \(data:image/png;base64,\.\.\.\)"):
        await loader.load(ref, label="image")


async def test_loader_names_the_image_in_errors(loader: ImageLoader) -> None:
    with pytest.raises(UnreadableImage, match=r"^content\[1\]\.image is not a recognizable"):
        await loader.load(
            base64.b64encode(b"hello world, not an image").decode(), label="content[1].image"
        )


@pytest.mark.parametrize(
    ("fmt", "mime", "options"),
    [
        ("PNG", "image/png", {}),
        ("JPEG", "image/jpeg", {}),
        ("WEBP", "image/webp", {}),
        ("WEBP", "image/webp", {"lossless": True}),
    ],
)
def test_sniff_b64_sizes_without_decoding_everything(
    fmt: str, mime: str, options: dict[str, object]
) -> None:
    import base64 as b64module

    from imagegate.images import sniff_b64

    buffer = io.BytesIO()
    Image.new("RGB", (300, 170), (10, 200, 30)).save(buffer, format=fmt, **options)
    assert sniff_b64(b64module.b64encode(buffer.getvalue()).decode()) == (mime, 300, 170)
    assert sniff_b64("bm90IGFuIGltYWdl") is None


def test_sniff_b64_reads_further_for_a_jpeg_with_large_metadata() -> None:
    import base64 as b64module

    from imagegate.images import sniff_b64

    buffer = io.BytesIO()
    # A 20 KB ICC profile puts the frame header past the first 4 KB of base64 text.
    Image.new("RGB", (50, 40)).save(buffer, format="JPEG", icc_profile=b"x" * 20_000)
    assert sniff_b64(b64module.b64encode(buffer.getvalue()).decode()) == ("image/jpeg", 50, 40)
    truncated_png = b64module.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 4).decode()
    assert sniff_b64(truncated_png) is None
