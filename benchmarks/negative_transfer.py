"""Negative transfer and MoCE: does a semantically distant part of the pretraining set hurt?

The MoCE paper (docs/methods.md s. 6) finds that pretraining an MAE on data far from the
downstream task (all of ImageNet against fine-grained sets) can do worse than pretraining on the
matched part only, and answers with cluster-conditional experts: expert search picks, for the
downstream set, the experts its images are routed to and exports them as one dense ViT.

Protocol ``glyphs`` (the default): the distant domain is printed digits rendered from the DejaVu
fonts (dataset ``glyphs``, synrep/data/glyphs.py); the downstream task is Fashion-MNIST (10
classes, train split -> test split). Pretraining, every run the quickstart ViT at batch 256:

    A  MAE on fashion only, S steps                                 (S = --steps, 500)
    B  MAE on fashion + glyphs (``fashion-glyphs``, half each), 2S steps: as many fashion
       images seen as A
    C  MAE on fashion + glyphs, S steps: as many steps as A
    D  MoCE on fashion + glyphs, 2S steps, clustered on B's features; expert search on
       Fashion-MNIST's train images exports the fashion expert

The analysis rule was fixed in the commit that added it, before the confirming runs: seeds 0, 1
and 2; the statistic is the paired (same seed) difference in Fashion-MNIST test top-1 of the
L-BFGS linear probe, averaged over seeds, with its standard error (sample sd / sqrt(3)); kNN
(k = 20) is reported beside it. Negative transfer appears when B - A is below 0 by more than 2
standard errors (C - A is reported the same way). The MoCE target is met when D - B >= 0 (the
fashion expert at least as good as MAE on the mix at the same budget); the exit status is 1 when
it is missed. Both are reported whichever way they fall.

Protocol ``halves`` (``--protocol halves``): the earlier experiment inside Fashion-MNIST, where
the pretraining set is split into two halves by class:

    half "garments":  T-shirt/top, trouser, pullover, dress, coat, shirt   (labels 0-4, 6; 36,000)
    half "footwear":  sandal, sneaker, bag, ankle boot                    (labels 5, 7-9; 24,000)

MAE on all, on garments and on footwear, and MoCE on all with one expert searched per half; each
half is a downstream task. ``--upcycle`` adds MoCE started from MAE-on-all's weights against MAE
on all trained twice as long. Its checks: negative transfer (a matched half beats all on at least
one half, reported either way) and MoCE (each half's expert at least as good as MAE on all;
exit status 1 otherwise).

Frozen features everywhere: CLS + mean patch token of the last 4 blocks.

    python benchmarks/negative_transfer.py [--protocol glyphs|halves] [--steps 500]
        [--seeds 0 1 2] [--upcycle] [--precision fp32] [--quick] [--set KEY=VALUE ...]

On one GPU, where budgets ten times longer fit:

    python benchmarks/negative_transfer.py --steps 5000 --set run.device=cuda --precision auto

Runs are ordinary resumable synrep runs under ``runs/bench/negative_transfer/`` (``--work``):
finished ones are reused. Results: ``benchmarks/results/negative_transfer_glyphs.json`` and
``benchmarks/results/negative_transfer.json`` (halves).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import verdict, write_results  # noqa: E402

from synrep.cli import main as synrep
from synrep.eval.features import extract_features, load_features, save_features
from synrep.eval.knn import knn_classify
from synrep.eval.linear import lbfgs_probe
from synrep.layout import RunLayout

HALVES = {"garments": [0, 1, 2, 3, 4, 6], "footwear": [5, 7, 8, 9]}
FASHION = list(range(10))
GLYPH_SEEDS = [0, 1, 2]  # the pre-registered seeds of the glyphs protocol
PRETRAIN = {"all": None, **HALVES}
POOL, BLOCKS = "cls+avg", 4
CS = [0.01, 0.1, 1.0, 10.0, 100.0]
LONG = "MAE on all, 2x steps"
UP = "MoCE upcycled from MAE on all, expert"


def _train(config: str, run_dir: Path, overrides: list[str]) -> None:
    code = synrep(["run", config, f"run.dir={run_dir}", *overrides])
    if code != 0:
        raise SystemExit(f"synrep run {config} run.dir={run_dir} {' '.join(overrides)} failed "
                         f"with exit code {code}")


def _features(checkpoint: Path, cache: Path, limit: dict[str, int | None]):
    """(train, test) probe features and labels of all of Fashion-MNIST, cached next to the run."""
    from synrep.data.datasets import load_dataset
    from synrep.factory import load_encoder

    out = {}
    encoder = None
    for split in ("train", "test"):
        path = cache / f"features_{split}.npz"
        stamp = path.with_suffix(".source")
        key = json.dumps({"checkpoint": str(checkpoint), "mtime": checkpoint.stat().st_mtime_ns,
                          "limit": limit[split]})
        if path.exists() and stamp.exists() and stamp.read_text() == key:
            out[split] = load_features(path)
            continue
        if encoder is None:
            encoder, _ = load_encoder(checkpoint, weights="student")
        ds = load_dataset("fashion-mnist", split)
        if limit[split] is not None:
            g = torch.Generator().manual_seed(0)
            ds = ds.subset(torch.randperm(len(ds), generator=g)[:limit[split]].sort().values)
        feats = extract_features(lambda x, e=encoder: e.probe_features(x, POOL, BLOCKS), ds.images,
                                 desc=f"features {cache.name}/{split}")
        save_features(path, feats, ds.labels)
        stamp.write_text(key)
        out[split] = (feats, ds.labels)
    return out


def _probe(feats, classes: list[int], seed: int) -> dict[str, float]:
    """Linear probe and kNN top-1 on the task made of ``classes`` (relabelled 0..n-1)."""
    lut = torch.full((10,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    parts = []
    for split in ("train", "test"):
        x, y = feats[split]
        keep = lut[y] >= 0
        parts += [x[keep], lut[y[keep]]]
    xtr, ytr, xte, yte = parts
    lin = lbfgs_probe(xtr, ytr, xte, yte, cs=CS, seed=seed)
    knn = knn_classify(xtr, ytr, xte, yte, k=20)
    return {"linear": lin["top1"], "knn": knn["top1"], "best_c": lin["best_c"]}


def _cached_probe(feats, classes: list[int], seed: int, path: Path) -> dict[str, float]:
    """:func:`_probe`, kept in ``path`` with the features' source stamps it was fitted on (new
    features or another protocol setting fit it again)."""
    stamps = [path.parent.joinpath(f"features_{s}.source").read_text() for s in ("train", "test")]
    key = {"features": stamps, "classes": classes, "seed": seed, "cs": CS, "pool": POOL,
           "blocks": BLOCKS}
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["scores"]
    out = _probe(feats, classes, seed)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "scores": out}, indent=2))
    tmp.replace(path)
    return out


def _search(moce_dir: Path, half: str, classes: list[int], limit: int | None) -> Path:
    """Expert search for one half's train images; returns the exported dense checkpoint."""
    from synrep.data.datasets import load_dataset
    from synrep.factory import load_encoder
    from synrep.methods.moce import export_expert, load_moce, search_experts
    from synrep.stages.moce import cluster_features

    out = moce_dir / f"expert_{half}.safetensors"
    ck = RunLayout(moce_dir).final_checkpoint
    report = moce_dir / f"search_{half}.json"
    if (out.exists() and report.exists() and out.stat().st_mtime_ns > ck.stat().st_mtime_ns
            and "route_share" in json.loads(report.read_text())):  # else: the per-block rule
        return out
    model = load_moce(ck)
    featurer, fcfg = load_encoder(model.cfg.method.moce.features, weights="student")
    ds = load_dataset("fashion-mnist", "train").select_classes(classes)
    if limit is not None:
        ds = ds.subset(slice(0, limit))
    with torch.inference_mode():
        feats = cluster_features(featurer, ds.images, desc=f"search {half}")
    found = search_experts(model, feats)
    export_expert(model, found.chosen, out, extra={"half": half, "classes": classes})
    report.write_text(json.dumps({"half": half, "chosen": found.chosen,
                                  "counts": found.counts.tolist(),
                                  "route_share": found.route_share,
                                  "cluster_hist": found.cluster_hist.tolist()}, indent=2))
    print(f"[search] {half}: experts {found.chosen}, the route of "
          f"{100 * found.route_share:.1f} % of its images (images per expert and block: "
          f"{found.counts.tolist()})")
    return out


def _mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample sd / sqrt(n); 0 for one value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)


def _glyphs(args, steps: int, work: Path, limit: dict, common: list[str], out_path: Path) -> int:
    """The glyphs protocol (module docstring): runs A-D per seed, the fixed analysis rule."""
    from synrep.data.glyphs import provenance

    t0 = time.perf_counter()
    names = {"A": "MAE on fashion", "B": "MAE on fashion + glyphs, 2x steps",
             "C": "MAE on fashion + glyphs", "D": "MoCE on fashion + glyphs, fashion expert"}
    scores: dict[str, list[dict]] = {k: [] for k in names}
    searches = []
    mix = ["data.dataset=fashion-glyphs"]
    for seed in args.seeds:
        base = [*common, f"run.seed={seed}"]
        runs = {"A": (work / f"mae_fashion_s{seed}", []),
                "B": (work / f"mae_mix_{2 * steps}steps_s{seed}",
                      [*mix, f"train.steps={2 * steps}"]),
                "C": (work / f"mae_mix_s{seed}", mix)}
        models: dict[str, Path] = {}
        for key, (run_dir, extra) in runs.items():
            _train("configs/mae_fashion.yaml", run_dir, [*base, "run.stages=[train]", *extra])
            models[key] = RunLayout(run_dir).final_checkpoint
        moce_dir = work / f"moce_mix_k{args.clusters}_e{args.experts}_s{seed}"
        _train("configs/moce_fashion.yaml", moce_dir, [
            *base, *mix, f"train.steps={2 * steps}", "run.stages=[cluster,train]",
            f"method.moce.features={models['B']}", f"method.moce.clusters={args.clusters}",
            f"method.moce.experts={args.experts}"])
        models["D"] = _search(moce_dir, "fashion", FASHION, limit["train"])
        searches.append(json.loads((moce_dir / "search_fashion.json").read_text()))
        for key, ck in models.items():
            cache = work / "features" / f"{key}_{names[key].lower().replace(' ', '_')}_s{seed}"
            cache.mkdir(parents=True, exist_ok=True)
            feats = _features(ck, cache, limit)
            scores[key].append(_cached_probe(feats, FASHION, seed, cache / "probe_fashion.json"))

    def diff(a: str, b: str, metric: str = "linear") -> dict[str, float]:
        per_seed = [x[metric] - y[metric] for x, y in zip(scores[a], scores[b])]
        m, se = _mean_se(per_seed)
        return {"mean": m, "se": se, "per_seed": per_seed}

    lines = ["| pretraining | steps | linear top-1 (mean +- se) | kNN top-1 (mean +- se) |",
             "|---|---|---|---|"]
    for key, name in names.items():
        n_steps = steps if key in ("A", "C") else 2 * steps
        cells = []
        for metric in ("linear", "knn"):
            m, se = _mean_se([r[metric] for r in scores[key]])
            cells.append(f"{m:.2f} +- {se:.2f} %")
        lines.append(f"| {key}: {name} | {n_steps} | {' | '.join(cells)} |")
    print("\n" + "\n".join(lines))
    contrasts = {"B - A": diff("B", "A"), "C - A": diff("C", "A"), "D - B": diff("D", "B"),
                 "D - A": diff("D", "A")}
    contrasts_knn = {k: diff(*k.split(" - "), metric="knn") for k in contrasts}
    print(f"\nseeds {args.seeds}; paired differences, linear probe (kNN), points:")
    for k, d in contrasts.items():
        print(f"  {k}: {d['mean']:+.2f} +- {d['se']:.2f} (kNN {contrasts_knn[k]['mean']:+.2f} "
              f"+- {contrasts_knn[k]['se']:.2f}); per seed "
              + ", ".join(f"{v:+.2f}" for v in d["per_seed"]))
    ba = contrasts["B - A"]
    negative = ba["mean"] < 0 and -ba["mean"] > 2 * ba["se"]
    moce_ok = contrasts["D - B"]["mean"] >= 0
    print(f"negative transfer (B - A below 0 by more than 2 se): "
          f"{'appears' if negative else 'does not appear'}")
    print(f"MoCE target (D - B >= 0): {'met' if moce_ok else 'MISSED'}")
    results = {"protocol": "glyphs", "steps": steps, "seeds": args.seeds, "quick": args.quick,
               "clusters": args.clusters, "experts": args.experts, "names": names,
               "scores": scores, "contrasts_linear": contrasts, "contrasts_knn": contrasts_knn,
               "negative_transfer": negative, "moce_target_met": moce_ok,
               "searches": searches, "table": "\n".join(lines), "precision": args.precision,
               "overrides": args.set, "glyphs": provenance(),
               "minutes": (time.perf_counter() - t0) / 60}
    write_results(out_path, results)
    print(f"results: {out_path} ({results['minutes']:.1f} min)")
    return verdict([] if moce_ok else [
        f"the MoCE fashion expert is {-contrasts['D - B']['mean']:.2f} points below MAE on "
        "fashion + glyphs at the same budget (linear probe)"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", choices=["glyphs", "halves"], default="glyphs",
                   help="glyphs: fashion + a distant domain (default); halves: two halves of "
                        "Fashion-MNIST")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default 500)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="pretraining seeds; the table gives the mean over them (default: "
                        "glyphs 0 1 2, the pre-registered ones; halves 0)")
    p.add_argument("--clusters", type=int, default=16, help="MoCE k-means clusters")
    p.add_argument("--experts", type=int, default=4, help="MoCE experts per MoE block")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 20 steps, probes on 3,000 train / 1,000 test images")
    p.add_argument("--upcycle", action="store_true",
                   help="also MoCE upcycled from MAE on all, against MAE on all at 2x steps")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="train.precision of every pretraining run (the README's table: fp32)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every pretraining run (for example "
                        "run.device=cuda); the runs go to a folder of their own")
    p.add_argument("--work", default="runs/bench/negative_transfer")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    steps = args.steps or (20 if args.quick else 500)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.seeds is None:
        args.seeds = GLYPH_SEEDS if args.protocol == "glyphs" else [0]
    work = Path(args.work) / (f"quick_{steps}" if args.quick else f"steps_{steps}")
    if args.protocol == "glyphs":
        work = Path(args.work) / "glyphs" / work.name
    if args.precision != "fp32":
        work = work.with_name(f"{work.name}_{args.precision}")
    if args.set:  # other settings, other runs: never reuse the default ones
        tag = hashlib.sha1(json.dumps(sorted(args.set)).encode()).hexdigest()[:8]
        work = work.with_name(f"{work.name}_set{tag}")
    limit = {"train": 3000, "test": 1000} if args.quick else {"train": None, "test": None}
    default_json = ("benchmarks/results/negative_transfer_glyphs.json"
                    if args.protocol == "glyphs" else "benchmarks/results/negative_transfer.json")
    out_path = Path(args.json or (work / "results.json" if args.quick else default_json))
    common = [f"train.steps={steps}", "train.batch_size=256", "train.ckpt_every=250",
              f"run.threads={args.threads}", f"train.precision={args.precision}", *args.set]
    if args.protocol == "glyphs":
        return _glyphs(args, steps, work, limit, common, out_path)
    t0 = time.perf_counter()
    scores: dict[str, dict[str, list[dict]]] = {}  # model -> task -> one entry per seed
    searches = {}
    for seed in args.seeds:
        models: dict[str, Path] = {}
        for name, classes in PRETRAIN.items():
            run_dir = work / f"mae_{name}_s{seed}"
            over = [*common, f"run.seed={seed}", "run.stages=[train]"]
            if classes is not None:
                over.append(f"data.classes=[{','.join(map(str, classes))}]")
            _train("configs/mae_fashion.yaml", run_dir, over)
            models[f"MAE on {name}"] = RunLayout(run_dir).final_checkpoint
        moce_dir = work / f"moce_all_k{args.clusters}_e{args.experts}_s{seed}"
        _train("configs/moce_fashion.yaml", moce_dir, [
            *common, f"run.seed={seed}", "run.stages=[cluster,train]",
            f"method.moce.features={models['MAE on all']}",
            f"method.moce.clusters={args.clusters}", f"method.moce.experts={args.experts}"])
        for half, classes in HALVES.items():
            models[f"MoCE expert for {half}"] = _search(moce_dir, half, classes, limit["train"])
            searches.setdefault(half, []).append(json.loads(
                (moce_dir / f"search_{half}.json").read_text()))
        if args.upcycle:
            long_dir = work / f"mae_all_{2 * steps}steps_s{seed}"
            _train("configs/mae_fashion.yaml", long_dir, [
                *common, f"train.steps={2 * steps}", f"run.seed={seed}", "run.stages=[train]"])
            models[LONG] = RunLayout(long_dir).final_checkpoint
            up_dir = work / f"moce_upcycled_k{args.clusters}_e{args.experts}_s{seed}"
            _train("configs/moce_fashion.yaml", up_dir, [
                *common, f"run.seed={seed}", "run.stages=[cluster,train]",
                f"method.moce.features={models['MAE on all']}",
                f"method.moce.init={models['MAE on all']}",
                f"method.moce.clusters={args.clusters}", f"method.moce.experts={args.experts}"])
            for half, classes in HALVES.items():
                models[f"{UP} for {half}"] = _search(up_dir, half, classes, limit["train"])
        for model, ck in models.items():
            tag = f"_k{args.clusters}_e{args.experts}" if model.startswith("MoCE") else ""
            cache = work / "features" / f"{model.lower().replace(' ', '_')}{tag}_s{seed}"
            cache.mkdir(parents=True, exist_ok=True)
            feats = _features(ck, cache, limit)
            for half, classes in HALVES.items():
                scores.setdefault(model, {}).setdefault(half, []).append(
                    _cached_probe(feats, classes, seed, cache / f"probe_{half}.json"))

    def mean(model: str, half: str, key: str = "linear") -> float:
        return statistics.fmean(r[key] for r in scores[model][half])

    lines = ["| pretraining | garments: linear | garments: kNN | footwear: linear | "
             "footwear: kNN |", "|---|---|---|---|---|"]
    for model in scores:
        cells = " | ".join(f"{mean(model, h, k):.2f} %" for h in HALVES for k in ("linear", "knn"))
        lines.append(f"| {model} | {cells} |")
    print("\n" + "\n".join(lines))

    matched = {h: mean(f"MAE on {h}", h) - mean("MAE on all", h) for h in HALVES}
    effect = any(d > 0 for d in matched.values())
    print("\nnegative transfer (matched half minus all, linear probe): " + ", ".join(
        f"{h} {d:+.2f}" for h, d in matched.items())
          + (" -> the effect appears" if effect else " -> no negative transfer at this scale"))
    # Each MoCE variant against MAE on all with the same total budget.
    variants = {"MoCE": ("MoCE expert for {}", "MAE on all")}
    if args.upcycle:
        variants[f"MoCE upcycled (+{steps} steps)"] = (UP + " for {}", LONG)
    deltas = {}
    for name, (expert_name, base) in variants.items():
        deltas[name] = {h: mean(expert_name.format(h), h) - mean(base, h) for h in HALVES}
        print(f"{name} expert minus {base}, on its own half (target >= 0): " + ", ".join(
            f"{h} {d:+.2f} {'ok' if d >= 0 else 'MISSED'}" for h, d in deltas[name].items()))
    met = [name for name, d in deltas.items() if all(v >= 0 for v in d.values())]
    fails = [] if met else [
        "; ".join(f"{name} expert for {h} is {-d:.2f} points below {variants[name][1]}"
                  for name, ds in deltas.items() for h, d in ds.items() if d < 0)]
    expert = deltas["MoCE"]
    results = {"steps": steps, "seeds": args.seeds, "quick": args.quick,
               "clusters": args.clusters, "experts": args.experts, "halves": HALVES,
               "scores": scores, "matched_minus_all": matched, "expert_minus_mae_all": expert,
               "negative_transfer": effect, "searches": searches, "table": "\n".join(lines),
               "expert_minus_same_budget_mae": deltas, "precision": args.precision,
               "overrides": args.set,
               "minutes": (time.perf_counter() - t0) / 60}
    write_results(out_path, results)
    print(f"results: {out_path} ({results['minutes']:.1f} min)")
    return verdict(fails)


if __name__ == "__main__":
    sys.exit(main())
