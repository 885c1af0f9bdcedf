"""The caption backend interface: one over a grammar, transformers and vLLM.

A backend maps a list of :class:`Query` to one raw completion per query. Language-model backends
read ``query.prompt`` (the in-context prompt of :mod:`synrep.captions.templates`); the grammar
reads the structured fields. Raw completions are cleaned by the stage, never by the backend, so
every backend's output goes through the same checks.

Register a backend with ``@BACKENDS.register("name")`` on a factory ``(CaptionsConfig, device) ->
CaptionBackend`` and import its module in :mod:`synrep.captions.backends`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from synrep.concepts import Concept, ConceptBank
from synrep.registry import Registry

BACKENDS: Registry = Registry("caption backend")


@dataclass(frozen=True)
class Sampling:
    """Language-model sampling parameters (recorded on every output row)."""

    temperature: float
    top_p: float
    max_new_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {"temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens}


@dataclass
class Query:
    """What one caption (or one rewrite) is asked for.

    Attributes:
        template: ``c``, ``c_bg``, ``c_rel`` or ``rewrite``.
        bank, concept: where the concept came from (None for rewrites of foreign captions).
        background: the environment of a ``c_bg`` query.
        relation: the spatial relation of a ``c_rel`` query.
        obj: the second object of a ``c_rel`` query (the grammar's choice; a language model
            picks its own).
        source: the caption to rewrite (``rewrite``).
        demo_ids: ids of the demonstrations in the prompt.
        prompt: the in-context prompt ("" where the backend reads no prompt).
    """

    template: str
    bank: ConceptBank | None = None
    concept: Concept | None = None
    background: str | None = None
    relation: str | None = None
    obj: str | None = None
    source: str | None = None
    demo_ids: list[str] = field(default_factory=list)
    prompt: str = ""


class CaptionBackend(ABC):
    """Turns queries into raw completions, deterministically for a given ``seed``."""

    name: str = ""
    model: str = ""  # the model's path or id, recorded on every row
    uses_prompts: bool = True  # False: the stage skips building prompts

    @abstractmethod
    def generate(self, queries: Sequence[Query], sampling: Sampling, seed: int) -> list[str]:
        """One raw completion per query (its first line is the caption)."""
