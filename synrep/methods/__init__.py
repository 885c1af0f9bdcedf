"""Training objectives, one per file, looked up by name in :data:`METHODS`."""

from synrep.methods import (  # noqa: F401  (fill the registry)
    mae,
    mixedae,
    simclr,
    stablerep,
    supervised,
    synclr,
)
from synrep.methods.base import METHODS, Method

__all__ = ["METHODS", "Method"]
