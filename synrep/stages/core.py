"""The pipeline's stages, in ``synrep run``'s order: captions, rewrites, images, select, train,
eval, report. (MoCE's ``cluster`` and ``search`` are in :mod:`synrep.stages.moce`.)"""

from __future__ import annotations

import json
from pathlib import Path

from synrep.captions.stage import (
    captions_complete,
    check_captions,
    check_rewrites,
    rewrites_complete,
    run_captions,
    run_rewrites,
)
from synrep.checkpoint import Checkpoint
from synrep.config import Config
from synrep.errors import ConfigError
from synrep.eval.stage import (
    PROTOCOLS,
    eval_settings,
    evaluate_checkpoint,
    protocol_done,
    results_key,
)
from synrep.images.stage import check_images, images_complete, run_images
from synrep.layout import layout
from synrep.methods import METHODS
from synrep.report import write_report
from synrep.selection.online import select_done, select_offline
from synrep.stages.base import Stage, register_stage
from synrep.train.loop import check_same_run, train


def _check_train(cfg: Config) -> None:
    """Refuse, before anything is written, a config other than the one the run's checkpoints
    were trained with (resuming or reusing them)."""
    paths = layout(cfg)
    for ck in (paths.last_checkpoint, paths.final_checkpoint):
        if ck.is_file():
            check_same_run(Checkpoint(ck), cfg)


def _train_done(cfg: Config) -> bool:
    final = layout(cfg).final_checkpoint
    if not final.exists():
        return False
    ck = Checkpoint(final)
    check_same_run(ck, cfg)
    return ck.step >= cfg.train.steps  # a raised train.steps extends the finished run


def eval_checkpoint(cfg: Config) -> Path | str:
    """The checkpoint the eval stage reads: the method's (the final one, or for a method with a
    stage after training, such as MoCE's expert search, what that stage wrote), or the external
    model ``eval.model`` names."""
    if cfg.eval.model:
        return cfg.eval.model
    return METHODS.get(cfg.method.name).eval_checkpoint(cfg)


def print_summary(cfg: Config, results: dict) -> None:
    """The evaluation's top-1 figures, one per line, and where results.json is."""
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
    print(f"results: {layout(cfg).results}")


def _eval(cfg: Config) -> None:
    ck = eval_checkpoint(cfg)
    if isinstance(ck, Path) and not ck.exists():
        after = METHODS.get(cfg.method.name).eval_after
        raise ConfigError(f"no checkpoint to evaluate at {str(ck)!r}: run the {after} "
                          "stage first")
    print_summary(cfg, evaluate_checkpoint(cfg, ck))


def _eval_done(cfg: Config) -> bool:
    path = layout(cfg).results
    if not path.exists():
        return False
    entry = json.loads(path.read_text()).get(results_key(cfg.eval), {})
    if entry.get("settings") != eval_settings(cfg.eval):
        return False  # evaluated with other settings (or by an older synrep): evaluate again
    ck = eval_checkpoint(cfg)
    if isinstance(ck, Path) and (not ck.exists()
                                 or entry.get("checkpoint_step") != Checkpoint(ck).step):
        return False  # the run was extended (or the checkpoint replaced) since
    return entry.get("checkpoint") == str(ck) and all(
        protocol_done(entry, p) for p in cfg.eval.protocols if p in PROTOCOLS)


def _report(cfg: Config) -> None:
    print(f"report: {write_report(cfg.run_dir)}")


register_stage(Stage(
    "captions", run_captions, captions_complete, order=10, check=check_captions,
    # dedup is global: one process
    help="captions from concept banks (LLM or grammar) -> RUN/captions"))
register_stage(Stage(
    "rewrites", run_rewrites, rewrites_complete, order=20, needs=("captions",),
    check=check_rewrites,
    help="LaCLIP rewrites of every caption -> RUN/rewrites"))
register_stage(Stage(
    # under the ranks executor every process renders its share; otherwise the main one does
    "images", run_images, images_complete, order=30, needs=("captions",), check=check_images,
    ranks=lambda cfg: "all" if cfg.images.executor == "ranks" else "main",
    help="k images per caption (text-to-image) -> RUN/images"))
register_stage(Stage(
    "select", select_offline, select_done, order=40, needs=("images",),
    help="offline JEST selection of caption groups -> RUN/select"))
register_stage(Stage(
    "train", train, _train_done, order=60, ranks=lambda cfg: "all", check=_check_train,
    needs=("images", "select", "cluster"),
    help="pretraining -> RUN/train/checkpoints"))
register_stage(Stage(
    "eval", _eval, _eval_done, order=80, needs=("train", "search"),
    help="frozen-feature protocols on real data -> RUN/eval/results.json"))
register_stage(Stage(
    "report", _report, lambda cfg: False, order=90, reruns=True,
    help="the HTML report -> RUN/report.html"))
