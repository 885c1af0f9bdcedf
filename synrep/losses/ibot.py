"""iBOT masked image modelling (Zhou et al. 2022, arXiv 2111.07832) with Sinkhorn-Knopp targets.

The student sees global crops with some patch embeddings replaced by a mask token and predicts,
at every masked position, the teacher's distribution over prototypes for the unmasked crop. The
teacher's distribution is not a softmax with a centre (DINO, iBOT) but the Sinkhorn-Knopp
equipartition of its scores (SwAV; DINOv2, which SynCLR follows): every prototype receives the same
share of the masked tokens of the global batch. Sums run over all ranks, so N processes compute
exactly what one process computes on the concatenated batch.

Shapes: ``scores`` / ``student`` / ``targets`` [n, K] for the n masked tokens of this rank and K
prototypes, ``image_of_token`` [n] (each token's crop among ``n_images``). Example:

    >>> teacher, student = torch.randn(20, 16), torch.randn(20, 16, requires_grad=True)
    >>> targets = sinkhorn_knopp(teacher, temperature=0.05)  # (20, 16), rows sum to 1
    >>> loss = ibot_loss(student, targets, torch.arange(20) // 5, n_images=4, temperature=0.1)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from synrep.dist import world_size


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temperature: float, iters: int = 3) -> torch.Tensor:
    """Teacher targets: (n, K) scores -> (n, K) rows that sum to 1, columns balanced globally.

    ``Q = exp(scores / temperature)``, then ``iters`` rounds of: scale every prototype (column) to
    total mass 1/K over the global batch, scale every token (row) to mass 1/N. Returned rows are
    rescaled to sum to 1. Works in float64 with the global maximum subtracted, so low teacher
    temperatures cannot overflow. With zero rows anywhere (no masked tokens) it returns (0, K).
    """
    q = scores.double() / temperature
    top = q.max() if q.numel() else q.new_tensor(-torch.inf)
    top = top.clone()
    if world_size() > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp(q - top).T  # (K, n)
    k_protos = q.shape[0]
    n_total = _all_reduce(torch.tensor(float(q.shape[1]), dtype=q.dtype, device=q.device))
    if n_total == 0:
        return scores.new_zeros(scores.shape)
    q = q / _all_reduce(q.sum()).clamp(min=1e-300)
    for _ in range(iters):
        q = q / _all_reduce(q.sum(dim=1, keepdim=True)).clamp(min=1e-300) / k_protos
        q = q / q.sum(dim=0, keepdim=True).clamp(min=1e-300) / n_total
    q = q * n_total
    return q.T.to(scores.dtype)


def ibot_loss(student: torch.Tensor, targets: torch.Tensor, image_of_token: torch.Tensor,
              n_images: int, temperature: float) -> torch.Tensor:
    """Cross-entropy of the student's masked-token predictions against the teacher's targets.

    ``student`` (n, K) scores and ``targets`` (n, K) distributions of the n masked tokens of this
    rank; ``image_of_token`` (n,) the local index of each token's crop among ``n_images``. As in
    iBOT, the loss is averaged over the masked tokens of each crop, then over the masked crops of
    the global batch. Returns a scalar (0 with a graph when no token is masked anywhere).
    """
    per_token = -(targets * F.log_softmax(student.float() / temperature, dim=-1)).sum(dim=-1)
    counts = torch.zeros(n_images, device=student.device).index_add_(
        0, image_of_token, torch.ones_like(per_token))
    weights = 1.0 / counts.clamp(min=1)[image_of_token]
    n_masked = _all_reduce((counts > 0).sum().float())
    return (per_token * weights).sum() * world_size() / n_masked.clamp(min=1)
