"""Training-step throughput of a 28 px encoder against this machine's fp32 matmul rate.

Counts the FLOPs of one real training step (augmentation excluded; forward + backward + optimizer
of the encoder and projection head) with torch's FlopCounterMode, times repeated steps, and
compares the achieved rate with a square fp32 matmul measured in the same run. The matmul rate is
the roofline a dense training step can approach on a CPU.

    python benchmarks/train_throughput.py [--backbone vit_tiny_p7_28] [--batch 256] [--json OUT]

Target: a training step reaches at least 40 % of the fp32 matmul rate. Exits 1 when missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from synrep.config import load_config
from synrep.factory import build_method

TARGET_FRACTION = 0.40


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """Best-of-``repeats`` rate of an n x n fp32 matmul (the machine's dense roofline)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vit_tiny_p7_28")
    p.add_argument("--batch", type=int, default=256, help="images per step (one view each)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="timing rounds; medians are reported")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    cfg = load_config(None, [f"model.backbone={args.backbone}", "method.name=supervised"])
    method = build_method(cfg)
    encoder, head = method.encoder, method.classifier
    params = [p for p in method.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.rand(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16"
           else torch.autocast("cpu", enabled=False))

    def step() -> None:
        with ctx:
            loss = torch.nn.functional.cross_entropy(head(encoder(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    n_params = sum(p.numel() for p in encoder.parameters())
    for _ in range(3):
        step()  # warm-up
    # Rounds alternate training steps and matmuls, so both see the same machine state; the
    # reported figures are medians over rounds.
    rates, mms = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        rates.append(args.steps / (time.perf_counter() - t))
        mms.append(matmul_gflops())
    steps_per_s = statistics.median(rates)
    mm = statistics.median(mms)
    achieved = flops * steps_per_s / 1e9
    frac = achieved / mm
    res = {
        "backbone": args.backbone, "params": n_params, "batch": args.batch,
        "precision": args.precision, "threads": torch.get_num_threads(),
        "gflop_per_step": flops / 1e9, "images_per_s": steps_per_s * args.batch,
        "achieved_gflops": achieved, "matmul_gflops": mm, "fraction_of_matmul": frac,
        "target_fraction": TARGET_FRACTION,
    }
    print(f"backbone {args.backbone} ({n_params / 1e6:.2f}M params), batch {args.batch}, "
          f"{args.precision}, {torch.get_num_threads()} threads")
    print(f"  training step      {flops / 1e9:8.2f} GFLOP   (forward + backward, FlopCounterMode)")
    print(f"  throughput         {res['images_per_s']:8.0f} images/s (median of {args.repeats})")
    print(f"  achieved           {achieved:8.1f} GFLOP/s")
    print(f"  fp32 matmul        {mm:8.1f} GFLOP/s (2048^2, interleaved)")
    ok = frac >= TARGET_FRACTION
    print(f"  fraction           {frac * 100:8.1f} %      target >= {TARGET_FRACTION * 100:.0f} %"
          f"  {'OK' if ok else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
