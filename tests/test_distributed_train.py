"""The training loop under torchrun with 2 gloo processes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from synrep.checkpoint import Checkpoint
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


def test_two_process_online_selection_picks_one_global_batch(tmp_path):
    """JEST under DDP: each rank scores its half of the super-batch, the selection is made once
    over the gathered embeddings, and every rank trains on its share of it."""
    import numpy as np

    from synrep.data.shards import CaptionGroup, write_shard, write_sizes

    rng = np.random.default_rng(0)
    write_shard(tmp_path / "shards/00000.tar", [
        CaptionGroup(key=f"{i:06d}", caption=f"caption {i}", meta={},
                     images=[rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(3)])
        for i in range(32)])
    write_sizes(tmp_path / "shards")
    proc = _torchrun(2, tmp_path / "ddp", "train.batch_size=8", "method.name=stablerep",
                     "method.stablerep.images_per_caption=2", "data.source=shards",
                     f"data.shards={tmp_path / 'shards'}", "selection.online=true",
                     "selection.score=hard_learner", "selection.filter_ratio=0.5",
                     "selection.chunks=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ddp/train/selected.jsonl").open()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # rank 0 writes the global choice
    for r in rows:
        assert len(r["ids"]) == 8 and len(set(r["ids"])) == 8
        assert all(0 <= i < 32 for i in r["ids"])
    acct = json.loads((tmp_path / "ddp/train/summary.json").read_text())["accounting"]
    assert acct["images_read_per_step"] == 16 * 2  # the global super-batch: 16 groups, m = 2
