"""Cheap previews of images part-way through denoising, from the latents of a step callback.

A full VAE decode per preview would cost about as much as a denoising step, so previews use the
cheap decodes local UIs use: the model's tiny decoder when it ships one (`AutoencoderTiny`, TAESD),
else a linear latent-to-RGB projection, a fixed 4x3 matrix for Stable Diffusion's 4-channel
latents (the factors ComfyUI and A1111 preview with), pixels as they are for pixel-space
pipelines (3 channels: the demo model), and the first three channels, each stretched to 0..1,
for any other channel count. The picture is resized to the output's shape fitted into
`PREVIEW_SIDE` and sent as a small WEBP. Latents a step callback shows are still noisy: early
previews are mostly noise and sharpen as the steps go.

Runs in the pipeline's runner thread, inside the pipeline call (gradients already off).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch
from diffusers import AutoencoderTiny
from PIL import Image

logger = logging.getLogger(__name__)

PREVIEW_SIDE = 256
"""Longest side of a preview, in pixels (never larger than the image itself)."""
WEBP_QUALITY = 60

# Stable Diffusion 1.x/2.x latents (as the sampler sees them, scaled) to RGB in about [-1, 1].
_SD_LATENT_RGB = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


def preview_size(width: int, height: int) -> tuple[int, int]:
    """The output's shape fitted into PREVIEW_SIDE on its long side."""
    scale = min(1.0, PREVIEW_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor | None:
    """The images of `latents` as (batch, 3, h, w) floats in [0, 1] on the CPU, cheaply decoded;
    None when their layout is unknown (no preview then)."""
    if latents.ndim == 3:
        unpacked = _unpack(latents, width, height)
        if unpacked is None:
            return None
        latents = unpacked
    if latents.ndim != 4:
        return None
    vae = getattr(pipe, "vae", None)
    if isinstance(vae, AutoencoderTiny):
        scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        pixels = vae.decode(latents.to(vae.dtype) / scaling).sample  # [-1, 1]
        return _unit(pixels)
    latents = latents.detach().float()  # half precision: projected in float32 (a few KiB)
    channels = latents.shape[1]
    if channels == 4:
        factors = _SD_LATENT_RGB.to(latents.device)
        return _unit(torch.einsum("bchw,cr->brhw", latents, factors))
    if channels == 3:  # pixel space: the latents are the image in [-1, 1]
        return _unit(latents)
    return _stretched(latents)


def encode_webp(rgb: torch.Tensor, size: tuple[int, int]) -> bytes:
    """One (3, h, w) image in [0, 1] as a WEBP of `size` (width, height)."""
    array = (rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=WEBP_QUALITY, method=0)
    return buffer.getvalue()


def _unit(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] to [0, 1], on the CPU as float32."""
    return ((pixels.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()


def _stretched(latents: torch.Tensor) -> torch.Tensor:
    """The first three channels (the first repeated when there are fewer), each image's each
    channel stretched to [0, 1]: shapes and their placement show, colours do not mean much."""
    first = latents.detach().float()[:, :3]
    if first.shape[1] < 3:
        first = first[:, :1].expand(-1, 3, -1, -1)
    low = first.amin(dim=(2, 3), keepdim=True)
    high = first.amax(dim=(2, 3), keepdim=True)
    return ((first - low) / (high - low).clamp_min(1e-6)).cpu()


def _unpack(latents: torch.Tensor, width: int, height: int) -> torch.Tensor | None:
    """Packed latents (batch, tokens, channels), as Flux's, back to (batch, c, h, w): each token
    is a 2x2 patch of a latent 8 times smaller than the image; None for other layouts."""
    batch, tokens, packed = latents.shape
    rows, cols = height // 16, width // 16
    if tokens != rows * cols or packed % 4:
        return None
    grid = latents.view(batch, rows, cols, packed // 4, 2, 2)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, packed // 4, rows * 2, cols * 2)
