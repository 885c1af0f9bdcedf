"""SynCLR ablation at the quickstart's scale, like the paper's (docs/methods.md section 1).

Every row trains the quickstart's encoder for the same steps (600 by default, half the quickstart's,
to keep the seven runs near an hour on 2 CPU cores) with the same number of views per step, on
the same synthetic shards (the quickstart run's images: grammar captions, fashion-mini, 4 images
per caption), and is evaluated with the same frozen-feature protocol on the real Fashion-MNIST
test set (the student's encoder, so rows with and without a teacher are probed alike):

multi-positive only (StableRep) | + EMA teacher | + EMA + iBOT | + EMA + multi-crop | all (SynCLR)
| SimCLR (one image per caption, two views) | supervised cross-entropy on the synthetic labels.

The paper's ImageNet linear probe for the same rows: 75.8 / 76.7 / 77.6 / 78.6 / 78.8, SimCLR 63.6,
supervised CE 71.9. Results go to ``benchmarks/results/synclr_ablation.json``. No target: this is
a measurement; it exits non-zero only if a run fails.

    python benchmarks/synclr_ablation.py [--run-root runs/bench] [--steps 600] [--only all,ema]
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

_OFF = {"method.synclr.teacher": "false", "method.synclr.ibot_weight": "0",
        "method.synclr.local_crops": "0"}


def _synclr(**on: str) -> list[str]:
    return [f"{k}={v}" for k, v in {**_OFF, **on}.items()]


# name -> (row label, overrides of the quickstart config)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "multipos": ("multi-positive only (StableRep)", _synclr()),
    "ema": ("+ EMA teacher", _synclr(**{"method.synclr.teacher": "true"})),
    "ema_ibot": ("+ EMA + iBOT", _synclr(**{"method.synclr.teacher": "true",
                                            "method.synclr.ibot_weight": "1"})),
    "ema_multicrop": ("+ EMA + multi-crop",
                      _synclr(**{"method.synclr.teacher": "true",
                                 "method.synclr.local_crops": "2"})),
    "all": ("all: EMA + iBOT + multi-crop (SynCLR)",
            _synclr(**{"method.synclr.teacher": "true", "method.synclr.ibot_weight": "1",
                       "method.synclr.local_crops": "2"})),
    "simclr": ("SimCLR, one image per caption, two views", ["method.name=simclr"]),
    "supervised": ("supervised CE on the synthetic class labels", ["method.name=supervised"]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-root", default="runs/bench")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=600,
                   help="training steps per row (default 600; 0 = the quickstart's)")
    p.add_argument("--shards", default="",
                   help="synthetic shards to train on (default: the quickstart run's images)")
    p.add_argument("--json", default="benchmarks/results/synclr_ablation.json")
    args = p.parse_args(argv)
    root = Path(args.run_root)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")

    q = load_config(QUICKSTART)
    steps = args.steps or q.train.steps
    images_per_step = q.train.batch_size * q.method.options.images_per_caption
    shards = args.shards
    if not shards:  # the quickstart's own synthetic images
        run(QUICKSTART, root / "quickstart", [])
        shards = str(root / "quickstart" / "images")
    out = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    for name in names:
        label, overrides = VARIANTS[name]
        common = [f"data.shards={shards}", "run.stages=[train,eval]", f"train.steps={steps}",
                  "eval.weights=student"]
        if name == "simclr":  # one image per caption in two views: as many views per step
            common.append(f"train.batch_size={images_per_step // 2}")
        if name == "supervised":  # one image per caption, one view: as many views per step
            common.append(f"train.batch_size={images_per_step}")
        res = run(QUICKSTART, root / f"ablation_{steps}_{name}", common + overrides)
        out[name] = {"row": label, **{k: res[k] for k in ("linear_probe_top1", "knn_top1")},
                     "train_minutes": round(res["train_minutes"], 1), "steps": steps,
                     "shards": shards}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")

    rows = [(out[n]["row"], out[n]) for n in VARIANTS if n in out]
    print(f"\nSynCLR ablation: {steps} steps x {images_per_step} synthetic views per step, "
          "linear probe and kNN on the real Fashion-MNIST test set\n")
    print(table(rows, extra=("train_minutes",)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
