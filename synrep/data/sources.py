"""Batch sources for training: every batch is a pure function of (seed, step, rank).

A :class:`Planner` says which samples a step's batch holds (a seeded permutation per epoch, each
rank taking its slice of the global batch), which of a caption group's k images are drawn and
which text of a caption is used; a store fetches those samples. Because the plan depends on
nothing but ``(seed, step, rank)``, a run that resumes at step t draws exactly the batches an
uninterrupted run would have drawn, with no loader state, whatever the number of loader workers.

Stores:

* :class:`ArrayStore`: decoded images in RAM, for small sets (the embedded default).
* :class:`ShardStore`: tar shards read at random through their index (:mod:`synrep.data.index`);
  only the drawn images are decoded, in ``DataLoader`` worker processes when ``data.workers > 0``.
  Memory stays a few bytes per sample whatever the size of the set.
* :class:`FolderStore`: an ImageFolder tree (``<root>/<split>/<class>/*.jpg``), decoded on fetch.

The same samples give the same batches from either store (tested), so a set can move from RAM to
streaming without changing a run.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from synrep.data.index import IMAGE_EXTS, read_sample, shard_index
from synrep.data.shards import MAX_IMAGE_PIXELS, decode_image, read_marker
from synrep.errors import ConfigError, DataError, SynrepError
from synrep.utils import derive_seed

_MAX_OPEN_SHARDS = 128


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def rewrite_choice(counts: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """LaCLIP's text choice: for the i-th caption of a step's *global* batch, which of its
    ``counts[i]`` candidate texts (the caption, then its rewrites) is used; uniform, and a pure
    function of ``(seed, step)``, so a resumed run and any number of ranks make the same choice.

    Shapes: counts (B,) int >= 1 -> (B,) int64 in [0, counts).
    """
    if counts.numel() and int(counts.min()) < 1:
        raise ValueError("every caption needs at least one candidate text")
    g = torch.Generator().manual_seed(derive_seed(seed, "laclip", step) % (1 << 63))
    u = torch.rand(counts.shape, generator=g, dtype=torch.float64)
    return (u * counts).long().clamp(max=counts - 1)  # floor(u * c): uniform on 0..c-1


class Planner:
    """Which samples step ``t`` draws, for one rank: shuffled, drop-last global batches of
    ``batch_size`` over ``n`` samples; rank r takes the r-th slice of ``batch_size / world``.

    With caption groups of ``k`` images, ``m`` of them are drawn per group (seeded by the step,
    for the global batch, then sliced). With ``text_counts`` (candidate texts per sample), the
    text of each sample is chosen by :func:`rewrite_choice`. The 2 ranks of a 2-process run
    see disjoint samples whose union is the 1-process batch: every sample once per epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 k: int | None = None, m: int | None = None,
                 text_counts: torch.Tensor | None = None) -> None:
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size={batch_size} must be divisible by the {world_size} ranks")
        if n < batch_size:
            raise ConfigError(f"train.batch_size={batch_size} exceeds the dataset size {n}")
        if m is not None and (k is None or not 1 <= m <= k):
            raise ConfigError(
                f"images_per_group={m} needs caption groups with at least that many images")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world_size
        self.k, self.m = k, m
        self.steps_per_epoch = n // batch_size
        self.text_counts = text_counts
        self._perm: tuple[int, torch.Tensor] | None = None

    def perm(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, _epoch_perm(self.n, self.seed, epoch))
        return self._perm[1]

    def plan(self, step: int) -> dict[str, torch.Tensor | None]:
        """``index`` (B,) sample positions; ``pick`` (B, m) drawn images of each group, or None
        without groups; ``choice`` (B,) text index, or None without rewrites."""
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = self.perm(epoch)
        local = self.batch_size // self.world
        lo, hi = self.rank * local, (self.rank + 1) * local
        idx = perm[i * self.batch_size + lo : i * self.batch_size + hi]
        pick = None
        if self.m is not None:
            assert self.k is not None
            if self.m < self.k:  # drawn for the global batch and sliced: N ranks pick as one
                g = torch.Generator().manual_seed(self.seed * 7919 + step)
                scores = torch.rand(self.batch_size, self.k, generator=g)[lo:hi]
                pick = scores.argsort(dim=1)[:, : self.m]
            else:
                pick = torch.arange(self.m).expand(len(idx), -1)
        choice = None
        if self.text_counts is not None:
            glob = perm[i * self.batch_size : (i + 1) * self.batch_size]
            choice = rewrite_choice(self.text_counts[glob], self.seed, step)[lo:hi]
        return {"index": idx, "pick": pick, "choice": choice}


class Source:
    """Training batches of a store under a planner: ``batch(step)`` in this process,
    ``batches(start, stop)`` through a ``DataLoader`` with ``workers`` processes."""

    def __init__(self, store: Any, planner: Planner) -> None:
        self.store, self.planner = store, planner
        self.batch_size, self.seed = planner.batch_size, planner.seed
        self.rank, self.world = planner.rank, planner.world
        self.steps_per_epoch = planner.steps_per_epoch
        self.m = planner.m
        self.labels = store.labels

    @property
    def images(self) -> torch.Tensor:
        """Every image in RAM (selection pools, clustering): only an in-memory store has them."""
        if not isinstance(self.store, ArrayStore):
            raise ConfigError("this step needs the whole training set in memory (online "
                              "selection, MoCE clustering): set data.loader=memory")
        return self.store.images

    @property
    def texts(self) -> list[list[str]] | None:
        return getattr(self.store, "texts", None)

    @property
    def in_memory(self) -> bool:
        """Whether batches are slices of tensors in RAM (no worth in worker processes)."""
        return isinstance(self.store, ArrayStore)

    def __len__(self) -> int:
        return self.planner.n

    def batch(self, step: int) -> dict[str, Any]:
        plan = self.planner.plan(step)
        out = self.store.fetch(plan["index"], plan["pick"], plan["choice"], step)
        out["index"] = plan["index"]
        if plan["pick"] is not None:  # which of each group's k images were drawn: (B, m)
            out["pick"] = plan["pick"]
        return out

    def batches(self, start: int, stop: int, workers: int = 0,
                pin_memory: bool = False) -> Iterator[dict[str, Any]]:
        """The batches of steps ``start .. stop - 1`` in order; with ``workers`` > 0 they are
        fetched ``2 * workers`` steps ahead in worker processes (the same batches)."""
        if workers <= 0 or self.in_memory:
            for step in range(start, stop):
                yield self.batch(step)
            return
        loader = torch.utils.data.DataLoader(
            _Steps(self), batch_size=None, sampler=range(start, stop), num_workers=workers,
            collate_fn=_identity, pin_memory=pin_memory, prefetch_factor=2,
            persistent_workers=False)
        for step, (got, batch) in zip(range(start, stop), loader):
            if isinstance(batch, SynrepError):
                raise batch  # a worker's bad shard or image: the same one line as in-process
            if got != step:  # the DataLoader keeps order; a guard, not a path
                raise RuntimeError(f"loader returned step {got} for step {step}")
            yield batch


class MixtureSource(Source):
    """A weighted mixture of sources, as real and synthetic data are mixed: every step's global
    batch holds exactly ``counts[i]`` samples of source i (its weight's share of the batch,
    rounded by largest remainder), each drawn by that source's own planner (its own seed and
    epochs), concatenated in source order. Batches carry ``origin`` (B,), the source of each
    sample, and ``index``, its position within that source. Labels are kept when every source
    has them; texts when every source carries them."""

    def __init__(self, sources: list[Source], names: list[str]) -> None:
        self.sources, self.names = sources, names
        self.counts = [s.batch_size for s in sources]
        self.batch_size = sum(self.counts)
        self.seed, self.rank, self.world = sources[0].seed, sources[0].rank, sources[0].world
        self.steps_per_epoch = min(s.steps_per_epoch for s in sources)
        self.m = sources[0].m
        self.labels = None
        self.planner = sources[0].planner  # for the epoch arithmetic of logs only

    @property
    def in_memory(self) -> bool:
        return all(s.in_memory for s in self.sources)

    @property
    def images(self) -> torch.Tensor:
        raise ConfigError("this step needs the whole training set in memory (online selection, "
                          "MoCE clustering); it cannot run on data.mixture")

    @property
    def texts(self) -> None:
        return None

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def batch(self, step: int) -> dict[str, Any]:
        parts = [s.batch(step) for s in self.sources]
        out: dict[str, Any] = {
            "images": torch.cat([p["images"] for p in parts]),
            "index": torch.cat([p["index"] for p in parts]),
            "origin": torch.cat([torch.full((len(p["index"]),), i, dtype=torch.long)
                                 for i, p in enumerate(parts)]),
        }
        if all("labels" in p for p in parts):
            out["labels"] = torch.cat([p["labels"] for p in parts])
        if all("pick" in p for p in parts):
            out["pick"] = torch.cat([p["pick"] for p in parts])
        if all("texts" in p for p in parts):
            out["texts"] = [t for p in parts for t in p["texts"]]
        return out


def mixture_counts(weights: Sequence[float], batch_size: int, world: int = 1) -> list[int]:
    """Samples of each source in a global batch: ``weights`` normalised, times ``batch_size``,
    rounded by largest remainder (ties to the earlier source), each a multiple of ``world``."""
    if not weights or any(w <= 0 for w in weights):
        raise ConfigError(f"data.mixture weights must all be > 0, got {list(weights)}")
    if batch_size % world:
        raise ConfigError(f"train.batch_size={batch_size} must be divisible by the {world} ranks")
    units = batch_size // world  # rounded in units of one sample per rank
    total = float(sum(weights))
    exact = [w / total * units for w in weights]
    counts = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: units - sum(counts)]:
        counts[i] += 1
    if min(counts) < 1:
        raise ConfigError(f"data.mixture weights {list(weights)} give a source no sample of a "
                          f"batch of {batch_size}; raise its weight or the batch")
    return [c * world for c in counts]


def _identity(x: Any) -> Any:
    return x


class _Steps(torch.utils.data.Dataset):
    """A map-style view of a source: item ``t`` is the batch of step ``t``."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __getitem__(self, step: int) -> tuple[int, dict[str, Any] | SynrepError]:
        try:
            return int(step), self.source.batch(int(step))
        except SynrepError as e:  # returned, not raised: the DataLoader would wrap it in a trace
            return int(step), e


class ArrayStore:
    """Decoded samples in RAM: ``images`` uint8 (N, C, H, W) or caption groups
    (N, k, C, H, W); ``labels`` (N,) or None; ``texts`` the candidate texts of each sample (its
    caption first) or None."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None,
                 texts: list[list[str]] | None = None) -> None:
        if texts is not None and len(texts) != len(images):
            raise ValueError(f"texts must hold one list per sample: {len(texts)} != "
                             f"{len(images)}")
        self.images, self.labels, self.texts = images, labels, texts

    def fetch(self, idx: torch.Tensor, pick: torch.Tensor | None, choice: torch.Tensor | None,
              step: int) -> dict[str, Any]:
        images = self.images[idx]
        if pick is not None and pick.shape[1] < images.shape[1]:
            images = images[torch.arange(len(idx))[:, None], pick]
        elif pick is not None:
            images = images[:, : pick.shape[1]]
        out: dict[str, Any] = {"images": images}
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        if self.texts is not None:
            c = choice.tolist() if choice is not None else [0] * len(idx)
            out["texts"] = [self.texts[j][t] for j, t in zip(idx.tolist(), c)]
        return out


class ArraySource(Source):
    """A :class:`Source` over images held in memory (see :class:`ArrayStore`, :class:`Planner`).

    ``images`` uint8 (N, C, H, W) or caption groups (N, k, C, H, W); ``labels`` (N,) or None.
    With groups, ``images_per_group`` of the k images of each group are drawn per step.
    ``texts``: the candidate texts of each sample, its caption first; batches then carry
    ``"texts"``, one string per sample.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1,
                 images_per_group: int | None = None,
                 texts: list[list[str]] | None = None) -> None:
        if images_per_group is not None and images.ndim != 5:
            raise ConfigError(f"images_per_group={images_per_group} needs caption groups with "
                              "at least that many images")
        store = ArrayStore(images, labels, texts)
        super().__init__(store, Planner(
            len(images), batch_size, seed, rank, world_size,
            k=images.shape[1] if images.ndim == 5 else None, m=images_per_group,
            text_counts=text_counts(texts)))


def text_counts(texts: Sequence[Sequence[str]] | None) -> torch.Tensor | None:
    """Candidate texts per sample, or None when no sample has more than its caption."""
    if texts is None:
        return None
    counts = torch.tensor([len(t) for t in texts])
    return None if int(counts.max()) == 1 else counts


def group_texts(captions: list[str], keys: list[str], metas: list[dict[str, Any]],
                rewrites: dict[int, tuple[str, list[str]]] | None = None,
                where: str = "the shards") -> list[list[str]]:
    """The candidate texts of each caption group: ``[caption]``, or with LaCLIP ``rewrites``
    (``caption_id -> (caption, rewrites)``, from the rewrites stage) ``[caption, *rewrites]``.

    A group's caption id is its metadata's ``caption_id`` (the images stage records it), else
    its numeric key. A group without rewrites, or whose rewrites were made from another caption,
    is an error: the rewrites must come from the captions the images were rendered from.
    """
    if rewrites is None:
        return [[c] for c in captions]
    return [_candidates(caption, meta.get("caption_id", int(key) if key.isdigit() else None),
                        key, rewrites, where)
            for caption, key, meta in zip(captions, keys, metas)]


def _candidates(caption: str, cid: int | None, key: str,
                rewrites: dict[int, tuple[str, list[str]]], where: str) -> list[str]:
    if cid not in rewrites:
        raise DataError(f"caption group {key!r} of {where} has no rewrites: make them from "
                        "the captions its images were rendered from (captions.rewrite.source) "
                        "or set method.rewrites=false")
    source, alts = rewrites[cid]
    if source != caption:
        raise DataError(f"the rewrites of caption {cid} were made from {source!r}, but the "
                        f"images of group {key!r} in {where} were rendered from {caption!r}; "
                        "rewrite the captions these images come from (captions.rewrite.source)")
    return [caption, *alts]


# --- decoding on fetch ----------------------------------------------------------------------


def random_resized_box(w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, width, height) for a w x h image: up to
    10 draws of an area share in ``scale`` and a log-uniform aspect ratio in ``ratio``, else the
    largest centre crop within ``ratio``."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def decode_resized(data: bytes, name: str, where: Path, size: int | None, mode: str | None,
                   box_fn: Any = None, max_pixels: int = MAX_IMAGE_PIXELS,
                   resample: int = Image.Resampling.BILINEAR) -> np.ndarray:
    """Decode one image to uint8 (H, W) (mode "L") or (H, W, 3) ("RGB"; None keeps grayscale
    and makes anything else RGB), then, when ``size``
    is given, crop and resize it to size x size in one bilinear resample: the centred square
    (``box_fn`` None, the evaluation transform) or the box ``box_fn(w, h)`` returns (a random
    resized crop). JPEGs are decoded at the smallest scale that still covers the output."""
    if size is None:
        return decode_image(where, name, data, max_pixels, mode)
    try:
        img = Image.open(io.BytesIO(data))
        if mode is None:  # grayscale stays grayscale, anything else becomes RGB
            mode = img.mode if img.mode in ("L", "RGB") else "RGB"
        w, h = img.size
        if w * h > max_pixels:
            raise DataError(f"{where}: {name} declares {w}x{h} pixels, more than the "
                            f"{max_pixels:,} synrep decodes; remove it")
        if box_fn is None:
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, side, side)
        else:
            box = box_fn(w, h)
        if img.format == "JPEG":  # DCT scaling: decode at 1/2, 1/4 or 1/8 when that suffices
            shrink = min(box[2], box[3]) / size
            if shrink >= 2:
                img.draft(mode, (math.ceil(w / shrink), math.ceil(h / shrink)))
        sx, sy = img.size[0] / w, img.size[1] / h
        img = img.convert(mode) if img.mode != mode else img
        left, top, cw, ch = box
        out = img.resize((size, size), resample,
                         box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy),
                         reducing_gap=None)
        return np.asarray(out)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: {name} is not a decodable image ({e}); delete or replace "
                        "it") from None


def _to_chw(arrays: list[np.ndarray], where: str) -> torch.Tensor:
    """Stack uint8 (H, W) / (H, W, 3) arrays of one shape to (N, C, H, W)."""
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"{where} holds images of sizes {sorted(shapes)[:4]}; set "
                        "data.image_size to resize them to one size")
    x = torch.from_numpy(np.stack(arrays))
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)


class _Files:
    """Open shard files of this process, at most ``_MAX_OPEN_SHARDS`` (least recent closed).
    Opened lazily after the fork, so every DataLoader worker has its own descriptors."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = -1

    def fd(self, shard: int) -> int:
        if self._pid != os.getpid():
            self._fds = OrderedDict()  # the parent's descriptors stay the parent's
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(self.paths[shard], os.O_RDONLY)
            except OSError as e:
                raise DataError(f"shard {self.paths[shard]} cannot be opened ({e}); check "
                                "data.shards") from None
            self._fds[shard] = fd
            if len(self._fds) > _MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["paths"])  # type: ignore[misc]


class ShardStore:
    """Samples of tar shards read at random through their indexes.

    ``kind`` "groups": synrep's caption-group shards (``txt``, ``json``, ``0.png`` ...); the
    drawn images of each group are decoded. ``kind`` "plain": WebDataset image-text shards as
    img2dataset and open_clip write them (one ``jpg``/``jpeg``/``png``/``webp`` a key, optional
    ``txt``, ``json``, ``cls``). ``image_size`` resizes (centre square, or ``crop="random"``: a
    random resized crop with ``scale``/``ratio``, seeded by (seed, step, sample)); ``channels``
    1 or 3 converts. ``keep`` (positions into the shards' samples) restricts the store to a
    subset (``data.classes``, ``data.max_captions``), in that order.
    """

    def __init__(self, shards: Sequence[str | Path], kind: str = "groups",
                 image_size: int | None = None, channels: int | None = None,
                 crop: str = "center", scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), seed: int = 0,
                 max_images: int | None = None,
                 resample: int = Image.Resampling.BILINEAR) -> None:
        if kind not in ("groups", "plain"):
            raise ValueError(f"kind must be 'groups' or 'plain', got {kind!r}")
        if crop not in ("center", "random"):
            raise ConfigError(f"data.crop={crop!r} is unknown; choose center or random")
        if crop == "random" and image_size is None:
            raise ConfigError("data.crop=random needs data.image_size (the crop's output size)")
        self.paths = [Path(p) for p in shards]
        if not self.paths:
            raise DataError("no shards to read; check data.shards")
        self.kind, self.image_size, self.crop = kind, image_size, crop
        self.mode = None if channels is None else ("L" if channels == 1 else "RGB")
        self.scale, self.ratio, self.seed = scale, ratio, seed
        self.resample = resample
        parts, self.max_pixels = [], []
        for p in self.paths:
            marker = read_marker(p) if kind == "groups" else None
            idx = shard_index(p, marker.get("sha256") if marker else None)
            parts.append(idx)
            mp = marker.get("max_pixels") if marker else None
            self.max_pixels.append(min(MAX_IMAGE_PIXELS, max(1, mp))
                                   if isinstance(mp, int) else MAX_IMAGE_PIXELS)
        self.shard = np.concatenate([np.full(len(ix), i, np.int32) for i, ix in enumerate(parts)])
        self.offset = np.concatenate([ix.offset for ix in parts])
        self.size = np.concatenate([ix.size for ix in parts])
        self.caption_id = np.concatenate([ix.caption_id for ix in parts])
        counts = np.concatenate([ix.images for ix in parts])
        label = np.concatenate([ix.label for ix in parts])
        if len(self.offset) == 0:
            raise DataError(f"the shards ({self.paths[0]} ...) hold no samples; rewrite them")
        if kind == "plain" and counts.min() < 1:
            j = int(np.argmin(counts))
            raise DataError(f"sample {j} of shard {self.paths[self.shard[j]]} has no image "
                            f"member ({'/'.join(IMAGE_EXTS)})")
        self.k = int(counts.min())
        if kind == "groups":
            if self.k < 1:
                raise DataError(f"a caption group of {self.paths[0]} ... has no images; "
                                "rewrite its shard")
            if max_images is not None:
                if self.k < max_images:
                    raise ConfigError(f"data.max_images_per_caption={max_images} but "
                                      f"{str(self.paths[0].parent)!r} has {self.k} images per "
                                      "caption")
                self.k = max_images
        self.labels = torch.from_numpy(label) if (label >= 0).all() else None
        self.ids: np.ndarray | None = None  # positions kept (subset), None = all
        self.rewrites: dict[int, tuple[str, list[str]]] | None = None
        self._want_texts = False  # with_texts(): batches carry each sample's text
        self._files = _Files(self.paths)

    def __len__(self) -> int:
        n = len(self.offset) if self.ids is None else len(self.ids)
        return n * self.flat

    def keep(self, ids: np.ndarray) -> None:
        """Restrict the store to the samples ``ids`` (positions), in that order."""
        self.ids = np.asarray(ids, np.int64)
        if self.labels is not None:
            self.labels = self.labels[torch.from_numpy(self.ids)]

    flat = 1  # images per sample position: k after each_image()

    def each_image(self) -> None:
        """Make every image of a caption group its own sample: position ``g * k + i`` is image
        ``i`` of group ``g`` (the order of flattening (G, k) in memory)."""
        if self.kind != "groups":
            raise ValueError("each_image() splits caption groups; plain shards have one image")
        self.flat = self.k
        if self.labels is not None:
            self.labels = self.labels.repeat_interleave(self.k)

    def _sid(self, pos: int) -> int:
        pos //= self.flat
        return pos if self.ids is None else int(self.ids[pos])

    def read(self, pos: int) -> tuple[str, dict[str, bytes], Path, int]:
        """Key, members, shard path and max pixels of sample ``pos``."""
        sid = self._sid(pos)
        shard = int(self.shard[sid])
        path = self.paths[shard]
        key, members = read_sample(self._files.fd(shard), path, int(self.offset[sid]),
                                   int(self.size[sid]))
        return key, members, path, self.max_pixels[shard]

    def fetch(self, idx: torch.Tensor, pick: torch.Tensor | None, choice: torch.Tensor | None,
              step: int) -> dict[str, Any]:
        arrays: list[np.ndarray] = []
        texts: list[str] = []
        for j, pos in enumerate(idx.tolist()):
            key, members, path, max_px = self.read(pos)
            box = None
            if self.crop == "random":
                rng = np.random.default_rng(derive_seed(self.seed, "crop", step, pos))

                def box(w: int, h: int, rng: np.random.Generator = rng) -> tuple:
                    return random_resized_box(w, h, self.scale, self.ratio, rng)
            if self.kind == "groups":
                images = {m.split(".", 1)[0]: m for m in members
                          if m.rsplit(".", 1)[-1] in IMAGE_EXTS and m.split(".")[0].isdigit()}
                if self.flat > 1:
                    which = [pos % self.flat]
                else:
                    which = pick[j].tolist() if pick is not None else range(self.k)
                for i in which:
                    name = images.get(str(i))
                    if name is None:
                        raise DataError(f"shard {path}: sample {key!r} has no image {i}; "
                                        "rewrite the shard")
                    arrays.append(decode_resized(members[name], f"{key}.{name}", path,
                                                 self.image_size, self.mode, box, max_px,
                                                 self.resample))
            else:
                ext = next(e for e in IMAGE_EXTS if e in members)
                arrays.append(decode_resized(members[ext], f"{key}.{ext}", path,
                                             self.image_size, self.mode or "RGB", box, max_px,
                                             self.resample))
            if self._want_texts:
                texts.append(self._text(key, members, path, j, choice))
        images = _to_chw(arrays, f"shard {self.paths[0].parent}")
        if self.kind == "groups" and self.flat == 1:
            m = len(arrays) // len(idx)
            images = images.view(len(idx), m, *images.shape[1:])
        out: dict[str, Any] = {"images": images}
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        if texts:
            out["texts"] = texts
        return out

    def with_texts(self, rewrites: dict[int, tuple[str, list[str]]] | None) -> torch.Tensor | None:
        """Carry each sample's text (``txt``) in its batches; with LaCLIP ``rewrites``, one of
        its candidates. Returns the candidate counts for the planner (None without rewrites)."""
        self._want_texts = True
        self.rewrites = rewrites
        if rewrites is None:
            return None
        cids = self.caption_id if self.ids is None else self.caption_id[self.ids]
        missing = [int(c) for c in np.unique(cids) if int(c) not in rewrites]
        if missing:
            raise DataError(f"caption {missing[0]} of the shards has no rewrites: make them from "
                            "the captions its images were rendered from "
                            "(captions.rewrite.source) or set method.rewrites=false")
        return torch.tensor([1 + len(rewrites[int(c)][1]) for c in cids])

    def _text(self, key: str, members: dict[str, bytes], path: Path, j: int,
              choice: torch.Tensor | None) -> str:
        if "txt" not in members:
            raise DataError(f"shard {path}: sample {key!r} has no .txt, and this method trains "
                            "on captions")
        caption = members["txt"].decode("utf-8", errors="replace")
        if self.rewrites is None:
            return caption
        meta = json.loads(members.get("json", b"{}"))
        cid = meta.get("caption_id", int(key) if key.isdigit() else None)
        cands = _candidates(caption, cid, key, self.rewrites, str(path))
        return cands[int(choice[j]) if choice is not None else 0]


class FolderStore:
    """An ImageFolder tree (``<root>/<class>/*.png``; classes sorted, files sorted) decoded on
    fetch to ``image_size`` (centre square, or a random resized crop with ``crop="random"``;
    bicubic, the ImageFolder evaluation convention).
    Memory: the file list and labels."""

    def __init__(self, folder: str | Path, image_size: int, channels: int = 3,
                 crop: str = "center", scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), seed: int = 0,
                 extensions: Sequence[str] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif",
                                              ".tif", ".tiff"),
                 resample: int = Image.Resampling.BICUBIC) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"image folder {folder} does not exist; expected "
                            f"{folder}/<class>/*.jpg")
        self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        files: list[Path] = []
        labels: list[int] = []
        for label, cls in enumerate(self.classes):
            for p in sorted((folder / cls).iterdir()):
                if p.is_file() and p.suffix.lower() in extensions:
                    files.append(p)
                    labels.append(label)
        if not files:
            raise DataError(f"image folder {folder} holds no images; expected "
                            f"{folder}/<class>/*.jpg")
        self.files = files
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.image_size, self.crop = image_size, crop
        self.mode = "L" if channels == 1 else "RGB"
        self.scale, self.ratio, self.seed = scale, ratio, seed
        self.resample = resample

    def __len__(self) -> int:
        return len(self.files)

    def keep(self, ids: np.ndarray) -> None:
        """Restrict the store to the samples ``ids`` (positions), in that order."""
        self.files = [self.files[i] for i in ids.tolist()]
        self.labels = self.labels[torch.from_numpy(np.asarray(ids, np.int64))]

    def fetch(self, idx: torch.Tensor, pick: torch.Tensor | None, choice: torch.Tensor | None,
              step: int) -> dict[str, Any]:
        arrays = []
        for pos in idx.tolist():
            path = self.files[pos]
            box = None
            if self.crop == "random":
                rng = np.random.default_rng(derive_seed(self.seed, "crop", step, pos))

                def box(w: int, h: int, rng: np.random.Generator = rng) -> tuple:
                    return random_resized_box(w, h, self.scale, self.ratio, rng)
            try:
                data = path.read_bytes()
            except OSError as e:
                raise DataError(f"image {path} cannot be read ({e}); delete or replace it") \
                    from None
            arrays.append(decode_resized(data, path.name, path.parent, self.image_size,
                                         self.mode, box, resample=self.resample))
        return {"images": _to_chw(arrays, str(self.files[0].parent.parent)),
                "labels": self.labels[idx]}


class LazyImages:
    """uint8 images (N, C, H, W) decoded from a store (:class:`FolderStore`, a plain
    :class:`ShardStore`) only when read: what evaluation uses for sets too large for RAM.

    Indexing (a slice, indices or a bool mask) gives another lazy view; :meth:`batches` decodes in
    order, in ``DataLoader`` workers when asked; :meth:`load` decodes everything into a tensor.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, store: Any, positions: torch.Tensor | None = None,
                 chw: tuple[int, int, int] | None = None) -> None:
        self.store = store
        self.positions = (torch.arange(len(store)) if positions is None
                          else torch.as_tensor(positions, dtype=torch.long))
        self._chw = chw

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def shape(self) -> torch.Size:
        if self._chw is None:
            first = self.store.fetch(self.positions[:1], None, None, 0)["images"]
            self._chw = tuple(first.shape[1:])  # type: ignore[assignment]
        return torch.Size((len(self), *self._chw))  # type: ignore[misc]

    def __getitem__(self, idx: Any) -> LazyImages:
        if isinstance(idx, int):
            idx = [idx]
        return LazyImages(self.store, self.positions[idx], self._chw)

    def fetch(self, start: int, stop: int) -> torch.Tensor:
        """Decode images ``start .. stop - 1`` of this view: uint8 (n, C, H, W)."""
        return self.store.fetch(self.positions[start:stop], None, None, 0)["images"]

    def batches(self, batch_size: int, workers: int = 0) -> Iterator[torch.Tensor]:
        """The images in order, ``batch_size`` at a time."""
        starts = range(0, len(self), batch_size)
        if workers <= 0:
            for s in starts:
                yield self.fetch(s, s + batch_size)
            return
        loader = torch.utils.data.DataLoader(
            _Chunks(self, batch_size), batch_size=None, sampler=starts, num_workers=workers,
            collate_fn=_identity, prefetch_factor=2)
        for chunk in loader:
            if isinstance(chunk, SynrepError):
                raise chunk
            yield chunk

    def load(self, batch_size: int = 512) -> torch.Tensor:
        """Every image of this view decoded into one tensor."""
        return torch.cat(list(self.batches(batch_size))) if len(self) else \
            torch.empty((0, *self.shape[1:]), dtype=torch.uint8)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for chunk in self.batches(256):
            yield from chunk


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, images: LazyImages, size: int) -> None:
        self.images, self.size = images, size

    def __getitem__(self, start: int) -> torch.Tensor | SynrepError:
        try:
            return self.images.fetch(int(start), int(start) + self.size)
        except SynrepError as e:
            return e
