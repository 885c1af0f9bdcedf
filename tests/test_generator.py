"""The mini text-to-image model's parts: vocabulary, attribute measures, training, evaluation."""

from __future__ import annotations

import random
from pathlib import Path

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
            "generator.vae_batch_size=16",
            # the config's 400 decoder fine-tuning steps at batch 128 took minutes here: 2 run
            # the same code
            "generator.decoder_steps=2", "generator.decoder_batch_size=16"]
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
def test_loader_workers_draw_the_same_batches_as_one_process(tmp_path):
    from safetensors.torch import load_file

    from synrep.cli import main

    def train(name: str, workers: int) -> dict:
        assert main(["train-generator", "configs/generator_fashion.yaml",
                     f"run.dir={tmp_path / name}", "generator.vae_steps=2", "generator.steps=3",
                     "generator.decoder_steps=0", "generator.train_limit=128",
                     "generator.batch_size=8", "generator.vae_batch_size=8",
                     f"generator.loader_workers={workers}"]) == 0
        return load_file(tmp_path / name / "generator" / "pipeline" / "unet" /
                         "diffusion_pytorch_model.safetensors")

    one, two = train("w0", 0), train("w2", 2)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@needs_fashion
@pytest.mark.slow
def test_decoder_finetune_changes_only_the_decoder(tmp_path):
    import json

    from safetensors.torch import load_file

    from synrep.cli import main

    tiny = ["generator.train_limit=128", "generator.batch_size=16", "generator.vae_batch_size=16"]
    assert main(["train-generator", "configs/generator_fashion.yaml", f"run.dir={tmp_path / 'g'}",
                 "generator.vae_steps=2", "generator.steps=2", "generator.decoder_steps=0",
                 *tiny]) == 0
    base = tmp_path / "g" / "generator" / "pipeline"

    def finetune(name: str) -> Path:
        assert main(["train-generator", "configs/generator_fashion.yaml",
                     f"run.dir={tmp_path / name}", f"generator.init={base}",
                     "generator.decoder_steps=3", "generator.decoder_batch_size=8",
                     "generator.decoder_lr=1e-2", "generator.ckpt_every=2", *tiny]) == 0
        return tmp_path / name / "generator" / "pipeline"

    ft = finetune("ft")
    vae0 = load_file(base / "vae" / "diffusion_pytorch_model.safetensors")
    vae1 = load_file(ft / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae0.keys() == vae1.keys()
    frozen = [k for k in vae0 if k.startswith(("encoder.", "quant_conv."))]
    tuned = [k for k in vae0 if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and tuned and len(frozen) + len(tuned) == len(vae0)
    assert all(torch.equal(vae0[k], vae1[k]) for k in frozen)  # latents unchanged
    assert sum(not torch.equal(vae0[k], vae1[k]) for k in tuned) > len(tuned) // 2
    for part in ("unet", "text_encoder"):  # the denoiser and text encoder are kept as they were
        f = "diffusion_pytorch_model.safetensors" if part == "unet" else "model.safetensors"
        a, b = load_file(base / part / f), load_file(ft / part / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta0 = json.loads((base / "synrep.json").read_text())
    meta1 = json.loads((ft / "synrep.json").read_text())
    assert meta1["decoder_steps"] == 3 and meta1["train_steps"] == meta0["train_steps"] == 2
    # deterministic: the same config fine-tunes the same decoder
    again = load_file(finetune("ft2") / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(vae1[k], again[k]) for k in vae1)


def test_decoder_finetune_refuses_a_folder_that_is_not_a_mini_pipeline(tmp_path, capsys):
    from synrep.cli import main

    (tmp_path / "model_index.json").write_text("{}")
    code = main(["train-generator", "configs/generator_fashion.yaml", f"run.dir={tmp_path / 'r'}",
                 f"generator.init={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "generator.init" in err and "not a mini pipeline folder" in err
    assert not (tmp_path / "r" / "generator" / "pipeline").exists()
    code = main(["train-generator", "configs/generator_fashion.yaml", f"run.dir={tmp_path / 'r'}",
                 "generator.decoder_steps=-1"])
    err = capsys.readouterr().err
    assert code == 2 and "generator.decoder_steps=-1 is out of range: must be >= 0" in err
    code = main(["train-generator", "configs/generator_fashion.yaml", f"run.dir={tmp_path / 'r'}",
                 "generator.device=tpu"])
    assert code == 2 and "generator.device must be 'auto', 'cpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        code = main(["train-generator", "configs/generator_fashion.yaml",
                     f"run.dir={tmp_path / 'r'}", "generator.device=cuda"])
        assert code == 2 and "has no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "r" / "generator" / "pipeline").exists()


def test_sharpness_is_the_mean_neighbour_pixel_difference():
    from synrep.images.evaluate import sharpness

    flat = np.full((2, 6, 6), 90, np.uint8)
    assert sharpness(flat) == 0.0
    stripes = np.zeros((1, 4, 4), np.uint8)
    stripes[:, :, 1::2] = 200  # columns alternate 0, 200: horizontal steps 200, vertical 0
    assert sharpness(stripes) == pytest.approx(100.0)
    checker = (np.indices((5, 5)).sum(0) % 2 * 255).astype(np.uint8)[None]
    assert sharpness(checker) == pytest.approx(255.0)
    rgb = np.repeat(checker[..., None], 3, axis=-1)  # RGB renders are judged in grey
    assert sharpness(rgb) == pytest.approx(255.0)


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
    assert res["sharpness_real"] > 0 and res["sharpness_ratio"] == pytest.approx(
        res["sharpness_generated"] / res["sharpness_real"])
    assert res["images_rendered"] == 10 * 2 * 2 + 3 * 10 * 1 * 2 * 2
    saved = json.loads((tmp_path / "run" / "generator_eval" / "results.json").read_text())
    assert saved["class_consistency"] == res["class_consistency"]
    assert (tmp_path / "run" / "generator_eval" / "samples.png").exists()
