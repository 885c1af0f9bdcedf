"""MultiPosConLoss against hand-written references, NT-Xent, and 2 gloo processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synrep.losses import MultiPosConLoss
from tests._dist import run_gloo


def reference_multipos(z: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Loop-by-loop StableRep loss: mean over anchors with positives of the mean over positives
    of -log softmax (self excluded)."""
    z = F.normalize(z, dim=1)
    n = z.shape[0]
    losses = []
    for i in range(n):
        others = [k for k in range(n) if k != i]
        pos = [k for k in others if labels[k] == labels[i]]
        if not pos:
            continue
        denom = torch.logsumexp(torch.stack([z[i] @ z[k] / tau for k in others]), dim=0)
        losses.append(torch.stack([-(z[i] @ z[p] / tau - denom) for p in pos]).mean())
    return torch.stack(losses).mean()


def reference_ntxent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent written from the paper: 2N views, the other view is the positive."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / tau
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        total = total - (sim[i, j] - torch.logsumexp(others, dim=0))
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.07, 0.1, 0.5])
def test_matches_reference_value_and_grad(tau):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(24, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (24,), generator=g)
    labels[0] = 99  # an anchor without positives is left out
    z_ref = z.detach().clone().requires_grad_(True)
    loss = MultiPosConLoss(tau)(z, labels)
    ref = reference_multipos(z_ref, labels, tau)
    # Float64 inputs compute in float64; the tolerance is that of the float32 training path.
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-6)


def test_logits_stay_float32_under_bf16_autocast():
    # Mixed-precision training runs the losses inside autocast; their logits must not drop to
    # bf16 (an error of ~0.04 at tau = 0.1), so the value and gradient equal the fp32 ones.
    from synrep.losses.clip import ClipLoss

    g = torch.Generator().manual_seed(3)
    z = torch.randn(32, 16, generator=g, requires_grad=True)
    labels = torch.arange(8).repeat_interleave(4)
    img, txt = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    scale = torch.tensor(math.log(1 / 0.07))
    plain = MultiPosConLoss(0.1)(z, labels)
    (grad,) = torch.autograd.grad(plain, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = MultiPosConLoss(0.1)(z, labels)
        clip_mixed = ClipLoss()(img, txt, scale)
    (grad_mixed,) = torch.autograd.grad(mixed, z)
    assert mixed.dtype == torch.float32 and mixed.item() == plain.item()
    assert torch.equal(grad, grad_mixed)
    assert clip_mixed.item() == ClipLoss()(img, txt, scale).item()


def test_equals_ntxent_with_pairs():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    labels = torch.arange(10).repeat(2)
    loss = MultiPosConLoss(0.2)(torch.cat([z1, z2]), labels)
    assert loss.item() == pytest.approx(reference_ntxent(z1, z2, 0.2).item(), rel=1e-5)


def test_exact_value_two_orthogonal_pairs():
    # Two labels, each with two identical unit vectors, orthogonal across labels: for every
    # anchor the positive has cosine 1, the two negatives cosine 0.
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    tau = 0.5
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2.0))
    assert MultiPosConLoss(tau)(z, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(expected)


def test_no_positives_is_zero_not_nan():
    z = torch.randn(5, 4, requires_grad=True)
    loss = MultiPosConLoss(0.1)(z, torch.arange(5))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_extreme_similarities_are_finite():
    z = torch.randn(16, 8) * 1e4
    z.requires_grad_(True)
    loss = MultiPosConLoss(0.01)(z, torch.arange(8).repeat(2))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(z.grad).all()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        MultiPosConLoss(0.0)
    with pytest.raises(ValueError, match="labels"):
        MultiPosConLoss()(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="features"):
        MultiPosConLoss()(torch.randn(4), torch.zeros(4, dtype=torch.long))


def _dist_worker(rank, world, z_all, labels_all, cross, out_dir):
    n = z_all.shape[0] // world
    z = z_all[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    labels = labels_all[rank * n : (rank + 1) * n]
    loss = MultiPosConLoss(0.1, cross_rank_positives=cross)(z, labels)
    loss.backward()
    np.save(f"{out_dir}/loss{rank}.npy", loss.detach().numpy())
    np.save(f"{out_dir}/grad{rank}.npy", z.grad.numpy())


@pytest.mark.parametrize("cross", [False, True])
def test_two_gloo_processes_match_one(tmp_path, cross):
    g = torch.Generator().manual_seed(3)
    world, n = 2, 12
    z_all = torch.randn(world * n, 8, generator=g)
    labels_all = torch.randint(0, 4, (world * n,), generator=g)
    run_gloo(_dist_worker, world, z_all, labels_all, cross, str(tmp_path))

    # One process over the concatenated batch. Without cross-rank positives, equal local labels
    # on different ranks are different groups: offset them as the loss does.
    single_labels = labels_all.clone()
    if not cross:
        span = int(labels_all.max()) + 1
        single_labels = labels_all + torch.arange(world).repeat_interleave(n) * span
    z = z_all.clone().requires_grad_(True)
    loss = MultiPosConLoss(0.1)(z, single_labels)
    loss.backward()

    losses = [float(np.load(tmp_path / f"loss{r}.npy")) for r in range(world)]
    grads = np.concatenate([np.load(tmp_path / f"grad{r}.npy") for r in range(world)])
    # DDP averages gradients over ranks: the mean of the rank losses and grads / world must
    # equal the single-process loss and gradients.
    assert np.mean(losses) == pytest.approx(loss.item(), rel=1e-5)
    np.testing.assert_allclose(grads / world, z.grad.numpy(), rtol=1e-4, atol=1e-7)
