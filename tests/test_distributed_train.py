"""The training loop under torchrun with 2 gloo processes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from synrep.train.checkpoint import Checkpoint
from tests.conftest import TINY, needs_fashion

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(nproc: int, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "synrep", "train", "configs/fashion_simclr.yaml",
           *TINY, "train.steps=4", "run.threads=1", f"run.dir={run_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@needs_fashion
def test_two_process_training_runs_and_checkpoints(tmp_path):
    proc = _torchrun(2, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = Checkpoint(tmp_path / "ddp/train/checkpoints/final.safetensors")
    assert ck.step == 4
    assert all(torch.isfinite(v).all() for v in ck.model_state.values())
    rows = [json.loads(x) for x in (tmp_path / "ddp/train/metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [2, 4]  # only rank 0 logs
    assert all(r["loss"] > 0 for r in rows)
