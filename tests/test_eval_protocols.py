"""Few-shot, the pooling axis of the SGD grid, zero-shot and the scaling fit, against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synrep.config import ModelConfig
from synrep.eval.fewshot import fewshot_indices, fewshot_probe
from synrep.eval.linear import _train_linear_heads, fit_logreg, pool_columns, sgd_probe_grid
from synrep.eval.zeroshot import class_embeddings, zero_shot_classify
from synrep.models import build_encoder
from synrep.scaling import fit_power_law

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


def blobs(n: int, d: int, k: int, sep: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * sep
    y = torch.arange(n) % k
    return centers[y] + torch.randn(n, d, generator=g), y


# ----------------------------------------------------------------------------- few-shot


def test_fewshot_indices_are_seeded_and_class_balanced() -> None:
    labels = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0, 2, 1, 0] * 5)
    a = fewshot_indices(labels, 3, seed=4)
    assert torch.equal(a, fewshot_indices(labels, 3, seed=4))
    assert torch.equal(torch.bincount(labels[a]), torch.tensor([3, 3, 3]))
    assert len(torch.unique(a)) == 9  # without replacement
    # another seed, another draw
    assert not all(torch.equal(a, fewshot_indices(labels, 3, seed=s)) for s in range(5, 10))
    with pytest.raises(ValueError, match="class 0 has 20 training samples, fewer than shots=21"):
        fewshot_indices(labels, 21, seed=0)
    with pytest.raises(ValueError, match="shots must be >= 1"):
        fewshot_indices(labels, 0, seed=0)


def test_fewshot_probe_equals_per_draw_logreg_reference() -> None:
    x, y = blobs(600, 8, 4, sep=1.5, seed=0)
    xt, yt = blobs(200, 8, 4, sep=1.5, seed=0)  # same centres: same seed draws them first
    out = fewshot_probe(x, y, xt, yt, shots=[1, 5], seeds=[0, 1, 2], c=0.5)
    mean, std = x.mean(0), x.std(0, correction=0)
    for n in (1, 5):
        runs = []
        for seed in (0, 1, 2):
            idx = fewshot_indices(y, n, seed)
            w, b = fit_logreg((x[idx] - mean) / std, y[idx], 0.5, num_classes=4)
            pred = (((xt - mean) / std) @ w + b).argmax(1)
            runs.append(100.0 * float((pred == yt).float().mean()))
        r = out[str(n)]
        assert r["runs"] == pytest.approx(runs, abs=1e-9)
        assert r["mean"] == pytest.approx(np.mean(runs))
        assert r["std"] == pytest.approx(np.std(runs, ddof=1))
        assert (r["min"], r["max"]) == (min(runs), max(runs))
    assert out["5"]["mean"] > out["1"]["mean"] > 25.0  # more labels help; both beat chance


def test_fewshot_probe_validates_arguments() -> None:
    x, y = blobs(40, 3, 2, 1.0, 0)
    with pytest.raises(ValueError, match="shots must be distinct"):
        fewshot_probe(x, y, x, y, shots=[1, 1])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        fewshot_probe(x, y, x, y, seeds=[])
    with pytest.raises(ValueError, match="c must be"):
        fewshot_probe(x, y, x, y, c=0.0)


# ----------------------------------------------------------------------------- SGD pooling grid


def test_pool_columns_match_probe_features_layout() -> None:
    enc = build_encoder(ModelConfig()).eval()
    x = torch.rand(3, 1, 28, 28)
    full = enc.probe_features(x, "cls+avg", 4)
    cols = pool_columns("cls+avg", 4, enc.embed_dim)
    assert list(cols) == ["cls", "avg", "cls+avg", "cls/4", "avg/4", "cls+avg/4"]
    for name, n in (("cls", 1), ("avg", 1), ("cls+avg", 1), ("cls", 4), ("avg", 4)):
        key = name if n == 1 else f"{name}/{n}"
        torch.testing.assert_close(full[:, cols[key]], enc.probe_features(x, name, n))
    assert list(pool_columns("avg", 1, 5)) == ["avg"]
    torch.testing.assert_close(pool_columns("avg", 2, 5)["avg"], torch.arange(5, 10))
    with pytest.raises(ValueError, match="pool must be one of"):
        pool_columns("max", 1, 4)


def test_masked_heads_equal_heads_on_column_subsets() -> None:
    x, y = blobs(300, 10, 3, sep=0.7, seed=3)
    masks = torch.zeros(3, 10, dtype=torch.bool)
    masks[0, :4] = True
    masks[1, 4:] = True
    masks[2] = True
    lrs = [0.05, 0.05, 0.2]
    w, b = _train_linear_heads(x, y, lrs, 3, epochs=3, batch_size=50, weight_decay=1e-3,
                               generator=torch.Generator().manual_seed(1), feature_masks=masks)
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(3, 10, 3, generator=g) * 0.01
    perms = [torch.randperm(300, generator=g) for _ in range(3)]
    total = 3 * 6
    for h in range(3):
        cols = masks[h]
        head = torch.nn.Linear(int(cols.sum()), 3)
        with torch.no_grad():
            head.weight.copy_(w0[h][cols].T)
            head.bias.zero_()
        opt = torch.optim.SGD([{"params": [head.weight], "weight_decay": 1e-3},
                               {"params": [head.bias]}], lr=lrs[h], momentum=0.9)
        step = 0
        for perm in perms:
            for s in range(0, 300, 50):
                for group in opt.param_groups:
                    group["lr"] = lrs[h] * 0.5 * (1 + math.cos(math.pi * step / total))
                idx = perm[s : s + 50]
                opt.zero_grad()
                F.cross_entropy(head(x[idx][:, cols]), y[idx]).backward()
                opt.step()
                step += 1
        torch.testing.assert_close(w[h][cols], head.weight.detach().T, rtol=1e-4, atol=1e-5)
        assert bool((w[h][~cols] == 0).all())  # never touched outside its pooling
        torch.testing.assert_close(b[h], head.bias.detach(), rtol=1e-4, atol=1e-5)


def test_sgd_grid_picks_the_informative_pooling() -> None:
    # Columns 0-7 carry the class, 8-15 are noise: the "good" pooling must win on validation.
    g = torch.Generator().manual_seed(0)
    y = torch.arange(1200) % 4
    x = torch.randn(1200, 16, generator=g)
    x[:, :4] += 3.0 * F.one_hot(y, 4)
    pools = {"noise": torch.arange(8, 16), "good": torch.arange(0, 8)}
    r = sgd_probe_grid(x[:900], y[:900], x[900:], y[900:], lrs=[0.01, 0.1], pools=pools,
                       epochs=5, batch_size=100)
    assert r["best_pool"] == "good" and r["top1"] > 95.0
    assert set(r["val_top1"]) == {"noise@0.01", "noise@0.1", "good@0.01", "good@0.1"}
    assert max(r["test_top1"]["noise@0.01"], r["test_top1"]["noise@0.1"]) < 40.0
    with pytest.raises(ValueError, match="pool 'bad': columns must be indices in"):
        sgd_probe_grid(x, y, x, y, lrs=[0.1], pools={"bad": torch.tensor([16])})


# ----------------------------------------------------------------------------- zero-shot


def test_zero_shot_matches_numpy_reference_with_prompt_ensembling() -> None:
    classnames = ["shirt", "bag", "sandal"]
    templates = ["a photo of a {}.", "a {} on a table."]
    g = torch.Generator().manual_seed(0)
    table = {f"{t.format(c)}": torch.randn(6, generator=g) * (1 + i)
             for c in classnames for i, t in enumerate(templates)}

    def encode_text(texts: list[str]) -> torch.Tensor:
        return torch.stack([table[t] for t in texts])

    cls = class_embeddings(encode_text, classnames, templates)
    ref = []
    for c in classnames:
        e = np.stack([table[t.format(c)].numpy() for t in templates])
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        m = e.mean(0)
        ref.append(m / np.linalg.norm(m))
    np.testing.assert_allclose(cls.numpy(), np.stack(ref), rtol=1e-5, atol=1e-6)

    imgs = torch.randn(50, 6, generator=g)
    labels = torch.randint(0, 3, (50,), generator=g)
    out = zero_shot_classify(imgs, cls, labels)
    sims = (imgs.numpy() / np.linalg.norm(imgs.numpy(), axis=1, keepdims=True)) @ np.stack(ref).T
    assert torch.equal(out["predictions"], torch.from_numpy(sims.argmax(1)))
    assert out["top1"] == pytest.approx(100.0 * float((sims.argmax(1) == labels.numpy()).mean()))
    # images that are their class's embedding plus small noise are all classified right
    near = cls[labels] + 0.01 * torch.randn(50, 6, generator=g)
    assert zero_shot_classify(near, cls, labels)["top1"] == 100.0
    with pytest.raises(ValueError, match="must share an embedding space"):
        zero_shot_classify(imgs[:, :5], cls, labels)
    with pytest.raises(ValueError, match="exactly one"):
        class_embeddings(encode_text, classnames, ["no slot"])


# ----------------------------------------------------------------------------- scaling fit


@pytest.mark.parametrize("b", [0.15, 0.35, 0.8])
def test_power_law_fit_recovers_the_exponent(b: float) -> None:
    n = np.array([2_500, 5_000, 10_000, 20_000, 40_000], dtype=float)
    rng = np.random.default_rng(0)
    err = 80.0 * n**-b * np.exp(rng.normal(0, 0.01, len(n)))  # 1 % multiplicative noise
    fit = fit_power_law(n, err)
    assert abs(fit["b"] - b) / b < 0.05
    assert fit["r2"] > 0.99 and fit["c"] == 0.0
    exact = fit_power_law(n, 80.0 * n**-b)
    assert exact["b"] == pytest.approx(b, rel=1e-9) and exact["a"] == pytest.approx(80.0)


def test_power_law_with_offset_recovers_exponent_and_floor() -> None:
    n = np.geomspace(1_000, 64_000, 7)
    err = 300.0 * n**-0.5 + 6.0
    fit = fit_power_law(n, err, "power+offset")
    assert fit["b"] == pytest.approx(0.5, rel=0.05)
    assert fit["c"] == pytest.approx(6.0, rel=0.05)
    # a plain power law through the same points underestimates the exponent: the floor matters
    assert fit_power_law(n, err)["b"] < 0.45


def test_power_law_fit_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 distinct sizes"):
        fit_power_law([10, 10], [5.0, 4.0])
    with pytest.raises(ValueError, match="positive finite"):
        fit_power_law([10, 20], [5.0, 0.0])
    with pytest.raises(ValueError, match="form must be one of"):
        fit_power_law([10, 20], [5.0, 4.0], "exp")
