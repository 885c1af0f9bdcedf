"""Tests for synrep.data: the IDX reader, in-memory datasets and the caption-group shards."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synrep.data import (
    CLASSES,
    DEFAULT_ROOT,
    CaptionGroup,
    complete_shards,
    flatten_wds,
    iter_flat,
    iter_groups,
    load_dataset,
    load_fashion_mnist,
    load_groups,
    marker_path,
    read_idx,
    read_shard,
    resize_center_crop,
    write_shard,
    write_sizes,
)
from synrep.errors import ConfigError, DataError

HAVE_FMNIST = Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST,
    reason=f"Fashion-MNIST not installed at {DEFAULT_ROOT} "
    "(sudo apt-get install -y dataset-fashion-mnist)",
)


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """An independent IDX encoder: header (0, 0, code, ndim), big-endian dims, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


# ----------------------------------------------------------------------------- Fashion-MNIST / IDX


@pytest.fixture(scope="module")
def fmnist_train() -> tuple[np.ndarray, np.ndarray]:
    return load_fashion_mnist("train")


@needs_fmnist
def test_fashion_mnist_train(fmnist_train: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = fmnist_train
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int64
    # Fashion-MNIST is balanced: exactly 6000 training images per class.
    assert np.bincount(labels, minlength=10).tolist() == [6000] * 10
    assert labels[0] == 9 and CLASSES[9] == "Ankle boot"  # the well-known first image
    assert images.max() == 255 and images.min() == 0
    assert images.flags.writeable  # torch.from_numpy must not warn


@needs_fmnist
def test_fashion_mnist_test_split() -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10


@needs_fmnist
def test_load_dataset_fashion_mnist(fmnist_train: tuple[np.ndarray, np.ndarray]) -> None:
    ds = load_dataset("fashion-mnist", "test")
    assert ds.images.shape == (10000, 1, 28, 28) and ds.classes == CLASSES
    sub = ds.subset([3, 1])
    assert (
        torch.equal(sub.images[1], ds.images[1])
        and sub.labels.tolist() == ds.labels[[3, 1]].tolist()
    )
    small = load_dataset("fashion-mnist", "test", image_size=14).subset(slice(0, 4))
    assert small.images.shape == (4, 1, 14, 14)


def test_read_idx_dtypes_and_gzip(tmp_path: Path) -> None:
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    (tmp_path / "a.idx").write_bytes(idx_bytes(a, 0x0C))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(a, 0x0C)))
    for name in ("a.idx", "a.idx.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.int32 and out.dtype.isnative
        np.testing.assert_array_equal(out, a)


def test_read_idx_truncated_and_bad_header(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((5, 28, 28), np.uint8), 0x08)
    cases = {
        "short.idx": good[:-1],  # payload one byte short
        "long.idx": good + b"\0",
        "magic.idx": b"\1" + good[1:],
        "code.idx": good[:2] + b"\x42" + good[3:],
        "header.idx": good[:9],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=name):
            read_idx(tmp_path / name)
    (tmp_path / "cut.idx.gz").write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(DataError, match="cut.idx.gz"):
        read_idx(tmp_path / "cut.idx.gz")


def test_fashion_mnist_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist") as e:
        load_fashion_mnist("train", root=tmp_path / "nope")
    assert "train-images-idx3-ubyte" in str(e.value) and "data.root" in str(e.value)


def test_fashion_mnist_uncompressed_files(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 4], np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images, 0x08))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 0x08))
    x, y = load_fashion_mnist("test", root=tmp_path)
    np.testing.assert_array_equal(x, images)
    assert y.tolist() == [0, 9, 4] and y.dtype == np.int64
    with pytest.raises(ConfigError, match="'val'"):
        load_fashion_mnist("val", root=tmp_path)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- datasets


def test_resize_center_crop() -> None:
    const = torch.full((2, 3, 10, 20), 77, dtype=torch.uint8)
    out = resize_center_crop(const, 5)
    assert out.shape == (2, 3, 5, 5) and bool((out == 77).all())
    # A 4x8 image whose left and right quarters differ: the 4x4 center crop is the middle half.
    x = torch.zeros(1, 1, 4, 8, dtype=torch.uint8)
    x[..., 2:6] = 200
    assert bool((resize_center_crop(x, 4) == 200).all())


def _make_folder(root: Path) -> None:
    colours = {"cat": [(255, 0, 0), (0, 255, 0)], "dog": [(0, 0, 255)]}
    for cls, cs in colours.items():
        (root / "train" / cls).mkdir(parents=True)
        for i, c in enumerate(cs):
            Image.new("RGB", (12 + 4 * i, 12), c).save(root / "train" / cls / f"{i}.png")
    Image.new("L", (10, 16), 128).save(root / "train" / "dog" / "gray.PNG")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")


def test_imagefolder(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    ds = load_dataset("imagefolder", "train", root=str(tmp_path), image_size=8)
    assert ds.classes == ["cat", "dog"] and ds.name == "imagefolder"
    assert ds.images.shape == (4, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 0, 1, 1]
    # Files in sorted order: cat/0, cat/1, dog/0, dog/gray.PNG; constant images stay exact.
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)]
    for img, c in zip(ds.images, expected, strict=True):
        assert bool((img == torch.tensor(c, dtype=torch.uint8)[:, None, None]).all())


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("imagefolder", "train", root=str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder", "train", root=str(tmp_path), image_size=8)
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_dataset("imagefolder", "train", root=str(tmp_path), image_size=8)
    Path(tmp_path / "train" / "empty_class" / "bad.png").write_bytes(b"garbage")
    lazy = load_dataset("imagefolder", "train", root=str(tmp_path), image_size=8)
    with pytest.raises(DataError, match="bad.png"):  # decoded when read
        lazy.images.load()


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError, match="fashion-mnist, glyphs, imagefolder.*torchvision:"):
        load_dataset("cifar", "train")


def test_torchvision_datasets(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="download it first with torchvision"):
        load_dataset("torchvision:CIFAR10", "train", root=str(tmp_path))
    with pytest.raises(ConfigError, match="no dataset class 'Cifar10'"):
        load_dataset("torchvision:Cifar10", "train", root=str(tmp_path))


class _TinyItems(torch.utils.data.Dataset):
    """Stands in for a torchvision class with `split` and PIL items (the generic path)."""

    def __init__(self, root: str, split: str = "train", download: bool = False) -> None:
        assert not download
        self.split = split
        self.classes = ["a", "b"]

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        mode = "L" if i == 2 else "RGB"  # one grayscale image in an RGB set
        v = 40 * (i + 1)
        return Image.new(mode, (8, 6), v if mode == "L" else (v, v, v)), i % 2


class _TinyArrays(torch.utils.data.Dataset):
    """Stands in for CIFAR10: `train`, and the split held as `data` (N, H, W, 3) + `targets`."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        self.data = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
        self.targets = [1, 0] if train else [0, 0]


def test_torchvision_adapters(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "TinyItems", _TinyItems, raising=False)
    monkeypatch.setattr(torchvision.datasets, "TinyArrays", _TinyArrays, raising=False)
    ds = load_dataset("torchvision:TinyItems", "test", root=str(tmp_path), image_size=4)
    assert ds.images.shape == (3, 3, 4, 4) and ds.labels.tolist() == [0, 1, 0]
    assert ds.classes == ["a", "b"] and ds.images[:, :, 0, 0].tolist() == [
        [40] * 3, [80] * 3, [120] * 3
    ]  # fmt: skip
    ds = load_dataset("torchvision:TinyArrays", "train", root=str(tmp_path))
    expected = torch.arange(96, dtype=torch.uint8).reshape(2, 4, 4, 3).permute(0, 3, 1, 2)
    assert torch.equal(ds.images, expected) and ds.labels.tolist() == [1, 0]
    assert ds.classes == ["0", "1"]


# ----------------------------------------------------------------------------- shards


def make_groups(n: int, k: int = 3, rgb: bool = False, start: int = 0) -> list[CaptionGroup]:
    rng = np.random.default_rng(start)
    shape = (6, 5, 3) if rgb else (6, 5)
    return [
        CaptionGroup(
            key=f"{start + i:06d}",
            caption=f"a photo of thing {start + i} — ünïcode",
            meta={"seeds": [10 * i + j for j in range(k)], "cfg": 2.5, "b": None},
            images=[rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(k)],
        )
        for i in range(n)
    ]


def assert_groups_equal(a: list[CaptionGroup], b: list[CaptionGroup]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.key, x.caption, x.meta) == (y.key, y.caption, y.meta)
        assert len(x.images) == len(y.images)
        for u, v in zip(x.images, y.images, strict=True):
            assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v)


@pytest.mark.parametrize("rgb", [False, True])
def test_shard_round_trip(tmp_path: Path, rgb: bool) -> None:
    groups = make_groups(4, rgb=rgb)
    stats = write_shard(tmp_path / "00000.tar", groups)
    data = (tmp_path / "00000.tar").read_bytes()
    assert stats == {
        "shard": "00000.tar",
        "samples": 4,
        "images": 12,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "max_pixels": 30,  # 6 x 5 images
    }
    assert json.loads(marker_path(tmp_path / "00000.tar").read_text()) == stats
    assert_groups_equal(list(read_shard(tmp_path / "00000.tar", verify=True)), groups)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:5]] == [
        "000000.txt", "000000.json", "000000.0.png", "000000.1.png", "000000.2.png"
    ]  # fmt: skip
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o644)
    }


def test_shard_bytes_deterministic(tmp_path: Path) -> None:
    a = write_shard(tmp_path / "a" / "00000.tar", make_groups(3, rgb=True))
    b = write_shard(tmp_path / "b" / "00000.tar", make_groups(3, rgb=True))
    assert a == b
    assert (tmp_path / "a/00000.tar").read_bytes() == (tmp_path / "b/00000.tar").read_bytes()


def test_atomic_completion_and_sizes(tmp_path: Path) -> None:
    write_shard(tmp_path / "00001.tar", make_groups(2, start=10))
    write_shard(tmp_path / "00000.tar", make_groups(3))
    (tmp_path / "00002.tar.tmp").write_bytes(b"partial")  # a killed writer
    write_shard(tmp_path / "00003.tar", make_groups(1, start=20))
    marker_path(tmp_path / "00003.tar").unlink()  # killed between rename and marker
    assert complete_shards(tmp_path) == [tmp_path / "00000.tar", tmp_path / "00001.tar"]
    assert complete_shards(tmp_path / "missing") == []
    sizes = write_sizes(tmp_path)
    assert sizes == {"00000.tar": 3, "00001.tar": 2}
    assert json.loads((tmp_path / "sizes.json").read_text()) == sizes
    # Readers of a directory see only complete shards, in name order.
    assert [g.key for g in iter_groups(tmp_path)] == [
        "000000",
        "000001",
        "000002",
        "000010",
        "000011",
    ]
    # A failing writer leaves neither a tmp file nor a stale marker.
    bad = make_groups(2, start=30)
    bad[1].images[0] = bad[1].images[0].astype(np.float32)
    with pytest.raises(ValueError, match="uint8"):
        write_shard(tmp_path / "00000.tar", bad)
    assert not (tmp_path / "00000.tar.tmp").exists()
    assert tmp_path / "00000.tar" not in complete_shards(tmp_path)


def test_iter_flat_order(tmp_path: Path) -> None:
    groups = make_groups(3, k=4)
    write_shard(tmp_path / "00000.tar", groups)
    flat = list(iter_flat(tmp_path))
    assert [(key, i) for _, _, key, i in flat] == [(g.key, i) for g in groups for i in range(4)]
    for img, caption, key, i in flat:
        g = groups[int(key)]
        assert caption == g.caption and np.array_equal(img, g.images[i])


def test_bad_keys_and_unwritable_dir(tmp_path: Path) -> None:
    for key in ("00.1", "a/b", ""):
        g = make_groups(1)[0]
        g.key = key
        with pytest.raises(ValueError, match="without '.' or '/'"):
            write_shard(tmp_path / "00000.tar", [g])
    with pytest.raises(ValueError, match="twice"):
        write_shard(tmp_path / "00000.tar", make_groups(1) + make_groups(1))
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="file/sub"):  # parent is a file: not creatable/writable
        write_shard(tmp_path / "file" / "sub" / "00000.tar", make_groups(1))


def test_truncated_shard(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    write_shard(shard, make_groups(4))
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[7]
    # Inside a member's data; and at a header start, where tarfile alone would stop quietly.
    for cut in (member.offset_data + 10, member.offset):
        shard.write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"00000\.tar.*delete it.*rerun"):
            list(read_shard(shard))  # the marker's byte count catches it
        marker = marker_path(shard).read_text()
        marker_path(shard).unlink()
        with pytest.raises(DataError, match=r"00000\.tar.*truncated"):
            list(read_shard(shard))  # without a marker the tar structure still does
        marker_path(shard).write_text(marker)
    # Same size, one changed caption byte: a valid tar, only the sha256 check sees it.
    shard.write_bytes(data.replace(b"thing 0", b"thing X", 1))
    assert next(read_shard(shard)).caption.startswith("a photo of thing X")
    with pytest.raises(DataError, match="sha256"):
        list(read_shard(shard, verify=True))


def _raw_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupted_members(tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.new("L", (3, 3)).save(png, format="PNG")
    _raw_tar(tmp_path / "bad_png.tar", {"k.txt": b"c", "k.json": b"{}", "k.0.png": b"\x89PNG junk"})
    _raw_tar(tmp_path / "no_json.tar", {"k.txt": b"c", "k.0.png": png.getvalue()})
    _raw_tar(tmp_path / "gap.tar", {"k.txt": b"c", "k.json": b"{}", "k.1.png": png.getvalue()})
    for name, why in [("bad_png", "not a decodable PNG"), ("no_json", "k.json"), ("gap", "0..k-1")]:
        with pytest.raises(DataError, match=f"{name}.tar.*{why}"):
            list(read_shard(tmp_path / f"{name}.tar"))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(DataError, match="junk.tar"):
        list(read_shard(tmp_path / "junk.tar"))


def test_webdataset_reads_shards(tmp_path: Path) -> None:
    import webdataset as wds

    groups = make_groups(3, k=2, rgb=True)
    write_shard(tmp_path / "00000.tar", groups[:2])
    write_shard(tmp_path / "00001.tar", groups[2:])
    urls = [str(p) for p in complete_shards(tmp_path)]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [g.key for g in groups]
    for s, g in zip(samples, groups, strict=True):
        assert s["txt"].decode() == g.caption and json.loads(s["json"]) == g.meta
        assert set(s) >= {"txt", "json", "0.png", "1.png"}
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["1.png"]))), g.images[1])
    # One (image, caption) per image for CLIP-style pipelines, decoded by webdataset itself.
    pipe = wds.WebDataset(urls, shardshuffle=False).compose(flatten_wds).decode("rgb8")
    flat = list(pipe.to_tuple("png", "txt", "__key__"))
    assert [key for _, _, key in flat] == [f"{g.key}_{i}" for g in groups for i in range(2)]
    assert np.array_equal(flat[5][0], groups[2].images[1]) and flat[5][1] == groups[2].caption


def test_load_groups(tmp_path: Path) -> None:
    groups = make_groups(5, k=2)
    write_shard(tmp_path / "00000.tar", groups[:3])
    write_shard(tmp_path / "00001.tar", groups[3:])
    ga = load_groups(tmp_path)
    assert ga.images.shape == (5, 2, 1, 6, 5) and ga.images.dtype == torch.uint8
    assert ga.keys == [g.key for g in groups] and ga.metas[4] == groups[4].meta
    assert np.array_equal(ga.images[3, 1, 0].numpy(), groups[3].images[1])
    assert len(load_groups(tmp_path, max_groups=4)) == 4
    rgb = tmp_path / "rgb"
    write_shard(rgb / "00000.tar", make_groups(2, k=3, rgb=True))
    assert load_groups(rgb).images.shape == (2, 3, 3, 6, 5)
    with pytest.raises(DataError, match="empty does not exist"):
        load_groups(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty has no complete shards"):
        load_groups(tmp_path / "empty")
