"""Learning-rate and other per-step schedules."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, peak: float, warmup: int, final: float) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine decay to ``final``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(1.0, t)))
