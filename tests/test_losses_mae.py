"""MAE's masked reconstruction loss (synrep.losses.mae) against a loop-by-loop reference."""

from __future__ import annotations

import pytest
import torch

from synrep.losses import MaskedReconstructionLoss, masked_reconstruction_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
              norm_pix: bool, eps: float = 1e-6) -> float:
    """MAE's loss written from the paper, in Python floats: per-patch MSE on masked patches,
    averaged over the masked patches; norm-pix targets use the patch's unbiased variance."""
    total, count = 0.0, 0
    b, n, p = target.shape
    for i in range(b):
        for j in range(n):
            if not mask[i, j]:
                continue
            t = target[i, j].tolist()
            if norm_pix:
                mu = sum(t) / p
                var = sum((v - mu) ** 2 for v in t) / (p - 1)
                t = [(v - mu) / (var + eps) ** 0.5 for v in t]
            total += sum((float(pred[i, j, k]) - t[k]) ** 2 for k in range(p)) / p
            count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_matches_reference_and_function(norm_pix):
    g = torch.Generator().manual_seed(0)
    target, pred = torch.rand(3, 6, 5, generator=g), torch.randn(3, 6, 5, generator=g)
    mask = (torch.rand(3, 6, generator=g) < 0.6).float()
    got = MaskedReconstructionLoss(norm_pix)(target, pred, mask)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(reference(target, pred, mask, norm_pix), rel=1e-5)
    assert torch.equal(got, masked_reconstruction_loss(target, pred, mask, norm_pix))


def test_exact_value_and_gradient_only_on_masked_patches():
    # One image, two patches of two values; only patch 1 is masked. No norm-pix: the loss is
    # ((1 - 0)^2 + (3 - 1)^2) / 2 = 2.5, and the gradient 2 (pred - target) / (2 * 1 patch).
    target = torch.tensor([[[5.0, 5.0], [0.0, 1.0]]])
    pred = torch.tensor([[[0.0, 0.0], [1.0, 3.0]]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0]])
    loss = MaskedReconstructionLoss(norm_pix=False)(target, pred, mask)
    assert loss.item() == 2.5
    loss.backward()
    assert pred.grad.tolist() == [[[0.0, 0.0], [1.0, 2.0]]]
    # Norm-pix: the masked target (0, 1) has mean 0.5 and unbiased variance 0.5.
    t = [(v - 0.5) / (0.5 + 1e-6) ** 0.5 for v in (0.0, 1.0)]
    expected = ((1.0 - t[0]) ** 2 + (3.0 - t[1]) ** 2) / 2
    got = MaskedReconstructionLoss(norm_pix=True)(target, pred.detach(), mask)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_no_masked_patch_is_zero():
    target, pred = torch.rand(2, 4, 3), torch.randn(2, 4, 3)
    assert MaskedReconstructionLoss()(target, pred, torch.zeros(2, 4)).item() == 0.0


def test_rejects_bad_arguments():
    for eps in (0.0, -1e-6, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            MaskedReconstructionLoss(eps=eps)
    with pytest.raises(ValueError, match="norm_pix"):
        MaskedReconstructionLoss(norm_pix=1)
    loss_fn = MaskedReconstructionLoss()
    with pytest.raises(ValueError, match="target and pred"):
        loss_fn(torch.rand(2, 4, 3), torch.rand(2, 4, 2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask"):
        loss_fn(torch.rand(2, 4, 3), torch.rand(2, 4, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="more than one value"):
        loss_fn(torch.rand(2, 4, 1), torch.rand(2, 4, 1), torch.ones(2, 4))
