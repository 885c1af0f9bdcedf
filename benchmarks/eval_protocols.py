"""Time of ``synrep eval`` with every frozen-feature protocol on a quickstart checkpoint.

Runs the real CLI (``synrep eval CONFIG --checkpoint CK``) into a fresh folder, so features are
computed once, then fed to the L-BFGS probe, the SGD head grid (lr x pooling), kNN and few-shot
(and zero-shot when the checkpoint has a text tower), and the PCA maps are drawn. Prints each
protocol's time and top-1 beside the target and exits non-zero when the target is missed.

Target (issue "Evaluation suite and report"): all frozen-feature protocols in under 3 minutes on 2
CPU cores.

    python benchmarks/eval_protocols.py [--checkpoint runs/demo/train/checkpoints/final.safetensors]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from synrep.cli import main as synrep
from synrep.layout import RunLayout

TARGET_S = 180.0
QUICKSTART = "configs/quickstart.yaml"
FROZEN = "[linear,sgd,knn,fewshot,zeroshot]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/demo/train/checkpoints/final.safetensors",
                   help="a quickstart checkpoint (make demo writes this one)")
    p.add_argument("--out", default="runs/bench/eval_protocols")
    p.add_argument("--json", default="benchmarks/results/eval_protocols.json")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).exists():
        p.error(f"no checkpoint at {args.checkpoint}: run `make demo` first or pass --checkpoint")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # no feature cache: time the whole evaluation

    t = time.perf_counter()
    code = synrep(["eval", QUICKSTART, "--checkpoint", args.checkpoint, f"run.dir={out}",
                   f"eval.protocols={FROZEN}"])
    wall = time.perf_counter() - t
    if code != 0:
        print(f"synrep eval failed with exit code {code}")
        return code
    res = json.loads(RunLayout(out).results.read_text())["fashion-mnist"]
    print(f"\nsynrep eval, all frozen-feature protocols, on {args.checkpoint}")
    print(f"  {'step':<10s} {'seconds':>8s}")
    for key, sec in res["timings"].items():
        print(f"  {key.removesuffix('_s'):<10s} {sec:8.1f}")
    ok = wall < TARGET_S
    print(f"  {'total':<10s} {wall:8.1f}   target < {TARGET_S:.0f} s: {'met' if ok else 'MISSED'}")
    for key, value in res.items():
        if key.endswith("_top1"):
            print(f"  {key:<22s} {value:6.2f} %")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(
        {"checkpoint": args.checkpoint, "wall_s": round(wall, 1), "target_s": TARGET_S,
         "met": ok, "timings": res["timings"],
         "top1": {k: v for k, v in res.items() if k.endswith("_top1")}}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
