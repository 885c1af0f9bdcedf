"""WebDataset tar shards of caption groups: the synthetic images on disk.

One sample per caption (docs/design.md, "Formats"): ``{key}.txt`` (the caption), ``{key}.json``
(metadata: seeds, generator, scheduler, ...; sorted keys) and ``{key}.0.png ... {key}.{k-1}.png``,
the k images generated for that caption. Grouping the k images under one key is what multi-positive
objectives (StableRep, SynCLR) need; :func:`iter_flat` and :func:`flatten_wds` give CLIP-style
consumers one ``(image, caption)`` per image.

A shard is complete once its ``<name>_stats.json`` marker exists: the tar is written under a
temporary name unique to the writing process (``NNNNNN.tar.<pid>.<random>.tmp``,
:func:`synrep.utils.temp_path`), fsynced and renamed, and only then the marker is written. A killed
run leaves such a temporary file or a tar without marker, which :func:`complete_shards` ignores and
a rerun redoes (removing only temporary files whose writer is dead). A full disk is one
:class:`DataError` naming the file, with the temporary file removed.

Reading never trusts a file's declared sizes: an image whose header declares more pixels than the
largest image the writer recorded in the shard's marker (``max_pixels``; without a marker,
:data:`MAX_IMAGE_PIXELS`) is refused before it is decoded (a decompression bomb or a corrupted
header), as is every JSON marker or sample metadata that is not an object.
The writer is byte-deterministic (fixed tar headers, fixed PNG settings), so every executor that
writes the same groups produces the same bytes and the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from synrep.data.index import ShardIndex, index_path, meta_ints, save_index, split_member
from synrep.errors import DataError
from synrep.utils import atomic_output, is_no_space, json_dumps, no_space_error, temp_path

SIZES_FILE = "sizes.json"
MARKER_SUFFIX = "_stats.json"
# zlib level 6 is PIL's default; fixing it (and never writing tIME/pHYs chunks) keeps PNGs stable.
PNG_COMPRESS_LEVEL = 6
IMAGE_FORMATS = ("png", "jpg", "webp")
_IMAGE_EXT = re.compile(r"^(\d+)\.(?:png|jpg|webp)$")
JPEG_QUALITY = 95
_BLOCK = tarfile.BLOCKSIZE
#: The most pixels (H * W) a shard image may declare: 8192 x 8192, far above any generator's
#: output and below PIL's own decompression-bomb limit, so the refusal names the member.
MAX_IMAGE_PIXELS = 8192 * 8192
#: Marker fields that must be non-negative integers.
_MARKER_INTS = ("samples", "images", "bytes")


@dataclass
class CaptionGroup:
    """One caption and the k images generated from it.

    Attributes:
        key: the sample key, a zero-padded id without '.' or '/' (e.g. ``"000000042"``).
        caption: the caption text.
        meta: JSON-serialisable metadata (seeds, generator, ...).
        images: k uint8 arrays, each (H, W) grayscale or (H, W, 3) RGB.
    """

    key: str
    caption: str
    meta: dict[str, Any]
    images: list[np.ndarray]


@dataclass
class GroupArray:
    """Caption groups held in memory, for small (CPU) runs.

    Attributes:
        images: uint8 (G, k, C, H, W).
        captions: G captions.
        keys: G sample keys.
        metas: G metadata dicts.
    """

    images: torch.Tensor
    captions: list[str]
    keys: list[str]
    metas: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.keys)


def marker_path(shard: str | Path) -> Path:
    """The completion marker of ``shard``: ``00000.tar`` -> ``00000_stats.json``."""
    shard = Path(shard)
    return shard.with_name(shard.name[: -len(".tar")] + MARKER_SUFFIX)


def _check_key(key: str) -> None:
    # webdataset splits a member name at the first '.' of its basename, and '/' would make a folder.
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"shard sample key {key!r} must be a non-empty string without '.' or '/'")


def _encode_image(img: np.ndarray, key: str, i: int, fmt: str = "png") -> bytes:
    """Encode with fixed settings, so the same pixels always give the same bytes: PNG (zlib 6),
    JPEG (quality 95, 4:4:4, baseline) or lossless WebP."""
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(
            f"image {i} of sample {key!r} must be uint8 (H, W) or (H, W, 3), got {img.dtype} "
            f"{img.shape}"
        )
    buf = io.BytesIO()
    pil = Image.fromarray(img)
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    elif fmt == "jpg":
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False,
                 progressive=False)
    elif fmt == "webp":
        pil.save(buf, format="WEBP", lossless=True, method=4, exact=True)
    else:
        raise ValueError(f"image format {fmt!r} is unknown; choose one of {IMAGE_FORMATS}")
    return buf.getvalue()


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed header fields: the same groups give the same bytes on any machine, user or clock.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_json(path: Path, obj: Any) -> None:
    text = json_dumps(obj, path, sort_keys=True, indent=1) + "\n"  # NaN/inf refused
    with atomic_output(path, "w") as f:  # one temporary name per process and call: ranks race
        f.write(text)


def write_shard(path: str | Path, groups: Iterable[CaptionGroup],
                extra: dict[str, Any] | None = None, image_format: str = "png") -> dict[str, Any]:
    """Write ``groups`` to the shard ``path`` (``*.tar``) atomically, then its completion marker.

    Members are written in the order given. Returns the marker's contents: ``shard`` (file name),
    ``samples``, ``images``, ``bytes`` and ``sha256`` of the tar, plus ``extra`` (the writer's
    own statistics, say render time). Images are stored as ``image_format`` (png, jpg, webp).

    Raises:
        ValueError: a bad key (contains '.' or '/', or repeated) or an image that is not uint8
            (H, W) / (H, W, 3).
        DataError: the output directory cannot be created or written.
    """
    path = Path(path)
    if path.suffix != ".tar":
        raise ValueError(f"shard path {path} must end in .tar")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format {image_format!r} is unknown; choose one of "
                         f"{IMAGE_FORMATS}")
    directory = path.parent
    marker = marker_path(path)
    tmp = temp_path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # An old marker must not vouch for the tar being rewritten if this write is killed.
        marker.unlink(missing_ok=True)
        index_path(path).unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise DataError(
            f"shard directory {directory} is not writable ({e}); choose a writable output folder"
        ) from None

    samples = images = max_pixels = 0
    seen: set[str] = set()
    spans: list[tuple[int, int, int, int, int]] = []  # offset, size, label, caption id, images
    try:
        with os.fdopen(fd, "wb") as f:
            out = _HashingWriter(f)
            tar_args = {"fileobj": out, "mode": "w", "format": tarfile.PAX_FORMAT}
            with tarfile.open(**tar_args) as tar:  # type: ignore[arg-type]
                for g in groups:
                    _check_key(g.key)
                    if g.key in seen:
                        raise ValueError(f"shard sample key {g.key!r} appears twice in {path}")
                    seen.add(g.key)
                    if not g.images:
                        raise ValueError(f"sample {g.key!r} has no images; a group needs k >= 1")
                    meta = json_dumps(g.meta, f"{path} sample {g.key!r} metadata",
                                      sort_keys=True, ensure_ascii=False)
                    start = tar.offset
                    _add(tar, f"{g.key}.txt", g.caption.encode("utf-8"))
                    _add(tar, f"{g.key}.json", meta.encode("utf-8"))
                    for i, img in enumerate(g.images):
                        _add(tar, f"{g.key}.{i}.{image_format}",
                             _encode_image(img, g.key, i, image_format))
                        max_pixels = max(max_pixels, int(img.shape[0]) * int(img.shape[1]))
                    samples += 1
                    images += len(g.images)
                    label, cid = meta_ints(meta.encode("utf-8"))
                    spans.append((start, tar.offset - start, label, cid, len(g.images)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_no_space(e):
            raise no_space_error(path) from None
        raise
    _fsync_dir(directory)
    cols = list(zip(*spans)) or [(), (), (), (), ()]
    index = ShardIndex(np.asarray(cols[0], np.int64), np.asarray(cols[1], np.int32),
                       np.asarray(cols[2], np.int64), np.asarray(cols[3], np.int64),
                       np.asarray(cols[4], np.int16), out.size, out.sha256.hexdigest(),
                       path.stat().st_mtime_ns)
    save_index(index, index_path(path))  # before the marker: a marked shard has its index
    stats = {
        "shard": path.name,
        "samples": samples,
        "images": images,
        "bytes": out.size,
        "sha256": out.sha256.hexdigest(),
        "max_pixels": max_pixels,  # the largest image: readers decode nothing larger
        **(extra or {}),
    }
    _atomic_write_json(marker, stats)
    return stats


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(
        f"shard {path} is truncated or corrupted ({why}); delete it (and its {MARKER_SUFFIX} "
        "marker) and rerun the stage that wrote it"
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The completion marker of the shard ``path`` (None when it has none), checked: a JSON
    object whose ``samples``, ``images`` and ``bytes`` are integers >= 0.

    Raises:
        DataError: the marker is unreadable or malformed.
    """
    path = Path(path)
    marker = marker_path(path)
    if not marker.exists():
        return None
    fix = f"delete it and {path} and rerun the stage that wrote them"
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"shard marker {marker} is unreadable ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise DataError(f"shard marker {marker} is a JSON {type(data).__name__}, not an object; "
                        f"{fix}")
    for key in _MARKER_INTS:
        v = data.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DataError(f"shard marker {marker} has {key} = {v!r}, expected an integer >= 0; "
                            f"{fix}")
    return data


_read_marker = read_marker


def decode_image(path: Path, member: str, data: bytes, max_pixels: int = MAX_IMAGE_PIXELS,
                 mode: str | None = None) -> np.ndarray:
    """Decode one image, refusing one whose header declares more than ``max_pixels`` before its
    pixels are decompressed (a decompression bomb, or a corrupted header). ``mode`` ("L" or
    "RGB") converts; by default grayscale and RGB stay as stored and anything else becomes RGB."""
    kind = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WebP"}.get(
        member.rsplit(".", 1)[1].lower(), "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise _corrupt(path, f"{member} declares {w}x{h} pixels, more than the "
                                         f"{max_pixels:,} synrep decodes")
                img.load()
                if mode is not None:
                    return np.asarray(img if img.mode == mode else img.convert(mode))
                return np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _corrupt(path, f"{member} declares too many pixels to decode ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise _corrupt(path, f"{member} is not a decodable {kind}: {e}") from None


def _decode_group(path: Path, key: str, members: dict[str, bytes],
                  max_pixels: int = MAX_IMAGE_PIXELS) -> CaptionGroup:
    if "txt" not in members or "json" not in members:
        missing = " and ".join(f"{key}.{e}" for e in ("txt", "json") if e not in members)
        raise _corrupt(path, f"sample {key!r} has no {missing}")
    indexed = {int(m.group(1)): ext for ext in members if (m := _IMAGE_EXT.match(ext))}
    if not indexed or sorted(indexed) != list(range(len(indexed))):
        raise _corrupt(path, f"sample {key!r} images are {sorted(indexed)}, expected 0..k-1")
    try:
        caption = members["txt"].decode("utf-8")
        meta = json.loads(members["json"].decode("utf-8"))
    except ValueError as e:
        raise _corrupt(path, f"sample {key!r} has an undecodable .txt or .json: {e}") from None
    if not isinstance(meta, dict):
        raise _corrupt(path, f"{key}.json is a JSON {type(meta).__name__}, not an object")
    images = [decode_image(path, f"{key}.{indexed[i]}", members[indexed[i]], max_pixels)
              for i in range(len(indexed))]
    return CaptionGroup(key, caption, meta, images)


def read_shard(path: str | Path, verify: bool = False) -> Iterator[CaptionGroup]:
    """Yield the caption groups of one shard, in file order.

    Members are grouped by key (the member name up to the first '.' of its basename, as in
    webdataset); members with other extensions are ignored. When the shard's marker exists, the
    byte size and sample/image counts are checked against it, and with ``verify`` also the sha256.

    Raises:
        DataError: the shard is missing, truncated or corrupted.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard {path} does not exist; rerun the stage that writes it")
    marker = read_marker(path)
    if marker is not None:
        size = path.stat().st_size
        if size != marker.get("bytes"):
            raise _corrupt(path, f"{size} bytes on disk, its marker says {marker.get('bytes')}")
        if verify and _sha256_file(path) != marker.get("sha256"):
            raise _corrupt(path, "its sha256 does not match its marker")

    # The writer records its largest image in the marker: no image of this shard may declare more
    # pixels (a decompression bomb, or a corrupted header); without a marker, a fixed bound.
    max_pixels = MAX_IMAGE_PIXELS
    if marker is not None and isinstance(marker.get("max_pixels"), int):
        max_pixels = min(max_pixels, max(1, marker["max_pixels"]))
    samples = images = 0
    seen: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}

    def finish() -> CaptionGroup:
        nonlocal samples, images
        if key in seen:
            raise _corrupt(path, f"sample {key!r} appears in two places")
        seen.add(key)  # type: ignore[arg-type]
        group = _decode_group(path, key, members, max_pixels)  # type: ignore[arg-type]
        samples += 1
        images += len(group.images)
        return group

    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                end = 0
                for info in tar:
                    end = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
                    split = split_member(info.name) if info.isfile() else None
                    if split is None:
                        continue
                    member_key, ext = split
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    if len(data) != info.size:
                        raise _corrupt(path, f"member {info.name} is cut short")
                    if key is not None and member_key != key:
                        yield finish()
                        members = {}
                    key = member_key
                    members[ext] = data
                # tarfile stops quietly at a header cut at a block boundary; the end-of-archive
                # block (zeros) right after the last member tells a complete tar from a cut one.
                f.seek(end)
                if f.read(_BLOCK) != bytes(_BLOCK):
                    raise _corrupt(path, "no end-of-archive block after the last member")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise _corrupt(path, str(e) or type(e).__name__) from None
        if key is not None:
            yield finish()
    if marker is not None and (samples, images) != (marker.get("samples"), marker.get("images")):
        raise _corrupt(
            path,
            f"read {samples} samples / {images} images, its marker says "
            f"{marker.get('samples')} / {marker.get('images')}",
        )


def complete_shards(directory: str | Path) -> list[Path]:
    """The shards in ``directory`` that have a completion marker, sorted by name.

    A missing directory has no complete shards (a stage that has not started yet).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.tar") if p.is_file() and marker_path(p).is_file())


def write_sizes(directory: str | Path) -> dict[str, int]:
    """Write ``sizes.json`` (``{"00000.tar": n_samples, ...}``, the format open_clip reads) from
    the markers of the complete shards, atomically, and return it."""
    directory = Path(directory)
    sizes: dict[str, int] = {}
    for shard in complete_shards(directory):
        marker = read_marker(shard)
        assert marker is not None  # complete_shards only lists shards with a marker
        sizes[shard.name] = marker["samples"]
    try:
        _atomic_write_json(directory / SIZES_FILE, sizes)
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot write {directory / SIZES_FILE} ({e}); check the folder") from None
    return sizes


def _resolve(paths_or_dir: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths_or_dir, (str, Path)):
        p = Path(paths_or_dir)
        if p.is_dir():
            shards = complete_shards(p)
            if not shards:
                raise DataError(
                    f"shard directory {p} has no complete shards (*.tar with a {MARKER_SUFFIX} "
                    "marker); run the images stage first"
                )
            return shards
        if p.suffix != ".tar" and not p.exists():
            raise DataError(f"shard directory {p} does not exist; run the images stage first")
        return [p]
    return [Path(p) for p in paths_or_dir]


def iter_groups(
    paths_or_dir: str | Path | Iterable[str | Path], verify: bool = False
) -> Iterator[CaptionGroup]:
    """Yield the caption groups of a directory's complete shards, or of the given shard paths."""
    for shard in _resolve(paths_or_dir):
        yield from read_shard(shard, verify=verify)


def iter_flat(
    paths_or_dir: str | Path | Iterable[str | Path], verify: bool = False
) -> Iterator[tuple[np.ndarray, str, str, int]]:
    """Yield ``(image, caption, key, image_index)`` once per image, in group order."""
    for g in iter_groups(paths_or_dir, verify=verify):
        for i, img in enumerate(g.images):
            yield img, g.caption, g.key, i


def flatten_wds(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A webdataset pipeline stage: one ``{"__key__", "png", "txt"}`` sample per image (``jpg``
    or ``webp`` in place of ``png`` for shards written in those formats).

    Plain webdataset consumers (open_clip's ``to_tuple("png", "txt")``) expect one image per
    sample; our samples hold ``0.png ... {k-1}.png``. Use as
    ``webdataset.WebDataset(urls, shardshuffle=False).compose(flatten_wds)``; the new key
    ``{key}_{i}`` stays free of dots.
    """
    for sample in samples:
        n = 0
        while ext := next((e for e in IMAGE_FORMATS if f"{n}.{e}" in sample), None):
            yield {
                "__key__": f"{sample['__key__']}_{n}",
                "__url__": sample.get("__url__"),
                ext: sample[f"{n}.{ext}"],
                "txt": sample["txt"],
            }
            n += 1


def load_groups(directory: str | Path, max_groups: int | None = None) -> GroupArray:
    """Load (up to ``max_groups``) caption groups of a directory's complete shards into memory.

    Every group must have the same k and image shape; grayscale images get C = 1.
    """
    if max_groups is not None and max_groups <= 0:
        raise ValueError(f"max_groups must be positive or None, got {max_groups}")
    stacks: list[np.ndarray] = []
    captions: list[str] = []
    keys: list[str] = []
    metas: list[dict[str, Any]] = []
    for g in iter_groups(directory):
        if len({img.shape for img in g.images}) > 1:
            raise DataError(
                f"sample {g.key!r} in {directory} mixes image shapes "
                f"{sorted({img.shape for img in g.images})}; load_groups needs one image size"
            )
        arr = np.stack(g.images)  # (k, H, W) or (k, H, W, 3)
        arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)  # (k, C, H, W)
        if stacks and arr.shape != stacks[0].shape:
            raise DataError(
                f"sample {g.key!r} in {directory} has images {arr.shape} (k, C, H, W) but "
                f"{keys[0]!r} has {stacks[0].shape}; load_groups needs one k and one image size"
            )
        stacks.append(arr)
        captions.append(g.caption)
        keys.append(g.key)
        metas.append(g.meta)
        if max_groups is not None and len(keys) >= max_groups:
            break
    if not keys:
        raise DataError(f"the shards of {directory} hold no caption groups (every one is empty); "
                        "delete them with their markers and rerun the images stage")
    return GroupArray(torch.from_numpy(np.stack(stacks)), captions, keys, metas)
