"""JEST on a noisy synthetic pool: does choosing the data with models save compute?

Three parts, each printed beside the issue's targets (exit status 1 when one is missed):

``selection``  The quickstart's synthetic pool (5,000 captions x 4 images) with half of the caption
    groups corrupted: a quarter get 4 images of 4 other captions ("swap": the positives do not
    match), a quarter get heavy pixel noise ("noise"). A reference model is trained with the
    normal trainer on a small curated set (1,000 uncorrupted groups) and frozen. Learners train
    the quickstart encoder for the same steps and schedule with f = 0.8 under: uniform (no
    selection), hard learner, easy reference, learnability, Flexi learnability (scores at
    14 px), and Flexi-JEST as the paper runs it (scores at 14 px and trains half of every batch
    at 14 px, with a reference trained the same way). Checkpoints every ``--every`` steps are
    probed (L-BFGS logistic regression on 10,000 real Fashion-MNIST train images, the full real
    test set). Reported: steps and total FLOPs
    (training + learner scoring + the reference's one pass over the pool) to reach uniform's
    final accuracy, and the share of clean groups each policy trained on.
    Targets: learnability needs >= 2x fewer steps and >= 1.3x fewer FLOPs than uniform, and
    beats hard learner and easy reference. Each saving is checked on the learnability variant
    that does best on it (the paper's iteration saving is JEST's, its compute saving
    Flexi-JEST's); whether a single variant meets both is reported beside them.
    ``--redundant R`` builds a second pool where a share R of the groups (taken from the clean
    half) are exact copies of 16 curated groups: data that is easy for the reference but, once
    learned, redundant. Easy reference keeps choosing it; learnability should not.
``cost``  Side by side in one process, medians of repeated steps: a uniform step, a JEST step
    (super-batch scored at 28 px), a step that only scores at 14 px, and a Flexi-JEST step
    (scored at 14 px, half the batch trained at 14 px), each including data, scoring, selection
    and the training step. Target: Flexi-JEST <= 1.6x uniform.
``sampler``  The joint sampler alone on given embeddings, 4,096 candidates, f = 0.8, 16 chunks,
    learnability (learner and reference), against the training step of the quickstart ViT on
    what it selects (205 captions x 4 = 820 images), both in the precision the quickstart trains
    in (the sampler's GEMMs follow it: selection.precision=auto). Printed beside it: the fp32
    sampler against that step in fp32, and the share of a step on the quickstart's own batch
    (256 images; its super-batch would hold 1,280 candidates). Target: < 10%.

    python benchmarks/jest.py [--work runs/bench/jest] [--parts selection,cost,sampler]
                              [--pool DIR] [--steps 400] [--every 50]

Every run is an ordinary resumable synrep run under ``--work``: a killed benchmark resumes.
Results go to ``benchmarks/results/jest.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synrep.cli import main as synrep  # noqa: E402
from synrep.config import load_config  # noqa: E402
from synrep.data.shards import CaptionGroup, iter_groups, write_shard, write_sizes  # noqa: E402
from synrep.layout import RunLayout  # noqa: E402

QUICKSTART = "configs/quickstart.yaml"
# half of each batch at 14 px
MIXED = ["method.synclr.low_res_share=0.5", "method.synclr.low_res_size=14"]
POLICIES = {  # name -> selection overrides
    "uniform": [],
    "hard_learner": ["selection.online=true", "selection.score=hard_learner"],
    "easy_reference": ["selection.online=true", "selection.score=easy_reference"],
    "learnability": ["selection.online=true", "selection.score=learnability"],
    "flexi_learnability": ["selection.online=true", "selection.score=learnability",
                           "selection.score_size=14"],
    "learnability_2_images": ["selection.online=true", "selection.score=learnability",
                              "selection.score_images=2"],
    # Flexi-JEST as in the paper: scored at 14 px, and half of every training batch at 14 px too
    # (learner and reference both trained at mixed resolution, so both know the scoring size)
    "flexi_mixed_learnability": ["selection.online=true", "selection.score=learnability",
                                 "selection.score_size=14", *MIXED],
}
# Policies whose reference is trained at mixed resolution (the others use the plain reference)
MIXED_REFERENCE = {"flexi_mixed_learnability"}
REF_STEPS = 400  # the reference's default training steps
LEARNABILITY = ("learnability", "flexi_learnability", "learnability_2_images",
                "flexi_mixed_learnability")
BASE_EVERY = 50  # probe spacing of the main table
TARGETS = {"steps_ratio": 2.0, "flops_ratio": 1.3, "flexi_step_ratio": 1.6, "sampler_share": 0.10}


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"{what} failed with exit code {code}")


# ---------------------------------------------------------------------------------------------
# The noisy pool


def make_pool(args) -> Path:
    """The quickstart's images, rendered once (skipped when complete)."""
    if args.pool:
        return Path(args.pool)
    run_dir = Path(args.work) / "pool"
    _check(synrep(["run", QUICKSTART, f"run.dir={run_dir}", "run.stages=[captions,images]"]),
           "rendering the pool")
    return run_dir / "images"


DUP_SOURCES = 16  # redundant pools: the curated groups that the "dup" groups copy


def corrupt_pool(pool: Path, out: Path, seed: int = 0, redundant: float = 0.0,
                 collapsed: float = 0.0) -> list[str]:
    """Write the pool with half its groups corrupted to ``out/shards``; return each group's kind
    (clean, swap, noise, dup, collapsed), also stored in ``out/kinds.json`` and in every group's
    metadata.

    ``redundant``: this share of the pool (taken from the clean half) becomes exact copies of
    ``DUP_SOURCES`` curated groups: easy for the reference (it trained on them) but redundant,
    so once the learner has fitted them they teach it nothing (JEST's "easy but learned" data).
    ``collapsed``: this share of the pool (taken from the clean half) shows a generator's mode
    collapse: all images of the caption are the same image (its first). Their positives match
    exactly, so every model, the reference included, finds them easy, and a learner fits them
    quickly; they carry less than a group of distinct images of one caption.
    """
    kinds_path = out / "kinds.json"
    if kinds_path.exists():
        return json.loads(kinds_path.read_text())
    groups = list(iter_groups(pool))
    rng = np.random.default_rng(seed)
    n = len(groups)
    order = rng.permutation(n)
    kinds = ["clean"] * n
    for i in order[: n // 4]:
        kinds[i] = "swap"
    for i in order[n // 4 : n // 2]:
        kinds[i] = "noise"
    n_dup, n_col = round(redundant * n), round(collapsed * n)
    if not (0 <= n_dup and 0 <= n_col and n_dup + n_col <= n // 2 - 1000 - DUP_SOURCES):
        raise SystemExit(f"--redundant {redundant} --collapsed {collapsed}: together at most "
                         f"{(n // 2 - 1016) / n:.2f} of this {n}-group pool (half stays clean, "
                         "1,000 clean groups are curated)")
    for i in order[n - n_dup:]:
        kinds[i] = "dup"
    for i in order[n - n_dup - n_col : n - n_dup]:
        kinds[i] = "collapsed"
    curated_idx = [i for i in range(n) if kinds[i] == "clean"][:1000]
    sources = curated_idx[:DUP_SOURCES]
    shard, written = [], 0
    for i, g in enumerate(groups):
        images, caption = g.images, g.caption
        if kinds[i] == "dup":  # an exact copy of one of the curated source groups
            src = groups[sources[rng.integers(len(sources))]]
            images, caption = src.images, src.caption
        elif kinds[i] == "swap":  # every image from another random caption
            others = rng.choice(np.delete(np.arange(n), i), size=len(images), replace=False)
            images = [groups[j].images[rng.integers(len(groups[j].images))] for j in others]
        elif kinds[i] == "collapsed":  # the generator drew one image for every seed
            images = [images[0]] * len(images)
        elif kinds[i] == "noise":  # heavy noise: 80% uniform noise, 20% image
            images = [np.clip(0.2 * im + 0.8 * rng.uniform(0, 255, im.shape), 0, 255)
                      .astype(np.uint8) for im in images]
        shard.append(CaptionGroup(key=g.key, caption=caption, images=images,
                                  meta={**g.meta, "corrupt": kinds[i]}))
        if len(shard) == 1000 or i == n - 1:
            write_shard(out / "shards" / f"{written:05d}.tar", shard)
            shard, written = [], written + 1
    write_sizes(out / "shards")
    curated = [groups[i] for i in curated_idx]
    write_shard(out / "curated" / "00000.tar", curated)
    write_sizes(out / "curated")
    kinds_path.write_text(json.dumps(kinds))
    return kinds


# ---------------------------------------------------------------------------------------------
# Runs and probes


def probe(checkpoint: Path, out_dir: Path) -> float:
    """Linear-probe top-1 (%) of a checkpoint on real Fashion-MNIST, cached in ``out_dir``."""
    from synrep.eval.stage import evaluate_checkpoint

    done = out_dir / "probe.json"
    if done.exists():
        return json.loads(done.read_text())["top1"]
    cfg = load_config(QUICKSTART, [f"run.dir={out_dir}", "eval.protocols=[linear]",
                                   "eval.limit_train=10000", "eval.pca_images=0",
                                   "eval.linear_cs=[1.0,10.0,100.0]"])
    res = evaluate_checkpoint(cfg, checkpoint)["fashion-mnist"]
    done.write_text(json.dumps({"top1": res["linear_probe_top1"]}))
    return res["linear_probe_top1"]


def train_policy(args, work: Path, name: str, shards: Path, reference: Path, every: int) -> Path:
    """Train one policy, keeping the weights every ``every`` steps (its own run directory per
    spacing: the trajectory is the same, only more checkpoints are kept)."""
    run_dir = work / (name if every == BASE_EVERY else f"{name}_every{every}")
    if args.seed:  # the learner's seed (initialisation, data order, augmentation, sampling)
        run_dir = run_dir.with_name(f"{run_dir.name}_seed{args.seed}")
    over = [f"run.dir={run_dir}", f"run.seed={args.seed}", f"data.shards={shards}",
            f"train.steps={args.steps}",
            f"train.keep_every={every}", "selection.filter_ratio=0.8",
            f"selection.reference={reference}", *POLICIES[name]]
    t = time.perf_counter()
    _check(synrep(["train", QUICKSTART, *over]), f"training {name}")
    print(f"[{name}] trained in {(time.perf_counter() - t) / 60:.1f} min")
    return run_dir


def curve(args, run_dir: Path, stop_at: float | None = None) -> dict[int, float]:
    """Probe accuracy at every kept checkpoint, in step order; with ``stop_at``, stop at the first
    that reaches it (the final checkpoint is always probed)."""
    runs = RunLayout(run_dir)
    steps = sorted(int(p.stem.split("_")[1]) for p in runs.checkpoints.glob("step_*.safetensors"))
    out: dict[int, float] = {}
    for s in steps:
        out[s] = probe(runs.step_checkpoint(s), run_dir / "probe" / f"step_{s:06d}")
        print(f"  {run_dir.name} step {s}: {out[s]:.2f} %")
        if stop_at is not None and out[s] >= stop_at:
            break
    if args.steps not in out:
        out[args.steps] = probe(runs.step_checkpoint(args.steps),
                                run_dir / "probe" / f"step_{args.steps:06d}")
    return out


def kind_shares(run_dir: Path, kinds: list[str]) -> dict[str, float] | None:
    """The share of each kind of group among those a selecting run trained on."""
    path = RunLayout(run_dir).selected_ids
    if not path.exists():
        return None
    ids = [i for line in path.read_text().splitlines() for i in json.loads(line)["ids"]]
    return {k: sum(kinds[i] == k for i in ids) / len(ids) for k in sorted(set(kinds))}


def pool_tag(args) -> str:
    """The suffix naming a pool other than the default one, or a reference trained for other
    than the default steps (its runs and results key)."""
    tag = f"_redundant{round(100 * args.redundant)}" if args.redundant else ""
    tag += f"_collapsed{round(100 * args.collapsed)}" if args.collapsed else ""
    return tag + (f"_ref{args.ref_steps}" if args.ref_steps != REF_STEPS else "")


def _selection_key(args) -> str:
    """The results key of this probe spacing and pool, before any seed suffix."""
    key = "selection" if args.every == BASE_EVERY else f"selection_every{args.every}"
    return key + pool_tag(args)


def result_key(args, seed: int | None = None) -> str:
    """Where one seed's selection results go in the results file."""
    seed = args.seed if seed is None else seed
    return _selection_key(args) + (f"_seed{seed}" if seed else "")


def summary_key(args, seeds: list[int]) -> str:
    """Where the summary over ``seeds`` goes: ``_seeds`` for seeds 0-2 (the key every earlier
    summary used), ``_seeds<digits>`` for any other set."""
    return _selection_key(args) + ("_seeds" if seeds == [0, 1, 2]
                                   else "_seeds" + "".join(map(str, seeds)))


def selection_seeds(args, results: dict) -> list[str]:
    """The selection part for each of ``--seeds``; with several (or with ``--summarize``), the
    summary over them decides."""
    fails = []
    for seed in args.seeds:
        args.seed = seed
        fails += [f"seed {seed}: {f}" for f in selection_part(args, results)]
    seeds = args.summarize or args.seeds
    if len(seeds) == 1:
        return fails
    return seed_summary(args, results, seeds)


def stored_seed_results(args, results: dict, seeds: list[int]) -> dict[int, dict]:
    """Each seed's stored selection results, checked to be runs of this benchmark's settings."""
    runs = {}
    for s in seeds:
        key = result_key(args, s)
        if key not in results:
            raise SystemExit(f"no results for seed {s} under {key!r} in {args.json}: run it with "
                             f"--seeds {s} (and the same --every, --ref-steps and pool options)")
        r = results[key]
        if (r["steps"], r["every"]) != (args.steps, args.every):
            raise SystemExit(f"{key!r} was run with --steps {r['steps']} --every {r['every']}, "
                             f"not {args.steps} and {args.every}: it cannot be summarised here")
        runs[s] = r
    return runs


def seed_summary(args, results: dict, seeds: list[int]) -> list[str]:
    """Means over the seeds of steps to uniform's final accuracy (a policy that never reaches it
    counts as ``--steps`` + ``--every``, and is flagged) and of the final accuracy; the targets
    are judged on these means. Only the policies run in every seed are summarised."""
    runs = stored_seed_results(args, results, seeds)
    names = [n for n in runs[seeds[0]]["policies"]
             if all(n in runs[s]["policies"] for s in seeds)]
    left_out = sorted({n for s in seeds for n in runs[s]["policies"]} - set(names))
    miss = args.steps + args.every
    summary: dict[str, dict] = {}
    print(f"\nOver seeds {', '.join(map(str, seeds))} (probed every {args.every} steps; "
          f"not reached counts as {miss})\n")
    if left_out:
        print(f"not run in every seed, so not summarised: {', '.join(left_out)}\n")
    print("| policy | steps to uniform's final, per seed | mean | final top-1, per seed | mean |")
    print("|---|---|---|---|---|")
    for name in names:
        steps = [runs[s]["policies"][name]["steps_to_target"] for s in seeds]
        finals = [runs[s]["policies"][name]["final_top1"] for s in seeds]
        mean_steps = statistics.fmean(miss if x is None else x for x in steps)
        summary[name] = {"steps_to_target": steps, "mean_steps": mean_steps,
                         "final_top1": finals, "mean_final": statistics.fmean(finals),
                         "flops_per_step": runs[seeds[0]]["policies"][name]["flops_per_step"],
                         "reference_pool_flops":
                             runs[seeds[0]]["policies"][name]["reference_pool_flops"]}
        shown = " / ".join("not reached" if x is None else str(x) for x in steps)
        print(f"| {name} | {shown} | {mean_steps:.1f} | "
              f"{' / '.join(f'{f:.2f}' for f in finals)} | {summary[name]['mean_final']:.2f} |")
    base = summary["uniform"]
    for r in summary.values():
        r["steps_ratio"] = base["mean_steps"] / r["mean_steps"]
        r["flops_ratio"] = (base["mean_steps"] * base["flops_per_step"]) / (
            r["mean_steps"] * r["flops_per_step"] + r["reference_pool_flops"])
    fails = []
    variants = [p for p in LEARNABILITY if p in summary]
    best = {k: max(variants, key=lambda n, k=k: summary[n][k])
            for k in ("steps_ratio", "flops_ratio")} if variants else {}
    results[summary_key(args, seeds)] = {"seeds": seeds, "not_reached_counts_as": miss,
                                         "policies": summary, "checked": best,
                                         "left_out": left_out}
    if not variants:
        print("no learnability variant run in every seed: the targets are not checked")
        return []
    for k, name in best.items():
        got = summary[name][k]
        ok = got >= TARGETS[k]
        print(f"mean {k}: {got:.2f}x by {name} (target >= {TARGETS[k]}x) "
              f"{'ok' if ok else 'MISSED'}")
        if not ok:
            fails.append(f"mean {k} ({name})")
    lr = summary[best["steps_ratio"]]
    for other in (p for p in ("hard_learner", "easy_reference") if p in summary):
        o = summary[other]
        beats = lr["mean_steps"] < o["mean_steps"] or (
            lr["mean_steps"] == o["mean_steps"] and lr["mean_final"] > o["mean_final"])
        print(f"{best['steps_ratio']} beats {other} on the means (fewer steps to the target, or "
              f"as few and a higher final accuracy): {'ok' if beats else 'MISSED'}")
        if not beats:
            fails.append(f"mean {best['steps_ratio']} vs {other}")
    return fails


def selection_part(args, results: dict) -> list[str]:
    pool = make_pool(args)
    work = Path(args.work)
    tag = pool_tag(args)
    if tag:  # its own pool, references and runs
        work = work / tag.lstrip("_")
    kinds = corrupt_pool(pool, work / "noisy", redundant=args.redundant,
                         collapsed=args.collapsed)
    shards = work / "noisy" / "shards"
    references = {}
    policies = ["uniform", *[p for p in (args.policies or POLICIES) if p != "uniform"]]
    kinds_of_reference = [("reference", [])]
    if MIXED_REFERENCE & set(policies):  # trained only for the policies that score with it
        kinds_of_reference.append(("reference_mixed", MIXED))
    for ref_name, extra in kinds_of_reference:
        ref_dir = work / ref_name
        _check(synrep(["train", QUICKSTART, f"run.dir={ref_dir}",
                       f"data.shards={work / 'noisy' / 'curated'}",
                       f"train.steps={args.ref_steps}", *extra]), f"training the {ref_name}")
        references[ref_name] = RunLayout(ref_dir).final_checkpoint
    reference = references["reference"]
    ref_summary = json.loads(RunLayout(work / "reference").train_summary.read_text())
    rows: dict[str, dict] = {}
    # uniform sets the target (its final accuracy): probed at the base spacing whatever --every
    uniform_dir = train_policy(args, work, "uniform", shards, reference, BASE_EVERY)
    uniform_curve = curve(args, uniform_dir)
    target = uniform_curve[args.steps]
    for name in policies:
        ref = references["reference_mixed" if name in MIXED_REFERENCE else "reference"]
        run_dir = uniform_dir if name == "uniform" else train_policy(args, work, name, shards, ref,
                                                                     args.every)
        acc = uniform_curve if name == "uniform" else curve(args, run_dir, stop_at=target)
        acct = json.loads(RunLayout(run_dir).train_summary.read_text())["accounting"]
        per_step = acct["train_flops_per_step"] + acct["score_flops_per_step"]
        reached = min((s for s, a in acc.items() if a >= target), default=None)
        rows[name] = {
            "curve": {str(s): a for s, a in sorted(acc.items())}, "final_top1": acc[args.steps],
            "steps_to_target": reached, "flops_per_step": per_step,
            "train_flops_per_step": acct["train_flops_per_step"],
            "score_flops_per_step": acct["score_flops_per_step"],
            "reference_pool_flops": acct["reference_pool_flops"],
            "images_read_per_step": acct["images_read_per_step"],
            "kind_shares": (shares := kind_shares(run_dir, kinds)),
            "clean_share": None if shares is None else shares["clean"],
            "score_seconds": acct["score_seconds"], "train_seconds": acct["train_seconds"],
        }
        if reached is not None:
            rows[name]["flops_to_target"] = reached * per_step + acct["reference_pool_flops"]
    base = rows["uniform"]
    base_flops = base["steps_to_target"] * base["flops_per_step"]
    for r in rows.values():
        if r["steps_to_target"]:
            r["steps_ratio"] = base["steps_to_target"] / r["steps_to_target"]
            r["flops_ratio"] = base_flops / r["flops_to_target"]
    res_key = result_key(args)
    results[res_key] = {
        "target_top1": target, "seed": args.seed, "steps": args.steps, "every": args.every,
        "filter_ratio": 0.8,
        "reference": {"groups": 1000, "steps": args.ref_steps,
                      "train_flops": ref_summary["accounting"]["total_flops"]},
        "pool": {"groups": len(kinds), "clean": kinds.count("clean"),
                 "swap": kinds.count("swap"), "noise": kinds.count("noise"),
                 "dup": kinds.count("dup"), "dup_sources": DUP_SOURCES if args.redundant else 0,
                 "collapsed": kinds.count("collapsed")},
        "policies": rows}

    dups = (f", {kinds.count('dup')} copies of {DUP_SOURCES} curated groups" if args.redundant
            else "")
    if args.collapsed:
        dups += f", {kinds.count('collapsed')} collapsed (one image drawn 4 times)"
    print(f"\nJEST on the noisy pool (half of {len(kinds)} caption groups corrupted{dups}), "
          f"f = 0.8, {args.steps} steps; target: uniform's final linear probe {target:.2f} %\n")
    print("| policy | final top-1 | steps to target | steps ratio | FLOPs ratio | groups trained "
          "on (share of each kind) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        shares = r["kind_shares"] or {}
        share = ", ".join(f"{k} {100 * v:.0f} %" for k, v in shares.items())
        sr, fr = r.get("steps_ratio", float("nan")), r.get("flops_ratio", float("nan"))
        print(f"| {name} | {r['final_top1']:.2f} % | {r['steps_to_target'] or 'not reached'} | "
              f"{sr:.2f}x | {fr:.2f}x | {share} |")
    fails = []
    # The targets hold for JEST's learnability score. As in the paper, the iteration saving is
    # JEST's and the compute saving Flexi-JEST's: each target is checked on the learnability
    # variant (full resolution, Flexi, mixed-resolution Flexi, 2 of 4 images) that does best on
    # it, and the report says whether one variant meets both.
    variants = [p for p in LEARNABILITY if p in rows]
    if not variants:
        print("no learnability variant in --policies: the targets are not checked")
        return []
    best = {k: max(variants, key=lambda n, k=k: rows[n].get(k, 0.0))
            for k in ("steps_ratio", "flops_ratio")}
    for k, name in best.items():
        got = rows[name].get(k, 0.0)
        ok = got >= TARGETS[k]
        print(f"{k}: {got:.2f}x by {name} (target >= {TARGETS[k]}x) {'ok' if ok else 'MISSED'}")
        if not ok:
            fails.append(f"{k} ({name})")
    both = [n for n in variants if rows[n].get("steps_ratio", 0.0) >= TARGETS["steps_ratio"]
            and rows[n].get("flops_ratio", 0.0) >= TARGETS["flops_ratio"]]
    print(f"one variant meeting both: {', '.join(both) if both else 'none'}")
    lr = rows[best["steps_ratio"]]
    for other in (p for p in ("hard_learner", "easy_reference") if p in rows):
        beats = (rows[other]["steps_to_target"] is None and lr["steps_to_target"] is not None) \
            or (lr["steps_to_target"] is not None
                and lr["steps_to_target"] < rows[other]["steps_to_target"]) \
            or (lr["steps_to_target"] == rows[other]["steps_to_target"]
                and lr["final_top1"] > rows[other]["final_top1"])
        print(f"{best['steps_ratio']} beats {other} (fewer steps to the target, or as few and a "
              f"higher final accuracy): {'ok' if beats else 'MISSED'}")
        if not beats:
            fails.append(f"{best['steps_ratio']} vs {other}")
    results[res_key]["checked"] = best
    results[res_key]["one_variant_meets_both"] = both
    return fails


# ---------------------------------------------------------------------------------------------
# Step cost and sampler time


def _cfg(args, *extra: str):
    work = Path(args.work)
    return load_config(QUICKSTART, [
        f"run.dir={work / 'cost'}", f"data.shards={work / 'noisy' / 'shards'}",
        "selection.filter_ratio=0.8",
        f"selection.reference={RunLayout(work / 'reference').final_checkpoint}", *extra])


def cost_part(args, results: dict) -> list[str]:
    from synrep.factory import build_method, build_optimizer, build_source
    from synrep.selection.online import OnlineSelector, super_batch_size
    from synrep.train.step import train_step

    if not RunLayout(Path(args.work) / "reference").final_checkpoint.exists():
        raise SystemExit("the cost part needs the reference of the selection part: run "
                         "--parts selection first")
    device = torch.device("cpu")
    cfg_full = _cfg(args, "selection.online=true")
    cfg_flexi = _cfg(args, "selection.online=true", "selection.score_size=14")
    method = build_method(cfg_full).train()
    opt = build_optimizer(cfg_full, method)
    uniform_src = build_source(cfg_full, "groups")
    big = super_batch_size(cfg_full.train.batch_size, 0.8)
    super_src = build_source(cfg_full, "groups", batch_size=big)
    cfg_mixed = _cfg(args, "selection.online=true", "selection.score_size=14", *MIXED)
    mixed = build_method(cfg_mixed).train()  # the same weights, half of each batch at 14 px
    opts = {id(method): opt,
            id(mixed): build_optimizer(cfg_mixed, mixed)}
    selectors = {"jest": OnlineSelector(cfg_full, method, super_src.images, device),
                 "flexi": OnlineSelector(cfg_flexi, method, super_src.images, device),
                 "flexi_mixed": OnlineSelector(cfg_mixed, mixed, super_src.images, device)}
    models = {"uniform": method, "jest": method, "flexi": method, "flexi_mixed": mixed}

    def step_on(model, batch, step):  # as `synrep train` steps (fp32, constant lr)
        train_step(model, model, opts[id(model)], batch, torch.Generator().manual_seed(step),
                   grad_clip=cfg_full.optim.grad_clip)

    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(args.cost_reps + 1):  # the first round warms up and is dropped
        for name, model in models.items():
            t = time.perf_counter()
            if name == "uniform":
                step_on(model, uniform_src.batch(step), step)
            else:
                chosen = selectors[name].select(model, super_src.batch(step), step)
                step_on(model, chosen.batch, step)
            if step:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"seconds_median": med, "reps": args.cost_reps,
           "jest_step_ratio": med["jest"] / med["uniform"],
           "flexi_step_ratio": med["flexi"] / med["uniform"],
           "flexi_mixed_step_ratio": med["flexi_mixed"] / med["uniform"], "super_batch": big,
           "batch": cfg_full.train.batch_size}
    results["cost"] = res
    # Flexi-JEST as docs/methods.md defines it: scored at low resolution and half of each batch
    # trained at low resolution; the scoring-only variant is reported beside it.
    ok = res["flexi_mixed_step_ratio"] <= TARGETS["flexi_step_ratio"]
    print(f"\nstep cost (median of {args.cost_reps}, side by side): uniform "
          f"{med['uniform']:.3f} s, JEST at 28 px {med['jest']:.3f} s "
          f"({res['jest_step_ratio']:.2f}x), Flexi scoring only (14 px) {med['flexi']:.3f} s "
          f"({res['flexi_step_ratio']:.2f}x), Flexi-JEST (scored at 14 px, half of each batch "
          f"trained at 14 px) {med['flexi_mixed']:.3f} s ({res['flexi_mixed_step_ratio']:.2f}x; "
          f"target <= {TARGETS['flexi_step_ratio']}x) {'ok' if ok else 'MISSED'}")
    return [] if ok else ["Flexi-JEST step cost"]


def sampler_part(args, results: dict) -> list[str]:
    from synrep.device import autocast_for, choose_attention, resolve_precision
    from synrep.factory import build_method, build_optimizer, build_source
    from synrep.selection.jest import (
        MultiposGroups,
        SigmoidPairs,
        joint_sample_from_embeddings,
        selected_count,
    )
    from synrep.selection.online import sampler_precision
    from synrep.train.step import train_step

    corrupt_pool(make_pool(args), Path(args.work) / "noisy")  # the step is timed on its batches
    cfg = _cfg(args)
    method = build_method(cfg).train()
    opt = build_optimizer(cfg, method)
    opts = cfg.method.options
    n, d, m = 4096, opts.proj_dim, opts.images_per_caption
    # Two training steps of the quickstart ViT: the one the sampler feeds (the 4,096 candidates'
    # selected b = 205 captions x 4 = 820 images; the target) and the quickstart's own batch (64
    # captions x 4 = 256 images, whose super-batch would be 1,280 candidates), both as the
    # quickstart trains (train.precision, `auto` resolved on this machine, and the attention path
    # the trainer picks for it) and in full precision, side by side.
    feeds = selected_count(n // m, 0.8)
    sources = {"selected": build_source(cfg, "groups", batch_size=feeds),
               "quickstart": build_source(cfg, "groups")}
    cpu = torch.device("cpu")
    precision = resolve_precision(cfg.train.precision, cpu)
    contexts = {p: autocast_for(p, cpu) for p in dict.fromkeys(["fp32", precision])}
    step_times: dict[tuple[str, str], list[float]] = {
        (b, p): [] for b in sources for p in contexts}
    for step in range(args.cost_reps + 1):
        for (batch, name), times in step_times.items():
            choose_attention(method, cpu, name)
            t = time.perf_counter()
            train_step(method, method, opt, sources[batch].batch(step),
                       torch.Generator().manual_seed(step), autocast=contexts[name],
                       grad_clip=cfg.optim.grad_clip)
            if step:
                times.append(time.perf_counter() - t)
    step_med = {k: statistics.median(v) for k, v in step_times.items()}
    step_s = step_med["selected", precision]
    # batches are (captions, images per caption, C, H, W): the images the encoder sees per step
    images = {b: src.batch(0)["images"].shape[:2].numel() for b, src in sources.items()}
    # The sampler's GEMMs run in the precision training runs in (selection.precision=auto);
    # the fp32 sampler is timed beside it against the fp32 step.
    sp = sampler_precision(cfg, cpu)
    gen = torch.Generator().manual_seed(0)
    cases = {
        "sigmoid pairs (4,096 image-text pairs)": lambda p: (
            SigmoidPairs(torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen),
                         10.0, -10.0, p),
            SigmoidPairs(torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen),
                         10.0, -10.0, p), n),
        f"multi-positive groups (4,096 images = {n // m} captions x {m})": lambda p: (
            MultiposGroups(torch.randn(n // m, m, d, generator=gen), opts.temperature, p),
            MultiposGroups(torch.randn(n // m, m, d, generator=gen), opts.temperature, p),
            n // m),
    }
    print(f"quickstart training steps (median of {args.cost_reps}): "
          + ", ".join(f"{images[b]} images {p} {1000 * t:.0f} ms"
                      for (b, p), t in step_med.items()))
    out, fails = {}, []
    for name, make in cases.items():
        times: dict[str, list[float]] = {k: [] for k in dict.fromkeys([sp, "fp32"])}
        for rep in range(args.cost_reps):
            for p in times:  # alternated, so both see the same machine state
                learner, reference, size = make(p)
                b = selected_count(size, 0.8)
                t = time.perf_counter()
                joint_sample_from_embeddings(learner, reference, b, 16,
                                             torch.Generator().manual_seed(rep))
                times[p].append(time.perf_counter() - t)
        sec = statistics.median(times[sp])
        sec32 = statistics.median(times["fp32"])
        share = sec / step_s
        small = sec / step_med["quickstart", precision]
        ok = share < TARGETS["sampler_share"]
        out[name] = {"seconds_median": sec, "share_of_step": share, "candidates": size, "b": b,
                     "sampler_precision": sp, "share_of_quickstart_batch_step": small,
                     "seconds_median_fp32": sec32,
                     "share_fp32_of_fp32_step": sec32 / step_med["selected", "fp32"],
                     "share_fp32_of_fp32_quickstart_batch_step":
                         sec32 / step_med["quickstart", "fp32"]}
        also = (f"; fp32 sampler {1000 * sec32:.1f} ms = "
                f"{100 * out[name]['share_fp32_of_fp32_step']:.1f} % of that step in fp32"
                if sp != "fp32" else "")
        print(f"sampler, {name}: {1000 * sec:.1f} ms ({sp} GEMMs) = {100 * share:.1f} % of the "
              f"training step on its selection ({images['selected']} images, {precision}, "
              f"{1000 * step_s:.0f} ms{also}; target < {100 * TARGETS['sampler_share']:.0f} %) "
              f"{'ok' if ok else 'MISSED'}; {100 * small:.1f} % of a step on the quickstart's "
              f"{images['quickstart']}-image batch")
        if not ok:
            fails.append(f"sampler time ({name})")
    results["sampler"] = {
        "train_step_seconds_median": step_s, "train_precision": precision,
        "train_step_images": images["selected"],
        "train_step_seconds_median_fp32": step_med["selected", "fp32"],
        "quickstart_batch_step": {"images": images["quickstart"],
                                  "seconds_median": step_med["quickstart", precision],
                                  "seconds_median_fp32": step_med["quickstart", "fp32"]},
        "cases": out, "threads": torch.get_num_threads()}
    return fails


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/bench/jest")
    p.add_argument("--pool", default="", help="caption-group shards to corrupt (default: render "
                   "the quickstart's images into WORK/pool)")
    p.add_argument("--parts", default="selection,cost,sampler")
    p.add_argument("--steps", type=int, default=400, help="training steps of every learner")
    p.add_argument("--every", type=int, default=BASE_EVERY,
                   help="probe a checkpoint every n steps (other than 50: separate runs, "
                        "results under selection_every<n>)")
    p.add_argument("--policies", type=lambda x: [v for v in x.split(",") if v], default=None,
                   help=f"comma-separated subset of {','.join(POLICIES)} (uniform always runs)")
    p.add_argument("--ref-steps", type=int, default=REF_STEPS,
                   help="reference training steps (another value gets its own runs and key)")
    p.add_argument("--cost-reps", type=int, default=7)
    p.add_argument("--redundant", type=float, default=0.0,
                   help="selection: also turn this share of the pool into exact copies of "
                        f"{DUP_SOURCES} curated groups (easy but redundant data); its runs go "
                        "under WORK/redundant<percent>")
    p.add_argument("--collapsed", type=float, default=0.0,
                   help="also turn this share of the pool's clean groups into collapsed groups "
                        "(one image drawn for every seed: easy for every model, little to "
                        "learn); its runs go under WORK/collapsed<percent>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="selection: the learners' seeds (the pool and the reference stay those "
                        "of seed 0); seed n > 0 runs under <policy>_seed<n>, results under "
                        "selection..._seed<n>; with several, the targets are judged on their "
                        "means (selection..._seeds)")
    p.add_argument("--seed", type=int, default=None, help="one seed (the same as --seeds n)")
    p.add_argument("--summarize", type=int, nargs="+", default=None,
                   help="selection: judge the targets on the means over these seeds, reading "
                        "the ones not in --seeds from the results file (they must have been run "
                        "with the same settings); results under selection..._seeds<list>")
    p.add_argument("--json", default="benchmarks/results/jest.json")
    args = p.parse_args(argv)
    if args.policies and set(args.policies) - set(POLICIES):
        p.error(f"unknown policies {sorted(set(args.policies) - set(POLICIES))}; choose from "
                f"{list(POLICIES)}")
    parts = [x for x in args.parts.split(",") if x]
    if args.seed is not None:
        args.seeds = [args.seed]
    args.seed = args.seeds[0]
    known = {"selection": selection_seeds, "cost": cost_part, "sampler": sampler_part}
    if set(parts) - set(known):
        p.error(f"unknown parts {sorted(set(parts) - set(known))}; choose from {list(known)}")
    out_path = Path(args.json)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    fails: list[str] = []
    for part in parts:
        fails += known[part](args, results)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")
    if fails:
        print("missed: " + "; ".join(fails))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
