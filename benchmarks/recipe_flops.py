"""What each paper recipe asks of its data loader: training FLOPs per image, counted, and the
images/s a GPU consumes at a given achieved FLOP rate, against the loader's measured rate per core.

Each paper config (full model size, 224 px, its crops, teacher and checkpointing) takes one training
step on this CPU on tiny 256 px shards the script writes, under torch's ``FlopCounterMode`` (what
``synrep train`` counts on its first step): forward, backward and the checkpointing recompute. An
image is one of the 4 images of a caption (with its local crops and the teacher's view).

    python benchmarks/recipe_flops.py [--tflops 400] [--per-core N]

``--tflops``: the achieved training rate assumed for one GPU (default 400 TFLOP/s, about 40 % of an
H100's dense bf16 peak; an assumption, not a measurement); ``--per-core``: the loader's decode +
random-resized-crop rate per core (default: ``benchmarks/results/data_scale.json``, measured by
``benchmarks/data_scale.py``). Prints the images/s per GPU and the loader cores that feed it, and
writes benchmarks/results/recipe_flops.json. No target: it informs docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from synrep.config import load_config
from synrep.data.shards import CaptionGroup, write_shard
from synrep.layout import layout
from synrep.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["synclr_vitb16", "synclr_vitl14", "stablerep_vitb16", "mae_vitb16"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tflops", type=float, default=400.0)
    ap.add_argument("--per-core", type=float, default=None)
    args = ap.parse_args()
    per_core = args.per_core
    if per_core is None:
        measured = json.loads((ROOT / "benchmarks/results/data_scale.json").read_text())
        per_core = measured["loader"]["synrep_images_per_s_per_core"]
    work = Path(tempfile.mkdtemp(prefix="recipe_flops_"))
    rng = np.random.default_rng(0)
    write_shard(work / "shards/000000.tar", [
        CaptionGroup(f"{i:06d}", f"a photo of thing {i}", {"caption_id": i},
                     [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(4)])
        for i in range(2)], image_format="jpg")
    rows = {}
    for recipe in RECIPES:
        cfg = load_config(ROOT / f"configs/{recipe}.yaml", [
            f"run.dir={work / recipe}", f"data.shards={work / 'shards'}", "run.device=cpu",
            "train.precision=fp32", "train.compile=false", "train.steps=1",
            "train.batch_size=1", "run.stages=[train]", "data.workers=0"])
        train(cfg)
        summary = json.loads(layout(cfg).train_summary.read_text())
        flops = summary["accounting"]["train_flops_per_step"]
        images = 1 if cfg.method.name == "mae" else cfg.method.options.images_per_caption
        gflop = flops / images / 1e9
        rate = args.tflops * 1e12 / (flops / images)
        rows[recipe] = {"gflop_per_image": round(gflop, 1),
                        "images_per_s_per_gpu": round(rate),
                        "loader_cores_per_gpu": math.ceil(rate / per_core)}
        print(f"{recipe:18s} {gflop:7.1f} GFLOP an image -> {rate:6.0f} images/s per GPU at "
              f"{args.tflops:.0f} TFLOP/s -> {math.ceil(rate / per_core)} loader cores at "
              f"{per_core:.0f} images/s a core", flush=True)
    out = ROOT / "benchmarks/results/recipe_flops.json"
    out.write_text(json.dumps({"assumed_tflops_per_gpu": args.tflops,
                               "loader_images_per_s_per_core": per_core, "recipes": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)  # full-size checkpoints: gigabytes
    return 0


if __name__ == "__main__":
    sys.exit(main())
