"""Random access to the samples of tar shards through an index of member offsets.

A sample (one caption group of synrep's shards, or one image of a plain WebDataset shard) is a run
of consecutive tar members sharing a key. Its index entry is where that run starts in the file and
how many bytes it spans, so reading sample ``i`` is one ``pread`` of a few kilobytes and a parse of
its tar headers: no scan, no state, any order. The index also keeps what samplers need before any
image is decoded: the label (``json`` ``label`` or a ``cls`` member; -1 when none), the caption id
of a group (``json`` ``caption_id``; -1 when none) and the number of images in the sample.

Each shard's index is a ``<name>.idx.npz`` beside it (plain arrays, read with
``allow_pickle=False``): written by :func:`synrep.data.shards.write_shard`, or built on the first
read and cached; when the shard's folder is read-only, the cache goes to
``$SYNREP_INDEX_CACHE`` (default ``~/.cache/synrep/shard-index``). An index records the shard's
size, modification time and sha256: it is used only while the shard's size and time match and,
for shards with a completion marker, while the marker's sha256 is the one indexed; otherwise it is
rebuilt, which re-hashes the shard (a shard whose sha256 no longer matches its marker is an
error). An unreadable or corrupt index is rebuilt the same way.

Memory: about 34 bytes a sample (five arrays), whatever the size of the images.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from braceexpand import braceexpand

from synrep.errors import DataError
from synrep.utils import atomic_output

INDEX_SUFFIX = ".idx.npz"
INDEX_VERSION = 1
_BLOCK = tarfile.BLOCKSIZE
#: Image member extensions of a sample, in the order a plain sample's image is looked for.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def split_member(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member name, as webdataset groups members: the key is
    the path up to the first '.' of the basename (``a/000.0.png`` -> ``("a/000", "0.png")``);
    None for a name without an extension."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return None
    return (f"{head}/{stem}" if head else stem), ext


def index_path(shard: str | Path) -> Path:
    """Where the index of ``shard`` lives beside it: ``000000.tar`` -> ``000000.idx.npz``."""
    shard = Path(shard)
    return shard.with_name(shard.name[: -len(".tar")] + INDEX_SUFFIX)


def _cache_path(shard: Path) -> Path:
    root = Path(os.environ.get("SYNREP_INDEX_CACHE",
                               Path.home() / ".cache" / "synrep" / "shard-index"))
    digest = hashlib.sha256(str(shard.resolve()).encode()).hexdigest()[:24]
    return root / f"{shard.stem}-{digest}{INDEX_SUFFIX}"


@dataclass
class ShardIndex:
    """The samples of one shard: where each starts (``offset``) and how many bytes it spans
    (``size``), its ``label`` and ``caption_id`` (-1 when absent) and its number of ``images``.
    ``keys`` are not kept: a sample's key is read with the sample."""

    offset: np.ndarray  # int64 (n,)
    size: np.ndarray  # int32 (n,)
    label: np.ndarray  # int64 (n,)
    caption_id: np.ndarray  # int64 (n,)
    images: np.ndarray  # int16 (n,)
    shard_bytes: int
    sha256: str
    mtime_ns: int

    def __len__(self) -> int:
        return len(self.offset)


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(f"shard {path} is truncated or corrupted ({why}); delete it (and its "
                     "marker and index, if any) and rewrite it")


def meta_ints(data: bytes) -> tuple[int, int]:
    """(label, caption_id) from a sample's JSON metadata, -1 for each that is absent."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except ValueError:
        return -1, -1
    if not isinstance(meta, dict):
        return -1, -1

    def as_int(v: object) -> int:
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else -1

    return as_int(meta.get("label")), as_int(meta.get("caption_id"))


def build_index(path: str | Path) -> ShardIndex:
    """Scan the tar ``path`` once (headers, plus each sample's small ``json``/``cls`` member) and
    hash it. Members are grouped into samples by key, as webdataset does; a key that comes back
    after another key is a corrupted shard.

    Raises:
        DataError: the shard is missing, truncated or not a tar file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard {path} does not exist; check data.shards")
    offsets: list[int] = []
    sizes: list[int] = []
    labels: list[int] = []
    cids: list[int] = []
    counts: list[int] = []
    seen: set[str] = set()
    key: str | None = None
    h = hashlib.sha256()
    st = path.stat()
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                tail = start_end = 0
                for info in tar:
                    end = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
                    tail = end
                    split = split_member(info.name) if info.isfile() else None
                    if split is None:
                        continue
                    member_key, ext = split
                    if member_key != key:
                        if member_key in seen:
                            raise _corrupt(path, f"sample {member_key!r} appears in two places")
                        if key is not None:
                            sizes.append(start_end - offsets[-1])
                        seen.add(member_key)
                        key = member_key
                        offsets.append(info.offset)
                        labels.append(-1)
                        cids.append(-1)
                        counts.append(0)
                    start_end = end
                    ext = ext.lower()
                    if ext == "json" or ext == "cls":
                        data = tar.extractfile(info).read()  # type: ignore[union-attr]
                        if ext == "json":
                            label, cid = meta_ints(data)
                            if labels[-1] < 0:
                                labels[-1] = label
                            cids[-1] = cid
                        else:
                            try:
                                labels[-1] = int(data.decode("ascii").strip())
                            except ValueError:
                                raise _corrupt(path, f"{info.name} is not an integer class "
                                                     "label") from None
                    elif ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
                        counts[-1] += 1
                if key is not None:
                    sizes.append(start_end - offsets[-1])
                f.seek(tail)
                if f.read(_BLOCK) != bytes(_BLOCK):
                    raise _corrupt(path, "no end-of-archive block after the last member")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise _corrupt(path, str(e) or type(e).__name__) from None
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return ShardIndex(np.asarray(offsets, np.int64), np.asarray(sizes, np.int32),
                      np.asarray(labels, np.int64), np.asarray(cids, np.int64),
                      np.asarray(counts, np.int16), st.st_size, h.hexdigest(), st.st_mtime_ns)


def save_index(index: ShardIndex, path: Path) -> None:
    """Write ``index`` to ``path`` atomically (``.idx.npz``)."""
    meta = json.dumps({"version": INDEX_VERSION, "shard_bytes": index.shard_bytes,
                       "sha256": index.sha256, "mtime_ns": index.mtime_ns})
    with atomic_output(path) as f:
        np.savez(f, offset=index.offset, size=index.size, label=index.label,
                 caption_id=index.caption_id, images=index.images,
                 meta=np.frombuffer(meta.encode(), np.uint8))


def load_index(path: Path) -> ShardIndex | None:
    """The index stored at ``path``, or None when it is missing, unreadable or of another
    version (it is then rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("version") != INDEX_VERSION:
                return None
            arrays = [z[k] for k in ("offset", "size", "label", "caption_id", "images")]
    except (OSError, ValueError, KeyError, EOFError):
        return None
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        return None
    return ShardIndex(*arrays, int(meta["shard_bytes"]), str(meta["sha256"]),
                      int(meta["mtime_ns"]))


def _fresh(index: ShardIndex, shard: Path, marker_sha: str | None) -> bool:
    st = shard.stat()
    if index.shard_bytes != st.st_size or index.mtime_ns != st.st_mtime_ns:
        return False  # rebuilt (and, with a marker, re-hashed against it)
    return marker_sha is None or index.sha256 == marker_sha


def shard_index(shard: str | Path, marker_sha: str | None = None) -> ShardIndex:
    """The index of ``shard``: read from beside it (or the cache folder) when it still matches
    the shard, else built and cached. ``marker_sha`` is the sha256 the shard's completion marker
    records, when it has one."""
    shard = Path(shard)
    if not shard.is_file():
        raise DataError(f"shard {shard} does not exist; check data.shards")
    for candidate in (index_path(shard), _cache_path(shard)):
        if candidate.is_file():
            index = load_index(candidate)
            if index is not None and _fresh(index, shard, marker_sha):
                return index
    index = build_index(shard)
    if marker_sha is not None and index.sha256 != marker_sha:
        raise _corrupt(shard, "its sha256 does not match its marker")
    for candidate in (index_path(shard), _cache_path(shard)):
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            save_index(index, candidate)
            break
        except (OSError, DataError):
            continue  # a read-only folder: try the cache folder, else keep it in memory only
    return index


def read_sample(fd: int, path: Path, offset: int, size: int) -> tuple[str, dict[str, bytes]]:
    """The key and members (extension -> bytes) of the sample spanning ``size`` bytes at
    ``offset`` of the open shard ``fd`` (``path`` names it in errors)."""
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise _corrupt(path, f"the sample at byte {offset} is cut short (was the shard "
                             "rewritten after it was indexed?)")
    members: dict[str, bytes] = {}
    key = ""
    try:
        with tarfile.open(fileobj=io.BytesIO(data + bytes(2 * _BLOCK)), mode="r:") as tar:
            for info in tar:
                split = split_member(info.name) if info.isfile() else None
                if split is None:
                    continue
                member_key, ext = split
                if key and member_key != key:
                    raise _corrupt(path, f"the index entry at byte {offset} spans two samples; "
                                         "delete its .idx.npz to rebuild it")
                key = member_key
                members[ext.lower()] = tar.extractfile(info).read()  # type: ignore[union-attr]
    except (tarfile.TarError, EOFError) as e:
        raise _corrupt(path, f"the sample at byte {offset} does not parse ({e}); delete its "
                             ".idx.npz to rebuild it") from None
    if not key:
        raise _corrupt(path, f"no sample at byte {offset}; delete its .idx.npz to rebuild it")
    return key, members


def resolve_shards(spec: str | Path | list[str] | tuple[str, ...], complete_only: bool = False,
                   key: str = "data.shards") -> list[Path]:
    """The tar files ``spec`` names: a folder (its ``*.tar``, sorted; with ``complete_only``
    only those with a completion marker), one ``.tar``, a brace pattern
    (``dir/shard-{000000..000099}.tar``), a glob, or a list of these.

    Raises:
        DataError: nothing matches, or a named file does not exist.
    """
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not items or items == [""]:
        raise DataError(f"{key} is empty; set it to a folder of .tar shards, a brace pattern "
                        "or a list of .tar files")
    out: list[Path] = []
    for item in items:
        for one in braceexpand(str(item)):
            p = Path(one).expanduser()
            if p.is_dir():
                found = sorted(q for q in p.glob("*.tar") if q.is_file())
                if complete_only:
                    found = [q for q in found
                             if q.with_name(q.name[:-4] + "_stats.json").is_file()]
                if not found:
                    raise DataError(f"{key}: folder {p} holds no "
                                    f"{'complete ' if complete_only else ''}.tar shards")
                out.extend(found)
            elif any(c in one for c in "*?["):
                found = sorted(q for q in p.parent.glob(p.name) if q.is_file())
                if not found:
                    raise DataError(f"{key}: no file matches {one!r}")
                out.extend(found)
            elif p.is_file():
                out.append(p)
            else:
                raise DataError(f"{key}: {one} does not exist; check the path")
    return out
