"""Balance losses of a mixture-of-experts gate: V-MoE's importance loss and the load loss (Riquelme
et al. 2021, arXiv 2106.05974, appendix A; Shazeer et al. 2017, arXiv 1701.06538; the load term in
Switch Transformer's differentiable form, Fedus et al. 2021, arXiv 2101.03961, equation 4). MoCE
(Liu et al., ICLR 2023; docs/methods.md section 6) adds both to keep its cluster-routed gates
balanced.

With gate probabilities ``p`` (N, E) of N inputs over E experts:

    importance:  Imp_e = sum_i p_ie,      L_imp  = CV(Imp)^2 = var(Imp) / mean(Imp)^2
    load:        f_e = share of inputs whose top expert is e (no gradient),
                 P_e = mean_i p_ie,        L_load = E * sum_e f_e P_e

``importance_loss`` is 0 when every expert gets the same summed probability and E - 1 when one
expert takes everything with certainty; ``load_loss`` is 1 for a balanced, uniform gate and E at
worst. Both depend on the whole batch, not on a sum over its rows: the modules compute them on the
probabilities gathered with gradient from every rank, so each rank computes the same global value
and DDP's gradient averaging reproduces one process on the concatenated batch. The functions
compute them on the tensor they are given.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from synrep.dist import gather_with_grad

__all__ = ["ImportanceLoss", "LoadLoss", "importance_loss", "load_loss"]


def importance_loss(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """V-MoE importance loss: squared coefficient of variation of Imp_e = sum_i p_ie.

    ``probs`` (N, E) gate probabilities; population variance. 0 when every expert has the same
    summed probability, E - 1 when one expert takes all of it with certainty. Scalar.
    """
    imp = probs.sum(0)
    return imp.var(unbiased=False) / imp.mean().pow(2).clamp_min(eps)


def load_loss(probs: torch.Tensor) -> torch.Tensor:
    """Load loss E * sum_e f_e * P_e: f_e the share of rows whose top expert is e (no gradient),
    P_e the mean probability of e. 1 for a perfectly balanced, uniform gate; E at worst.
    ``probs`` (N, E). Scalar."""
    e = probs.shape[1]
    f = F.one_hot(probs.argmax(1), e).to(probs.dtype).mean(0)
    return e * (f * probs.mean(0)).sum()


def _check_probs(probs: torch.Tensor) -> None:
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ValueError(f"probs must be [N, E] gate probabilities with N >= 1 inputs and E >= 2 "
                         f"experts, got shape {tuple(probs.shape)}")


class ImportanceLoss(nn.Module):
    """CV(Imp)^2 of the gate probabilities of the global batch (V-MoE's importance loss).

    Args:
        eps: the squared mean importance is clamped at this value before dividing (> 0).

    Shapes:
        probs [n, E]: this rank's gate probabilities (rows sum to 1). Returns a scalar, the same
        on every rank (computed on the [N, E] probabilities gathered from all ranks). Every rank
        passes the same n.

    Example:
        >>> loss_fn = ImportanceLoss()
        >>> probs = torch.randn(16, 4, requires_grad=True).softmax(dim=1)
        >>> loss = loss_fn(probs)
    """

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
                or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        self.eps = float(eps)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        _check_probs(probs)
        return importance_loss(gather_with_grad(probs), self.eps)


class LoadLoss(nn.Module):
    """E * sum_e f_e P_e over the global batch (the differentiable load-balancing loss).

    No constructor arguments.

    Shapes:
        probs [n, E]: this rank's gate probabilities. Returns a scalar, the same on every rank
        (computed on the probabilities gathered from all ranks). Every rank passes the same n.

    Example:
        >>> loss_fn = LoadLoss()
        >>> probs = torch.randn(16, 4, requires_grad=True).softmax(dim=1)
        >>> loss = loss_fn(probs)
    """

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        _check_probs(probs)
        return load_loss(gather_with_grad(probs))
