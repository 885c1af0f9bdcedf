"""SigLIP's sigmoid image-text loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training", arXiv 2303.15343, algorithm 1).

Every image-text pair of the batch is an independent binary classification: the matching pair
(i = j) is positive, every other pair negative. With unit-norm image and text embeddings x, y, a
learnable logit scale t and bias b:

    l_ij = -log sigmoid(z_ij (t x_i . y_j + b)),      z_ij = +1 if i = j else -1
    L = 1/|B| sum_i sum_j l_ij

(normalised by the batch size, not by the number of pairs, as in the paper). The pair losses are
what JEST scores SigLIP sub-batches with (:class:`synrep.selection.jest.SigmoidPairs` is their
memory-bounded, blockwise evaluation): the loss of a sub-batch A is ``sum_{i,j in A} l_ij / |A|``.

Under ``torch.distributed`` this rank's images are scored against the texts of every rank,
gathered with gradient (the positive of image i sits at column ``rank * n + i``); each rank's loss
is the sum over its rows divided by its n, so the mean over ranks is the loss of the global batch
and DDP's gradient averaging reproduces one process on the concatenated batch exactly.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from synrep.dist import gather_with_grad, rank
from synrep.losses.clip import logit_scale

__all__ = ["SigLipLoss", "siglip_loss"]

Reduction = Literal["mean", "sum", "none"]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                scale: float | torch.Tensor, bias: float | torch.Tensor,
                reduction: Reduction = "mean", gather: bool = True) -> torch.Tensor:
    """The SigLIP loss of images [n, d] against texts [n, d] (normalised inside).

    ``scale`` is the logit scale t itself (not its log) and ``bias`` b; either may be a scalar
    tensor that carries a gradient. ``reduction``: ``"mean"`` the paper's loss (sum over pairs /
    n), ``"sum"`` the sum over pairs, ``"none"`` the [n, N] matrix of pair losses ``l_ij`` (rows:
    this rank's images, columns: the texts of the global batch). With ``gather=False`` the texts
    of this rank only are used, also under ``torch.distributed``. Computes in float32 (float64
    inputs stay float64), also under autocast.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    with torch.autocast(image_features.device.type, enabled=False):
        img = F.normalize(_at_least_float32(image_features), dim=1)
        txt = F.normalize(_at_least_float32(text_features), dim=1)
        n = img.shape[0]
        txt_all = gather_with_grad(txt) if gather else txt
        offset = rank() * n if gather else 0
        logits = scale * img @ txt_all.T + bias  # (n, N)
        sign = torch.full_like(logits, -1.0)
        rows = torch.arange(n, device=img.device)
        sign[rows, rows + offset] = 1.0
        pair = -F.logsigmoid(sign * logits)
        if reduction == "none":
            return pair
        total = pair.sum()
        return total if reduction == "sum" else total / n


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss with a learnable logit scale and bias.

    The caller owns both parameters: ``log_scale`` (SigLIP initialises t = exp(log_scale) = 10)
    and ``bias`` (initialised to -10); the scale is ``exp(log_scale)`` clamped at
    ``max_logit_scale``.

    Args:
        max_logit_scale: the learned scale is clamped at this value (positive, finite).

    Shapes:
        image_features [n, d], text_features [n, d] (any norm; normalised inside), log_scale and
        bias scalar tensors. Returns a scalar. Every rank passes the same n.

    Example:
        >>> loss_fn = SigLipLoss()
        >>> log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        >>> bias = nn.Parameter(torch.tensor(-10.0))
        >>> loss = loss_fn(torch.randn(8, 32), torch.randn(8, 32), log_scale, bias)
    """

    def __init__(self, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        if isinstance(max_logit_scale, bool) or not isinstance(max_logit_scale, (int, float)) \
                or not (math.isfinite(max_logit_scale) and max_logit_scale > 0):
            raise ValueError(
                f"max_logit_scale must be a finite number > 0, got {max_logit_scale!r}")
        self.max_logit_scale = float(max_logit_scale)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                log_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if image_features.ndim != 2 or image_features.shape != text_features.shape \
                or image_features.shape[0] == 0:
            raise ValueError(
                f"image and text features must both be non-empty [n, d], got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        with torch.autocast(image_features.device.type, enabled=False):
            scale = logit_scale(log_scale, self.max_logit_scale)
            return siglip_loss(image_features, text_features, scale, bias.float())

    def extra_repr(self) -> str:
        return f"max_logit_scale={self.max_logit_scale:g}"
