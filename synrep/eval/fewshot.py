"""Few-shot classification on frozen features (docs/methods.md section 1, "Evaluation protocols").

The low-shot protocol of SimCLR / DINOv2-style evaluations: for each shot count n (1, 5, 10 images
per class) and each of several seeds, draw a class-balanced labelled subset of the training split,
fit L2-regularised logistic regression on it and report test top-1; the result per n is the mean and
spread over seeds. With so few labels there is no validation split to choose the regularisation, so
C is fixed (``c``), and features are standardised with the mean and std of the whole *unlabelled*
training split (labels are never used for it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from synrep.eval.linear import check_probe_inputs, lbfgs_fit, logreg_predict, standardise

__all__ = ["fewshot_indices", "fewshot_probe"]


def fewshot_indices(labels: Tensor, shots: int, seed: int) -> Tensor:
    """Indices of ``shots`` samples of every class in ``labels``, drawn without replacement.

    Deterministic for a given ``seed``; classes are visited in sorted order so the draw does not
    depend on the order of the data. Raises ``ValueError`` when a class has fewer than ``shots``
    samples.

    Returns:
        sorted int64 indices ``[shots * K]``.
    """
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer tensor [N], got {labels.dtype} {tuple(labels.shape)}"
        )
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    labels = labels.cpu()
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls).flatten()
        if len(idx) < shots:
            raise ValueError(
                f"class {int(cls)} has {len(idx)} training samples, fewer than shots={shots}"
            )
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:shots]])
    return torch.cat(picked).sort().values


def fewshot_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    shots: Sequence[int] = (1, 5, 10),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    c: float = 0.01,
    max_iter: int = 200,
    device: str | torch.device = "cpu",
) -> dict:
    """Few-shot logistic regression: mean and spread of test top-1 over seeded class-balanced draws.

    Args:
        train_x: ``[N, D]`` float features of the training split; train_y: ``[N]`` labels.
        test_x: ``[M, D]``; test_y: ``[M]``.
        shots: labelled images per class, each >= 1.
        seeds: one draw per seed (and shot count).
        c: inverse L2 strength of the logistic regression (scikit-learn's C) on standardised
            features.
        max_iter: L-BFGS iterations per fit.
        device: where the fits run.

    Returns:
        ``{str(n): {"mean": %, "std": % (sample std over seeds, 0 for one seed), "min": %,
        "max": %, "runs": [top-1 % per seed]}}`` for every n in ``shots``.
    """
    k = check_probe_inputs(train_x, train_y, test_x, test_y, 0.5)
    shots = [int(n) for n in shots]
    seeds = [int(s) for s in seeds]
    if not shots or min(shots) < 1 or len(set(shots)) != len(shots):
        raise ValueError(f"shots must be distinct integers >= 1, got {shots}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, got {seeds}")
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"c must be a positive finite number, got {c}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")

    # Unlabelled statistics of the whole training split: no labels are used to standardise.
    xtr, xte = standardise(train_x.to(device, torch.float32), test_x.to(device, torch.float32))
    ytr, yte = train_y.to(device, torch.long), test_y.to(device, torch.long)
    out: dict[str, dict] = {}
    bar = tqdm(total=len(shots) * len(seeds), desc="few-shot", unit="fit")
    for n in shots:
        runs = []
        for seed in seeds:
            idx = fewshot_indices(train_y, n, seed).to(device)
            w, b = lbfgs_fit(xtr[idx], ytr[idx], c, k, None, max_iter, 1e-4)
            runs.append(100.0 * float((logreg_predict(xte, w, b) == yte).float().mean()))
            bar.update()
        out[str(n)] = {
            "mean": statistics.fmean(runs),
            "std": statistics.stdev(runs) if len(runs) > 1 else 0.0,
            "min": min(runs),
            "max": max(runs),
            "runs": runs,
        }
        bar.set_postfix({f"{n}-shot": f"{out[str(n)]['mean']:.1f}"})
    bar.close()
    return out
