"""Trains the bundled demo model from scratch on procedurally generated scenes.

The shipped weights come from one command:

    python -m imagegate.demo.train --recipe --seed 0 --out src/imagegate/demo/weights

which runs the six stages of `RECIPE` in one process, each continuing from the EMA weights of the
one before with a fresh optimiser and learning-rate schedule (a stage may stop part way through its
planned schedule). 6,400 steps of batch 32 in all, about 0.46 s a step on two idle CPU cores:
the run that made the shipped weights took 2,956 s (49 minutes) end to end on the project's
2-core machine, and a second run of the same command 3,048 s, writing byte-identical files.

A stage with `from_saved` starts from the weights as saved, so `--recipe --first-stage N --init
DIR` (DIR: the weights of stages 1..N-1) gives what the whole recipe gives; `PHRASING_STAGE` (not
shipped, see docs/benchmarks.md) was run that way.

Without `--recipe` it trains one stage (`--steps`, `--lr`, `--stop-after`, `--init`), for
experiments. In every stage a share of captions is short ("a red circle on a blue background":
colours and shape only) and a share of scenes comes with a twin whose background and object colours
are traded, captioned in the same words (`--swap-pairs`): without them the model read captions as a
bag of words and drew "a blue triangle on a red background" as a red triangle on blue.

Data is drawn on the fly from `dataset` (never the held-out split), so there is nothing to download.
The UNet (pixel space, v-prediction, cosine noise schedule, min-SNR loss weighting) and the text
encoder are trained jointly; captions are dropped 10% of the time so the saved pipeline can use
classifier-free guidance. An exponential moving average of the weights is what gets saved. Same seed
and thread count, same weights. `--pooling first` and `--coordinates` are experiments (a
from-scratch run with both was worse after 4,000 steps: background 100%, colour 48%, shape 17%,
position 13% on 60 held-out captions).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import random
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UniPCMultistepScheduler
from torch import nn

from imagegate.demo import dataset
from imagegate.demo.batches import Mix, make_batch
from imagegate.demo.pipeline import DemoPipeline, denoise
from imagegate.demo.text import DemoTextEncoder

__all__ = ["RECIPE", "Stage", "main", "make_batch"]
logger = logging.getLogger(__name__)
TEXT_DIM = 64
MIN_SNR_GAMMA = 5.0


def build_unet(
    size: int,
    channels: tuple[int, ...],
    attention_from: int,
    patch: int = 2,
    coordinates: bool = False,
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
        # With coordinates, two more input channels hold x and y (see `denoise`).
        in_channels=3 * patch * patch + (2 if coordinates else 0),
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


def sample_scheduler(train: DDPMScheduler) -> UniPCMultistepScheduler:
    """UniPC: at 15 steps it scores as well as DPM-Solver++ (2M) at 20 on the demo evaluator."""
    return UniPCMultistepScheduler.from_config(train.config, final_sigmas_type="zero")


class Trainer:
    """One optimisation step at a time, with an EMA copy of both networks."""

    def __init__(self, args: argparse.Namespace, start: DemoPipeline | None) -> None:
        torch.manual_seed(args.seed)
        self.rng = random.Random(args.seed)
        self.size: int = args.size
        self.batch: int = args.batch_size
        self.steps: int = args.steps
        self.mix = Mix(args.short_captions, args.swap_pairs, args.rich, args.rings)
        self.unet = build_unet(
            args.size, tuple(args.channels), args.attention_from, args.patch, args.coordinates
        )
        self.text = DemoTextEncoder(vocab=dataset.vocabulary(), dim=TEXT_DIM, pooling=args.pooling)
        if start is not None:
            # Continue from earlier weights with a fresh optimiser and learning-rate schedule
            # (in-process, the last stage's EMA modules, which had gradients off).
            self.unet = start.unet.train().requires_grad_(True)
            self.text = start.text_encoder.train().requires_grad_(True)
        # Channels-last convolutions are about 14% faster a step on the CPU (oneDNN).
        self.unet = self.unet.to(memory_format=torch.channels_last)
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
        pixels, captions = make_batch(self.rng, self.size, self.batch, mix=self.mix)
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
            unet=copy.deepcopy(unet).to(memory_format=torch.contiguous_format).eval(),
            text_encoder=text.eval(),
            scheduler=sample_scheduler(self.scheduler),
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
    parser.add_argument(
        "--pooling",
        choices=["mean", "first"],
        default="mean",
        help="caption vector for the FiLM conditioning: mean of the words, or the BOS state",
    )
    parser.add_argument(
        "--coordinates", action="store_true", help="give the UNet x/y coordinate channels"
    )
    parser.add_argument(
        "--short-captions",
        type=float,
        default=0.0,
        help="share of captions naming only colours and shapes ('a red circle on a blue "
        "background'), which the default mix rarely has",
    )
    parser.add_argument(
        "--swap-pairs",
        type=float,
        default=0.0,
        help="share of scenes that come with a twin whose background and object colours are "
        "traded, captioned in the same words",
    )
    parser.add_argument(
        "--recipe",
        action="store_true",
        help="train the shipped weights: every stage of RECIPE (ignores --steps, --lr, "
        "--stop-after, --short-captions, --swap-pairs, --rich, --rings, and --init unless "
        "--first-stage is given)",
    )
    parser.add_argument(
        "--first-stage",
        type=int,
        default=1,
        help="with --recipe: start at this stage (1-based) from --init, the weights the stage "
        "before saved (a stage with from_saved then gives what the whole recipe gives)",
    )
    parser.add_argument(
        "--rich",
        type=float,
        default=0.0,
        help="share of captions phrased as people do (phrasing.py), read by the scene reader",
    )
    parser.add_argument(
        "--rings", type=float, default=0.0, help="share of scenes made a ring or a star"
    )
    parser.add_argument("--init", type=Path, default=None, help="start from this saved pipeline")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="save and stop after this many steps (the learning-rate schedule still spans --steps)",
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=0, help="also save every N steps")
    return parser.parse_args(argv)


def save(pipe: DemoPipeline, out: Path) -> None:
    """Saves the pipeline with float16 weights: half the size in the package, and from_pretrained
    loads them back as float32 (or the dtype asked for), so inference is unchanged."""
    half = DemoPipeline(
        unet=copy.deepcopy(pipe.unet).half(),
        text_encoder=copy.deepcopy(pipe.text_encoder).half(),
        scheduler=pipe.scheduler,
    )
    half.save_pretrained(out)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One learning-rate schedule of the recipe: `steps` planned, `stop_after` run."""

    steps: int
    lr: float = 1e-3
    stop_after: int | None = None
    short: float = 0.2
    swap: float = 0.3
    rich: float = 0.0
    rings: float = 0.0
    # Start from the weights as saved (float16): the stage then gives the same result run on from
    # the stage before in one process or from the saved weights (`--first-stage`).
    from_saved: bool = False

    @property
    def run(self) -> int:
        return min(self.steps, self.stop_after or self.steps)


# The shipped weights: each stage continues from the EMA weights of the one before with a fresh
# optimiser and schedule (warm restarts); stopping a planned schedule early keeps its higher rate.
RECIPE: tuple[Stage, ...] = (
    Stage(700, lr=2e-3),
    Stage(900),
    Stage(2400, stop_after=1600),
    Stage(2000, stop_after=1200),
    Stage(1500),
    Stage(1000, stop_after=500, short=0.3),
)
# Not shipped (docs/benchmarks.md, "Demo model"): how people phrase a scene, through the scene
# reader (batches.py), with more rings and stars. Better on the evaluator's sets, but it drew edits
# worse (3 of 6 seeds kept the scene, against 6 of 6). Run it with `--first-stage 7` after adding
# it to RECIPE.
PHRASING_STAGE = Stage(800, lr=5e-4, short=0.1, rich=0.6, rings=0.3, from_saved=True)


def run_stage(trainer: Trainer, steps: int, args: argparse.Namespace, clock: float) -> None:
    running = 0.0
    for step in range(steps):
        running += trainer.step(step)
        if (step + 1) % args.log_every == 0:
            logger.info(
                "step %d loss %.4f (%.1f s)",
                step + 1,
                running / args.log_every,
                time.monotonic() - clock,
            )
            running = 0.0
        if args.save_every and (step + 1) % args.save_every == 0:
            save(trainer.pipeline(), args.out)


def train(
    stages: tuple[Stage, ...], args: argparse.Namespace, clock: float, first: int = 0
) -> DemoPipeline:
    """Runs stages[first:] in this process, each from the EMA weights of the one before (the
    first from `--init`, if given); stage i draws from seed `--seed` + i."""
    pipe: DemoPipeline | None = None
    if args.init is not None:
        pipe = DemoPipeline.from_pretrained(args.init)
    for index, stage in list(enumerate(stages))[first:]:
        stage_args = argparse.Namespace(
            **{
                **vars(args),
                "steps": stage.steps,
                "lr": stage.lr,
                "seed": args.seed + index,
                "short_captions": stage.short,
                "swap_pairs": stage.swap,
                "rich": stage.rich,
                "rings": stage.rings,
            }
        )
        logger.info("stage %d of %d: %s", index + 1, len(stages), stage)
        if stage.from_saved and pipe is not None:
            pipe.unet.half().float()  # in place: float16 rounding, as save() then load
            pipe.text_encoder.half().float()
        trainer = Trainer(stage_args, start=pipe)
        run_stage(trainer, stage.run, stage_args, clock)
        pipe = trainer.pipeline()
    assert pipe is not None
    return pipe


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    clock = time.monotonic()
    first = 0
    if args.recipe:
        first = args.first_stage - 1
        if first and args.init is None:
            raise SystemExit("--first-stage needs --init: the weights the stage before saved.")
        if not first:
            args.init = None
        stages = RECIPE
    else:
        stages = (
            Stage(
                args.steps,
                args.lr,
                args.stop_after,
                args.short_captions,
                args.swap_pairs,
                args.rich,
                args.rings,
            ),
        )
    pipe = train(stages, args, clock, first)
    save(pipe, args.out)
    logger.info("saved to %s after %.1f s", args.out, time.monotonic() - clock)


if __name__ == "__main__":
    main()
