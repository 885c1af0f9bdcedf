"""Loss modules, one per file."""

from synrep.losses.ibot import ibot_loss, sinkhorn_knopp
from synrep.losses.multipos import MultiPosConLoss, multipos_query_key_loss

__all__ = ["MultiPosConLoss", "ibot_loss", "multipos_query_key_loss", "sinkhorn_knopp"]
