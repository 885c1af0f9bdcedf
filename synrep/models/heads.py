"""Heads for self-supervised objectives: the contrastive projection MLP and the iBOT token head.

Batch statistics in the projection head are taken over the *global* batch under
``torch.distributed`` (:class:`GlobalBatchNorm1d`), so N ranks compute exactly what one process
computes on the concatenated batch, on CPUs (gloo) as on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from synrep.dist import world_size


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of the incoming gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over ranks (the identity in one process)."""
    return x if world_size() == 1 else _AllReduceSum.apply(x)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batches of all ranks.

    In one process it is exactly :class:`torch.nn.BatchNorm1d`. Under ``torch.distributed`` the
    mean and variance are all-reduced with gradient (any backend, gloo included), so DDP training
    matches one process on the global batch. Shapes: (B, C) -> (B, C).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        n = all_reduce_sum(torch.tensor([float(x.shape[0])], device=x.device))
        mean = all_reduce_sum(x.sum(dim=0)) / n
        var = all_reduce_sum(((x - mean) ** 2).sum(dim=0)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), m)
                self.num_batches_tracked += 1
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


class ProjectionHead(nn.Module):
    """MLP ``in_dim -> hidden (x layers-1, BN + ReLU) -> out_dim``; ``layers=1`` is linear.

    Shapes: (B, in_dim) -> (B, out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"projection head needs at least 1 layer, got {layers}")
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden_dim, bias=False), GlobalBatchNorm1d(hidden_dim),
                     nn.ReLU(inplace=True)]
            d = hidden_dim
        mods.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


class PrototypeHead(nn.Module):
    """The DINO / iBOT head: MLP -> L2-normalised bottleneck -> cosine scores against prototypes.

    ``in_dim -> hidden (GELU) -> hidden (GELU) -> bottleneck``, normalised, then a bias-free linear
    layer whose rows (the prototypes) are unit vectors: DINO's weight-normalised last layer with
    the norm fixed at 1. Shapes: (..., in_dim) -> (..., prototypes).
    """

    def __init__(self, in_dim: int, prototypes: int, hidden_dim: int = 512,
                 bottleneck_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))
