"""Local storage and signed links."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagegate.storage.local import LocalStorage
from imagegate.storage.signing import UrlSigner


async def test_put_and_open_round_trip(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    key = await storage.put(b"\x89PNG data", mime="image/png")
    stored = await storage.open(key)
    assert stored is not None and stored.mime == "image/png"
    assert stored.path.read_bytes() == b"\x89PNG data"
    assert stored.path.resolve().is_relative_to(tmp_path.resolve())  # noqa: ASYNC240


@pytest.mark.parametrize(
    "key",
    [
        "../secret.key",
        "/etc/passwd",
        "2026/01/01/../../x.png",
        "2026/01/01/" + "g" * 32 + ".png",
        "secret.key",
        "",
    ],
)
async def test_open_refuses_anything_not_made_by_put(tmp_path: Path, key: str) -> None:
    (tmp_path / "secret.key").write_text("x")
    assert await LocalStorage(tmp_path / "images").open(key) is None


async def test_put_refuses_unknown_types(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot store image/gif"):
        await LocalStorage(tmp_path).put(b"GIF89a", mime="image/gif")


def test_signed_url_verifies_and_expires() -> None:
    signer = UrlSigner(b"k", ttl_seconds=60)
    url = signer.url("http://h:1/", "2026/01/01/abc.png", now=1000)
    assert url.startswith("http://h:1/files/2026/01/01/abc.png?expires=1060&signature=")
    signature = url.rsplit("=", 1)[1]
    assert signer.verify("2026/01/01/abc.png", 1060, signature, now=1059)
    assert not signer.verify("2026/01/01/abc.png", 1060, signature, now=1061)
    assert not signer.verify("2026/01/01/abd.png", 1060, signature, now=1000)
    assert not UrlSigner(b"other", 60).verify("2026/01/01/abc.png", 1060, signature, now=1000)
