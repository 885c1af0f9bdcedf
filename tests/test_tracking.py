"""log.tracker: training and evaluation figures reach TensorBoard, W&B (offline) and MLflow, in one
tracker run per run folder, equal to metrics.jsonl and results.json."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from synrep.config import load_config
from synrep.errors import ConfigError
from synrep.tracking import open_tracker, scalars_of
from tests.conftest import TINY, needs_fashion

ROOT = Path(__file__).resolve().parents[1]
EVAL = ["eval.protocols=[linear,knn]", "eval.pca_images=0"]


def _run(run: Path, tracker: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "synrep", "run", "configs/fashion_simclr.yaml", *TINY, *EVAL,
         f"run.dir={run}", f"log.tracker={tracker}"], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]


def _expected(run: Path) -> tuple[dict[int, float], dict[str, float]]:
    rows = [json.loads(x) for x in (run / "train/metrics.jsonl").read_text().splitlines()]
    results = json.loads((run / "eval/results.json").read_text())["fashion-mnist"]
    return {r["step"]: r["loss"] for r in rows}, results


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file: W&B's append-only log (a 7-byte file header, then
    32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, _, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    pos, chunk, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(chunk)
            yield rec
            chunk = b""


@needs_fashion
def test_wandb_offline_records_training_and_evaluation_in_one_run(tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    _run(run, "wandb", {"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    loss, results = _expected(run)
    run_id = json.loads((run / "tracker.json").read_text())["wandb"]
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # train, eval
    history: dict[str, dict[int, float]] = {}
    configs = []
    for f in files:
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in rec.history.item}
                for k, v in row.items():
                    history.setdefault(k, {})[int(row["step"])] = v
            elif kind == "run":
                configs.append({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    assert history["train/loss"] == pytest.approx(loss, rel=1e-6)
    assert history["eval/fashion-mnist/linear_probe_top1"] == {6: results["linear_probe_top1"]}
    assert history["eval/fashion-mnist/knn_top1"] == {6: results["knn_top1"]}
    assert configs and configs[0]["train"]["steps"] == 6


@needs_fashion
def test_mlflow_records_training_and_evaluation_in_one_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    _run(run, "mlflow")
    loss, results = _expected(run)
    run_id = json.loads((run / "tracker.json").read_text())["mlflow"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((run / "mlruns").resolve().as_uri())
    got = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert got == pytest.approx(loss, rel=1e-6)
    top1 = client.get_metric_history(run_id, "eval/fashion-mnist/linear_probe_top1")
    assert [(m.step, m.value) for m in top1] == [(6, pytest.approx(results["linear_probe_top1"]))]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.json"]


@needs_fashion
def test_tensorboard_holds_training_and_evaluation_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _run(run, "tensorboard")
    loss, results = _expected(run)
    acc = EventAccumulator(str(run / "train/tb"))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(loss, rel=1e-6)
    top1 = acc.Scalars("eval/fashion-mnist/linear_probe_top1")
    assert [(e.step, e.value) for e in top1] == [(6, pytest.approx(results["linear_probe_top1"]))]


def test_a_tracker_that_is_not_installed_is_one_clear_error(tmp_path, monkeypatch):
    cfg = load_config(ROOT / "configs/fashion_simclr.yaml",
                      [f"run.dir={tmp_path}", "log.tracker=wandb"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"log.tracker=wandb needs the wandb package: pip"):
        open_tracker(cfg, "train")
    cfg.log.tracker = "mlflow"
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"log.tracker=mlflow needs the mlflow package"):
        open_tracker(cfg, "train")


def test_an_unreachable_mlflow_store_is_one_clear_error(tmp_path):
    pytest.importorskip("mlflow")
    cfg = load_config(ROOT / "configs/fashion_simclr.yaml",
                      [f"run.dir={tmp_path}", "log.tracker=mlflow", "log.uri=nosuch://x"])
    with pytest.raises(ConfigError, match=r"log.tracker=mlflow cannot log to 'nosuch://x'"):
        open_tracker(cfg, "train")


def test_only_finite_top_level_numbers_are_logged():
    entry = {"linear_probe_top1": 88.5, "knn_top1": 86, "feature_dim": 192, "checkpoint_step": 6,
             "skipped": {"zeroshot": "no text tower"}, "fewshot": {"5": {"mean": 1.0}},
             "checkpoint": "x", "ok": True, "bad": float("nan")}
    assert scalars_of(entry, "eval/d") == {"eval/d/linear_probe_top1": 88.5,
                                           "eval/d/knn_top1": 86.0, "eval/d/feature_dim": 192.0}
