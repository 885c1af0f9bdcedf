"""MoE balance losses (synrep.losses.moe_balance) against hand values, and 2 gloo processes
computing the global-batch value and gradients of one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synrep.losses import ImportanceLoss, LoadLoss, importance_loss, load_loss
from tests._dist import run_gloo

P = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])


def test_importance_matches_hand_value():
    imp = [1.6, 1.1, 1.3]  # column sums of P
    mean = sum(imp) / 3
    var = sum((v - mean) ** 2 for v in imp) / 3  # population variance
    assert ImportanceLoss()(P).item() == pytest.approx(var / mean**2, rel=1e-6)
    assert torch.equal(ImportanceLoss()(P), importance_loss(P))


def test_load_matches_hand_value():
    # Top experts 0, 0, 2, 1 -> f = (1/2, 1/4, 1/4); P_e = column means.
    f = [0.5, 0.25, 0.25]
    pm = [1.6 / 4, 1.1 / 4, 1.3 / 4]
    assert LoadLoss()(P).item() == pytest.approx(3 * sum(a * b for a, b in zip(f, pm)), rel=1e-6)
    assert torch.equal(LoadLoss()(P), load_loss(P))


def test_extremes_and_gradients():
    # Balanced and uniform: importance 0, load 1. One certain expert: E - 1 and E.
    uniform = torch.full((6, 4), 0.25)
    assert ImportanceLoss()(uniform).item() == pytest.approx(0.0, abs=1e-9)
    assert LoadLoss()(uniform).item() == pytest.approx(1.0)
    one = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(5, 1)
    assert ImportanceLoss()(one).item() == pytest.approx(3.0)
    assert LoadLoss()(one).item() == pytest.approx(4.0)
    # d load / d p_ie = E f_e / N: the top-1 shares carry no gradient.
    p = P.clone().requires_grad_(True)
    LoadLoss()(p).backward()
    f = torch.tensor([0.5, 0.25, 0.25])
    torch.testing.assert_close(p.grad, (3 * f / 4).expand(4, -1))


def test_rejects_bad_arguments():
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            ImportanceLoss(eps)
    for bad in (torch.rand(4), torch.rand(0, 3), torch.rand(4, 1)):
        with pytest.raises(ValueError, match="probs"):
            ImportanceLoss()(bad)
        with pytest.raises(ValueError, match="probs"):
            LoadLoss()(bad)


def _dist_worker(rank, world, logits_all, out_dir):
    n = logits_all.shape[0] // world
    logits = logits_all[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    probs = logits.softmax(dim=1)
    imp, load = ImportanceLoss()(probs), LoadLoss()(probs)
    (imp + 0.5 * load).backward()
    np.save(f"{out_dir}/loss{rank}.npy", np.array([imp.item(), load.item()]))
    np.save(f"{out_dir}/grad{rank}.npy", logits.grad.numpy())


def test_two_gloo_processes_match_one(tmp_path):
    world, n = 2, 6
    logits_all = torch.randn(world * n, 4, generator=torch.Generator().manual_seed(0)) * 2
    run_gloo(_dist_worker, world, logits_all, str(tmp_path))

    logits = logits_all.clone().requires_grad_(True)
    probs = logits.softmax(dim=1)
    imp, load = ImportanceLoss()(probs), LoadLoss()(probs)
    (imp + 0.5 * load).backward()
    for r in range(world):  # every rank computes the global value
        got = np.load(tmp_path / f"loss{r}.npy")
        assert got == pytest.approx([imp.item(), load.item()], rel=1e-6)
    grads = np.concatenate([np.load(tmp_path / f"grad{r}.npy") for r in range(world)])
    # DDP averages gradients over ranks: grads / world equal one process on the whole batch.
    np.testing.assert_allclose(grads / world, logits.grad.numpy(), rtol=1e-5, atol=1e-8)
    # The balance terms are not means of per-rank terms: each half alone gives other values.
    halves = [importance_loss(probs[r * n:(r + 1) * n].detach()).item() for r in range(world)]
    assert np.mean(halves) != pytest.approx(imp.item(), rel=1e-3)
