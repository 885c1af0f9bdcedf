"""The stage graph over a run directory.

``synrep run CONFIG`` runs ``run.stages`` in order into ``RUN = run.dir``. Each stage knows when its
outputs are complete and is skipped then, so a killed run resumes by running the same command.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from synrep.config import Config, save_config
from synrep.errors import ConfigError
from synrep.train import dist
from synrep.utils import ensure_writable_dir


def _train(cfg: Config) -> None:
    from synrep.train.loop import train

    train(cfg)


def _train_done(cfg: Config) -> bool:
    from synrep.train.checkpoint import Checkpoint
    from synrep.train.loop import check_same_run, final_checkpoint

    if not final_checkpoint(cfg).exists():
        return False
    check_same_run(Checkpoint(final_checkpoint(cfg)), cfg)
    return True


def eval_checkpoint(cfg: Config) -> Path:
    """The checkpoint the eval stage reads: the final one, or for MoCE the dense ViT that
    expert search exported."""
    from synrep.train.loop import final_checkpoint

    if cfg.method.name == "moce":
        from synrep.methods.moce import expert_checkpoint

        return expert_checkpoint(cfg)
    return final_checkpoint(cfg)


def _eval(cfg: Config) -> None:
    from synrep.eval.stage import evaluate_checkpoint

    if dist.is_main():
        ck = eval_checkpoint(cfg)
        if not ck.exists():
            after = "search" if cfg.method.name == "moce" else "train"
            raise ConfigError(f"no checkpoint to evaluate at {str(ck)!r}: run the {after} "
                              "stage first")
        results = evaluate_checkpoint(cfg, ck)
        print_summary(cfg, results)
    dist.barrier()


def _eval_done(cfg: Config) -> bool:
    from synrep.eval.stage import PROTOCOLS, eval_settings, protocol_done, results_key

    path = cfg.run_dir / "eval" / "results.json"
    if not path.exists():
        return False
    entry = json.loads(path.read_text()).get(results_key(cfg.eval), {})
    if entry.get("settings") != eval_settings(cfg.eval):
        return False  # evaluated with other settings (or by an older synrep): evaluate again
    return entry.get("checkpoint") == str(eval_checkpoint(cfg)) and all(
        protocol_done(entry, p) for p in cfg.eval.protocols if p in PROTOCOLS)


def _captions(cfg: Config) -> None:
    from synrep.captions.stage import run_captions

    if dist.is_main():  # dedup is global, so one process writes the caption set
        run_captions(cfg)
    dist.barrier()


def _captions_done(cfg: Config) -> bool:
    from synrep.captions.stage import captions_complete

    return captions_complete(cfg)


def _rewrites(cfg: Config) -> None:
    from synrep.captions.stage import run_rewrites

    if dist.is_main():
        run_rewrites(cfg)
    dist.barrier()


def _rewrites_done(cfg: Config) -> bool:
    from synrep.captions.stage import rewrites_complete

    return rewrites_complete(cfg)


def _images(cfg: Config) -> None:
    from synrep.images.stage import run_images

    # under the ranks executor every process renders its share; otherwise the main one does
    if cfg.images.executor == "ranks" or dist.is_main():
        run_images(cfg)
    dist.barrier()


def _images_done(cfg: Config) -> bool:
    from synrep.images.stage import images_complete

    return images_complete(cfg)


def _select(cfg: Config) -> None:
    from synrep.selection.online import select_offline

    if dist.is_main():
        select_offline(cfg)
    dist.barrier()


def _select_done(cfg: Config) -> bool:
    from synrep.selection.online import select_done

    return select_done(cfg)


def _cluster(cfg: Config) -> None:
    from synrep.cluster import run_cluster

    if dist.is_main():
        run_cluster(cfg)
    dist.barrier()


def _cluster_done(cfg: Config) -> bool:
    from synrep.cluster import cluster_done

    return cluster_done(cfg)


def _search(cfg: Config) -> None:
    from synrep.methods.moce import run_search

    if dist.is_main():
        run_search(cfg)
    dist.barrier()


def _search_done(cfg: Config) -> bool:
    from synrep.methods.moce import search_done

    return search_done(cfg)


def _report(cfg: Config) -> None:
    from synrep.report import write_report

    if dist.is_main():
        print(f"report: {write_report(cfg.run_dir)}")
    dist.barrier()


def _report_done(cfg: Config) -> bool:
    return False  # cheap, and its inputs change whenever another stage runs: always rewritten


# name -> (run, is_complete), in the order `synrep run` would use them
STAGES: dict[str, tuple[Callable[[Config], None], Callable[[Config], bool]]] = {
    "captions": (_captions, _captions_done),
    "rewrites": (_rewrites, _rewrites_done),
    "images": (_images, _images_done),
    "select": (_select, _select_done),
    "cluster": (_cluster, _cluster_done),
    "train": (_train, _train_done),
    "search": (_search, _search_done),
    "eval": (_eval, _eval_done),
    "report": (_report, _report_done),
}


def print_summary(cfg: Config, results: dict) -> None:
    from synrep.eval.stage import results_key

    entry = results.get(results_key(cfg.eval), {})
    print(f"\nevaluation on {results_key(cfg.eval)} ({cfg.eval.test_split} split):")
    for key, value in entry.items():
        if key.endswith("_top1"):
            spread = entry.get("fewshot", {}).get(key[len("fewshot_"):-len("shot_top1")], {})
            extra = f" (+/- {spread['std']:.2f} over {len(spread['runs'])} draws)" \
                if key.startswith("fewshot_") and spread else ""
            print(f"  {key:>22s}: {value:6.2f} %{extra}")
    for protocol, why in entry.get("skipped", {}).items():
        print(f"  {protocol:>22s}: skipped, {why}")
    print(f"results: {Path(cfg.run_dir) / 'eval' / 'results.json'}")


def run_stages(cfg: Config, stages: list[str] | None = None, force: bool = False) -> None:
    stages = stages if stages is not None else cfg.run.stages
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"run.stages: unknown stage(s) {unknown}; choose from {list(STAGES)}")
    if "search" in stages:  # before any stage runs: training first would waste its budget
        from synrep.methods.moce import check_searchable

        check_searchable(cfg)
    if dist.is_main():
        ensure_writable_dir(cfg.run_dir, "run.dir")
        save_config(cfg, cfg.run_dir / "config.yaml")
    for name in stages:
        run, done = STAGES[name]
        if not force and done(cfg):
            if dist.is_main():
                print(f"[{name}] complete, skipped ({cfg.run_dir})")
            continue
        if dist.is_main():
            print(f"[{name}] running into {cfg.run_dir}")
        run(cfg)
