"""Backbones, encoders and heads."""

from synrep.models.backbones import BACKBONES, Encoder, build_backbone, build_encoder
from synrep.models.heads import ProjectionHead

__all__ = ["BACKBONES", "Encoder", "ProjectionHead", "build_backbone", "build_encoder"]
