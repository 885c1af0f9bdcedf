"""JEST selection against brute force, exact sampling laws, direct losses and 2 gloo processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synrep.losses import MultiPosConLoss
from synrep.selection import (
    MultiposPairs,
    SigmoidPairs,
    SoftmaxPairs,
    chunk_sizes,
    conditional_scores,
    global_joint_sample,
    independent_sample,
    joint_sample,
    joint_sample_from_embeddings,
    multipos_pair_loss,
    per_example_scores,
    score_matrix,
    selected_count,
    sigmoid_pair_loss,
    softmax_batch_loss,
    softmax_pair_loss,
)
from tests._dist import run_gloo

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch_score(s: torch.Tensor, idx: list[int]) -> float:
    """sum_{i,j in idx} S_ij, written out."""
    return sum(float(s[i, j]) for i in idx for j in idx)


def test_conditional_score_is_exact_gain():
    s = torch.randn(9, 9, generator=gen(0), dtype=torch.float64)  # not symmetric on purpose
    sel = [1, 4, 7]
    g = conditional_scores(s, torch.tensor(sel))
    for k in range(9):
        if k in sel:
            assert g[k] == -math.inf
        else:
            gain = batch_score(s, [*sel, k]) - batch_score(s, sel)
            assert float(g[k]) == pytest.approx(gain, abs=1e-12)


def test_greedy_chunks_of_one_are_greedy_forward_selection():
    # Checks the sampler's incremental running sums against recomputed batch scores.
    s = torch.randn(12, 12, generator=gen(1), dtype=torch.float64)
    chosen: list[int] = []
    for _ in range(6):
        rest = [k for k in range(12) if k not in chosen]
        chosen.append(max(rest, key=lambda k: batch_score(s, [*chosen, k])))
    assert joint_sample(s, 6, 6, greedy=True).tolist() == chosen


def test_one_chunk_is_independent_selection_on_the_diagonal():
    s = torch.randn(20, 20, generator=gen(2))
    for seed in range(5):
        joint = joint_sample(s, 7, 1, gen(seed), temperature=0.5)
        alone = independent_sample(s.diagonal().clone(), 7, gen(seed), temperature=0.5)
        assert torch.equal(joint, alone)
    top = set(torch.topk(s.diagonal(), 7).indices.tolist())
    assert set(joint_sample(s, 7, 1, greedy=True).tolist()) == top


def test_gumbel_top_k_matches_plackett_luce_inclusion():
    logits = torch.tensor([1.0, 0.0, -0.5, 0.7])
    temperature = 0.8
    p = torch.softmax(logits / temperature, 0).tolist()
    # Sequential softmax without replacement, 2 of 4: P(i in set) = p_i + sum_j p_j p_i/(1-p_j).
    exact = [p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)]
    first = [0] * 4
    hits = [0] * 4
    g, draws = gen(3), 20000
    for _ in range(draws):
        pick = independent_sample(logits, 2, g, temperature=temperature).tolist()
        first[pick[0]] += 1  # topk returns the larger key first: the first draw
        for i in pick:
            hits[i] += 1
    # Standard error <= 0.0036: a 0.015 tolerance is > 4 sigma.
    for i in range(4):
        assert hits[i] / draws == pytest.approx(exact[i], abs=0.015)
        assert first[i] / draws == pytest.approx(p[i], abs=0.015)


def _three_groups(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Learner and reference pair matrices for groups learnable / noisy / learned (n each)."""
    learner_diag = torch.tensor([6.5, 9.5, 0.5]).repeat_interleave(n)
    reference_diag = torch.tensor([2.5, 9.5, 0.0]).repeat_interleave(n)
    g = gen(4)
    noise = 0.01 * torch.randn(2, 3 * n, 3 * n, generator=g)
    return noise[0] + torch.diag(learner_diag), noise[1] + torch.diag(reference_diag)


@pytest.mark.parametrize("score, group", [
    ("learnability", 0), ("hard_learner", 1), ("easy_reference", 2),
])
def test_scores_prefer_the_right_group(score, group):
    learner, reference = _three_groups()
    s = score_matrix(score, learner, reference)
    g = gen(5)
    counts = torch.zeros(3)
    for _ in range(200):
        picked = joint_sample(s, 10, 2, g)
        counts += torch.bincount(picked // 10, minlength=3)
    share = counts / counts.sum()
    assert share[group] > 0.8, share


def test_sigmoid_pair_sums_equal_siglip_on_sub_batches():
    g = gen(6)
    img, txt = torch.randn(10, 5, generator=g), torch.randn(10, 5, generator=g)
    t, b = 10.0, -3.0
    s = sigmoid_pair_loss(img, txt, t, b)
    x, y = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    for sub in ([0, 3, 4, 9], [2], list(range(10))):
        # SigLIP (Zhai et al. 2023): -1/|A| sum_ij log sigmoid(z_ij (t x_i.y_j + b)).
        direct = -sum(math.log(torch.sigmoid((1 if i == j else -1) * (t * x[i] @ y[j] + b)))
                      for i in sub for j in sub) / len(sub)
        assert batch_score(s, sub) / len(sub) == pytest.approx(direct, rel=1e-5)


def test_sigmoid_blocks_equal_the_dense_matrix():
    g = gen(16)
    img, txt = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    pairs = SigmoidPairs(img, txt, 5.0, -2.0)
    x, y = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    sign = torch.eye(9) * 2 - 1
    dense = -F.logsigmoid(sign * (5.0 * x @ y.T - 2.0))  # written out, identity mask and all
    torch.testing.assert_close(pairs.dense(), dense)
    a, b = torch.tensor([7, 2, 4]), torch.tensor([4, 0, 7, 8])  # overlap: (7, 7) and (4, 4)
    for rows, cols in ((None, a), (a, None), (a, b), (b, a)):
        want = dense if rows is None else dense[rows]
        want = want if cols is None else want[:, cols]
        torch.testing.assert_close(pairs.block(rows, cols), want)


def test_multipos_matrix_is_exact_on_the_super_batch_and_bounds_whole_groups():
    g = gen(7)
    z = torch.randn(18, 6, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5, 5, 6, 7, 7])  # 6 is alone
    tau = 0.2
    pairs = MultiposPairs(z, ids, tau)
    s = multipos_pair_loss(z, ids, tau)
    assert s.diagonal().abs().max() == 0
    assert pairs.n_valid == 17
    assert float(s.sum()) / 17 == pytest.approx(MultiPosConLoss(tau)(z, ids).item(), rel=1e-6)
    # Row i alone: anchor i's loss (the batch of one anchor with positives is that anchor).
    zn = F.normalize(z, dim=1)
    others = [k for k in range(18) if k != 0]
    lse = torch.logsumexp(torch.stack([zn[0] @ zn[k] / tau for k in others]), 0)
    row0 = -(zn[0] @ zn[1] / tau - lse + zn[0] @ zn[2] / tau - lse) / 2
    assert float(s[0].sum()) == pytest.approx(float(row0), rel=1e-9)
    # A sub-batch of whole groups: the frozen super-batch denominator over-estimates.
    sub = [0, 1, 2, 8, 9, 15]
    idx = torch.tensor(sub)
    exact = MultiPosConLoss(tau)(z[idx], ids[idx]).item() * 5  # 5 anchors with positives
    assert batch_score(s, sub) >= exact


def reference_clip_total(img, txt, idx, tau):
    """|A| * CLIP loss of A, loop by loop."""
    x, y = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    total = 0.0
    for i in idx:
        row = torch.stack([x[i] @ y[j] / tau for j in idx])
        col = torch.stack([x[j] @ y[i] / tau for j in idx])
        total += 0.5 * (float(torch.logsumexp(row, 0) + torch.logsumexp(col, 0))
                        - 2 * float(x[i] @ y[i] / tau))
    return total


def test_softmax_gains_are_recomputed_exactly():
    g = gen(8)
    img, txt = torch.randn(11, 4, generator=g, dtype=torch.float64), torch.randn(
        11, 4, generator=g, dtype=torch.float64)
    tau = 0.3
    sub = torch.tensor([1, 5, 6])
    assert softmax_batch_loss(img, txt, sub, tau).item() * 3 == pytest.approx(
        reference_clip_total(img, txt, sub.tolist(), tau), rel=1e-9)
    tracker = SoftmaxPairs(img, txt, tau).tracker()
    # Before any selection: each example's loss against the whole super-batch.
    full = reference_clip_total(img, txt, list(range(11)), tau)
    per_example = tracker.scores()
    assert float(per_example.sum()) == pytest.approx(full, rel=1e-9)
    assert torch.equal(softmax_pair_loss(img, txt, tau).diagonal(), per_example)
    tracker.add(torch.tensor([1, 5]))
    tracker.add(torch.tensor([6]))
    gains = tracker.scores()
    base = softmax_batch_loss(img, txt, sub, tau).item() * 3
    for k in (0, 2, 3, 4, 7, 8, 9, 10):
        with_k = softmax_batch_loss(img, txt, torch.tensor([1, 5, 6, k]), tau).item() * 4
        assert float(gains[k]) == pytest.approx(with_k - base, rel=1e-9, abs=1e-12)


def test_softmax_greedy_sampler_is_greedy_forward_selection():
    g = gen(9)
    learner = [torch.randn(10, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    reference = [torch.randn(10, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    tau_l, tau_r = 0.5, 0.25

    def score(idx):
        return (reference_clip_total(*learner, idx, tau_l)
                - reference_clip_total(*reference, idx, tau_r))

    first = (SoftmaxPairs(*learner, tau_l).per_example
             - SoftmaxPairs(*reference, tau_r).per_example)
    chosen = [int(first.argmax())]
    for _ in range(4):
        rest = [k for k in range(10) if k not in chosen]
        chosen.append(max(rest, key=lambda k: score([*chosen, k])))
    got = joint_sample_from_embeddings(SoftmaxPairs(*learner, tau_l),
                                       SoftmaxPairs(*reference, tau_r), 5, 5, greedy=True)
    assert got.tolist() == chosen


def _embeddings(kind: str, seed: int, n: int = 24):
    g = gen(seed)
    if kind == "multipos":
        ids = torch.randint(0, n // 3, (n,), generator=g)
        return [MultiposPairs(torch.randn(n, 6, generator=g, dtype=torch.float64), ids, tau)
                for tau in (0.1, 0.2)]
    return [SigmoidPairs(torch.randn(n, 6, generator=g, dtype=torch.float64),
                         torch.randn(n, 6, generator=g, dtype=torch.float64), t, b)
            for t, b in ((10.0, -5.0), (7.0, -2.0))]


@pytest.mark.parametrize("kind", ["sigmoid", "multipos"])
@pytest.mark.parametrize("score", ["learnability", "hard_learner", "easy_reference"])
def test_embedding_sampler_equals_dense_sampler(kind, score):
    learner, reference = _embeddings(kind, 10)
    s = score_matrix(score, learner.dense(), reference.dense())
    for seed in range(3):
        dense = joint_sample(s, 11, 4, gen(seed))  # uneven chunks 3, 3, 3, 2
        blocks = joint_sample_from_embeddings(learner, reference, 11, 4, gen(seed), score=score)
        assert torch.equal(dense, blocks)
        assert len(set(blocks.tolist())) == 11


def test_counts_and_per_example_forms():
    assert chunk_sizes(11, 4) == [3, 3, 3, 2]
    assert chunk_sizes(5, 5) == [1] * 5
    assert [selected_count(100, f) for f in (0.0, 0.5, 0.8, 0.9)] == [100, 50, 20, 10]
    assert selected_count(5, 0.5) == 3  # 2.5 rounds half up
    s = torch.arange(9.0).reshape(3, 3)
    assert per_example_scores(s).tolist() == [0.0, 4.0, 8.0]
    assert per_example_scores(s, "row_sum").tolist() == [3.0, 12.0, 21.0]


def test_bad_inputs_raise_clear_errors():
    s = torch.randn(6, 6)
    with pytest.raises(ValueError, match=r"filter ratio f must be in \[0, 1\), got 1.0"):
        selected_count(10, 1.0)
    with pytest.raises(ValueError, match="filter ratio f must be in"):
        selected_count(10, -0.1)
    with pytest.raises(ValueError, match="keeps b = .* = 0 examples"):
        selected_count(3, 0.9)
    with pytest.raises(ValueError, match=r"b \(examples to select\) must be an integer >= 1"):
        joint_sample(s, 0, 1)
    with pytest.raises(ValueError, match=r"b = 7 examples cannot be selected .* B = 6"):
        joint_sample(s, 7, 1)
    with pytest.raises(ValueError, match=r"n_chunks = 4 is more chunks than .* b = 3"):
        joint_sample(s, 3, 4)
    with pytest.raises(ValueError, match=r"square \[B, B\].*\(6, 5\)"):
        joint_sample(torch.randn(6, 5), 2, 1)
    with pytest.raises(ValueError, match="NaN"):
        joint_sample(torch.full((3, 3), math.nan), 2, 1)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        joint_sample(s, 2, 1, temperature=0)
    with pytest.raises(ValueError, match=r"same shape \[B, d\].*img \(6, 4\), txt \(6, 3\)"):
        SigmoidPairs(torch.randn(6, 4), torch.randn(6, 3), 10.0, -5.0)
    with pytest.raises(ValueError, match=r"group_ids must be an integer \[B\] = \[6\]"):
        MultiposPairs(torch.randn(6, 4), torch.zeros(5, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="learner and reference must score the same super-batch"):
        joint_sample_from_embeddings(SoftmaxPairs(torch.randn(6, 4), torch.randn(6, 4), 0.1),
                                     SoftmaxPairs(torch.randn(5, 4), torch.randn(5, 4), 0.1),
                                     2, 1)
    with pytest.raises(ValueError, match="needs the reference's pair losses, got None"):
        joint_sample_from_embeddings(SoftmaxPairs(torch.randn(6, 4), torch.randn(6, 4), 0.1),
                                     None, 2, 1)
    with pytest.raises(ValueError, match="score must be one of"):
        score_matrix("hardest", s, s)
    with pytest.raises(ValueError, match="learner and reference scores must have the same shape"):
        score_matrix("learnability", s, torch.randn(5, 5))


def _dist_worker(rank, world, cases, out_dir):
    torch.set_num_threads(1)
    for name, (kind, balance) in cases.items():
        learner, reference = _local_pairs(kind, rank, world)
        sel = global_joint_sample(learner, reference, 8, 3, gen(11), balance=balance)
        np.save(f"{out_dir}/{name}_idx{rank}.npy", sel.indices.numpy())
        np.save(f"{out_dir}/{name}_local{rank}.npy", sel.local.numpy())


def _local_pairs(kind, rank, world, n=12):
    """This rank's slice of a fixed super-batch (rank = -1: the whole gathered super-batch)."""
    g = gen(12)
    z = [torch.randn(world * n, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    ids = torch.randint(0, 5, (world * n,), generator=g)
    part = slice(None) if rank < 0 else slice(rank * n, (rank + 1) * n)
    if rank < 0 and kind == "multipos":  # ids are local to each rank, offset as the gather does
        ids = ids + torch.arange(world).repeat_interleave(n) * (int(ids.max()) + 1)
    if kind == "multipos":
        return (MultiposPairs(z[0][part], ids[part], 0.1),
                MultiposPairs(z[1][part], ids[part], 0.2))
    return (SigmoidPairs(z[0][part], z[1][part], 10.0, -5.0),
            SigmoidPairs(z[2][part], z[3][part], 7.0, -2.0))


def test_two_gloo_processes_select_as_one(tmp_path):
    world, n = 2, 12
    cases = {"multipos": ("multipos", False), "sigmoid": ("sigmoid", False),
             "balanced": ("sigmoid", True)}
    run_gloo(_dist_worker, world, cases, str(tmp_path))
    for name, (kind, balance) in cases.items():
        idx = [np.load(tmp_path / f"{name}_idx{r}.npy") for r in range(world)]
        local = [np.load(tmp_path / f"{name}_local{r}.npy") for r in range(world)]
        np.testing.assert_array_equal(idx[0], idx[1])
        for r in range(world):  # each rank's share, as local indices, in selection order
            mine = idx[0][(idx[0] >= r * n) & (idx[0] < (r + 1) * n)] - r * n
            np.testing.assert_array_equal(local[r], mine)
        if balance:
            assert [len(x) for x in local] == [4, 4]
            continue
        single = joint_sample_from_embeddings(*_local_pairs(kind, -1, world), 8, 3, gen(11))
        np.testing.assert_array_equal(idx[0], single.numpy())


def test_fast_log1p_and_softplus_match_float64_references():
    from synrep.selection.jest import _log1p_, _Scratch, _softplus_

    scratch = _Scratch()
    g = gen(3)
    # log1p on [0, 3e38]: tiny values (where 1 + x rounds to 1), the bulk, and huge values
    x = torch.cat([torch.tensor([0.0, 1e-30, 1e-10, 5.9e-8, 6e-8, 1.2e-7, 1.0, 1e30, 3e38]),
                   torch.rand(5000, generator=g) * 1e-6,
                   torch.exp(torch.randn(5000, generator=g) * 10).clamp(max=3e38)])
    got = _log1p_(x.clone(), scratch).double()
    want = torch.log1p(x.double())
    assert torch.isfinite(got).all()
    assert ((got - want).abs() <= 4e-7 * want.abs() + 1e-45).all()  # a few float32 ulps
    # softplus on the whole line, through the same (grown and reused) scratch buffers
    for scale in (1.0, 10.0, 100.0):
        z = torch.randn(3, 700, generator=g) * scale
        got = _softplus_(z.clone(), scratch).double()
        want = F.softplus(z.double())
        assert ((got - want).abs() <= 4e-7 * want.abs() + 1e-37).all(), scale  # float32 range


# t + b (the largest logit) picks the path: 3, 1 or 0 row merges before log1p, or softplus
@pytest.mark.parametrize("t, b, merges", [(10.0, -10.0, 3), (60.0, -30.0, 1), (70.0, -20.0, 0),
                                          (100.0, -10.0, -1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_tracker_gains_equal_dense_conditional_scores(t, b, merges, dtype):
    g = gen(21)
    n = 40
    pairs = SigmoidPairs(torch.randn(n, 8, generator=g, dtype=dtype),
                         torch.randn(n, 8, generator=g, dtype=dtype), t, b)
    x, y = F.normalize(pairs.img.double(), dim=1), F.normalize(pairs.txt.double(), dim=1)
    dense = -F.logsigmoid((torch.eye(n, dtype=torch.float64) * 2 - 1) * (t * x @ y.T + b))
    torch.testing.assert_close(pairs.dense().double(), dense, rtol=1e-5, atol=1e-6)
    tracker = pairs.tracker()
    assert tracker.merges == merges
    selected = []
    # chunks of different sizes (odd row counts carried through the merges) reuse buffers
    for chunk in ([5, 17, 3], [0, 39], [8, 9, 10, 11, 12], [30]):
        tracker.add(torch.tensor(chunk))
        selected += chunk
        sel = torch.tensor(selected)
        # every entry, the selected ones included (which conditional_scores masks with -inf)
        want = dense.diagonal() + dense[:, sel].sum(dim=1) + dense[sel, :].sum(dim=0)
        keep = torch.isfinite(conditional_scores(dense, sel))
        assert torch.equal(keep, ~torch.isin(torch.arange(n), sel))
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(tracker.scores().double(), want, rtol=tol, atol=tol)


def _clustered(g: torch.Generator, n: int = 512, d: int = 64, k: int = 16) -> torch.Tensor:
    """Embeddings with structure (k clusters), so scores differ and selection has signal."""
    centres = torch.randn(k, d, generator=g)
    return centres[torch.randint(0, k, (n,), generator=g)] + 0.7 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax", "groups"])
def test_bf16_gemms_keep_gains_close_and_select_the_same(kind):
    from synrep.selection import MultiposGroups

    g = gen(40)
    x1, y1, x2, y2 = (_clustered(g) for _ in range(4))
    make = {
        "sigmoid": lambda p: (SigmoidPairs(x1, y1, 10.0, -10.0, p),
                              SigmoidPairs(x2, y2, 10.0, -10.0, p)),
        "softmax": lambda p: (SoftmaxPairs(x1, y1, 0.1, p), SoftmaxPairs(x2, y2, 0.1, p)),
        "groups": lambda p: (MultiposGroups(x1.view(128, 4, -1), 0.2, p),
                             MultiposGroups(x2.view(128, 4, -1), 0.2, p)),
    }[kind]
    gains, picks = {}, {}
    for p in ("fp32", "bf16"):
        learner, reference = make(p)
        tracker, size = learner.tracker(), learner.size
        gains[p] = []
        for chunk in (torch.arange(0, size, 16), torch.arange(3, size, 16)):
            tracker.add(chunk)
            gains[p].append(tracker.scores().clone())
        picks[p] = set(joint_sample_from_embeddings(learner, reference, size // 5, 8,
                                                    gen(1)).tolist())
    for fp, bf in zip(gains["fp32"], gains["bf16"]):
        assert not torch.equal(fp, bf)  # the bf16 GEMMs ran
        assert ((bf - fp).abs() <= 5e-3 * (fp.abs() + 1)).all(), float((bf - fp).abs().max())
    assert len(picks["fp32"] & picks["bf16"]) >= 0.9 * len(picks["fp32"])


def test_merged_log1p_row_sums_match_float64():
    from synrep.selection.jest import _merge_limit, _Scratch, _sum_log1p_rows

    g = gen(41)
    for rows, top in ((1, 0.0), (7, 2.0), (64, 5.0), (33, 30.0)):
        y = torch.exp(torch.rand(rows, 50, generator=g) * (top + 20) - 20)  # y <= exp(top)
        k = _merge_limit(top)
        assert 0 <= k <= 3 and 2 ** k * math.log1p(math.exp(top)) <= 80.0
        got = _sum_log1p_rows(y.clone(), k, _Scratch()).double()
        want = torch.log1p(y.double()).sum(dim=0)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    assert _merge_limit(100.0) == 0 and _merge_limit(math.nan) == 0
    with pytest.raises(ValueError, match="precision"):
        SigmoidPairs(torch.randn(4, 3), torch.randn(4, 3), 10.0, -10.0, "fp16")


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["sigmoid", "softmax", "multipos", "groups"])
def test_samplers_never_build_a_super_batch_square(kind):
    # B = 8,192 candidates, b = 32 kept: B * b is 256x smaller than B * B, so any (B, B)
    # temporary (identity, probabilities, pair scores) shows up as the largest tensor
    from synrep.selection.jest import MultiposGroups

    big, b, d, g = 8192, 32, 8, gen(0)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    def pairs():
        if kind == "sigmoid":
            return SigmoidPairs(unit(big, d), unit(big, d), 10.0, -5.0)
        if kind == "softmax":
            return SoftmaxPairs(unit(big, d), unit(big, d), 0.1)
        if kind == "multipos":
            return MultiposPairs(unit(big, d), torch.arange(big) // 4, 0.1)
        return MultiposGroups(unit(big // 4, 4, d), 0.1)  # 2,048 groups of 4 images

    learner, reference = pairs(), pairs()
    mode = _LargestTensor()
    with mode:
        sel = joint_sample_from_embeddings(learner, reference, b, 4, gen(1))
    assert len(set(sel.tolist())) == b
    # the bound the samplers promise, O(B d + B b) (a dense sampler's largest is B * B, 256x more)
    assert mode.largest <= big * (b + d), mode.largest
