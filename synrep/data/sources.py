"""Batch sources for training: every batch is a pure function of (seed, step, rank).

Because the sample order is derived from the seed and the epoch, a run that resumes at step t
draws exactly the batches an uninterrupted run would have drawn, without saving loader state.
In-memory sources suit the embedded default and anything that fits in RAM.
"""

from __future__ import annotations

from typing import Any

import torch

from synrep.errors import ConfigError, DataError
from synrep.utils import derive_seed


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def rewrite_choice(counts: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """LaCLIP's text choice: for the i-th caption of a step's *global* batch, which of its
    ``counts[i]`` candidate texts (the caption, then its rewrites) is used; uniform, and a pure
    function of ``(seed, step)``, so a resumed run and any number of ranks make the same choice.

    Shapes: counts (B,) int >= 1 -> (B,) int64 in [0, counts).
    """
    if counts.numel() and int(counts.min()) < 1:
        raise ValueError("every caption needs at least one candidate text")
    g = torch.Generator().manual_seed(derive_seed(seed, "laclip", step) % (1 << 63))
    u = torch.rand(counts.shape, generator=g, dtype=torch.float64)
    return (u * counts).long().clamp(max=counts - 1)  # floor(u * c): uniform on 0..c-1


class ArraySource:
    """Shuffled, drop-last batches of an in-memory image set; each rank takes its slice.

    ``images`` uint8 (N, C, H, W) or caption groups (N, k, C, H, W); ``labels`` (N,) or None.
    With groups, ``images_per_group`` of the k images of each group are drawn per step.
    ``texts`` (language supervision): the candidate texts of each of the N samples, its caption
    first; batches then carry ``"texts"``, one string per sample, chosen by
    :func:`rewrite_choice` among a sample's candidates (LaCLIP rewrites) or its only caption.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1,
                 images_per_group: int | None = None,
                 texts: list[list[str]] | None = None) -> None:
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
        if texts is not None and len(texts) != len(images):
            raise ValueError(f"texts must hold one list per sample: {len(texts)} != {len(images)}")
        self.texts = texts
        self.text_counts = None if texts is None else torch.tensor([len(t) for t in texts])
        if self.text_counts is not None and int(self.text_counts.max()) == 1:
            self.text_counts = None  # no rewrites: every sample has its caption only

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
        if self.texts is not None:
            choice = torch.zeros(len(idx), dtype=torch.long)
            if self.text_counts is not None:  # drawn for the global batch, sliced like `pick`
                glob = perm[i * self.batch_size : (i + 1) * self.batch_size]
                choice = rewrite_choice(self.text_counts[glob], self.seed, step)
                choice = choice[self.rank * local : (self.rank + 1) * local]
            out["texts"] = [self.texts[j][c] for j, c in zip(idx.tolist(), choice.tolist())]
        return out


def group_texts(captions: list[str], keys: list[str], metas: list[dict[str, Any]],
                rewrites: dict[int, tuple[str, list[str]]] | None = None,
                where: str = "the shards") -> list[list[str]]:
    """The candidate texts of each caption group: ``[caption]``, or with LaCLIP ``rewrites``
    (``caption_id -> (caption, rewrites)``, from the rewrites stage) ``[caption, *rewrites]``.

    A group's caption id is its metadata's ``caption_id`` (the images stage records it), else
    its numeric key. A group without rewrites, or whose rewrites were made from another caption,
    is an error: the rewrites must come from the captions the images were rendered from.
    """
    if rewrites is None:
        return [[c] for c in captions]
    out = []
    for caption, key, meta in zip(captions, keys, metas):
        cid = meta.get("caption_id", int(key) if key.isdigit() else None)
        if cid not in rewrites:
            raise DataError(f"caption group {key!r} of {where} has no rewrites: make them from "
                            "the captions its images were rendered from (captions.rewrite.source) "
                            "or set method.rewrites=false")
        source, alts = rewrites[cid]
        if source != caption:
            raise DataError(f"the rewrites of caption {cid} were made from {source!r}, but the "
                            f"images of group {key!r} in {where} were rendered from {caption!r}; "
                            "rewrite the captions these images come from (captions.rewrite.source)")
        out.append([caption, *alts])
    return out
