"""Concept banks: ImageNet from timm's files, the fashion bank, user files, weighted sampling."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from synrep.concepts import BANKS, BankMixture, load_bank
from synrep.concepts.fashion import ATTRIBUTES, CLASS_NAMES
from synrep.errors import ConfigError


def test_imagenet_banks_come_from_timm_synsets():
    sizes = {"imagenet-1k": 1000, "imagenet-12k": 11821, "imagenet-21k": 21843}
    for name, n in sizes.items():
        bank = load_bank(name)
        assert len(bank) == n
        assert len({c.cid for c in bank.concepts}) == n
        assert all(re.fullmatch(r"n\d{8}", c.cid) for c in bank.concepts)
    tench = load_bank("imagenet-1k").concepts[0]
    assert (tench.cid, tench.name, tench.synonyms) == ("n01440764", "tench", ("Tinca tinca",))
    assert "freshwater" in tench.definition


def test_fashion_bank_is_fashion_mnist_with_attributes():
    bank = load_bank("fashion")
    assert [c.label for c in bank.concepts] == list(range(10))
    assert tuple(c.name for c in bank.concepts) == CLASS_NAMES
    assert bank.attributes == ATTRIBUTES
    # every relation object and background names no class, so captions stay single-class
    all_names = [n for c in bank.concepts for n in c.names]
    for phrase in [*bank.relation_objects, *bank.backgrounds]:
        assert not any(re.search(rf"\b{re.escape(n)}s?\b", phrase) for n in all_names), phrase
    assert len(bank.relation_objects) >= 20 and len(bank.backgrounds) >= 20


def test_fashion_attribute_words_appear_only_as_attributes():
    from synrep.captions.grammar import BG_FORMS, REL_FORMS

    bank = load_bank("fashion")
    words = {v for values in bank.attributes.values() for v in values}
    assert len(words) == sum(len(v) for v in bank.attributes.values())  # no value shared
    pools = [bank.backgrounds, bank.relation_objects, *bank.phrases.values(), BG_FORMS,
             REL_FORMS, [d for c in bank.concepts for d in c.details],
             [n for c in bank.concepts for n in c.names]]
    for phrase in (p for pool in pools for p in pool):
        assert not set(re.split(r"[\s,]+", phrase.lower())) & words, phrase


def test_registered_banks_load():
    for name in BANKS:
        bank = load_bank(name)
        assert len(bank) > 0 and bank.backgrounds and bank.relation_objects
    assert len(load_bank("textures")) == 47


def test_user_bank_files(tmp_path):
    y = tmp_path / "birds.yaml"
    y.write_text("name: birds\nbackgrounds: [a pine branch]\nconcepts:\n  - robin\n"
                 "  - {name: blue jay, synonyms: [jay], backgrounds: [a bird feeder]}\n")
    bank = load_bank(str(y))
    assert bank.name == "birds" and [c.name for c in bank.concepts] == ["robin", "blue jay"]
    assert bank.backgrounds_for(bank.concepts[0]) == ["a pine branch"]
    assert bank.backgrounds_for(bank.concepts[1]) == ("a bird feeder",)
    t = tmp_path / "tools.txt"
    t.write_text("# tools\nhammer\nscrewdriver, turnscrew  # a synonym\n\n")
    bank = load_bank(str(t))
    assert [(c.name, c.synonyms) for c in bank.concepts] == [
        ("hammer", ()), ("screwdriver", ("turnscrew",))]


@pytest.mark.parametrize("text,suffix,match", [
    ("concepts: []\n", ".yaml", "has no concepts"),
    ("# nothing here\n\n", ".txt", "has no concepts"),
    ("concepts: [robin\n  - : :\n", ".yaml", "not valid YAML"),
    ("concepts:\n  - {nam: robin}\n", ".yaml", "unknown key"),
    ("concepts:\n  - 3\n", ".yaml", "must be a string or a mapping"),
    ("concept: [robin]\n", ".yaml", "'concepts' list"),
])
def test_bad_bank_files(tmp_path, text, suffix, match):
    path = tmp_path / f"bank{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_bank(str(path))


def test_unknown_bank_and_missing_file():
    with pytest.raises(ConfigError, match="unknown concept bank 'imagenet-5k'"):
        load_bank("imagenet-5k")
    with pytest.raises(ConfigError, match="does not exist"):
        load_bank("/no/such/bank.yaml")


def test_weighted_sampling_follows_the_weights():
    mix = BankMixture({"fashion": 0.7, "textures": 0.2, "places": 0.1})
    draws = mix.sample(random.Random(0), 20000)
    freq = Counter(bank.name for bank, _ in draws)
    for name, w in [("fashion", 0.7), ("textures", 0.2), ("places", 0.1)]:
        # binomial standard deviation at n=20000 is <= 0.0033; allow 4 of them
        assert abs(freq[name] / 20000 - w) < 0.014
    # uniform within a bank
    per_class = Counter(c.name for b, c in draws if b.name == "fashion")
    assert max(per_class.values()) / min(per_class.values()) < 1.25
    with pytest.raises(ConfigError, match="must be > 0"):
        BankMixture({"fashion": 0.0})
