"""Supervised cross-entropy on (synthetic or real) class labels: the scaling-laws paper's setting
(arXiv 2312.04567) and SynCLR's "supervised CE" baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synrep.config import Config, MethodOptions
from synrep.data.augment import BatchAugment
from synrep.errors import ConfigError
from synrep.methods.base import METHODS, Method
from synrep.models import Encoder


@dataclass
class SupervisedOptions(MethodOptions):
    """``method.supervised``: the classifier over the data's labels."""

    num_classes: int = 10  # outputs of the linear classifier (labels must be below it)
    label_smoothing: float = 0.0  # label smoothing of the cross-entropy; 0 = none

    rules = {"num_classes": ">= 1", "label_smoothing": "in [0, 1)"}


@METHODS.register("supervised")
class Supervised(Method):
    Options = SupervisedOptions

    def __init__(self, cfg: Config, encoder: Encoder) -> None:
        super().__init__(encoder)
        self.classifier = nn.Linear(encoder.embed_dim, cfg.method.options.num_classes)
        self.augment = BatchAugment(cfg.aug)
        self.label_smoothing = cfg.method.options.label_smoothing

    def forward(self, batch, g: torch.Generator) -> dict[str, torch.Tensor]:
        x, y = batch["images"], batch.get("labels")
        if y is None:
            raise ConfigError("method 'supervised' needs labelled data")
        if x.ndim == 5:  # caption groups: every image carries its caption's label
            y = y.repeat_interleave(x.shape[1])
            x = x.flatten(0, 1)
        logits = self.classifier(self.encoder(self.augment(x, g)))
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == y).float().mean()
        return {"loss": loss, "train_acc": acc.detach()}
