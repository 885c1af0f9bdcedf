"""Projection heads for contrastive objectives (SimCLR / StableRep MLP heads)."""

from __future__ import annotations

from torch import nn


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
            mods += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                     nn.ReLU(inplace=True)]
            d = hidden_dim
        mods.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)
