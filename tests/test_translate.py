"""The dialect translators on their own: wire body in, UnresolvedRequest out, no app.

Each translator is a synchronous pure function, so these tests call it with plain wire
models: no event loop, no loader, no catalog. Images stay `ImageRef`s labelled with the
field they came from; nothing is fetched or decoded here.
"""

from __future__ import annotations

from typing import Any

import pytest

from imagegate.api.gemini import translate as gemini
from imagegate.api.gemini.protocol import GenerateContentRequest
from imagegate.api.lab import translate as lab
from imagegate.api.lab.protocol import split_img2img
from imagegate.api.nebula import translate as nebula
from imagegate.api.nebula.protocol import ImageGenerationRequest
from imagegate.api.openai import translate as openai
from imagegate.api.openai.protocol import (
    ImageEditForm,
    ImageEditRequest,
    ImageGenerateRequest,
    ImageVariationForm,
)
from imagegate.bounds import Bounds
from imagegate.errors import InvalidRequest
from imagegate.types import ImageRef, Size, SizeKind

PNG_URI = "data:image/png;base64,iVBORw0KGgo="
URL = "https://images.example/cat.png"
RAW_B64 = "iVBORw0KGgoAAAANSUhEUg=="


def _nebula(**body: Any) -> ImageGenerationRequest:
    return ImageGenerationRequest.model_validate({"model": "m", **body})


def _gemini(**body: Any) -> GenerateContentRequest:
    return GenerateContentRequest.model_validate(body)


# --- Nebula v1 ---------------------------------------------------------------------------


def test_nebula_contents_give_refs_labelled_by_field_and_merge_the_first_user_turn() -> None:
    body = _nebula(
        image=URL,
        contents=[
            {
                "role": "user",
                "parts": [
                    {"text": "make it blue"},
                    {"image": PNG_URI},
                    {"inline_data": {"mime_type": "image/webp", "data": RAW_B64}},
                ],
            }
        ],
    )

    request = nebula.to_image_request(body)

    assert request.prompt == "make it blue"
    assert len(request.conversation) == 1  # flat images joined the first user turn
    turn = request.conversation[0]
    assert turn.role == "user"
    assert [p.text for p in turn.parts] == [None, "make it blue", None, None]
    assert request.images == (
        ImageRef(URL, label="image[0]"),
        ImageRef(PNG_URI, label="contents[0].parts[1].image"),
        ImageRef(
            RAW_B64, label="contents[0].parts[2].inline_data", form="base64", mime="image/webp"
        ),
    )
    # The images are the parts' own refs: the loader resolves each once.
    assert [p.image for p in turn.parts if p.image is not None] == list(request.images)
    assert request.hints == frozenset()


def test_nebula_keeps_a_model_turn_and_its_signature() -> None:
    body = _nebula(
        contents=[
            {"role": "user", "parts": [{"text": "a cat"}]},
            {"role": "model", "parts": [{"image": URL, "thought_signature": "sig"}]},
            {"role": "user", "parts": [{"text": "now a dog"}]},
        ]
    )

    request = nebula.to_image_request(body)

    assert [t.role for t in request.conversation] == ["user", "model", "user"]
    model_part = request.conversation[1].parts[0]
    assert model_part.image == ImageRef(URL, label="contents[1].parts[0].image")
    assert model_part.thought_signature == "sig"
    assert request.prompt == "now a dog"
    assert request.latest_image == ImageRef(URL, label="contents[1].parts[0].image")


def test_nebula_standard_fields_from_parameters_and_extras() -> None:
    body = _nebula(
        prompt="p",
        size="1024x768",
        parameters={"seed": 7, "n": 2, "prompt_extend": False},
        temperature=0.5,
        response_format="b64_json",
        output_format="JPG",
    )

    request = nebula.to_image_request(body, hints=frozenset({"temperature"}))

    assert request.n == 2
    assert request.seed == 7
    assert request.size == Size(SizeKind.PIXELS, 1024, 768, raw="1024x768")
    assert request.extras == {"temperature": 0.5, "prompt_extend": False}
    assert request.output_format == "jpeg"
    assert request.response_format == "b64_json"
    assert request.hints == frozenset({"temperature"})
    assert request.images == ()


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": "p", "n": 0}, "n", "Invalid n=0"),
        ({"prompt": "p", "seed": -5}, "seed", "Invalid seed=-5"),
        ({}, "prompt", "Missing prompt"),
        ({"prompt": "p", "image": [URL] * 17}, "image", "Too many reference images"),
        (
            {"contents": [{"role": "user", "parts": [{"text": "a", "image": URL}]}]},
            "contents[0].parts[0]",
            "has both text and image",
        ),
        (
            {"contents": [{"role": "model", "parts": [{"text": "a"}]}]},
            "contents",
            "must have role 'user'",
        ),
        ({"prompt": "p", "extra": {"other": 1}}, "extra.other", "Unknown parameter"),
    ],
)
def test_nebula_refuses_bad_bodies_naming_the_field(
    body: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        nebula.to_image_request(_nebula(**body))
    assert caught.value.param == param
    assert message in caught.value.message


def test_nebula_refuses_too_many_images_before_reading_any() -> None:
    """16 is the most, whatever mix of flat and contents images: no ref is made for any."""
    contents = [{"role": "user", "parts": [{"text": "x"}, *[{"image": URL}] * 10]}]
    with pytest.raises(InvalidRequest, match="at most 16"):
        nebula.to_image_request(_nebula(images=[URL] * 7, contents=contents))
    assert len(nebula.to_image_request(_nebula(images=[URL] * 6, contents=contents)).images) == 16


# --- Lab v4 ------------------------------------------------------------------------------


def test_lab_body_keeps_temperature_and_style_as_hints() -> None:
    envelope, form = split_img2img(
        {
            "batchImageGenerationDTO": {
                "model": "m",
                "prompt": "a fox",
                "temperature": 0.7,
                "image": URL,
            }
        }
    )
    body = lab.img2img_request(envelope, form, "default-model")

    assert body == {"model": "m", "prompt": "a fox", "temperature": 0.7, "image": URL}
    request = nebula.to_image_request(lab.v1_body(body), hints=lab.LAB_HINTS)
    assert request.extras == {"temperature": 0.7}
    assert request.hints == frozenset({"temperature", "style"})
    assert request.images == (ImageRef(URL, label="image[0]"),)


def test_lab_volc_image_keeps_style_and_takes_the_default_model() -> None:
    envelope, form = split_img2img(
        {"volcImageBo": {"prompt": "a fox", "image_urls": [URL, PNG_URI], "style": "anime"}}
    )
    body = lab.img2img_request(envelope, form, "default-model")

    assert body == {
        "model": "default-model",
        "prompt": "a fox",
        "image": [URL, PNG_URI],
        "style": "anime",
    }
    request = nebula.to_image_request(lab.v1_body(body), hints=lab.LAB_HINTS)
    assert request.extras == {"style": "anime"}
    assert [ref.label for ref in request.images] == ["image[0]", "image[1]"]


def test_lab_refuses_a_missing_prompt_by_its_lab_name() -> None:
    envelope, form = split_img2img({"batchImageGenerationDTO": {"model": "m"}})
    with pytest.raises(InvalidRequest) as caught:
        lab.img2img_request(envelope, form, "default-model")
    assert caught.value.param == "batchImageGenerationDTO.prompt"


# --- Gemini ------------------------------------------------------------------------------


def test_gemini_non_default_modalities_become_a_hint() -> None:
    body = _gemini(
        contents=[
            {
                "parts": [
                    {"text": "a lighthouse"},
                    {"inlineData": {"mimeType": "image/png", "data": RAW_B64}},
                ]
            }
        ],
        generationConfig={"responseModalities": ["image"], "seed": 3},
    )

    request = gemini.to_image_request("gm", body, bounds=Bounds())

    assert request.model == "gm"
    assert request.prompt == "a lighthouse"
    assert request.extras == {"response_modalities": ["IMAGE"]}
    assert request.hints == frozenset({"response_modalities"})
    assert request.seed == 3
    assert request.images == (
        ImageRef(RAW_B64, label="contents[0].parts[1].inlineData", form="base64", mime="image/png"),
    )


def test_gemini_default_modalities_send_no_extra_and_no_hint() -> None:
    body = _gemini(
        contents=[{"role": "user", "parts": [{"text": "a lighthouse"}]}],
        generationConfig={"responseModalities": ["TEXT", "IMAGE"], "temperature": 0.2},
    )

    request = gemini.to_image_request("gm", body, bounds=Bounds())

    assert request.extras == {"temperature": 0.2}  # not a hint: refused by models without it
    assert request.hints == frozenset()


def test_gemini_drops_thoughts_and_keeps_signatures() -> None:
    body = _gemini(
        contents=[
            {"role": "user", "parts": [{"text": "a cat"}]},
            {
                "role": "model",
                "parts": [
                    {"text": "thinking", "thought": True},
                    {"inlineData": {"data": RAW_B64}, "thoughtSignature": "s1"},
                ],
            },
            {"role": "user", "parts": [{"text": "bluer"}]},
        ]
    )

    request = gemini.to_image_request("gm", body, bounds=Bounds())

    model_turn = request.conversation[1]
    assert len(model_turn.parts) == 1
    assert model_turn.parts[0].thought_signature == "s1"
    assert model_turn.parts[0].image == ImageRef(
        RAW_B64, label="contents[1].parts[1].inlineData", form="base64"
    )
    assert request.prompt == "bluer"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"contents": [{"parts": [{"fileData": {"fileUri": "gs://x"}}]}]},
            "contents[0].parts[0].fileData",
        ),
        (
            {
                "contents": [{"parts": [{"text": "a"}]}],
                "generationConfig": {"responseModalities": ["TEXT"]},
            },
            "generationConfig.responseModalities",
        ),
        (
            {
                "contents": [
                    {
                        "parts": [
                            {"text": "a"},
                            {"inlineData": {"mimeType": "text/plain", "data": "x"}},
                        ]
                    }
                ]
            },
            "contents[0].parts[1].inlineData",
        ),
        ({"contents": [{"parts": [{"text": "a"}]}], "tools": []}, "tools"),
        (
            {
                "contents": [{"parts": [{"text": "a"}]}],
                "generationConfig": {"candidateCount": 17},
            },
            "generationConfig.candidateCount",
        ),
    ],
)
def test_gemini_refuses_bad_bodies_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        gemini.to_image_request("gm", _gemini(**body), bounds=Bounds())
    assert caught.value.param == param


# --- OpenAI ------------------------------------------------------------------------------


def test_openai_edit_json_gives_url_refs_and_a_mask_ref() -> None:
    body = ImageEditRequest.model_validate(
        {
            "model": "m",
            "prompt": " add a hat ",
            "images": [{"image_url": URL}, {"image_url": PNG_URI}],
            "mask": {"image_url": PNG_URI},
            "background": "auto",
            "input_fidelity": "high",
        }
    )

    request = openai.from_edit_json(body)

    assert request.prompt == "add a hat"
    assert request.images == (
        ImageRef(URL, label="images[0].image_url"),
        ImageRef(PNG_URI, label="images[1].image_url"),
    )
    assert request.mask == ImageRef(PNG_URI, label="mask.image_url")
    assert request.extras == {"input_fidelity": "high"}  # "auto" is the model's default
    assert request.response_format == "b64_json"


def test_openai_edit_form_takes_the_uploaded_bytes() -> None:
    image = ImageRef(b"\x89PNG...", label="image[0]", form="bytes", mime="image/png")
    mask = ImageRef(b"\x89PNG mask", label="mask", form="bytes")
    body = ImageEditForm.model_validate({"model": "m", "prompt": "p", "n": "2"}, strict=False)

    request = openai.from_edit_form(body, [image], mask)

    assert request.images == (image,)
    assert request.mask == mask
    assert request.n == 2


def test_openai_variation_has_no_prompt() -> None:
    upload = ImageRef(b"\x89PNG...", label="image", form="bytes")
    body = ImageVariationForm.model_validate({"model": "m", "size": "512x512"}, strict=False)

    request = openai.from_variation(body, upload)

    assert request.prompt == ""
    assert request.images == (upload,)
    assert request.size == Size(SizeKind.PIXELS, 512, 512, raw="512x512")


def test_openai_generation_turns_auto_into_unset() -> None:
    body = ImageGenerateRequest.model_validate(
        {"model": "m", "prompt": "p", "size": "auto", "quality": "auto", "moderation": "low"}
    )

    request = openai.from_generate(body)

    assert request.size is None
    assert request.quality is None
    assert request.extras == {"moderation": "low"}
    assert request.images == ()


@pytest.mark.parametrize(
    ("images", "param"),
    [
        ([{"file_id": "file-1"}], "images[0].file_id"),
        ([{"image_url": URL}, {}], "images[1].image_url"),
        ([{"image_url": URL}] * 17, "image"),
    ],
)
def test_openai_edit_json_refuses_bad_images_naming_the_field(
    images: list[dict[str, str]], param: str
) -> None:
    body = ImageEditRequest.model_validate({"model": "m", "prompt": "p", "images": images})
    with pytest.raises(InvalidRequest) as caught:
        openai.from_edit_json(body)
    assert caught.value.param == param


def test_openai_edit_form_without_files_is_refused() -> None:
    body = ImageEditForm.model_validate({"model": "m", "prompt": "p"}, strict=False)
    with pytest.raises(InvalidRequest, match="Missing required parameter 'image'") as caught:
        openai.from_edit_form(body, [], None)
    assert caught.value.param == "image"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"partial_images": 2}, "partial_images"),  # partial images need stream: true
        ({"stream": True, "response_format": "url"}, "response_format"),
    ],
)
def test_openai_refuses_stream_parameters_that_do_not_fit(
    fields: dict[str, object], param: str
) -> None:
    body = ImageGenerateRequest.model_validate({"model": "m", "prompt": "p", **fields})
    with pytest.raises(InvalidRequest) as caught:
        openai.from_generate(body)
    assert caught.value.param == param


def test_openai_translates_a_stream_and_refuses_an_empty_prompt() -> None:
    fields = {"stream": True, "partial_images": 3}
    streamed = ImageGenerateRequest.model_validate({"model": "m", "prompt": "p", **fields})
    assert openai.from_generate(streamed).prompt == "p"
    blank = ImageGenerateRequest.model_validate({"model": "m", "prompt": "  "})
    with pytest.raises(InvalidRequest) as caught:
        openai.from_generate(blank)
    assert caught.value.param == "prompt"
