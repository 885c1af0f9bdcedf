"""Image-text contrastive losses: CLIP's symmetric InfoNCE (Radford et al. 2021, arXiv 2103.00020)
and StableRep++'s multi-positive image-text term (Tian et al., arXiv 2306.00984; docs/methods.md
section 2).

Both compare L2-normalised image and text embeddings with a *learnable* logit scale: the caller
owns the parameter ``log_scale`` (CLIP initialises it to log(1 / 0.07)) and the loss uses
``exp(log_scale)`` clamped at ``max_logit_scale`` (100 in CLIP, "to prevent scaling the logits by
more than 100, which we found necessary to prevent training instability"). Under
``torch.distributed`` every query is scored against the embeddings of the *global* batch, gathered
with gradient, and labels are offset by rank; each rank's loss is the mean over its own rows, so
DDP's gradient averaging reproduces one process on the concatenated batch.

:func:`clip_loss` is the functional form with a fixed scale and a ``reduction`` (``"none"``: each
row's loss, what JEST's CLIP scoring sums; :class:`synrep.selection.jest.SoftmaxPairs` evaluates
the same per-example losses blockwise for large super-batches).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from synrep.dist import gather_with_grad, rank
from synrep.losses.multipos import multipos_query_key_loss

__all__ = ["ClipLoss", "MultiPosImageTextLoss", "clip_loss", "logit_scale"]

Reduction = Literal["mean", "sum", "none"]


def logit_scale(log_scale: torch.Tensor, max_logit_scale: float = 100.0) -> torch.Tensor:
    """``exp(log_scale)`` clamped at ``max_logit_scale`` (no gradient above the clamp)."""
    return log_scale.float().exp().clamp(max=max_logit_scale)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              scale: float | torch.Tensor, reduction: Reduction = "mean",
              gather: bool = True) -> torch.Tensor:
    """CLIP's symmetric cross-entropy at a given logit ``scale`` (not its log), see
    :class:`ClipLoss`.

    ``image_features`` and ``text_features`` [n, d] (normalised inside); ``scale`` a number or a
    scalar tensor that may carry a gradient. ``reduction``: ``"mean"`` (:class:`ClipLoss`),
    ``"sum"``, or ``"none"``: the [n] losses ``(CE_image_i + CE_text_i) / 2`` of this rank's
    rows. With ``gather=False`` the rows are scored against this rank's columns only, also under
    ``torch.distributed``. Computes in float32 (float64 inputs stay float64), also under autocast.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    with torch.autocast(image_features.device.type, enabled=False):
        img = F.normalize(_at_least_float32(image_features), dim=1)
        txt = F.normalize(_at_least_float32(text_features), dim=1)
        n = img.shape[0]
        # This rank's rows against every rank's columns; the positives sit at rank * n + i.
        labels = torch.arange(n, device=img.device) + (rank() * n if gather else 0)
        txt_all = gather_with_grad(txt) if gather else txt
        img_all = gather_with_grad(img) if gather else img
        logits_img = scale * img @ txt_all.T  # (n, N)
        logits_txt = scale * txt @ img_all.T  # (n, N)
        return (F.cross_entropy(logits_img, labels, reduction=reduction)
                + F.cross_entropy(logits_txt, labels, reduction=reduction)) / 2


def _check_max(max_logit_scale: float) -> float:
    if not max_logit_scale > 0 or not math.isfinite(max_logit_scale):
        raise ValueError(f"max_logit_scale must be a positive number, got {max_logit_scale}")
    return float(max_logit_scale)


class ClipLoss(nn.Module):
    """CLIP's symmetric cross-entropy over image-text similarities.

    Image i and text i form the only positive pair of row i; the loss is the mean of the
    image->text and text->image cross-entropies over the global batch:
    ``(CE(s * I T^T, arange) + CE(s * T I^T, arange)) / 2`` with unit-norm I, T and scale s.

    Args:
        max_logit_scale: the learned scale is clamped at this value (CLIP: 100).

    Shapes:
        image_features [n, d], text_features [n, d] (any norm; normalised inside), log_scale a
        scalar tensor (the learnable parameter). Returns a scalar. Every rank passes the same n.

    Example:
        >>> loss_fn = ClipLoss()
        >>> log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        >>> loss = loss_fn(torch.randn(8, 32), torch.randn(8, 32), log_scale)
    """

    def __init__(self, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.max_logit_scale = _check_max(max_logit_scale)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                log_scale: torch.Tensor) -> torch.Tensor:
        if image_features.ndim != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                f"image and text features must both be [n, d], got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        with torch.autocast(image_features.device.type, enabled=False):  # logits in float32
            scale = logit_scale(log_scale, self.max_logit_scale)
            return clip_loss(image_features, text_features, scale)


class MultiPosImageTextLoss(nn.Module):
    """StableRep++'s image-text term: the multi-positive loss between images and captions.

    The m images of a caption all match that caption's text. Image->text: each image's target is
    uniform over the texts with its label (its one caption); text->image: each text's target is
    uniform over the images with its label (the m images drawn from it). The term is the mean of
    the two directions, each the multi-positive cross-entropy of
    :func:`~synrep.losses.multipos.multipos_query_key_loss` at temperature ``1 / scale``. With one
    image per caption it equals :class:`ClipLoss`.

    Args:
        max_logit_scale: the learned scale is clamped at this value (CLIP: 100).

    Shapes:
        image_features [n, d], image_labels [n] (caption ids, local to the rank), text_features
        [t, d], text_labels [t], log_scale a scalar tensor. Returns a scalar.

    Example:
        >>> loss_fn = MultiPosImageTextLoss()
        >>> images, texts = torch.randn(8, 32), torch.randn(4, 32)  # 4 captions x 2 images
        >>> loss = loss_fn(images, torch.arange(4).repeat_interleave(2), texts, torch.arange(4),
        ...                torch.tensor(math.log(1 / 0.07)))
    """

    def __init__(self, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.max_logit_scale = _check_max(max_logit_scale)

    def forward(self, image_features: torch.Tensor, image_labels: torch.Tensor,
                text_features: torch.Tensor, text_labels: torch.Tensor,
                log_scale: torch.Tensor) -> torch.Tensor:
        if image_features.ndim != 2 or text_features.ndim != 2 \
                or image_features.shape[1] != text_features.shape[1]:
            raise ValueError(
                f"image and text features must be [n, d] and [t, d], got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        if image_labels.shape != image_features.shape[:1] \
                or text_labels.shape != text_features.shape[:1]:
            raise ValueError("need one label per image and one per text, got "
                             f"{tuple(image_labels.shape)} and {tuple(text_labels.shape)}")
        temperature = 1.0 / logit_scale(log_scale, self.max_logit_scale)
        none_i = torch.full_like(image_labels, -1, dtype=torch.long)  # no key is left out
        none_t = torch.full_like(text_labels, -1, dtype=torch.long)
        i2t = multipos_query_key_loss(image_features, image_labels, text_features, text_labels,
                                      none_i, temperature)
        t2i = multipos_query_key_loss(text_features, text_labels, image_features, image_labels,
                                      none_t, temperature)
        return (i2t + t2i) / 2
