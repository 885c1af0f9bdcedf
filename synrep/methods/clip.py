"""CLIP (Radford et al. 2021, arXiv 2103.00020) on caption-group shards: one image per caption.

Each step draws B captions and one of each caption's k generated images (a different one each
step, seeded by (seed, step)); the image tower embeds an augmented view, the text tower the
caption (with ``method.clip.rewrites``, the caption or one of its LaCLIP rewrites, uniformly:
Fan et al. 2023, arXiv 2305.20088; docs/methods.md section 4), and the symmetric InfoNCE with a
learned logit scale pulls each pair together against every other pair of the global batch. This
is the synthetic-image CLIP of the scaling study (docs/methods.md section 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from synrep.config import Config
from synrep.data.augment import BatchAugment
from synrep.losses import ClipLoss, logit_scale
from synrep.methods._language import LanguageMethod, TextTowerOptions
from synrep.methods.base import METHODS
from synrep.models import Encoder


@dataclass
class CLIPOptions(TextTowerOptions):
    """``method.clip``: the text tower and the shared embedding."""


@METHODS.register("clip")
class CLIP(LanguageMethod):
    Options = CLIPOptions
    batch_kind = "images"  # on caption-group shards: one image per caption, (B, 1, C, H, W)
    name = "clip"

    def __init__(self, cfg: Config, encoder: Encoder) -> None:
        super().__init__(cfg, encoder)
        self.augment = BatchAugment(cfg.aug)
        self.loss_fn = ClipLoss(cfg.method.options.clip_max_logit_scale)

    def forward(self, batch: dict[str, Any], g: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch["images"]
        if x.ndim == 5:  # caption groups with the one image drawn this step
            x = x[:, 0]
        texts = self.batch_texts(batch, x.shape[0])
        img = self.encode_image(self.augment(x, g))  # (B, proj_dim)
        txt = self.encode_text(texts)  # (B, proj_dim)
        loss = self.loss_fn(img, txt, self.logit_scale)
        return {"loss": loss,
                "logit_scale": logit_scale(self.logit_scale, self.max_logit_scale).detach()}
