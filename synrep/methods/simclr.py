"""SimCLR (Chen et al. 2020, arXiv 2002.05709): two augmented views of each image are positives.

Implemented as the multi-positive loss with two samples per label, which is exactly NT-Xent.
On caption-group shards the first image of each caption is used (METHODS.md section 1: "SimCLR,
one image per caption, two views").
"""

from __future__ import annotations

import torch

from synrep.config import Config
from synrep.data.augment import BatchAugment
from synrep.losses import MultiPosConLoss
from synrep.methods.base import METHODS, Method
from synrep.models import Encoder, ProjectionHead


class SimCLR(Method):
    def __init__(self, cfg: Config, encoder: Encoder) -> None:
        super().__init__(encoder)
        m = cfg.method
        self.head = ProjectionHead(encoder.embed_dim, m.proj_hidden_dim, m.proj_dim, m.proj_layers)
        self.augment = BatchAugment(cfg.aug)
        self.loss_fn = MultiPosConLoss(m.temperature)

    def forward(self, batch, g: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch["images"]
        if x.ndim == 5:  # caption groups: one image per caption
            x = x[:, 0]
        b = x.shape[0]
        views = torch.cat([self.augment(x, g), self.augment(x, g)])  # (2B, C, S, S)
        z = self.head(self.encoder(views))  # (2B, proj_dim)
        labels = torch.arange(b, device=z.device).repeat(2)
        return {"loss": self.loss_fn(z, labels)}


@METHODS.register("simclr")
def build_simclr(cfg: Config, encoder: Encoder) -> Method:
    return SimCLR(cfg, encoder)
