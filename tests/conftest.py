from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST missing: sudo apt-get install -y dataset-fashion-mnist",
)

# A tiny but real run: the 28 px ViT, a few steps, evaluation on a subset of the test set.
TINY = [
    "train.steps=6", "train.batch_size=32", "train.ckpt_every=2", "train.log_every=2",
    "optim.warmup_steps=2", "eval.limit_train=1000",
    "eval.limit_test=500", "eval.linear_cs=[0.1,1.0]", "eval.linear_max_iter=30",
]


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    return [*TINY, f"run.dir={tmp_path / 'run'}"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch intra-op thread for the test, restored afterwards.

    Tests on small tensors use it (``pytestmark = pytest.mark.usefixtures("one_thread")``): with 2
    threads on a shared 2-core machine, OpenMP synchronisation made each small op up to ~100x
    slower, and a 2 s fine-tuning test took minutes next to another job.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
