"""Batch sources for training: every batch is a pure function of (seed, step, rank).

Because the sample order is derived from the seed and the epoch, a run that resumes at step t
draws exactly the batches an uninterrupted run would have drawn, without saving loader state.
In-memory sources suit the embedded default and anything that fits in RAM.
"""

from __future__ import annotations

from typing import Any

import torch

from synrep.errors import ConfigError


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class ArraySource:
    """Shuffled, drop-last batches of an in-memory image set; each rank takes its slice.

    ``images`` uint8 (N, C, H, W) or caption groups (N, k, C, H, W); ``labels`` (N,) or None.
    With groups, ``images_per_group`` of the k images of each group are drawn per step.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1,
                 images_per_group: int | None = None) -> None:
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size={batch_size} must be divisible by the {world_size} ranks")
        if len(images) < batch_size:
            raise ConfigError(
                f"train.batch_size={batch_size} exceeds the dataset size {len(images)}")
        self.images, self.labels = images, labels
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world = rank, world_size
        self.steps_per_epoch = len(images) // batch_size
        self.m = images_per_group
        if self.m is not None and (images.ndim != 5 or not 1 <= self.m <= images.shape[1]):
            raise ConfigError(
                f"images_per_group={self.m} needs caption groups with at least that many images")

    def batch(self, step: int) -> dict[str, Any]:
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = _epoch_perm(len(self.images), self.seed, epoch)
        local = self.batch_size // self.world
        start = i * self.batch_size + self.rank * local
        idx = perm[start : start + local]
        images = self.images[idx]
        pick = None
        if self.m is not None and self.m < images.shape[1]:
            # Choose m of the k images of each group, seeded by (seed, step): (B, m, C, H, W).
            # Drawn for the global batch and sliced, so N ranks pick what one process would.
            g = torch.Generator().manual_seed(self.seed * 7919 + step)
            scores = torch.rand(self.batch_size, images.shape[1], generator=g)
            scores = scores[self.rank * local : (self.rank + 1) * local]
            pick = scores.argsort(dim=1)[:, : self.m]
            images = images[torch.arange(len(idx))[:, None], pick]
        out: dict[str, Any] = {"images": images, "index": idx}
        if self.m is not None:  # which of each group's k images were drawn: (B, m)
            out["pick"] = pick if pick is not None else torch.arange(self.m).expand(len(idx), -1)
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        return out
