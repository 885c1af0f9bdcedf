"""MAE, MixedAE and SynCLR on the quickstart's 28 px ViT: step cost side by side, then probes.

Every method is the quickstart encoder (``vit_tiny_p7_28``, 1 channel, 28 px) trained on 256 images
per step. Two parts, printed beside the target (exit status 1 when it is missed):

``throughput``  In one process, each method built exactly as training builds it
    (``build_method`` on ``configs/mae_fashion.yaml``, ``configs/mixedae_fashion.yaml``,
    ``configs/quickstart.yaml``; AdamW on the training loop's parameter groups) runs full training
    steps (forward, backward, gradient norm, optimizer step) on random uint8 batches of the shape
    it trains on: (256, 1, 28, 28) images for MAE and MixedAE, (64, 4, 1, 28, 28) caption groups
    for SynCLR, the same 256 images. After a warm-up the methods take turns (round-robin, the order
    rotated every round) for ``--repeats`` rounds of ``--rep-steps`` steps; medians are reported.
    Target: MixedAE's step time at most 10 % above MAE's (the MixedAE paper reports +3 %).
``probes``  Each method trained as ``synrep run`` trains it, for the same ``--steps`` x 256
    images: MAE and MixedAE on the real Fashion-MNIST train images (their configs' data, labels
    unused) and on the quickstart's synthetic shards (5,000 grammar captions x 4 fashion-mini
    images); SynCLR on those shards. Every run is evaluated with the same frozen-feature
    protocol on the real Fashion-MNIST test set: L-BFGS linear probe (C chosen on a validation
    split of the real train set) and kNN (k = 20) on the CLS + mean patch token of the last 4
    blocks. No target: this is a measurement.

    python benchmarks/mae_family.py [--steps 500] [--skip-probes] [--quick] [--threads N]

The synthetic shards are ``runs/bench/quickstart/images`` (``--shards``); when they are missing the
benchmark says how to render them. Every run is an ordinary resumable synrep run under
``runs/bench/mae_family/`` (``--work``): finished runs are reused and a killed benchmark resumes.
Results go to ``benchmarks/results/mae_family.json``. ``--quick`` is a smoke test (20 steps, a few
timing rounds, evaluation on 2,000 train / 1,000 test images; runs named ``quick_*``, results in
``runs/bench/mae_family/quick.json``): its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import QUICK_EVAL_LIMITS, run, run_options, verdict, write_results  # noqa: E402

from synrep.config import Config, load_config  # noqa: E402
from synrep.factory import build_method, build_optimizer  # noqa: E402
from synrep.layout import RunLayout  # noqa: E402
from synrep.train.step import step_seed, train_step  # noqa: E402

IMAGES_PER_STEP = 256
TARGET_OVERHEAD = 0.10  # MixedAE step time / MAE step time - 1
QUICKSTART_DIR = Path("runs/bench/quickstart")

# name -> (label, config, trains on caption groups): the throughput part and the probes' methods.
METHODS: dict[str, tuple[str, str, bool]] = {
    "mae": ("MAE", "configs/mae_fashion.yaml", False),
    "mixedae": ("MixedAE", "configs/mixedae_fashion.yaml", False),
    "synclr": ("SynCLR", "configs/quickstart.yaml", True),
}
# probe run name -> (method, data): "real" = the config's own data (the real train images),
# "synthetic" = the quickstart's shards.
PROBES: dict[str, tuple[str, str]] = {
    "mae_real": ("mae", "real"),
    "mixedae_real": ("mixedae", "real"),
    "mae_synthetic": ("mae", "synthetic"),
    "mixedae_synthetic": ("mixedae", "synthetic"),
    "synclr_synthetic": ("synclr", "synthetic"),
}
# One evaluation for every run, whatever its config says (the quickstart's differs).
EVAL = ["eval.protocols=[linear,knn]", "eval.pool=cls+avg", "eval.n_last_blocks=4",
        "eval.weights=student", "eval.knn_k=20",
        "eval.linear_cs=[0.001,0.01,0.1,1.0,10.0,100.0,1000.0]"]


def _batch_overrides(groups: bool, cfg: Config) -> list[str]:
    """``train.batch_size`` that makes IMAGES_PER_STEP images a step (captions x images each for
    caption-group methods)."""
    if not groups:
        return [f"train.batch_size={IMAGES_PER_STEP}"]
    m = cfg.method.options.images_per_caption
    if IMAGES_PER_STEP % m:
        raise SystemExit(f"{IMAGES_PER_STEP} images per step is not a whole number of caption "
                         f"groups of {m} images")
    return [f"train.batch_size={IMAGES_PER_STEP // m}"]


# ---------------------------------------------------------------------------------------------
# Throughput


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class _Trainee:
    """One method with its optimizer, stepping as ``synrep train`` does
    (:func:`synrep.train.step.train_step`; fp32, one process, constant peak lr: the schedules do
    not change a step's cost)."""

    def __init__(self, name: str, rep_steps: int) -> None:
        _, config, groups = METHODS[name]
        base = load_config(config)
        self.cfg = load_config(config, _batch_overrides(groups, base))
        self.method = build_method(self.cfg).train()
        self.opt = build_optimizer(self.cfg, self.method)
        c, s = self.cfg.model.in_chans, self.cfg.model.img_size
        b = self.cfg.train.batch_size
        m = self.cfg.method.options.images_per_caption if groups else 0
        self.shape = (b, m, c, s, s) if groups else (b, c, s, s)
        gen = torch.Generator().manual_seed(0)
        # Made before timing: the steps are measured without data loading.
        self.batches = [{"images": torch.randint(0, 256, self.shape, dtype=torch.uint8,
                                                 generator=gen)} for _ in range(rep_steps)]
        self.step_count = 0

    def steps(self, n: int) -> float:
        """Run ``n`` training steps; return the seconds they took."""
        t = time.perf_counter()
        for i in range(n):
            step = self.step_count
            self.method.set_step(step)
            seed = step_seed(self.cfg.run.seed, step, 0)
            torch.manual_seed(seed)
            train_step(self.method, self.method, self.opt, self.batches[i % len(self.batches)],
                       torch.Generator().manual_seed(seed), grad_clip=self.cfg.optim.grad_clip)
            self.step_count += 1
        return time.perf_counter() - t


def throughput_part(args) -> tuple[dict, list[str]]:
    names = list(METHODS)
    trainees = {n: _Trainee(n, args.rep_steps) for n in names}
    for n in names:  # warm-up (allocator, first-call paths), not timed
        trainees[n].steps(args.warmup)
    per_step: dict[str, list[float]] = {n: [] for n in names}
    for r in tqdm(range(args.repeats), desc="throughput rounds", dynamic_ncols=True):
        order = names[r % len(names):] + names[: r % len(names)]  # no method always goes first
        for n in order:
            per_step[n].append(trainees[n].steps(args.rep_steps) / args.rep_steps)
    med = {n: statistics.median(v) for n, v in per_step.items()}
    overhead = med["mixedae"] / med["mae"] - 1
    ok = overhead <= TARGET_OVERHEAD
    res = {
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "repeats": args.repeats, "steps_per_repeat": args.rep_steps, "warmup_steps": args.warmup,
        "methods": {n: {"config": METHODS[n][1], "batch_shape": list(trainees[n].shape),
                        "images_per_step": IMAGES_PER_STEP, "seconds_per_step": med[n],
                        "images_per_s": IMAGES_PER_STEP / med[n],
                        "seconds_per_step_rounds": per_step[n]} for n in names},
        "mixedae_overhead": overhead, "target_mixedae_overhead": TARGET_OVERHEAD, "ok": ok,
    }
    print(f"\nTraining-step throughput, side by side in one process ({_n(res['threads'], 'thread')}"
          f"; median of {_n(args.repeats, 'round')} x {_n(args.rep_steps, 'step')}, after "
          f"{_n(args.warmup, 'warm-up step')} each)\n")
    print("| method | batch | s/step | images/s | step time vs MAE |")
    print("|---|---|---|---|---|")
    for n in names:
        shape = " x ".join(map(str, trainees[n].shape))
        print(f"| {METHODS[n][0]} | {shape} | {med[n]:.3f} | {IMAGES_PER_STEP / med[n]:.0f} | "
              f"{med[n] / med['mae']:.3f}x |")
    print(f"\nMixedAE overhead over MAE: {100 * overhead:+.1f} % (target <= "
          f"{100 * TARGET_OVERHEAD:.0f} %; the paper: +3 %) {'ok' if ok else 'MISSED'}")
    return res, ([] if ok else ["MixedAE step-time overhead over MAE"])


# ---------------------------------------------------------------------------------------------
# Probes


def check_shards(shards: Path) -> None:
    """Stop with the command that renders the synthetic shards when they are not complete."""
    if shards.resolve() == (QUICKSTART_DIR / "images").resolve():
        from synrep.images.stage import images_complete

        done = images_complete(load_config(METHODS["synclr"][1], [f"run.dir={QUICKSTART_DIR}"]))
    else:
        done = (shards / "sizes.json").is_file()
    if not done:
        print(f"no complete synthetic shards at {str(shards)!r}. Render the quickstart's images "
              "(5,000 captions x 4 images) with\n"
              f"    synrep run configs/quickstart.yaml run.dir={QUICKSTART_DIR} "
              "\"run.stages=[captions,images]\"\n"
              "(or `python benchmarks/synclr_ablation.py`, which runs the whole quickstart there), "
              "or pass --shards DIR; --skip-probes needs no shards.", file=sys.stderr)
        raise SystemExit(2)


def probe_run(args, name: str) -> dict:
    method, data = PROBES[name]
    label, config, groups = METHODS[method]
    base = load_config(config)
    over = ["run.stages=[train,eval]", f"train.steps={args.steps}",
            *_batch_overrides(groups, base), *EVAL]
    if data == "real":
        if base.data.source != "dataset":
            raise SystemExit(f"{config}: data.source is {base.data.source!r}, not the real "
                             "train images this row needs")
    else:
        over += ["data.source=shards", f"data.shards={args.shards}"]
    over += run_options(args)
    run_dir = Path(args.work) / f"{'quick_' if args.quick else ''}{name}_{args.steps}"
    res = run(config, run_dir, over)
    summary = json.loads(RunLayout(run_dir).train_summary.read_text())
    return {"method": label, "data": data, "config": config, "run_dir": str(run_dir),
            "steps": args.steps, "images_per_step": IMAGES_PER_STEP,
            "data_source": (str(args.shards) if data == "synthetic"
                            else f"{base.data.dataset}/{base.data.split}"),
            # the last training session of the run (all of it unless it was resumed), data
            # loading, logging and checkpoints included
            "train_seconds_per_step": summary["seconds"] / max(summary["steps"], 1),
            "linear_probe_top1": res["linear_probe_top1"], "knn_top1": res["knn_top1"],
            "linear_probe_best_c": res.get("linear_probe_best_c"),
            "eval_limit": list(QUICK_EVAL_LIMITS) if args.quick else None}


def probes_part(args) -> dict:
    rows = {name: probe_run(args, name) for name in PROBES}
    data_label = {"real": "real Fashion-MNIST train", "synthetic": "quickstart synthetic"}
    print(f"\nProbes after {args.steps} steps x {IMAGES_PER_STEP} images; linear probe and kNN "
          "on the real Fashion-MNIST test set (CLS + mean patch, last 4 blocks)"
          + (" -- QUICK: limited evaluation, figures meaningless" if args.quick else "") + "\n")
    print("| method | data | steps | s/step (train) | linear top-1 | kNN top-1 |")
    print("|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['method']} | {data_label[r['data']]} | {r['steps']} | "
              f"{r['train_seconds_per_step']:.3f} | {r['linear_probe_top1']:.2f} % | "
              f"{r['knn_top1']:.2f} % |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every probe run (default 500; 20 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 20 steps, 3 timing rounds of 1 step, evaluation on 2,000 "
                   "train / 1,000 test images, runs named quick_*, results in WORK/quick.json")
    p.add_argument("--skip-probes", action="store_true", help="measure the throughput only")
    p.add_argument("--repeats", type=int, default=None,
                   help="timing rounds (default 7; 3 with --quick)")
    p.add_argument("--rep-steps", type=int, default=None,
                   help="training steps per method per round (default 5; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for everything (default 0: torch's default)")
    p.add_argument("--shards", default=str(QUICKSTART_DIR / "images"),
                   help="synthetic caption-group shards (default: the quickstart's images)")
    p.add_argument("--work", default="runs/bench/mae_family")
    p.add_argument("--json", default=None, help="results file (default "
                   "benchmarks/results/mae_family.json; WORK/quick.json with --quick)")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (20 if args.quick else 500)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    args.rep_steps = args.rep_steps if args.rep_steps is not None else (1 if args.quick else 5)
    for key in ("steps", "repeats", "rep_steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    args.shards = Path(args.shards)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out_path = Path(args.json or (Path(args.work) / "quick.json" if args.quick
                                  else "benchmarks/results/mae_family.json"))
    if not args.skip_probes:
        check_shards(args.shards)  # before minutes of timing, not after

    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results["quick"] = args.quick

    def save() -> None:
        write_results(out_path, results)

    results["throughput"], fails = throughput_part(args)
    save()
    if not args.skip_probes:
        results["probes"] = probes_part(args)
        # the throughput table again, so both tables end the output together
        t = results["throughput"]
        print("\n| method | s/step (side by side) | images/s |")
        print("|---|---|---|")
        for n, m in t["methods"].items():
            print(f"| {METHODS[n][0]} | {m['seconds_per_step']:.3f} | {m['images_per_s']:.0f} |")
        print(f"MixedAE overhead over MAE: {100 * t['mixedae_overhead']:+.1f} % "
              f"(target <= {100 * TARGET_OVERHEAD:.0f} %)")
        save()
    print(f"\nresults: {out_path}")
    return verdict(fails)


if __name__ == "__main__":
    sys.exit(main())
