"""Data scaling: train at several data sizes, fit a power law of test error (docs/methods.md s. 3).

``synrep scale CONFIG`` renders the run's captions and images once (at the largest size), then for
every (captions, images per caption) pair of ``scale`` trains on the first caption groups and
images of the shards, evaluates on the real test set, and fits

    error(n) = a * n^(-b)            (``scale.fit = power``)
    error(n) = a * n^(-b) + c        (``scale.fit = power+offset``: c is the irreducible error)

over n = captions x images per caption, as the scaling studies of synthetic data do (Fan et al.
2023, "Scaling Laws of Synthetic Images for Model Training"). Every size is an ordinary run folder
under ``RUN/scale/``, so a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from synrep.config import Config, config_from_dict, save_config
from synrep.errors import ConfigError
from synrep.eval.scaling import draw_fit, fit_power_law, plot_fit
from synrep.eval.stage import DONE_KEYS
from synrep.layout import RunLayout, layout
from synrep.lock import run_lock
from synrep.pipeline import run_stages
from synrep.utils import ensure_writable_dir, write_json_atomic

__all__ = ["draw_fit", "fit_power_law", "plot_fit", "run_scaling"]


def _size_config(cfg: Config, shards: str, captions: int, k: int) -> Config:
    """The config of one data size: the base run on a prefix of the shards, in its own folder."""
    sub = config_from_dict(cfg.to_dict(), "scale")
    sub.run.dir = str(layout(cfg).scale_run(captions, k))
    sub.run.stages = ["train", "eval"]
    sub.data.source = "shards"
    sub.data.shards = shards
    sub.data.max_captions = captions
    sub.data.max_images_per_caption = k
    opts = sub.method.options
    if hasattr(opts, "images_per_caption"):  # caption-group methods: at most k per caption
        opts.images_per_caption = min(opts.images_per_caption, k)
    if cfg.scale.steps is not None:
        sub.train.steps = cfg.scale.steps
        sub.optim.warmup_steps = min(cfg.optim.warmup_steps, cfg.scale.steps // 10)
    sub.eval.protocols = [cfg.scale.protocol]
    sub.eval.pca_images = 0
    return sub


def run_scaling(cfg: Config) -> dict[str, Any]:
    """Train and evaluate at every data size of ``cfg.scale``; fit, plot and save the power law.

    Writes ``RUN/scale/results.json`` (points and fit) and ``RUN/scale/fit.png``.
    """
    s = cfg.scale
    sizes = list(itertools.product(s.captions, s.images_per_caption))
    if any(c < 1 for c in s.captions) or any(k < 1 for k in s.images_per_caption):
        raise ConfigError(f"scale.captions and scale.images_per_caption must be >= 1, got "
                          f"{s.captions} and {s.images_per_caption}")
    if len({c * k for c, k in sizes}) < (3 if s.fit == "power+offset" else 2):
        raise ConfigError(f"scale: {len(sizes)} data sizes are too few for a {s.fit} fit; give "
                          "more values in scale.captions or scale.images_per_caption")
    if s.steps is not None and s.steps < 1:
        raise ConfigError(f"scale.steps must be >= 1 or null, got {s.steps}")
    paths = layout(cfg)
    ensure_writable_dir(cfg.run_dir, "run.dir")
    with run_lock(cfg.run_dir):  # the sweep's own stages (captions, images) take it again: free
        return _sweep(cfg, paths)


def _sweep(cfg: Config, paths: RunLayout) -> dict[str, Any]:
    s = cfg.scale
    sizes = list(itertools.product(s.captions, s.images_per_caption))
    shards = cfg.data.shards
    if not shards:  # checked before anything is written: a refused command changes nothing
        if cfg.captions.num < max(s.captions):
            raise ConfigError(f"scale.captions goes up to {max(s.captions)} but captions.num is "
                              f"{cfg.captions.num}; raise captions.num")
        if cfg.images.images_per_caption < max(s.images_per_caption):
            raise ConfigError(
                f"scale.images_per_caption goes up to {max(s.images_per_caption)} but "
                f"images.images_per_caption is {cfg.images.images_per_caption}; raise it")
    ensure_writable_dir(paths.scale, "run.dir")
    save_config(cfg, paths.config)
    if not shards:  # generate the run's own captions and images once, at the largest size
        run_stages(cfg, ["captions", "images"])
        shards = str(layout(cfg).images.resolve())

    points = []
    for i, (captions, k) in enumerate(sizes):
        sub = _size_config(cfg, shards, captions, k)
        print(f"\n[scale {i + 1}/{len(sizes)}] {captions} captions x {k} images "
              f"= {captions * k:,} images -> {sub.run.dir}")
        run_stages(sub, ["train", "eval"])
        entry = json.loads(layout(sub).results.read_text())[sub.eval.dataset]
        top1 = float(entry[DONE_KEYS[s.protocol]])
        points.append({"captions": captions, "images_per_caption": k, "images": captions * k,
                       "top1": top1, "error": 100.0 - top1, "run": sub.run.dir})
    fit = fit_power_law([p["images"] for p in points], [p["error"] for p in points], s.fit)
    results = {"protocol": s.protocol, "dataset": cfg.eval.dataset, "points": points, "fit": fit}
    write_json_atomic(paths.scale_results, results)
    plot_fit(points, fit, paths.scale_plot,
             f"{cfg.method.name} on synthetic data, {s.protocol} probe on {cfg.eval.dataset}")

    print(f"\ndata scaling ({s.protocol} probe on {cfg.eval.dataset}):")
    print(f"  {'captions':>9s} {'imgs/cap':>8s} {'images':>8s} {'top-1 %':>8s} {'error %':>8s}")
    for p in points:
        print(f"  {p['captions']:9d} {p['images_per_caption']:8d} {p['images']:8d} "
              f"{p['top1']:8.2f} {p['error']:8.2f}")
    offset = f" + {fit['c']:.3g}" if fit["c"] else ""
    print(f"fit: error = {fit['a']:.4g} * n^-{fit['b']:.4f}{offset}  (R^2 of log error "
          f"{fit['r2']:.3f})")
    print(f"results: {paths.scale_results}, plot: {paths.scale_plot}")
    return results
