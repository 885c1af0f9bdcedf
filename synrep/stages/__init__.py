"""The pipeline's stages, looked up by name in :data:`STAGES` (see :class:`Stage`)."""

from synrep.stages import core, moce  # noqa: F401  (fill the registry)
from synrep.stages.base import STAGES, Stage, register_stage, stage_names

__all__ = ["STAGES", "Stage", "register_stage", "stage_names"]
