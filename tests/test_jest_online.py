"""JEST wired to training: online selection in the trainer, Flexi scoring, accounting, the
reference-embedding cache, offline selection with resharding, and bad settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synrep.checkpoint import Checkpoint
from synrep.cli import main
from synrep.data.shards import CaptionGroup, iter_groups, write_shard, write_sizes
from tests.conftest import TINY

CONFIG = "configs/fashion_simclr.yaml"
ROOT = Path(__file__).resolve().parents[1]
GROUPS = 24


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """24 caption groups of 3 images, plus a reference model trained on the first 8."""
    root = tmp_path_factory.mktemp("jest")
    rng = np.random.default_rng(0)
    groups = [CaptionGroup(key=f"{i:06d}", caption=f"caption {i}", meta={"label": i % 10},
                           images=[rng.integers(0, 256, (28, 28), dtype=np.uint8)
                                   for _ in range(3)])
              for i in range(GROUPS)]
    write_shard(root / "shards" / "00000.tar", groups[:16])
    write_shard(root / "shards" / "00001.tar", groups[16:])
    write_sizes(root / "shards")
    base = [*TINY, "run.threads=1", "train.batch_size=4", "method.name=stablerep",
            "data.source=shards", f"data.shards={root / 'shards'}"]
    ref_dir = root / "reference"
    assert main(["train", CONFIG, *base, "train.steps=2", "data.max_captions=8",
                 f"run.dir={ref_dir}"]) == 0
    return {"root": root, "base": base,
            "reference": str(ref_dir / "train/checkpoints/final.safetensors")}


def _online(pool, run, *extra):
    return ["train", CONFIG, *pool["base"], "train.steps=4", "selection.online=true",
            f"selection.reference={pool['reference']}", "selection.filter_ratio=0.5",
            "selection.chunks=2", f"run.dir={run}", *extra]


def _ids(run):
    return [json.loads(line) for line in (run / "train/selected.jsonl").read_text().splitlines()]


def test_online_selection_trains_logs_ids_and_accounts(pool, tmp_path):
    run = tmp_path / "a"
    assert main(_online(pool, run, "train.keep_every=2")) == 0
    kept = sorted(p.name for p in (run / "train/checkpoints").glob("step_*.safetensors"))
    assert kept == ["step_000002.safetensors", "step_000004.safetensors"]
    assert Checkpoint(run / "train/checkpoints/step_000002.safetensors").step == 2
    rows = _ids(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:  # b = (1 - 0.5) * 8 = 4 distinct groups of the pool per step
        assert len(r["ids"]) == 4 and len(set(r["ids"])) == 4
        assert all(0 <= i < GROUPS for i in r["ids"])
    summary = json.loads((run / "train/summary.json").read_text())["accounting"]
    assert summary["images_read_per_step"] == 8 * 2  # the super-batch is read, m = 2 each
    assert summary["images_read"] == 4 * 16
    assert summary["train_flops_per_step"] > 0 and summary["score_flops_per_step"] > 0
    assert summary["reference_pool_flops"] > 0
    assert summary["total_flops"] == pytest.approx(
        4 * (summary["train_flops_per_step"] + summary["score_flops_per_step"]))
    metrics = [json.loads(x) for x in (run / "train/metrics.jsonl").read_text().splitlines()]
    assert {"select/learner_loss_all", "select/learner_loss_selected",
            "select/reference_loss_all", "flops", "examples_read"} <= set(metrics[-1])
    cache = run / "train/reference_embeddings.safetensors"
    assert cache.exists()

    # deterministic: the same config and seed select the same ids and reach the same weights
    again = tmp_path / "b"
    assert main(_online(pool, again, "train.keep_every=2")) == 0
    assert _ids(again) == rows
    w1 = Checkpoint(run / "train/checkpoints/final.safetensors").model_state
    w2 = Checkpoint(again / "train/checkpoints/final.safetensors").model_state
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_flexi_scoring_costs_fewer_flops(pool, tmp_path):
    full, low = tmp_path / "full", tmp_path / "low"
    assert main(_online(pool, full, "train.steps=1", "selection.score=hard_learner",
                        "selection.reference=")) == 0
    assert main(_online(pool, low, "train.steps=1", "selection.score=hard_learner",
                        "selection.reference=", "selection.score_size=14")) == 0
    f_full = json.loads((full / "train/summary.json").read_text())["accounting"]
    f_low = json.loads((low / "train/summary.json").read_text())["accounting"]
    assert f_low["score_flops_per_step"] < 0.5 * f_full["score_flops_per_step"]
    assert f_low["train_flops_per_step"] == f_full["train_flops_per_step"]
    assert f_full["reference_pool_flops"] == 0  # hard learner: no reference pass

    # Flexi-JEST's mixed-resolution training: half the chosen groups train at the scoring size
    synclr = ["method.name=synclr", "method.synclr.teacher=false", "method.synclr.ibot_weight=0"]
    flexi = {}
    for share in (0.0, 0.5):
        run = tmp_path / f"flexi_{share}"
        assert main(_online(pool, run, "train.steps=1", "selection.score=hard_learner",
                            "selection.reference=", "selection.score_size=14", *synclr,
                            f"method.synclr.low_res_share={share}",
                            "method.synclr.low_res_size=14")) == 0
        flexi[share] = json.loads((run / "train/summary.json").read_text())["accounting"]
    assert flexi[0.5]["train_flops_per_step"] < 0.7 * flexi[0.0]["train_flops_per_step"]
    assert flexi[0.5]["score_flops_per_step"] == flexi[0.0]["score_flops_per_step"]

    # scoring 2 of each caption's 3 images costs about 2/3 of scoring all 3
    three, two = tmp_path / "three", tmp_path / "two"
    for run, extra in ((three, []), (two, ["selection.score_images=2"])):
        assert main(_online(pool, run, "train.steps=1", "selection.score=hard_learner",
                            "selection.reference=", "method.stablerep.images_per_caption=3",
                            *extra)) == 0
    f3, f2 = (json.loads((r / "train/summary.json").read_text())["accounting"]
              for r in (three, two))
    assert f2["score_flops_per_step"] == pytest.approx(2 / 3 * f3["score_flops_per_step"],
                                                       rel=0.05)


def test_independent_selection_and_easy_reference(pool, tmp_path):
    run = tmp_path / "ind"
    assert main(_online(pool, run, "train.steps=2", "selection.joint=false",
                        "selection.score=easy_reference")) == 0
    rows = _ids(run)
    assert len(rows) == 2 and all(len(set(r["ids"])) == 4 for r in rows)
    summary = json.loads((run / "train/summary.json").read_text())["accounting"]
    assert summary["score_flops_per_step"] == 0  # easy reference: cached embeddings only


def test_resume_replays_the_same_selection(pool, tmp_path):
    full = tmp_path / "full"
    assert main(_online(pool, full, "train.ckpt_every=2")) == 0
    # killed after step 3 (last checkpoint at step 2), with a torn last line in the ids log
    part = tmp_path / "part"
    env = {**os.environ, "SYNREP_DEBUG_KILL_AT_STEP": "3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "synrep", *_online(pool, part,
                                                                    "train.ckpt_every=2")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert Checkpoint(part / "train/checkpoints/last.safetensors").step == 2
    with open(part / "train/selected.jsonl", "a") as f:
        f.write('{"step": 3, "id')
    assert main(_online(pool, part, "train.ckpt_every=2")) == 0
    assert _ids(part) == _ids(full)
    w1 = Checkpoint(full / "train/checkpoints/final.safetensors").model_state
    w2 = Checkpoint(part / "train/checkpoints/final.safetensors").model_state
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("override, message", [
    ("selection.filter_ratio=1.0", "selection.filter_ratio=1.0 is out of range: must be in [0, 1)"),
    ("selection.filter_ratio=-0.1", "selection.filter_ratio=-0.1 is out of range"),
    ("selection.chunks=5", "selection.chunks=5 must be in [1, 4]"),
    ("selection.filter_ratio=0.3", "no whole super-batch"),
    ("selection.reference=", "needs a frozen reference model"),
    ("selection.score_images=1", "selection.score_images=1 is out of range: must be >= 2"),
    ("selection.score_images=3", "selection.score_images=3 must be in [2, 2]"),
])
def test_bad_settings_are_clear_errors(pool, tmp_path, capsys, override, message):
    assert main(_online(pool, tmp_path / "bad", override)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad/train/checkpoints/final.safetensors").exists()


def test_reference_with_another_embedding_size_is_rejected(pool, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", CONFIG, *pool["base"], "train.steps=1", "method.stablerep.proj_dim=32",
                 f"run.dir={other}"]) == 0
    ref = other / "train/checkpoints/final.safetensors"
    assert main(_online(pool, tmp_path / "bad", f"selection.reference={ref}")) == 2
    err = capsys.readouterr().err
    assert "embeds images in 32 dimensions but the learner in 128" in err
    assert "method.stablerep.proj_dim" in err
    # found before the reference's pass over the pool: no cache of the wrong size is left
    assert not (tmp_path / "bad/train/reference_embeddings.safetensors").exists()
    # offline: a learner and a reference of different embedding sizes
    off = ["run", CONFIG, *pool["base"], "run.stages=[select]", "selection.filter_ratio=0.5",
           "selection.chunks=2", "selection.super_batch=8", f"selection.reference={ref}",
           f"selection.learner={pool['reference']}", f"run.dir={tmp_path / 'off'}"]
    assert main(off) == 2
    assert "selection.reference embeds images in 32 dimensions but selection.learner in 128" \
        in capsys.readouterr().err
    assert not (tmp_path / "off/select/ids.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["selection.chunks=5"], "selection.chunks=5 must be in [1, 4]"),
    (["selection.chunks=0"], "selection.chunks=0 is out of range: must be >= 1"),
    (["selection.temperature=0"], "selection.temperature=0.0 is out of range: must be > 0"),
    (["selection.filter_ratio=1.0"], "selection.filter_ratio=1.0 is out of range"),
    (["selection.super_batch=0"], "selection.super_batch=0 is out of range: must be >= 1"),
])
def test_offline_select_rejects_bad_settings(pool, tmp_path, capsys, extra, message):
    # super_batch 8 at f = 0.5 keeps 4 groups per super-batch
    args = ["run", CONFIG, *pool["base"], "run.stages=[select]", "selection.filter_ratio=0.5",
            "selection.chunks=2", "selection.super_batch=8",
            f"selection.reference={pool['reference']}", f"selection.learner={pool['reference']}",
            f"run.dir={tmp_path / 'off'}", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "off/select/ids.json").exists()


def test_reference_that_is_not_a_checkpoint_is_rejected(pool, tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    assert main(_online(pool, tmp_path / "bad", f"selection.reference={junk}")) == 2
    assert "not a synrep checkpoint" in capsys.readouterr().err
    assert main(_online(pool, tmp_path / "bad", "selection.reference=/nonexistent.st")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_online_selection_needs_caption_groups(pool, tmp_path, capsys):
    assert main(_online(pool, tmp_path / "bad", "method.name=simclr")) == 2
    assert "caption-group method" in capsys.readouterr().err


def test_offline_select_stage_reshards_the_kept_groups(pool, tmp_path, capsys):
    run = tmp_path / "off"
    args = ["run", CONFIG, *pool["base"], "run.stages=[select,train]", "train.steps=2",
            "selection.filter_ratio=0.5", "selection.chunks=2", "selection.super_batch=8",
            f"selection.reference={pool['reference']}", f"selection.learner={pool['reference']}",
            f"run.dir={run}"]
    assert main(args) == 0
    record = json.loads((run / "select/ids.json").read_text())
    assert record["pool"] == GROUPS and record["kept"] == GROUPS // 2
    ids = record["ids"]
    assert ids == sorted(set(ids)) and all(0 <= i < GROUPS for i in ids)
    keys = [g.key for g in iter_groups(run / "select/shards")]
    assert keys == [f"{i:06d}" for i in ids]  # exactly the kept groups, in pool order
    # the train stage of a run with a select stage trains on the selected shards
    assert Checkpoint(run / "train/checkpoints/final.safetensors").step == 2
    # complete: a second run skips the stage; a changed selection reruns it, and the trained
    # checkpoint no longer matches the data
    assert main(args) == 0
    assert "[select] complete, skipped" in capsys.readouterr().out
    changed = [*args, "selection.score=easy_reference", "selection.learner="]
    assert main([*changed, "run.stages=[select]"]) == 0
    assert json.loads((run / "select/ids.json").read_text())["config"]["score"] == \
        "easy_reference"
    assert main(changed) == 2
    assert "different 'selection' config" in capsys.readouterr().err


def test_checkpoints_from_before_a_new_config_key_still_resume():
    """A checkpoint written before a config key existed matches a config with its default."""
    from types import SimpleNamespace

    from synrep.config import Config
    from synrep.errors import CheckpointError
    from synrep.train.loop import check_same_run

    cfg = Config()
    stored = json.loads(cfg.to_json())
    del stored["selection"]["score_images"]  # an older synrep
    del stored["train"]["keep_every"]
    check_same_run(SimpleNamespace(config=stored, path="old.safetensors"), cfg)
    cfg.selection.score_images = 2  # not the default: a different run
    with pytest.raises(CheckpointError, match="selection.score_images"):
        check_same_run(SimpleNamespace(config=stored, path="old.safetensors"), cfg)


def test_sampler_precision_follows_the_training_precision(monkeypatch):
    from synrep import device as device_mod
    from synrep.config import load_config
    from synrep.selection import online

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(device_mod, "native_bf16", lambda device, native=native: native)
        for train, sel, want in (("auto", "auto", "bf16" if native else "fp32"),
                                 ("bf16", "auto", "bf16"), ("fp32", "auto", "fp32"),
                                 ("fp16", "auto", "fp32"), ("bf16", "fp32", "fp32"),
                                 ("fp32", "bf16", "bf16")):
            cfg = load_config(CONFIG, [f"train.precision={train}", f"selection.precision={sel}"])
            assert online.sampler_precision(cfg, cpu) == want, (native, train, sel)


def test_reference_embeddings_are_cached_by_reference_data_and_size(pool, tmp_path, monkeypatch):
    import synrep.selection.online as online
    from synrep.config import load_config
    from synrep.errors import CheckpointError

    cfg = load_config(CONFIG, [*pool["base"], f"selection.reference={pool['reference']}",
                               f"run.dir={tmp_path / 'run'}"])
    images = torch.randint(0, 256, (6, 2, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    first, flops = online.reference_embeddings(cfg, images, 28, cpu, 128)
    assert first.shape == (6, 2, 128) and flops > 0
    # the cached embeddings are the frozen reference's, group by group
    model = online.load_frozen(pool["reference"], cfg, "reference", cpu)
    torch.testing.assert_close(first, online.score_groups(model, images, 28))

    def no_model(*args, **kwargs):
        raise AssertionError("the reference was loaded again")

    monkeypatch.setattr(online, "load_frozen", no_model)
    again, again_flops = online.reference_embeddings(cfg, images, 28, cpu, 128)
    assert torch.equal(again, first) and again_flops == flops  # reused, FLOPs as first spent
    with pytest.raises(CheckpointError, match="embeds images in 128 dimensions"):
        online.reference_embeddings(cfg, images, 28, cpu, 64)  # a learner of another size
    monkeypatch.undo()
    for size, imgs in ((14, images), (28, images[:4])):  # another scoring size, other data
        emb, _ = online.reference_embeddings(cfg, imgs, size, cpu, 128)
        assert emb.shape == (len(imgs), 2, 128)
    # a retrained reference (same path, new file) is not served from the cache
    ref = Path(pool["reference"])
    os.utime(ref, ns=(ref.stat().st_atime_ns, ref.stat().st_mtime_ns + 10**9))
    monkeypatch.setattr(online, "load_frozen", no_model)
    with pytest.raises(AssertionError, match="loaded again"):
        online.reference_embeddings(cfg, images[:4], 28, cpu, 128)
