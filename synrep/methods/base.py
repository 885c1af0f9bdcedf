"""The method interface and registry.

A method owns the trainable parts beyond the encoder (heads), its augmentation and its loss; it maps
a batch to ``{"loss": scalar, ...logged terms}``. Frozen parts (an EMA teacher, a reference model)
live outside the module that DDP wraps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from synrep.config import METHOD_OPTIONS, MethodOptions
from synrep.errors import ConfigError
from synrep.layout import layout
from synrep.registry import Registry


class MethodRegistry(Registry):
    """Method classes by name. Registering a class also registers its options dataclass
    (``cls.Options``) as the config section ``method.<name>``."""

    def register(self, name: str | None = None):
        add = super().register(name)

        def deco(cls):
            key = name or cls.__name__
            if cls.Options in (METHOD_OPTIONS.get(n) for n in METHOD_OPTIONS) or \
                    cls.Options is MethodOptions:
                raise ValueError(f"method {key!r}: declare its own Options subclass (its config "
                                 f"section method.{key}), even if it adds no option")
            add(cls)
            cls.Options.section = f"method.{key}"
            METHOD_OPTIONS.add(key, cls.Options)
            return cls

        return deco


METHODS: MethodRegistry = MethodRegistry("method")


@dataclass
class ContrastiveOptions(MethodOptions):
    """Options of methods with a contrastive projection head."""

    temperature: float = 0.2  # softmax temperature of the contrastive loss (cosine similarities)
    proj_layers: int = 2  # projection MLP depth (1 = linear)
    proj_hidden_dim: int = 1024  # hidden width of the projection MLP (BN + ReLU layers)
    # output width of the projection head, the embedding the loss compares (StableRep++: also
    # the width of the shared image-text space)
    proj_dim: int = 128

    rules = {"temperature": "> 0", "proj_layers": ">= 1", "proj_hidden_dim": ">= 1",
             "proj_dim": ">= 1"}


@dataclass
class GroupOptions(ContrastiveOptions):
    """Options of methods that learn from caption groups (several images of one caption)."""

    images_per_caption: int = 2  # m images of each caption per batch

    rules = {"images_per_caption": ">= 1"}


class Method(nn.Module):
    """Base class: ``forward(batch, generator) -> {"loss": ..., ...}``.

    ``batch["images"]`` is uint8, (B, C, H, W) for single images or (G, m, C, H, W) for caption
    groups (m images of each of G captions); ``batch["labels"]`` is (B,) or (G,) when present.
    """

    #: The method's options: its config section ``method.<name>``.
    Options: type[MethodOptions] = MethodOptions

    #: "images" for (B, C, H, W) batches, "groups" for (G, m, C, H, W) caption-group batches.
    batch_kind: str = "images"

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    #: True for methods that learn from single images (MAE family): on caption-group shards every
    #: image of a group is then its own sample, instead of one image per group per step.
    each_image: bool = False

    #: True for methods that train a text tower (CLIP-style); they implement
    #: :meth:`encode_image` and :meth:`encode_text`, and evaluation adds zero-shot classification.
    has_text_tower: bool = False

    #: Why the encoder in this method's checkpoints cannot be read as a plain encoder (and what
    #: to use instead); "" when it can.
    no_plain_encoder: str = ""

    #: The stage that writes the checkpoint evaluation reads (see :meth:`eval_checkpoint`).
    eval_after: str = "train"

    @classmethod
    def eval_checkpoint(cls, cfg: Any) -> Path:
        """The checkpoint the eval stage evaluates for a run of this method: the final one."""
        return layout(cfg).final_checkpoint

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, D) embeddings in the space shared with the text tower."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """T texts -> (T, D) embeddings in the space shared with the image tower."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def score_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, d) embeddings of the space the loss compares images in.

        Data selection (JEST) scores caption groups with the multi-positive loss of these
        embeddings; the default is the contrastive projection ``self.head(self.encoder(x))``.
        Called under ``torch.no_grad`` with the module in eval mode.
        """
        head = getattr(self, "head", None)
        if self.batch_kind != "groups" or head is None:
            raise ConfigError(
                f"data selection scores caption groups with a contrastive head, which method "
                f"{type(self).__name__} does not train; use method.name=synclr or stablerep")
        return head(self.encoder(x))

    def bind_data(self, source: Any) -> None:
        """Called once with the training source (an ArraySource) before training, for methods
        that keep per-sample data aligned with it (MoCE's clusters)."""

    def set_step(self, step: int) -> None:
        """Called before each step's forward, for per-step schedules (teacher temperature)."""

    def after_step(self) -> None:
        """Called after each optimizer step, for updates outside autograd (an EMA teacher)."""

    def forward(self, batch: dict[str, Any], g: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError
