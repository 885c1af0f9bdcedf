"""Power-law fits of test error against data size, and their plot (the data scaling of
docs/methods.md section 3). ``synrep scale`` (:mod:`synrep.scaling`) runs the sweep behind them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from synrep.utils import atomic_output

__all__ = ["draw_fit", "fit_power_law", "plot_fit"]


def _loglog_fit(n: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares of ``log y = log a - b log n``: (a, b, sum of squared log residuals)."""
    x = np.log(n)
    A = np.stack([np.ones_like(x), -x], axis=1)  # noqa: N806
    coef, *_ = np.linalg.lstsq(A, np.log(y), rcond=None)
    resid = np.log(y) - A @ coef
    return float(np.exp(coef[0])), float(coef[1]), float(resid @ resid)


def fit_power_law(sizes: Any, errors: Any, form: str = "power") -> dict[str, float | str]:
    """Fit ``error = a * size^-b (+ c)`` by least squares in log space.

    ``power`` is a straight line in log-log coordinates. ``power+offset`` also fits ``c`` in
    ``[0, min(error))``: for a given c the rest is the straight-line fit of ``log(error - c)``, so c
    is found by a dense grid followed by golden-section refinement of the log-space residual.

    Args:
        sizes: data sizes (> 0), at least 2 distinct (3 for ``power+offset``).
        errors: test errors at those sizes, in ``(0, 1]`` or percent (> 0).
        form: ``"power"`` or ``"power+offset"``.

    Returns:
        ``{"form", "a", "b", "c", "r2"}``; ``r2`` is the coefficient of determination of
        ``log error`` (1 = a perfect power law).
    """
    n = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(errors, dtype=np.float64)
    if n.ndim != 1 or n.shape != y.shape:
        raise ValueError(f"sizes and errors must be 1-D and equally long, got {n.shape}, {y.shape}")
    if not (np.all(np.isfinite(n)) and np.all(n > 0) and np.all(np.isfinite(y)) and np.all(y > 0)):
        raise ValueError("sizes and errors must be positive finite numbers")
    need = {"power": 2, "power+offset": 3}
    if form not in need:
        raise ValueError(f"form must be one of {list(need)}, got {form!r}")
    if len(np.unique(n)) < need[form]:
        raise ValueError(
            f"a {form} fit needs at least {need[form]} distinct sizes, got {n.tolist()}")

    c = 0.0
    if form == "power+offset":
        top = float(y.min())

        def sse(t: float) -> float:  # t = c / min(error), in [0, 1)
            return _loglog_fit(n, y - t * top)[2]

        grid = np.linspace(0.0, 0.999, 1000)
        i = int(np.argmin([sse(t) for t in grid]))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        ratio = (math.sqrt(5) - 1) / 2
        for _ in range(60):  # golden section on the bracket around the best grid point
            m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            if sse(m1) <= sse(m2):
                hi = m2
            else:
                lo = m1
        c = (lo + hi) / 2 * top
    a, b, resid = _loglog_fit(n, y - c)
    ly = np.log(y - c)
    total = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - resid / total if total > 0 else 1.0
    return {"form": form, "a": a, "b": b, "c": c, "r2": r2}


def draw_fit(ax: Any, points: list[dict[str, Any]], fit: dict[str, Any] | None) -> None:
    """Draw measured test error against data size, and the fitted curve, on a log-log ``ax``.

    Each point is labelled ``captions x images per caption``; with an offset fit the asymptote c
    is a dotted line. Used by :func:`plot_fit` and by the run report.
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    order = sorted(points, key=lambda p: p["images"])
    n = np.array([p["images"] for p in order], dtype=float)
    err = np.array([p["error"] for p in order], dtype=float)
    ax.loglog(n, err, "o", color="C0", label="runs")
    for p in order:
        ax.annotate(f"{p['captions']}x{p['images_per_caption']}", (p["images"], p["error"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=7, color="0.35")
    if fit is not None:
        grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 200)
        curve = fit["a"] * grid ** (-fit["b"]) + fit["c"]
        ok = curve > 0  # a log axis cannot show non-positive values
        ax.loglog(grid[ok], curve[ok], "-", color="C1",
                  label=f"fit: {fit['a']:.3g}·n^(−{fit['b']:.3f}) + {fit['c']:.3g}")
        if fit["form"] == "power+offset" and fit["c"] > 0:
            ax.axhline(fit["c"], color="C1", ls=":", lw=1, label=f"c = {fit['c']:.3g}")

    # Errors span less than a decade: label 1-2-5 steps as plain numbers (20, not 2x10^1), or,
    # when the errors are closer together than that, a few values across the measured range.
    lo, hi = ax.get_ylim()
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8)):
        ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)),
                                             math.ceil(math.log10(hi)) + 1)
                 for m in mantissas if lo <= m * 10.0**e <= hi]
        if len(ticks) >= 3:
            ytext = FuncFormatter(lambda v, _: f"{v:g}")
            break
    else:
        ticks = list(np.unique(np.round(np.geomspace(err.min(), err.max(), 4), 2)))
        ytext = FuncFormatter(lambda v, _: f"{v:.2f}")
    ax.set_yticks(ticks)
    ax.set_ylim(lo, hi)
    ax.set_xticks(np.unique(n))  # the measured sizes
    for axis, text in ((ax.yaxis, ytext), (ax.xaxis, FuncFormatter(lambda v, _: f"{v:,.0f}"))):
        axis.set_major_formatter(text)
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("synthetic images n (log)")
    ax.set_ylabel("top-1 error % (log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot_fit(points: list[dict[str, Any]], fit: dict[str, Any], path: str | Path,
             title: str = "") -> Path:
    """:func:`draw_fit` as a PNG file (written under a temporary name, then renamed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw_fit(ax, points, fit)
    ax.set_title(title or "data scaling", fontsize=10)
    path = Path(path)
    with atomic_output(path) as f:
        fig.savefig(f, format="png")
    return path
