"""Learning from models vs learning from data, at the quickstart's scale.

The same encoder (ViT-Tiny, patch 7, 28 px), the same number of steps and the same number of
augmented views through the encoder per step (so the same compute), trained two ways and evaluated
with the same frozen-feature protocol on the real Fashion-MNIST test set:

- **SynCLR on synthetic data**: ``configs/quickstart.yaml`` end to end (grammar captions, the
  shipped fashion-mini text-to-image model, 4 images per caption); no real image is used before
  evaluation. ``--captions`` sets how many captions are drawn (each count is its own arm): the
  demo's 5,000 (20,000 images) and 10,000 (40,000 images). Synthetic data costs only generation
  time, so the target is judged on the last (largest) count; the training budget is the same.
- **SimCLR on the real data**: ``configs/fashion_simclr.yaml`` on the 60,000 real train images
  (labels unused), with the quickstart's steps and precision; half as many images per step, each
  seen in two views, so the encoder processes as many views per step as the quickstart's 4 images
  x captions.

Target: learning from the model matches or beats learning from the data (linear-probe top-1, the
mean over ``--seeds``: each seed reruns both arms end to end, captions and images included).
Results go to ``benchmarks/results/models_vs_data.json``; the table is printed in Markdown.

    python benchmarks/models_vs_data.py [--run-root runs/bench] [--seeds 0 1 2]
                                        [--captions 5000 10000]
    python benchmarks/models_vs_data.py --seeds 0 1 2 --set run.device=cuda   # on one GPU
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
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="run.seed of each repeat of both arms (seed 0 runs in RUN_ROOT/quickstart "
                        "and RUN_ROOT/simclr_real, seed n in ..._seed{n})")
    p.add_argument("--captions", type=int, nargs="+", default=[5000, 10000],
                   help="captions.num of each synthetic arm (4 images each); the target is "
                        "judged on the last. The quickstart's 5,000 runs in "
                        "RUN_ROOT/quickstart[_seed{n}], other counts in "
                        "RUN_ROOT/quickstart_c{N}[_seed{n}]")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for both arms, e.g. run.device=cuda")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.captions):
        p.error("--captions: each count must be a positive number of captions")
    root = Path(args.run_root)

    q = load_config(QUICKSTART)
    images_per_step = q.train.batch_size * q.method.options.images_per_caption
    per_caption = q.images.images_per_caption
    synth_arms: dict[int, list[dict]] = {n: [] for n in args.captions}
    real_arm: list[dict] = []
    for seed in args.seeds:
        tag = "" if seed == 0 else f"_seed{seed}"
        common = [f"run.seed={seed}", *args.set]
        for n in args.captions:
            if n == q.captions.num:
                synth_arms[n].append(run(QUICKSTART, root / f"quickstart{tag}", common))
            else:
                synth_arms[n].append(run(QUICKSTART, root / f"quickstart_c{n}{tag}", [
                    f"captions.num={n}", f"captions.shard_size={max(n, q.captions.shard_size)}",
                    *common]))
        real_arm.append(run(REAL, root / f"simclr_real{tag}", [
            f"train.steps={q.train.steps}", f"train.batch_size={images_per_step // 2}",
            f"optim.warmup_steps={q.optim.warmup_steps}", f"eval.linear_cs={q.eval.linear_cs}",
            f"train.precision={q.train.precision}", *common]))
        gaps_now = ", ".join(
            f"{n * per_caption:,} synthetic images "
            f"{synth_arms[n][-1]['linear_probe_top1'] - real_arm[-1]['linear_probe_top1']:+.2f}"
            for n in args.captions)
        print(f"seed {seed}: models - data (linear probe): {gaps_now} points", flush=True)

    seeds = f", mean of {len(args.seeds)} seeds" if len(args.seeds) > 1 else ""
    synth_means = {n: _mean(v) for n, v in synth_arms.items()}
    rows = [(f"SynCLR, {n * per_caption:,} synthetic images from {n:,} captions "
             f"({QUICKSTART}{'' if n == q.captions.num else f' captions.num={n}'}{seeds})",
             synth_means[n]) for n in args.captions]
    real = _mean(real_arm)
    rows.append((f"SimCLR, 60,000 real Fashion-MNIST train images ({REAL}{seeds})", real))
    for _, r in rows:  # the training stage's own time: right also when a rerun skips stages
        r["training minutes"] = f"{r['train_minutes']:.1f}"
    md = table(rows, extra=("training minutes",))
    judged = args.captions[-1]
    synth = synth_means[judged]
    gaps = [s["linear_probe_top1"] - r["linear_probe_top1"]
            for s, r in zip(synth_arms[judged], real_arm)]
    gap = sum(gaps) / len(gaps)
    ok = gap >= 0
    print(f"\nSame encoder, {q.train.steps} steps x {images_per_step} views per step:\n")
    print(md)
    per_seed = ", ".join(f"{g:+.2f}" for g in gaps)
    print(f"\nmodels ({judged * per_caption:,} synthetic images) - data "
          f"(linear probe): {gap:+.2f} points (seeds {per_seed})   target >= 0   "
          f"{'OK' if ok else 'MISSED'}")
    out = {"steps": q.train.steps, "views_per_step": images_per_step, "seeds": args.seeds,
           "overrides": args.set, "captions": args.captions, "judged_captions": judged,
           "synthetic_synclr": synth, "real_simclr": real,
           "synthetic_synclr_per_captions": {str(n): v for n, v in synth_means.items()},
           "synthetic_synclr_per_seed": {str(n): v for n, v in synth_arms.items()},
           "real_simclr_per_seed": real_arm,
           "gap_points": gap, "gap_points_per_seed": gaps,
           "target": "synthetic >= real (mean over seeds)", "table": md}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if ok else 1


def _mean(results: list[dict]) -> dict:
    """Seed-averaged metrics (numbers averaged; the rest taken from the first seed)."""
    out = dict(results[0])
    for k, v in out.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = sum(r[k] for r in results) / len(results)
    return out


if __name__ == "__main__":
    sys.exit(main())
