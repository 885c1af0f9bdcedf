"""Experiment trackers: training and evaluation figures to TensorBoard, Weights & Biases or MLflow.

``log.tracker`` picks one; its package is imported only when chosen (wandb and mlflow are
optional installs). Training logs ``train/<name>`` every ``train.log_every`` steps; evaluation logs
``eval/<dataset>/<figure>`` (every number of results.json's entry: ``linear_probe_top1``,
``knn_top1``, ...) at the evaluated checkpoint's step, so both appear in one run on one step axis.
The JSON files in the run folder stay the record; a tracker is a view of them.

- ``tensorboard`` (default): event files in ``RUN/train/tb`` (``tensorboard --logdir RUN``).
- ``wandb``: one W&B run per run folder (project ``log.project``, name ``run.name``, the resolved
  config as its config). ``WANDB_MODE=offline`` keeps it on disk under ``RUN/wandb`` for a later
  ``wandb sync``; credentials and entity come from W&B's own environment variables.
- ``mlflow``: one MLflow run in experiment ``log.project`` at ``log.uri`` (else
  ``$MLFLOW_TRACKING_URI``, else MLflow's file store in ``RUN/mlruns``, which MLflow 3 opens with
  ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri RUN/mlruns``); the config is
  logged as ``config.json``.

The W&B and MLflow run ids are kept in ``RUN/tracker.json``: training, a resumed training and the
evaluation of one run folder all log to the same tracker run.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from synrep.config import Config
from synrep.errors import ConfigError
from synrep.layout import layout
from synrep.utils import write_json_atomic

#: ``pip install`` lines of the optional trackers.
INSTALL = {"wandb": "pip install 'synrep[wandb]' (or pip install wandb)",
           "mlflow": "pip install 'synrep[mlflow]' (or pip install mlflow-skinny)"}


class Tracker:
    """Scalars to nowhere (``log.tracker=none``); the base of the real trackers."""

    def log(self, scalars: dict[str, float], step: int) -> None:
        """Log ``scalars`` (name -> number) at training step ``step``."""

    def close(self) -> None:
        """Flush and finish (the tracker run stays open for the next stage to resume)."""


class TensorBoardTracker(Tracker):
    def __init__(self, folder: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, cfg: Config, run_id: str, job: str) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"log.tracker=wandb needs the wandb package: {INSTALL['wandb']}; "
                              "or choose log.tracker=tensorboard") from None
        root = layout(cfg).root
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.log.project, name=cfg.run.name, id=run_id,
                              resume="allow", dir=str(root), config=cfg.to_dict(),
                              job_type=job, reinit="finish_previous")
        # one step axis for training and evaluation, whichever process logs
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({**scalars, "step": step})

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    def __init__(self, cfg: Config, run_id: str | None, ids: dict[str, str],
                 ids_path: Path) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError(f"log.tracker=mlflow needs the mlflow package: {INSTALL['mlflow']}; "
                              "or choose log.tracker=tensorboard") from None
        self.mlflow = mlflow
        uri = cfg.log.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            # MLflow 3 keeps its file store (a folder, no database server) behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = layout(cfg).mlruns.resolve().as_uri()
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(cfg.log.project)
            if run_id is None:
                run = mlflow.start_run(run_name=cfg.run.name)
                ids["mlflow"] = run.info.run_id
                write_json_atomic(ids_path, ids)
                mlflow.log_dict(cfg.to_dict(), "config.json")
            else:
                mlflow.start_run(run_id=run_id)
        except Exception as e:  # noqa: BLE001 - any store error: one line, the fix
            raise ConfigError(f"log.tracker=mlflow cannot log to {uri!r} "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                              "check log.uri (MLFLOW_TRACKING_URI), or choose "
                              "log.tracker=tensorboard") from None

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _ids(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{str(path)!r} is not valid JSON; delete it to start new tracker "
                          "runs for this run folder") from None
    return data if isinstance(data, dict) else {}


def open_tracker(cfg: Config, job: str, purge_step: int | None = None) -> Tracker:
    """The tracker ``cfg.log.tracker`` names, for ``job`` ("train" or "eval").

    ``purge_step``: a resumed training's first step; TensorBoard drops events logged after it
    by the killed run.
    """
    kind = cfg.log.tracker
    if kind == "none":
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(layout(cfg).tensorboard, purge_step)
    path = layout(cfg).tracker_ids
    ids = _ids(path)
    if kind == "wandb":
        if "wandb" not in ids:
            ids["wandb"] = secrets.token_hex(4)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, ids)
        return WandbTracker(cfg, ids["wandb"], job)
    return MlflowTracker(cfg, ids.get("mlflow"), ids, path)


def scalars_of(entry: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers at the top level of ``entry`` (one dataset of results.json), named
    ``prefix/key``; nested tables, strings, flags and the step itself are left out."""
    return {f"{prefix}/{k}": float(v) for k, v in entry.items() if k != "checkpoint_step"
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
