"""Weighted k-nearest-neighbour classification on frozen features (DINO / InstDisc kNN protocol).

The protocol of Wu et al. 2018 (InstDisc) as used by DINO (Caron et al. 2021, section 4.1) and
SynCLR's frozen-feature evaluations: L2-normalise features, take each test sample's k most
cosine-similar training samples, let each vote for its class with weight ``exp(sim / T)``, predict
the class with the largest summed weight. DINO reports k = 20, T = 0.07.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_classify"]


def knn_classify(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
    device: str | torch.device = "cpu",
) -> dict:
    """Weighted kNN top-1 of ``test_x`` against the labelled bank ``train_x``.

    Args:
        train_x: bank features ``[N, D]``; train_y: bank labels ``[N]`` in ``0..K-1``.
        test_x: query features ``[M, D]``; test_y: query labels ``[M]``.
        k: neighbours per query, ``1 <= k <= N``.
        temperature: T of the vote weights ``exp(sim / T)``.
        num_classes: K; defaults to ``max(train_y, test_y) + 1``.
        chunk: queries per batched similarity matmul (memory ``chunk x N`` floats).
        device: where the similarities are computed.

    Returns:
        ``{"top1": top-1 in percent, "predictions": int64 [M] on the CPU}``. Ties between classes
        go to the lowest class index.
    """
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.ndim != 2 or not x.dtype.is_floating_point:
            raise ValueError(
                f"{name}_x must be float features [N, D], got {x.dtype} {tuple(x.shape)}"
            )
        if y.ndim != 1 or y.dtype.is_floating_point or len(y) != len(x):
            raise ValueError(
                f"{name}_y must be integer labels [{len(x)}], got {y.dtype} {tuple(y.shape)}"
            )
        if len(x) == 0:
            raise ValueError(f"{name}_x is empty")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}_x contains NaN or inf; fix the features first")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x has {train_x.shape[1]} features but test_x has {test_x.shape[1]}"
        )
    if not 1 <= k <= len(train_x):
        raise ValueError(f"k must be in [1, {len(train_x)}] (the bank size), got {k}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    label_max = int(max(train_y.max(), test_y.max()))
    if int(min(train_y.min(), test_y.min())) < 0:
        raise ValueError("labels must be in 0..K-1; got a negative label")
    if num_classes is None:
        num_classes = label_max + 1
    elif num_classes <= label_max:
        raise ValueError(f"num_classes={num_classes} but a label is {label_max}")

    bank = F.normalize(train_x.to(device, torch.float32), dim=1)  # (N, D)
    bank_y = train_y.to(device, torch.long)
    preds = []
    for s in range(0, len(test_x), chunk):
        q = F.normalize(test_x[s : s + chunk].to(device, torch.float32), dim=1)  # (B, D)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (B, k), sorted: column 0 is the most similar
        # exp((sim - sim_max) / T): the same argmax as exp(sim / T) (a common factor per query),
        # but no overflow for small T.
        weight = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(len(q), num_classes, device=device)
        votes.scatter_add_(1, bank_y[idx], weight)  # (B, K) summed weight per class
        preds.append(votes.argmax(1).cpu())
    predictions = torch.cat(preds)
    top1 = 100.0 * float((predictions == test_y.cpu()).float().mean())
    return {"top1": top1, "predictions": predictions}
