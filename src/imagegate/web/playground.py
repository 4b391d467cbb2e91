"""The playground (`/`): a form that runs Nebula v1 requests as async tasks, its History, and
the JSON endpoints its script calls.

A generation takes the public API's own path (api/nebula/handle.py) with `async: true`, so
every check, price and limit is the API's; errors come back in the API's envelope and the page
shows their message. Progress, images and cancel go through the public task endpoints, which
accept the session cookie.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.responses import Response

from imagegate.api.deps import base_url, delivery_of, service_of, tasks_of
from imagegate.api.errors import describe_validation
from imagegate.api.nebula.handle import handle
from imagegate.api.nebula.protocol import ImageGenerationRequest
from imagegate.api.nebula.render import render_error, task_view
from imagegate.api.nebula.routes import ENDPOINT
from imagegate.api.nebula.translate import to_image_request
from imagegate.api.responses import JSON
from imagegate.auth.principal import Principal
from imagegate.catalog import ResolvedModel
from imagegate.config import DEMO_MODEL_NAME
from imagegate.errors import ImagegateError
from imagegate.store import history, ledger
from imagegate.store.models import Task
from imagegate.store.tasks import SUCCEEDED
from imagegate.web.i18n import translate
from imagegate.web.pages import locale_of, render
from imagegate.web.session import SignedIn, SignedInPost, root_path

router = APIRouter(include_in_schema=False)

# Optional request fields the form offers, in the order it shows them; each appears only for
# a model whose capabilities accept it.
CONTROLS = (
    "size",
    "quality",
    "output_format",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "strength",
    "negative_prompt",
)
_SIZES = ("256x256", "512x512", "768x768", "1024x1024")
"""Suggested when a model names no size of its own (its default, its priced sizes): squares
that local models and the common cloud ones take. Capabilities declare no list of sizes, so
the field takes any WxH and the API's own 400 names what the model accepts."""
_QUALITIES = ("auto", "low", "medium", "high")
_IMAGE_FIELDS = ("image", "images", "contents", "mask")


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """A model as the form offers it: what the caller may set for it."""

    name: str
    description: str
    controls: tuple[str, ...]
    max_n: int
    references: int
    """How many reference images it takes (0: none)."""
    multi_turn: bool
    text_to_image: bool
    sizes: tuple[str, ...]
    """Sizes to suggest (its default and priced sizes, else common ones)."""
    qualities: tuple[str, ...]
    priced: bool
    demo: bool
    masks: bool
    """It takes a mask, and the v1 request can carry one (the mask brush appears)."""


def model_choice(model: ResolvedModel) -> ModelChoice:
    caps, config = model.capabilities, model.config
    priced = [r.size for r in model.pricing.images if r.size]
    sizes = tuple(dict.fromkeys([s for s in [config.defaults.size, *priced] if s])) or _SIZES
    qualities = tuple(dict.fromkeys(r.quality for r in model.pricing.images if r.quality))
    pricing = model.pricing
    return ModelChoice(
        name=model.name,
        description=config.description,
        controls=tuple(c for c in CONTROLS if c in caps.accepts and _fits(c, caps.image_edit)),
        max_n=caps.max_n,
        references=caps.max_input_images if caps.image_edit else 0,
        multi_turn=caps.multi_turn,
        text_to_image=caps.text_to_image,
        sizes=sizes,
        qualities=qualities or _QUALITIES,
        priced=bool(pricing.per_image or pricing.images or pricing.input_token),
        demo=_is_demo(model),
        masks="mask" in caps.accepts and "mask" in ImageGenerationRequest.model_fields,
    )


def _fits(control: str, edits: bool) -> bool:
    return edits or control != "strength"  # strength is how far an edit departs from its image


def _is_demo(model: ResolvedModel) -> bool:
    pipeline = str(model.config.options.get("pipeline_class", ""))
    return model.name == DEMO_MODEL_NAME or pipeline.endswith(":DemoPipeline")


def choices_for(request: Request, principal: Principal) -> list[ModelChoice]:
    """The models this caller may use, as the form offers them."""
    catalog = service_of(request).catalog
    allowed = principal.allowed_models
    names = [m.name for m in catalog.models if allowed is None or m.name in allowed]
    return [model_choice(catalog.resolve(name)) for name in names]


def demo_vocabulary() -> dict[str, str]:
    """What the demo model draws, for the page's hint (its words are English only)."""
    from imagegate.demo.dataset import COLOURS, POSITIONS, SHAPES  # numpy: only when shown

    return {
        "shapes": ", ".join(SHAPES),
        "colours": ", ".join(COLOURS),
        "positions": ", ".join(POSITIONS),
    }


DEMO_EXAMPLES = (
    "a red circle on a blue background",
    "a small green star at the top left on a white background",
    "a large yellow triangle on a purple background",
    "a pink ring in the bottom right and a cyan square on black",
)


SCRIPT_MESSAGES = (
    "references_hint",
    "references_none",
    "remove",
    "reference_alt",
    "you",
    "model_turn",
    "generate",
    "generating",
    "quote",
    "quote_unlimited",
    "quote_free",
    "status_submitted",
    "status_queued",
    "status_started",
    "status_step",
    "status_percent",
    "status_succeeded",
    "drawn_as",
    "status_failed",
    "status_cancelled",
    "status_lost",
    "cost",
    "cost_balance",
    "cost_free",
    "progress",
    "preview_alt",
    "cancel",
    "download",
    "use_reference",
    "copy_curl",
    "copy_python",
    "copy_json",
    "copied",
    "copy_failed",
    "python_note",
    "error",
    "default",
    "mask_paint",
    "mask_hide",
    "mask_on",
    "mask_off",
    "caps_n",
    "caps_refs",
    "caps_no_refs",
    "caps_turns",
    "caps_mask",
    "caps_priced",
)
"""Messages the page's script shows, given to it in the page's JSON data block."""


@router.get("/")
async def page(request: Request, user: SignedIn) -> Response:
    models = choices_for(request, user.principal)
    entries = await _history_context(request, user.principal, "", 1)
    demo = any(m.demo for m in models)
    locale = locale_of(request)
    root = root_path(request)
    data = {
        "models": [asdict(m) for m in models],
        "max_images": service_of(request).bounds.max_images,
        "messages": {k: translate(locale, f"playground.{k}") for k in SCRIPT_MESSAGES},
        "urls": {
            "root": root,
            "generate": f"{root}/playground/generate",
            "quote": f"{root}/playground/quote",
            "history": f"{root}/playground/history",
            "api": f"{root}/v1/images/generations",
        },
    }
    context = {
        "models": models,
        "demo": demo_vocabulary() if demo else None,
        "examples": DEMO_EXAMPLES if demo else (),
        "data": data,
        **entries,
    }
    return render(request, "playground.html", context)


@router.get("/playground/history")
async def history_fragment(
    request: Request,
    user: SignedIn,
    q: str = Query(default="", max_length=history.MAX_QUERY_CHARS),
    page: int = Query(default=1, ge=1, le=100_000),
) -> Response:
    context = await _history_context(request, user.principal, q, page)
    return render(request, "playground_history.html", context)


async def _history_context(
    request: Request, principal: Principal, query: str, number: int
) -> dict[str, Any]:
    sessions = request.app.state.sessions
    async with sessions() as session:
        found = await history.page(session, owner=principal.owner, query=query, number=number)
        ids = [e.task_id for e in found.entries]
        tasks = await history.tasks_of(session, owner=principal.owner, task_ids=ids)
    images = {task_id: await _image_urls(request, task) for task_id, task in tasks.items()}
    statuses = {task_id: task.status for task_id, task in tasks.items()}
    return {"history": found, "history_images": images, "history_status": statuses}


async def _image_urls(request: Request, task: Task) -> list[str]:
    """Fresh links to a succeeded task's kept images (none once the task is gone)."""
    if task.status != SUCCEEDED or task.result is None:
        return []
    kept = task.result.get("images") or []
    delivered = await delivery_of(request).deliver_kept(kept, "url", base_url(request))
    return [d.url for d in delivered if d.url]


@router.post("/playground/generate")
async def generate(request: Request, user: SignedInPost) -> Response:
    """Body: a Nebula v1 request. Runs it as an async task of the signed-in caller and keeps it
    in their History; the answer says where to follow it."""
    principal = user.principal
    try:
        body = await _body(request)
        handled = await handle(
            body,
            request,
            principal,
            dialect="v1",
            endpoint=ENDPOINT,
            wants_async=True,
            callback_url=body.callback_url,
        )
    except ImagegateError as exc:
        return render_error(exc)
    task = handled.task
    assert task is not None  # wants_async: always a task
    async with request.app.state.sessions.begin() as session:
        await history.add(
            session,
            owner=principal.owner,
            task_id=task.id,
            model=body.model,
            prompt=prompt_of(body),
            params=params_of(body),
        )
    root = root_path(request)
    return JSON(
        {
            "task_id": task.id,
            "status": task.status,
            "events_url": f"{root}/v1/images/tasks/{task.id}/events",
            "task_url": f"{root}/playground/tasks/{task.id}",
            "cancel_url": f"{root}/v1/images/tasks/{task.id}",
        },
        status_code=202,
    )


@router.post("/playground/quote")
async def quote(request: Request, user: SignedInPost) -> Response:
    """The most the request may cost and the payer's balance (None: unlimited)."""
    principal = user.principal
    try:
        body = await _body(request)
        service = service_of(request)
        found = service.quote(principal, body.model, lambda: to_image_request(body))
    except ImagegateError as exc:
        return render_error(exc)
    return JSON(
        {
            "credits": found.credits if found is not None else 0,
            "free": found is None,
            "detail": found.detail if found is not None else "",
            "balance": await _balance(request, principal),
            "unlimited": principal.payer is None,
        }
    )


@router.get("/playground/tasks/{task_id}")
async def task(task_id: str, request: Request, user: SignedIn) -> Response:
    """The public task view, plus what it cost and the balance left."""
    principal = user.principal
    try:
        found = await tasks_of(request).find(principal, task_id)
    except ImagegateError as exc:
        return render_error(exc)
    view = await task_view(found, delivery_of(request), base_url(request))
    async with request.app.state.sessions() as session:
        charge = await history.charge_of(session, found.id)
    balance = await _balance(request, principal)
    return JSON({"data": view, "charge": charge, "balance": balance})


async def _balance(request: Request, principal: Principal) -> int | None:
    if principal.payer is None:
        return None
    async with request.app.state.sessions() as session:
        return await ledger.balance_of(session, ledger.Account.of(principal.payer))


async def _body(request: Request) -> ImageGenerationRequest:
    raw = await request.body()
    try:
        return ImageGenerationRequest.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise describe_validation(exc.errors()) from None


def prompt_of(body: ImageGenerationRequest) -> str:
    """The instruction of the request: its prompt, else the latest user text of `contents`."""
    if body.prompt:
        return body.prompt
    for turn in reversed(body.contents or []):
        if turn.role == "user":
            texts = [p.text for p in turn.parts if p.text]
            if texts:
                return " ".join(texts)
    return ""


def params_of(body: ImageGenerationRequest) -> dict[str, Any]:
    """The request as sent, without image data (History keeps what re-runs it)."""
    kept = {k: v for k, v in body.task_body().items() if k not in _IMAGE_FIELDS}
    turns = body.contents or []
    references = len(body.images or []) + (
        len(body.image) if isinstance(body.image, list) else int(body.image is not None)
    )
    references += sum(1 for t in turns for p in t.parts if p.image or p.inline_data)
    if references:
        kept["reference_images"] = references
    if len(turns) > 1:
        kept["turns"] = len(turns)
    return kept
