"""The functional forms of the contrastive losses (clip_loss, multipos_loss, their reductions
and gather=False) against loop-by-loop references, in one process and under 2 gloo processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synrep.losses import ClipLoss, MultiPosConLoss, clip_loss, multipos_loss
from tests._dist import run_gloo


def reference_clip_rows(img, txt, scale):
    """Each row's (image->text CE + text->image CE) / 2, written out."""
    x, y = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    n = x.shape[0]
    rows = []
    for i in range(n):
        a = torch.stack([scale * (x[i] @ y[j]) for j in range(n)])
        b = torch.stack([scale * (y[i] @ x[j]) for j in range(n)])
        rows.append(0.5 * ((torch.logsumexp(a, 0) - a[i]) + (torch.logsumexp(b, 0) - b[i])))
    return torch.stack(rows)


def reference_multipos_rows(z, labels, tau):
    """Each anchor's mean over positives of -log softmax over the others; 0 without one."""
    z = F.normalize(z, dim=1)
    n = z.shape[0]
    rows = []
    for i in range(n):
        others = [k for k in range(n) if k != i]
        pos = [k for k in others if labels[k] == labels[i]]
        if not pos:
            rows.append(z.new_zeros(()))
            continue
        lse = torch.logsumexp(torch.stack([z[i] @ z[k] / tau for k in others]), 0)
        rows.append(torch.stack([lse - z[i] @ z[p] / tau for p in pos]).mean())
    return torch.stack(rows)


def test_clip_reductions_match_reference():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(
        7, 5, generator=g, dtype=torch.float64)
    want = reference_clip_rows(img, txt, 3.0)
    rows = clip_loss(img, txt, 3.0, reduction="none")
    assert rows.dtype == torch.float64  # float64 inputs stay float64
    torch.testing.assert_close(rows, want, rtol=1e-12, atol=0)
    assert clip_loss(img, txt, 3.0, reduction="sum").item() == pytest.approx(
        want.sum().item(), rel=1e-12)
    assert clip_loss(img, txt, 3.0).item() == pytest.approx(want.mean().item(), rel=1e-12)
    # The module is the function at the clamped exp(log_scale).
    log_scale = torch.tensor(math.log(3.0))
    assert ClipLoss()(img.float(), txt.float(), log_scale).item() == pytest.approx(
        want.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        clip_loss(img, txt, 3.0, reduction="max")


def test_multipos_reductions_match_reference():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(14, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 4, 4, 5, 6])  # 2, 5, 6 without a pair
    labels[5] = 9
    want = reference_multipos_rows(z, labels, 0.2)
    rows = multipos_loss(z, labels, 0.2, reduction="none")
    assert rows.dtype == torch.float64
    torch.testing.assert_close(rows, want, rtol=1e-12, atol=1e-12)
    assert multipos_loss(z, labels, 0.2, reduction="sum").item() == pytest.approx(
        want.sum().item(), rel=1e-12)
    valid = torch.tensor([(labels == lab).sum() > 1 for lab in labels])
    mean = multipos_loss(z, labels, 0.2)
    assert mean.item() == pytest.approx(want[valid].mean().item(), rel=1e-12)
    assert torch.equal(mean, MultiPosConLoss(0.2)(z, labels))
    with pytest.raises(ValueError, match="reduction"):
        multipos_loss(z, labels, 0.2, reduction="max")


def _dist_worker(rank, world, img_all, txt_all, labels_all, out_dir):
    n = img_all.shape[0] // world
    img, txt = img_all[rank * n:(rank + 1) * n], txt_all[rank * n:(rank + 1) * n]
    labels = labels_all[rank * n:(rank + 1) * n]
    out = [clip_loss(img, txt, 5.0, reduction="none").numpy(),
           clip_loss(img, txt, 5.0, reduction="none", gather=False).numpy(),
           multipos_loss(img, labels, 0.1, cross_rank_positives=True, reduction="none").numpy(),
           multipos_loss(img, labels, 0.1, reduction="sum", gather=False).item()]
    np.save(f"{out_dir}/rank{rank}.npy", np.array(out, dtype=object), allow_pickle=True)


def test_two_gloo_processes_rows_and_local_mode(tmp_path):
    """reduction="none" under torch.distributed: this rank's rows of the global batch;
    gather=False: this rank's samples alone, as in one process."""
    world, n = 2, 6
    g = torch.Generator().manual_seed(2)
    img_all, txt_all = torch.randn(world * n, 8, generator=g), torch.randn(world * n, 8,
                                                                          generator=g)
    labels_all = torch.randint(0, 3, (world * n,), generator=g)
    run_gloo(_dist_worker, world, img_all, txt_all, labels_all, str(tmp_path))
    ranks = [np.load(tmp_path / f"rank{r}.npy", allow_pickle=True) for r in range(world)]
    clip_rows = clip_loss(img_all, txt_all, 5.0, reduction="none").numpy()
    multipos_rows = multipos_loss(img_all, labels_all, 0.1, reduction="none").numpy()
    for r in range(world):
        part = slice(r * n, (r + 1) * n)
        np.testing.assert_allclose(ranks[r][0], clip_rows[part], rtol=1e-5, atol=1e-6)
        alone = clip_loss(img_all[part], txt_all[part], 5.0, reduction="none").numpy()
        np.testing.assert_allclose(ranks[r][1], alone, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ranks[r][2], multipos_rows[part], rtol=1e-5, atol=1e-6)
        local = multipos_loss(img_all[part], labels_all[part], 0.1, reduction="sum")
        assert ranks[r][3] == pytest.approx(local.item(), rel=1e-5)
