"""The run directory's layout: the one place that names every ``RUN/...`` path.

A run directory (``run.dir``) holds everything a ``synrep run`` writes, one folder per stage::

    RUN/config.yaml                      the resolved config
    RUN/.lock                            the running command's lock (synrep.lock)
    RUN/captions/  RUN/rewrites/         caption shards (JSONL) and their LaCLIP rewrites
    RUN/images/                          caption-group image shards (WebDataset tar)
    RUN/select/shards/                   the select stage's kept caption groups
    RUN/cluster/clusters.safetensors     MoCE's k-means clusters of the pretraining images
    RUN/train/checkpoints/{last,final}.safetensors, metrics.jsonl, summary.json, env.json, tb/
    RUN/search/expert.safetensors        MoCE's exported expert (a dense ViT)
    RUN/eval/results.json                evaluation results, features_*.npz caches, pca.png
    RUN/scale/                           `synrep scale`: one run per data size, results, fit plot
    RUN/report.html                      the HTML report

Code asks a :class:`RunLayout` for a path instead of joining folder names itself, so the layout
can change in one place. Only the working files that one module keeps inside its own folder
(the mini generator's trainer state in ``RUN/generator``, its evaluation's judge model) are
named by that module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class _HasRunDir(Protocol):
    @property
    def run_dir(self) -> Path: ...


class RunLayout:
    """Paths inside one run directory. ``RunLayout(cfg.run_dir)`` or :func:`layout`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    # -- the run -------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def lock(self) -> Path:
        """The run's lock file (:mod:`synrep.lock`): the holder's pid and host while a command
        runs in the directory."""
        return self.root / ".lock"

    # -- data stages ---------------------------------------------------------------------------
    @property
    def captions(self) -> Path:
        return self.root / "captions"

    @property
    def rewrites(self) -> Path:
        return self.root / "rewrites"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def select(self) -> Path:
        return self.root / "select"

    @property
    def selected_shards(self) -> Path:
        return self.select / "shards"

    @property
    def select_record(self) -> Path:
        """The select stage's kept ids and settings, written last (its completion marker)."""
        return self.select / "ids.json"

    @property
    def cluster(self) -> Path:
        return self.root / "cluster"

    @property
    def clusters(self) -> Path:
        return self.cluster / "clusters.safetensors"

    # -- training ------------------------------------------------------------------------------
    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def checkpoints(self) -> Path:
        return self.train / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.safetensors"

    @property
    def final_checkpoint(self) -> Path:
        return self.checkpoints / "final.safetensors"

    def step_checkpoint(self, step: int) -> Path:
        """Weights kept every ``train.keep_every`` steps."""
        return self.checkpoints / f"step_{step:06d}.safetensors"

    @property
    def metrics(self) -> Path:
        return self.train / "metrics.jsonl"

    @property
    def train_summary(self) -> Path:
        return self.train / "summary.json"

    @property
    def train_env(self) -> Path:
        return self.train / "env.json"

    @property
    def tensorboard(self) -> Path:
        return self.train / "tb"

    @property
    def tracker_ids(self) -> Path:
        """The W&B / MLflow run ids of this run, so training and evaluation log to one run."""
        return self.root / "tracker.json"

    @property
    def mlruns(self) -> Path:
        """MLflow's file store when log.uri is empty."""
        return self.root / "mlruns"

    @property
    def selected_ids(self) -> Path:
        """Online selection's chosen sample ids, one JSON line per step."""
        return self.train / "selected.jsonl"

    @property
    def reference_embeddings(self) -> Path:
        """Online selection's cached embeddings of the pool by the frozen reference."""
        return self.train / "reference_embeddings.safetensors"

    # -- MoCE expert search --------------------------------------------------------------------
    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def expert_checkpoint(self) -> Path:
        return self.search / "expert.safetensors"

    @property
    def search_report(self) -> Path:
        return self.search / "search.json"

    # -- evaluation ----------------------------------------------------------------------------
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def results(self) -> Path:
        return self.eval / "results.json"

    @property
    def pca(self) -> Path:
        return self.eval / "pca.png"

    def features_cache(self, dataset_key: str, split: str) -> Path:
        return self.eval / f"features_{dataset_key.replace(':', '_')}_{split}.npz"

    # -- data scaling --------------------------------------------------------------------------
    @property
    def scale(self) -> Path:
        return self.root / "scale"

    def scale_run(self, captions: int, images_per_caption: int) -> Path:
        return self.scale / f"c{captions}_k{images_per_caption}"

    @property
    def scale_results(self) -> Path:
        return self.scale / "results.json"

    @property
    def scale_plot(self) -> Path:
        return self.scale / "fit.png"

    # -- the mini generator --------------------------------------------------------------------
    @property
    def generator(self) -> Path:
        return self.root / "generator"

    @property
    def generator_pipeline(self) -> Path:
        return self.generator / "pipeline"

    @property
    def generator_eval(self) -> Path:
        return self.root / "generator_eval"


def layout(cfg: _HasRunDir) -> RunLayout:
    """The layout of ``cfg``'s run directory (``run.dir``)."""
    return RunLayout(cfg.run_dir)
