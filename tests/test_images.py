"""The images stage on a tiny random Stable-Diffusion-style pipeline built here and loaded from
disk through the same code as Stable Diffusion: provenance, reproducibility, resume, executors,
bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from synrep.captions.stage import run_captions
from synrep.cli import main
from synrep.config import load_config
from synrep.data.shards import iter_groups, read_shard
from synrep.images.render import Renderer, image_seed
from synrep.images.stage import run_images

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "captions_fashion.yaml")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from synrep.testing import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("caps") / "run"
    run_captions(load_config(CONFIG, [f"run.dir={run}", "captions.num=14",
                                      "captions.shard_size=7"]))
    return run / "captions"


def _over(tiny_sd: Path, captions: Path, run: Path, *extra: str) -> list[str]:
    return [f"run.dir={run}", f"images.pipeline={tiny_sd}", f"images.captions={captions}",
            "images.images_per_caption=2", "images.steps=3", "images.shard_size=3",
            "images.batch_size=4", "images.output_size=28", *extra]


def _tars(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "images").glob("*.tar"))}


def test_stage_end_to_end_with_provenance(tmp_path, tiny_sd, captions):
    cfg = load_config(CONFIG, _over(tiny_sd, captions, tmp_path / "run"))
    stats = run_images(cfg)
    assert stats["samples"] == 14 and stats["images"] == 28
    # 2 caption shards of 7 captions, 3 captions per image shard: 3 + 3 = 6 shards
    assert len(_tars(tmp_path / "run")) == 6
    sizes = json.loads((tmp_path / "run" / "images" / "sizes.json").read_text())
    assert sum(sizes.values()) == 14
    rows = [json.loads(line) for p in sorted(captions.glob("*.jsonl"))
            for line in p.read_text().splitlines()]
    groups = list(iter_groups(tmp_path / "run" / "images", verify=True))
    assert [g.key for g in groups] == [f"{r['caption_id']:09d}" for r in rows]
    for g, row in zip(groups, rows):
        assert g.caption == row["caption"] and len(g.images) == 2
        assert g.images[0].shape == (28, 28, 3) and g.images[0].dtype == np.uint8
        m = g.meta
        assert m["caption_id"] == row["caption_id"] and m["concept"] == row["concept"]
        assert m["image_seeds"] == [image_seed(0, row["caption_id"], k) for k in range(2)]
        gen = m["generator"]
        assert gen["pipeline"] == str(tiny_sd) and gen["steps"] == 3
        assert gen["guidance_scale"] == 2.5 and gen["size"] == 28 and gen["resolution"] == 32
        assert gen["scheduler"] == "DPMSolverMultistepScheduler"
        assert not np.array_equal(g.images[0], g.images[1])  # different seeds, different images
    # complete: a second run skips the stage
    assert main(["run", CONFIG, *_over(tiny_sd, captions, tmp_path / "run"),
                 "run.stages=[images]"]) == 0


def test_image_out_of_a_batch_equals_it_rendered_alone(tiny_sd):
    cfg = load_config(CONFIG, [f"images.pipeline={tiny_sd}", "images.steps=3",
                               "images.batch_size=8"])
    r = Renderer(cfg.images)
    prompts = [f"a dark coat number {i}" for i in range(6)]
    ids, ks = [10, 10, 11, 11, 12, 12], [0, 1, 0, 1, 0, 1]
    batch = r.render(prompts, ids, ks, seed=5)
    alone = r.render(prompts[3:4], ids[3:4], ks[3:4], seed=5)
    assert np.array_equal(batch.images[3], alone.images[0])
    assert batch.seeds[3] == alone.seeds[0] == image_seed(5, 11, 1)
    # and the seed alone reproduces it through the bare pipeline
    out = r.pipe(prompt=prompts[3], num_inference_steps=3, guidance_scale=2.5, height=32,
                 width=32, generator=torch.Generator().manual_seed(alone.seeds[0]),
                 output_type="np").images[0]
    assert np.array_equal((np.clip(out, 0, 1) * 255).round().astype(np.uint8), alone.images[0])


def test_executors_write_identical_bytes(tmp_path, tiny_sd, captions):
    # CPU float results depend on the number of intra-op threads, so every process uses one
    run_images(load_config(CONFIG, _over(tiny_sd, captions, tmp_path / "local",
                                         "run.threads=1")))
    ref = _tars(tmp_path / "local")
    run_images(load_config(CONFIG, _over(tiny_sd, captions, tmp_path / "pool",
                                         "images.executor=pool", "images.devices=[cpu,cpu]",
                                         "run.threads=1")))
    assert _tars(tmp_path / "pool") == ref
    # two ranks (as under torchrun or SLURM), each rendering its share of the shards
    env = {**os.environ, "WORLD_SIZE": "2"}
    args = [sys.executable, "-m", "synrep", "images", CONFIG,
            *_over(tiny_sd, captions, tmp_path / "ranks", "images.executor=ranks",
                   "run.threads=1")]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(2)]
    logs = [p.communicate()[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert _tars(tmp_path / "ranks") == ref
    assert (tmp_path / "ranks" / "images" / "stats.json").exists()
    # ranks that start at different times: rank 0 is done before rank 1 lists what is left, and
    # rank 1 must still render exactly its own share (the shards with an odd index)
    late = _over(tiny_sd, captions, tmp_path / "late", "images.executor=ranks", "run.threads=1")
    for r in range(2):
        proc = subprocess.run([sys.executable, "-m", "synrep", "images", CONFIG, *late],
                              env={**env, "RANK": str(r)}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        names = sorted(_tars(tmp_path / "late"))
        assert names == sorted(n for n in ref if r == 1 or int(n.split(".")[0]) % 2 == 0)
    assert _tars(tmp_path / "late") == ref
    assert (tmp_path / "late" / "images" / "stats.json").exists()


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(tmp_path, tiny_sd, captions):
    # 14 one-caption shards, slow enough (12 steps each) to be caught mid-way by the kill
    slow = ("images.shard_size=1", "images.steps=12")
    over = _over(tiny_sd, captions, tmp_path / "ref", *slow)
    run_images(load_config(CONFIG, over))
    ref = _tars(tmp_path / "ref")
    over = _over(tiny_sd, captions, tmp_path / "run", *slow)
    proc = subprocess.Popen([sys.executable, "-m", "synrep", "images", CONFIG, *over],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "run" / "images"
    deadline = time.time() + 120
    while not (out / "000003_stats.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "stats.json").exists()
    assert len(_tars(tmp_path / "run")) < len(ref)
    assert main(["images", CONFIG, *over]) == 0
    assert _tars(tmp_path / "run") == ref
    assert not list(out.glob("*.tmp"))


# -- bad input: one clear error, nothing that looks complete ----------------------------------


def _fails(capsys, args: list[str], match: str, run: Path) -> None:
    assert main(["images", CONFIG, *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("synrep: error")]
    assert len(err) == 1 and match in err[0], err
    out = run / "images"
    assert not list(out.glob("*.tar")) if out.exists() else True
    assert not (out / "sizes.json").exists() and not (out / "stats.json").exists()


def test_error_missing_pipeline(tmp_path, capsys, captions):
    run = tmp_path / "run"
    _fails(capsys, _over(tmp_path / "no-such-pipeline", captions, run),
           "is not a diffusers pipeline folder", run)


def test_error_malformed_caption_shard(tmp_path, capsys, tiny_sd, captions):
    bad = tmp_path / "caps"
    bad.mkdir()
    for p in captions.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    shard = bad / "captions-00001.jsonl"
    shard.write_text(shard.read_text().replace('"caption_id"', '"caption_ix"', 1))
    run = tmp_path / "run"
    _fails(capsys, _over(tiny_sd, bad, run), "integer 'caption_id'", run)


def test_error_output_not_writable(tmp_path, capsys, tiny_sd, captions):
    (tmp_path / "file").write_text("")  # root ignores permission bits: a path below a file
    run = tmp_path / "file" / "run"
    assert main(["images", CONFIG, *_over(tiny_sd, captions, run)]) == 2
    assert "not writable" in capsys.readouterr().err


def test_error_pipeline_returns_nan(tmp_path, capsys, captions):
    from diffusers import UNet2DConditionModel

    from synrep.testing import build_tiny_sd

    path = build_tiny_sd(tmp_path / "nan-sd")
    unet = UNet2DConditionModel.from_pretrained(path / "unet")
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    unet.save_pretrained(path / "unet")
    run = tmp_path / "run"
    _fails(capsys, _over(path, captions, run), "unusable images (6 NaN, 0 blank)", run)


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_stored_formats(tmp_path, tiny_sd, captions, fmt):
    import io
    import tarfile

    import webdataset as wds
    from PIL import Image

    from synrep.data.shards import flatten_wds

    over = _over(tiny_sd, captions, tmp_path / "png")
    run_images(load_config(CONFIG, over))
    run_images(load_config(CONFIG, [*over[1:], f"run.dir={tmp_path / fmt}",
                                    f"images.format={fmt}"]))
    a = list(iter_groups(tmp_path / "png" / "images", verify=True))
    b = list(iter_groups(tmp_path / fmt / "images", verify=True))
    with tarfile.open(tmp_path / fmt / "images" / "000000.tar") as tar:
        names = tar.getnames()
    assert f"000000000.0.{fmt}" in names and not any(n.endswith(".png") for n in names)
    for ga, gb in zip(a, b):
        for x, y in zip(ga.images, gb.images):
            diff = np.abs(x.astype(int) - y.astype(int))
            assert diff.max() == 0 if fmt == "webp" else diff.mean() < 6  # lossless vs JPEG 95
    # byte-deterministic, and flattened for CLIP-style readers under the format's own key
    run_images(load_config(CONFIG, [*over[1:], f"run.dir={tmp_path / 'again'}",
                                    f"images.format={fmt}"]))
    assert _tars(tmp_path / "again") == _tars(tmp_path / fmt)
    urls = [str(p) for p in sorted((tmp_path / fmt / "images").glob("*.tar"))]
    flat = list(wds.WebDataset(urls, shardshuffle=False).compose(flatten_wds))
    assert len(flat) == 28 and all(fmt in s for s in flat)
    Image.open(io.BytesIO(flat[0][fmt])).load()


def test_shard_reader_sees_the_renders(tmp_path, tiny_sd, captions):
    run_images(load_config(CONFIG, _over(tiny_sd, captions, tmp_path / "run")))
    first = next(read_shard(tmp_path / "run" / "images" / "000000.tar", verify=True))
    assert first.key == "000000000" and len(first.images) == 2


def test_shipped_mini_model_renders_the_fashion_vocabulary(tmp_path):
    from synrep.concepts.fashion import measure_attributes

    cfg = load_config(CONFIG, [])  # images.pipeline defaults to the shipped fashion-mini
    r = Renderer(cfg.images)
    assert r.steps == 10 and r.provenance["size"] == 28
    prompts = ["a dark coat", "a light coat"] * 4
    out = r.render(prompts, [0, 0, 1, 1, 2, 2, 3, 3], [0] * 8, seed=0)
    assert out.images.shape == (8, 28, 28) and out.images.dtype == np.uint8
    tone = measure_attributes(torch.from_numpy(out.images))[:, 0].view(4, 2)
    assert (tone[:, 0] < tone[:, 1]).all()  # same seeds: "light" is lighter than "dark"
    again = r.render(prompts[:2], [0, 0], [0, 0], seed=0)
    assert np.array_equal(again.images, out.images[:2])


def test_synthetic_fashion_run_end_to_end(tmp_path):
    args = ["run", str(ROOT / "configs" / "synth_fashion.yaml"), f"run.dir={tmp_path / 'run'}",
            "captions.num=12", "captions.shard_size=12", "images.shard_size=6"]
    assert main(args) == 0
    groups = list(iter_groups(tmp_path / "run" / "images", verify=True))
    assert len(groups) == 12 and all(len(g.images) == 4 for g in groups)
    assert all(g.images[0].shape == (28, 28) for g in groups)
    assert main(args) == 0  # complete: both stages skipped


def test_ray_executor_writes_the_same_bytes(tmp_path, tiny_sd, captions):
    pytest.importorskip("ray", reason="the ray executor is an optional extra: synrep[ray]")
    run_images(load_config(CONFIG, _over(tiny_sd, captions, tmp_path / "local",
                                         "run.threads=1")))
    run_images(load_config(CONFIG, _over(tiny_sd, captions, tmp_path / "ray",
                                         "images.executor=ray", "images.devices=[cpu]",
                                         "run.threads=1")))
    assert _tars(tmp_path / "ray") == _tars(tmp_path / "local")


def test_changed_config_on_the_same_run_is_refused(tmp_path, capsys, tiny_sd, captions):
    over = _over(tiny_sd, captions, tmp_path / "run")
    assert main(["images", CONFIG, *over]) == 0
    assert main(["images", CONFIG, *over, "images.guidance_scale=3.0"]) == 2
    assert "changed: images.guidance_scale" in capsys.readouterr().err
    assert main(["images", CONFIG, *over, "images.executor=pool"]) == 0  # same bytes: allowed
