"""SynCLR's three in-context caption templates and the LaCLIP rewrite template (docs/methods.md
sections 1 and 4).

A prompt is a header line, ``demos_per_prompt`` demonstrations sampled at random from the
template's pool, and the query line last; the language model completes the query and the caption
is the first line of its completion::

    Write an image description that contains the given object category.
    tabby cat => a tabby cat curled up asleep on a sunlit windowsill
    ...
    ankle boot =>

Query lines: ``c =>`` for ``c``, ``c, bg =>`` for ``c_bg``, ``c, rel =>`` for ``c_rel`` and
``caption =>`` for ``rewrite``. The demonstrations (``demonstrations.yaml``) were written for
synrep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from synrep.errors import ConfigError

DEMOS_FILE = Path(__file__).with_name("demonstrations.yaml")
SEP = " =>"


@dataclass(frozen=True)
class Demo:
    """One demonstration: the query fields and the answer (``caption`` or ``rewrite``)."""

    id: str
    query: str  # the query part of its line, e.g. "tabby cat" or "coffee mug, next to"
    answer: str


@dataclass(frozen=True)
class Template:
    """A header line and a pool of demonstrations for one query shape."""

    name: str
    header: str
    demos: tuple[Demo, ...]

    def sample_demos(self, rng: random.Random, k: int) -> list[Demo]:
        if k > len(self.demos):
            raise ConfigError(f"template {self.name!r} has {len(self.demos)} demonstrations; "
                              f"captions.demos_per_prompt={k} asks for more")
        return rng.sample(self.demos, k)

    def prompt(self, query: str, demos: list[Demo]) -> str:
        lines = [self.header, *(f"{d.query}{SEP} {d.answer}" for d in demos), f"{query}{SEP}"]
        return "\n".join(lines)


def query_text(template: str, concept: str, background: str | None = None,
               relation: str | None = None) -> str:
    """The query part of a prompt's last line."""
    if template == "c_bg":
        return f"{concept}, {background}"
    if template == "c_rel":
        return f"{concept}, {relation}"
    return concept


@cache
def _load() -> dict[str, Template]:
    data = yaml.safe_load(DEMOS_FILE.read_text())
    out = {}
    for name, spec in data.items():
        demos = []
        for d in spec["demos"]:
            if name == "rewrite":
                demos.append(Demo(d["id"], d["caption"], d["rewrite"]))
            else:
                demos.append(Demo(d["id"], query_text(name, d["concept"], d.get("background"),
                                                      d.get("relation")), d["caption"]))
        out[name] = Template(name, spec["header"], tuple(demos))
    return out


CAPTION_TEMPLATES = ("c", "c_bg", "c_rel")


def get_template(name: str) -> Template:
    """A caption template (``c``, ``c_bg``, ``c_rel``) or ``rewrite``."""
    templates = _load()
    if name not in templates:
        raise ConfigError(f"unknown caption template {name!r}; choose from "
                          f"{', '.join(CAPTION_TEMPLATES)}")
    return templates[name]
