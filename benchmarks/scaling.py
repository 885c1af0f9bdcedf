"""Data scaling at the quickstart's scale: ``synrep scale configs/quickstart.yaml``, timed.

Generates the quickstart's captions and images once (unless ``--shards`` reuses existing ones),
pretrains SynCLR at every data size of the config's ``scale`` section (at least 4), evaluates each
with the linear probe on the real Fashion-MNIST test set, and fits a power law of test error
against the number of synthetic images. Prints the points, the fit and the wall time beside the
targets; exits non-zero when one is missed.

Targets (issue "Evaluation suite and report"): at least 4 data sizes, under 30 minutes on 2 CPU
cores.

    python benchmarks/scaling.py [--run-dir runs/bench/scale] [--shards DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from synrep.cli import main as synrep
from synrep.config import load_config
from synrep.layout import RunLayout

TARGET_S = 30 * 60.0
MIN_SIZES = 4
QUICKSTART = "configs/quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/bench/scale")
    p.add_argument("--shards", default="",
                   help="reuse these synthetic shards instead of generating (not timed then)")
    p.add_argument("--resume", action="store_true",
                   help="keep finished sizes of an earlier run (its wall time is then not timed)")
    p.add_argument("--json", default="benchmarks/results/scaling.json")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not args.resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"run.dir={run_dir}"] + ([f"data.shards={args.shards}"] if args.shards else [])
    cfg = load_config(QUICKSTART, overrides)
    n_sizes = len(cfg.scale.captions) * len(cfg.scale.images_per_caption)

    t = time.perf_counter()
    code = synrep(["scale", QUICKSTART, *overrides])
    wall = time.perf_counter() - t
    if code != 0:
        print(f"synrep scale failed with exit code {code}")
        return code
    res = json.loads(RunLayout(run_dir).scale_results.read_text())
    fit = res["fit"]
    timed = not args.shards and not args.resume
    ok_sizes = n_sizes >= MIN_SIZES
    ok_time = wall < TARGET_S
    print(f"\nsynrep scale {QUICKSTART}: {n_sizes} data sizes x {cfg.scale.steps} steps"
          f"{'' if timed else ' (generation not included)'}")
    print(f"  sizes      {n_sizes:8d}   target >= {MIN_SIZES}: {'met' if ok_sizes else 'MISSED'}")
    print(f"  wall       {wall / 60:8.1f} min   target < {TARGET_S / 60:.0f} min: "
          f"{'met' if ok_time else 'MISSED'}")
    print(f"  exponent b {fit['b']:8.4f}   (error = {fit['a']:.4g} * n^-b + {fit['c']:.3g}, "
          f"R^2 {fit['r2']:.3f})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(
        {"wall_minutes": round(wall / 60, 1), "includes_generation": timed, "sizes": n_sizes,
         "steps_per_size": cfg.scale.steps, "points": res["points"], "fit": fit,
         "targets": {"sizes": MIN_SIZES, "minutes": TARGET_S / 60},
         "met": ok_sizes and ok_time}, indent=2) + "\n")
    return 0 if ok_sizes and ok_time else 1


if __name__ == "__main__":
    sys.exit(main())
