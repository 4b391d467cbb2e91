"""The seed document's three requests against a real `imagegate serve` process.

The server runs a tiny random Stable Diffusion pipeline, built from configs and loaded through
the real diffusers loading path; the CLI's `generate` is exercised as a client of it.
"""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.tiny_pipeline import build_tiny_sd

pytest.importorskip("diffusers")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    def __init__(self, url: str, key: str, env: dict[str, str]) -> None:
        self.url = url
        self.key = key
        self.env = env

    def post(self, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/images/generations",
            json=body,
            timeout=120,
            headers={"Authorization": f"Bearer {self.key}"},
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("e2e")
    model = build_tiny_sd(root / "tiny-sd")
    config = root / "imagegate.yaml"
    config.write_text(
        f"models:\n  - name: tiny-sd\n    provider: diffusers\n    options:\n"
        f"      path: {model}\n      local_files_only: true\n"
        f"    defaults:\n      size: 64x64\n      steps: 2\n"
    )
    port = _free_port()
    env = {
        **os.environ,
        "IMAGEGATE_DATA_DIR": str(root / "data"),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "IMAGEGATE_DATABASE_URL": "",
    }
    env.pop("IMAGEGATE_DATABASE_URL")
    log = root / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imagegate",
                "serve",
                "--port",
                str(port),
                "--config",
                str(config),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
        )
    try:
        key = _read_admin_key(process, log)
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, process)
        yield Server(url, key, env)
    finally:
        process.terminate()
        process.wait(timeout=20)


def _read_admin_key(process: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # Not a terminal: the server writes its first key to a private file and logs the path.
        if match := re.search(r"wrote it to (\S+) \(mode 600\)", log.read_text()):
            return Path(match[1]).read_text().strip()
        if process.poll() is not None:
            raise AssertionError(f"server exited before printing its key:\n{log.read_text()}")
        time.sleep(0.1)
    raise AssertionError("no admin key file named in the log within 60 s")


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "server exited"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("server not ready within 60 s")


def _png(width: int, height: int, colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _images(server: Server, response: httpx.Response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["code"] == 200 and body["msg"] == "Success"
    out = []
    for item in body["data"]["data"]:
        assert set(item) == {"url", "b64_json", "revised_prompt"}
        if item["b64_json"]:
            assert item["url"] == ""
            raw = base64.b64decode(item["b64_json"])
        else:
            assert item["url"].startswith(server.url + "/files/")
            fetched = httpx.get(item["url"], timeout=10)
            assert fetched.status_code == 200
            raw = fetched.content
        out.append(Image.open(io.BytesIO(raw)))
    return out


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_seed_text_to_image(server: Server, response_format: str) -> None:
    response = server.post(
        {
            "model": "tiny-sd",
            "response_format": response_format,
            "prompt": "A cute orange kitten sitting in a garden, sunny day",
        }
    )
    images = _images(server, response)
    assert [i.size for i in images] == [(64, 64)]


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_seed_image_to_image(server: Server, response_format: str) -> None:
    response = server.post(
        {
            "model": "tiny-sd",
            "response_format": response_format,
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "Generate a bird eye view of Canton Tower based on this image"},
                        {"image": _png(96, 64, (200, 30, 30))},
                    ],
                }
            ],
        }
    )
    assert [i.size for i in _images(server, response)] == [(96, 64)]


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_seed_multi_turn(server: Server, response_format: str) -> None:
    response = server.post(
        {
            "model": "tiny-sd",
            "response_format": response_format,
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "Generate a bird eye view of Canton Tower based on this image"},
                        {"image": _png(64, 64, (200, 30, 30))},
                    ],
                },
                {
                    "role": "model",
                    "parts": [
                        {"text": "Generated 1 image for you"},
                        {"image": _png(64, 128, (30, 30, 200))},
                    ],
                },
                {"role": "user", "parts": [{"text": "Change the scene to a snowy night"}]},
            ],
        }
    )
    assert [i.size for i in _images(server, response)] == [(64, 128)]


def test_seed_determinism_and_n(server: Server) -> None:
    body = {
        "model": "tiny-sd",
        "prompt": "lower",
        "response_format": "b64_json",
        "n": 2,
        "seed": 42,
    }
    first = server.post(body).json()["data"]["data"]
    second = server.post(body).json()["data"]["data"]
    assert len(first) == 2
    assert [i["b64_json"] for i in first] == [i["b64_json"] for i in second]
    assert first[0]["b64_json"] != first[1]["b64_json"]


def test_bad_size_is_a_clear_400(server: Server) -> None:
    response = server.post({"model": "tiny-sd", "prompt": "x", "size": "60x60"})
    assert response.status_code == 400
    assert "multiple" in response.json()["msg"] and response.json()["data"] is None


def test_cli_generate_against_the_server(server: Server, tmp_path: Path) -> None:
    reference = tmp_path / "ref.png"
    Image.new("RGB", (72, 72), (0, 200, 0)).save(reference)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "imagegate",
            "generate",
            "a green field",
            "--model",
            "tiny-sd",
            "-n",
            "2",
            "--image",
            str(reference),
            "--server",
            server.url,
            "--key",
            server.key,
            "-o",
            str(tmp_path / "out.png"),
        ],
        capture_output=True,
        text=True,
        env=server.env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outputs = [tmp_path / "out-1.png", tmp_path / "out-2.png"]
    assert [_size_of(p) for p in outputs] == [(72, 72), (72, 72)]
    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "imagegate",
            "generate",
            "x",
            "--model",
            "nope",
            "--server",
            server.url,
            "--key",
            server.key,
        ],
        capture_output=True,
        text=True,
        env=server.env,
        timeout=60,
        check=False,
    )
    assert failed.returncode != 0 and "Unknown model 'nope'" in failed.stderr


def test_lab_get_token_and_the_seed_img2img_submit_in_all_three_forms(server: Server) -> None:
    """The second seed document's flow against the running server: a user made with the CLI,
    getToken, then img2imgSubmit in the documented flat form, the nested form and the form
    Nebula's own site sends."""
    subprocess.run(
        [sys.executable, "-m", "imagegate", "users", "create", "e2e-user"],
        env={**server.env, "IMAGEGATE_USER_PASSWORD": "e2e password"},
        check=True,
        capture_output=True,
        timeout=60,
    )
    login = httpx.post(
        f"{server.url}/prod-api/v3/auth/getToken",
        json={"username": "e2e-user", "password": "e2e password"},
        timeout=30,
    )
    assert login.status_code == 200, login.text
    assert login.json()["msg"] == "Operation successful"
    token = login.json()["data"]
    assert token.startswith("Bearer ")
    fields = {
        "model": "tiny-sd",
        "prompt": "Generate a bird eye view of Canton Tower based on this image",
        "n": 1,
        "size": "64x64",
        "temperature": 1,
        "watermark": False,
        "image": _png(64, 64, (200, 30, 30)),
        "responseFormat": "url",
    }
    forms = [
        {f"batchImageGenerationDTO.{k}": v for k, v in fields.items()},
        {"batchImageGenerationDTO": fields},
        {
            "score": "1",
            "model": "tiny-sd",
            "volcImageBo": {
                "image_urls": [fields["image"]],
                "prompt": fields["prompt"],
                "size": "64x64",
                "style": "general",
            },
        },
    ]
    for body in forms:
        response = httpx.post(
            f"{server.url}/prod-api/nebula/v4/api/img2imgSubmit",
            json=body,
            headers={"Authorization": token},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        got = response.json()
        assert got["code"] == 200 and got["msg"] == "Operation successful"
        [image] = got["data"]["images"]
        fetched = httpx.get(image["url"], timeout=10)
        assert fetched.status_code == 200
        assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)


def test_cli_reload_asks_the_running_server(server: Server) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "imagegate", "reload", "--server", server.url, "--key", server.key],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["added: -", "removed: -", "changed: -"]
    refused = subprocess.run(
        [sys.executable, "-m", "imagegate", "reload", "--server", server.url, "--key", "sk-bad"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "Invalid" in refused.stderr
