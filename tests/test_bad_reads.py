"""Every bad input is one SynrepError line (exit 2 through the CLI), with no traceback, and leaves
every existing output as it was: malformed checkpoint metadata, a directory where a file is
expected, malformed shard markers and sample metadata, decompression bombs, a full disk, NaN in a
JSON output. Temporary names are unique per process, and only a dead writer's are removed."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import synrep.checkpoint as checkpoint_mod
import synrep.cli as cli_mod
import synrep.data.shards as shards_mod
import synrep.utils as utils_mod
from synrep.checkpoint import Checkpoint, save_checkpoint
from synrep.cli import main
from synrep.config import Config, save_config
from synrep.data.shards import (
    CaptionGroup,
    complete_shards,
    load_groups,
    marker_path,
    read_shard,
    write_shard,
    write_sizes,
)
from synrep.errors import CheckpointError, DataError, SynrepError
from synrep.eval.features import save_features
from synrep.utils import remove_stale_temps, temp_owner, temp_path, write_json_atomic


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _groups(n: int = 2, start: int = 0) -> list[CaptionGroup]:
    rng = np.random.default_rng(start)
    return [CaptionGroup(f"{i:06d}", f"caption {i}", {"id": i},
                         [rng.integers(0, 255, (8, 8), dtype=np.uint8) for _ in range(2)])
            for i in range(start, start + n)]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("synrep: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _fails_cli(argv: list[str], capsys, root: Path, *expect: str) -> str:
    before = _hashes(root)
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    for e in expect:
        assert e in line, line
    assert _hashes(root) == before
    return line


# -- checkpoints ------------------------------------------------------------------------------


def _checkpoint(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.zeros(2)},
                           json.loads(Config().to_json()), step=3)


def _with_meta(path: Path, meta) -> Path:
    tensors = {"model/w": torch.zeros(2)}
    save_file(tensors, str(path), metadata={"synrep": json.dumps(meta)})
    return path


GOOD = {"format": checkpoint_mod.FORMAT, "step": 1, "config": {}, "extra": {}}


@pytest.mark.parametrize("meta, expect", [
    ({k: v for k, v in GOOD.items() if k != "step"}, "no 'step'"),
    ({**GOOD, "step": "abc"}, "'step' is 'abc'"),
    ({**GOOD, "step": 1.5}, "'step' is 1.5"),
    ([GOOD], "a JSON list, expected an object"),
    ({**GOOD, "config": "model: vit"}, "'config' is a str"),
    ({**GOOD, "extra": [1]}, "'extra' is a list"),
])
def test_malformed_checkpoint_metadata(tmp_path, capsys, meta, expect):
    path = _with_meta(tmp_path / "bad.safetensors", meta)
    with pytest.raises(CheckpointError, match="malformed synrep metadata") as e:
        Checkpoint(path)
    assert str(path) in str(e.value) and expect in str(e.value) and "\n" not in str(e.value)
    _fails_cli(["embed", "--checkpoint", str(path), "--out", str(tmp_path / "f.npz")], capsys,
               tmp_path, str(path), expect)


def test_checkpoint_path_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        Checkpoint(tmp_path / "ck")
    line = _fails_cli(["embed", "--checkpoint", str(tmp_path / "ck"), "--out",
                       str(tmp_path / "f.npz")], capsys, tmp_path, "is a directory")
    assert "does not exist" not in line


def test_a_good_checkpoint_still_reads(tmp_path):
    ck = Checkpoint(_checkpoint(tmp_path))
    assert ck.step == 3 and isinstance(ck.config, dict) and ck.extra == {}
    assert not list(tmp_path.glob("*.tmp"))


def test_embed_out_directory_fails_before_any_feature(tmp_path, capsys, monkeypatch):
    ck = _checkpoint(tmp_path)
    (tmp_path / "out").mkdir()
    def never(*a, **k):
        raise AssertionError("the encoder was loaded before --out was checked")

    monkeypatch.setattr(cli_mod, "load_encoder", never)
    monkeypatch.setattr(cli_mod, "embed_split", never)
    _fails_cli(["embed", "--checkpoint", str(ck), "--out", str(tmp_path / "out")], capsys,
               tmp_path, "--out", "is a directory")
    with pytest.raises(DataError, match="is a directory"):
        save_features(tmp_path / "out", torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


# -- shards -----------------------------------------------------------------------------------


def test_shard_marker_that_is_a_json_list(tmp_path):
    shard = tmp_path / "000000.tar"
    write_shard(shard, _groups())
    marker_path(shard).write_text(json.dumps([{"samples": 2}]))
    before = _hashes(tmp_path)
    for read in (lambda: list(read_shard(shard)), lambda: write_sizes(tmp_path),
                 lambda: load_groups(tmp_path)):
        with pytest.raises(DataError, match="is a JSON list, not an object") as e:
            read()
        assert str(marker_path(shard)) in str(e.value) and "\n" not in str(e.value)
    assert _hashes(tmp_path) == before


@pytest.mark.parametrize("field, value", [("samples", "2"), ("bytes", None), ("images", -1)])
def test_shard_marker_with_a_bad_count(tmp_path, field, value):
    shard = tmp_path / "000000.tar"
    stats = write_shard(shard, _groups())
    marker_path(shard).write_text(json.dumps({**stats, field: value}))
    with pytest.raises(DataError, match=f"has {field} = "):
        list(read_shard(shard))


def test_empty_shard_with_a_valid_marker(tmp_path):
    stats = write_shard(tmp_path / "000000.tar", [])
    assert stats["samples"] == 0 and complete_shards(tmp_path) == [tmp_path / "000000.tar"]
    assert list(read_shard(tmp_path / "000000.tar")) == []  # a valid, empty shard
    before = _hashes(tmp_path)
    with pytest.raises(DataError, match="hold no caption groups") as e:
        load_groups(tmp_path)
    assert str(tmp_path) in str(e.value)
    assert _hashes(tmp_path) == before


def test_sample_json_that_is_a_list(tmp_path):
    shard = tmp_path / "000000.tar"
    groups = _groups()
    groups[1].meta = [1, 2]  # type: ignore[assignment]
    write_shard(shard, groups)
    before = _hashes(tmp_path)
    with pytest.raises(DataError, match=r"000001\.json is a JSON list, not an object"):
        list(read_shard(shard))
    assert _hashes(tmp_path) == before


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("side", [30000, 9000])  # PIL's bomb error; above synrep's own bound
def test_png_declaring_huge_dimensions(tmp_path, side):
    shard = tmp_path / "000000.tar"
    _tar(shard, {"000000.txt": b"a bomb", "000000.json": b"{}",
                 "000000.0.png": _png_header_only(side, side)})
    before = _hashes(tmp_path)
    with pytest.raises(DataError) as e:
        list(read_shard(shard))
    msg = str(e.value)
    assert "000000.0.png" in msg and str(shard) in msg and "pixels" in msg and "\n" not in msg
    assert _hashes(tmp_path) == before


# -- a full disk ------------------------------------------------------------------------------


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_writing_a_shard(tmp_path, monkeypatch):
    write_shard(tmp_path / "000000.tar", _groups())
    before = _hashes(tmp_path)
    real = shards_mod._HashingWriter.write

    def write(self, data):
        if self.size > 2048:
            _enospc()
        return real(self, data)

    monkeypatch.setattr(shards_mod._HashingWriter, "write", write)
    with pytest.raises(DataError) as e:
        write_shard(tmp_path / "000001.tar", _groups(40, start=10))
    assert str(e.value) == (f"cannot write {str(tmp_path / '000001.tar')!r}: no space left on "
                            "device; free some space and run the same command again (it resumes)")
    assert _hashes(tmp_path) == before  # no half-written temp file, nothing else touched
    monkeypatch.setattr(shards_mod._HashingWriter, "write", real)
    write_shard(tmp_path / "000001.tar", _groups(40, start=10))  # space freed: it resumes
    assert len(list(read_shard(tmp_path / "000001.tar"))) == 40


def test_full_disk_while_writing_json_and_config(tmp_path, monkeypatch):
    path = tmp_path / "stats.json"
    write_json_atomic(path, {"a": 1})
    save_config(Config(), tmp_path / "config.yaml")
    before = _hashes(tmp_path)
    monkeypatch.setattr(utils_mod.os, "fsync", _enospc)
    for write, target in ((lambda: write_json_atomic(path, {"a": 2}), path),
                          (lambda: save_config(Config(), tmp_path / "config.yaml"),
                           tmp_path / "config.yaml"),
                          (lambda: write_sizes(tmp_path), tmp_path / "sizes.json")):
        with pytest.raises(DataError, match="no space left on device") as e:
            write()
        assert str(target) in str(e.value)
        assert _hashes(tmp_path) == before


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                 "message: \"No space left on device\" })"),  # as safetensors reports it
])
def test_full_disk_while_writing_a_checkpoint(tmp_path, monkeypatch, error):
    path = _checkpoint(tmp_path)
    before = _hashes(tmp_path)

    def save_file_part(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise error

    monkeypatch.setattr(checkpoint_mod, "save_file", save_file_part)
    with pytest.raises(DataError, match="no space left on device") as e:
        save_checkpoint(path, {"w": torch.ones(2)}, {}, step=4)
    assert str(path) in str(e.value)
    assert _hashes(tmp_path) == before
    assert Checkpoint(path).step == 3


def test_full_disk_while_saving_features(tmp_path, monkeypatch):
    monkeypatch.setattr(utils_mod.os, "fsync", _enospc)
    with pytest.raises(DataError, match="no space left on device"):
        save_features(tmp_path / "f.npz", torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert list(tmp_path.iterdir()) == []


# -- NaN never reaches an output --------------------------------------------------------------


def test_nan_and_inf_are_refused_in_json_outputs(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"acc": 0.5})
    save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.zeros(2)}, {}, step=1)
    before = _hashes(tmp_path)
    with pytest.raises(SynrepError, match=r"value at 'linear.acc' is nan") as e:
        write_json_atomic(path, {"linear": {"acc": float("nan")}})
    assert str(path) in str(e.value)
    with pytest.raises(SynrepError, match=r"value at 'extra.loss' is inf"):
        save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.ones(2)}, {}, step=2,
                        extra={"loss": float("inf")})
    with pytest.raises(SynrepError, match="is nan"):
        write_shard(tmp_path / "000000.tar", [CaptionGroup(
            "000000", "c", {"score": float("nan")}, [np.zeros((8, 8), np.uint8)])])
    assert _hashes(tmp_path) == before


# -- temporary names --------------------------------------------------------------------------


def test_temporary_names_are_unique_per_process_and_call(tmp_path):
    a, b = temp_path(tmp_path / "x.json"), temp_path(tmp_path / "x.json")
    assert a != b and a.parent == tmp_path and a.name.startswith("x.json.")
    assert temp_owner(a) == os.getpid() and temp_owner(tmp_path / "x.json.tmp") is None


def test_only_a_dead_writers_temporary_files_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    target = tmp_path / "000001.tar"
    mine = temp_path(target)
    parent = target.with_name(f"{target.name}.{os.getppid()}.0123abcd.tmp")  # a live process
    gone = target.with_name(f"{target.name}.{dead_pid}.89abcdef.tmp")
    other = tmp_path / f"000002.tar.{dead_pid}.89abcdef.tmp"  # another file's
    for p in (mine, parent, gone, other):
        p.write_bytes(b"partial")
    assert remove_stale_temps(target) == [gone]
    assert mine.exists() and parent.exists() and other.exists() and not gone.exists()


def test_an_image_larger_than_its_shard_records_is_refused_before_decoding(tmp_path):
    # The marker records the writer's largest image (28 x 28); a member swapped for a larger
    # image afterwards (with the marker's bytes kept) declares more and is not decoded.
    rng = np.random.default_rng(0)
    path = tmp_path / "000000.tar"
    stats = write_shard(path, [CaptionGroup("000000", "a coat", {}, [
        rng.integers(0, 256, (28, 28), dtype=np.uint8)])])
    assert stats["max_pixels"] == 28 * 28
    big = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(big, format="PNG")
    members = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members[m.name] = tar.extractfile(m).read()
    members["000000.0.png"] = big.getvalue()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(raw.getvalue())
    marker = path.with_name("000000" + "_stats.json")
    info = json.loads(marker.read_text())
    info["bytes"] = len(raw.getvalue())
    marker.write_text(json.dumps(info))
    with pytest.raises(DataError, match="declares 64x64 pixels, more than the 784"):
        list(read_shard(path))
