"""Backbones, encoders and heads."""

from synrep.models.backbones import BACKBONES, Encoder, build_backbone, build_encoder
from synrep.models.heads import GlobalBatchNorm1d, ProjectionHead, PrototypeHead

__all__ = ["BACKBONES", "Encoder", "GlobalBatchNorm1d", "ProjectionHead", "PrototypeHead",
           "build_backbone", "build_encoder"]
