"""Hypothesis against the real app (SQLite, fake provider): bodies shaped like each dialect's
wire models, every field either a plausible value or junk (huge and negative integers, floats,
booleans, long strings, nested lists and objects), and outright junk bodies. Whatever arrives,
the answer is never a 5xx and always has the dialect's shape: its success body, or its error
body with a message.

Derandomized, so a run is the same run each time; about 20-40 s on two cores.
"""

from __future__ import annotations

import base64
import copy
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagegate.config import ModelConfig, PricingConfig
from tests.conftest import FAKE_MODELS, Api, make_settings, start_api

MODELS = [
    *FAKE_MODELS,
    ModelConfig(name="priced", provider="fake", pricing=PricingConfig(per_image=0.002)),
]
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PNG = _png()


@dataclass
class Fuzz:
    api: Api
    key: str
    """A key with an images-per-minute limit and a balance, so that limits and prices run."""

    async def post(self, path: str, body: Any) -> Any:
        content = json.dumps(body, allow_nan=True).encode()
        return await self.api.client.post(
            path,
            content=content,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )


@pytest.fixture
async def fuzz(tmp_path: Path) -> AsyncIterator[Fuzz]:
    db = f"sqlite+aiosqlite:///{tmp_path / 'fuzz.db'}"
    config = make_settings(tmp_path, db, lab_default_model="fake-model", task_workers=0)
    async for api in start_api(config, MODELS):
        key = await api.key()
        principal = await api.app.state.auth.authenticate(key)
        admin = {"Authorization": f"Bearer {await api.key(admin=True)}"}
        for path, body in (("limits", {"ipm": 10**6}), ("balance", {"balance": 10**9})):
            response = await api.client.put(
                f"/admin/keys/{principal.key_id}/{path}", json=body, headers=admin
            )
            assert response.status_code == 200, response.text
        api.app.state.auth.forget_key(principal.key_id)
        yield Fuzz(api, key)


# ---- values ----------------------------------------------------------------------------------

EDGE_INTS = [0, 1, -1, 2, 4, 5, 16, 17, 2**31 - 1, 2**31, 2**32, 2**63, 2**64, -(2**64), 10**30]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(EDGE_INTS),
    st.floats(),
    st.sampled_from([1e308, -1e308, 0.5, 1.0]),
    st.text(max_size=12),
    st.sampled_from(["", " ", "x" * 40_000, "abc", "red", "true", "yes", "1", "\x00"]),
)
junk = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
ints = st.one_of(st.integers(min_value=-2, max_value=5), st.sampled_from(EDGE_INTS))
# Mostly good values, so that requests get past the first check.
models = st.sampled_from(["fake-model", "priced"] * 4 + ["no-such-model", "m" * 201])
prompts = st.one_of(
    st.sampled_from(["red", "a blue square"] * 4 + ["x" * 32_001, "   "]), st.text(max_size=20)
)
# Small sizes only: the fake provider draws whatever it is asked for.
sizes = st.sampled_from(["8x8", "16x16", "16:9", "1:1", "0x8", "8x", "abc", "", "9" * 50, "2*2"])
images = st.sampled_from(
    [PNG, f"data:image/png;base64,{PNG}", "not base64", "", "data:text/plain;base64,eA=="]
)
callbacks = st.sampled_from(["not a url", "ftp://x", "http://127.0.0.1:9/hook"])


DELETE = object()
"""A mutation that removes the field (required ones included)."""


def set_path(body: Any, path: str, value: Any) -> None:
    """body[a][b][c] = value for path "a/b/c" (a number steps into a list), making objects on
    the way; a step that is neither (an earlier mutation made it junk) leaves the body be."""
    *parents, last = path.split("/")
    for step in parents:
        if isinstance(body, list) and step.isdigit() and int(step) < len(body):
            body = body[int(step)]
        elif isinstance(body, dict):
            body = body.setdefault(step, {})
        else:
            return
    if not isinstance(body, dict):
        return
    if value is DELETE:
        body.pop(last, None)
    else:
        body[last] = value


@st.composite
def mutated(
    draw: st.DrawFn, bases: list[dict[str, Any]], fields: dict[str, st.SearchStrategy[Any]]
) -> Any:
    """A valid body with up to three fields changed, each to a plausible value, to junk, or
    removed: with many fields changed at once one would almost always be junk, and nothing
    past the first check would run."""
    body = copy.deepcopy(draw(st.sampled_from(bases)))
    for path in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        set_path(body, path, draw(st.one_of(fields[path], junk, st.just(DELETE))))
    return body


# ---- each dialect's bodies -------------------------------------------------------------------

v1_parts = st.lists(
    st.fixed_dictionaries({}, optional={"text": prompts, "image": images}), max_size=3
)
V1_BASES = [
    {"model": "fake-model", "prompt": "red"},
    {"model": "priced", "prompt": "a blue square", "response_format": "b64_json"},
    {"model": "fake-model", "contents": [{"role": "user", "parts": [{"text": "red"}]}]},
    {"model": "priced", "prompt": "edit it", "image": f"data:image/png;base64,{PNG}"},
]
V1_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": models,
    "prompt": prompts,
    "n": ints,
    "size": sizes,
    "seed": ints,
    "negative_prompt": prompts,
    "num_inference_steps": ints,
    "guidance_scale": st.floats(min_value=-1, max_value=200),
    "strength": st.floats(min_value=-1, max_value=2),
    "watermark": st.booleans(),
    "response_format": st.sampled_from(["url", "b64_json", "png"]),
    "output_format": st.sampled_from(["png", "jpg", "gif"]),
    "quality": st.sampled_from(["high", "auto"]),
    "contents": st.lists(
        st.fixed_dictionaries(
            {"parts": v1_parts}, optional={"role": st.sampled_from(["user", "model"])}
        ),
        max_size=3,
    ),
    "contents/0/parts": v1_parts,
    "image": st.one_of(images, st.lists(images, max_size=2)),
    "images": st.lists(images, max_size=2),
    "sequential_image_generation": st.sampled_from(["auto", "disabled", "x"]),
    "sequential_image_generation_options/max_images": ints,
    "sequential_image_generation_options/other": junk,
    "parameters/n": ints,
    "parameters/seed": ints,
    "parameters/size": sizes,
    "parameters/negative_prompt": prompts,
    "parameters/watermark": st.booleans(),
    "parameters/other": junk,
    "extra/input/messages": st.lists(
        st.fixed_dictionaries({"content": st.lists(st.fixed_dictionaries({"text": prompts}))}),
        max_size=2,
    ),
    "extra/parameters/n": ints,
    "extra/other": junk,
    "output_compression": ints,
    "temperature": st.floats(),
    "async": st.booleans(),
    "callback_url": callbacks,
    "unknown": junk,
}
v1_bodies = mutated(V1_BASES, V1_FIELDS)

DTO = "batchImageGenerationDTO"
DATA_URI = f"data:image/png;base64,{PNG}"
LAB_ENVELOPE: dict[str, st.SearchStrategy[Any]] = {
    "async": st.booleans(),
    "callbackUrl": callbacks,
    "score": junk,
    "model": models,
    "unknown": junk,
}
LAB_DTO: dict[str, st.SearchStrategy[Any]] = {
    "model": models,
    "prompt": prompts,
    "n": ints,
    "size": sizes,
    "temperature": st.floats(),
    "watermark": st.booleans(),
    "image": st.one_of(images, st.lists(images, max_size=2)),
    "promptOptions": junk,
    "optimizePrompt": st.sampled_from(["standard", "false", "zzz"]),
    "responseFormat": st.sampled_from(["url", "b64", "nope"]),
    "sequentialImageGeneration": st.sampled_from(["auto", "disabled"]),
    "sequentialImageGenerationOptions/max_images": ints,
}
LAB_REQ: dict[str, st.SearchStrategy[Any]] = {
    "prompt": prompts,
    "size": sizes,
    "value": sizes,
    "width": ints,
    "height": ints,
    "req_key": st.text(max_size=8),
    "return_url": st.booleans(),
    "model": models,
}
LAB_VOLC: dict[str, st.SearchStrategy[Any]] = {
    "prompt": prompts,
    "image_urls": st.lists(images, max_size=2),
    "size": sizes,
    "style": st.text(max_size=5),
    "model": models,
}


def under(prefix: str, fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    return {f"{prefix}/{name}": values for name, values in fields.items()}


def flatten(body: Any) -> Any:
    """The documented flat form: {"batchImageGenerationDTO.prompt": ...}."""
    inner = body.get(DTO) if isinstance(body, dict) else None
    if not isinstance(inner, dict):
        return body
    rest = {k: v for k, v in body.items() if k != DTO}
    return {**rest, **{f"{DTO}.{k}": v for k, v in inner.items()}}


lab_dto = mutated(
    [
        {DTO: {"model": "fake-model", "prompt": "red", "n": 1, "watermark": False}},
        {DTO: {"model": "priced", "prompt": "red", "image": DATA_URI}},
    ],
    {**under(DTO, LAB_DTO), **LAB_ENVELOPE},
)
img2img_bodies = st.one_of(
    lab_dto,
    st.builds(flatten, lab_dto),
    mutated(
        [{"volcImageBo": {"prompt": "red", "image_urls": [DATA_URI]}}],
        {**under("volcImageBo", LAB_VOLC), **LAB_ENVELOPE},
    ),
)
text2image_bodies = st.one_of(
    mutated([{"req": {"prompt": "red", "size": "8x8"}}], {**under("req", LAB_REQ), **LAB_ENVELOPE}),
    mutated(
        [{"volcEngineReqDTO": {"req": {"prompt": "red", "width": 8, "height": 8}}}],
        {**under("volcEngineReqDTO/req", LAB_REQ), **LAB_ENVELOPE},
    ),
)

OPENAI_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": models,
    "prompt": prompts,
    "n": ints,
    "size": sizes,
    "quality": st.sampled_from(["auto", "high"]),
    "response_format": st.sampled_from(["url", "b64_json", "x"]),
    "output_format": st.sampled_from(["png", "jpeg", "gif"]),
    "output_compression": ints,
    "background": st.sampled_from(["auto", "transparent"]),
    "moderation": st.sampled_from(["auto", "low"]),
    "stream": st.booleans(),
    "partial_images": ints,
    "user": st.text(max_size=8),
    "unknown": junk,
}
generations_bodies = mutated(
    [{"model": "fake-model", "prompt": "red"}, {"model": "priced", "prompt": "red", "n": 2}],
    {**OPENAI_FIELDS, "style": st.sampled_from(["vivid", "natural"])},
)
edits_bodies = mutated(
    [{"model": "fake-model", "prompt": "red", "images": [{"image_url": DATA_URI}]}],
    {
        **OPENAI_FIELDS,
        "input_fidelity": st.sampled_from(["high", "low"]),
        "images": st.lists(st.fixed_dictionaries({"image_url": images}), max_size=2),
        "mask": st.fixed_dictionaries({}, optional={"image_url": images, "file_id": st.text()}),
    },
)

gemini_parts = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "text": prompts,
            "inlineData": st.fixed_dictionaries(
                {"data": st.sampled_from([PNG, "nope"])},
                optional={"mimeType": st.sampled_from(["image/png", "text/plain"])},
            ),
            "thought": st.booleans(),
            "thoughtSignature": st.text(max_size=6),
            "fileData": st.fixed_dictionaries({"fileUri": st.text(max_size=8)}),
        },
    ),
    max_size=3,
)
GEMINI_BASES = [
    {"contents": [{"parts": [{"text": "red"}]}]},
    {"contents": [{"role": "user", "parts": [{"text": "edit"}, {"inlineData": {"data": PNG}}]}]},
    {"contents": [{"parts": [{"text": "red"}]}], "generationConfig": {"candidateCount": 2}},
]
GEMINI_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "contents": st.lists(
        st.fixed_dictionaries(
            {"parts": gemini_parts},
            optional={"role": st.sampled_from(["user", "model", "system"])},
        ),
        max_size=3,
    ),
    "contents/0/parts": gemini_parts,
    "generationConfig/candidateCount": ints,
    "generationConfig/seed": ints,
    "generationConfig/temperature": st.floats(),
    "generationConfig/topK": st.floats(),
    "generationConfig/responseModalities": st.lists(st.sampled_from(["IMAGE", "TEXT", "AUDIO"])),
    "generationConfig/imageConfig/aspectRatio": sizes,
    "generationConfig/imageConfig/imageSize": st.sampled_from(["1K", "9K", "x"]),
    "generationConfig/imageConfig/outputMimeType": st.sampled_from(["image/png", "image/gif"]),
    "generationConfig/imageConfig/personGeneration": st.sampled_from(["ALLOW_ALL"]),
    "systemInstruction/parts": gemini_parts,
    "safetySettings": st.lists(
        st.fixed_dictionaries({"category": st.text(max_size=5), "threshold": st.text(max_size=5)})
    ),
    "tools": junk,
    "cachedContent": st.text(max_size=5),
}
gemini_bodies = mutated(GEMINI_BASES, GEMINI_FIELDS)
gemini_models = st.sampled_from(["fake-model", "priced"] * 3 + ["no-such-model", "m" * 300])


# ---- the shapes ------------------------------------------------------------------------------


def nebula_shape(response: Any) -> None:
    """{code, msg, data}: data holds the images (200), the task (202) or null (errors)."""
    event(f"HTTP {response.status_code}")
    assert response.status_code < 500, response.text
    answer = response.json()
    assert set(answer) == {"code", "msg", "data"}, answer
    if response.status_code >= 400:
        assert answer["code"] == response.status_code
        assert isinstance(answer["msg"], str) and answer["msg"], answer
        assert answer["data"] is None
    elif response.status_code == 202:  # Lab keeps code 200 and says taskId
        task = answer["data"]
        assert answer["code"] in (200, 202) and task["status"] == "queued"
        assert task.get("task_id") or task.get("taskId"), answer
    else:
        assert response.status_code == 200 and answer["code"] == 200
        data = answer["data"]
        images = data["data"] if "data" in data else data["images"]
        assert images and all(i.get("url") or i.get("b64_json") for i in images), answer


def openai_shape(response: Any) -> None:
    event(f"HTTP {response.status_code}")
    assert response.status_code < 500, response.text
    if response.headers["content-type"].startswith("text/event-stream"):  # stream: true
        last = response.text.rstrip("\n").rsplit("\n\n", 1)[-1]
        assert last.startswith(
            ("event: image_generation.completed", "event: image_edit.completed")
        ), last
        return
    answer = response.json()
    if response.status_code >= 400:
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"}, answer
        assert isinstance(error["message"], str) and error["message"]
    else:
        assert response.status_code == 200 and answer["data"], answer


def gemini_shape(response: Any) -> None:
    event(f"HTTP {response.status_code}")
    assert response.status_code < 500, response.text
    answer = response.json()
    if response.status_code >= 400:
        error = answer["error"]
        assert error["code"] == response.status_code and error["status"], answer
        assert isinstance(error["message"], str) and error["message"]
    else:
        assert response.status_code == 200 and answer["candidates"], answer


# ---- the tests -------------------------------------------------------------------------------


@settings(FUZZ, max_examples=400)
@given(body=v1_bodies)
async def test_v1_never_answers_5xx_or_out_of_shape(fuzz: Fuzz, body: Any) -> None:
    nebula_shape(await fuzz.post("/v1/images/generations", body))


@FUZZ
@given(body=img2img_bodies)
async def test_lab_img2img_never_answers_5xx_or_out_of_shape(fuzz: Fuzz, body: Any) -> None:
    nebula_shape(await fuzz.post("/prod-api/nebula/v4/api/img2imgSubmit", body))


@FUZZ
@given(body=text2image_bodies)
async def test_lab_text2image_never_answers_5xx_or_out_of_shape(fuzz: Fuzz, body: Any) -> None:
    nebula_shape(await fuzz.post("/prod-api/nebula/v4/api/text2imageSubmit", body))


@FUZZ
@given(body=generations_bodies)
async def test_openai_generations_never_answer_5xx_or_out_of_shape(fuzz: Fuzz, body: Any) -> None:
    openai_shape(await fuzz.post("/openai/v1/images/generations", body))


@FUZZ
@given(body=edits_bodies)
async def test_openai_edits_never_answer_5xx_or_out_of_shape(fuzz: Fuzz, body: Any) -> None:
    openai_shape(await fuzz.post("/openai/v1/images/edits", body))


@FUZZ
@given(body=gemini_bodies, model=gemini_models, version=st.sampled_from(["v1beta", "v1"]))
async def test_gemini_never_answers_5xx_or_out_of_shape(
    fuzz: Fuzz, body: Any, model: str, version: str
) -> None:
    gemini_shape(await fuzz.post(f"/{version}/models/{model}:generateContent", body))


ENDPOINTS = [
    "/v1/images/generations",
    "/prod-api/nebula/v4/api/img2imgSubmit",
    "/prod-api/nebula/v4/api/text2imageSubmit",
    "/openai/v1/images/generations",
    "/openai/v1/images/edits",
    "/v1beta/models/fake-model:generateContent",
]


@settings(FUZZ, max_examples=60)
@given(path=st.sampled_from(ENDPOINTS), body=junk)
async def test_junk_bodies_get_a_400_in_the_dialects_shape(
    fuzz: Fuzz, path: str, body: Any
) -> None:
    response = await fuzz.post(path, body)
    if path.startswith("/openai/"):
        openai_shape(response)
    elif path.startswith("/v1beta/"):
        gemini_shape(response)
    else:
        nebula_shape(response)
    assert response.status_code == 400, response.text
