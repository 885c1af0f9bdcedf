"""Learning from models vs learning from data, at the quickstart's scale.

The same encoder (ViT-Tiny, patch 7, 28 px), the same number of steps and the same number of
augmented views through the encoder per step (so the same compute), trained two ways and evaluated
with the same frozen-feature protocol on the real Fashion-MNIST test set:

- **SynCLR on synthetic data**: ``configs/quickstart.yaml`` end to end (grammar captions, the
  shipped fashion-mini text-to-image model, 4 images per caption); no real image is used before
  evaluation.
- **SimCLR on the real data**: ``configs/fashion_simclr.yaml`` on the 60,000 real train images
  (labels unused), with the quickstart's steps and precision; half as many images per step, each
  seen in two views, so the encoder processes as many views per step as the quickstart's 4 images
  x captions.

Target: learning from the model matches or beats learning from the data (linear-probe top-1).
Results go to ``benchmarks/results/models_vs_data.json``; the table is printed in Markdown.

    python benchmarks/models_vs_data.py [--run-root runs/bench]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import run, table  # noqa: E402

from synrep.config import load_config  # noqa: E402

QUICKSTART = "configs/quickstart.yaml"
REAL = "configs/fashion_simclr.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-root", default="runs/bench")
    p.add_argument("--json", default="benchmarks/results/models_vs_data.json")
    args = p.parse_args(argv)
    root = Path(args.run_root)

    q = load_config(QUICKSTART)
    images_per_step = q.train.batch_size * q.method.images_per_caption
    synth = run(QUICKSTART, root / "quickstart", [])
    real = run(REAL, root / "simclr_real", [
        f"train.steps={q.train.steps}", f"train.batch_size={images_per_step // 2}",
        f"optim.warmup_steps={q.optim.warmup_steps}", f"eval.linear_cs={q.eval.linear_cs}",
        f"train.precision={q.train.precision}"])

    rows = [
        (f"SynCLR, synthetic images ({QUICKSTART})", synth),
        (f"SimCLR, real Fashion-MNIST train images ({REAL})", real),
    ]
    for _, r in rows:
        r["minutes"] = f"{r['wall_minutes']:.1f}"
    md = table(rows, extra=("minutes",))
    gap = synth["linear_probe_top1"] - real["linear_probe_top1"]
    ok = gap >= 0
    print(f"\nSame encoder, {q.train.steps} steps x {images_per_step} views per step:\n")
    print(md)
    print(f"\nmodels - data (linear probe): {gap:+.2f} points   target >= 0   "
          f"{'OK' if ok else 'MISSED'}")
    out = {"steps": q.train.steps, "views_per_step": images_per_step,
           "synthetic_synclr": synth, "real_simclr": real, "gap_points": gap,
           "target": "synthetic >= real", "table": md}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
