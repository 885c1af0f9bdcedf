"""Concept banks: the things captions are written about (SynCLR, docs/methods.md section 1).

A bank is a list of :class:`Concept` plus the vocabularies the templates draw on (backgrounds for
``(c, bg) -> caption``, objects for ``(c, rel) -> caption``). Registered banks:

- ``fashion``: the 10 Fashion-MNIST classes with the attribute vocabulary of the mini
  text-to-image model (:mod:`synrep.concepts.fashion`), the embedded default.
- ``imagenet-1k``, ``imagenet-12k`` (the ~12k most frequent ImageNet-21k classes, close to the
  paper's ~13k), ``imagenet-21k``: synset lemmas and WordNet definitions from the files timm ships.
- ``places``: scene categories; ``textures``: the 47 DTD texture names.

Users add banks as files, named in ``captions.banks`` by path:

- YAML: ``{name: birds, backgrounds: [...], relation_objects: [...], concepts: [robin,
  {name: blue jay, synonyms: [jay], definition: ..., backgrounds: [...]}]}``
- plain text: one concept per line, ``#`` starts a comment, commas separate synonyms (the first
  name is the one written into prompts, as in WordNet lemma lists).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import timm.data
import yaml

from synrep.errors import ConfigError
from synrep.registry import Registry
from synrep.utils import yaml_error_summary

VOCAB_FILE = Path(__file__).with_name("vocab.yaml")
RELATIONS = ("in", "on", "next to", "behind", "in front of", "over", "under", "above", "below",
             "beside")


@dataclass(frozen=True)
class Concept:
    """One concept.

    Attributes:
        name: the phrase written into prompts and captions.
        synonyms: other names a caption may use for it (the concept check accepts any).
        definition: a gloss (WordNet definition for ImageNet concepts).
        backgrounds: environments suited to this concept; empty uses the bank's pool.
        cid: a stable id (WordNet id for ImageNet, the name otherwise).
        label: a class index when the bank is a labelled set (Fashion-MNIST), else None.
        plural: the names are plural nouns ("trousers"): written as "a pair of trousers".
        details: phrases that may follow the name ("with a hood"), for the grammar captioner.
    """

    name: str
    synonyms: tuple[str, ...] = ()
    definition: str = ""
    backgrounds: tuple[str, ...] = ()
    cid: str = ""
    label: int | None = None
    plural: bool = False
    details: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.synonyms)


@dataclass
class ConceptBank:
    """A named list of concepts and the vocabularies the caption templates draw on."""

    name: str
    concepts: list[Concept]
    backgrounds: list[str] = field(default_factory=list)
    relation_objects: list[str] = field(default_factory=list)
    # attribute -> ordered values (low to high), for banks whose images have measured attributes
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the grammar captioner's phrase pools for this bank, overriding its general ones: "leads"
    # ("a photo of"), "modifiers" (adjectives), "tails" (", at dusk") and "heads" (nouns after
    # concepts that are adjectives, as texture names are)
    phrases: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.concepts:
            raise ConfigError(f"concept bank {self.name!r} has no concepts; add at least one")
        if not self.backgrounds:
            self.backgrounds = list(vocab()["backgrounds"])
        if not self.relation_objects:
            self.relation_objects = list(vocab()["relation_objects"])

    def __len__(self) -> int:
        return len(self.concepts)

    def backgrounds_for(self, concept: Concept) -> Sequence[str]:
        return concept.backgrounds or self.backgrounds


BANKS: Registry = Registry("concept bank")


@cache
def vocab() -> dict[str, list[str]]:
    """The shipped vocabularies (backgrounds, places, textures, relation objects)."""
    return yaml.safe_load(VOCAB_FILE.read_text())


def _timm_info_dir() -> Path:
    return Path(timm.data.__file__).parent / "_info"


@cache
def _wordnet() -> tuple[dict[str, str], dict[str, str]]:
    info = _timm_info_dir()

    def table(name: str) -> dict[str, str]:
        rows = (line.split("\t", 1) for line in (info / name).read_text().splitlines() if line)
        return {k: v.strip() for k, v in rows}

    return table("imagenet_synset_to_lemma.txt"), table("imagenet_synset_to_definition.txt")


def imagenet_bank(name: str, synset_file: str) -> ConceptBank:
    """ImageNet concepts from timm's synset list ``synset_file``: lemma -> name + synonyms."""
    lemmas, definitions = _wordnet()
    wnids = (_timm_info_dir() / synset_file).read_text().split()
    concepts = []
    for wnid in wnids:
        names = [n.strip() for n in lemmas[wnid].split(",") if n.strip()]
        concepts.append(Concept(name=names[0], synonyms=tuple(names[1:]),
                                definition=definitions.get(wnid, ""), cid=wnid))
    return ConceptBank(name, concepts)


@BANKS.register("imagenet-1k")
def imagenet_1k() -> ConceptBank:
    return imagenet_bank("imagenet-1k", "imagenet_synsets.txt")


@BANKS.register("imagenet-12k")
def imagenet_12k() -> ConceptBank:
    return imagenet_bank("imagenet-12k", "imagenet12k_synsets.txt")


@BANKS.register("imagenet-21k")
def imagenet_21k() -> ConceptBank:
    return imagenet_bank("imagenet-21k", "imagenet21k_goog_synsets.txt")


@BANKS.register("places")
def places() -> ConceptBank:
    return ConceptBank("places", [Concept(name=p, cid=p) for p in vocab()["places"]])


@BANKS.register("textures")
def textures() -> ConceptBank:
    # A texture name is an adjective: the grammar writes it before a surface ("a striped wall").
    heads = ["surface", "fabric", "wall", "pattern", "close-up texture", "tile", "cloth", "panel"]
    return ConceptBank("textures", [Concept(name=t, cid=t) for t in vocab()["textures"]],
                       phrases={"heads": heads})


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where} must be a list of non-empty strings, got {value!r}")
    return [v.strip() for v in value]


def _concept_from_yaml(item: Any, where: str) -> Concept:
    if isinstance(item, str) and item.strip():
        return Concept(name=item.strip(), cid=item.strip())
    if isinstance(item, dict):
        unknown = set(item) - {"name", "synonyms", "definition", "backgrounds", "label"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: name, "
                              "synonyms, definition, backgrounds, label")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: every concept needs a non-empty 'name', got {item!r}")
        label = item.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
            raise ConfigError(f"{where}: 'label' must be an integer, got {label!r}")
        return Concept(name=name.strip(),
                       synonyms=tuple(_str_list(item.get("synonyms"), f"{where}.synonyms")),
                       definition=str(item.get("definition") or ""),
                       backgrounds=tuple(_str_list(item.get("backgrounds"),
                                                   f"{where}.backgrounds")),
                       cid=name.strip(), label=label)
    raise ConfigError(f"{where}: a concept must be a string or a mapping with 'name', "
                      f"got {item!r}")


def load_bank_file(path: str | Path) -> ConceptBank:
    """Read a user's bank from a ``.yaml``/``.yml`` or ``.txt`` file (formats: module doc)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"concept bank file {str(path)!r} does not exist; give a registered "
                          f"bank ({', '.join(BANKS.names())}) or a .yaml/.txt file")
    text = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"concept bank {str(path)!r} is not valid YAML "
                              f"({yaml_error_summary(e)})") from None
        if isinstance(data, list):
            data = {"concepts": data}
        if not isinstance(data, dict) or "concepts" not in data:
            raise ConfigError(f"concept bank {str(path)!r} must be a list of concepts or a "
                              "mapping with a 'concepts' list")
        unknown = set(data) - {"name", "concepts", "backgrounds", "relation_objects"}
        if unknown:
            raise ConfigError(f"concept bank {str(path)!r}: unknown key(s) {sorted(unknown)}; "
                              "valid keys: name, concepts, backgrounds, relation_objects")
        items = data["concepts"]
        if items is None:
            items = []
        if not isinstance(items, list):
            raise ConfigError(f"concept bank {str(path)!r}: 'concepts' must be a list")
        concepts = [_concept_from_yaml(c, f"concept bank {str(path)!r}, concept {i}")
                    for i, c in enumerate(items)]
        return ConceptBank(
            str(data.get("name") or path.stem), concepts,
            _str_list(data.get("backgrounds"), f"concept bank {str(path)!r}: 'backgrounds'"),
            _str_list(data.get("relation_objects"),
                      f"concept bank {str(path)!r}: 'relation_objects'"))
    if path.suffix == ".txt":
        concepts = []
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            names = [n.strip() for n in line.split(",") if n.strip()]
            concepts.append(Concept(name=names[0], synonyms=tuple(names[1:]), cid=names[0]))
        return ConceptBank(path.stem, concepts)
    raise ConfigError(f"concept bank file {str(path)!r}: unknown format {path.suffix!r}; "
                      "use .yaml, .yml or .txt")


def load_bank(spec: str) -> ConceptBank:
    """A registered bank by name, or a bank file by path."""
    if spec in BANKS:
        return BANKS.get(spec)()
    if spec.endswith((".yaml", ".yml", ".txt")) or "/" in spec:
        return load_bank_file(spec)
    BANKS.get(spec)  # raises: unknown bank, listing the registered ones
    raise AssertionError


class BankMixture:
    """Weighted sampling across banks, then uniform within the chosen bank (the paper's scheme:
    e.g. IN-1k 0.47, places 0.09, IN-21k 0.26, ...)."""

    def __init__(self, weights: dict[str, float]) -> None:
        if not weights:
            raise ConfigError("captions.banks is empty; name at least one concept bank, e.g. "
                              "captions.banks={fashion: 1.0}")
        bad = {k: w for k, w in weights.items() if not w > 0}
        if bad:
            raise ConfigError(f"captions.banks: weights must be > 0, got {bad}")
        self.banks = [load_bank(spec) for spec in weights]
        self.weights = list(weights.values())
        self._cum = [sum(self.weights[: i + 1]) for i in range(len(self.weights))]

    def sample(self, rng: random.Random, n: int) -> list[tuple[ConceptBank, Concept]]:
        banks = rng.choices(self.banks, cum_weights=self._cum, k=n)
        return [(b, b.concepts[int(rng.random() * len(b.concepts))]) for b in banks]
