"""The main job's time on each class of CPU: native (bf16 where the chip has it) and AVX2-only.

    python benchmarks/demo_time.py                       # both settings, every part
    python benchmarks/demo_time.py --settings avx2 --parts step
    python benchmarks/demo_time.py --parts test          # `pytest --durations=10` per setting

Settings (each part runs in fresh processes with the setting's environment):

- ``native``: this machine as it is.
- ``avx2``: this machine run as an AVX2-only CPU: ``ATEN_CPU_CAPABILITY=avx2`` (PyTorch's
  kernels), ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN) and ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (MKL's
  matmuls, which the other two leave at AVX512); PyTorch then reports AVX2 kernels, so
  ``train.precision: auto`` trains in fp32. The fp32 matmul rate measured in the same setting
  shows whether the emulation behaves like an AVX2 CPU (2-core AVX2 machines measure about
  140-155 GFLOP/s).

Parts:

- ``step``: the fp32 matmul rate (2048^3, best of 5) and the quickstart's real training step
  (the demo's recipe for that setting, on a batch of the demo's images when ``--shards`` has
  them, else random pixels), FLOPs counted by torch's ``FlopCounterMode``; its achieved rate as a
  share of the matmul rate. Target on ``avx2``: >= 70 %.
- ``demo``: ``synrep run quickstart`` from scratch into ``RUN_ROOT/<setting>``: the wall time
  (what ``make demo`` runs after set-up) and the linear probe. Targets: <= 15 min, >= 88.0 %.
- ``test``: ``pytest -q --durations=10`` in the setting: wall time and the slowest tests.
  Targets: <= 30 min, no test over 2 min.

Figures are printed beside their targets and written to ``--json``; the exit status is 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import verdict, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
TARGETS = {"demo_minutes": 15.0, "linear_top1": 88.0, "step_share_avx2": 0.70,
           "test_minutes": 30.0, "slowest_test_s": 120.0}

# Runs in a fresh process of the setting: the matmul rate, then the demo's real step.
STEP = r"""
import json, statistics, sys, time
import torch
from torch.utils.flop_counter import FlopCounterMode
from synrep.config import load_config
from synrep.device import autocast_for, choose_attention, resolve_precision
from synrep.factory import build_method, build_optimizer, build_source
from synrep.train.step import train_step

def matmul(n=2048, repeats=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times) / 1e9

shards, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config("quickstart", ["run.dir=/nonexistent", *overrides])
cpu = torch.device("cpu")
precision = resolve_precision(cfg.train.precision, cpu)
torch.manual_seed(0)
method = build_method(cfg)
attention = choose_attention(method, cpu, precision)
optimizer = build_optimizer(cfg, method)
k = cfg.method.options.images_per_caption
if shards:
    cfg.data.shards = shards
    source = build_source(cfg, method.batch_kind, texts=False, each_image=method.each_image)
    batch = next(iter(source.batches(0, 1)))
    images = "the demo's"
else:
    batch = {"images": torch.randint(0, 256, (cfg.train.batch_size, k, 1, 28, 28),
                                     dtype=torch.uint8)}
    images = "random"
g = torch.Generator().manual_seed(0)
autocast = autocast_for(precision, cpu)
with FlopCounterMode(display=False) as counter:
    train_step(method, method, optimizer, batch, g, autocast=autocast)
flops = counter.get_total_flops()
for _ in range(2):
    train_step(method, method, optimizer, batch, g, autocast=autocast)
rounds = []
for _ in range(5):
    t = time.perf_counter()
    for _ in range(3):
        train_step(method, method, optimizer, batch, g, autocast=autocast)
    rounds.append((time.perf_counter() - t) / 3)
step = statistics.median(rounds)
rate = matmul()
print("RESULT " + json.dumps({
    "precision": precision, "attention": attention, "kernels":
    torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
    "images": images, "images_per_step": int(batch["images"].shape[:-3].numel()),
    "gflop_per_step": flops / 1e9, "step_ms": step * 1e3, "step_ms_rounds":
    [r * 1e3 for r in rounds], "achieved_gflops": flops / step / 1e9, "matmul_gflops": rate,
    "share": flops / step / 1e9 / rate}))
"""


def _env(setting: str) -> dict[str, str]:
    return {**os.environ, **SETTINGS[setting]}


def recipe_overrides(setting: str) -> list[str]:
    """The overrides the demo runs with in ``setting``: none, the shipped quickstart chooses its
    recipe from the CPU itself (recorded in results.json)."""
    return []


def part_step(setting: str, shards: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", STEP, shards, *recipe_overrides(setting)],
                          cwd=ROOT, env=_env(setting), capture_output=True, text=True,
                          timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"step ({setting}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def part_demo(setting: str, run_root: Path) -> dict:
    run = run_root / setting
    if run.exists():
        raise SystemExit(f"{run} exists: the demo is timed from scratch; remove it or choose "
                         "another --run-root")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "synrep", "run", "quickstart",
                           f"run.dir={run}"], cwd=ROOT, env=_env(setting), timeout=7200)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"the demo ({setting}) failed with exit code {proc.returncode}")
    res = json.loads((run / "eval/results.json").read_text())["fashion-mnist"]
    env = json.loads((run / "train/env.json").read_text())
    summary = json.loads((run / "train/summary.json").read_text())
    return {"wall_minutes": wall / 60, "linear_top1": res["linear_probe_top1"],
            "knn_top1": res.get("knn_top1"), "sgd_top1": res.get("sgd_probe_top1"),
            "train_seconds": summary["seconds"], "train_images_per_s": summary["samples_per_s"],
            "precision": env["precision"], "trained_with": res.get("trained_with"),
            "eval_timings": res.get("timings")}


def part_test(setting: str) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--durations=10", "-rf"], cwd=ROOT, env=_env(setting),
                          capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - t
    out = proc.stdout
    durations = [(float(m.group(1)), m.group(3)) for m in
                 re.finditer(r"^([0-9.]+)s (call|setup|teardown)\s+(\S+)$", out, re.M)]
    summary = next((x for x in reversed(out.splitlines()) if " in " in x and "passed" in x), "")
    failed = [x.split()[1] for x in out.splitlines() if x.startswith("FAILED ")]
    return {"wall_minutes": wall / 60, "passed": proc.returncode == 0, "summary": summary,
            "failed": failed,
            "slowest": [{"seconds": s, "test": name} for s, name in durations]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="native,avx2")
    p.add_argument("--parts", default="step,demo,test")
    p.add_argument("--run-root", default="runs/demo_time")
    p.add_argument("--shards", default="", help="the demo's images for the step part (default: "
                   "RUN_ROOT/<setting>/images when the demo part ran first)")
    p.add_argument("--json", default="benchmarks/results/demo_time.json")
    args = p.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    parts = [x for x in args.parts.split(",") if x]
    bad = [s for s in settings if s not in SETTINGS] + \
        [x for x in parts if x not in ("step", "demo", "test")]
    if bad:
        p.error(f"unknown setting or part {bad[0]!r}")
    run_root = (ROOT / args.run_root).resolve()
    out: dict = {"cpu": _cpu_name(), "settings": {s: SETTINGS[s] for s in settings}}
    fails: list[str] = []
    for setting in settings:
        res: dict = {}
        if "demo" in parts:
            res["demo"] = d = part_demo(setting, run_root)
            print(f"[{setting}] demo: {d['wall_minutes']:.1f} min (target <= "
                  f"{TARGETS['demo_minutes']:.0f}), linear {d['linear_top1']:.2f} % (target >= "
                  f"{TARGETS['linear_top1']}), {d['precision']}, training {d['train_seconds']:.0f}"
                  f" s at {d['train_images_per_s']:.0f} images/s, trained with {d['trained_with']}")
            if d["wall_minutes"] > TARGETS["demo_minutes"]:
                fails.append(f"{setting} demo {d['wall_minutes']:.1f} min")
            if d["linear_top1"] < TARGETS["linear_top1"]:
                fails.append(f"{setting} linear {d['linear_top1']:.2f} %")
        if "step" in parts:
            shards = args.shards or str(run_root / setting / "images")
            shards = shards if Path(shards).is_dir() else ""
            res["step"] = s = part_step(setting, shards)
            print(f"[{setting}] step: {s['step_ms']:.0f} ms for {s['images_per_step']} images "
                  f"({s['images']}), {s['gflop_per_step']:.1f} GFLOP, {s['achieved_gflops']:.0f}"
                  f" GFLOP/s = {100 * s['share']:.1f} % of the fp32 matmul rate "
                  f"{s['matmul_gflops']:.0f} GFLOP/s ({s['precision']}, {s['kernels']} kernels)"
                  + (f"; target >= {100 * TARGETS['step_share_avx2']:.0f} %"
                     if setting == "avx2" else ""))
            if setting == "avx2" and s["share"] < TARGETS["step_share_avx2"]:
                fails.append(f"avx2 step {100 * s['share']:.1f} % of the matmul rate")
        if "test" in parts:
            res["test"] = t = part_test(setting)
            slowest = max((x["seconds"] for x in t["slowest"]), default=0.0)
            print(f"[{setting}] tests: {t['wall_minutes']:.1f} min (target <= "
                  f"{TARGETS['test_minutes']:.0f}), {t['summary']}; slowest {slowest:.0f} s "
                  f"(target <= {TARGETS['slowest_test_s']:.0f})")
            for x in t["slowest"]:
                print(f"    {x['seconds']:7.1f} s  {x['test']}")
            for name in t["failed"]:
                print(f"    FAILED {name}")
            if not t["passed"]:
                fails.append(f"{setting} tests failed")
            if t["wall_minutes"] > TARGETS["test_minutes"]:
                fails.append(f"{setting} tests {t['wall_minutes']:.1f} min")
            if slowest > TARGETS["slowest_test_s"]:
                fails.append(f"{setting} slowest test {slowest:.0f} s")
        out[setting] = res
    path = ROOT / args.json
    old = json.loads(path.read_text()) if path.exists() else {}
    for setting in settings:  # keep other settings' and parts' figures from earlier runs
        old.setdefault(setting, {}).update(out.pop(setting))
    old.update(out)
    write_results(path, old)
    return verdict(fails)


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((x.split(":", 1)[1].strip() for x in text.splitlines()
                 if x.startswith("model name")), "unknown")
    flags = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return f"{name} ({'AVX512-BF16' if 'avx512_bf16' in flags else 'no AVX512-BF16'}, " \
           f"{os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
