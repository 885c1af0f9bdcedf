"""The one data path: indexed tar shards, streamed batches equal to in-memory ones, loader
workers, ranks, plain WebDataset shards, gradient accumulation and checkpointing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synrep.data.index import build_index, index_path, read_sample, resolve_shards, shard_index
from synrep.data.shards import CaptionGroup, load_groups, write_shard
from synrep.data.sources import ArraySource, FolderStore, Planner, ShardStore, Source
from synrep.errors import DataError
from synrep.train.step import micro_batches, train_step
from tests._dist import run_gloo

ROOT = Path(__file__).resolve().parents[1]


def _groups(n: int, k: int = 3, seed: int = 0, size: int = 12, start: int = 0):
    rng = np.random.default_rng(seed)
    return [CaptionGroup(f"{i:06d}", f"caption {i}", {"label": i % 5, "caption_id": i},
                         [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(k)])
            for i in range(start, start + n)]


def _write(folder: Path, n_shards: int = 3, per: int = 10, k: int = 3, size: int = 12) -> Path:
    for s in range(n_shards):
        write_shard(folder / f"{s:06d}.tar", _groups(per, k, seed=s, size=size, start=s * per))
    return folder


def test_index_written_with_the_shard_equals_one_built_by_scanning(tmp_path):
    write_shard(tmp_path / "000000.tar", _groups(7))
    written = shard_index(tmp_path / "000000.tar")
    assert index_path(tmp_path / "000000.tar").is_file()
    scanned = build_index(tmp_path / "000000.tar")
    for name in ("offset", "size", "label", "caption_id", "images"):
        np.testing.assert_array_equal(getattr(written, name), getattr(scanned, name))
    assert written.sha256 == scanned.sha256
    assert scanned.label.tolist() == [i % 5 for i in range(7)]
    assert scanned.images.tolist() == [3] * 7
    fd = os.open(tmp_path / "000000.tar", os.O_RDONLY)
    try:
        key, members = read_sample(fd, tmp_path / "000000.tar", int(scanned.offset[4]),
                                   int(scanned.size[4]))
    finally:
        os.close(fd)
    assert key == "000004" and members["txt"] == b"caption 4"
    assert sorted(members) == ["0.png", "1.png", "2.png", "json", "txt"]


def test_a_stale_index_is_rebuilt_and_a_read_only_folder_caches_elsewhere(tmp_path, monkeypatch):
    path = tmp_path / "a" / "000000.tar"
    write_shard(path, _groups(5))
    # a different shard of the same name: the old index no longer matches the marker's sha256
    idx_before = shard_index(path).offset.copy()
    write_shard(path, _groups(9, seed=3))
    assert len(shard_index(path, None)) == 9 and len(idx_before) == 5
    # a shard written by another tool in a folder it cannot write beside: the index goes to
    # SYNREP_INDEX_CACHE (the folder is made unwritable by pointing beside-paths under a file)
    import synrep.data.index as index_mod

    plain = tmp_path / "p.tar"
    _plain_shard(plain, 4)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(index_mod, "index_path", lambda s: tmp_path / "afile" / "x.idx.npz")
    monkeypatch.setenv("SYNREP_INDEX_CACHE", str(tmp_path / "cache"))
    assert len(shard_index(plain)) == 4
    cached = list((tmp_path / "cache").glob("*.idx.npz"))
    assert len(cached) == 1
    assert len(shard_index(plain)) == 4  # read back from the cache
    # the shard changes (another size and time): the cached index is not used
    _plain_shard(plain, 6)
    assert len(shard_index(plain)) == 6


def test_truncated_shard_is_one_clear_error(tmp_path):
    path = tmp_path / "000000.tar"
    write_shard(path, _groups(5))
    data = path.read_bytes()
    bad = tmp_path / "bad" / "x.tar"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupted"):
        build_index(bad)
    with pytest.raises(DataError, match="does not exist"):
        resolve_shards(str(tmp_path / "missing.tar"))


def test_resolve_folder_brace_list_and_glob(tmp_path):
    _write(tmp_path, 3, 2)
    names = [p.name for p in resolve_shards(tmp_path)]
    assert names == ["000000.tar", "000001.tar", "000002.tar"]
    assert [p.name for p in resolve_shards(f"{tmp_path}/{{000000..000001}}.tar")] == names[:2]
    assert [p.name for p in resolve_shards([str(tmp_path / "000002.tar")])] == names[2:]
    assert [p.name for p in resolve_shards(f"{tmp_path}/*1.tar")] == ["000001.tar"]


@pytest.mark.parametrize("m", [1, 2, 3])
def test_streamed_batches_equal_in_memory_batches(tmp_path, m):
    _write(tmp_path)
    ga = load_groups(tmp_path)
    labels = torch.tensor([g["label"] for g in ga.metas])
    memory = ArraySource(ga.images, labels, 8, seed=3, images_per_group=m)
    store = ShardStore(resolve_shards(tmp_path), "groups")
    stream = Source(store, Planner(len(store), 8, 3, k=store.k, m=m))
    for step in (0, 1, 2, 3, 7, 11):  # several epochs (30 groups, 3 steps an epoch)
        a, b = memory.batch(step), stream.batch(step)
        assert torch.equal(a["images"], b["images"]) and a["images"].shape == (8, m, 1, 12, 12)
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["pick"], b["pick"])


def test_each_image_and_subsets_stream_like_memory(tmp_path):
    _write(tmp_path)
    ga = load_groups(tmp_path)
    keep = np.array([i for i in range(30) if i % 5 in (1, 3)])
    flat = ga.images[torch.from_numpy(keep)].flatten(0, 1)
    memory = ArraySource(flat, None, 6, seed=1)
    store = ShardStore(resolve_shards(tmp_path), "groups")
    store.keep(keep)
    store.each_image()
    stream = Source(store, Planner(len(store), 6, 1))
    assert len(store) == len(flat) == 36
    for step in range(8):
        assert torch.equal(memory.batch(step)["images"], stream.batch(step)["images"])
    assert set(store.labels.tolist()) == {1, 3}


def test_loader_workers_give_the_same_batches_in_order(tmp_path):
    _write(tmp_path)
    store = ShardStore(resolve_shards(tmp_path), "groups")
    src = Source(store, Planner(len(store), 4, 0, k=3, m=2))
    alone = [b["images"] for b in src.batches(2, 12, workers=0)]
    pooled = [b["images"] for b in src.batches(2, 12, workers=2)]
    assert len(alone) == len(pooled) == 10
    assert all(torch.equal(a, b) for a, b in zip(alone, pooled))
    later = [b["index"] for b in src.batches(5, 8, workers=1)]
    assert all(torch.equal(a, src.batch(s)["index"]) for a, s in zip(later, (5, 6, 7)))


def test_ranks_see_disjoint_samples_covering_each_epoch_once():
    n, bs = 50, 10
    for world in (1, 2, 5):
        seen = []
        for step in range(n // bs):  # one epoch
            parts = [Planner(n, bs, 7, r, world).plan(step)["index"] for r in range(world)]
            glob = torch.cat(parts)
            assert torch.equal(glob, Planner(n, bs, 7).plan(step)["index"])  # one global batch
            seen += glob.tolist()
        assert sorted(seen) == list(range(n))


def _gather_epoch(rank: int, world: int, folder: str) -> None:
    import torch.distributed as tdist

    store = ShardStore(resolve_shards(folder), "groups")
    src = Source(store, Planner(len(store), 10, 0, rank, world, k=3, m=1))
    mine = torch.cat([src.batch(s)["index"] for s in range(3)])
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    tdist.all_gather(everyone, mine)
    allx = torch.cat(everyone).tolist()
    assert len(set(allx)) == len(allx) == 30, allx  # disjoint, and the whole epoch once


def test_two_gloo_ranks_read_disjoint_samples_covering_the_epoch(tmp_path):
    _write(tmp_path)
    run_gloo(_gather_epoch, 2, str(tmp_path))


def _plain_shard(path: Path, n: int, size=(40, 30), seed: int = 0, fmt: str = "jpg") -> None:
    """A plain WebDataset shard as img2dataset writes it, through webdataset's own writer."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="JPEG" if fmt == "jpg" else fmt.upper())
            sink.write({"__key__": f"s{seed}_{i:05d}", fmt: buf.getvalue(),
                        "txt": f"a photo {i}", "cls": str(i % 3),
                        "json": json.dumps({"width": size[0]})})


def test_plain_webdataset_shards_stream_with_labels_texts_and_crops(tmp_path):
    _plain_shard(tmp_path / "a.tar", 6, seed=0)
    _plain_shard(tmp_path / "b.tar", 6, seed=1, fmt="png")
    store = ShardStore(resolve_shards(tmp_path), "plain", image_size=16, channels=3)
    assert len(store) == 12 and store.labels.tolist() == [i % 3 for i in range(6)] * 2
    store.with_texts(None)
    src = Source(store, Planner(12, 4, 0))
    b = src.batch(0)
    assert b["images"].shape == (4, 3, 16, 16) and b["images"].dtype == torch.uint8
    assert all(t.startswith("a photo") for t in b["texts"])
    rnd = ShardStore(resolve_shards(tmp_path), "plain", image_size=16, channels=1, crop="random",
                     scale=(0.2, 0.5))
    x0 = Source(rnd, Planner(12, 4, 0)).batch(0)["images"]
    assert x0.shape == (4, 1, 16, 16)
    assert torch.equal(x0, Source(rnd, Planner(12, 4, 0)).batch(0)["images"])  # seeded
    # the same sample drawn at another step gets another crop
    idx0 = Planner(12, 4, 0).plan(0)["index"].tolist()
    other = next(s for s in range(3, 30) if Planner(12, 4, 0).plan(s)["index"].tolist()[0]
                 == idx0[0])
    assert not torch.equal(x0[0], Source(rnd, Planner(12, 4, 0)).batch(other)["images"][0])


def test_image_folder_streams(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / c / f"{i}.png")
    store = FolderStore(tmp_path, 8)
    b = Source(store, Planner(6, 6, 0)).batch(0)
    assert b["images"].shape == (6, 3, 8, 8) and sorted(b["labels"].tolist()) == [0] * 3 + [1] * 3


def test_simclr_trains_on_plain_webdataset_shards_of_fashion_mnist(tmp_path):
    """The issue's line: ``synrep train configs/fashion_simclr.yaml data.source=webdataset
    data.shards=DIR`` on plain shards of real Fashion-MNIST images, two loader workers."""
    from synrep.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist

    if not Path(DEFAULT_ROOT).is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    import webdataset as wds

    images, labels = load_fashion_mnist("train", None)
    (tmp_path / "wds").mkdir()
    for s in range(2):
        with wds.TarWriter(str(tmp_path / "wds" / f"fmnist-{s:06d}.tar")) as sink:
            for i in range(s * 100, (s + 1) * 100):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(),
                            "cls": str(int(labels[i]))})
    cmd = [sys.executable, "-m", "synrep", "train", "configs/fashion_simclr.yaml",
           "data.source=webdataset", f"data.shards={tmp_path / 'wds'}", "data.workers=2",
           "train.steps=3", "train.batch_size=32", "train.accum_steps=2",
           f"run.dir={tmp_path / 'run'}", "model.backbone=vit_tiny_p7_28"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run/train/checkpoints/final.safetensors").is_file()


def test_micro_batches_split_tensors_and_lists_and_share_the_rest():
    batch = {"images": torch.arange(12).view(6, 2), "texts": list("abcdef"), "step": 4,
             "pick": torch.zeros(6, 1)}
    parts = micro_batches(batch, 3)
    assert [p["texts"] for p in parts] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert torch.equal(torch.cat([p["images"] for p in parts]), batch["images"])
    assert all(p["step"] == 4 for p in parts)
    with pytest.raises(ValueError, match="does not split"):
        micro_batches(batch, 4)


class _Toy(torch.nn.Module):
    """A method-like module: per-sample regression or an in-batch contrastive loss."""

    def __init__(self, contrastive: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.contrastive = contrastive

    def forward(self, batch, g):
        z = self.lin(batch["images"])
        if not self.contrastive:
            return {"loss": (z - batch["labels"]).pow(2).mean()}
        z = torch.nn.functional.normalize(z, dim=1)
        logits = z @ z.T / 0.5
        target = torch.arange(len(z)) ^ 1  # pairs (0, 1), (2, 3), ... are positives
        logits = logits - 1e9 * torch.eye(len(z))
        return {"loss": torch.nn.functional.cross_entropy(logits, target)}

    def after_step(self):
        pass


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("contrastive", [False, True])
def test_accumulated_gradient_is_the_mean_of_micro_batch_gradients(contrastive, n):
    """Per-sample losses: accumulation equals the large batch exactly. Contrastive losses: the
    gradient is the mean of the micro-batches' own gradients (negatives within a micro-batch),
    checked against a hand-made reference, and it differs from the large batch's."""
    torch.manual_seed(1)
    batch = {"images": torch.randn(8, 4), "labels": torch.randn(8, 3)}

    def grad_of(n: int) -> torch.Tensor:
        m = _Toy(contrastive)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        train_step(m, m, opt, batch, torch.Generator(), accum_steps=n)
        return m.lin.weight.grad.clone()

    ref = _Toy(contrastive)
    for part in micro_batches(batch, n):
        (ref(part, None)["loss"] / n).backward()
    torch.testing.assert_close(grad_of(n), ref.lin.weight.grad, rtol=1e-6, atol=1e-7)
    if contrastive:
        assert not torch.allclose(grad_of(n), grad_of(1), atol=1e-4)
    else:  # n x B/n accumulated equals one step at B
        torch.testing.assert_close(grad_of(n), grad_of(1), rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    from synrep.config import ModelConfig
    from synrep.models import build_encoder

    x = torch.rand(4, 1, 28, 28)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        enc = build_encoder(ModelConfig())
        if ckpt:
            enc.set_grad_checkpointing(True)
        mask = torch.zeros(4, 4, 4, dtype=torch.bool)
        mask[:, :2] = True
        (enc(x).sum() + enc.tokens(x, mask, torch.zeros(enc.embed_dim)).sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in enc.parameters()
                                if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def _train(tmp_path: Path, name: str, common: list[str], *extra: str,
           kill: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill is not None:
        env["SYNREP_DEBUG_KILL_AT_STEP"] = str(kill)
    return subprocess.run([sys.executable, "-m", "synrep", "train", *common,
                           f"run.dir={tmp_path / name}", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _same_weights(a: Path, b: Path) -> None:
    from synrep.checkpoint import Checkpoint

    wa = Checkpoint(a / "train/checkpoints/final.safetensors").model_state
    wb = Checkpoint(b / "train/checkpoints/final.safetensors").model_state
    assert wa.keys() == wb.keys()
    for k, v in wa.items():
        assert torch.equal(v, wb[k]), k


def test_streamed_training_equals_memory_and_resumes_exactly_mid_epoch(tmp_path):
    """Caption-group shards: `data.loader=stream` with 2 loader workers, SIGKILLed after step 3
    (mid-epoch) and resumed with 2 and with 4 workers, ends with the weights of an uninterrupted
    `data.loader=memory` run (fp32, one thread)."""
    from synrep.checkpoint import Checkpoint

    _write(tmp_path / "shards", 2, 16, k=3, size=28)  # 32 groups: 4 steps an epoch at batch 8
    common = ["configs/quickstart.yaml", f"data.shards={tmp_path / 'shards'}", "train.steps=6",
              "train.batch_size=8", "method.synclr.images_per_caption=2", "train.precision=fp32",
              "run.threads=1", "method.synclr.proj_hidden_dim=64", "train.ckpt_every=1"]
    assert _train(tmp_path, "memory", common, "data.loader=memory").returncode == 0
    killed = _train(tmp_path, "stream", common, "data.loader=stream", "data.workers=2", kill=3)
    assert killed.returncode != 0  # SIGKILL after step 3's checkpoint
    assert Checkpoint(tmp_path / "stream/train/checkpoints/last.safetensors").step == 3
    _resume_with_2_and_4_workers(tmp_path, "stream", common, "data.loader=stream")
    for workers in (2, 4):
        _same_weights(tmp_path / "memory", tmp_path / f"stream_{workers}")


def _resume_with_2_and_4_workers(tmp_path: Path, killed: str, common: list[str],
                                 *extra: str) -> None:
    import shutil

    for workers in (2, 4):
        shutil.copytree(tmp_path / killed, tmp_path / f"{killed}_{workers}", symlinks=True)
        (tmp_path / f"{killed}_{workers}" / ".lock").unlink(missing_ok=True)
        done = _train(tmp_path, f"{killed}_{workers}", common, *extra, f"data.workers={workers}")
        assert done.returncode == 0, done.stderr[-2000:]


def test_plain_shards_resume_exactly_with_another_number_of_workers(tmp_path):
    """Plain WebDataset shards, random resized crops in the workers: killed mid-epoch with 2
    workers and resumed with 2 and with 4, the weights equal an uninterrupted run without
    workers."""
    (tmp_path / "wds").mkdir()
    for s in range(2):
        _plain_shard(tmp_path / "wds" / f"{s}.tar", 24, size=(36, 32), seed=s)
    common = ["configs/fashion_simclr.yaml", "data.source=webdataset",
              f"data.shards={tmp_path / 'wds'}", "data.image_size=28", "data.crop=random",
              "train.steps=6", "train.batch_size=8", "train.precision=fp32", "run.threads=1",
              "train.ckpt_every=1", "method.simclr.proj_hidden_dim=64"]
    assert _train(tmp_path, "whole", common).returncode == 0
    killed = _train(tmp_path, "resumed", common, "data.workers=2", kill=4)
    assert killed.returncode != 0
    _resume_with_2_and_4_workers(tmp_path, "resumed", common)
    for workers in (2, 4):
        _same_weights(tmp_path / "whole", tmp_path / f"resumed_{workers}")


def _one_line_exit_2(proc: subprocess.CompletedProcess, *expected: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("synrep: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_bad_streamed_data_is_one_line_and_exit_2(tmp_path):
    wds_dir = tmp_path / "wds"
    wds_dir.mkdir()
    _plain_shard(wds_dir / "a.tar", 16, size=(28, 28))
    common = ["configs/fashion_simclr.yaml", "data.source=webdataset", "train.steps=3",
              "train.batch_size=8", "data.workers=2", "run.threads=1"]
    # a listed shard that is missing
    _one_line_exit_2(_train(tmp_path, "r1", common, f"data.shards=[{wds_dir / 'a.tar'},"
                                                    f"{wds_dir / 'gone.tar'}]"), "gone.tar",
                     "does not exist")
    # plain shards with no image in a sample
    import webdataset as wds

    (tmp_path / "noimg").mkdir()
    with wds.TarWriter(str(tmp_path / "noimg" / "x.tar")) as sink:
        for i in range(10):
            sink.write({"__key__": f"{i:04d}", "txt": "no picture"})
    _one_line_exit_2(_train(tmp_path, "r2", common, f"data.shards={tmp_path / 'noimg'}"),
                     "has no image member")
    # an undecodable image met mid-epoch, in a loader worker
    bad = tmp_path / "bad"
    bad.mkdir()
    with wds.TarWriter(str(bad / "x.tar")) as sink:
        for i in range(16):
            buf = io.BytesIO()
            Image.fromarray(np.full((28, 28, 3), i, np.uint8)).save(buf, "PNG")
            sink.write({"__key__": f"{i:04d}", "png": buf.getvalue() if i != 5 else b"not a png"})
    _one_line_exit_2(_train(tmp_path, "r3", common, f"data.shards={bad}", "train.steps=8"),
                     "0005.png", "not a decodable")
    # a caption-group shard changed after it was indexed (same size, bytes flipped)
    _write(tmp_path / "groups", 1, 16, size=28)
    tar = tmp_path / "groups" / "000000.tar"
    data = bytearray(tar.read_bytes())
    data[3000] ^= 0xFF
    tar.write_bytes(bytes(data))
    _one_line_exit_2(_train(tmp_path, "r4", ["configs/quickstart.yaml", f"data.shards={tar.parent}",
                                             "data.loader=stream", "train.steps=2",
                                             "train.batch_size=8"]),
                     "sha256 does not match its marker")


def test_a_corrupt_index_is_rebuilt(tmp_path):
    write_shard(tmp_path / "000000.tar", _groups(6))
    good = shard_index(tmp_path / "000000.tar")
    index_path(tmp_path / "000000.tar").write_bytes(b"garbage")
    again = shard_index(tmp_path / "000000.tar")
    np.testing.assert_array_equal(good.offset, again.offset)
    assert index_path(tmp_path / "000000.tar").read_bytes()[:2] == b"PK"  # rewritten


def _labelled_split(folder: Path, n: int, seed: int) -> None:
    import webdataset as wds

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "000000.tar")) as sink:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(buf, "PNG")
            sink.write({"__key__": f"{i:05d}", "png": buf.getvalue(), "cls": str(i % 4)})


def test_evaluation_streams_webdataset_splits_with_the_same_features(tmp_path):
    """`eval.dataset=webdataset`: features computed batch by batch from the shards (2 loader
    workers) equal those of the same images decoded into memory."""
    from synrep.config import EvalConfig, ModelConfig
    from synrep.data.datasets import load_dataset
    from synrep.eval.features import extract_features
    from synrep.eval.stage import embed_split
    from synrep.models import build_encoder

    _labelled_split(tmp_path / "train", 20, 0)
    _labelled_split(tmp_path / "test", 12, 1)
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\n")
    ds = load_dataset("webdataset", "test", root=str(tmp_path), image_size=28)
    assert ds.classes == ["a", "b", "c", "d"] and ds.images.shape == (12, 3, 28, 28)
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(in_chans=3)).eval()
    ecfg = EvalConfig(dataset="webdataset", root=str(tmp_path), image_size=28, batch_size=5,
                      workers=2)
    feats, labels = embed_split(enc, ecfg, "test", 28)
    ref = extract_features(lambda x: enc.probe_features(x, ecfg.pool, ecfg.n_last_blocks),
                           ds.images.load(), batch_size=5)
    torch.testing.assert_close(feats, ref, rtol=0, atol=0)
    assert labels.tolist() == [i % 4 for i in range(12)]
    # a class subset stays lazy and streams the same way
    sub = ds.select_classes([1, 3])
    assert len(sub) == 6 and sub.images.load().shape == (6, 3, 28, 28)


def test_mixture_counts_round_by_largest_remainder():
    from synrep.data.sources import mixture_counts
    from synrep.errors import ConfigError

    assert mixture_counts([3, 1], 8) == [6, 2]
    assert mixture_counts([1, 1, 1], 10) == [4, 3, 3]  # ties go to the earlier source
    assert mixture_counts([0.5, 0.5], 10, world=2) == [6, 4]  # multiples of the ranks
    assert mixture_counts([0.9, 0.1], 100) == [90, 10]
    with pytest.raises(ConfigError, match="no sample"):
        mixture_counts([100, 1], 8)


def test_mixture_batches_hold_each_sources_share_and_origin(tmp_path):
    from synrep.data.sources import MixtureSource

    _write(tmp_path / "a", 1, 20)
    _plain_shard(tmp_path / "b.tar", 12, size=(12, 12))
    a = ShardStore(resolve_shards(tmp_path / "a"), "groups", channels=3)
    a.each_image()
    b = ShardStore([tmp_path / "b.tar"], "plain", channels=3)
    src_a, src_b = Source(a, Planner(len(a), 6, 11)), Source(b, Planner(len(b), 2, 12))
    mix = MixtureSource([src_a, src_b], ["a", "b"])
    for step in (0, 5, 40):  # past several epochs of the smaller source
        batch = mix.batch(step)
        assert batch["origin"].tolist() == [0] * 6 + [1] * 2
        assert torch.equal(batch["images"][:6], src_a.batch(step)["images"])
        assert torch.equal(batch["images"][6:], src_b.batch(step)["images"])
        assert batch["images"].shape == (8, 3, 12, 12)


def test_simclr_trains_on_a_mixture_of_real_and_plain_shards(tmp_path):
    from synrep.checkpoint import Checkpoint
    from synrep.data.fashion_mnist import DEFAULT_ROOT

    if not Path(DEFAULT_ROOT).is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    _plain_shard(tmp_path / "synthetic.tar", 40, size=(28, 28))
    cmd = [sys.executable, "-m", "synrep", "train", "configs/fashion_simclr.yaml",
           "data.source=mixture",
           f"data.mixture={{'{tmp_path / 'synthetic.tar'}': 0.75, 'dataset:fashion-mnist': 0.25}}",
           "train.steps=2", "train.batch_size=16", f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Checkpoint(tmp_path / "run/train/checkpoints/final.safetensors").step == 2


def test_image_folder_trees_train_streamed_like_in_memory(tmp_path):
    """`data.dataset=imagefolder data.loader=stream`: the same batches as the in-memory load."""
    from synrep.config import load_config
    from synrep.factory import build_source

    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)).save(
                tmp_path / "train" / c / f"{i}.png")
    args = [f"data.root={tmp_path}", "data.dataset=imagefolder", "data.image_size=28",
            "model.in_chans=3", "train.batch_size=4", "data.classes=[0,2]"]
    streamed = build_source(load_config(ROOT / "configs/fashion_simclr.yaml",
                                        [*args, "data.loader=stream"]), "images")
    memory = build_source(load_config(ROOT / "configs/fashion_simclr.yaml",
                                      [*args, "data.loader=memory"]), "images")
    assert len(streamed) == len(memory) == 10 and not streamed.in_memory and memory.in_memory
    for step in range(5):
        a, b = streamed.batch(step), memory.batch(step)
        assert torch.equal(a["labels"], b["labels"]) and set(a["labels"].tolist()) <= {0, 2}
        assert a["images"].shape == (4, 3, 28, 28) and torch.equal(a["images"], b["images"])
