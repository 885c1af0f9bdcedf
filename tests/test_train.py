"""Training end to end on real Fashion-MNIST at toy scale: resume, divergence, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synrep.checkpoint import Checkpoint, save_checkpoint
from synrep.cli import main
from synrep.config import load_config
from synrep.errors import CheckpointError, ConfigError
from tests.conftest import TINY, needs_fashion

CONFIG = "configs/fashion_simclr.yaml"
ROOT = Path(__file__).resolve().parents[1]


def _synrep(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synrep", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


@needs_fashion
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    # Uninterrupted run.
    a = _synrep("train", CONFIG, *TINY, f"run.dir={tmp_path / 'a'}")
    assert a.returncode == 0, a.stderr
    # Killed with SIGKILL right after step 3 (its last checkpoint is step 2), then rerun.
    b_args = ("train", CONFIG, *TINY, f"run.dir={tmp_path / 'b'}")
    killed = _synrep(*b_args, env={"SYNREP_DEBUG_KILL_AT_STEP": "3"})
    assert killed.returncode == -9
    last = tmp_path / "b/train/checkpoints/last.safetensors"
    assert Checkpoint(last).step == 2
    assert not (tmp_path / "b/train/checkpoints/final.safetensors").exists()
    resumed = _synrep(*b_args)
    assert resumed.returncode == 0, resumed.stderr

    fa = Checkpoint(tmp_path / "a/train/checkpoints/final.safetensors")
    fb = Checkpoint(tmp_path / "b/train/checkpoints/final.safetensors")
    assert fa.model_state.keys() == fb.model_state.keys()
    for k, v in fa.model_state.items():
        assert torch.equal(v, fb.model_state[k]), k

    def last_loss(run: str) -> float:
        rows = [json.loads(x) for x in (tmp_path / run / "train/metrics.jsonl").open()]
        return [r["loss"] for r in rows if r["step"] == 6][-1]

    assert last_loss("a") == last_loss("b")


@needs_fashion
def test_same_seed_same_trajectory_and_completed_stage_is_skipped(tmp_path, capsys):
    args = [*TINY, "train.steps=3", "run.stages=[train]"]
    assert main(["run", CONFIG, *args, f"run.dir={tmp_path / 'a'}"]) == 0
    assert main(["run", CONFIG, *args, f"run.dir={tmp_path / 'b'}"]) == 0
    fa = Checkpoint(tmp_path / "a/train/checkpoints/final.safetensors").model_state
    fb = Checkpoint(tmp_path / "b/train/checkpoints/final.safetensors").model_state
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    capsys.readouterr()
    assert main(["run", CONFIG, *args, f"run.dir={tmp_path / 'a'}"]) == 0
    assert "[train] complete, skipped" in capsys.readouterr().out


@needs_fashion
def test_finished_evaluation_is_reused_only_with_the_same_settings(tmp_path, capsys):
    args = [*TINY, "train.steps=2", "run.stages=[train,eval]", "eval.protocols=[knn]",
            f"run.dir={tmp_path}"]
    assert main(["run", CONFIG, *args]) == 0
    capsys.readouterr()
    assert main(["run", CONFIG, *args]) == 0
    assert "[eval] complete, skipped" in capsys.readouterr().out
    # Another test subset changes the result: evaluated again, not reused.
    assert main(["run", CONFIG, *args, "eval.limit_test=300"]) == 0
    assert "[eval] running" in capsys.readouterr().out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["fashion-mnist"]
    assert results["settings"]["limit_test"] == 300


@needs_fashion
def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", CONFIG, *TINY, f"run.dir={run}"]
    assert main([*args, "train.steps=2"]) == 0
    good = Checkpoint(run / "train/checkpoints/last.safetensors")
    # Continue the same run with an absurd learning rate: a different optim config is refused...
    assert main([*args, "optim.lr=1e30"]) == 2
    assert "different 'optim' config" in capsys.readouterr().err
    # ...and a fresh run that diverges stops with a message naming the step.
    run2 = tmp_path / "run2"
    code = main(["train", CONFIG, *TINY, "optim.lr=1e30", "optim.grad_clip=0",
                 "optim.warmup_steps=1", f"run.dir={run2}"])
    err = capsys.readouterr().err
    assert code == 2 and "loss became" in err and "Lower optim.lr" in err
    assert not (run2 / "train/checkpoints/final.safetensors").exists()
    assert good.step == 2


def test_foreign_checkpoints_are_rejected_without_unpickling(tmp_path, capsys):
    # A pickle whose loading would run code: it must never be unpickled.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pickled = tmp_path / "model.pt"
    torch.save({"x": Evil()}, pickled)
    with pytest.raises(CheckpointError, match="not a synrep checkpoint"):
        Checkpoint(pickled)
    assert not marker.exists()
    assert main(["embed", "--checkpoint", str(pickled), "--out", str(tmp_path / "f.npz")]) == 2
    assert "not a synrep checkpoint" in capsys.readouterr().err

    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="no synrep metadata"):
        Checkpoint(plain)


def test_checkpoint_round_trip_with_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    cfg = load_config(None, []).to_dict()
    path = save_checkpoint(tmp_path / "c.safetensors", model, cfg, 5, opt)
    ck = Checkpoint(path)
    assert ck.step == 5 and ck.config == json.loads(json.dumps(cfg))
    model2 = torch.nn.Linear(3, 2)
    ck.load_model(model2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    opt2.load_state_dict(ck.optimizer_state())
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for pid in s1["state"]:
        for k, v in s1["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][pid][k]))
    with pytest.raises(CheckpointError, match="does not fit"):
        ck.load_model(torch.nn.Linear(4, 2))


@needs_fashion
def test_unwritable_output_directory(tmp_path, capsys):
    if os.geteuid() == 0:
        # root ignores permission bits: use a path below a regular file instead.
        (tmp_path / "file").write_text("")
        target = tmp_path / "file" / "run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    assert main(["train", CONFIG, *TINY, f"run.dir={target}"]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "run.dir=PATH" in err


@needs_fashion
def test_missing_fashion_mnist_is_a_clear_error(tmp_path, capsys):
    code = main(["train", CONFIG, *TINY, f"data.root={tmp_path / 'nowhere'}",
                 f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "apt-get install -y dataset-fashion-mnist" in err


@needs_fashion
def test_train_eval_embed_end_to_end(tmp_path):
    run = tmp_path / "run"
    assert main(["run", CONFIG, *TINY, f"run.dir={run}", "eval.sgd_epochs=20",
                 "eval.protocols=[linear,sgd,knn,fewshot,zeroshot]", "eval.fewshot_seeds=2",
                 "eval.fewshot_shots=[1,10]", "eval.pca_images=6"]) == 0
    results = json.loads((run / "eval/results.json").read_text())["fashion-mnist"]
    for key in ("linear_probe_top1", "sgd_probe_top1", "knn_top1"):
        assert 50.0 < results[key] <= 100.0  # chance is 10 %
    assert 20.0 < results["fewshot_1shot_top1"] < results["fewshot_10shot_top1"] < 90.0
    assert len(results["fewshot"]["1"]["runs"]) == 2
    # the SGD grid tried every pooling held in the cached cls+avg features of the last 4 blocks
    assert results["sgd_probe_best_pool"] in ("cls", "avg", "cls+avg", "cls/4", "avg/4",
                                              "cls+avg/4")
    assert results["skipped"] == {"zeroshot": "the checkpoint has no text tower"}
    assert results["pca_maps"] == "pca.png" and (run / "eval/pca.png").stat().st_size > 0
    assert set(results["timings"]) >= {"features_s", "linear_s", "sgd_s", "knn_s", "fewshot_s"}
    # fine-tuning with layer decay through the same stage, on the trained checkpoint
    ck = str(run / "train/checkpoints/final.safetensors")
    assert main(["eval", CONFIG, *TINY, f"run.dir={tmp_path / 'ft'}", "--checkpoint", ck,
                 "eval.protocols=[finetune]", "eval.finetune_batch_size=50",
                 "eval.finetune_lr=1e-3", "eval.pca_images=0"]) == 0
    ft = json.loads((tmp_path / "ft/eval/results.json").read_text())["fashion-mnist"]
    assert 30.0 < ft["finetune_top1"] <= 100.0 and len(ft["finetune_train_loss"]) == 1
    # a second run finds every protocol done and skips the stage
    assert main(["run", CONFIG, *TINY, f"run.dir={run}", "eval.sgd_epochs=20",
                 "eval.protocols=[linear,sgd,knn,fewshot,zeroshot]", "eval.fewshot_seeds=2",
                 "eval.fewshot_shots=[1,10]", "eval.pca_images=6", "run.stages=[eval]"]) == 0
    assert (run / "config.yaml").exists()
    assert (run / "train/tb").is_dir()
    ck = Checkpoint(run / "train/checkpoints/final.safetensors")
    assert ck.config["train"]["steps"] == 6

    out = tmp_path / "feats.npz"
    assert main(["embed", "--checkpoint", str(run / "train/checkpoints/final.safetensors"),
                 "--dataset", "fashion-mnist", "--split", "test", "--out", str(out)]) == 0
    data = np.load(out)
    assert data["features"].shape == (10000, 192 * 2 * 4)  # cls+avg of the last 4 blocks
    assert data["labels"].shape == (10000,)


def test_stablerep_trains_on_caption_group_shards(tmp_path):
    from synrep.data.shards import CaptionGroup, write_shard, write_sizes

    rng = np.random.default_rng(0)
    shard_dir = tmp_path / "shards"
    for s in range(2):
        groups = [CaptionGroup(key=f"{s * 8 + i:06d}", caption=f"caption {s * 8 + i}",
                               meta={"label": i % 10},
                               images=[rng.integers(0, 256, (28, 28), dtype=np.uint8)
                                       for _ in range(3)])
                  for i in range(8)]
        write_shard(shard_dir / f"{s:05d}.tar", groups)
    write_sizes(shard_dir)
    run = tmp_path / "run"
    args = ["train", CONFIG, *TINY, "train.batch_size=8", "train.steps=2",
            "method.name=stablerep", "method.stablerep.images_per_caption=2", "data.source=shards",
            f"data.shards={shard_dir}", f"run.dir={run}"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (run / "train/metrics.jsonl").open()]
    # 8 captions x 2 images, one view each: the loss starts near log(15), the uniform value.
    assert rows[-1]["step"] == 2 and 1.0 < rows[0]["loss"] < 4.0

    # a data-size prefix of the shards (what `synrep scale` trains on), and clear errors past it
    from synrep.factory import build_source

    cfg = load_config(CONFIG, [*args[2:], "data.max_captions=10", "data.max_images_per_caption=2"])
    src = build_source(cfg, "groups")
    assert src.images.shape[:2] == (10, 2)
    with pytest.raises(ConfigError, match="max_captions=17 but .* holds only 16 caption groups"):
        build_source(load_config(CONFIG, [*args[2:], "data.max_captions=17"]), "groups")
    with pytest.raises(ConfigError, match="max_images_per_caption=4 but .* has 3 images"):
        build_source(load_config(CONFIG, [*args[2:], "data.max_images_per_caption=4"]), "groups")


@needs_fashion
def test_supervised_method_learns_labels(tmp_path):
    run = tmp_path / "run"
    assert main(["train", CONFIG, *TINY, "method.name=supervised", "train.steps=20",
                 "train.log_every=10", "optim.lr=3e-3", f"run.dir={run}"]) == 0
    rows = [json.loads(x) for x in (run / "train/metrics.jsonl").open()]
    assert "train_acc" in rows[-1]
    assert rows[-1]["loss"] < rows[0]["loss"] < 2.5  # falls from ~log(10) = 2.30 at the start


@needs_fashion
def test_bf16_autocast_is_deterministic_and_recorded(tmp_path):
    args = [*TINY, "train.steps=3", "run.stages=[train]", "train.precision=bf16"]
    for run in ("a", "b"):
        assert main(["run", CONFIG, *args, f"run.dir={tmp_path / run}"]) == 0
    assert main(["run", CONFIG, *args[:-1], f"run.dir={tmp_path / 'fp32'}"]) == 0
    final = "train/checkpoints/final.safetensors"
    fa = Checkpoint(tmp_path / "a" / final).model_state
    fb = Checkpoint(tmp_path / "b" / final).model_state
    f32 = Checkpoint(tmp_path / "fp32" / final).model_state
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert not all(torch.equal(fa[k], f32[k]) for k in fa)  # autocast really was on
    env = json.loads((tmp_path / "a/train/env.json").read_text())
    assert env["precision"] == "bf16" and env["precision_config"] == "bf16"
    assert env["attention"] == "explicit"  # bf16 on a CPU: see choose_attention
    env32 = json.loads((tmp_path / "fp32/train/env.json").read_text())
    assert env32["precision"] == "fp32" and env32["attention"] == "fused"


def test_explicit_and_fused_attention_compute_the_same():
    from synrep.config import load_config
    from synrep.device import choose_attention
    from synrep.models import build_encoder

    cfg = load_config("configs/quickstart.yaml", ["model.patch_drop=0"])  # the same tokens
    torch.manual_seed(0)
    enc = build_encoder(cfg.model).double()  # float64: the two paths agree to rounding
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    cpu = torch.device("cpu")
    outs, grads = {}, {}
    for precision in ("fp32", "bf16"):
        kind = choose_attention(enc, cpu, precision)
        assert kind == ("fused" if precision == "fp32" else "explicit")
        flags = {m.fused_attn for m in enc.modules() if hasattr(m, "fused_attn")}
        assert flags == {kind == "fused"} and len(enc.backbone.blocks) > 0
        enc.zero_grad()
        out = enc(x)  # no autocast either time: only the attention path differs
        out.square().sum().backward()
        outs[kind] = out.detach()
        grads[kind] = enc.backbone.blocks[0].attn.qkv.weight.grad.clone()
    torch.testing.assert_close(outs["explicit"], outs["fused"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads["explicit"], grads["fused"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("avx512_bf16", "amx", "kernels", "expected"), [
    (True, False, "AVX512", "bf16"), (False, True, "AVX512", "bf16"),
    (False, False, "AVX512", "fp32"),
    (True, True, "AVX2", "fp32"),  # ATEN_CPU_CAPABILITY=avx2: runs as an AVX2-only CPU
    (True, True, "DEFAULT", "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(
        monkeypatch, avx512_bf16, amx, kernels, expected):
    from synrep.device import resolve_precision

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: kernels)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    for explicit in ("fp32", "bf16", "fp16"):  # an explicit choice is never overridden
        assert resolve_precision(explicit, cpu) == explicit


@needs_fashion
def test_patch_drop_masks_every_step_but_the_unmasked_tail(tmp_path, monkeypatch):
    """model.patch_drop=0.5 with patch_drop_unmasked_steps=2 over 6 steps: the encoder keeps half
    its patch tokens in steps 1-4 and every token in steps 5-6 (FLIP's unmasked tuning); a
    killed and resumed run ends with the same weights."""
    from timm.layers import PatchDropout

    from synrep.train.loop import train

    seen: list[float] = []
    forward = PatchDropout.forward

    def record(self, x):
        if self.training:
            seen.append(self.prob)
        return forward(self, x)

    monkeypatch.setattr(PatchDropout, "forward", record)
    over = [*TINY, "model.patch_drop=0.5", "model.patch_drop_unmasked_steps=2"]
    train(load_config(ROOT / CONFIG, [*over, f"run.dir={tmp_path / 'inproc'}"]))
    per_step = len(seen) // 6  # SimCLR encodes its views in one or more calls per step
    assert per_step >= 1 and len(seen) == 6 * per_step
    assert seen == [0.5] * (4 * per_step) + [0.0] * (2 * per_step)

    # uninterrupted against killed after step 5 and resumed, both as the CLI runs them
    assert _synrep("train", CONFIG, *over, f"run.dir={tmp_path / 'a'}").returncode == 0
    b_args = ("train", CONFIG, *over, f"run.dir={tmp_path / 'b'}")
    killed = _synrep(*b_args, env={"SYNREP_DEBUG_KILL_AT_STEP": "5"})
    assert killed.returncode == -9
    assert _synrep(*b_args).returncode == 0
    fa = Checkpoint(tmp_path / "a/train/checkpoints/final.safetensors").model_state
    fb = Checkpoint(tmp_path / "b/train/checkpoints/final.safetensors").model_state
    assert all(torch.equal(v, fb[k]) for k, v in fa.items())


@pytest.mark.parametrize("limit", [0.0, 1e-3, 1e6])
def test_train_step_clips_exactly_as_clip_grad_norm(limit):
    """train_step scales gradients only when clipping changes them; the result and the logged
    norm equal torch's clip_grad_norm_ on the same gradients."""
    from synrep.train.step import train_step

    class Quad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.linspace(-2, 3, 12).view(3, 4))
            self.b = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

        def forward(self, batch, g):
            return {"loss": ((batch["images"] @ self.w.t() + self.b) ** 2).sum()}

        def after_step(self):
            pass

    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    grads = []
    for ours in (True, False):
        m = Quad()
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        if ours:
            res = train_step(m, m, opt, {"images": x}, torch.Generator(), grad_clip=limit)
            norm = res.grad_norm
        else:
            m({"images": x}, None)["loss"].backward()
            norm = torch.nn.utils.clip_grad_norm_(m.parameters(), limit if limit else math.inf)
        grads.append(([p.grad.clone() for p in m.parameters()], norm))
    (ours_g, ours_n), (ref_g, ref_n) = grads
    assert float(ours_n) == pytest.approx(float(ref_n), rel=1e-6)
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    if limit == 1e-3:  # clipped: the new norm is the limit
        total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in ours_g]))
        assert float(total) == pytest.approx(limit, rel=1e-4)


def test_the_optimizer_is_fused_adamw_on_a_cpu():
    from synrep.factory import build_method, build_optimizer

    cfg = load_config("quickstart", ["run.dir=/nonexistent"])
    opt = build_optimizer(cfg, build_method(cfg))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
