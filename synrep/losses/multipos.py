"""Multi-positive contrastive loss (StableRep, arXiv 2306.00984; SynCLR, arXiv 2312.17742).

Images generated from the same caption are positives of each other. For every anchor the target
distribution is uniform over its positives (self excluded) and the prediction is the softmax over
similarities to every other sample of the *global* batch. With exactly two samples per label this is
SimCLR's NT-Xent; it equals SupCon's "mean over positives outside the log" form.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from synrep.dist import gather_no_grad, gather_with_grad, rank, world_size

# Large enough that exp(-BIG) underflows to exactly 0 in float32, small enough to stay finite,
# so masked entries never produce 0 * inf = NaN in the cross-entropy.
_BIG = 1e9


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
        n = features.shape[0]
        self_idx = torch.arange(n, device=features.device)  # an anchor is not its own positive
        return multipos_query_key_loss(features, labels, features, labels, self_idx,
                                       self.temperature,
                                       offset_by_rank=not self.cross_rank_positives)


def multipos_query_key_loss(queries: torch.Tensor, query_labels: torch.Tensor,
                            keys: torch.Tensor, key_labels: torch.Tensor,
                            exclude: torch.Tensor, temperature: float | torch.Tensor,
                            offset_by_rank: bool = True) -> torch.Tensor:
    """The multi-positive loss of queries against a separate set of keys (SynCLR, MoCo-style).

    Every query is scored against the keys of the *global* batch; its target is uniform over the
    keys that share its label, except ``exclude[i]`` (the local index of a key to drop from both
    target and softmax, e.g. the key computed from the very same crop; -1 drops none). Keys are
    gathered with gradient when they carry one (the student's own features) and without when
    they do not (an EMA teacher's). Labels are per-rank caption ids, offset by rank unless
    ``offset_by_rank`` is False (global labels that match across ranks).

    With ``keys = queries`` and ``exclude = arange(n)`` this is :class:`MultiPosConLoss`.
    ``temperature`` may be a scalar tensor that carries a gradient (a learned logit scale).

    Shapes: queries [n, d], query_labels [n], keys [k, d], key_labels [k], exclude [n]. Scalar.

    The similarities and the softmax are computed in float32 even under bf16/fp16 autocast: at
    temperature 0.1 a bf16 logit carries an error of about 0.04, enough to blur hard negatives.
    """
    with torch.autocast(queries.device.type, enabled=False):
        return _multipos_query_key_loss(queries, query_labels, keys, key_labels, exclude,
                                        temperature, offset_by_rank)


def _multipos_query_key_loss(queries: torch.Tensor, query_labels: torch.Tensor,
                             keys: torch.Tensor, key_labels: torch.Tensor,
                             exclude: torch.Tensor, temperature: float | torch.Tensor,
                             offset_by_rank: bool) -> torch.Tensor:
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    k_all = gather_with_grad(k) if k.requires_grad else gather_no_grad(k.detach())
    query_labels, key_labels = query_labels.long(), key_labels.long()
    if world_size() > 1 and offset_by_rank:
        span = torch.maximum(query_labels.max(), key_labels.max()).detach().clone() + 1
        dist.all_reduce(span, op=dist.ReduceOp.MAX)
        query_labels = query_labels + rank() * span
        key_labels = key_labels + rank() * span
    labels_all = gather_no_grad(key_labels)  # (K,)

    logits = q @ k_all.T / temperature  # (n, K)
    rows = torch.arange(q.shape[0], device=q.device)
    drop = torch.zeros_like(logits, dtype=torch.bool)
    has = exclude >= 0
    drop[rows[has], exclude[has] + rank() * k.shape[0]] = True
    logits = logits - _BIG * drop
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    pos = (query_labels[:, None] == labels_all[None, :]) & ~drop
    n_pos = pos.sum(dim=1)
    target = pos.float() / n_pos.clamp(min=1)[:, None]
    row_loss = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    n_valid = (n_pos > 0).sum().float()
    if world_size() > 1:
        n_valid = n_valid.clone()
        dist.all_reduce(n_valid)
    return row_loss.sum() * world_size() / n_valid.clamp(min=1)
