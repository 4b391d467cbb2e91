"""Trains the bundled demo model from scratch on procedurally generated scenes.

    python -m imagegate.demo.train --steps 700 --lr 2e-3 --seed 0 --out /tmp/demo-stage1
    python -m imagegate.demo.train --init /tmp/demo-stage1 --steps 900 --lr 1e-3 --seed 1 \
        --out src/imagegate/demo/weights

(the two commands that made the shipped weights: about 30 minutes on two shared CPU cores).

Data is drawn on the fly from `dataset` (never the held-out split), so there is nothing to download.
The UNet (pixel space, v-prediction, cosine noise schedule, min-SNR loss weighting) and the text
encoder are trained jointly; captions are dropped 10% of the time so the saved pipeline can use
classifier-free guidance. An exponential moving average of the weights is what gets saved. Same seed
and thread count, same weights. Each stage finishes well under an hour on two CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from torch import nn

from imagegate.demo import dataset
from imagegate.demo.pipeline import DemoPipeline, denoise
from imagegate.demo.text import DemoTextEncoder

logger = logging.getLogger(__name__)
TEXT_DIM = 64
CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0


def build_unet(
    size: int, channels: tuple[int, ...], attention_from: int, patch: int = 2
) -> UNet2DConditionModel:
    """A small pixel-space UNet over patch x patch pixel blocks; cross-attention only at levels
    >= attention_from, where the resolution is low and attention cheap."""
    levels = len(channels)
    down = tuple(
        "CrossAttnDownBlock2D" if i >= attention_from else "DownBlock2D" for i in range(levels)
    )
    up = tuple(
        "CrossAttnUpBlock2D" if i >= attention_from else "UpBlock2D"
        for i in reversed(range(levels))
    )
    return UNet2DConditionModel(
        sample_size=size // patch,
        in_channels=3 * patch * patch + 2,  # + the x/y coordinate channels, see `denoise`
        out_channels=3 * patch * patch,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=16,
        norm_num_groups=8,
        # The pooled caption also conditions every ResNet block (FiLM, with the timestep): global
        # facts like the colours are learnt in a few hundred steps this way, far faster than
        # through low-resolution cross-attention alone.
        class_embed_type="projection",
        projection_class_embeddings_input_dim=TEXT_DIM,
        resnet_time_scale_shift="scale_shift",
    )


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
    )


def sample_scheduler(train: DDPMScheduler) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler.from_config(
        train.config, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
    )


def make_batch(rng: random.Random, size: int, batch: int) -> tuple[torch.Tensor, list[str]]:
    scenes = [dataset.random_scene(rng) for _ in range(batch)]
    pixels = torch.from_numpy(np.stack([dataset.render_array(s, size) for s in scenes]))
    captions = ["" if rng.random() < CAPTION_DROPOUT else dataset.caption(s, rng) for s in scenes]
    return pixels, captions


class Trainer:
    """One optimisation step at a time, with an EMA copy of both networks."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(args.seed)
        self.rng = random.Random(args.seed)
        self.size: int = args.size
        self.batch: int = args.batch_size
        self.steps: int = args.steps
        self.unet = build_unet(args.size, tuple(args.channels), args.attention_from, args.patch)
        self.text = DemoTextEncoder(vocab=dataset.vocabulary(), dim=TEXT_DIM, pooling="first")
        if args.init is not None:
            # Continue from a saved pipeline (a second stage with a fresh learning-rate schedule).
            start = DemoPipeline.from_pretrained(args.init)
            self.unet, self.text = start.unet.train(), start.text_encoder.train()
        self.ema = nn.ModuleList([copy.deepcopy(self.unet), copy.deepcopy(self.text)])
        self.ema.requires_grad_(False)
        self.scheduler = noise_scheduler()
        params = list(self.unet.parameters()) + list(self.text.parameters())
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        self.lr: float = args.lr
        self.generator = torch.Generator().manual_seed(args.seed)

    def _lr(self, step: int) -> float:
        warmup = min(200, self.steps // 10 + 1)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(self.steps - warmup, 1)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def step(self, step: int) -> float:
        pixels, captions = make_batch(self.rng, self.size, self.batch)
        noise = torch.randn(pixels.shape, generator=self.generator)
        t = torch.randint(0, 1000, (self.batch,), generator=self.generator)
        noisy = self.scheduler.add_noise(pixels, noise, t)
        target = self.scheduler.get_velocity(pixels, noise, t)
        ids, mask = self.text.tokenize(captions)
        states = self.text(ids, mask)
        pred = denoise(self.unet, noisy, t, states, mask, self.text.pool(states, mask))
        alphas = self.scheduler.alphas_cumprod[t]
        snr = alphas / (1 - alphas)
        # Min-SNR with the +1 that suits v-prediction: the noisiest steps, which decide the
        # colours and layout, keep full weight; the nearly clean ones are capped.
        weight = (snr + 1).clamp(max=MIN_SNR_GAMMA) / (snr + 1)
        loss = (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        for group in self.opt.param_groups:
            group["lr"] = self._lr(step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.opt.param_groups[0]["params"], 1.0)
        self.opt.step()
        self._update_ema(step)
        return float(loss.detach())

    @torch.no_grad()  # type: ignore[untyped-decorator]
    def _update_ema(self, step: int) -> None:
        decay = min(0.998, (1 + step) / (10 + step))
        live = list(self.unet.parameters()) + list(self.text.parameters())
        for ema, param in zip(self.ema.parameters(), live, strict=True):
            ema.lerp_(param, 1 - decay)

    def pipeline(self) -> DemoPipeline:
        unet, text = self.ema
        return DemoPipeline(
            unet=unet.eval(), text_encoder=text.eval(), scheduler=sample_scheduler(self.scheduler)
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--size", type=int, default=32, help="native resolution")
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128, 128])
    parser.add_argument("--patch", type=int, default=2, help="pixel block side the UNet sees")
    parser.add_argument(
        "--attention-from",
        type=int,
        default=1,
        help="first UNet level with cross-attention (0 = every level)",
    )
    parser.add_argument("--init", type=Path, default=None, help="start from this saved pipeline")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=0, help="also save every N steps")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    trainer = Trainer(args)
    start, running = time.monotonic(), 0.0
    for step in range(args.steps):
        running += trainer.step(step)
        if (step + 1) % args.log_every == 0:
            logger.info(
                "step %d loss %.4f (%.1f s)",
                step + 1,
                running / args.log_every,
                time.monotonic() - start,
            )
            running = 0.0
        if args.save_every and (step + 1) % args.save_every == 0:
            trainer.pipeline().save_pretrained(args.out)
    trainer.pipeline().save_pretrained(args.out)
    logger.info("saved to %s after %.1f s", args.out, time.monotonic() - start)


if __name__ == "__main__":
    main()
