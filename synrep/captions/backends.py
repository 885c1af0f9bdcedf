"""Caption backends by name: the grammar, transformers and vLLM (see :mod:`synrep.captions.base`).

Importing this module registers every backend; language-model libraries load only when a
backend is used.
"""

from __future__ import annotations

from synrep.captions import grammar, hf, vllm  # noqa: F401  (fill the registry)
from synrep.captions.base import BACKENDS, CaptionBackend, Query, Sampling

__all__ = ["BACKENDS", "CaptionBackend", "Query", "Sampling", "build_backend"]


def build_backend(cfg, device: str = "cpu") -> CaptionBackend:
    """The backend named by ``cfg.backend`` (a :class:`~synrep.config.CaptionsConfig`)."""
    return BACKENDS.get(cfg.backend)(cfg, device)
