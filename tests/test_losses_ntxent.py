"""NT-Xent (synrep.losses.ntxent): a loop-by-loop reference, exact values, the single-process
formula of MixedAE before the move bit for bit, and 2 gloo processes against one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synrep.losses import NTXentLoss, nt_xent
from tests._dist import run_gloo


def reference(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's equation 1 view by view: the other view of the pair is the positive, every other
    view a negative; mean over the 2M views. Inputs are used as given (already unit norm)."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    terms = []
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        others = torch.stack([z[a] @ z[k] / tau for k in range(2 * n) if k != a])
        terms.append(-(z[a] @ z[pos] / tau - torch.logsumexp(others, dim=0)))
    return torch.stack(terms).mean()


def before_the_move(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """``nt_xent`` as methods/mixedae.py computed it (per rank) before it moved to losses/."""
    z = torch.cat([z1, z2]).float()
    sim = z @ z.t() / temperature
    m = z1.shape[0]
    sim = sim.masked_fill(torch.eye(2 * m, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(m, 2 * m), torch.arange(m)]).to(z.device)
    return F.cross_entropy(sim, target)


def views(seed: int, m: int = 6, d: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(m, d, generator=g, dtype=dtype), dim=1),
            F.normalize(torch.randn(m, d, generator=g, dtype=dtype), dim=1))


@pytest.mark.parametrize("tau", [0.1, 0.2, 0.5])
def test_matches_reference_value_and_grad(tau):
    z1, z2 = views(0, dtype=torch.float64)
    a1, a2 = z1.float().requires_grad_(True), z2.float().requires_grad_(True)
    r1, r2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = NTXentLoss(tau)(a1, a2)
    ref = reference(r1, r2, tau)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a1.grad.double(), r1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a2.grad.double(), r2.grad, rtol=1e-4, atol=1e-6)


def test_exact_value_two_orthogonal_pairs():
    # Pair 0 on axis x, pair 1 on axis y: every view's positive has cosine 1, its two
    # negatives cosine 0, so each term is -log(e^(1/tau) / (e^(1/tau) + 2)).
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2.0))
    assert nt_xent(z1, z1.clone(), tau).item() == pytest.approx(expected, rel=1e-6)


def test_one_process_is_bit_identical_to_the_formula_before_the_move():
    z1, z2 = views(1, m=16, d=32)
    a1, a2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    b1, b2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    new, old = NTXentLoss(0.2)(a1, a2), before_the_move(b1, b2, 0.2)
    assert torch.equal(new, old)
    new.backward()
    old.backward()
    assert torch.equal(a1.grad, b1.grad) and torch.equal(a2.grad, b2.grad)


def test_rejects_bad_arguments():
    for tau in (0.0, -0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            NTXentLoss(tau)
    with pytest.raises(ValueError, match=r"\[m, d\]"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\[m, d\]"):
        NTXentLoss()(torch.randn(4), torch.randn(4))


def _dist_worker(rank, world, z1_all, z2_all, out_dir):
    n = z1_all.shape[0] // world
    z1 = z1_all[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    z2 = z2_all[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = NTXentLoss(0.2)(z1, z2)
    loss.backward()
    np.save(f"{out_dir}/loss{rank}.npy", loss.detach().numpy())
    np.save(f"{out_dir}/grad1_{rank}.npy", z1.grad.numpy())
    np.save(f"{out_dir}/grad2_{rank}.npy", z2.grad.numpy())


def test_two_gloo_processes_match_one(tmp_path):
    world, n = 2, 5
    z1_all, z2_all = views(2, m=world * n)
    run_gloo(_dist_worker, world, z1_all, z2_all, str(tmp_path))

    z1, z2 = z1_all.clone().requires_grad_(True), z2_all.clone().requires_grad_(True)
    loss = NTXentLoss(0.2)(z1, z2)
    loss.backward()
    losses = [float(np.load(tmp_path / f"loss{r}.npy")) for r in range(world)]
    grad1 = np.concatenate([np.load(tmp_path / f"grad1_{r}.npy") for r in range(world)])
    grad2 = np.concatenate([np.load(tmp_path / f"grad2_{r}.npy") for r in range(world)])
    # DDP averages gradients over ranks: the mean of the rank losses and the gradients / world
    # equal one process on the concatenated batch.
    assert np.mean(losses) == pytest.approx(loss.item(), rel=1e-6)
    np.testing.assert_allclose(grad1 / world, z1.grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad2 / world, z2.grad.numpy(), rtol=1e-5, atol=1e-7)
    # The other ranks' views matter: each half alone (the per-rank loss before) differs.
    alone = [nt_xent(z1_all[r * n:(r + 1) * n], z2_all[r * n:(r + 1) * n], 0.2).item()
             for r in range(world)]
    assert np.mean(alone) != pytest.approx(loss.item(), rel=1e-3)
