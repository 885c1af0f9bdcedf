"""Linear probes on frozen features (docs/methods.md section 1, "Evaluation protocols").

Two protocols, both selecting their hyper-parameter on a validation split carved from train:

- :func:`lbfgs_probe`: L2-regularised multinomial logistic regression fitted by L-BFGS, the
  fine-grained protocol of SynCLR (after CLIP): C swept over log-spaced values, best C by validation
  accuracy, refit on all of train. The objective is scikit-learn's ``LogisticRegression(C=c)``.
- :func:`sgd_probe_grid`: the DINOv2 linear protocol: many linear heads, one per learning rate,
  trained together in one pass over the features (SGD, momentum 0.9, cosine schedule).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["fit_logreg", "lbfgs_probe", "pool_columns", "sgd_probe_grid", "stratified_split"]

log = logging.getLogger(__name__)

# Rows per block when L-BFGS evaluates the loss on the CPU: the block stays in cache between the
# forward (logits) and backward (gradient) matmuls, so the features are read from memory once per
# evaluation instead of twice (measured ~1.3x faster on 48k x 1536 than one big matmul each way).
_CPU_BLOCK_ROWS = 1024


# ----------------------------------------------------------------------------- shared helpers


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush float32 denormals to zero on the CPU while a probe trains.

    Confident heads produce softmax probabilities below 1e-38, and CPU arithmetic on such
    denormal numbers is very slow: without this the SGD probe on 54k x 1536 features ran 4x
    slower (42 s vs 10 s) with identical results. torch has no getter for the mode, so it is
    switched back off (its default) afterwards.
    """
    enabled = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def stratified_split(labels: Tensor, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Split sample indices into (fit, val), taking ``round(val_fraction * n_c)`` of each class.

    Deterministic for a given ``seed``. Every class keeps at least one sample in the fit part (a
    class with a single sample goes to fit only).

    Args:
        labels: integer class labels ``[N]``.
        val_fraction: share of each class held out, in ``(0, 1)``.
        seed: seed of the per-class shuffles.

    Returns:
        sorted int64 index tensors ``fit [N - V]`` and ``val [V]``.
    """
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer tensor [N], got {labels.dtype} {tuple(labels.shape)}"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = labels.cpu()
    gen = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for cls in torch.unique(labels):  # sorted, so the generator is consumed in a fixed order
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = min(math.floor(val_fraction * len(idx) + 0.5), len(idx) - 1)
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    val_idx = torch.cat(val).sort().values
    if len(val_idx) == 0:
        raise ValueError(
            f"val_fraction={val_fraction} of {len(labels)} samples leaves an empty validation "
            "split; use a larger val_fraction or more training samples"
        )
    return torch.cat(fit).sort().values, val_idx


def _check_xy(x: Tensor, y: Tensor, xname: str, yname: str) -> None:
    if x.ndim != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"{xname} must be float features [N, D], got {x.dtype} {tuple(x.shape)}")
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{yname} must be integer labels [N], got {y.dtype} {tuple(y.shape)}")
    if len(x) != len(y):
        raise ValueError(f"{xname} has {len(x)} rows but {yname} has {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{xname} is empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{xname} contains NaN or inf; fix the features before probing")
    if int(y.min()) < 0:
        raise ValueError(f"{yname} has negative label {int(y.min())}; labels must be 0..K-1")


def check_probe_inputs(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, val_fraction: float
) -> int:
    """Validate a probe's inputs; return the number of classes."""
    _check_xy(train_x, train_y, "train_x", "train_y")
    _check_xy(test_x, test_y, "test_x", "test_y")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x has {train_x.shape[1]} features but test_x has {test_x.shape[1]}"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return int(max(train_y.max(), test_y.max())) + 1


def _check_grid(name: str, values: Sequence[float]) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{name} is empty; give at least one value")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be positive finite numbers, got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values}")
    return values


def standardise(ref: Tensor, *others: Tensor) -> list[Tensor]:
    """Standardise ``ref [N, D]`` and ``others`` with ``ref``'s per-feature mean and std.

    Like scikit-learn's ``StandardScaler``: population std, and constant features (std at the
    float32 rounding level of their mean, or 0) are only centred (std taken as 1), not blown up.
    Returns new tensors; the inputs are left untouched.
    """
    var, mean = torch.var_mean(ref, dim=0, correction=0)
    std = var.sqrt()
    std = torch.where(std > 1e-6 * mean.abs(), std, torch.ones_like(std))
    return [(t - mean) / std for t in (ref, *others)]


def _accuracy(pred: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((pred == y).float().mean())


# ----------------------------------------------------------------------------- L-BFGS logistic


def _logreg_loss_grad(
    x: Tensor, y: Tensor, w: Tensor, b: Tensor, reg: float, block: int,
    penalty: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``mean_i CE_i + reg/2 ||w||^2`` and its gradients, computed block by block over rows.

    Shapes: ``x [N, D]``, ``y [N]``, ``w [D, K]``, ``b [K]``. Returns a float64 scalar loss (summed
    in float64 so L-BFGS's line search sees a smooth function) and gradients ``[D, K]``, ``[K]``.
    ``penalty [D, 1]`` weights the penalty per row of ``w``: ``reg/2 sum_j penalty_j ||w_j||^2``.
    """
    n = len(x)
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    gw_t = torch.zeros(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device)  # [K, D]
    gb = torch.zeros_like(b)
    for s in range(0, n, block):
        xb, yb = x[s : s + block], y[s : s + block]
        z = torch.addmm(b, xb, w)  # (B, K) logits
        lse = torch.logsumexp(z, dim=1)
        loss += (lse.sum() - z.gather(1, yb[:, None]).sum()).double()
        p = torch.exp(z - lse[:, None])  # softmax; dCE/dz = p - onehot(y)
        p[torch.arange(len(yb), device=p.device), yb] -= 1.0
        gw_t.addmm_(p.T, xb)  # (K, D): this layout is the fast one for the CPU GEMM
        gb += p.sum(0)
    if penalty is None:
        loss = loss / n + 0.5 * reg * float(w.double().square().sum())
        return loss, (gw_t.T / n + reg * w).contiguous(), gb / n
    loss = loss / n + 0.5 * reg * float((w.double().square() * penalty.double()).sum())
    return loss, (gw_t.T / n + reg * penalty * w).contiguous(), gb / n


def fit_logreg(
    x: Tensor,
    y: Tensor,
    c: float,
    *,
    num_classes: int | None = None,
    init: tuple[Tensor, Tensor] | None = None,
    max_iter: int = 200,
    tol: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """Fit L2-regularised multinomial logistic regression by L-BFGS (strong-Wolfe line search).

    Minimises ``sum_i CE(x_i W + b, y_i) + ||W||^2 / (2 c)`` (bias unregularised), the objective
    of scikit-learn's ``LogisticRegression(C=c)``, scaled by ``1/N`` as scikit-learn also does
    internally: ``mean_i CE_i + ||W||^2 / (2 c N)``. Runs in ``x``'s dtype and on its device; the
    features are used as given (standardise them first). With at least twice as many rows as
    columns it runs whitened (:class:`Whitening`): the same objective, far fewer iterations.

    Args:
        x: features ``[N, D]``.
        y: labels ``[N]`` in ``0..K-1``.
        c: inverse regularisation strength (> 0).
        num_classes: K; defaults to ``y.max() + 1``.
        init: warm start ``(W [D, K], b [K])``; zeros otherwise.
        max_iter: L-BFGS iterations at most.
        tol: stop when the largest absolute gradient entry of the scaled objective is below it
            (the meaning and default of scikit-learn's ``tol``).

    Returns:
        ``W [D, K]`` and ``b [K]``. ``b`` sums to zero, like scikit-learn's symmetric
        parametrisation (the gradient of ``b`` sums to zero, so its mean stays at its start, 0).
    """
    _check_xy(x, y, "x", "y")
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"c must be a positive finite number, got {c}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    k = int(y.max()) + 1 if num_classes is None else num_classes
    if int(y.max()) >= k:
        raise ValueError(f"label {int(y.max())} is out of range for num_classes={k}")
    d = x.shape[1]
    if init is not None and (init[0].shape != (d, k) or init[1].shape != (k,)):
        raise ValueError(
            f"init must be (W [{d}, {k}], b [{k}]), got {tuple(init[0].shape)}, "
            f"{tuple(init[1].shape)}"
        )
    white = Whitening(x) if whitening_pays(x) else None
    return lbfgs_fit(x, y.to(x.device), c, k, init, max_iter, tol, white)


class Whitening:
    """An exact preconditioner for :func:`lbfgs_fit` on features ``x [N, D]``.

    Standardised features are strongly correlated (a ViT's CLS and mean tokens of its last
    blocks): the eigenvalues of their covariance span ~6 orders of magnitude, and L-BFGS on such
    an ill-conditioned problem stops at ``max_iter`` far from the optimum (the quickstart's probe
    lost 0.5 points of test accuracy that way, and its C sweep chose C by how far each fit got).
    The fit therefore runs in whitened coordinates ``W = P W'`` with ``P = V diag(lam)^-1/2``
    from the covariance's eigendecomposition; the penalty ``||W||^2`` becomes
    ``sum_j ||W'_j||^2 / lam_j``, so the objective and its optimum are exactly the ones of the
    unwhitened problem, reached in a few dozen iterations instead of hundreds.
    """

    def __init__(self, x: Tensor, floor: float = 1e-6) -> None:
        cov = (x.T @ x).double() / len(x)  # standardised features: mean 0
        lam, v = torch.linalg.eigh(cov)
        lam = lam.clamp(min=float(lam.max()) * floor)  # rank-deficient directions stay finite
        self.v = v.to(x.dtype)
        self.sqrt_lam = lam.sqrt().to(x.dtype)
        self.inv_lam = (1.0 / lam).to(x.dtype)
        self.x = x @ (self.v / self.sqrt_lam)  # x P

    def to_white(self, w: Tensor) -> Tensor:  # W -> W' = diag(lam)^1/2 V^T W
        return (self.v.T @ w) * self.sqrt_lam[:, None]

    def from_white(self, w: Tensor) -> Tensor:  # W' -> W = V diag(lam)^-1/2 W'
        return self.v @ (w / self.sqrt_lam[:, None])


def whitening_pays(x: Tensor) -> bool:
    """Whether :class:`Whitening` is worth building for ``x``: at least twice as many rows as
    columns (else the covariance is mostly null space), on a CPU at most 4,096 columns (its cost
    grows as N D^2: ~1 s at 60,000 x 1,536 on 2 cores), and at most 2^28 entries, since it keeps
    a whitened copy of ``x`` (1 GiB in float32; larger feature sets take the plain fit)."""
    n, d = x.shape
    return n >= 2 * d and n * d <= 2**28 and (d <= 4096 or x.device.type != "cpu")


def lbfgs_fit(
    x: Tensor,
    y: Tensor,
    c: float,
    k: int,
    init: tuple[Tensor, Tensor] | None,
    max_iter: int,
    tol: float,
    white: Whitening | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`fit_logreg` without the argument checks (the probe checks once, not once per C).
    With ``white`` (a :class:`Whitening` of ``x``) the same objective is minimised in whitened
    coordinates, and ``tol`` applies to the gradient there."""
    d = x.shape[1]
    if init is None:
        w = torch.zeros(d, k, dtype=x.dtype, device=x.device)
        b = torch.zeros(k, dtype=x.dtype, device=x.device)
    else:
        w = init[0].detach().to(x).clone()
        b = init[1].detach().to(x).clone()
        b -= b.mean()
    xw = x
    penalty = None  # per-row weight of the L2 penalty on w (None: 1)
    if white is not None:
        xw, penalty = white.x, white.inv_lam[:, None]
        w = white.to_white(w)
    w.requires_grad_(True)
    b.requires_grad_(True)
    reg = 1.0 / (c * len(x))
    block = _CPU_BLOCK_ROWS if x.device.type == "cpu" else len(x)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        with torch.no_grad():  # gradients are analytic: no autograd graph over N x D
            loss, gw, gb = _logreg_loss_grad(xw, y, w, b, reg, block, penalty)
        w.grad, b.grad = gw, gb
        return loss

    with flush_denormals():
        opt.step(closure)
    state = opt.state[w]
    log.debug(
        "fit_logreg C=%g: %d iterations, %d loss evaluations",
        c,
        state["n_iter"],
        state["func_evals"],
    )
    w = w.detach()
    return (white.from_white(w) if white is not None else w), b.detach()


def logreg_predict(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return torch.addmm(b, x, w).argmax(1)


def lbfgs_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    cs: Sequence[float],
    val_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 200,
    tol: float = 1e-4,
    device: str | torch.device = "cpu",
) -> dict:
    """L-BFGS logistic-regression probe with C chosen on a validation split (SynCLR fine-grained).

    1. Carve a stratified, seeded validation split (``val_fraction`` of each class) from train.
    2. Standardise with the fit part's mean/std; fit :func:`fit_logreg` for every C, sorted from
       strongest to weakest regularisation, each warm-started from the previous solution.
    3. Pick the C with the best validation top-1 (ties: the stronger regularisation).
    4. Re-standardise with all of train, refit with that C (warm-started), report test top-1.

    SynCLR sweeps 45 log-spaced C in ``[1e-6, 1e5]``. Runs in float32 on ``device``.

    Args:
        train_x: ``[N, D]`` float features; train_y: ``[N]`` labels in ``0..K-1``.
        test_x: ``[M, D]``; test_y: ``[M]``.
        cs: values of C (> 0, no duplicates).
        val_fraction: share of each training class held out for choosing C.
        seed: seed of the split.
        max_iter: L-BFGS iterations per fit.
        tol: gradient tolerance of each fit (see :func:`fit_logreg`).
        device: where the fits run.

    Returns:
        ``{"top1": test top-1 % with the chosen C, "best_c": C, "val_top1": {C: val top-1 %}}``.
    """
    k = check_probe_inputs(train_x, train_y, test_x, test_y, val_fraction)
    cs = sorted(_check_grid("cs", cs))
    if max_iter < 1 or not tol > 0:
        raise ValueError(f"max_iter must be >= 1 and tol > 0, got {max_iter} and {tol}")
    t0 = time.perf_counter()
    fit_idx, val_idx = stratified_split(train_y, val_fraction, seed)
    train_x = train_x.to(device, torch.float32)
    train_y = train_y.to(device, torch.long)
    fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)

    xf, xv = standardise(train_x[fit_idx], train_x[val_idx])
    yf, yv = train_y[fit_idx], train_y[val_idx]
    white = Whitening(xf) if whitening_pays(xf) else None
    val_top1: dict[float, float] = {}
    params: tuple[Tensor, Tensor] | None = None
    best: tuple[float, float, tuple[Tensor, Tensor]] | None = None  # (acc, c, params)
    bar = tqdm(cs, desc="lbfgs C sweep", unit="C")
    for c in bar:
        params = lbfgs_fit(xf, yf, c, k, params, max_iter, tol, white)
        acc = _accuracy(logreg_predict(xv, *params), yv)
        val_top1[c] = acc
        if best is None or acc > best[0]:
            best = (acc, c, params)
        bar.set_postfix(C=f"{c:.3g}", val=f"{acc:.2f}", best=f"{best[0]:.2f}")
    assert best is not None
    del xf, xv, white

    best_c = best[1]
    xt, xs = standardise(train_x, test_x.to(device, torch.float32))
    white = Whitening(xt) if whitening_pays(xt) else None
    w, b = lbfgs_fit(xt, train_y, best_c, k, best[2], max_iter, tol, white)
    top1 = _accuracy(logreg_predict(xs, w, b), test_y.to(device))
    log.info(
        "lbfgs probe: best C=%g (val %.2f%%), test top-1 %.2f%% in %.1fs",
        best_c,
        best[0],
        top1,
        time.perf_counter() - t0,
    )
    return {"top1": top1, "best_c": best_c, "val_top1": val_top1}


# ----------------------------------------------------------------------------- SGD head grid


def _train_linear_heads(
    x: Tensor,
    y: Tensor,
    lrs: Sequence[float],
    num_classes: int,
    *,
    epochs: int,
    batch_size: int,
    weight_decay: float,
    generator: torch.Generator,
    feature_masks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Train one linear head per lr on ``x [N, D]``, ``y [N]``, all heads per step at once.

    Equivalent to H independent ``nn.Linear`` heads, each with ``torch.optim.SGD(lr, momentum=0.9)``
    (``weight_decay`` on the weight only), cross-entropy averaged over the batch, and the lr set to
    ``lr * (1 + cos(pi t / T)) / 2`` before step t of T. ``generator`` (CPU) draws the init
    ``N(0, 0.01^2)`` of ``W [H, D, K]`` first, then one permutation of the samples per epoch.

    ``feature_masks [H, D]`` (bool) restricts head h to the features where its mask is true: its
    other weights start at 0 and never receive gradient, so it equals a head trained on those
    columns alone (used for the pooling axis of the grid: CLS, patch mean, last block or last n).

    Returns:
        weights ``[H, D, K]`` and biases ``[H, K]``; a diverged head has non-finite entries (heads
        never mix, so it cannot spoil the others).
    """
    n, d = x.shape
    h, k, device = len(lrs), num_classes, x.device
    w = torch.randn(h, d, k, generator=generator) * 0.01  # (H, D, K)
    grad_mask = None
    if feature_masks is not None:
        if feature_masks.shape != (h, d) or feature_masks.dtype != torch.bool:
            raise ValueError(f"feature_masks must be bool [{h}, {d}], got "
                             f"{feature_masks.dtype} {tuple(feature_masks.shape)}")
        w *= feature_masks[:, :, None]
        # (D, H*K) in the layout of the stacked weight below
        grad_mask = feature_masks.T.repeat_interleave(k, dim=1).to(device, x.dtype)
    # Stored as one (D, H*K) matrix: every head sees the same batch, so the forward and backward
    # of all heads are one GEMM each (a batched matmul over H would copy the batch H times).
    w = (
        w.permute(1, 0, 2).reshape(d, h * k).to(device)
    )  # (D, H*K), column h*K + j = head h, class j
    b = torch.zeros(h * k, device=device)
    mom_w, mom_b = torch.zeros_like(w), torch.zeros_like(b)
    base_lr = torch.tensor(list(lrs), dtype=x.dtype, device=device).repeat_interleave(k)  # (H*K,)
    total = epochs * math.ceil(n / batch_size)

    step = 0
    bar = tqdm(total=total, desc="sgd linear heads", unit="step")
    with flush_denormals():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=generator).to(device)
            for s in range(0, n, batch_size):
                idx = perm[s : s + batch_size]
                xb, yb = x[idx], y[idx]  # (B, D), (B,)
                z = torch.addmm(b, xb, w).view(len(yb), h, k)  # (B, H, K) logits of all heads
                g = torch.softmax(z, dim=2)
                g[torch.arange(len(yb), device=device), :, yb] -= 1.0  # dCE/dlogits = p - onehot
                g = g.view(len(yb), h * k) / len(yb)  # (B, H*K), mean over the batch
                gw = xb.T @ g  # (D, H*K)
                if grad_mask is not None:
                    gw *= grad_mask
                if weight_decay:
                    gw += weight_decay * w
                mom_w.mul_(0.9).add_(gw)
                mom_b.mul_(0.9).add_(g.sum(0))
                lr = base_lr * (0.5 * (1.0 + math.cos(math.pi * step / total)))  # cosine to 0
                w -= lr * mom_w
                b -= lr * mom_b
                step += 1
                bar.update()
    bar.close()
    return w.view(d, h, k).permute(1, 0, 2).contiguous(), b.view(h, k)


def _heads_accuracy(x: Tensor, y: Tensor, w: Tensor, b: Tensor, chunk: int = 4096) -> Tensor:
    """Top-1 % of every head ``(w [H, D, K], b [H, K])`` on ``x [N, D]``, ``y [N]``: ``[H]``."""
    correct = torch.zeros(len(w), device=x.device)
    for s in range(0, len(x), chunk):
        pred = (torch.matmul(x[s : s + chunk], w) + b[:, None]).argmax(2)  # (H, B)
        correct += (pred == y[s : s + chunk]).sum(1)
    return 100.0 * correct / len(x)


def pool_columns(pool: str, n_last_blocks: int, dim: int) -> dict[str, Tensor]:
    """Column indices of every pooling contained in probe features of ``pool`` over n blocks.

    :meth:`synrep.models.Encoder.probe_features` concatenates, for each of the last
    ``n_last_blocks`` blocks (oldest first), the CLS token and/or the mean of the patch tokens, each
    ``dim`` wide. The SGD grid trains heads on each pooling found here without recomputing features:
    ``"cls"``, ``"avg"`` and ``"cls+avg"`` of the last block and, when ``n_last_blocks > 1``, of the
    last n blocks (named ``"cls/4"`` etc.).

    Returns:
        ``{name: int64 column indices}``, in a fixed order.
    """
    parts = {"cls": ["cls"], "avg": ["avg"], "cls+avg": ["cls", "avg"]}
    if pool not in parts:
        raise ValueError(f"pool must be one of {list(parts)}, got {pool!r}")
    if n_last_blocks < 1 or dim < 1:
        raise ValueError(f"n_last_blocks and dim must be >= 1, got {n_last_blocks} and {dim}")
    have = parts[pool]
    width = len(have) * dim  # features per block

    def cols(kinds: list[str], blocks: int) -> Tensor:
        out = []
        for b in range(n_last_blocks - blocks, n_last_blocks):
            for kind in kinds:
                start = b * width + have.index(kind) * dim
                out.append(torch.arange(start, start + dim))
        return torch.cat(out)

    pools = {}
    for blocks in sorted({1, n_last_blocks}):
        for name, kinds in parts.items():
            if set(kinds) <= set(have):
                pools[name if blocks == 1 else f"{name}/{blocks}"] = cols(kinds, blocks)
    return pools


def sgd_probe_grid(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    lrs: Sequence[float],
    pools: Mapping[str, Tensor] | None = None,
    epochs: int = 10,
    batch_size: int = 1024,
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    seed: int = 0,
    standardize: bool = True,
    device: str | torch.device = "cpu",
) -> dict:
    """DINOv2-style linear probe: a grid of linear heads (lr x pooling), all trained in one pass.

    The heads are one weight tensor ``W [H, D, K]`` (init N(0, 0.01), bias 0, as DINOv2) updated
    with batched matmuls: each minibatch is read once for every head. Each head runs SGD with
    momentum 0.9 (PyTorch semantics: ``buf = 0.9 buf + g``) and a cosine schedule from its lr to 0
    over all steps; ``weight_decay`` is L2 on the weights (not biases). With ``pools``, there is one
    head per (pooling, lr), each seeing only its pooling's feature columns (see
    :func:`pool_columns`). The heads train on train minus a stratified validation split; the head
    with the best validation top-1 is chosen (ties: the earlier one) and its test top-1 is reported
    (no retraining on train + val). A head that diverged (non-finite weights) counts as 0 % so it
    can never be chosen by accident.

    Args:
        train_x: ``[N, D]`` float features; train_y: ``[N]`` labels in ``0..K-1``.
        test_x: ``[M, D]``; test_y: ``[M]``.
        lrs: one learning rate per head (> 0, no duplicates); used as given (no batch-size scaling).
        pools: ``{name: column indices}`` of the poolings to try; ``None`` uses all features.
        epochs: passes over the fit split.
        batch_size: samples per step.
        weight_decay: L2 coefficient on the weights.
        val_fraction: share of each training class held out for choosing the head.
        seed: seed of the split, the init and the shuffling.
        standardize: standardise features with the fit split's mean/std first (what MAE-style
            probes get from a non-affine BatchNorm; makes one lr grid fit many encoders).
        device: where the heads train.

    Returns:
        ``{"top1": test top-1 % of the chosen head, "best_lr": its lr, "val_top1": {lr: %}}``;
        with ``pools`` also ``"best_pool"``, and ``val_top1`` / ``test_top1`` are keyed
        ``"<pool>@<lr>"``.
    """
    k = check_probe_inputs(train_x, train_y, test_x, test_y, val_fraction)
    lr_list = _check_grid("lrs", lrs)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    d = train_x.shape[1]
    masks = None
    if pools is not None:
        if not pools:
            raise ValueError("pools is empty; give at least one pooling or None")
        pool_masks = []
        for name, cols in pools.items():
            cols = torch.as_tensor(cols, dtype=torch.long)
            if cols.ndim != 1 or len(cols) == 0 or int(cols.min()) < 0 or int(cols.max()) >= d:
                raise ValueError(f"pool {name!r}: columns must be indices in [0, {d})")
            mask = torch.zeros(d, dtype=torch.bool)
            mask[cols] = True
            pool_masks.append(mask)
        heads = [(name, lr) for name in pools for lr in lr_list]
        masks = torch.stack([m for m in pool_masks for _ in lr_list])  # (H, D)
    else:
        heads = [(None, lr) for lr in lr_list]

    fit_idx, val_idx = stratified_split(train_y, val_fraction, seed)
    train_x = train_x.to(device, torch.float32)
    train_y = train_y.to(device, torch.long)
    xf, xv, xs = train_x[fit_idx.to(device)], train_x[val_idx.to(device)], test_x.to(device).float()
    if standardize:
        xf, xv, xs = standardise(xf, xv, xs)
    yf, yv = train_y[fit_idx.to(device)], train_y[val_idx.to(device)]
    gen = torch.Generator().manual_seed(seed)
    w, b = _train_linear_heads(
        xf,
        yf,
        [lr for _, lr in heads],
        k,
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=weight_decay,
        generator=gen,
        feature_masks=masks,
    )
    h = len(heads)
    finite = torch.isfinite(w).flatten(1).all(1) & torch.isfinite(b).all(1)  # (H,)

    def head_accuracy(x: Tensor, y: Tensor) -> list[float]:  # top-1 % of every head
        acc = _heads_accuracy(x, y, w, b)
        return torch.where(finite, acc, torch.zeros_like(acc)).tolist()

    val_acc = head_accuracy(xv, yv)
    test_acc = head_accuracy(xs, test_y.to(device))
    best = max(range(h), key=lambda i: (val_acc[i], -i))  # ties: the earlier head
    best_pool, best_lr = heads[best]
    log.info(
        "sgd probe: best %slr=%g (val %.2f%%), test top-1 %.2f%%; %d/%d heads diverged",
        "" if best_pool is None else f"pool={best_pool} ",
        best_lr,
        val_acc[best],
        test_acc[best],
        h - int(finite.sum()),
        h,
    )
    if pools is None:
        return {
            "top1": test_acc[best],
            "best_lr": best_lr,
            "val_top1": dict(zip(lr_list, val_acc, strict=True)),
        }
    names = [f"{p}@{lr:g}" for p, lr in heads]
    return {
        "top1": test_acc[best],
        "best_lr": best_lr,
        "best_pool": best_pool,
        "val_top1": dict(zip(names, val_acc, strict=True)),
        "test_top1": dict(zip(names, test_acc, strict=True)),
    }
