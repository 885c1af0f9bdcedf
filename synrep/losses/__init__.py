"""Loss modules, one per file."""

from synrep.losses.clip import ClipLoss, MultiPosImageTextLoss, logit_scale
from synrep.losses.ibot import ibot_loss, sinkhorn_knopp
from synrep.losses.multipos import MultiPosConLoss, multipos_query_key_loss

__all__ = ["ClipLoss", "MultiPosConLoss", "MultiPosImageTextLoss", "ibot_loss", "logit_scale",
           "multipos_query_key_loss", "sinkhorn_knopp"]
