"""The clients matrix (docs/clients.md), one test per row: each drives the real client library,
or program, against one real `imagegate serve` on 127.0.0.1 serving the bundled demo model
(configured as a user would, with small defaults so that the file runs in seconds).

The Node SDK runs from tests/node/ (`npm ci --prefix tests/node`, which `make test` and CI do);
without `node` that one test is skipped, except in CI, where it fails.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image

from imagegate.cli import main
from imagegate.config import DEMO_WEIGHTS
from tests.servers import ROOT, stop
from tests.test_server_e2e import _free_port, _wait_ready

pytest.importorskip("diffusers")

DEMO = "imagegate-demo"
NODE_DIR = ROOT / "tests" / "node"
PASSWORD = "a long lab password"


@dataclass
class Gateway:
    url: str
    key: str
    env: dict[str, str]
    root: Path
    log: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def openai(self, path: str = "/openai/v1") -> openai.OpenAI:
        return openai.OpenAI(api_key=self.key, base_url=self.url + path, max_retries=0)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("clients")
    env = {
        **os.environ,
        "IMAGEGATE_DATA_DIR": str(root / "data"),
        "IMAGEGATE_BOOTSTRAP_ADMIN": "false",
        # The Lab test hands the server a link to an image it made itself.
        "IMAGEGATE_FETCH_ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "IMAGEGATE_USER_PASSWORD": PASSWORD,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }
    for name in ("IMAGEGATE_DATABASE_URL", "IMAGEGATE_CONFIG_FILE", "IMAGEGATE_LOG_FORMAT"):
        env.pop(name, None)
    (root / "imagegate.yaml").write_text(
        f"models:\n  - name: {DEMO}\n    provider: diffusers\n    options:\n"
        f"      path: {DEMO_WEIGHTS}\n      pipeline_class: imagegate.demo.pipeline:DemoPipeline\n"
        "    defaults:\n      size: 64x64\n      steps: 4\n"
    )
    names = {name for name in [*os.environ, *env] if name.startswith("IMAGEGATE_")}
    runner = CliRunner(env={name: env.get(name) for name in names})  # None: unset
    made = runner.invoke(main, ["keys", "create", "clients"])
    assert made.exit_code == 0, made.output
    assert runner.invoke(main, ["users", "create", "lab-user"]).exit_code == 0
    port, log = _free_port(), root / "serve.log"
    with log.open("w") as out:  # in `root`: ./imagegate.yaml is its config
        process = subprocess.Popen(
            [sys.executable, "-m", "imagegate", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, process)
        yield Gateway(url, made.output.strip(), env, root, log)
    finally:
        stop(process)


def _size(data: bytes, fmt: str = "PNG") -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == fmt
        return image.size


def _b64_size(b64: str | None) -> tuple[int, int]:
    assert b64
    return _size(base64.b64decode(b64))


def _items(answer: openai.types.ImagesResponse) -> list[openai.types.Image]:
    assert answer.data
    return answer.data


def _fetched_size(url: str | None) -> tuple[int, int]:
    assert url
    return _size(httpx.get(url, timeout=30).raise_for_status().content)


def test_the_first_screen_of_a_server_start_is_clean(gateway: Gateway) -> None:
    """Up to the demo model's load (on its first request), every line is one of our log lines,
    and a library's only at INFO: no torchvision notices from transformers, no advice to
    install accelerate, no progress bar."""
    body = {"model": DEMO, "prompt": "a red circle"}
    made = httpx.post(
        f"{gateway.url}/v1/images/generations", json=body, headers=gateway.auth, timeout=120
    )
    assert made.status_code == 200, made.text
    text = gateway.log.read_text()
    screen = text[: text.index("\n", text.index("loaded DemoPipeline"))].splitlines()
    ours = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\w+) ([\w.]+) \[[-\w]+\] ")
    found = [(line, ours.match(line)) for line in screen]
    # Our own warnings may be there (another test's refused request); a library's may not.
    strays = [
        line for line, m in found if not m or (m[1] != "INFO" and not m[2].startswith("imagegate."))
    ]
    assert strays == [], text
    assert any("Uvicorn running on" in line for line in screen)


def test_openai_python_sdk(gateway: Gateway) -> None:
    client = gateway.openai()
    made = client.images.generate(
        model=DEMO,
        prompt="a red circle on a blue background",
        n=2,
        size="64x64",
        response_format="b64_json",
    )
    assert [_b64_size(item.b64_json) for item in _items(made)] == [(64, 64), (64, 64)]
    picture = base64.b64decode(_items(made)[0].b64_json or "")
    image = ("in.png", picture, "image/png")
    edit = client.images.edit(model=DEMO, image=image, prompt="now make the circle green")
    assert _b64_size(_items(edit)[0].b64_json) == (64, 64)  # base64 by default, as gpt-image's
    mask = io.BytesIO()
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(mask, format="PNG")  # all of it may change
    masked = client.images.edit(
        model=DEMO, image=image, mask=("mask.png", mask.getvalue(), "image/png"), prompt="green"
    )
    assert _b64_size(_items(masked)[0].b64_json) == (64, 64)
    with pytest.warns(DeprecationWarning, match="deprecated"):  # the SDK marks dall-e-2's call
        variation = client.images.create_variation(model=DEMO, image=image, response_format="url")
    assert _fetched_size(_items(variation)[0].url) == (64, 64)
    jpeg = client.images.generate(model=DEMO, prompt="a blue square", output_format="jpeg")
    assert _size(base64.b64decode(_items(jpeg)[0].b64_json or ""), "JPEG") == (64, 64)
    assert DEMO in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.images.generate(model="nope", prompt="x")
    assert "/openai/v1/models" in unknown.value.message
    # Known limit: one reference image per edit on local models.
    with pytest.raises(openai.BadRequestError) as two:
        client.images.edit(model=DEMO, image=[image, image], prompt="x")
    assert "takes one reference image" in two.value.message
    streamed = list(client.images.generate(model=DEMO, prompt="x", stream=True))
    assert [event.type for event in streamed] == ["image_generation.completed"]
    # Pointed at /v1, the SDK still gets OpenAI's shape (its X-Stainless headers say who it is).
    plain = gateway.openai("/v1").images.generate(
        model=DEMO, prompt="a green star", response_format="url"
    )
    assert _fetched_size(_items(plain)[0].url) == (64, 64)


def test_openai_node_sdk(gateway: Gateway) -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install node (and run `npm ci --prefix tests/node`)")
        pytest.skip("node is not installed: the OpenAI Node SDK cannot run here")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        npm = shutil.which("npm")
        assert npm, "node without npm: install npm, then `npm ci --prefix tests/node`"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)
    env = {"IMAGEGATE_URL": gateway.url, "IMAGEGATE_KEY": gateway.key, "IMAGEGATE_MODEL": DEMO}
    done = subprocess.run(
        [node, "images.mjs"],
        cwd=NODE_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["generate"] == [[64, 64], [64, 64]] and got["edit"] == [[64, 64]]
    assert [_fetched_size(url) for url in got["v1_url"]] == [(64, 64)]
    assert DEMO in got["models"]
    assert got["unknown_model"]["status"] == 404
    assert "/openai/v1/models" in got["unknown_model"]["message"]
    assert got["bad_key"]["status"] == 401


def test_google_genai(gateway: Gateway) -> None:
    options = types.HttpOptions(base_url=gateway.url)
    with genai.Client(api_key=gateway.key, http_options=options) as client:
        reply = client.models.generate_content(model=DEMO, contents="a red circle")
        chat = client.chats.create(model=DEMO)  # multi-turn: the second turn edits the first
        chat.send_message("a red circle on a blue background")
        edited = chat.send_message("now make the circle green")
        chunks = list(client.models.generate_content_stream(model=DEMO, contents="a blue square"))
        names = [m.name for m in client.models.list()]
        model = client.models.get(model=DEMO)
        with pytest.raises(genai_errors.ClientError) as unknown:
            client.models.generate_content(model="nope", contents="x")
    for answer in (reply, edited, *chunks):
        [image] = _inline_images(answer)
        assert image.mime_type == "image/png" and _size(image.data or b"") == (64, 64)
    assert len(chunks) == 1  # the image comes whole, in one chunk
    assert f"models/{DEMO}" in names and model.name == f"models/{DEMO}"
    assert (unknown.value.code, unknown.value.status) == (404, "NOT_FOUND")


def _inline_images(reply: types.GenerateContentResponse) -> list[types.Blob]:
    content = reply.candidates[0].content if reply.candidates else None
    return [p.inline_data for p in (content.parts if content else None) or [] if p.inline_data]


# LiteLLM's GitHub Copilot module, imported on its first call, warns about its own TypedDict.
@pytest.mark.filterwarnings("ignore:Item.*using the `ReadOnly` qualifier:UserWarning")
def test_litellm(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list
    litellm = pytest.importorskip("litellm")
    made: Any = litellm.image_generation(
        model=f"openai/{DEMO}",
        prompt="a red circle",
        api_base=f"{gateway.url}/openai/v1",
        api_key=gateway.key,
    )
    assert [_b64_size(item.b64_json) for item in made.data] == [(64, 64)]  # imagegate's default
    # LiteLLM refuses response_format for a model it does not know; extra_body passes it on.
    linked: Any = litellm.image_generation(
        model=f"openai/{DEMO}",
        prompt="a green star",
        api_base=f"{gateway.url}/v1",
        api_key=gateway.key,
        extra_body={"response_format": "url"},
    )
    assert _fetched_size(linked.data[0].url) == (64, 64)
    picture = io.BytesIO(base64.b64decode(made.data[0].b64_json))
    picture.name = "in.png"
    edited: Any = litellm.image_edit(
        model=f"openai/{DEMO}",
        image=picture,
        prompt="now make it green",
        api_base=f"{gateway.url}/openai/v1",
        api_key=gateway.key,
    )
    assert [_b64_size(item.b64_json) for item in edited.data] == [(64, 64)]
    # Known limit: LiteLLM's gemini/ image generation calls Imagen's :predict, not served.
    with pytest.raises(litellm.NotFoundError, match=r"No such endpoint: POST /\S+:predict"):
        litellm.image_generation(
            model=f"gemini/{DEMO}", prompt="x", api_base=gateway.url, api_key=gateway.key
        )


def _curl(*args: str, ok: bool = True) -> Any:
    curl = shutil.which("curl")
    if curl is None and os.environ.get("CI"):
        pytest.fail("CI must have curl")
    if curl is None:
        pytest.skip("curl is not installed")
    done = subprocess.run(
        [curl, "-sS", "--fail-with-body", *args], capture_output=True, text=True, timeout=120
    )
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_curl_nebula_dialect(gateway: Gateway) -> None:
    url, auth = f"{gateway.url}/v1/images/generations", f"Authorization: Bearer {gateway.key}"
    body = json.dumps({"model": DEMO, "prompt": "a red circle", "response_format": "b64_json"})
    typed = _curl(url, "-H", auth, "-H", "Content-Type: application/json", "-d", body)
    assert (typed["code"], typed["msg"]) == (200, "Success")
    assert [_b64_size(item["b64_json"]) for item in typed["data"]["data"]] == [(64, 64)]
    untyped = _curl(url, "-H", auth, "-d", body)  # curl -d says form-urlencoded: JSON all the same
    assert [_b64_size(item["b64_json"]) for item in untyped["data"]["data"]] == [(64, 64)]
    # Known limit: a form body is not read.
    form = _curl(url, "-H", auth, "-F", f"model={DEMO}", "-F", "prompt=x", ok=False)
    assert form["code"] == 400 and "must be a JSON object" in form["msg"]


def test_lab_client_flow(gateway: Gateway) -> None:
    """The Lab v4 seed's flow with plain HTTP: getToken; text2imageSubmit as a task, queried
    with imageTaskQuery; then img2imgSubmit with every field of the seed's full example,
    given the link to that image."""
    login = httpx.post(
        f"{gateway.url}/prod-api/v3/auth/getToken",
        json={"username": "lab-user", "password": PASSWORD},
        timeout=30,
    )
    assert login.json()["msg"] == "Operation successful", login.text
    token = {"Authorization": login.json()["data"]}
    lab = f"{gateway.url}/prod-api/nebula/v4/api"
    body = {"req": {"model": DEMO, "prompt": "a red circle on a blue background"}, "async": True}
    task = httpx.post(f"{lab}/text2imageSubmit", json=body, headers=token, timeout=30)
    assert task.status_code == 202, task.text
    made = _finished(f"{lab}/imageTaskQuery/{task.json()['data']['taskId']}", token)
    seed = {
        "model": DEMO,
        "prompt": "now make the circle green",
        "n": 1,
        "size": "64x64",
        "temperature": 123,
        "watermark": True,
        "image": made["images"][0]["url"],
        "promptOptions": {},
        "optimizePrompt": "",
        "quality": "",
        "responseFormat": "url",
        "score": 123,
        "sequentialImageGeneration": "disabled",
        "sequentialImageGenerationOptions": {},
    }
    flat = {f"batchImageGenerationDTO.{name}": value for name, value in seed.items()}
    edit = httpx.post(f"{lab}/img2imgSubmit", json=flat, headers=token, timeout=120)
    assert edit.status_code == 200, edit.text
    assert edit.json()["msg"] == "Operation successful"
    assert [_fetched_size(i["url"]) for i in edit.json()["data"]["images"]] == [(64, 64)]
    # Known limit: a field that asks for what the model cannot do is refused, by the name sent.
    hd = {**flat, "batchImageGenerationDTO.quality": "hd"}
    refused = httpx.post(f"{lab}/img2imgSubmit", json=hd, headers=token, timeout=30)
    assert refused.status_code == 400 and "batchImageGenerationDTO.quality" in refused.text


def _finished(url: str, headers: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        task: dict[str, Any] = httpx.get(url, headers=headers, timeout=30).json()["data"]
        if task["status"] not in ("queued", "in_progress"):
            assert task["status"] == "succeeded", task
            return task
        time.sleep(0.2)
    raise AssertionError(f"task {url} not finished within 60 s")


def test_imagegate_cli_writes_the_format_its_output_names(gateway: Gateway) -> None:
    out = gateway.root / "cli"
    out.mkdir()
    common = ["generate", "a red circle", "--model", DEMO, "--server", gateway.url]
    common += ["--key", gateway.key]
    runner = CliRunner()
    jpeg = runner.invoke(main, [*common, "-n", "2", "-o", str(out / "pic.jpg")])
    assert jpeg.exit_code == 0, jpeg.output
    assert [_size((out / f"pic-{i}.jpg").read_bytes(), "JPEG") for i in (1, 2)] == [(64, 64)] * 2
    webp = runner.invoke(main, [*common, "-o", str(out / "pic.img"), "--format", "webp"])
    assert webp.exit_code == 0, webp.output
    assert _size((out / "pic.img").read_bytes(), "WEBP") == (64, 64)
