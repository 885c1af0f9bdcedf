"""SimCLR (Chen et al. 2020, arXiv 2002.05709): two augmented views of each image are positives.

Implemented as the multi-positive loss with two samples per label, which is exactly NT-Xent.
On caption-group shards the first image of each caption is used (docs/methods.md section 1: "SimCLR,
one image per caption, two views").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from synrep.config import Config
from synrep.data.augment import MultiCrop
from synrep.losses import MultiPosConLoss
from synrep.methods.base import METHODS, ContrastiveOptions, Method
from synrep.models import Encoder, ProjectionHead


@dataclass
class SimCLROptions(ContrastiveOptions):
    """``method.simclr``: the projection head and temperature, and optional multi-crop."""

    local_crops: int = 0  # multi-crop: extra small views per image (all positives)
    local_size: int = 14  # side in pixels of each local crop
    local_scale: tuple[float, float] = (0.1, 0.4)  # local crops' area range, share of image

    rules = {"local_crops": ">= 0", "local_size": ">= 1", "local_scale": "pair in (0, 1]"}


@METHODS.register("simclr")
class SimCLR(Method):
    Options = SimCLROptions

    def __init__(self, cfg: Config, encoder: Encoder) -> None:
        super().__init__(encoder)
        m = cfg.method.options
        self.head = ProjectionHead(encoder.embed_dim, m.proj_hidden_dim, m.proj_dim, m.proj_layers)
        local = dataclasses.replace(cfg.aug, size=m.local_size, scale=m.local_scale)
        self.crops = MultiCrop(cfg.aug, local, n_global=2, n_local=m.local_crops)
        self.loss_fn = MultiPosConLoss(m.temperature)

    def forward(self, batch, g: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch["images"]
        if x.ndim == 5:  # caption groups: one image per caption
            x = x[:, 0]
        b = x.shape[0]
        views = self.crops(x, g)
        # Two global views, plus optional local crops (multi-crop, Caron et al. 2020): every
        # view of an image is a positive of every other. Same-size views share one forward.
        feats = [self.encoder(torch.cat(views[:2]))]  # (2B, D)
        if len(views) > 2:
            feats.append(self.encoder(torch.cat(views[2:])))  # (L*B, D)
        z = self.head(torch.cat(feats))
        labels = torch.arange(b, device=z.device).repeat(len(views))
        return {"loss": self.loss_fn(z, labels)}
