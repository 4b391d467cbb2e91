"""The demo model's text encoder: a word-level tokenizer and a two-layer transformer.

The vocabulary lives in the config, so the encoder is its own tokenizer and the pipeline needs no
separate tokenizer component. Words outside the vocabulary are dropped, never an error: a prompt
like "please draw a red circle" reads as "a red circle".
"""

from __future__ import annotations

import math
import re

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

_WORD = re.compile(r"[a-z]+")
PAD, BOS = 0, 1  # every prompt starts with BOS, so the empty (unconditional) prompt is [BOS]


def _sinusoids(length: int, dim: int) -> torch.Tensor:
    """The transformer's fixed position table (sin and cos at geometric wavelengths)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(-math.log(10_000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)
    return table


class DemoTextEncoder(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """Embeds caption words and contextualises them for the UNet's cross-attention."""

    @register_to_config  # type: ignore[untyped-decorator]
    def __init__(
        self,
        vocab: list[str],
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        max_length: int = 32,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        self.index = {w: i + 2 for i, w in enumerate(vocab)}
        self.embed = nn.Embedding(len(vocab) + 2, dim, padding_idx=PAD)
        # Sinusoids as large as the word embeddings: with small learnt positions the encoder is
        # nearly a bag of words and "a blue circle on a red background" reads like its swap.
        self.position = nn.Parameter(_sinusoids(max_length, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and a padding mask (True = real token) for a batch of prompts."""
        length = int(self.config.max_length)
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = [BOS] + [
                self.index[w] for w in _WORD.findall(prompt.lower()) if w in self.index
            ]
            tokens = tokens[:length]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != PAD

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states (batch, max_length, dim); padding positions are zeroed."""
        x = self.embed(ids) + self.position[None, : ids.shape[1]].to(self.embed.weight.dtype)
        x = self.encoder(x, src_key_padding_mask=~mask)
        return torch.as_tensor(self.norm(x) * mask[..., None].to(x.dtype))

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One vector per caption for the UNet's FiLM conditioning.

        "first" is the BOS token's state: after self-attention it can tell "a red circle on a blue
        background" from "a blue circle on a red background", which a mean over the words (a bag
        of words, "mean", kept for older weights) cannot.
        """
        if self.config.pooling == "first":
            return states[:, 0]
        weights = mask.to(states.dtype)[..., None]
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and mask for prompts, on this encoder's device."""
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self(ids, mask), mask
