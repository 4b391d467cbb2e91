"""Local models through Hugging Face diffusers: text-to-image, image-to-image and inpainting.

torch and diffusers are imported by this module and diffusers_batch.py (one batched pipeline
call) only; the registry imports it the first time a model with `provider: diffusers` is
configured. Weights load on `start()` or the first request, in the pipeline's runner thread,
which also runs every generation. Concurrent requests that differ only in prompts, seeds and n
run as one batched pipeline call (see `DiffusersOptions`).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import diffusers
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)
from diffusers.utils import deprecation_utils

from imagegate.config import ModelDefaultsConfig
from imagegate.errors import ConfigError, ImagegateError, ProviderError
from imagegate.progress import current_reporter
from imagegate.providers.base import ProviderContext
from imagegate.providers.diffusers_batch import Images, accepts, run_batch
from imagegate.providers.diffusers_options import DiffusersOptions as DiffusersOptions
from imagegate.providers.diffusers_options import capabilities, checked_options
from imagegate.providers.diffusers_plan import Job, Planner
from imagegate.providers.runner import Batch, PipelineRunner, RunnerClosed
from imagegate.types import (
    GenerationResult,
    ResolvedRequest,
    Usage,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Newer diffusers renamed from_pretrained's `torch_dtype` to `dtype` and warn on the old name.
_DTYPE_KWARG = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
# from_pretrained draws a progress bar straight onto stderr; our log line after it says the same.
diffusers.utils.logging.disable_progress_bar()
_DEFAULT_STEPS = 30


@dataclass(frozen=True, slots=True)
class _Loaded:
    pipe: Any
    edit_pipe: Any | None
    """The image-to-image pipeline sharing pipe's weights; None when there is none."""
    inpaint_pipe: Any | None
    """The inpainting pipeline sharing pipe's weights; None when there is none."""
    native_side: int
    default_steps: int


@dataclass(frozen=True, slots=True)
class _Work:
    """A planned job and the pipelines it runs on (the same for every job of a batch)."""

    loaded: _Loaded
    job: Job


class DiffusersProvider:
    """One diffusers pipeline served from this process."""

    # Local weights: no key, no base URL, no models enabled from the environment.
    key_variable: ClassVar[str | None] = None
    base_url_variable: ClassVar[str | None] = None
    known_models: ClassVar[tuple[str, ...]] = ()

    def __init__(self, context: ProviderContext) -> None:
        self.name = name = context.name
        defaults = context.defaults
        self.options = checked_options(name, context.options, defaults)
        self._planner = Planner(name, self.options, defaults)
        self.pipeline_class = _import_pipeline_class(name, self.options.pipeline_class)
        self.capabilities = capabilities(self.options)
        self._runner: PipelineRunner[_Work, Images] = PipelineRunner(
            name,
            self._execute,
            window_s=self.options.batch_window_ms / 1000,
            max_batch=self.options.max_batch,
        )
        self._loading: asyncio.Future[_Loaded] | None = None
        self._threads = context.limits.torch_threads

    async def start(self) -> None:
        await self._ensure_loaded()

    async def close(self) -> None:
        self._runner.close()
        self._loading = None

    @property
    def batches(self) -> int:
        """Pipeline calls made for generations so far (each one batch of requests)."""
        return self._runner.batches

    @property
    def queued(self) -> int:
        """Requests waiting for the pipeline (those of the running batch not counted)."""
        return self._runner.queued

    @property
    def busy(self) -> bool:
        """The pipeline is running a batch (or loading) now: a worker of the worker tier
        claims more jobs only while it is not, so that an idle worker gets them."""
        return self._runner.busy

    @property
    def max_batch(self) -> int:
        return self.options.max_batch

    @property
    def defaults(self) -> ModelDefaultsConfig:
        return self._planner.defaults

    @defaults.setter
    def defaults(self, value: ModelDefaultsConfig) -> None:
        self._planner.defaults = value

    async def generate(self, request: ResolvedRequest) -> GenerationResult:
        """Generate images; progress goes to the `progress.current_reporter()` of the caller:
        each step, and every `preview_every` steps a preview of each image when it wants them.

        Cancelling the awaiting task cancels the job: a queued job never runs, a running one's
        images are dropped (its batch stops early when no other job in it is still awaited).
        """
        reporter = current_reporter()
        output_format = self._planner.output_format(request)
        loaded = await self._ensure_loaded()
        job = self._planner.plan(
            request,
            native_side=loaded.native_side,
            default_steps=loaded.default_steps,
            can_edit=loaded.edit_pipe is not None,
            can_inpaint=loaded.inpaint_pipe is not None,
            output_format=output_format,
        )
        started = time.perf_counter()
        images = await self._in_runner(
            self._runner.submit(
                _Work(loaded, job),
                key=job.batch_key,
                size=len(job.seeds),
                owner=request.owner,
                reporter=reporter,
            ),
            "generate images",
        )
        usage = Usage(
            upstream={
                "images": len(images),
                "num_inference_steps": job.steps,
                "milliseconds": round((time.perf_counter() - started) * 1000),
            }
        )
        return GenerationResult(images=images, usage=usage)

    # -- loading (runner thread) -------------------------------------------------------------

    async def _ensure_loaded(self) -> _Loaded:
        # One shared task rather than a lock around the first caller's await: concurrent first
        # requests wait for the same load, and a cancelled first request does not abandon a
        # load already running in the runner thread (which the next request would repeat).
        if self._loading is None:
            self._loading = asyncio.ensure_future(
                self._in_runner(self._runner.call(self._load), "load")
            )
            self._loading.add_done_callback(self._forget_failed_load)
        return await asyncio.shield(self._loading)

    def _forget_failed_load(self, loading: asyncio.Future[_Loaded]) -> None:
        if self._loading is loading and (loading.cancelled() or loading.exception()):
            self._loading = None  # the next request tries again

    def _load(self) -> _Loaded:
        started = time.perf_counter()
        threads = _use_threads(self._threads)
        path = self._local_path_or_hub_id()
        device = self._device()
        try:
            kwargs = {
                _DTYPE_KWARG: _DTYPES[self.options.dtype],
                "local_files_only": self.options.local_files_only,
                **self._safety_kwargs(path),
            }
            pipe = self.pipeline_class.from_pretrained(path, **kwargs).to(device)
        except Exception as exc:
            logger.error("model %s: cannot load %s", self.name, path, exc_info=exc)
            raise ProviderError(
                f"Cannot load model {self.name} from {path!r}: {_describe(exc)} Set options.path "
                "to a diffusers pipeline folder (with model_index.json) or a Hugging Face hub id; "
                "with local_files_only the hub id must already be in the Hugging Face cache."
            ) from exc
        _quiet(pipe)
        logger.info(
            "model %s: loaded %s from %s on %s (%d CPU threads) in %.1fs",
            self.name,
            type(pipe).__name__,
            path,
            device,
            threads,
            time.perf_counter() - started,
        )
        return _Loaded(
            pipe=pipe,
            edit_pipe=self._variant(pipe, AutoPipelineForImage2Image, "image", "strength"),
            inpaint_pipe=self._variant(pipe, AutoPipelineForInpainting, "image", "mask_image"),
            native_side=self._native_side(pipe),
            default_steps=_default_steps(pipe),
        )

    def _local_path_or_hub_id(self) -> str:
        raw = self.options.path
        path = Path(raw).expanduser()
        if path.exists():
            return str(path)
        if path.is_absolute() or raw.startswith((".", "~")) or raw.count("/") != 1:
            raise ProviderError(
                f"Cannot load model {self.name}: folder {raw} does not exist. Set options.path to "
                "a diffusers pipeline folder (one written by save_pretrained) or a Hugging Face "
                "hub id like 'org/model'."
            )
        return raw

    def _device(self) -> str:
        has_cuda = torch.cuda.is_available()
        if self.options.device == "auto":
            return "cuda" if has_cuda else "cpu"
        if self.options.device == "cuda" and not has_cuda:
            raise ProviderError(
                f"Cannot load model {self.name}: options.device is cuda but no "
                "CUDA GPU is available; set device to cpu or auto."
            )
        return self.options.device

    def _safety_kwargs(self, path: str) -> dict[str, Any]:
        """Turn off the safety checker where the pipeline has one (it is a second large model)."""
        cls = self.pipeline_class
        if cls in (AutoPipelineForText2Image, DiffusionPipeline):
            config = DiffusionPipeline.load_config(
                path, local_files_only=self.options.local_files_only
            )
            cls = getattr(diffusers, str(config.get("_class_name")), cls)
        params = inspect.signature(cls.__init__).parameters
        wanted = {"safety_checker": None, "requires_safety_checker": False}
        return {key: value for key, value in wanted.items() if key in params}

    def _variant(self, pipe: Any, auto: Any, *needs: str) -> Any | None:
        """The pipeline for edits (or masked edits): `pipe` itself when its call takes `needs`,
        else diffusers' counterpart of its class (`auto`), else None (such requests get 400)."""
        if accepts(pipe, *needs):
            return pipe
        try:
            # from_pipe shares the loaded components: no second copy of the weights.
            variant = auto.from_pipe(pipe)
        except Exception as exc:
            logger.info(
                "model %s: %s has no %s variant (%s); such requests are refused",
                self.name,
                type(pipe).__name__,
                auto.__name__,
                exc,
            )
            return None
        _quiet(variant)
        return variant

    def _native_side(self, pipe: Any) -> int:
        """The side the model was trained at (e.g. 512 for SD 1.5), within the allowed sides."""
        scale = getattr(pipe, "vae_scale_factor", None)
        sample = getattr(pipe, "default_sample_size", None)
        if not isinstance(sample, int):
            unet_config = getattr(getattr(pipe, "unet", None), "config", None)
            sample = getattr(unet_config, "sample_size", None)
        # Pipelines without a VAE (pixel space) have no such rule: 512, as diffusers' own default.
        side = sample * scale if isinstance(sample, int) and isinstance(scale, int) else 512
        return max(self.options.min_side, min(self.options.max_side, side // 8 * 8))

    # -- generation (runner thread) ----------------------------------------------------------

    async def _in_runner(self, work: Awaitable[T], action: str) -> T:
        """Await work queued on the runner; unexpected failures become a ProviderError."""
        try:
            return await work
        except ImagegateError:
            raise
        except RunnerClosed:
            raise ProviderError(f"Model {self.name} is shut down.") from None
        except Exception as exc:
            logger.error("model %s: failed to %s", self.name, action, exc_info=exc)
            raise ProviderError(f"Model {self.name} failed to {action}: {_describe(exc)}") from exc

    def _execute(self, batch: Batch[_Work]) -> list[Images]:
        """Run one batch (runner thread) on the pipeline its kind needs."""
        _use_threads(self._threads)
        loaded, jobs = batch.jobs[0].loaded, [work.job for work in batch.jobs]
        pipes = {"text": loaded.pipe, "edit": loaded.edit_pipe, "inpaint": loaded.inpaint_pipe}
        return run_batch(pipes[jobs[0].kind], jobs, batch, self.options.preview_every)


def _use_threads(threads: int) -> int:
    """Make torch's CPU work in the calling thread use `threads` threads (0: leave its
    default); how many it uses. Set in the thread that computes: torch's OpenMP count is kept
    per thread, and a thread started before a change keeps the old count."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return int(torch.get_num_threads())


def _import_pipeline_class(name: str, target: str | None) -> Any:
    if target is None:
        return AutoPipelineForText2Image
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"Model {name}: cannot import pipeline_class {target!r} ({exc}). Use "
            "'module:Class', e.g. 'diffusers:StableDiffusionPipeline'."
        ) from exc
    if not callable(getattr(cls, "from_pretrained", None)):
        raise ConfigError(
            f"Model {name}: pipeline_class {target!r} has no from_pretrained; "
            "use a diffusers DiffusionPipeline subclass."
        )
    return cls


def _default_steps(pipe: Any) -> int:
    param = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    default = param.default if param is not None else None
    return default if isinstance(default, int) and default > 0 else _DEFAULT_STEPS


def _quiet(pipe: Any) -> None:
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


def _describe(exc: BaseException) -> str:
    """The first line of an exception, short enough for a client-facing message."""
    text = (str(exc).strip().splitlines() or [""])[0][:300].rstrip(".")
    return f"{type(exc).__name__}: {text}." if text else f"{type(exc).__name__}."
