"""StableRep++ (Tian et al. 2023, arXiv 2306.00984; docs/methods.md section 2): StableRep's
multi-positive image-image loss plus a multi-positive image-text term from a text tower.

Each batch holds G captions x m images. Every image gets one augmented view; its encoder feature
goes through the MLP head to the image-image loss (the m images of a caption are positives, as in
:mod:`synrep.methods.stablerep`) and through a linear projection into the space shared with the
text tower, where the m images of a caption all match that caption's text
(:class:`~synrep.losses.MultiPosImageTextLoss`, with CLIP's learned logit scale). The loss is
``image_image + method.stablerep_pp.text_weight * image_text``, the weights of the paper's code
(w1 = w2 = 1 by default). With ``method.stablerep_pp.rewrites`` each caption's text is the
caption or one of its LaCLIP rewrites, uniformly (docs/methods.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from synrep.config import Config
from synrep.data.augment import BatchAugment
from synrep.errors import ConfigError
from synrep.losses import MultiPosConLoss, MultiPosImageTextLoss, logit_scale
from synrep.methods._language import LanguageMethod, TextTowerOptions
from synrep.methods.base import METHODS, GroupOptions
from synrep.models import Encoder, ProjectionHead


@dataclass
class StableRepPPOptions(GroupOptions, TextTowerOptions):
    """``method.stablerep_pp``: StableRep's head and temperature, the text tower, and the
    weight of the image-text term."""

    text_weight: float = 1.0  # image_image + text_weight * image_text (the paper's code: 1, 1)

    rules = {"text_weight": ">= 0"}  # 0 is refused with the method to use instead


@METHODS.register("stablerep_pp")
class StableRepPP(LanguageMethod):
    Options = StableRepPPOptions
    batch_kind = "groups"
    name = "stablerep_pp"

    def __init__(self, cfg: Config, encoder: Encoder) -> None:
        m = cfg.method.options
        if not m.text_weight > 0:
            raise ConfigError(f"{m.section}.text_weight={m.text_weight} switches the image-text "
                              "term off: use method.name=stablerep for the image-only loss")
        super().__init__(cfg, encoder)
        self.head = ProjectionHead(encoder.embed_dim, m.proj_hidden_dim, m.proj_dim, m.proj_layers)
        self.augment = BatchAugment(cfg.aug)
        self.image_loss = MultiPosConLoss(m.temperature)
        self.text_loss = MultiPosImageTextLoss(m.clip_max_logit_scale)
        self.text_weight = m.text_weight

    def forward(self, batch: dict[str, Any], g: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch["images"]
        if x.ndim != 5:
            raise ConfigError(
                "method 'stablerep_pp' needs caption-group batches: set data.source=shards")
        n, m = x.shape[:2]
        texts = self.batch_texts(batch, n)
        feats = self.encoder(self.augment(x.flatten(0, 1), g))  # (G*m, D)
        labels = torch.arange(n, device=feats.device).repeat_interleave(m)
        image_image = self.image_loss(self.head(feats), labels)
        image_text = self.text_loss(self.image_proj(feats), labels, self.encode_text(texts),
                                    torch.arange(n, device=feats.device), self.logit_scale)
        return {"loss": image_image + self.text_weight * image_text,
                "image_image": image_image.detach(), "image_text": image_text.detach(),
                "logit_scale": logit_scale(self.logit_scale, self.max_logit_scale).detach()}
