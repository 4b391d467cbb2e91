"""A tiny random Stable Diffusion pipeline for offline tests (reference/local-serving.md §5).

Everything is built from configs with fixed seeds and a hand-written CLIP vocabulary, so nothing
is downloaded; `save_pretrained` then lets tests exercise the real `from_pretrained` loading path.
A 64x64 image with 2 steps takes a few tens of milliseconds on a CPU.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

# The tokenizer test vocabulary of transformers' tests/models/clip/test_tokenization_clip.py.
_VOCAB = [
    "l",
    "o",
    "w",
    "e",
    "r",
    "s",
    "t",
    "i",
    "d",
    "n",
    "lo",
    "l</w>",
    "w</w>",
    "r</w>",
    "t</w>",
    "low</w>",
    "er</w>",
    "lowest</w>",
    "newer</w>",
    "wider",
    "<unk>",
    "<|startoftext|>",
    "<|endoftext|>",
]
_MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]


def build_tiny_sd(path: Path) -> Path:
    """Build a tiny random StableDiffusionPipeline, save it to `path` and return `path`."""
    return build_random_sd(path)


def build_random_sd(
    path: Path,
    *,
    unet_channels: tuple[int, int] = (4, 8),
    vae_channels: tuple[int, ...] = (4, 8),
    width: int = 8,
    sample_size: int = 32,
) -> Path:
    """A random StableDiffusionPipeline of the given widths, saved to `path`: the tiny one of the
    tests by default; bench/progress.py builds a larger one (its VAE's blocks set the latent
    scale: 2 ** (len(vae_channels) - 1), 8 with four blocks as in Stable Diffusion)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=unet_channels,
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width,
        norm_num_groups=2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=list(vae_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
        latent_channels=4,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=width,
            intermediate_size=2 * width,
            layer_norm_eps=1e-05,
            num_attention_heads=2,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=1000,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps({token: i for i, token in enumerate(_VOCAB)}))
        merges_file.write_text("\n".join(_MERGES))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    pipe = StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path
