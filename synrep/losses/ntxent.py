"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, arXiv
2002.05709, equation 1), as MixedAE's homologous contrastive term uses it (Chen et al., CVPR 2023;
docs/methods.md).

M pairs of embeddings ``(z1[i], z2[i])`` give 2M views. For every view the positive is the other
view of its pair and the negatives are the other 2M - 2 views of the *global* batch:

    l(a, b) = -log exp(s_ab / tau) / sum_{k != a} exp(s_ak / tau),      s = z z^T
    L = 1 / (2M) sum_i [l(i, M + i) + l(M + i, i)]

The embeddings are expected L2-normalised (SimCLR's cosine similarity); they are not normalised
again here. Under ``torch.distributed`` both halves are gathered with gradient, so every view is
scored against the views of every rank, and each rank's loss is the mean over its own 2m views;
DDP's gradient averaging then reproduces one process on the concatenated batch exactly (every
rank must pass the same m). In one process the gather is skipped and the similarities are the
plain ``z @ z^T``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from synrep.dist import gather_with_grad, rank, world_size

__all__ = ["NTXentLoss", "nt_xent"]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over 2M L2-normalised embeddings ``z1``, ``z2`` (m, d) on this rank.

    The positive of ``z1[i]`` is ``z2[i]`` and vice versa; every other view of the global batch
    (2M - 2 of them, M = m * world size) is a negative. Returns this rank's mean over its 2m
    views (a scalar, computed in float32).
    """
    z = torch.cat([z1, z2]).float()  # (2m, d): this rank's views, the queries
    m = z1.shape[0]
    if world_size() == 1:
        keys, big_m, offset = z, m, 0
    else:  # every rank's first views, then every rank's second views: (2M, d)
        keys = torch.cat([gather_with_grad(z[:m]), gather_with_grad(z[m:])])
        big_m, offset = keys.shape[0] // 2, rank() * m
    sim = z @ keys.t() / temperature  # (2m, 2M)
    local = torch.arange(m, device=z.device) + offset  # global index of each pair among M
    own = torch.cat([local, local + big_m])  # each query's own column
    drop = torch.zeros_like(sim, dtype=torch.bool)
    drop[torch.arange(2 * m, device=z.device), own] = True
    sim = sim.masked_fill(drop, float("-inf"))
    target = torch.cat([local + big_m, local])  # the other view of the pair
    return F.cross_entropy(sim, target)


class NTXentLoss(nn.Module):
    """NT-Xent between two views of M samples (SimCLR; MixedAE's contrastive term).

    Args:
        temperature: the softmax temperature tau (SimCLR 0.1-0.5, MixedAE here 0.2).

    Shapes:
        z1 [m, d], z2 [m, d]: the two views of this rank's m samples, L2-normalised. Returns a
        scalar, the mean over this rank's 2m views. Every rank passes the same m.

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.2)
        >>> z1 = F.normalize(torch.randn(8, 16), dim=1)
        >>> z2 = F.normalize(torch.randn(8, 16), dim=1)
        >>> loss = loss_fn(z1, z2)
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] == 0:
            raise ValueError(f"z1 and z2 must both be non-empty [m, d] views, got "
                             f"{tuple(z1.shape)} and {tuple(z2.shape)}")
        return nt_xent(z1, z2, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}"
