"""JEST over whole caption groups (MultiposGroups): exact gains against brute force, the
per-group super-batch loss, stability at low temperature, sampling and 2 gloo processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synrep.selection import (
    MultiposGroups,
    global_joint_sample,
    independent_sample,
    jest,
    joint_sample_from_embeddings,
    multipos_group_loss,
)
from tests._dist import run_gloo

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest

G, M, D = 12, 3, 8


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def groups(seed: int, g: int = G, m: int = M, d: int = D, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(g, m, d, generator=gen(seed), dtype=dtype)


def brute_gains(z: torch.Tensor, selected: list[int], tau: float) -> dict[int, float]:
    """T(A + k) - T(A) for every k not in A, each T written out densely (float64)."""
    z = z.double()
    base = multipos_group_loss(z, torch.tensor(selected, dtype=torch.long), tau)
    return {k: float(multipos_group_loss(z, torch.tensor(selected + [k]), tau) - base)
            for k in range(z.shape[0]) if k not in selected}


def check_tracker_against_brute_force(z, tau, chunks, rtol):
    tracker = MultiposGroups(z, tau).tracker()
    selected: list[int] = []
    for chunk in [None, *chunks]:
        if chunk is not None:
            tracker.add(torch.tensor(chunk))
            selected += chunk
        got = tracker.scores()
        assert got.shape == (z.shape[0],)
        if not selected:  # the first chunk is drawn from each group's super-batch loss
            torch.testing.assert_close(got, MultiposGroups(z, tau).example_losses())
            continue
        want = brute_gains(z, selected, tau)
        rest = list(want)
        assert torch.isfinite(got[rest]).all()
        exp = torch.tensor([want[k] for k in rest], dtype=torch.float64)
        scale = float(exp.abs().max()) + 1.0
        np.testing.assert_allclose(got[rest].double().numpy(), exp.numpy(), rtol=0,
                                   atol=rtol * scale)


@pytest.mark.parametrize("row_block", [1024, 4])  # 4: chunks of images span several row blocks
@pytest.mark.parametrize("tau", [0.1, 1.0])
@pytest.mark.parametrize("fast", [True, False])  # shifted exps, or the log-space path
def test_tracker_gains_equal_brute_force(monkeypatch, row_block, tau, fast):
    monkeypatch.setattr(jest, "_ROW_BLOCK", row_block)
    if not fast:
        monkeypatch.setattr(jest, "_FAST_MAX_SCALE", 0.0)
    check_tracker_against_brute_force(groups(0), tau, [[3], [7, 0, 10]], rtol=1e-9)


def test_multipos_group_loss_is_the_multipos_loss_summed_over_anchors():
    z, tau = groups(1, g=3), 0.2
    x = F.normalize(z[[2, 0]], dim=-1).reshape(-1, D)  # groups 2 and 0
    total = 0.0
    for i in range(6):
        others = [j for j in range(6) if j != i]
        lse = torch.logsumexp(torch.stack([x[i] @ x[j] / tau for j in others]), dim=0)
        pos = [j for j in others if j // M == i // M]
        total += float(lse) - sum(float(x[i] @ x[p] / tau) for p in pos) / len(pos)
    assert float(multipos_group_loss(z, torch.tensor([2, 0]), tau)) == pytest.approx(total)
    assert float(multipos_group_loss(z, torch.tensor([], dtype=torch.long), tau)) == 0.0


@pytest.mark.parametrize("sym_block", [512, 5])  # 5: partial and off-diagonal blocks
@pytest.mark.parametrize("fast", [True, False])  # shifted exps, or the log-space path
def test_example_losses_are_each_groups_loss_against_the_super_batch(monkeypatch, sym_block,
                                                                      fast):
    monkeypatch.setattr(jest, "_SYM_BLOCK", sym_block)
    if not fast:
        monkeypatch.setattr(jest, "_FAST_MAX_SCALE", 0.0)
    z, tau = groups(2), 0.1
    x = F.normalize(z, dim=-1).reshape(G * M, D)
    s = x @ x.T / tau
    want = torch.zeros(G, dtype=torch.float64)
    for i in range(G * M):
        lse = torch.logsumexp(torch.cat([s[i, :i], s[i, i + 1:]]), dim=0)
        pos = [j for j in range(G * M) if j // M == i // M and j != i]
        want[i // M] += lse - s[i, pos].mean()
    got = MultiposGroups(z, tau).example_losses()
    assert got.shape == (G,)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_at_low_temperature(dtype):
    """At tau = 0.01 exp(s - 1/tau) spans exp(-200): below float32's range, kept in log space."""
    z = groups(3, dtype=dtype)
    pairs = MultiposGroups(z, 0.01)
    assert torch.isfinite(pairs.example_losses()).all()
    check_tracker_against_brute_force(z, 0.01, [[5, 1], [9]],
                                      rtol=1e-5 if dtype == torch.float32 else 1e-9)


def test_one_chunk_is_independent_selection_on_first_gains():
    zl, zr = groups(4), groups(5)
    learner, reference = MultiposGroups(zl, 0.1), MultiposGroups(zr, 0.3)
    got = joint_sample_from_embeddings(learner, reference, 5, 1, gen(6), score="learnability")
    gains = learner.tracker().scores() - reference.tracker().scores()
    torch.testing.assert_close(got, independent_sample(gains, 5, gen(6)))


def _basis_groups(off: list[int]) -> torch.Tensor:
    """[G, m, G m] groups on orthogonal axes: group k's images all lie on axis m k (tight), except
    for the groups in ``off`` whose last image lies on its own axis m k + 1 (an image that does not
    match the caption: the anchor loss is high). Groups are orthogonal to each other."""
    z = torch.zeros(G, M, G * M, dtype=torch.float64)
    for k in range(G):
        z[k, :, M * k] = 1.0
        if k in off:
            z[k, -1] = 0.0
            z[k, -1, M * k + 1] = 1.0
    return z


def test_greedy_prefers_learnable_groups_over_noisy_and_easy_ones():
    """Groups 0-3 are off for the learner but tight for the reference (learnable), 4-7 off for
    both (noisy), 8-11 tight for both (easy)."""
    learnable, noisy = [0, 1, 2, 3], [4, 5, 6, 7]
    learner = MultiposGroups(_basis_groups(learnable + noisy), 0.1)
    reference = MultiposGroups(_basis_groups(noisy), 0.1)
    for n_chunks in (1, 2, 4):
        sel = joint_sample_from_embeddings(learner, reference, 4, n_chunks, greedy=True)
        assert sorted(sel.tolist()) == learnable
    # The learner's loss alone cannot tell learnable from noisy groups (it ties them); hard
    # learner selection takes learnable and noisy groups alike, never the easy ones.
    own = learner.example_losses()
    torch.testing.assert_close(own[:4], own[4:8])
    sel = joint_sample_from_embeddings(learner, None, 8, 2, score="hard_learner", greedy=True)
    assert sorted(sel.tolist()) == learnable + noisy


def test_bad_inputs_raise_clear_errors():
    z = groups(9)
    with pytest.raises(ValueError, match="m >= 2"):
        MultiposGroups(z[:, :1], 0.1)
    with pytest.raises(ValueError, match=r"\[G, m, d\]"):
        MultiposGroups(z.reshape(G * M, D), 0.1)
    bad = z.clone()
    bad[2, 1, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        MultiposGroups(bad, 0.1)
    for tau in (0.0, -0.1, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            MultiposGroups(z, tau)
        with pytest.raises(ValueError, match="temperature"):
            multipos_group_loss(z, torch.tensor([0]), tau)
    with pytest.raises(ValueError, match="m >= 2"):
        multipos_group_loss(z[:, :1], torch.tensor([0]), 0.1)
    with pytest.raises(ValueError, match="distinct"):
        multipos_group_loss(z, torch.tensor([1, 1]), 0.1)
    with pytest.raises(ValueError, match="same super-batch"):
        joint_sample_from_embeddings(MultiposGroups(z, 0.1), MultiposGroups(z[:5], 0.1), 2, 1)


def _local_groups(rank, world, n=6):
    """This rank's groups of a fixed super-batch (rank = -1: the whole gathered super-batch)."""
    zl, zr = groups(10, g=world * n), groups(11, g=world * n)
    part = slice(None) if rank < 0 else slice(rank * n, (rank + 1) * n)
    return MultiposGroups(zl[part], 0.1), MultiposGroups(zr[part], 0.2)


def _dist_worker(rank, world, out_dir):
    torch.set_num_threads(1)
    for balance in (False, True):
        sel = global_joint_sample(*_local_groups(rank, world), 6, 3, gen(12), balance=balance)
        np.save(f"{out_dir}/{balance}_idx{rank}.npy", sel.indices.numpy())
        np.save(f"{out_dir}/{balance}_local{rank}.npy", sel.local.numpy())


def test_two_gloo_processes_select_groups_as_one(tmp_path):
    world, n = 2, 6
    run_gloo(_dist_worker, world, str(tmp_path))
    for balance in (False, True):
        idx = [np.load(tmp_path / f"{balance}_idx{r}.npy") for r in range(world)]
        local = [np.load(tmp_path / f"{balance}_local{r}.npy") for r in range(world)]
        np.testing.assert_array_equal(idx[0], idx[1])
        for r in range(world):
            mine = idx[0][(idx[0] >= r * n) & (idx[0] < (r + 1) * n)] - r * n
            np.testing.assert_array_equal(local[r], mine)
        if balance:
            assert [len(x) for x in local] == [3, 3]
            continue
        single = joint_sample_from_embeddings(*_local_groups(-1, world), 6, 3, gen(12))
        np.testing.assert_array_equal(idx[0], single.numpy())
