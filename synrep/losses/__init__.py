"""Loss modules, one per file."""

from synrep.losses.multipos import MultiPosConLoss

__all__ = ["MultiPosConLoss"]
