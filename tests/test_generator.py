"""The mini text-to-image model's parts: vocabulary, attribute measures, training, evaluation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from synrep.captions.backends import Query, Sampling
from synrep.captions.grammar import GrammarBackend, paraphrase
from synrep.concepts import RELATIONS, load_bank
from synrep.concepts.fashion import (
    ATTRIBUTES,
    attribute_levels,
    attribute_thresholds,
    measure_attributes,
)
from synrep.images.evaluate import frechet_distance
from synrep.images.mini import build_tokenizer

from .conftest import needs_fashion


def test_tokenizer_knows_every_word_the_fashion_grammar_writes():
    tok = build_tokenizer()
    bank = load_bank("fashion")
    rng = random.Random(0)
    queries = []
    for _ in range(3000):
        t = rng.choice(["c", "c_bg", "c_rel"])
        queries.append(Query(t, bank=bank, concept=rng.choice(bank.concepts),
                             background=rng.choice(bank.backgrounds),
                             relation=rng.choice(RELATIONS),
                             obj=rng.choice(bank.relation_objects)))
    texts = GrammarBackend().generate(queries, Sampling(0.8, 0.9, 100), 0)
    texts += [paraphrase(t, rng, bank.phrases["leads"]) for t in texts[:1000]]
    ids = tok(texts).input_ids
    assert not any(tok.unk_token_id in row for row in ids)
    assert tok("a zebra coat").input_ids.count(tok.unk_token_id) == 1


def _garment(tone: float, size: int, pattern: bool = False) -> torch.Tensor:
    x = torch.zeros(28, 28)
    o = (28 - size) // 2
    x[o:o + size, o:o + size] = tone
    if pattern:
        x[o:o + size, o:o + size:2] *= 0.5
    return x


def test_attribute_measures_move_the_right_way():
    m = measure_attributes(torch.stack([
        _garment(0.3, 14), _garment(0.9, 14),      # tone: dark < light
        _garment(0.6, 10), _garment(0.6, 24),      # fill: slim < wide
        _garment(0.6, 16), _garment(0.6, 16, True)]))  # texture: plain < patterned
    assert m[0, 0] < m[1, 0] and m[2, 1] < m[3, 1] and m[4, 2] < m[5, 2]
    assert torch.allclose(m[2, 1], torch.tensor(100 / 784))  # the exact covered share
    assert abs(m[1, 0] - 0.9) < 1e-6 and m[4, 2] < m[5, 2] / 3
    u8 = (torch.stack([_garment(0.5, 12)]) * 255).round().to(torch.uint8)
    assert torch.allclose(measure_attributes(u8), measure_attributes(u8.float() / 255))


def test_attribute_levels_are_per_class_tertiles():
    g = torch.Generator().manual_seed(0)
    measures = torch.rand(3000, 3, generator=g) + torch.arange(3000)[:, None] % 2
    labels = torch.arange(3000) % 2
    levels = attribute_levels(measures, labels, attribute_thresholds(measures, labels))
    for c in range(2):
        for a in range(len(ATTRIBUTES)):
            counts = torch.bincount(levels[labels == c, a], minlength=3)
            assert counts.min() >= 495 and counts.max() <= 505


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (20000, 3))
    b = rng.normal(1.0, 2.0, (20000, 3))
    # diagonal Gaussians: |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))
    exact = 3 * 1.0 + 3 * (1 + 4 - 2 * 2)
    assert abs(frechet_distance(a, b) - exact) < 0.15
    assert abs(frechet_distance(a, a)) < 1e-6


@needs_fashion
@pytest.mark.slow
def test_train_generator_and_render_through_the_images_stage(tmp_path):
    from synrep.cli import main
    from synrep.config import load_config
    from synrep.images.render import Renderer

    args = ["configs/generator_fashion.yaml", f"run.dir={tmp_path / 'g'}",
            "generator.vae_steps=3", "generator.steps=4", "generator.ckpt_every=2",
            "generator.train_limit=256", "generator.batch_size=16",
            "generator.vae_batch_size=16"]
    assert main(["train-generator", *args]) == 0
    pipe = tmp_path / "g" / "generator" / "pipeline"
    unet = (pipe / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    # finished state: a rerun exports the same weights without training again
    (pipe / "model_index.json").unlink()
    assert main(["train-generator", *args]) == 0
    assert (pipe / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet
    cfg = load_config(None, [f"images.pipeline={pipe}", "images.steps=2"])
    r = Renderer(cfg.images)
    out = r.render(["a dark plain coat", "a light bag"], [0, 1], [0, 0], seed=0)
    assert out.images.shape == (2, 28, 28) and out.images.dtype == np.uint8  # centre crop
    assert r.provenance["crop"] == 28 and r.steps == 2


@needs_fashion
@pytest.mark.slow
def test_eval_generator_on_a_tiny_pipeline(tmp_path):
    import json

    from synrep.config import load_config
    from synrep.images.evaluate import evaluate_generator
    from synrep.testing import build_tiny_sd

    sd = build_tiny_sd(tmp_path / "sd")
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", f"images.pipeline={sd}",
                             "images.steps=2", "images.images_per_caption=2"])
    res = evaluate_generator(cfg, captions_per_class=2, pairs_per_class=1)
    assert res["judge_test_accuracy"] > 88.0  # a real judge, trained on the real labels
    assert 0.0 <= res["class_consistency"] <= 100.0
    assert set(res["attribute_adherence_per_attribute"]) == set(ATTRIBUTES)
    assert res["diversity_real"] > 0 and np.isfinite(res["frechet_distance"])
    assert res["images_rendered"] == 10 * 2 * 2 + 3 * 10 * 1 * 2 * 2
    saved = json.loads((tmp_path / "run" / "generator_eval" / "results.json").read_text())
    assert saved["class_consistency"] == res["class_consistency"]
    assert (tmp_path / "run" / "generator_eval" / "samples.png").exists()
