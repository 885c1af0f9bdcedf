"""Training objectives, one per file, looked up by name in :data:`METHODS`."""

from synrep.methods import (  # noqa: F401  (fill the registry)
    clip,
    mae,
    mixedae,
    moce,
    simclr,
    stablerep,
    stablerep_pp,
    supervised,
    synclr,
)
from synrep.methods.base import METHODS, Method

__all__ = ["METHODS", "Method"]
