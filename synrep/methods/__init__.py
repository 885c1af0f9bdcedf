"""Training objectives, one per file, looked up by name in :data:`METHODS`."""

from synrep.methods import simclr, stablerep, supervised, synclr  # noqa: F401  (fill the registry)
from synrep.methods.base import METHODS, Method

__all__ = ["METHODS", "Method"]
