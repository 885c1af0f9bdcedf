"""Image-stage speed: the shipped mini model's rendering rate, and the stage's overhead over bare
pipeline calls on the same batches.

1. Rendering rate of `images.pipeline` (default: the shipped fashion-mini) at its default steps
   and guidance 2.5, batch 128, through the stage's renderer; median of 3 runs.
2. Overhead: the whole images stage (reading caption shards, per-image generators, NaN/blank
   checks, PNG encoding, tar writing, markers) on N captions x 4 images, against bare
   `pipeline(prompt=..., generator=...)` calls on the same batches; the two are timed
   alternately, 3 rounds, medians compared.

    python benchmarks/images.py [--pipeline fashion-mini] [--captions 128] [--json OUT]

Targets: >= 50 images/s (fashion-mini, 2 CPU cores); overhead <= 10 %. Exits 1 on a miss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from synrep.captions.stage import run_captions
from synrep.config import load_config
from synrep.images.render import Renderer
from synrep.images.stage import run_images

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "captions_fashion.yaml"
TARGET_RATE = 50.0
TARGET_OVERHEAD = 0.10


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default="fashion-mini")
    p.add_argument("--captions", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as d:
        over = [f"run.dir={d}/run", f"captions.num={args.captions}",
                f"captions.shard_size={args.captions}", f"images.pipeline={args.pipeline}",
                f"images.batch_size={args.batch}", f"images.shard_size={args.captions}"]
        cfg = load_config(CONFIG, over)
        run_captions(cfg)
        rows = [json.loads(line) for line in
                (Path(d) / "run" / "captions" / "captions-00000.jsonl").read_text().splitlines()]
        k = cfg.images.images_per_caption
        prompts = [r["caption"] for r in rows for _ in range(k)]
        renderer = Renderer(cfg.images)
        pipe = renderer.pipe
        steps, res = renderer.steps, renderer.resolution

        def bare() -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                for s in range(0, len(prompts), args.batch):
                    gens = [torch.Generator().manual_seed(i)
                            for i in range(s, min(len(prompts), s + args.batch))]
                    pipe(prompt=prompts[s:s + args.batch], num_inference_steps=steps,
                         guidance_scale=cfg.images.guidance_scale, generator=gens,
                         height=res, width=res, output_type="pt")
            return time.perf_counter() - t

        def stage(r: int) -> float:
            c = load_config(CONFIG, [*over[1:], f"run.dir={d}/stage{r}"])
            c.images.captions = str(Path(d) / "run" / "captions")
            t = time.perf_counter()
            run_images(c)
            return time.perf_counter() - t

        bare()  # warm-up
        bare_t, stage_t = [], []
        for r in range(args.repeats):
            bare_t.append(bare())
            stage_t.append(stage(r))
    rate = len(prompts) / statistics.median(stage_t)
    overhead = statistics.median(stage_t) / statistics.median(bare_t) - 1
    checks = [("rendering rate (stage)", f"{rate:.1f} images/s", f">= {TARGET_RATE:.0f}",
               rate >= TARGET_RATE),
              ("stage overhead", f"{overhead * 100:+.1f} % (stage {statistics.median(stage_t):.2f}"
               f" s vs bare {statistics.median(bare_t):.2f} s)", "<= 10 %",
               overhead <= TARGET_OVERHEAD)]
    print(f"images benchmark: {args.pipeline}, {len(prompts)} images ({args.captions} captions "
          f"x {k}), {steps} steps, guidance {cfg.images.guidance_scale}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    for name, value, target, ok in checks:
        print(f"  {name:24s} {value:44s} target {target:8s} {'OK' if ok else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "pipeline": args.pipeline, "images": len(prompts), "steps": steps,
            "threads": torch.get_num_threads(), "stage_seconds": stage_t,
            "bare_seconds": bare_t, "images_per_s": rate, "overhead": overhead,
            "targets": {"images_per_s": TARGET_RATE, "overhead": TARGET_OVERHEAD}},
            indent=2) + "\n")
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
