"""The quickstart learns from models only: no real image may reach its pretraining stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import synrep.data.fashion_mnist as fmnist
from synrep.config import load_config
from synrep.data.sources import ArraySource
from synrep.pipeline import run_stages

ROOT = Path(__file__).resolve().parents[1]


def _tiny_quickstart(tmp_path: Path):
    return load_config(ROOT / "configs" / "quickstart.yaml", [
        f"run.dir={tmp_path / 'run'}", "captions.num=16", "captions.shard_size=16",
        "images.shard_size=8", "images.steps=2", "train.steps=2", "train.batch_size=4",
        "train.ckpt_every=1", "method.synclr.proj_hidden_dim=32",
        "method.synclr.ibot_prototypes=16",
    ])


def test_quickstart_pretraining_sees_no_real_image(tmp_path, monkeypatch):
    real = np.concatenate([fmnist.load_fashion_mnist(s)[0] for s in ("train", "test")])
    real_rows = {row.tobytes() for row in real.reshape(len(real), -1)}

    def refuse(*args, **kwargs):
        raise AssertionError("a real Fashion-MNIST file was read before evaluation")

    monkeypatch.setattr(fmnist, "read_idx", refuse)
    served: list[torch.Tensor] = []
    batch = ArraySource.batch

    def spy(self, step):
        out = batch(self, step)
        served.append(out["images"].clone())
        return out

    monkeypatch.setattr(ArraySource, "batch", spy)
    cfg = _tiny_quickstart(tmp_path)
    assert cfg.data.source == "shards"
    assert "train" in cfg.run.stages and "eval" in cfg.run.stages
    run_stages(cfg, ["captions", "images", "train"])

    assert served, "the train stage drew no batch"
    images = torch.cat([s.flatten(0, 1) for s in served])  # (n, 1, 28, 28) uint8
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
    leaked = sum(row.tobytes() in real_rows for row in images.reshape(len(images), -1).numpy())
    assert leaked == 0, f"{leaked} real Fashion-MNIST images reached pretraining"
    assert (cfg.run_dir / "train" / "checkpoints" / "final.safetensors").exists()


def test_the_guard_catches_a_real_data_run(tmp_path, monkeypatch):
    """Negative control: the same guard stops a run whose pretraining reads Fashion-MNIST."""

    def refuse(*args, **kwargs):
        raise AssertionError("a real Fashion-MNIST file was read before evaluation")

    monkeypatch.setattr(fmnist, "read_idx", refuse)
    cfg = load_config(ROOT / "configs" / "fashion_simclr.yaml",
                      [f"run.dir={tmp_path / 'real'}", "train.steps=1"])
    with pytest.raises(AssertionError, match="real Fashion-MNIST"):
        run_stages(cfg, ["train"])
