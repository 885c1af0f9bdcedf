"""JEST: joint example selection by learnability (Evans et al. 2024, arXiv 2406.17711).

Each step draws a super-batch of ``B`` examples and keeps ``b = (1 - f) B`` of them (filter ratio
``f``). For a contrastive loss the loss of a sub-batch is (exactly or approximately) a sum of
pairwise terms, so a model's losses on the super-batch form a ``[B, B]`` matrix ``S`` and a
sub-batch ``A`` scores ``sum_{i,j in A} S_ij``. The score matrix is the learner's minus the frozen
reference's (*learnability*, the default), the learner's alone (*hard learner*) or minus the
reference's (*easy reference*). Selection is blocked and sequential (docs/methods.md section 5): the
first chunk is drawn from the diagonal, every later chunk from the conditional scores

    g_k = S_kk + sum_{j in sel} (S_kj + S_jk),      g_k = -inf for k already selected,

which is the exact gain ``sum_{A+k} S - sum_A S`` of adding ``k``. A chunk is drawn without
replacement from ``softmax(g / temperature)`` by Gumbel-top-k: the top entries of ``g / temperature
+ Gumbel noise`` follow the Plackett-Luce (sequential softmax) law, so no probabilities are formed.

At scale ``S`` is never built: the pair-loss objects (:class:`SigmoidPairs`, :class:`MultiposPairs`,
:class:`SoftmaxPairs`) hold the super-batch embeddings and compute only the columns and rows of
the chunk just selected, keeping a running ``(B,)`` conditional sum: memory ``O(B d + B b)``.
The dense functions (``*_pair_loss``, :func:`joint_sample`) are for small super-batches and tests.

Pairwise decomposition, per loss:

* SigLIP (sigmoid): exact. ``sum_{i,j in A} S_ij = |A| * L_sigmoid(A)``.
* Multi-positive (StableRep/SynCLR): approximate, see :class:`MultiposPairs`.
* CLIP softmax: not decomposable (negatives enter a log-sum-exp); :class:`SoftmaxPairs` recomputes
  the exact conditional gain against the selected set for every chunk instead.
* Multi-positive over whole caption groups: :class:`MultiposGroups` selects groups of ``m`` images
  and, like softmax, recomputes the exact gains against the selected groups (no frozen
  denominator, so groups are coupled through each other's negatives).

The losses themselves are those of :mod:`synrep.losses`: SigLIP's pair losses are
:func:`~synrep.losses.siglip.siglip_loss` with ``reduction="none"``, a CLIP sub-batch's loss is
:func:`~synrep.losses.clip.clip_loss`, a caption-group set's summed loss is
:func:`~synrep.losses.multipos.multipos_loss` with ``reduction="sum"``; the dense functions below
call them. The classes evaluate the same quantities blockwise (bounded memory, one pass per
chunk) for the sampler, which those functions cannot do without the full ``[B, B]`` matrix.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from synrep.dist import gather_no_grad, rank, world_size
from synrep.losses.clip import clip_loss
from synrep.losses.multipos import multipos_loss
from synrep.losses.siglip import siglip_loss

Score = Literal["learnability", "hard_learner", "easy_reference"]
Precision = Literal["fp32", "bf16"]
PerExample = Literal["diagonal", "row_sum"]

# Rows of a similarity matrix computed at once when a full row statistic (log-sum-exp over the
# super-batch) is needed: bounds that memory to O(B * _ROW_BLOCK).
_ROW_BLOCK = 1024

# (learner, reference) coefficients of each score: score = c_l * S_learner + c_r * S_reference.
_COEFFICIENTS: dict[str, tuple[float, float]] = {
    "learnability": (1.0, -1.0),
    "hard_learner": (1.0, 0.0),
    "easy_reference": (0.0, -1.0),
}


# ---------------------------------------------------------------------------------------------
# Validation helpers


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_temperature(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_counts(size: int, b: int, n_chunks: int) -> None:
    _check_positive_int("b (examples to select)", b)
    _check_positive_int("n_chunks", n_chunks)
    if b > size:
        raise ValueError(f"b = {b} examples cannot be selected from a super-batch of B = {size}; "
                         f"b must be in [1, {size}]")
    if n_chunks > b:
        raise ValueError(f"n_chunks = {n_chunks} is more chunks than selected examples b = {b}; "
                         f"n_chunks must be in [1, {b}]")


def _check_score(score: str) -> tuple[float, float]:
    if score not in _COEFFICIENTS:
        raise ValueError(f"score must be one of {sorted(_COEFFICIENTS)}, got {score!r}")
    return _COEFFICIENTS[score]


def _check_matrix(name: str, s: Tensor) -> None:
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square [B, B] matrix, got shape "
                         f"{tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} contains NaN or infinite entries")


def _check_embeddings(names: tuple[str, ...], *xs: Tensor) -> None:
    for name, x in zip(names, xs):
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty [B, d] matrix, got shape "
                             f"{tuple(x.shape)}")
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        got = ", ".join(f"{n} {tuple(x.shape)}" for n, x in zip(names, xs))
        raise ValueError(f"embeddings must all have the same shape [B, d], got {got}")


def _check_precision(precision: str) -> str:
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return precision


def _mm_operand(x: Tensor, precision: str) -> Tensor:
    """``x`` as the sampler's similarity GEMMs read it: rounded to bf16 under ``"bf16"``.

    The products are accumulated in float32 and everything after them (exponentials, logs, the
    running scores) stays float32; only the GEMM inputs and outputs are rounded (relative error
    about 2^-9 each), as on accelerators that train in bf16.
    """
    return x.to(torch.bfloat16) if precision == "bf16" else x


def _mm_into(out: Tensor, a: Tensor, b: Tensor, scratch: _Scratch, name: str) -> Tensor:
    """``out = a @ b`` into the float32 buffer ``out``, for float32 or bf16 operands."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    return out.copy_(torch.mm(a, b, out=scratch.get(name, tuple(out.shape), a)))


def _as_float(x: Tensor) -> Tensor:
    """Detached, at least float32 (float64 stays float64), L2-normalised rows."""
    x = x.detach()
    if not x.is_floating_point() or x.element_size() < 4:
        x = x.float()
    return F.normalize(x, dim=1)


# ---------------------------------------------------------------------------------------------
# Element-wise kernels of the sampler


class _Scratch:
    """Reusable buffers for the temporaries every chunk of a selection needs again.

    The sampler's element-wise passes run on ~1 MB blocks many times per step. Allocated afresh,
    such blocks go back and forth between the C allocator and the OS (glibc trims and re-maps
    them), and on CPU the page faults cost more than the arithmetic (4x on the sigmoid sampler).
    Each named buffer grows to the largest request and is handed out as a view.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = like.new_empty(n)
            self._bufs[name] = buf
        return buf[:n].view(shape)


# exp(x) stays finite in float32 for x up to ~88.7; below this bound no overflow handling is needed
_EXP_SAFE = 80.0
_MAX_MERGES = 3  # row-halving merges before a log1p (see _sum_log1p_rows)
_MAX_PRODUCT_MERGES = 6  # row-halving products before a log (see _MultiposGroupTracker)


def _log1p_(x: Tensor, scratch: _Scratch) -> Tensor:
    """``log(1 + x)`` in place for ``x >= 0``, to a few ulps, from vectorised ``log`` alone.

    Some CPU builds run ``torch.log1p`` element by element (12x slower than ``log`` on the 2-core
    reference machine). Goldberg's identity ``log1p(x) = log(u) * x / (u - 1)`` with ``u = 1 + x``
    rounded is accurate to rounding; where ``u`` rounds to 1 (``x < 2^-24``) it is 0/0, replaced
    by ``log1p(x) = x``. Other devices use ``log1p_``.
    """
    if x.device.type != "cpu":
        return x.log1p_()
    u = torch.add(x, 1, out=scratch.get("log1p_u", tuple(x.shape), x))
    q = torch.log(u, out=scratch.get("log1p_q", tuple(x.shape), x))
    q.div_(u.sub_(1)).nan_to_num_(nan=1.0)
    return x.mul_(q)


def _softplus_(x: Tensor, scratch: _Scratch) -> Tensor:
    """``log(1 + exp(x))`` in place, for any finite ``x``: ``max(x, 0) + log1p(exp(-|x|))``."""
    if x.device.type != "cpu":
        return x.copy_(F.softplus(x))
    pos = torch.clamp_min(x, 0, out=scratch.get("softplus_pos", tuple(x.shape), x))
    _log1p_(x.abs_().neg_().exp_(), scratch)
    return x.add_(pos)


def _merge_count(log_factor: float, cap: int) -> int:
    """Row-halving merges that keep a product of ``2^k`` factors, each at most
    ``exp(log_factor)``, below ``exp(_EXP_SAFE)``: ``2^k log_factor <= _EXP_SAFE``; at most
    ``cap``."""
    if not log_factor <= _EXP_SAFE:  # also NaN
        return 0
    if log_factor <= 0:
        return cap
    return min(cap, max(0, int(math.floor(math.log2(_EXP_SAFE / log_factor)))))


def _merge_limit(top: float) -> int:
    """Row-halving merges :func:`_sum_log1p_rows` may run when every entry ``y <= exp(top)``:
    its factors ``1 + y`` are at most ``exp(softplus(top))``; at most ``_MAX_MERGES``."""
    if not top <= _EXP_SAFE:  # also NaN
        return 0
    return _merge_count(max(top, 0.0) + math.log1p(math.exp(-abs(top))), _MAX_MERGES)


def _fold_rows(y: Tensor, merges: int, fold) -> Tensor:
    """Halve the rows of ``y`` (r, n) ``merges`` times: ``fold(upper, lower)`` combines the
    lower half into the upper half in place (an odd last row is carried). Returns the
    remaining ``ceil(r / 2^merges)`` rows, a view of ``y``."""
    for _ in range(merges):
        h, odd = divmod(y.shape[0], 2)
        if h == 0:
            break
        fold(y[:h], y[h:2 * h])
        if odd:
            y[h] = y[2 * h]
        y = y[:h + odd]
    return y


def _sum_log1p_rows(y: Tensor, merges: int, scratch: _Scratch) -> Tensor:
    """``sum_i log(1 + y[i, :])`` for ``y >= 0`` (r, n), overwriting ``y``. (n,).

    ``log1p(y) + log1p(z) = log1p(y + z + y z)``: ``merges`` times, the lower half of the rows
    is folded into the upper half with one multiply and two adds, so only ``r / 2^merges`` rows
    go through the (much dearer) log. The caller bounds ``merges`` (:func:`_merge_limit`) so the
    products stay finite.
    """
    def fold(upper: Tensor, lower: Tensor) -> None:
        yz = torch.mul(upper, lower, out=scratch.get("yz", tuple(upper.shape), y))
        upper.add_(lower).add_(yz)

    return _log1p_(_fold_rows(y, merges, fold), scratch).sum(dim=0)


def selected_count(super_batch: int, filter_ratio: float) -> int:
    """``b = (1 - f) B`` rounded half up: how many of a super-batch of ``B`` examples to keep.

    ``f`` must lie in [0, 1) (JEST uses 0.5, 0.8, 0.9) and the result must be at least 1.
    """
    _check_positive_int("super-batch size B", super_batch)
    if not (isinstance(filter_ratio, (int, float)) and 0 <= filter_ratio < 1):
        raise ValueError(f"filter ratio f must be in [0, 1), got {filter_ratio!r}")
    b = math.floor((1 - filter_ratio) * super_batch + 0.5)
    if b < 1:
        raise ValueError(f"filter ratio f = {filter_ratio} keeps b = round({1 - filter_ratio:g} * "
                         f"{super_batch}) = 0 examples; use f <= {1 - 0.5 / super_batch:g} or a "
                         f"larger super-batch")
    return b


def chunk_sizes(b: int, n_chunks: int) -> list[int]:
    """Sizes of the ``n_chunks`` chunks of ``b``: the first ``b % n_chunks`` get one extra."""
    _check_positive_int("b (examples to select)", b)
    _check_positive_int("n_chunks", n_chunks)
    if n_chunks > b:
        raise ValueError(f"n_chunks = {n_chunks} is more chunks than selected examples b = {b}; "
                         f"n_chunks must be in [1, {b}]")
    base, extra = divmod(b, n_chunks)
    return [base + 1] * extra + [base] * (n_chunks - extra)


# ---------------------------------------------------------------------------------------------
# Scores


def learnability(learner: Tensor, reference: Tensor) -> Tensor:
    """``learner - reference`` (pair matrices [B, B] or per-example [B]): the default JEST score."""
    if learner.shape != reference.shape:
        raise ValueError(f"learner and reference scores must have the same shape, got "
                         f"{tuple(learner.shape)} and {tuple(reference.shape)}")
    return learner - reference


def hard_learner(learner: Tensor) -> Tensor:
    """The learner's own loss: prefers what the learner gets wrong (noisy data included)."""
    return learner


def easy_reference(reference: Tensor) -> Tensor:
    """Minus the reference's loss: prefers what the curated reference finds easy."""
    return -reference


def score_matrix(score: Score, learner: Tensor | None, reference: Tensor | None) -> Tensor:
    """The named score from the learner's and reference's losses (the unused one may be None)."""
    c_learner, c_reference = _check_score(score)
    if c_learner and learner is None or c_reference and reference is None:
        missing = "learner" if c_learner and learner is None else "reference"
        raise ValueError(f"score {score!r} needs the {missing}'s losses, got None")
    if reference is None or score == "hard_learner":
        assert learner is not None
        return hard_learner(learner)
    if learner is None or score == "easy_reference":
        return easy_reference(reference)
    return learnability(learner, reference)


def per_example_scores(scores: Tensor, form: PerExample = "diagonal") -> Tensor:
    """[B, B] -> [B] for independent selection (RHO-LOSS style prioritisation).

    ``"diagonal"``: ``S_ii`` (the positive pair alone, SigLIP); ``"row_sum"``: ``sum_j S_ij``,
    example ``i``'s loss as an anchor against the whole super-batch (exact for
    :class:`MultiposPairs`, whose diagonal is 0).
    """
    _check_matrix("scores", scores)
    if form == "diagonal":
        return scores.diagonal().clone()
    if form == "row_sum":
        return scores.sum(dim=1)
    raise ValueError(f"form must be 'diagonal' or 'row_sum', got {form!r}")


def conditional_scores(scores: Tensor, selected: Tensor) -> Tensor:
    """``g_k = S_kk + sum_{j in sel} (S_kj + S_jk)``, ``-inf`` on ``selected``. [B, B] -> [B].

    The gain in the sub-batch score ``sum_{i,j} S_ij`` from adding ``k`` to ``selected``.
    """
    _check_matrix("scores", scores)
    sel = selected.long()
    g = scores.diagonal() + scores[:, sel].sum(dim=1) + scores[sel, :].sum(dim=0)  # (B,)
    return g.index_fill(0, sel, -math.inf)


# ---------------------------------------------------------------------------------------------
# Pair losses held as embeddings


class Tracker(Protocol):
    """Conditional gains of every candidate against a growing selected set."""

    def scores(self) -> Tensor:
        """(B,) gain of adding each example; entries of selected examples are meaningless."""
        ...

    def add(self, chunk: Tensor) -> None:
        """Extend the selected set by ``chunk`` (c,)."""
        ...


class PairScores(Protocol):
    """One model's losses on a super-batch, evaluated on demand (never densely).

    ``size`` is the number of units of selection (examples, or caption groups for
    :class:`MultiposGroups`); selected indices refer to those units.
    """

    size: int
    device: torch.device

    def tracker(self) -> Tracker: ...

    def gather(self) -> PairScores:
        """The same object over the super-batch concatenated from every rank (rank-major)."""
        ...


def _arange_or(idx: Tensor | None, size: int, device: torch.device) -> Tensor:
    return torch.arange(size, device=device) if idx is None else idx


def _take(x: Tensor, idx: Tensor | None) -> Tensor:
    return x if idx is None else x[idx]


class _AdditivePairs:
    """A pair loss whose sub-batch score is ``sum_{i,j in A} S_ij``: only blocks are needed."""

    size: int
    device: torch.device

    def diagonal(self) -> Tensor:  # (B,)
        raise NotImplementedError

    def block(self, rows: Tensor | None, cols: Tensor | None) -> Tensor:
        """``S[rows][:, cols]``; ``None`` means every example. (r, c)."""
        raise NotImplementedError

    def dense(self) -> Tensor:
        """The full [B, B] matrix (small super-batches and tests only)."""
        return self.block(None, None)

    def tracker(self) -> Tracker:
        return _AdditiveTracker(self)


class _AdditiveTracker:
    """Running ``g = diag + sum over selected of (column + row)``: O(B * chunk) per chunk."""

    def __init__(self, pairs: _AdditivePairs) -> None:
        self.pairs = pairs
        self.g = pairs.diagonal().clone()  # (B,)

    def scores(self) -> Tensor:
        return self.g

    def add(self, chunk: Tensor) -> None:
        self.g += self.pairs.block(None, chunk).sum(dim=1)  # S[:, chunk]: (B, c) -> (B,)
        self.g += self.pairs.block(chunk, None).sum(dim=0)  # S[chunk, :]: (c, B) -> (B,)


class _DensePairs(_AdditivePairs):
    def __init__(self, scores: Tensor) -> None:
        _check_matrix("scores", scores)
        self.s = scores
        self.size, self.device = scores.shape[0], scores.device

    def diagonal(self) -> Tensor:
        return self.s.diagonal()

    def block(self, rows: Tensor | None, cols: Tensor | None) -> Tensor:
        return _take(_take(self.s, rows).T, cols).T

    def gather(self) -> PairScores:
        raise ValueError("a dense score matrix cannot be gathered; pass embeddings instead")


class SigmoidPairs(_AdditivePairs):
    """SigLIP pair losses ``S_ij = -log sigmoid(z_ij (t x_i.y_j + b))``, ``z = +1`` iff i = j.

    Exact: the SigLIP loss of a sub-batch ``A`` is ``sum_{i,j in A} S_ij / |A|``. ``S`` is
    :func:`synrep.losses.siglip.siglip_loss` with ``reduction="none"``, computed here by blocks.

    Shapes: img [B, d], txt [B, d] (L2-normalised inside); ``t`` the logit scale (not its log),
    ``b`` the bias of the model being scored. ``precision="bf16"``: the sampler's GEMMs (the
    tracker's (c, B) logit blocks) read bf16 operands (see :func:`_mm_operand`); :meth:`block`
    and :meth:`diagonal` stay float32.
    """

    def __init__(self, img: Tensor, txt: Tensor, t: float, b: float,
                 precision: Precision = "fp32") -> None:
        _check_embeddings(("img", "txt"), img, txt)
        _check_temperature("t (sigmoid logit scale)", t)
        if not math.isfinite(b):
            raise ValueError(f"b (sigmoid bias) must be finite, got {b!r}")
        self.precision = _check_precision(precision)
        self.img, self.txt = _as_float(img), _as_float(txt)
        self.t, self.bias = float(t), float(b)
        self.size, self.device = img.shape[0], img.device

    def diagonal(self) -> Tensor:
        return -F.logsigmoid(self.t * (self.img * self.txt).sum(dim=1) + self.bias)  # (B,)

    def block(self, rows: Tensor | None, cols: Tensor | None) -> Tensor:
        x, y = _take(self.img, rows), _take(self.txt, cols)
        logits = torch.addmm(x.new_full((), self.bias), x, y.T, alpha=self.t)  # (r, c)
        # Negatives: -log sigmoid(-l) = softplus(l). The few positives (i = j) are then fixed:
        # -log sigmoid(l) = softplus(l) - l. No (r, c) identity mask is formed.
        if rows is None and cols is None:
            pr = pc = torch.arange(self.size, device=logits.device)
        elif rows is None:
            pr, pc = cols, torch.arange(cols.numel(), device=logits.device)
        elif cols is None:
            pr, pc = torch.arange(rows.numel(), device=logits.device), rows
        else:
            pr, pc = (rows[:, None] == cols[None, :]).nonzero(as_tuple=True)
        pos = logits[pr, pc]
        loss = _softplus_(logits, _Scratch())
        loss[pr, pc] -= pos
        return loss

    def tracker(self) -> Tracker:
        return _SigmoidTracker(self)

    def gather(self) -> SigmoidPairs:
        _check_same_size_on_ranks(self.size)
        return SigmoidPairs(gather_no_grad(self.img), gather_no_grad(self.txt), self.t, self.bias,
                            self.precision)


class _SigmoidTracker:
    """:class:`_AdditiveTracker` for :class:`SigmoidPairs`, both blocks of a chunk in one pass.

    The transposed column block ``S[:, chunk]^T`` and the row block ``S[chunk, :]`` are both
    (c, B) with their positives at the same places ``(j, chunk_j)``, so they share one buffer, one
    softplus pass and one reduction; the positives' ``-l`` correction is ``-2 l_kk`` on the chunk's
    own entries (precomputed diagonal logits). Buffers are reused from chunk to chunk.
    """

    def __init__(self, pairs: SigmoidPairs) -> None:
        self.pairs = pairs
        self.g = pairs.diagonal().clone()  # (B,)
        self.diag_logits = pairs.t * (pairs.img * pairs.txt).sum(dim=1) + pairs.bias  # (B,)
        self.scratch = _Scratch()
        # Every logit is at most t + b (unit vectors). Up to _EXP_SAFE its exp is finite and
        # softplus(l) = log1p(exp(l)) is summed with row-halving merges (_sum_log1p_rows); above
        # it (-1) the general softplus runs.
        top = pairs.t + pairs.bias
        self.merges = _merge_limit(top) if top <= _EXP_SAFE else -1
        self.bias = pairs.img.new_full((), pairs.bias)
        self.bf16 = pairs.precision == "bf16"
        if self.bf16:  # the scale goes into one operand before rounding, the bias after the GEMM
            self.img_mm = _mm_operand(pairs.img * pairs.t, "bf16")
            self.txt_mm = _mm_operand(pairs.txt, "bf16")

    def scores(self) -> Tensor:
        return self.g

    def add(self, chunk: Tensor) -> None:
        p = self.pairs
        size, c = p.size, chunk.numel()
        logits = self.scratch.get("logits", (2, c, size), p.img)
        # [0, j, k] = S[k, chunk_j] (image k, text chunk_j); [1, j, k] = S[chunk_j, k]
        if self.bf16:
            dots = self.scratch.get("dots", (2, c, size), self.img_mm)
            torch.mm(self.txt_mm[chunk], self.img_mm.T, out=dots[0])
            torch.mm(self.img_mm[chunk], self.txt_mm.T, out=dots[1])
            logits.copy_(dots).add_(p.bias)
        else:
            torch.addmm(self.bias, p.txt[chunk], p.img.T, alpha=p.t, out=logits[0])
            torch.addmm(self.bias, p.img[chunk], p.txt.T, alpha=p.t, out=logits[1])
        if self.merges < 0:
            self.g += _softplus_(logits, self.scratch).sum(dim=(0, 1))
        else:  # l <= t + b: exp(l) cannot overflow and softplus(l) = log1p(exp(l))
            self.g += _sum_log1p_rows(logits.exp_().view(2 * c, size), self.merges, self.scratch)
        self.g[chunk] -= 2 * self.diag_logits[chunk]  # positives: -log sigmoid(l) = softplus(l) - l


def _row_logsumexp(q: Tensor, k: Tensor, scale: float, exclude_self: bool) -> Tensor:
    """``logsumexp_j (q_i . k_j) * scale`` for every row i, in row blocks. (B,)."""
    out = q.new_empty(q.shape[0])
    for start in range(0, q.shape[0], _ROW_BLOCK):
        s = (q[start:start + _ROW_BLOCK] * scale) @ k.T  # (blk, B); scaled before the GEMM
        if exclude_self:
            rows = torch.arange(s.shape[0], device=s.device)
            s[rows, rows + start] = -math.inf
        out[start:start + s.shape[0]] = torch.logsumexp(s, dim=1)
    return out


# Fast path for unit-norm embeddings: with s = scale * x_i . x_j in [-scale, scale], exp(s) lies
# in [e^-40, e^40] up to this scale (1/temperature), well inside float32's range (e^+-87) even
# summed over millions of terms, so sums of exponentials need no per-row maximum: one exp per
# similarity, shared by row and column sums. Larger scales use the log-space path.
_FAST_MAX_SCALE = 40.0
_SYM_BLOCK = 512  # block edge of the symmetric self-similarity pass on CPU (x8 on GPUs)


def _self_logsumexp(x: Tensor, scale: float, precision: Precision = "fp32") -> Tensor:
    """``logsumexp_{j != i} scale * x_i . x_j`` for unit rows ``x`` (n, d). (n,).

    The similarity matrix is symmetric: each block pair is computed once and feeds the row sums
    of both its row and its column block (half the GEMMs and exps of the row-by-row pass).
    Memory ``O(block^2)``. ``precision``: of the GEMM operands (:func:`_mm_operand`; the
    log-space path above ``_FAST_MAX_SCALE`` is always float32).
    """
    if scale > _FAST_MAX_SCALE:
        return _row_logsumexp(x, x, scale, exclude_self=True)
    n = x.shape[0]
    acc = x.new_zeros(n)
    blk = _SYM_BLOCK * (8 if x.is_cuda else 1)  # fewer, larger GEMMs where launches cost more
    scratch = _Scratch()
    xs, xm = _mm_operand(x * scale, precision), _mm_operand(x, precision)
    for i0 in range(0, n, blk):
        xi = xs[i0:i0 + blk]
        for j0 in range(i0, n, blk):
            xj = xm[j0:j0 + blk]
            e = _mm_into(scratch.get("e", (xi.shape[0], xj.shape[0]), x), xi, xj.T, scratch,
                         "e_mm").exp_()
            if j0 == i0:
                e.fill_diagonal_(0)  # an image is not in its own denominator
            acc[i0:i0 + e.shape[0]] += e.sum(dim=1)
            if j0 != i0:
                acc[j0:j0 + e.shape[1]] += e.sum(dim=0)
    return acc.log_()


class MultiposPairs(_AdditivePairs):
    """Multi-positive (StableRep/SynCLR) pair losses with the super-batch's softmax frozen.

    The loss of a batch ``A`` is the mean over anchors ``i`` with a positive of
    ``1/|P_A(i)| sum_{p in P_A(i)} -log softmax_{A - i}(s_i / tau)_p``, ``P_A(i)`` the other
    images of ``i``'s caption group in ``A``, ``s_ij = z_i . z_j``. The log-sum-exp couples every
    pair of the batch, so no pair matrix reproduces it on every sub-batch. This one freezes the
    two batch-dependent quantities at their super-batch values ``D``:

        S_ij = (LSE_{k in D, k != i} s_ik / tau - s_ij / tau) / (m_i - 1)   i != j, same group
        S_ij = 0                                                             otherwise (and i = j)

    with ``m_i`` the size of ``i``'s group in ``D``. Exact on the super-batch:
    ``sum_{i,j in D} S_ij = n_valid * L(D)`` and the row sums are the per-anchor losses. On a
    sub-batch ``A`` it is an approximation: (1) the denominator still runs over ``D``, not ``A``;
    since ``LSE_D >= LSE_A`` every positive term is an over-estimate, by ``-log`` of the share of
    the anchor's softmax mass that ``A`` retains (about ``log(B / b)`` when that mass is spread
    evenly, a constant that does not change the ranking); (2) positives are weighted by
    ``1/(m_i - 1)`` instead of ``1/(|P_A(i)|)``, equal when ``A`` keeps whole groups. Hence for a
    sub-batch of whole groups ``sum_{i,j in A} S_ij >= n_valid(A) * L(A)``. Negatives enter only
    through the frozen denominator, so the joint selection couples an image to its positives
    (choosing one makes its group-mates' terms count), not to its hard negatives. The zero
    diagonal means the first chunk of a pure multi-positive score is drawn uniformly.

    Shapes: z [B, d] (L2-normalised inside), group_ids [B] integer caption ids.
    ``cross_rank_positives`` is as in :class:`synrep.losses.MultiPosConLoss`: if False, ids are
    local to each rank and are offset by rank when gathered.
    """

    def __init__(self, z: Tensor, group_ids: Tensor, temperature: float,
                 cross_rank_positives: bool = False) -> None:
        _check_embeddings(("z",), z)
        if group_ids.shape != z.shape[:1] or group_ids.is_floating_point():
            raise ValueError(f"group_ids must be an integer [B] = [{z.shape[0]}] tensor, got "
                             f"{group_ids.dtype} of shape {tuple(group_ids.shape)}")
        self.temperature = _check_temperature("temperature", temperature)
        self.cross_rank_positives = cross_rank_positives
        self.z, self.ids = _as_float(z), group_ids.long()
        self.size, self.device = z.shape[0], z.device
        _, inverse, counts = torch.unique(self.ids, return_inverse=True, return_counts=True)
        m = counts[inverse].to(self.z.dtype)  # (B,) group size of each example
        self.weight = torch.where(m > 1, 1 / (m - 1).clamp(min=1), torch.zeros_like(m))  # (B,)
        self.lse = _row_logsumexp(self.z, self.z, 1 / self.temperature, exclude_self=True)  # (B,)

    @property
    def n_valid(self) -> int:
        """Anchors with at least one positive in the super-batch."""
        return int((self.weight > 0).sum())

    def diagonal(self) -> Tensor:
        return self.z.new_zeros(self.size)

    def block(self, rows: Tensor | None, cols: Tensor | None) -> Tensor:
        s = _take(self.z, rows) @ _take(self.z, cols).T / self.temperature  # (r, c)
        r = _arange_or(rows, self.size, s.device)
        c = _arange_or(cols, self.size, s.device)
        pos = (self.ids[r][:, None] == self.ids[c][None, :]) & (r[:, None] != c[None, :])
        loss = self.weight[r][:, None] * (self.lse[r][:, None] - s)  # (r, c)
        return torch.where(pos, loss, torch.zeros_like(loss))

    def gather(self) -> MultiposPairs:
        _check_same_size_on_ranks(self.size)
        ids = self.ids
        if world_size() > 1 and not self.cross_rank_positives:
            if ids.min() < 0:
                raise ValueError("group_ids must be >= 0 to be offset by rank when gathered")
            span = (ids.max() + 1).clone()
            dist.all_reduce(span, op=dist.ReduceOp.MAX)
            ids = ids + rank() * span
        return MultiposPairs(gather_no_grad(self.z), gather_no_grad(ids), self.temperature,
                             self.cross_rank_positives)


class SoftmaxPairs:
    """CLIP softmax losses: the conditional gain is recomputed exactly against the selected set.

    The score of a sub-batch ``A`` is its summed loss ``T(A) = |A| * L_clip(A)``, with
    ``l_i(A) = 1/2 [(LSE_{j in A} s_ij - s_ii) + (LSE_{j in A} s_ji - s_ii)]`` and
    ``s_ij = x_i . y_j / tau``. It is not a sum of pair terms (negatives sit inside the LSE), so
    the tracker returns for every candidate ``k`` the exact gain ``T(A + k) - T(A)``:

        1/2 [LSE(s_kA, s_kk) - s_kk + LSE(s_Ak, s_kk) - s_kk]                 (k's own loss)
      + 1/2 sum_{i in A} [logaddexp(r_i, s_ik) - r_i + logaddexp(c_i, s_ki) - c_i]   (k as negative)

    where ``r_i, c_i`` are the row and column LSEs of ``i`` within ``A``. It keeps ``s[:, A]`` and
    ``s[A, :]`` ((B, |A|) each) and recomputes the gain from them per chunk: O(B b) memory. A
    singleton has zero CLIP loss, so the first chunk is drawn instead from each example's loss
    against the whole super-batch (RHO-LOSS style; the diagonal of :func:`softmax_pair_loss`):
    ``per_example`` is :func:`synrep.losses.clip.clip_loss` with ``reduction="none"``, its
    log-sum-exps computed in row blocks.

    Shapes: img [B, d], txt [B, d] (L2-normalised inside). ``precision="bf16"``: the tracker's
    logit blocks (:meth:`logits`) come from bf16 GEMM operands (:func:`_mm_operand`).
    """

    def __init__(self, img: Tensor, txt: Tensor, temperature: float,
                 precision: Precision = "fp32") -> None:
        _check_embeddings(("img", "txt"), img, txt)
        self.temperature = _check_temperature("temperature", temperature)
        self.precision = _check_precision(precision)
        self.img, self.txt = _as_float(img), _as_float(txt)
        self._img_mm = _mm_operand(self.img, precision)
        self._txt_mm = _mm_operand(self.txt, precision)
        self.size, self.device = img.shape[0], img.device
        scale = 1 / self.temperature
        self.diag_logits = (self.img * self.txt).sum(dim=1) * scale  # (B,) s_ii
        row = _row_logsumexp(self.img, self.txt, scale, exclude_self=False)  # image -> texts
        col = _row_logsumexp(self.txt, self.img, scale, exclude_self=False)  # text -> images
        self.per_example = 0.5 * (row + col) - self.diag_logits  # (B,)

    def logits(self, rows: Tensor | None, cols: Tensor | None) -> Tensor:
        """``s[rows][:, cols]`` (r, c), in the embeddings' float dtype."""
        s = _take(self._img_mm, rows) @ _take(self._txt_mm, cols).T
        return s.to(self.img.dtype) / self.temperature

    def tracker(self) -> Tracker:
        return _SoftmaxTracker(self)

    def gather(self) -> SoftmaxPairs:
        _check_same_size_on_ranks(self.size)
        return SoftmaxPairs(gather_no_grad(self.img), gather_no_grad(self.txt), self.temperature,
                            self.precision)


class _SoftmaxTracker:
    def __init__(self, pairs: SoftmaxPairs) -> None:
        self.pairs = pairs
        self.sel = torch.empty(0, dtype=torch.long, device=pairs.img.device)  # (a,)
        self.p = pairs.img.new_empty(pairs.size, 0)  # (B, a): p[k, j] = s[k, A_j]
        self.q = pairs.img.new_empty(pairs.size, 0)  # (B, a): q[k, j] = s[A_j, k]

    def scores(self) -> Tensor:
        if self.sel.numel() == 0:
            return self.pairs.per_example
        d, p, q = self.pairs.diag_logits, self.p, self.q
        own = (torch.logaddexp(torch.logsumexp(p, dim=1), d)
               + torch.logaddexp(torch.logsumexp(q, dim=1), d) - 2 * d)  # (B,)
        r = torch.logsumexp(p[self.sel], dim=1)  # (a,) r_i = LSE_{j in A} s[A_i, A_j]
        c = torch.logsumexp(q[self.sel], dim=1)  # (a,) c_i = LSE_{j in A} s[A_j, A_i]
        # Adding k puts s[A_i, k] = q[k, i] into row i's LSE, s[k, A_i] = p[k, i] into column i's.
        others = ((torch.logaddexp(r[None, :], q) - r[None, :]).sum(dim=1)
                  + (torch.logaddexp(c[None, :], p) - c[None, :]).sum(dim=1))  # (B,)
        return 0.5 * (own + others)

    def add(self, chunk: Tensor) -> None:
        self.p = torch.cat([self.p, self.pairs.logits(None, chunk)], dim=1)
        self.q = torch.cat([self.q, self.pairs.logits(chunk, None).T], dim=1)
        self.sel = torch.cat([self.sel, chunk])


def _check_groups(name: str, z: Tensor) -> None:
    if z.ndim != 3 or z.shape[0] == 0 or z.shape[2] == 0:
        raise ValueError(f"{name} must be a non-empty [G, m, d] tensor (G caption groups of m "
                         f"images), got shape {tuple(z.shape)}")
    if z.shape[1] < 2:
        raise ValueError(f"{name} needs m >= 2 images per caption group (a multi-positive loss "
                         f"needs a positive), got m = {z.shape[1]}")
    if not torch.isfinite(z).all():
        raise ValueError(f"{name} contains NaN or infinite entries")


def _as_float_groups(z: Tensor) -> Tensor:
    """:func:`_as_float` on [G, m, d]: every image embedding L2-normalised."""
    g, m, d = z.shape
    return _as_float(z.reshape(g * m, d)).reshape(g, m, d)


class MultiposGroups:
    """Multi-positive (StableRep/SynCLR) losses over whole caption groups, gains recomputed exactly.

    The unit of selection is a caption group of ``m`` images. With ``s_ij = z_i . z_j / tau``
    over images, the score of a set ``A`` of groups (images ``I(A)``) is its summed loss

        T(A) = sum_{i in I(A)} [LSE_{j in I(A), j != i} s_ij - mean_{p in grp(i), p != i} s_ip]

    (one view per image, every anchor with its ``m - 1`` positives). Unlike :class:`MultiposPairs`
    nothing is frozen at the super-batch: the tracker returns for every candidate group ``k`` the
    exact gain ``T(A + k) - T(A)``

        sum_{i in k} [log(D_i + O_i) - pos_mean_i] + sum_{i in I(A)} log(1 + E_ik / Z_i)

    with ``O_i = sum_{j in grp(i), j != i} exp s_ij`` (own group), ``D_i`` the same sum over the
    images of ``A`` outside ``grp(i)``, ``Z_i = D_i + O_i`` and ``E_ik = sum_{j in k} exp s_ij``:
    ``k``'s own anchors, then ``k``'s images entering the denominators of the selected anchors
    (the coupling between groups). ``D`` is a running ``(G, m)`` sum and ``E`` the
    ``(|A| m, G)`` rows of the selected images, filled once per chunk. Up to ``1/tau = 40`` the
    exponentials are summed directly (they cannot leave float32's range for unit vectors); below
    ``tau = 0.025`` everything is kept in log space, so it is finite for any temperature. Memory
    ``O(G m d + |A| m G)``: ``scores`` is ``O(|A| m G)``, ``add`` of ``c`` groups ``O(c m G m d)``
    time in row blocks of at most ``_ROW_BLOCK`` images (``O(_ROW_BLOCK G m)`` memory). No
    ``(G m, G m)`` matrix is built; :meth:`example_losses` visits each block pair of the
    symmetric similarity matrix once.

    ``T`` of a single group depends only on the spread of its positive similarities
    (``m = 2``: zero), so, as for :class:`SoftmaxPairs`, the first chunk is drawn instead from
    :meth:`example_losses`, each group's loss against the whole super-batch; with one chunk the
    sampler is therefore independent (RHO-LOSS style) selection by that loss. (``T`` is
    :func:`synrep.losses.multipos.multipos_loss` with ``reduction="sum"`` on the images of ``A``;
    :meth:`example_losses` its ``reduction="none"`` anchor losses summed per group.)

    Shapes: z [G, m, d] (every image L2-normalised inside), ``m >= 2``. ``precision="bf16"``:
    the similarity GEMMs read bf16 operands (:func:`_mm_operand`); the exponentials, logs and
    running sums stay float32. The own-group terms (``O``, positives) are always float32.
    """

    def __init__(self, z: Tensor, temperature: float, precision: Precision = "fp32") -> None:
        _check_groups("z", z)
        self.temperature = _check_temperature("temperature", temperature)
        self.precision = _check_precision(precision)
        self.z = _as_float_groups(z)  # (G, m, d)
        self.size, self.m = z.shape[0], z.shape[1]
        self.device = z.device
        s = torch.einsum("gid,gjd->gij", self.z, self.z) / self.temperature  # (G, m, m)
        eye = torch.eye(self.m, dtype=torch.bool, device=s.device)
        self.pos_mean = s.masked_fill(eye, 0).sum(dim=2) / (self.m - 1)  # (G, m)
        self.log_own = torch.logsumexp(s.masked_fill(eye, -math.inf), dim=2)  # (G, m) log O_i
        self._example_losses: Tensor | None = None
        self._gathered: MultiposGroups | None = None

    @property
    def images(self) -> Tensor:
        """The image embeddings flattened group-major. (G m, d)."""
        return self.z.reshape(self.size * self.m, -1)

    def example_losses(self) -> Tensor:
        """Each group's summed anchor loss with the whole super-batch as the batch. (G,).

        ``O((G m)^2 d)`` time in row blocks, computed once and kept (the sampler's first chunk
        and the selection statistics both use it)."""
        if self._example_losses is None:
            lse = _self_logsumexp(self.images, 1 / self.temperature, self.precision)
            self._example_losses = (lse.view(self.size, self.m) - self.pos_mean).sum(dim=1)
        return self._example_losses

    def tracker(self) -> Tracker:
        return _MultiposGroupTracker(self)

    def gather(self) -> MultiposGroups:
        """The groups of every rank (rank-major). Kept after the first call: every rank calls it
        equally often, so the sampler and the selection statistics share one all-gather."""
        if world_size() == 1:
            return self
        if self._gathered is None:
            _check_same_size_on_ranks(self.size)
            self._gathered = MultiposGroups(gather_no_grad(self.z), self.temperature,
                                            self.precision)
        return self._gathered


class _MultiposGroupTracker:
    """Running state of :class:`MultiposGroups` over a growing selection (see its doc).

    Per selected image ``i`` it keeps the row ``E[i, k]`` over candidate groups ``k``, and per
    image the denominator ``D``. On the fast path (``1/tau <= _FAST_MAX_SCALE``) both are plain
    sums of exponentials (finite in float32, see ``_FAST_MAX_SCALE``) and a chunk's gains cost
    one fused multiply-add per entry, ``1 + E_ik / Z_i``, whose products over the selected
    images are taken in row-halving merges before one ``log`` per column: the sum of logs is the
    log of the product, to float32 rounding of each factor. Otherwise ``log E`` and ``log D``
    are kept and everything runs in log space. Rows grow by doubling, so adding chunks never
    re-copies the whole history.
    """

    def __init__(self, groups: MultiposGroups) -> None:
        self.groups = groups
        self.scale = 1 / groups.temperature
        self.fast = self.scale <= _FAST_MAX_SCALE
        self.sel = torch.empty(0, dtype=torch.long, device=groups.z.device)  # (a,) groups
        self._rows = groups.z.new_empty(0, groups.size)  # (capacity, G)
        self.n_rows = 0  # filled rows: one per image of the selected groups, a m in all
        self.scratch = _Scratch()
        if self.fast:
            self.images_mm = _mm_operand(groups.images, groups.precision)
            self.den = torch.zeros_like(groups.log_own)  # (G, m) D_i
            self.own_exp = groups.log_own.exp()  # (G, m) O_i
            self.max_e = 0.0  # the largest entry of E so far: bounds the merged products
            self.ones_m = groups.z.new_ones(groups.m)
        else:
            self.log_den = torch.full_like(groups.log_own, -math.inf)  # (G, m) log D_i

    def scores(self) -> Tensor:
        gr = self.groups
        if self.sel.numel() == 0:
            return gr.example_losses()  # a group alone has (almost) no loss: see the class doc
        rows = self._rows[:self.n_rows]
        if not self.fast:
            log_z = torch.logaddexp(self.log_den, gr.log_own)  # (G, m) log Z_i against A
            own = (log_z - gr.pos_mean).sum(dim=1)  # (G,) k's anchors against A + k
            log_z_sel = log_z[self.sel].reshape(-1, 1)  # (a m, 1), rows ordered as the E rows
            return own + F.softplus(rows - log_z_sel).sum(dim=0)  # log(1 + E / Z) summed
        z = self.den + self.own_exp  # (G, m) Z_i against A
        own = (z.log() - gr.pos_mean).sum(dim=1)  # (G,) k's anchors against A + k
        inv = z[self.sel].reshape(-1, 1).reciprocal_()  # (a m, 1) 1 / Z_i, as the E rows
        f = torch.mul(rows, inv, out=self.scratch.get("factors", rows.shape, rows)).add_(1)
        # sum_i log f_i = log prod_i f_i: rows multiplied pairwise while the largest factor
        # keeps the products finite
        merges = _merge_count(math.log1p(self.max_e * float(inv.max())), _MAX_PRODUCT_MERGES)
        f = _fold_rows(f, merges, lambda upper, lower: upper.mul_(lower))
        return own + f.log_().sum(dim=0)

    def _append(self, rows: Tensor) -> None:
        need = self.n_rows + rows.shape[0]
        if need > self._rows.shape[0]:
            grown = rows.new_empty(max(need, 2 * self._rows.shape[0]), rows.shape[1])
            grown[:self.n_rows] = self._rows[:self.n_rows]
            self._rows = grown
        self._rows[self.n_rows:need] = rows
        self.n_rows = need

    def add(self, chunk: Tensor) -> None:
        gr = self.groups
        g, m, scale = gr.size, gr.m, self.scale
        per = max(1, _ROW_BLOCK // m)  # whole groups per row block
        for start in range(0, chunk.numel(), per):
            cg = chunk[start:start + per]  # (c,) groups of this block
            c = cg.numel()
            x = gr.z[cg].reshape(c * m, -1)  # (c m, d) their images
            own = (torch.arange(c, device=cg.device), slice(None), cg)  # each image's own group
            if self.fast:  # plain exps, no per-row maximum (see _FAST_MAX_SCALE)
                e = _mm_into(self.scratch.get("e", (c * m, g * m), x),
                             _mm_operand(x * scale, gr.precision), self.images_mm.T,
                             self.scratch, "e_mm").exp_()  # (c m, G m)
                rows = e.view(-1, g, m) @ self.ones_m  # (c m, G) E (a GEMV: faster than sum)
                self.max_e = max(self.max_e, float(rows.max()))
                self._append(rows)
                e.view(c, m, g, m)[own] = 0
                self.den += e.sum(dim=0).view(g, m)
            else:
                s = (x * scale) @ gr.images.T  # (c m, G m) s[chunk image, j]
                self._append(torch.logsumexp(s.view(-1, g, m), dim=2))  # (c m, G) log E
                s.view(c, m, g, m)[own] = -math.inf
                self.log_den = torch.logaddexp(self.log_den,
                                               torch.logsumexp(s, dim=0).view(g, m))
        self.sel = torch.cat([self.sel, chunk])


# ---------------------------------------------------------------------------------------------
# Dense pair matrices


@torch.no_grad()
def sigmoid_pair_loss(img: Tensor, txt: Tensor, t: float, b: float) -> Tensor:
    """[B, B] SigLIP pair losses (exactly decomposable, see :class:`SigmoidPairs`): the
    unreduced :func:`synrep.losses.siglip.siglip_loss` of this process's examples."""
    _check_embeddings(("img", "txt"), img, txt)
    t = _check_temperature("t (sigmoid logit scale)", t)
    if not math.isfinite(b):
        raise ValueError(f"b (sigmoid bias) must be finite, got {b!r}")
    return siglip_loss(img, txt, t, float(b), reduction="none", gather=False)


@torch.no_grad()
def multipos_pair_loss(z: Tensor, group_ids: Tensor, temperature: float) -> Tensor:
    """[B, B] multi-positive pair losses; see :class:`MultiposPairs` for the approximation."""
    return MultiposPairs(z, group_ids, temperature).dense()


@torch.no_grad()
def softmax_pair_loss(img: Tensor, txt: Tensor, temperature: float) -> Tensor:
    """[B, B] frozen-denominator CLIP pair losses: diagonal, each example's super-batch loss.

    With the softmax denominators frozen at the super-batch, a CLIP loss has positive terms only
    on the diagonal, so this matrix carries no interaction between examples: joint sampling on it
    is independent sampling. Use :class:`SoftmaxPairs` with :func:`joint_sample_from_embeddings`
    to recompute the conditional gains on the selected set.
    """
    return torch.diag_embed(SoftmaxPairs(img, txt, temperature).per_example)


def softmax_batch_loss(img: Tensor, txt: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """The symmetric CLIP loss (mean over the batch) of the examples ``idx`` (n,): the loss of
    :func:`synrep.losses.clip.clip_loss` at scale ``1 / temperature``. Scalar."""
    _check_embeddings(("img", "txt"), img, txt)
    temperature = _check_temperature("temperature", temperature)
    return clip_loss(img.detach()[idx], txt.detach()[idx], 1 / temperature, gather=False)


def multipos_group_loss(z: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """``T(A)`` of :class:`MultiposGroups` for the groups ``idx`` (a,), written out densely.

    The multi-positive loss summed over the anchors of the selected groups' images (each anchor's
    log-sum-exp runs over the other selected images, its positives are its group-mates):
    :func:`synrep.losses.multipos.multipos_loss` with ``reduction="sum"``. Builds the
    ``(a m, a m)`` similarity matrix: small inputs and tests only. Scalar; 0 for no groups.
    """
    _check_groups("z", z)
    temperature = _check_temperature("temperature", temperature)
    if idx.ndim != 1 or idx.is_floating_point() or idx.unique().numel() != idx.numel():
        raise ValueError(f"idx must be a [a] vector of distinct group indices, got "
                         f"{idx.dtype} of shape {tuple(idx.shape)}")
    zs = _as_float_groups(z)[idx.long()]  # (a, m, d)
    a, m, d = zs.shape
    if a == 0:
        return zs.new_zeros(())
    group = torch.arange(a, device=zs.device).repeat_interleave(m)
    return multipos_loss(zs.reshape(a * m, d), group, temperature, reduction="sum", gather=False)


# ---------------------------------------------------------------------------------------------
# Sampling


def _gumbel_top_k(logits: Tensor, k: int, generator: torch.Generator | None, greedy: bool,
                  owner: Tensor | None = None, remaining: Tensor | None = None) -> Tensor:
    """``k`` indices without replacement from ``softmax(logits)`` (Plackett-Luce). (k,).

    The top ``k`` of ``logits + Gumbel noise``; ``greedy`` takes the top ``k`` of ``logits``.
    ``-inf`` logits are never taken. With ``owner`` (B,) and ``remaining`` (W,), at most
    ``remaining[w]`` indices with owner ``w`` are taken: walking down the sorted keys and skipping
    full owners is sequential softmax sampling with those owners' items removed.
    """
    keys = logits
    if not greedy:
        u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype,
                       device=logits.device)
        keys = logits - torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))
    if owner is None or remaining is None:
        return torch.topk(keys, k).indices
    order = torch.argsort(keys, descending=True, stable=True)  # (B,)
    own = owner[order]
    nth = F.one_hot(own, remaining.numel()).cumsum(dim=0).gather(1, own[:, None])[:, 0]  # (B,)
    ok = (nth <= remaining[own]) & torch.isfinite(keys[order])
    return order[ok][:k]


def _blocked_sample(terms: list[tuple[float, Tracker]], size: int, b: int, n_chunks: int,
                    generator: torch.Generator | None, temperature: float, greedy: bool,
                    device: torch.device, owner: Tensor | None = None,
                    quota: Tensor | None = None) -> Tensor:
    """The JEST loop over chunks; ``terms`` are (coefficient, tracker) summed into the score.

    Every chunk draws exactly B uniforms from ``generator`` whatever is already selected, so
    the dense and block paths, and every rank, consume the generator identically.
    """
    _check_counts(size, b, n_chunks)
    temperature = _check_temperature("temperature", temperature)
    taken = torch.zeros(size, dtype=torch.bool, device=device)  # (B,)
    remaining = None if quota is None else quota.clone()
    picks = []
    sizes = chunk_sizes(b, n_chunks)
    for n, c in enumerate(sizes):
        g = terms[0][0] * terms[0][1].scores()  # (B,) conditional gains
        for coef, tr in terms[1:]:
            g = g + coef * tr.scores()
        if not torch.isfinite(g[~taken]).all():
            raise ValueError("selection scores contain NaN or inf (check the embeddings)")
        logits = (g / temperature).masked_fill(taken, -math.inf)
        chunk = _gumbel_top_k(logits, c, generator, greedy, owner, remaining)
        taken[chunk] = True
        if remaining is not None and owner is not None:
            remaining -= torch.bincount(owner[chunk], minlength=remaining.numel())
        picks.append(chunk)
        if n + 1 < len(sizes):
            for _, tr in terms:
                tr.add(chunk)
    return torch.cat(picks)


@torch.no_grad()
def joint_sample(scores: Tensor, b: int, n_chunks: int,
                 generator: torch.Generator | None = None, *, temperature: float = 1.0,
                 greedy: bool = False) -> Tensor:
    """Blocked sequential JEST sampling of ``b`` examples from a dense [B, B] score matrix.

    Chunk sizes are :func:`chunk_sizes` (the first ``b % n_chunks`` chunks get one extra). Each
    chunk is a Gumbel-top-k draw from ``softmax(g / temperature)`` over the unselected examples
    (``greedy``: the top of ``g``), ``g`` the diagonal for the first chunk and
    :func:`conditional_scores` after. ``n_chunks = 1`` is :func:`independent_sample` on the
    diagonal. Returns the selected indices (b,) in the order drawn.
    """
    pairs = _DensePairs(scores)
    return _blocked_sample([(1.0, pairs.tracker())], pairs.size, b, n_chunks, generator,
                           temperature, greedy, scores.device)


@torch.no_grad()
def independent_sample(per_example: Tensor, b: int, generator: torch.Generator | None = None,
                       *, temperature: float = 1.0, greedy: bool = False) -> Tensor:
    """``b`` examples without replacement from ``softmax(per_example / temperature)`` (B,).

    ``greedy`` is RHO-LOSS's top-``b``. Returns indices (b,), best key first.
    """
    if per_example.ndim != 1 or not torch.isfinite(per_example).all():
        raise ValueError(f"per_example scores must be a finite [B] vector, got shape "
                         f"{tuple(per_example.shape)}")
    _check_counts(per_example.shape[0], b, 1)
    temperature = _check_temperature("temperature", temperature)
    return _gumbel_top_k(per_example / temperature, b, generator, greedy)


def _score_terms(learner: PairScores | None, reference: PairScores | None,
                 score: Score) -> tuple[list[tuple[float, PairScores]], int]:
    c_learner, c_reference = _check_score(score)
    terms = []
    for name, coef, pairs in (("learner", c_learner, learner),
                              ("reference", c_reference, reference)):
        if coef == 0:
            continue
        if pairs is None:
            raise ValueError(f"score {score!r} needs the {name}'s pair losses, got None")
        terms.append((coef, pairs))
    sizes = {p.size for _, p in terms}
    if len(sizes) > 1:
        raise ValueError(f"learner and reference must score the same super-batch, got sizes "
                         f"{learner.size if learner else None} and "
                         f"{reference.size if reference else None}")
    return terms, sizes.pop()


@torch.no_grad()
def joint_sample_from_embeddings(learner: PairScores | None, reference: PairScores | None,
                                 b: int, n_chunks: int,
                                 generator: torch.Generator | None = None, *,
                                 score: Score = "learnability", temperature: float = 1.0,
                                 greedy: bool = False) -> Tensor:
    """:func:`joint_sample` without the dense matrix: memory O(B d + B b).

    ``learner`` / ``reference`` are pair-loss objects built from the super-batch embeddings of
    each model (:class:`SigmoidPairs`, :class:`MultiposPairs`, :class:`SoftmaxPairs`,
    :class:`MultiposGroups`; the one a score does not use may be None; indices are groups for
    :class:`MultiposGroups`). The score is ``c_l * learner + c_r * reference`` with (1, -1) for
    learnability, (1, 0) hard learner, (0, -1) easy reference, applied to the conditional gains
    (additive pairs: running sums of the selected chunks' rows and columns; :class:`SoftmaxPairs`
    and :class:`MultiposGroups`: exact gains recomputed against the selected set). With additive
    pairs and the same generator it selects what :func:`joint_sample` selects on the dense score
    matrix (up to rounding on exact near-ties). Returns indices (b,).
    """
    terms, size = _score_terms(learner, reference, score)
    return _blocked_sample([(c, p.tracker()) for c, p in terms], size, b, n_chunks, generator,
                           temperature, greedy, terms[0][1].device)


class GlobalSelection(NamedTuple):
    indices: Tensor  # (b,) into the gathered super-batch (rank-major: rank r owns [r n, (r+1) n))
    local: Tensor  # (b_r,) this rank's selected examples as local indices, in selection order


def _check_same_size_on_ranks(n: int) -> None:
    if world_size() == 1:
        return
    sizes = torch.tensor([n, -n])
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    if int(sizes[0]) != n or int(-sizes[1]) != n:
        raise ValueError(f"every rank must hold the same number of super-batch examples; this "
                         f"rank has {n}, others between {int(-sizes[1])} and {int(sizes[0])}")


@torch.no_grad()
def global_joint_sample(learner: PairScores | None, reference: PairScores | None, b: int,
                        n_chunks: int, generator: torch.Generator, *,
                        score: Score = "learnability", temperature: float = 1.0,
                        greedy: bool = False, balance: bool = False) -> GlobalSelection:
    """Select ``b`` examples jointly from the super-batch spread over all ranks.

    ``learner`` / ``reference`` hold this rank's ``n`` examples (the same ``n`` on every rank;
    caption groups for :class:`MultiposGroups`, whose indices then count groups);
    their embeddings (and group ids) are all-gathered, and every rank runs the same selection on
    the global ``B = world * n``, so ``generator`` must be seeded identically on every rank (for
    example with ``seed + step``); differing choices raise ``RuntimeError``. ``b`` counts the
    global selection. ``balance`` gives every rank exactly ``b / world`` examples (chunks skip
    ranks that are full), which a loss gathered with :func:`~synrep.dist.gather_with_grad`
    needs, as it requires equal per-rank batches. In one process this is
    :func:`joint_sample_from_embeddings`.
    """
    if generator is None:
        raise ValueError("global_joint_sample needs a generator seeded identically on every rank")
    terms, n = _score_terms(learner, reference, score)
    world, me = world_size(), rank()
    gathered = [(c, p.gather()) for c, p in terms]
    size = gathered[0][1].size
    device = gathered[0][1].device
    owner = quota = None
    if balance:
        if b % world:
            raise ValueError(f"balance=True needs b divisible by the world size {world}, got "
                             f"b = {b}")
        owner = torch.arange(world, device=device).repeat_interleave(n)  # (B,)
        quota = torch.full((world,), b // world, dtype=torch.long, device=device)
    indices = _blocked_sample([(c, p.tracker()) for c, p in gathered], size, b, n_chunks,
                              generator, temperature, greedy, device, owner, quota)
    if world > 1:
        every = gather_no_grad(indices[None, :])  # (world, b)
        if not (every == indices[None, :]).all():
            raise RuntimeError("ranks selected different examples: seed the selection generator "
                               "identically on every rank")
    mine = (indices >= me * n) & (indices < (me + 1) * n)
    return GlobalSelection(indices, indices[mine] - me * n)


