"""SigLIP's sigmoid loss (synrep.losses.siglip) against the paper's formula written out, its
reductions, and 2 gloo processes against one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synrep.losses import SigLipLoss, siglip_loss
from tests._dist import run_gloo


def reference(img: torch.Tensor, txt: torch.Tensor, t, b) -> torch.Tensor:
    """Zhai et al. 2023, algorithm 1, pair by pair: -1/|B| sum_ij log sigmoid(z_ij (t x.y + b))."""
    x, y = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    n = x.shape[0]
    total = 0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (t * (x[i] @ y[j]) + b)))
    return total / n


def feats(seed: int, n: int = 6, d: int = 5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


def test_module_matches_reference_value_and_grads():
    img, txt = feats(0)
    a, b = img.float().requires_grad_(True), txt.float().requires_grad_(True)
    ls, bias = torch.tensor(math.log(10.0), requires_grad=True), torch.tensor(-3.0,
                                                                            requires_grad=True)
    loss = SigLipLoss()(a, b, ls, bias)
    ra, rb = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    rls = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    rbias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    ref = reference(ra, rb, rls.exp(), rbias)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad.double(), ra.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), rb.grad, rtol=1e-4, atol=1e-6)
    assert ls.grad.item() == pytest.approx(rls.grad.item(), rel=1e-4)
    assert bias.grad.item() == pytest.approx(rbias.grad.item(), rel=1e-4)


def test_reductions_and_exact_value():
    img, txt = feats(1)
    pairs = siglip_loss(img, txt, 7.0, -2.0, reduction="none")
    assert pairs.shape == (6, 6) and pairs.dtype == torch.float64  # float64 stays float64
    x, y = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    for i, j in ((0, 0), (2, 5), (4, 1)):
        z = 1.0 if i == j else -1.0
        want = math.log1p(math.exp(-z * (7.0 * float(x[i] @ y[j]) - 2.0)))
        assert float(pairs[i, j]) == pytest.approx(want, rel=1e-12)
    assert float(siglip_loss(img, txt, 7.0, -2.0, reduction="sum")) == pytest.approx(
        float(pairs.sum()), rel=1e-12)
    assert float(siglip_loss(img, txt, 7.0, -2.0)) == pytest.approx(
        float(reference(img, txt, 7.0, -2.0)), rel=1e-12)
    # Two orthogonal matching pairs at t = 1, b = 0: positives log(1 + e^-1), negatives log 2.
    e = torch.eye(2)
    want = (2 * math.log1p(math.exp(-1.0)) + 2 * math.log(2.0)) / 2
    assert siglip_loss(e, e, 1.0, 0.0).item() == pytest.approx(want, rel=1e-6)


def test_scale_is_clamped_and_logits_stay_float32_under_autocast():
    img, txt = feats(2, dtype=torch.float32)
    bias = torch.tensor(-5.0)
    clamped = SigLipLoss(max_logit_scale=20.0)(img, txt, torch.tensor(math.log(50.0)), bias)
    assert clamped.item() == pytest.approx(siglip_loss(img, txt, 20.0, -5.0).item(), rel=1e-6)
    plain = SigLipLoss()(img, txt, torch.tensor(math.log(10.0)), bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = SigLipLoss()(img, txt, torch.tensor(math.log(10.0)), bias)
    assert mixed.dtype == torch.float32 and mixed.item() == plain.item()


def test_rejects_bad_arguments():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="max_logit_scale"):
            SigLipLoss(bad)
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        SigLipLoss()(torch.randn(4, 3), torch.randn(5, 3), torch.tensor(1.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="reduction"):
        siglip_loss(torch.randn(4, 3), torch.randn(4, 3), 1.0, 0.0, reduction="max")


def _dist_worker(rank, world, img_all, txt_all, out_dir):
    n = img_all.shape[0] // world
    img = img_all[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    txt = txt_all[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    ls = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-4.0, requires_grad=True)
    loss = SigLipLoss()(img, txt, ls, bias)
    loss.backward()
    pairs = siglip_loss(img.detach(), txt.detach(), 10.0, -4.0, reduction="none")
    local = siglip_loss(img.detach(), txt.detach(), 10.0, -4.0, gather=False)
    np.save(f"{out_dir}/rank{rank}.npy", np.array(
        [loss.item(), img.grad.numpy(), txt.grad.numpy(), ls.grad.item(), bias.grad.item(),
         pairs.numpy(), local.item()], dtype=object), allow_pickle=True)


def test_two_gloo_processes_match_one(tmp_path):
    world, n = 2, 4
    img_all, txt_all = feats(3, n=world * n, d=6, dtype=torch.float32)
    run_gloo(_dist_worker, world, img_all, txt_all, str(tmp_path))
    ranks = [np.load(tmp_path / f"rank{r}.npy", allow_pickle=True) for r in range(world)]

    img, txt = img_all.clone().requires_grad_(True), txt_all.clone().requires_grad_(True)
    ls = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-4.0, requires_grad=True)
    loss = SigLipLoss()(img, txt, ls, bias)
    loss.backward()
    # DDP averages over ranks: the mean of the rank losses, the feature gradients / world and
    # the mean of the scale and bias gradients equal one process on the whole batch.
    assert np.mean([r[0] for r in ranks]) == pytest.approx(loss.item(), rel=1e-6)
    np.testing.assert_allclose(np.concatenate([r[1] for r in ranks]) / world, img.grad.numpy(),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.concatenate([r[2] for r in ranks]) / world, txt.grad.numpy(),
                               rtol=1e-5, atol=1e-7)
    assert np.mean([r[3] for r in ranks]) == pytest.approx(ls.grad.item(), rel=1e-5)
    assert np.mean([r[4] for r in ranks]) == pytest.approx(bias.grad.item(), rel=1e-5)
    # reduction="none": this rank's rows of the global pair matrix; gather=False: the rank alone.
    full = siglip_loss(img_all, txt_all, 10.0, -4.0, reduction="none").numpy()
    for r in range(world):
        np.testing.assert_allclose(ranks[r][5], full[r * n:(r + 1) * n], rtol=1e-5, atol=1e-7)
        alone = siglip_loss(img_all[r * n:(r + 1) * n], txt_all[r * n:(r + 1) * n], 10.0, -4.0)
        assert ranks[r][6] == pytest.approx(alone.item(), rel=1e-6)
