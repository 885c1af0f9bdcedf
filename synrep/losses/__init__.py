"""Loss modules, one per file."""

from synrep.losses.clip import ClipLoss, MultiPosImageTextLoss, clip_loss, logit_scale
from synrep.losses.ibot import ibot_loss, sinkhorn_knopp
from synrep.losses.mae import MaskedReconstructionLoss, masked_reconstruction_loss
from synrep.losses.moe_balance import ImportanceLoss, LoadLoss, importance_loss, load_loss
from synrep.losses.multipos import MultiPosConLoss, multipos_loss, multipos_query_key_loss
from synrep.losses.ntxent import NTXentLoss, nt_xent
from synrep.losses.siglip import SigLipLoss, siglip_loss

__all__ = ["ClipLoss", "ImportanceLoss", "LoadLoss", "MaskedReconstructionLoss",
           "MultiPosConLoss", "MultiPosImageTextLoss", "NTXentLoss", "SigLipLoss", "clip_loss",
           "ibot_loss", "importance_loss", "load_loss", "logit_scale",
           "masked_reconstruction_loss", "multipos_loss", "multipos_query_key_loss", "nt_xent",
           "siglip_loss", "sinkhorn_knopp"]
