"""CLI commands that are clients of a running server: `generate` and `reload`."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import click
import httpx
from PIL import Image

from imagegate.images import detect_format

# What each output extension means; the server's bytes are re-encoded when they differ.
_EXTENSIONS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
_FORMATS = ("png", "jpeg", "webp")


@click.command()
@click.argument("prompt")
@click.option("--model", required=True, help="Model name (see `imagegate models`).")
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Reference image (repeatable).",
)
@click.option("-n", "n", type=int, default=1, show_default=True)
@click.option("--size", default=None, help="e.g. 512x512, 16:9 or 1K.")
@click.option("--seed", type=int, default=None)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("out.png"),
    show_default=True,
    help="Output file, in the format its extension names (.png, .jpg, .webp); with -n > 1, "
    "name-1.png, name-2.png, ...",
)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(_FORMATS),
    default=None,
    help="Image format (default: the one the -o extension names).",
)
@click.option("--server", default="http://127.0.0.1:8000", show_default=True)
@click.option(
    "--key", envvar="IMAGEGATE_API_KEY", required=True, help="API key (or set IMAGEGATE_API_KEY)."
)
@click.option("--timeout", type=float, default=600.0, show_default=True)
def generate(
    prompt: str,
    model: str,
    images: tuple[Path, ...],
    n: int,
    size: str | None,
    seed: int | None,
    output: Path,
    image_format: str | None,
    server: str,
    key: str,
    timeout: float,
) -> None:
    """Generate images through a running server and save them."""
    fmt = _output_format(output, image_format)
    body: dict[str, Any] = {"model": model, "prompt": prompt, "n": n, "response_format": "b64_json"}
    if size:
        body["size"] = size
    if seed is not None:
        body["seed"] = seed
    if images:
        body["images"] = [_data_uri(p) for p in images]
    try:
        response = httpx.post(
            f"{server.rstrip('/')}/v1/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise click.ClickException(f"Cannot reach {server}: {exc}") from exc
    payload = response.json()
    if response.status_code != 200:
        raise click.ClickException(f"{response.status_code}: {_error_text(payload)}")
    items = payload["data"]["data"] if "code" in payload else payload["data"]
    for path, item in zip(_output_paths(output, len(items)), items, strict=True):
        path.write_bytes(_encoded(base64.b64decode(item["b64_json"]), fmt))
        click.echo(str(path))


def _output_format(output: Path, chosen: str | None) -> str:
    """The format to write: --format, else the extension's; both given, they must agree."""
    implied = _EXTENSIONS.get(output.suffix.lower())
    if chosen is None and implied is None:
        raise click.BadParameter(
            f"{output.name!r} names no image format: end it in .png, .jpg or .webp, "
            "or give --format.",
            param_hint="'-o' / '--output'",
        )
    if chosen is not None and implied is not None and chosen != implied:
        raise click.BadParameter(
            f"--format {chosen} but {output.name!r} ends in {output.suffix}: "
            "drop --format, or change the extension.",
            param_hint="'--format'",
        )
    return chosen or implied or "png"


def _encoded(data: bytes, fmt: str) -> bytes:
    """`data` in format `fmt`: as it came when it already is, else re-encoded."""
    if (detect_format(data) or "").lower() == fmt:
        return data
    with Image.open(io.BytesIO(data)) as image:
        keep_alpha = fmt != "jpeg" or image.mode in ("RGB", "L")
        picture = image if keep_alpha else image.convert("RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt.upper(), **({} if fmt == "png" else {"quality": 95}))
    return buffer.getvalue()


@click.command()
@click.option("--server", default="http://127.0.0.1:8000", show_default=True)
@click.option("--key", envvar="IMAGEGATE_KEY", required=True, help="An admin key.")
def reload(server: str, key: str) -> None:
    """Make a running server re-read its model config (POST /admin/models/reload)."""
    try:
        response = httpx.post(
            f"{server.rstrip('/')}/admin/models/reload",
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
    except httpx.HTTPError as exc:
        raise click.ClickException(f"Cannot reach {server}: {exc}") from exc
    if response.status_code != 200:
        raise click.ClickException(_error_text(response.json()))
    changes = response.json()["data"]
    for kind in ("added", "removed", "changed"):
        click.echo(f"{kind}: {', '.join(changes[kind]) or '-'}")


def _data_uri(path: Path) -> str:
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(
        path.suffix.lower(), "image/png"
    )
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _error_text(payload: Any) -> str:
    if isinstance(payload, dict):
        if "msg" in payload:
            return str(payload["msg"])
        if isinstance(payload.get("error"), dict):
            return str(payload["error"].get("message"))
    return str(payload)


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, count + 1)]
