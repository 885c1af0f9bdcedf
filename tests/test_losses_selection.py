"""JEST scores with the losses of synrep.losses: the dense helpers are those losses, and the
blockwise pair objects of the sampler compute the same per-example and pair losses."""

from __future__ import annotations

import pytest
import torch

from synrep.losses import clip_loss, multipos_loss, siglip_loss
from synrep.selection import (
    MultiposGroups,
    MultiposPairs,
    SigmoidPairs,
    SoftmaxPairs,
    multipos_group_loss,
    sigmoid_pair_loss,
    softmax_batch_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sigmoid_pairs_are_siglip_pair_losses():
    g = gen(0)
    img, txt = (torch.randn(11, 6, generator=g, dtype=torch.float64) for _ in range(2))
    want = siglip_loss(img, txt, 8.0, -3.0, reduction="none")
    torch.testing.assert_close(SigmoidPairs(img, txt, 8.0, -3.0).dense(), want)
    torch.testing.assert_close(SigmoidPairs(img, txt, 8.0, -3.0).diagonal(), want.diagonal())
    assert torch.equal(sigmoid_pair_loss(img, txt, 8.0, -3.0), want)
    # The SigLIP loss of a sub-batch is its block sum / |A|.
    sub = torch.tensor([1, 4, 5, 9])
    assert float(want[sub][:, sub].sum()) / 4 == pytest.approx(
        float(siglip_loss(img[sub], txt[sub], 8.0, -3.0)), rel=1e-12)


def test_softmax_per_example_is_the_unreduced_clip_loss():
    g = gen(1)
    img, txt = (torch.randn(13, 5, generator=g, dtype=torch.float64) for _ in range(2))
    tau = 0.2
    want = clip_loss(img, txt, 1 / tau, reduction="none")
    torch.testing.assert_close(SoftmaxPairs(img, txt, tau).per_example, want)
    idx = torch.tensor([0, 3, 7, 12])
    assert torch.equal(softmax_batch_loss(img, txt, idx, tau),
                       clip_loss(img[idx], txt[idx], 1 / tau))


def test_multipos_group_scores_are_the_multipos_loss():
    z = torch.randn(7, 3, 6, generator=gen(2), dtype=torch.float64)  # 7 groups of 3 images
    tau = 0.15
    ids = torch.arange(7).repeat_interleave(3)
    rows = multipos_loss(z.reshape(21, 6), ids, tau, reduction="none")
    torch.testing.assert_close(MultiposGroups(z, tau).example_losses(), rows.view(7, 3).sum(1))
    idx = torch.tensor([5, 1, 2])
    want = multipos_loss(z[idx].reshape(9, 6), torch.arange(3).repeat_interleave(3), tau,
                         reduction="sum")
    assert float(multipos_group_loss(z, idx, tau)) == pytest.approx(float(want), rel=1e-12)


def test_multipos_pair_row_sums_are_the_anchor_losses():
    """On the super-batch itself the frozen pair matrix is exact: its row sums are the anchor
    losses of the multi-positive loss (the approximation is only on sub-batches)."""
    g = gen(3)
    z = torch.randn(16, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 6, (16,), generator=g)
    want = multipos_loss(z, ids, 0.2, reduction="none")
    torch.testing.assert_close(MultiposPairs(z, ids, 0.2).dense().sum(1), want)
