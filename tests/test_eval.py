"""Frozen-feature evaluation (synrep.eval) against independent references.

L-BFGS logistic regression against scikit-learn (coefficients and accuracy), kNN against a
per-sample numpy loop, the batched SGD heads against independent ``nn.Linear`` + SGD heads.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synrep.errors import DataError
from synrep.eval import (
    extract_features,
    fit_logreg,
    knn_classify,
    lbfgs_probe,
    load_features,
    save_features,
    sgd_probe_grid,
    stratified_split,
)
from synrep.eval.linear import _train_linear_heads

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


def gaussian_classes(
    n: int, d: int, k: int, sep: float, seed: int, scale_features: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian classes; features on very different scales and off-centre."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * sep
    y = torch.randint(0, k, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    if scale_features:
        x = x * torch.linspace(0.1, 10.0, d) + 5.0
    return x, y


# ----------------------------------------------------------------------------- L-BFGS probe


def sklearn_logreg() -> tuple[type, type]:
    """scikit-learn's LogisticRegression and StandardScaler, the reference (a test-only extra)."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    return linear_model.LogisticRegression, preprocessing.StandardScaler


@pytest.fixture(scope="module")
def logreg_data() -> tuple[torch.Tensor, ...]:
    # 2000 x 32, 5 classes, ~78 % test accuracy: neither trivial nor hopeless.
    x, y = gaussian_classes(3000, 32, 5, sep=0.35, seed=1)
    return x[:2000], y[:2000], x[2000:], y[2000:]


@pytest.mark.parametrize("c", [0.003, 0.1, 10.0])
def test_fit_logreg_matches_sklearn_coefficients(logreg_data, c: float) -> None:
    LogisticRegression, StandardScaler = sklearn_logreg()  # noqa: N806
    xtr, ytr, _, _ = logreg_data
    xs = StandardScaler().fit_transform(xtr.double().numpy())
    ref = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(xs, ytr.numpy())
    ref_w, ref_b = ref.coef_.T, ref.intercept_  # (D, K), (K,)

    w, b = fit_logreg(torch.from_numpy(xs), ytr, c, tol=1e-9, max_iter=2000)
    assert w.shape == (32, 5) and b.shape == (5,)
    assert np.abs(w.numpy() - ref_w).max() <= 1e-4 * np.abs(ref_w).max()
    # Intercepts are only defined up to a shift; both parametrisations sum to zero.
    assert np.allclose(b.numpy() - b.numpy().mean(), ref_b - ref_b.mean(), atol=1e-4)

    # float32 (what lbfgs_probe runs) still lands on the same solution.
    w32, _ = fit_logreg(torch.from_numpy(xs).float(), ytr, c, tol=1e-6, max_iter=1000)
    assert np.abs(w32.double().numpy() - ref_w).max() <= 1e-2 * np.abs(ref_w).max()


def test_whitened_fit_reaches_sklearns_optimum_where_the_plain_fit_stalls() -> None:
    """Correlated features (covariance eigenvalues over 5 orders of magnitude, like a ViT's CLS
    and mean tokens of several blocks): whitened L-BFGS lands on scikit-learn's coefficients in
    60 iterations; the plain fit, same budget, is still far from them."""
    from synrep.eval.linear import Whitening, lbfgs_fit

    LogisticRegression, StandardScaler = sklearn_logreg()  # noqa: N806
    g = torch.Generator().manual_seed(0)
    x, y = gaussian_classes(3000, 48, 4, sep=0.4, seed=2, scale_features=False)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    mix = torch.logspace(0, -2.5, 48)[:, None] * q  # scale, then rotate: singular values 1 .. 3e-3
    xs = StandardScaler().fit_transform((x @ mix).double().numpy())
    ref = LogisticRegression(C=10.0, tol=1e-10, max_iter=100_000).fit(xs, y.numpy())
    ref_w = ref.coef_.T
    xt = torch.from_numpy(xs)
    white = Whitening(xt)
    assert float(white.inv_lam.max() / white.inv_lam.min()) > 1e4  # ill-conditioned indeed
    w, _ = lbfgs_fit(xt, y, 10.0, 4, None, 60, 1e-12, white)
    plain, _ = lbfgs_fit(xt, y, 10.0, 4, None, 60, 1e-12)
    scale = np.abs(ref_w).max()
    assert np.abs(w.numpy() - ref_w).max() <= 1e-3 * scale
    assert np.abs(plain.numpy() - ref_w).max() > 1e-1 * scale


def test_lbfgs_probe_single_c_matches_sklearn_accuracy(logreg_data) -> None:
    LogisticRegression, StandardScaler = sklearn_logreg()  # noqa: N806
    xtr, ytr, xte, yte = logreg_data
    scaler = StandardScaler().fit(xtr.numpy())
    ref = LogisticRegression(C=0.1).fit(scaler.transform(xtr.numpy()), ytr.numpy())
    ref_top1 = 100.0 * ref.score(scaler.transform(xte.numpy()), yte.numpy())
    assert 60 < ref_top1 < 95  # the problem is non-trivial

    r = lbfgs_probe(xtr, ytr, xte, yte, cs=[0.1])
    assert r["best_c"] == 0.1 and list(r["val_top1"]) == [0.1]
    assert abs(r["top1"] - ref_top1) <= 0.5


def test_lbfgs_probe_sweep_matches_sklearn_on_the_same_split(logreg_data) -> None:
    LogisticRegression, StandardScaler = sklearn_logreg()  # noqa: N806
    xtr, ytr, xte, yte = logreg_data
    cs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    r = lbfgs_probe(xtr, ytr, xte, yte, cs=cs[::-1], val_fraction=0.25, seed=3, tol=1e-6)
    assert sorted(r["val_top1"]) == cs

    fit, val = stratified_split(ytr, 0.25, seed=3)
    scaler = StandardScaler().fit(xtr[fit].numpy())
    xf, xv = scaler.transform(xtr[fit].numpy()), scaler.transform(xtr[val].numpy())
    ref_val = {
        c: 100.0
        * LogisticRegression(C=c, tol=1e-8, max_iter=5000)
        .fit(xf, ytr[fit].numpy())
        .score(xv, ytr[val].numpy())
        for c in cs
    }
    for c in cs:
        assert abs(r["val_top1"][c] - ref_val[c]) <= 0.5, (c, r["val_top1"][c], ref_val[c])
    assert ref_val[1e-4] < max(ref_val.values()) - 2  # the sweep really matters here
    assert r["val_top1"][r["best_c"]] == max(r["val_top1"].values())


def test_lbfgs_probe_validates_arguments(logreg_data) -> None:
    xtr, ytr, xte, yte = logreg_data
    with pytest.raises(ValueError, match="cs is empty"):
        lbfgs_probe(xtr, ytr, xte, yte, cs=[])
    with pytest.raises(ValueError, match="positive"):
        lbfgs_probe(xtr, ytr, xte, yte, cs=[1.0, -1.0])
    with pytest.raises(ValueError, match="duplicates"):
        lbfgs_probe(xtr, ytr, xte, yte, cs=[1.0, 1.0])
    with pytest.raises(ValueError, match="train_x has 2000 rows but train_y has 1999"):
        lbfgs_probe(xtr, ytr[:-1], xte, yte, cs=[1.0])
    with pytest.raises(ValueError, match="features"):
        lbfgs_probe(xtr, ytr, xte[:, :5], yte, cs=[1.0])
    with pytest.raises(ValueError, match="val_fraction"):
        lbfgs_probe(xtr, ytr, xte, yte, cs=[1.0], val_fraction=1.0)
    with pytest.raises(ValueError, match="c must be"):
        fit_logreg(xtr, ytr, 0.0)
    bad = xtr.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="train_x contains NaN"):
        lbfgs_probe(bad, ytr, xte, yte, cs=[1.0])


# ----------------------------------------------------------------------------- split


def test_stratified_split_is_seeded_balanced_and_a_partition() -> None:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate([100, 40, 7, 1])])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    fit, val = stratified_split(y, 0.1, seed=5)
    assert torch.equal(torch.cat([fit, val]).sort().values, torch.arange(len(y)))
    # round(0.1 * n_c) per class; a singleton class stays in fit.
    assert torch.bincount(y[val], minlength=4).tolist() == [10, 4, 1, 0]
    assert torch.bincount(y[fit], minlength=4).tolist() == [90, 36, 6, 1]

    fit2, val2 = stratified_split(y, 0.1, seed=5)
    assert torch.equal(fit, fit2) and torch.equal(val, val2)
    _, val3 = stratified_split(y, 0.1, seed=6)
    assert not torch.equal(val, val3)

    with pytest.raises(ValueError, match="empty validation"):
        stratified_split(torch.tensor([0, 1, 2]), 0.1)
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(y, 0.0)


# ----------------------------------------------------------------------------- kNN


def knn_reference(train_x, train_y, test_x, k, temperature, num_classes) -> np.ndarray:
    """DINO's weighted kNN, one test sample at a time, in float64 numpy."""
    tr = train_x.double().numpy()
    tr = tr / np.linalg.norm(tr, axis=1, keepdims=True)
    preds = []
    for q in test_x.double().numpy():
        sim = tr @ (q / np.linalg.norm(q))
        nn_idx = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in nn_idx:
            votes[train_y[j]] += math.exp(sim[j] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (5, 0.07), (20, 0.07), (20, 0.5)])
def test_knn_matches_bruteforce_reference(k: int, temperature: float) -> None:
    x, y = gaussian_classes(500, 16, 6, sep=0.6, seed=2, scale_features=False)
    xtr, ytr, xte, yte = x[:400], y[:400], x[400:], y[400:]
    r = knn_classify(xtr, ytr, xte, yte, k=k, temperature=temperature, chunk=13)
    ref = knn_reference(xtr, ytr, xte, k, temperature, 6)
    assert r["predictions"].dtype == torch.int64
    assert r["predictions"].tolist() == ref.tolist()
    assert r["top1"] == pytest.approx(100.0 * float((torch.from_numpy(ref) == yte).float().mean()))


def test_knn_k1_on_the_bank_itself_is_perfect() -> None:
    x, y = gaussian_classes(200, 8, 4, sep=0.5, seed=3, scale_features=False)
    r = knn_classify(x, y, x, y, k=1)
    assert r["top1"] == 100.0 and torch.equal(r["predictions"], y)


def test_knn_weights_decide_against_the_majority() -> None:
    # The query is almost on class 0's single neighbour; two class-1 neighbours are far.
    train_x = torch.tensor([[1.0, 0.01], [0.0, 1.0], [0.05, 1.0]])
    train_y = torch.tensor([0, 1, 1])
    test_x, test_y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    sharp = knn_classify(train_x, train_y, test_x, test_y, k=3, temperature=0.07)
    flat = knn_classify(train_x, train_y, test_x, test_y, k=3, temperature=1000.0)
    assert sharp["predictions"].tolist() == [0] and sharp["top1"] == 100.0
    assert flat["predictions"].tolist() == [1] and flat["top1"] == 0.0  # ~ a majority vote


def test_knn_tiny_temperature_does_not_overflow() -> None:
    # exp(1 / 1e-4) overflows; the vote must then equal the nearest neighbour's label.
    x, y = gaussian_classes(300, 8, 5, sep=0.3, seed=4, scale_features=False)
    r = knn_classify(x[:200], y[:200], x[200:], y[200:], k=20, temperature=1e-4)
    nn1 = knn_classify(x[:200], y[:200], x[200:], y[200:], k=1)
    assert torch.equal(r["predictions"], nn1["predictions"])


def test_knn_validates_arguments() -> None:
    x, y = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ValueError, match="k must be"):
        knn_classify(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="k must be"):
        knn_classify(x, y, x, y, k=11)
    with pytest.raises(ValueError, match="train_y"):
        knn_classify(x, y[:9], x, y)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(x, y, x, y, k=3, temperature=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(x, y, x, y, k=3, num_classes=1)


# ----------------------------------------------------------------------------- SGD heads


def test_batched_heads_equal_independent_torch_sgd_heads() -> None:
    x, y = gaussian_classes(300, 12, 3, sep=0.5, seed=5, scale_features=False)
    lrs, epochs, bs, wd = [0.01, 0.3, 2.0], 3, 64, 1e-3
    w, b = _train_linear_heads(
        x,
        y,
        lrs,
        3,
        epochs=epochs,
        batch_size=bs,
        weight_decay=wd,
        generator=torch.Generator().manual_seed(7),
    )
    # Reference: the same init and batches, one nn.Linear + torch.optim.SGD per head.
    g = torch.Generator().manual_seed(7)
    w0 = torch.randn(len(lrs), 12, 3, generator=g) * 0.01
    perms = [torch.randperm(len(x), generator=g) for _ in range(epochs)]
    total = epochs * math.ceil(len(x) / bs)
    for h, lr in enumerate(lrs):
        head = torch.nn.Linear(12, 3)
        with torch.no_grad():
            head.weight.copy_(w0[h].T)
            head.bias.zero_()
        opt = torch.optim.SGD(
            [{"params": [head.weight], "weight_decay": wd}, {"params": [head.bias]}],
            lr=lr,
            momentum=0.9,
        )
        step = 0
        for perm in perms:
            for s in range(0, len(x), bs):
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                idx = perm[s : s + bs]
                opt.zero_grad()
                F.cross_entropy(head(x[idx]), y[idx]).backward()
                opt.step()
                step += 1
        torch.testing.assert_close(w[h], head.weight.detach().T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[h], head.bias.detach(), rtol=1e-4, atol=1e-5)


def test_sgd_grid_separable_data_and_diverging_head() -> None:
    g = torch.Generator().manual_seed(6)
    y = torch.arange(800) % 4
    x = torch.eye(16)[:4][y] * 6.0 + 0.5 * torch.randn(800, 16, generator=g)  # separable
    lrs = [1e-3, 0.1, 1e38]  # 1e38 overflows to inf/NaN within a few steps
    r = sgd_probe_grid(x[:600], y[:600], x[600:], y[600:], lrs=lrs, epochs=5, batch_size=64)
    assert set(r["val_top1"]) == set(lrs)
    assert r["val_top1"][1e38] == 0.0  # a NaN head counts as 0 %, whatever argmax says
    assert r["best_lr"] in (1e-3, 0.1)  # both separate the classes; ties go to the earlier lr
    assert r["val_top1"][r["best_lr"]] == 100.0 and r["top1"] >= 99.5


def test_sgd_grid_validates_arguments() -> None:
    x, y = torch.randn(50, 4), torch.arange(50) % 2
    with pytest.raises(ValueError, match="lrs is empty"):
        sgd_probe_grid(x, y, x, y, lrs=[])
    with pytest.raises(ValueError, match="epochs"):
        sgd_probe_grid(x, y, x, y, lrs=[0.1], epochs=0)
    with pytest.raises(ValueError, match="test_x has 50 rows but test_y has 49"):
        sgd_probe_grid(x, y, x, y[:49], lrs=[0.1])


# ----------------------------------------------------------------------------- features


def test_extract_features_batching_and_scaling() -> None:
    images = torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8)
    proj = torch.randn(3 * 8 * 8, 5)

    def fn(batch: torch.Tensor) -> torch.Tensor:
        assert batch.dtype == torch.float32 and batch.min() >= 0.0 and batch.max() <= 1.0
        return batch.flatten(1) @ proj

    one = extract_features(fn, images, batch_size=1000)
    many = extract_features(fn, images, batch_size=4)
    assert one.shape == (37, 5) and one.dtype == torch.float32
    torch.testing.assert_close(many, one)
    torch.testing.assert_close(one, (images.float() / 255).flatten(1) @ proj)
    many += 1.0  # an ordinary tensor, not an inference tensor

    with pytest.raises(ValueError, match="uint8"):
        extract_features(fn, images.float())
    with pytest.raises(ValueError, match="fn must return"):
        extract_features(lambda b: b, images)


def test_features_npz_round_trip(tmp_path) -> None:
    feats, labels = torch.randn(11, 7, dtype=torch.float64), torch.arange(11)
    path = tmp_path / "feats.npz"
    save_features(path, feats, labels)
    assert os.listdir(tmp_path) == ["feats.npz"]  # no temporary file left behind
    f2, l2 = load_features(path)
    assert f2.dtype == torch.float32 and l2.dtype == torch.int64
    assert torch.equal(f2, feats.float()) and torch.equal(l2, labels)

    with pytest.raises(DataError, match="does not exist"):
        load_features(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="lacks"):
        load_features(tmp_path / "other.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="unreadable"):
        load_features(tmp_path / "broken.npz")
    with pytest.raises(ValueError, match="labels"):
        save_features(path, feats, labels[:3])
