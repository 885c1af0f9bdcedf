"""Patch masks for masked image modelling, drawn for a whole batch at once.

A mask is (B, h, w) bool over the patch grid, True = masked. ``mask_prob`` of the crops are masked
at all; each of those masks a share of its tokens drawn uniformly from ``ratio`` (iBOT's
0.1-0.5). ``random`` picks exactly that many tokens at random; ``block`` covers it with up to four
random rectangles of random aspect ratio (BEiT's block-wise masking, done with tensor ops instead
of a per-image rejection loop), so the masked share is approximate.
"""

from __future__ import annotations

import math

import torch


def patch_masks(b: int, h: int, w: int, g: torch.Generator, mask_prob: float,
                ratio: tuple[float, float], kind: str = "block", device=None) -> torch.Tensor:
    """(B, h, w) bool masks; the first ``round(mask_prob * B)`` crops get one, shuffled over B."""
    lo, hi = ratio
    if not 0 <= lo <= hi < 1:
        raise ValueError(f"mask ratio must satisfy 0 <= lo <= hi < 1, got {ratio}")
    n_tok = h * w
    share = torch.rand(b, generator=g, device=device) * (hi - lo) + lo  # (B,)
    on = torch.rand(b, generator=g, device=device).argsort() < round(mask_prob * b)
    target = (share * n_tok).round().clamp(min=1) * on  # tokens to mask per crop
    if kind == "random":
        rank = torch.rand(b, n_tok, generator=g, device=device).argsort(dim=1).argsort(dim=1)
        return (rank < target[:, None]).view(b, h, w)
    if kind != "block":
        raise ValueError(f"unknown mask kind {kind!r}; choose block or random")
    ys = torch.arange(h, device=device).view(1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, w)
    mask = torch.zeros(b, h, w, dtype=torch.bool, device=device)
    for _ in range(4):  # add rectangles while a crop is short of its target
        short = mask.flatten(1).sum(dim=1) < target
        area = (target - mask.flatten(1).sum(dim=1)).clamp(min=1).float()
        log_r = (torch.rand(b, generator=g, device=device) * 2 - 1) * math.log(3.0)
        bh = torch.sqrt(area * log_r.exp()).round().clamp(1, h)
        bw = (area / bh).round().clamp(1, w)
        y0 = (torch.rand(b, generator=g, device=device) * (h - bh + 1)).floor()
        x0 = (torch.rand(b, generator=g, device=device) * (w - bw + 1)).floor()
        box = ((ys >= y0.view(-1, 1, 1)) & (ys < (y0 + bh).view(-1, 1, 1))
               & (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + bw).view(-1, 1, 1)))
        mask |= box & short.view(-1, 1, 1)
    return mask
