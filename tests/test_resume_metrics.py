"""A resumed run logs what an uninterrupted one logs; the mini generator's state resumes whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from synrep.checkpoint import Checkpoint
from synrep.config import load_config
from synrep.errors import CheckpointError
from synrep.images import mini
from synrep.layout import layout
from synrep.train.loop import _cut_metrics
from tests.conftest import TINY, needs_fashion

CONFIG = "configs/fashion_simclr.yaml"
ROOT = Path(__file__).resolve().parents[1]
# Keys that hold wall-clock time: they differ between any two runs.
WALL_CLOCK = {"samples_per_s", "score_seconds", "train_seconds"}


def _train(run: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        # bf16: the FLOP counter's step rounds differently there, so a resumed run must not
        # count again (it reads the count from its checkpoint)
        [sys.executable, "-m", "synrep", "train", CONFIG, *TINY, "train.log_every=1",
         "train.precision=bf16",
         f"run.dir={run}"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600)


def _rows(run: Path) -> list[dict]:
    path = layout(load_config(CONFIG, [f"run.dir={run}"])).metrics
    return [json.loads(x) for x in path.read_text().splitlines()]


@needs_fashion
def test_killed_and_resumed_run_logs_the_same_metrics(tmp_path):
    a = _train(tmp_path / "a")
    assert a.returncode == 0, a.stderr
    # SIGKILL right after step 3 was logged; the last checkpoint is step 2
    killed = _train(tmp_path / "b", {"SYNREP_DEBUG_KILL_AT_STEP": "3"})
    assert killed.returncode == -9
    assert [r["step"] for r in _rows(tmp_path / "b")] == [1, 2, 3]
    resumed = _train(tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr

    rows_a, rows_b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        assert {"loss", "lr", "grad_norm"} <= ra.keys()
        same = {k: ra[k] for k in ra if k not in WALL_CLOCK}
        assert same == {k: rb[k] for k in rb if k not in WALL_CLOCK}, ra["step"]
    fa = Checkpoint(layout(load_config(CONFIG, [f"run.dir={tmp_path / 'a'}"])).final_checkpoint)
    fb = Checkpoint(layout(load_config(CONFIG, [f"run.dir={tmp_path / 'b'}"])).final_checkpoint)
    assert all(torch.equal(v, fb.model_state[k]) for k, v in fa.model_state.items())


def test_metrics_are_cut_back_to_the_checkpoint_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(rows) + "\n")
    _cut_metrics(path, 2)
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"
    path.write_text(rows[0] + "\n" + rows[1] + "\n" + rows[2][:7])  # killed mid-write
    _cut_metrics(path, 4)
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"
    path.write_text(rows[0] + "\n" + rows[1])  # the last row whole but its newline not written
    _cut_metrics(path, 4)
    assert path.read_text() == rows[0] + "\n"
    _cut_metrics(path, 0)  # a fresh start (no checkpoint) keeps nothing
    assert path.read_text() == ""
    _cut_metrics(tmp_path / "missing.jsonl", 3)
    assert not (tmp_path / "missing.jsonl").exists()


class _Stop(Exception):
    pass


@pytest.mark.usefixtures("one_thread")
def test_mini_vae_interrupted_after_a_checkpoint_resumes_to_the_same_weights(
        tmp_path, monkeypatch):
    cfg = load_config("configs/generator_fashion.yaml",
                      ["generator.vae_steps=4", "generator.ckpt_every=2",
                       "generator.vae_batch_size=4"])
    images = torch.rand(16, 1, mini.IMAGE_SIZE, mini.IMAGE_SIZE,
                        generator=torch.Generator().manual_seed(0)) * 2 - 1

    def vae():
        return mini.build_components(8, seed=0)["vae"]

    scale_a = mini.train_vae(vae(), images, cfg, tmp_path / "a.safetensors")

    save = mini._save_state

    def save_then_stop(path, modules, opt, step, extra):
        save(path, modules, opt, step, extra)
        raise _Stop  # killed right after the step-2 checkpoint

    monkeypatch.setattr(mini, "_save_state", save_then_stop)
    with pytest.raises(_Stop):
        mini.train_vae(vae(), images, cfg, tmp_path / "b.safetensors")
    monkeypatch.setattr(mini, "_save_state", save)
    assert not (tmp_path / "b.opt").exists() and not list(tmp_path.glob("*.tmp"))
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "2"
        assert any(k.startswith("optim/opt/") for k in f.keys())  # optimizer state as tensors
    scale_b = mini.train_vae(vae(), images, cfg, tmp_path / "b.safetensors")

    def tensors(name: str) -> dict[str, torch.Tensor]:
        with safe_open(str(tmp_path / name), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    a, b = tensors("a.safetensors"), tensors("b.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert scale_a == scale_b


def test_mini_state_round_trips_several_optimizers_and_refuses_an_old_state(tmp_path):
    torch.manual_seed(0)
    net, critic = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opts = mini._Optimizers(g=torch.optim.AdamW(net.parameters(), betas=(0.5, 0.9)),
                            d=torch.optim.AdamW(critic.parameters(), lr=2e-3))
    for _ in range(2):
        (net(torch.randn(4, 3)).sum() + critic(torch.randn(4, 2)).sum()).backward()
        for o in opts.opts.values():
            o.step()
    path = tmp_path / "state.safetensors"
    mini._save_state(path, {"net": net, "critic": critic}, opts, 2, {"config": {"x": 1}})

    net2, critic2 = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opts2 = mini._Optimizers(g=torch.optim.AdamW(net2.parameters(), betas=(0.5, 0.9)),
                             d=torch.optim.AdamW(critic2.parameters(), lr=2e-3))
    step, extra = mini._load_state(path, {"net": net2, "critic": critic2}, opts2)
    assert step == 2 and extra == {"config": {"x": 1}}
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), net2.parameters()))
    for name, o in opts.opts.items():
        s1, s2 = o.state_dict(), opts2.opts[name].state_dict()
        assert s1["state"].keys() == s2["state"].keys()
        for pid, st in s1["state"].items():
            assert all(torch.equal(v, s2["state"][pid][k]) for k, v in st.items())
        assert s1["param_groups"][0]["lr"] == s2["param_groups"][0]["lr"]

    # an older synrep's state: weights only, the optimizer in a pickle beside it
    old = tmp_path / "old.safetensors"
    save_file({f"net.{k}": v for k, v in net.state_dict().items()}, str(old),
              metadata={"step": "2", "extra": "{}"})
    assert mini._load_state(old, {"net": net2}, None)[0] == 2  # weights alone still load
    with pytest.raises(CheckpointError, match="no optimizer state"):
        mini._load_state(old, {"net": net2}, torch.optim.AdamW(net2.parameters()))
