"""What every language-supervised method shares (CLIP, StableRep++; docs/methods.md sections 2, 4):
the text tower, the image projection into the shared space, and CLIP's learned logit scale.

Images enter the shared space as ``image_proj(encoder(x))`` (a linear map without bias, as in
CLIP), texts as :class:`~synrep.models.text.TextTower` embeddings; both are ``proj_dim``
wide. The logit scale is a parameter holding log(scale), initialised to
``log(1 / clip_init_temperature)``; losses clamp the scale at
``clip_max_logit_scale`` and, as CLIP does, the parameter itself is clamped to
[0, log(max)] after every optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from synrep.config import Config, MethodOptions
from synrep.errors import ConfigError
from synrep.methods.base import Method
from synrep.models import Encoder
from synrep.models.text import build_text_tower


@dataclass
class TextTowerOptions(MethodOptions):
    """Options of methods with a text tower: image and text embeddings meet in ``proj_dim``,
    compared with a learned logit scale (docs/methods.md sections 2, 4)."""

    proj_dim: int = 128  # width of the shared image-text embedding space
    text_model: str = "fashion-text"  # a built-in text tower, or a folder saved by save_pretrained
    text_width: int = 256  # built-in tower: transformer width, layers, heads (width % heads == 0)
    text_layers: int = 3  # built-in tower: transformer layers
    text_heads: int = 4  # built-in tower: attention heads
    text_context: int = 32  # tokens per text, special tokens included (longer texts are cut)
    clip_init_temperature: float = 0.07  # the logit scale starts at 1 / this (CLIP: 0.07)
    clip_max_logit_scale: float = 100.0  # the learned logit scale is clamped here (CLIP: 100)
    rewrites: bool = False  # LaCLIP: each step a caption or one of its RUN/rewrites, uniformly

    rules = {"proj_dim": ">= 1", "text_width": ">= 1", "text_layers": ">= 1", "text_heads": ">= 1",
             "text_context": ">= 1", "clip_init_temperature": "> 0",
             "clip_max_logit_scale": "> 0"}


class LanguageMethod(Method):
    """A :class:`Method` with a text tower; zero-shot evaluation uses :meth:`encode_image` and
    :meth:`encode_text`."""

    has_text_tower = True
    name = "language"  # the registry name, for error messages

    def __init__(self, cfg: Config, encoder: Encoder) -> None:
        super().__init__(encoder)
        m = cfg.method.options
        s = m.section
        if not m.clip_init_temperature > 0:
            raise ConfigError(
                f"{s}.clip_init_temperature must be > 0, got {m.clip_init_temperature}")
        if not m.clip_max_logit_scale >= 1 / m.clip_init_temperature:
            raise ConfigError(
                f"{s}.clip_max_logit_scale={m.clip_max_logit_scale} is below the initial "
                f"scale 1 / clip_init_temperature = {1 / m.clip_init_temperature:.4g}")
        if m.proj_dim < 1:
            raise ConfigError(f"{s}.proj_dim must be >= 1, got {m.proj_dim}")
        self.text = build_text_tower(m)
        self.image_proj = nn.Linear(encoder.embed_dim, m.proj_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=encoder.embed_dim**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / m.clip_init_temperature)))
        self.max_logit_scale = m.clip_max_logit_scale

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.encoder(x))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.text(texts)

    def batch_texts(self, batch: dict[str, Any], n: int) -> list[str]:
        """The batch's n captions (one per caption group), or a clear error without them."""
        texts = batch.get("texts")
        if texts is None:
            raise ConfigError(f"method {self.name!r} learns from captions: train on caption-group "
                              "shards (data.source=shards), whose batches carry the captions")
        if len(texts) != n:
            raise ValueError(f"the batch has {n} caption groups but {len(texts)} texts")
        return list(texts)

    @torch.no_grad()
    def after_step(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.max_logit_scale))
