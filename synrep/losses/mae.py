"""MAE's masked reconstruction loss (He et al. 2022, arXiv 2111.06377, section 3).

"The loss function computes the mean squared error (MSE) between the reconstructed and original
images in the pixel space. We compute the loss only on masked patches." With *normalised pixels*
(the paper's "norm pix" variant, its default for the best results) each target patch is first
normalised by the mean and standard deviation of its own pixels.

The loss is the mean over masked patches of the per-patch MSE (mean over the patch's values):

    t'_bl = (t_bl - mean(t_bl)) / sqrt(var(t_bl) + eps)          (norm_pix; var unbiased, as MAE)
    L = sum_{b,l} mask_bl * mean_k (pred_blk - t'_blk)^2  /  max(1, sum_{b,l} mask_bl)

Used by MAE, MixedAE and MoCE (:mod:`synrep.methods.mae` and its subclasses); images become
patches with :func:`synrep.methods.mae.patchify`. The loss is local to each rank: every rank
averages over its own masked patches and DDP averages the gradients, which equals one process
on the whole batch whenever every rank masks the same number of patches (MAE masks a fixed
share of every image).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MaskedReconstructionLoss", "masked_reconstruction_loss"]


def masked_reconstruction_loss(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                               norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    ``target`` and ``pred`` (B, L, P) patches, ``mask`` (B, L) with 1 = masked. With ``norm_pix``
    each target patch is first normalised by its own mean and (unbiased) variance:
    ``(t - mean) / sqrt(var + eps)``. Visible patches do not contribute. Computes in float32.
    Returns a scalar (0 when no patch is masked).
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, L)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


class MaskedReconstructionLoss(nn.Module):
    """MAE's pixel loss: MSE on the masked patches, optionally against normalised pixels.

    Args:
        norm_pix: normalise every target patch by its own mean and standard deviation (MAE's
            "norm pix" targets).
        eps: added to each patch's variance before the square root (MAE: 1e-6).

    Shapes:
        target [B, L, P] patches of the input (e.g. ``patchify(images, p)``, P = p*p*C), pred
        [B, L, P] the decoder's predictions, mask [B, L] with 1 = masked (reconstructed),
        0 = visible. Returns a scalar.

    Example:
        >>> loss_fn = MaskedReconstructionLoss(norm_pix=True)
        >>> target, pred = torch.rand(2, 16, 49), torch.randn(2, 16, 49)
        >>> mask = (torch.rand(2, 16) < 0.75).float()
        >>> loss = loss_fn(target, pred, mask)
    """

    def __init__(self, norm_pix: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if not isinstance(norm_pix, bool):
            raise ValueError(f"norm_pix must be True or False, got {norm_pix!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
                or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        self.norm_pix = norm_pix
        self.eps = float(eps)

    def forward(self, target: torch.Tensor, pred: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        if target.ndim != 3 or pred.shape != target.shape:
            raise ValueError(f"target and pred must both be [B, L, P] patches, got "
                             f"{tuple(target.shape)} and {tuple(pred.shape)}")
        if mask.shape != target.shape[:2]:
            raise ValueError(f"mask must be [B, L] = {list(target.shape[:2])}, got "
                             f"{list(mask.shape)}")
        if self.norm_pix and target.shape[2] < 2:
            raise ValueError("norm_pix=True normalises each patch by its own variance and needs "
                             f"patches of more than one value, got P = {target.shape[2]}")
        return masked_reconstruction_loss(target, pred, mask, self.norm_pix, self.eps)

    def extra_repr(self) -> str:
        return f"norm_pix={self.norm_pix}, eps={self.eps:g}"
