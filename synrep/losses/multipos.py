"""Multi-positive contrastive loss (StableRep, arXiv 2306.00984; SynCLR, arXiv 2312.17742).

Images generated from the same caption are positives of each other. For every anchor the target
distribution is uniform over its positives (self excluded) and the prediction is the softmax over
similarities to every other sample of the *global* batch. With exactly two samples per label this is
SimCLR's NT-Xent; it equals SupCon's "mean over positives outside the log" form (Khosla et al.
2020, arXiv 2004.11362, equation 3).

For anchor i with positives P(i) among the other samples A(i) and similarities s = z z^T of the
L2-normalised features:

    l_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / tau) / sum_{a in A(i)} exp(s_ia / tau) )
    L   = mean of l_i over the anchors with |P(i)| >= 1

:func:`multipos_loss` is the functional form with a ``reduction`` (``"sum"``: what JEST's
caption-group scoring uses, :func:`synrep.selection.jest.multipos_group_loss`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from synrep.dist import gather_no_grad, gather_with_grad, rank, world_size

# Large enough that exp(-BIG) underflows to exactly 0 in float32, small enough to stay finite,
# so masked entries never produce 0 * inf = NaN in the cross-entropy.
_BIG = 1e9

Reduction = Literal["mean", "sum", "none"]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class MultiPosConLoss(nn.Module):
    """Cross-entropy between a uniform target over positives and the softmax of similarities.

    Args:
        temperature: softmax temperature tau (StableRep 0.1, SynCLR 0.08, SimCLR 0.1-0.5).
        cross_rank_positives: if False (the default, StableRep's convention) labels are local to
            each rank and are offset by rank, so samples on different ranks are never positives;
            if True, labels are global (for example class labels) and match across ranks.

    Shapes:
        features: [N, d] (L2-normalised inside), labels: [N] integer ids. Returns a scalar.

    Rows whose label occurs once have no positive; they are left out of the mean (a batch with no
    positive at all gives a zero loss that still carries a graph). Under ``torch.distributed`` the
    features are gathered with gradient and the mean is taken over the global batch, so DDP's
    gradient averaging reproduces one process over the concatenated batch exactly.

    Example:
        >>> loss_fn = MultiPosConLoss(temperature=0.1)
        >>> z = torch.randn(8, 16, requires_grad=True)
        >>> loss = loss_fn(z, torch.tensor([0, 0, 1, 1, 2, 2, 2, 3]))
    """

    def __init__(self, temperature: float = 0.1, cross_rank_positives: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.cross_rank_positives = cross_rank_positives

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2:
            raise ValueError(f"features must be [N, d], got shape {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(
                f"labels must be [N] = [{features.shape[0]}], got shape {tuple(labels.shape)}"
            )
        return multipos_loss(features, labels, self.temperature, self.cross_rank_positives)


def multipos_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float,
                  cross_rank_positives: bool = False, reduction: Reduction = "mean",
                  gather: bool = True) -> torch.Tensor:
    """:class:`MultiPosConLoss` as a function, with a ``reduction``.

    ``features`` [n, d] (normalised inside), ``labels`` [n]. ``reduction``: ``"mean"`` (the
    module's loss: mean over the anchors of the global batch that have a positive), ``"sum"``
    (sum of this rank's anchor losses) or ``"none"`` (the [n] anchor losses ``l_i`` of this rank,
    0 for an anchor without a positive). With ``gather=False`` this rank's samples are the whole
    batch, also under ``torch.distributed``.
    """
    n = features.shape[0]
    self_idx = torch.arange(n, device=features.device)  # an anchor is not its own positive
    return multipos_query_key_loss(features, labels, features, labels, self_idx, temperature,
                                   offset_by_rank=not cross_rank_positives, reduction=reduction,
                                   gather=gather)


def multipos_query_key_loss(queries: torch.Tensor, query_labels: torch.Tensor,
                            keys: torch.Tensor, key_labels: torch.Tensor,
                            exclude: torch.Tensor, temperature: float | torch.Tensor,
                            offset_by_rank: bool = True, reduction: Reduction = "mean",
                            gather: bool = True) -> torch.Tensor:
    """The multi-positive loss of queries against a separate set of keys (SynCLR, MoCo-style).

    Every query is scored against the keys of the *global* batch; its target is uniform over the
    keys that share its label, except ``exclude[i]`` (the local index of a key to drop from both
    target and softmax, e.g. the key computed from the very same crop; -1 drops none). Keys are
    gathered with gradient when they carry one (the student's own features) and without when
    they do not (an EMA teacher's). Labels are per-rank caption ids, offset by rank unless
    ``offset_by_rank`` is False (global labels that match across ranks).

    With ``keys = queries`` and ``exclude = arange(n)`` this is :class:`MultiPosConLoss`.
    ``temperature`` may be a scalar tensor that carries a gradient (a learned logit scale).

    Shapes: queries [n, d], query_labels [n], keys [k, d], key_labels [k], exclude [n]. Returns
    a scalar; with ``reduction="sum"`` the sum of this rank's query losses, with ``"none"`` the
    [n] query losses (0 for a query without a positive). ``gather=False``: keys of this rank
    only, labels as given (no offset), also under ``torch.distributed``.

    The similarities and the softmax are computed in float32 even under bf16/fp16 autocast: at
    temperature 0.1 a bf16 logit carries an error of about 0.04, enough to blur hard negatives.
    Float64 inputs stay float64.
    """
    _check_reduction(reduction)
    with torch.autocast(queries.device.type, enabled=False):
        return _multipos_query_key_loss(queries, query_labels, keys, key_labels, exclude,
                                        temperature, offset_by_rank, reduction, gather)


def _multipos_query_key_loss(queries: torch.Tensor, query_labels: torch.Tensor,
                             keys: torch.Tensor, key_labels: torch.Tensor,
                             exclude: torch.Tensor, temperature: float | torch.Tensor,
                             offset_by_rank: bool, reduction: Reduction,
                             gather: bool) -> torch.Tensor:
    q = F.normalize(_at_least_float32(queries), dim=1)
    k = F.normalize(_at_least_float32(keys), dim=1)
    world, me = (world_size(), rank()) if gather else (1, 0)
    if gather:
        k_all = gather_with_grad(k) if k.requires_grad else gather_no_grad(k.detach())
    else:
        k_all = k
    query_labels, key_labels = query_labels.long(), key_labels.long()
    if world > 1 and offset_by_rank:
        span = torch.maximum(query_labels.max(), key_labels.max()).detach().clone() + 1
        dist.all_reduce(span, op=dist.ReduceOp.MAX)
        query_labels = query_labels + me * span
        key_labels = key_labels + me * span
    labels_all = gather_no_grad(key_labels) if gather else key_labels  # (K,)

    logits = q @ k_all.T / temperature  # (n, K)
    rows = torch.arange(q.shape[0], device=q.device)
    drop = torch.zeros_like(logits, dtype=torch.bool)
    has = exclude >= 0
    drop[rows[has], exclude[has] + me * k.shape[0]] = True
    logits = logits - _BIG * drop
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    pos = (query_labels[:, None] == labels_all[None, :]) & ~drop
    n_pos = pos.sum(dim=1)
    target = pos.to(logits.dtype) / n_pos.clamp(min=1)[:, None]
    row_loss = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    n_valid = (n_pos > 0).sum().float()
    if world > 1:
        n_valid = n_valid.clone()
        dist.all_reduce(n_valid)
    return row_loss.sum() * world / n_valid.clamp(min=1)
