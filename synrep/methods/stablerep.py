"""StableRep (Tian et al. 2023, arXiv 2306.00984): images generated from one caption are positives.

Each batch holds G captions x m images; every image gets one augmented view and the multi-positive
contrastive loss treats the m images of a caption as one class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from synrep.config import Config
from synrep.data.augment import BatchAugment
from synrep.errors import ConfigError
from synrep.losses import MultiPosConLoss
from synrep.methods.base import METHODS, GroupOptions, Method
from synrep.models import Encoder, ProjectionHead


@dataclass
class StableRepOptions(GroupOptions):
    """``method.stablerep``: the projection head, temperature and images per caption."""


@METHODS.register("stablerep")
class StableRep(Method):
    Options = StableRepOptions
    batch_kind = "groups"

    def __init__(self, cfg: Config, encoder: Encoder) -> None:
        super().__init__(encoder)
        m = cfg.method.options
        self.head = ProjectionHead(encoder.embed_dim, m.proj_hidden_dim, m.proj_dim, m.proj_layers)
        self.augment = BatchAugment(cfg.aug)
        self.loss_fn = MultiPosConLoss(m.temperature)

    def forward(self, batch, g: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch["images"]
        if x.ndim != 5:
            raise ConfigError(
                "method 'stablerep' needs caption-group batches: set data.source=shards")
        n, m = x.shape[:2]
        views = self.augment(x.flatten(0, 1), g)  # (G*m, C, S, S)
        z = self.head(self.encoder(views))
        labels = torch.arange(n, device=z.device).repeat_interleave(m)
        return {"loss": self.loss_fn(z, labels)}
