"""Frozen-feature extraction and on-disk feature caches.

Every frozen-feature protocol (SynCLR/DINOv2 linear probes, DINO kNN; docs/methods.md section 1
"Evaluation protocols") runs the encoder once over a dataset and then fits heads on the cached
features, so extraction is separate from the heads and its output can be saved as ``.npz``.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from synrep.data.sources import LazyImages
from synrep.errors import DataError
from synrep.utils import atomic_output

__all__ = ["extract_features", "load_features", "save_features"]


def extract_features(
    fn: Callable[[Tensor], Tensor],
    images: Tensor,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    desc: str = "features",
    workers: int = 0,
) -> Tensor:
    """Run ``fn`` over ``images`` in batches and collect its outputs.

    Args:
        fn: maps a float batch ``[B, C, H, W]`` in ``[0, 1]`` on ``device`` to features ``[B, D]``
            (e.g. an encoder in eval mode with its normalisation inside). Called under
            :func:`torch.inference_mode`.
        images: uint8 images ``[N, C, H, W]``, on any device, or a
            :class:`~synrep.data.sources.LazyImages` decoded batch by batch (in ``workers``
            DataLoader processes), so a set larger than RAM is never held.
        batch_size: images per call of ``fn``.
        device: where each batch is converted to float and ``fn`` runs.
        desc: label of the progress bar.

    Returns:
        float32 features ``[N, D]`` on the CPU (a normal tensor, not an inference tensor, so callers
        may modify it in place).
    """
    if isinstance(images, LazyImages):
        return _extract_lazy(fn, images, batch_size, device, desc, workers)
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = (
            f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images)
        )
        raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {got}")
    if len(images) == 0:
        raise ValueError("images is empty: there is nothing to extract features from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    n = len(images)
    out: Tensor | None = None
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch"):
        # Transfer uint8 (4x fewer bytes than float) and convert on the target device.
        batch = images[start : start + batch_size].to(device, non_blocking=True)
        with torch.inference_mode():
            feats = fn(batch.float().div_(255.0))
            if not isinstance(feats, Tensor) or feats.ndim != 2 or len(feats) != len(batch):
                got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats)
                raise ValueError(f"fn must return features [{len(batch)}, D], got {got}")
            feats = feats.float().cpu()
        if out is None:
            # Allocated outside inference mode so the result is an ordinary tensor.
            out = torch.empty(n, feats.shape[1], dtype=torch.float32)
        elif feats.shape[1] != out.shape[1]:
            raise ValueError(f"fn returned {feats.shape[1]} features, earlier {out.shape[1]}")
        out[start : start + len(feats)] = feats
    assert out is not None
    return out


def _extract_lazy(fn: Callable[[Tensor], Tensor], images: LazyImages, batch_size: int,
                  device: str | torch.device, desc: str, workers: int) -> Tensor:
    if len(images) == 0:
        raise ValueError("images is empty: there is nothing to extract features from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: Tensor | None = None
    start = 0
    total = -(-len(images) // batch_size)
    for chunk in tqdm(images.batches(batch_size, workers), total=total, desc=desc, unit="batch"):
        with torch.inference_mode():
            feats = fn(chunk.to(device, non_blocking=True).float().div_(255.0)).float().cpu()
        if out is None:
            out = torch.empty(len(images), feats.shape[1], dtype=torch.float32)
        out[start : start + len(feats)] = feats
        start += len(feats)
    assert out is not None and start == len(images)
    return out


def save_features(path: str | os.PathLike[str], features: Tensor, labels: Tensor) -> None:
    """Write ``features [N, D]`` (as float32) and ``labels [N]`` (as int64) to an ``.npz`` file.

    The file is written under a temporary name (unique to this process) and renamed, so a crash
    never leaves a truncated cache where a complete one is expected; a full disk is one
    :class:`DataError`.

    Raises:
        DataError: ``path`` is a directory, or the disk is full.
    """
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ValueError(
            f"need features [N, D] and labels [N], got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"feature file {path!r} is a directory; name a .npz file to write")
    with atomic_output(path, "wb") as f:  # a file object stops numpy appending ".npz" to the name
        np.savez(
            f,
            features=features.detach().cpu().float().numpy(),
            labels=labels.detach().cpu().long().numpy(),
        )


def load_features(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """Read a :func:`save_features` file: float32 ``features [N, D]``, int64 ``labels [N]``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"feature file {path!r} does not exist; extract and save features first")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"features", "labels"} - set(data.files)
            if missing:
                raise DataError(
                    f"feature file {path!r} lacks {sorted(missing)} (has {sorted(data.files)}); "
                    "it was not written by synrep.eval.save_features"
                )
            features = torch.from_numpy(data["features"]).float()
            labels = torch.from_numpy(data["labels"]).long()
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(
            f"feature file {path!r} is unreadable ({e}); delete it and re-extract"
        ) from e
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise DataError(
            f"feature file {path!r} holds features {tuple(features.shape)} and labels "
            f"{tuple(labels.shape)}; expected [N, D] and [N]; delete it and re-extract"
        )
    return features, labels
