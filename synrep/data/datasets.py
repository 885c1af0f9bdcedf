"""Real labelled image sets held in memory, and the registry that names them.

Evaluation (linear probe, kNN, few-shot) and the mini pipeline's trainer read real images through
:func:`load_dataset`: ``"fashion-mnist"`` (the embedded default), ``"imagefolder"``
(``root/<split>/<class>/*.png``) and any torchvision dataset as ``"torchvision:<ClassName>"``.
Everything is returned as one uint8 tensor so consumers batch by slicing, not per-sample Python.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets
from PIL import Image
from tqdm.auto import tqdm

from synrep.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from synrep.data.fashion_mnist import load_fashion_mnist
from synrep.data.glyphs import CLASSES as GLYPH_CLASSES
from synrep.data.glyphs import render as render_glyphs
from synrep.data.index import resolve_shards
from synrep.data.sources import FolderStore, LazyImages, ShardStore
from synrep.errors import ConfigError, DataError
from synrep.registry import Registry

TORCHVISION_PREFIX = "torchvision:"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Show a progress bar only when loading takes long enough to be worth watching.
_PROGRESS_MIN_FILES = 1000
# Resize in chunks so the float32 copy of a 60k-image set never has to fit in memory at once.
_RESIZE_CHUNK = 2048


@dataclass
class ImageArray:
    """A labelled image set in memory.

    Attributes:
        images: uint8 (N, C, H, W), C = 1 (grayscale) or 3 (RGB): a tensor, or for sets read
            from disk (ImageFolder, WebDataset shards) a :class:`~synrep.data.sources.LazyImages`
            decoded when read.
        labels: int64 (N,), indices into ``classes``.
        classes: class names.
        name: the dataset name it was loaded as.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"ImageArray images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (len(self.images),):
            raise ValueError(
                f"ImageArray labels must be int64 ({len(self.images)},), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def in_memory(self) -> ImageArray:
        """This set with its images decoded into one tensor (itself when they already are)."""
        if isinstance(self.images, torch.Tensor):
            return self
        return ImageArray(self.images.load(), self.labels, list(self.classes), self.name)

    def subset(self, idx: torch.Tensor | Sequence[int] | slice) -> ImageArray:
        """The images at ``idx`` (indices, a bool mask or a slice), same classes and name."""
        if not isinstance(idx, (slice, torch.Tensor)):
            idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageArray(self.images[idx], self.labels[idx], list(self.classes), self.name)

    def select_classes(self, classes: Sequence[int]) -> ImageArray:
        """The images of the given labels, relabelled 0..n-1 in the order of ``classes``."""
        n = len(self.classes)
        bad = [c for c in classes if not 0 <= c < n]
        if bad or len(set(classes)) != len(classes) or not classes:
            raise ConfigError(
                f"classes={list(classes)}: choose distinct labels of {self.name} "
                f"(0..{n - 1}: {', '.join(self.classes)})")
        lut = torch.full((n,), -1, dtype=torch.long)
        lut[torch.as_tensor(list(classes))] = torch.arange(len(classes))
        new = lut[self.labels]
        keep = new >= 0
        return ImageArray(self.images[keep], new[keep], [self.classes[c] for c in classes],
                          f"{self.name}[{','.join(map(str, classes))}]")


Loader = Callable[[str, str | None, int | None], ImageArray]
DATASETS: Registry[Loader] = Registry("dataset")


def load_dataset(
    name: str, split: str, root: str | None = None, image_size: int | None = None
) -> ImageArray:
    """Load the ``split`` of dataset ``name`` into memory.

    Args:
        name: a registered name (``"fashion-mnist"``, ``"imagefolder"``) or
            ``"torchvision:<ClassName>"``, e.g. ``"torchvision:CIFAR10"``.
        split: ``"train"`` or ``"test"`` (imagefolder: any subfolder name of ``root``).
        root: where the files are; ``None`` means the dataset's default, if it has one.
        image_size: square output size; images are resized (shorter side) and center-cropped.
    """
    if image_size is not None and image_size <= 0:
        raise ConfigError(f"image_size must be a positive integer, got {image_size}")
    # The prefix form is open-ended (any torchvision class), so it cannot live in the registry.
    if name.startswith(TORCHVISION_PREFIX):
        return _load_torchvision(name[len(TORCHVISION_PREFIX) :], split, root, image_size)
    if name not in DATASETS:
        choices = ", ".join(DATASETS.names())
        raise ConfigError(
            f"unknown dataset {name!r}; choose one of: {choices}, or "
            f"'{TORCHVISION_PREFIX}<ClassName>' (e.g. '{TORCHVISION_PREFIX}CIFAR10')"
        )
    return DATASETS.get(name)(split, root, image_size)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) so the shorter side is ``size``, then center-crop to size x size.

    Bilinear with antialiasing (what PIL does on downscaling), in chunks to bound memory.
    """
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    # max(size, ...) guards rounding on the shorter side, so the crop below never runs out.
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        chunk = F.interpolate(chunk, size=(new_h, new_w), mode="bilinear", antialias=True)
        chunk = chunk[:, :, top : top + size, left : left + size]
        out[start : start + _RESIZE_CHUNK] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _resize_pil(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), then center crop; the usual eval transform."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


@DATASETS.register("fashion-mnist")
def _load_fashion_mnist(split: str, root: str | None, image_size: int | None) -> ImageArray:
    if split not in ("train", "test"):
        raise ConfigError(f"fashion-mnist split {split!r} is unknown; choose 'train' or 'test'")
    images, labels = load_fashion_mnist(split, root)  # type: ignore[arg-type]
    x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 28, 28)
    if image_size is not None and image_size != 28:
        x = resize_center_crop(x, image_size)
    return ImageArray(x, torch.from_numpy(labels), list(FASHION_MNIST_CLASSES), "fashion-mnist")


@DATASETS.register("glyphs")
def _load_glyphs(split: str, root: str | None, image_size: int | None) -> ImageArray:
    """Printed digits rendered from the DejaVu core fonts (synrep/data/glyphs.py); ``root``: a
    folder holding the fonts, default Debian's."""
    images, labels = render_glyphs(split, root)
    x = torch.from_numpy(images).unsqueeze(1)
    if image_size is not None and image_size != 28:
        x = resize_center_crop(x, image_size)
    return ImageArray(x, torch.from_numpy(labels), list(GLYPH_CLASSES), "glyphs")


@DATASETS.register("fashion-glyphs")
def _load_fashion_glyphs(split: str, root: str | None, image_size: int | None) -> ImageArray:
    """Fashion-MNIST's split followed by the glyphs' (labels 10-19, "digit 0".."digit 9"): a
    pretraining set with a semantically distant half. ``root`` is Fashion-MNIST's."""
    fashion = _load_fashion_mnist(split, root, image_size)
    glyphs = _load_glyphs(split, None, image_size)
    return ImageArray(torch.cat([fashion.images, glyphs.images]),
                      torch.cat([fashion.labels, glyphs.labels + len(fashion.classes)]),
                      fashion.classes + [f"digit {c}" for c in glyphs.classes], "fashion-glyphs")


@DATASETS.register("imagefolder")
def _load_imagefolder(split: str, root: str | None, image_size: int | None) -> ImageArray:
    if root is None:
        raise ConfigError(
            "dataset 'imagefolder' needs `data.root` (a folder with <split>/<class>/)"
        )
    if image_size is None:
        raise ConfigError(
            "dataset 'imagefolder' needs `data.image_size`: its images can differ in size and are "
            "resized and center-cropped to one square size"
        )
    folder = Path(root) / split
    if not folder.is_dir():
        found = (
            sorted(p.name for p in Path(root).iterdir() if p.is_dir())
            if Path(root).is_dir()
            else []
        )
        raise DataError(
            f"image folder {folder} does not exist (subfolders of {root}: {found or 'none'}); "
            f"expected {root}/<split>/<class>/*.png"
        )
    try:
        store = FolderStore(folder, image_size, channels=3, extensions=IMAGE_EXTENSIONS,
                            resample=Image.Resampling.BICUBIC)
    except DataError:
        raise DataError(
            f"image folder {folder} holds no images; expected {folder}/<class>/*.png (or "
            f"{', '.join(IMAGE_EXTENSIONS[1:])})"
        ) from None
    # Decoded when read (feature extraction streams it in batches): a 1.2M-image tree costs
    # its file list, not 180 GB of pixels.
    return ImageArray(LazyImages(store, chw=(3, image_size, image_size)), store.labels,
                      store.classes, "imagefolder")


@DATASETS.register("webdataset")
def _load_webdataset(split: str, root: str | None, image_size: int | None) -> ImageArray:
    """Plain labelled WebDataset shards (``cls`` member or ``json`` ``label``):
    ``root/<split>/*.tar``, or ``root`` with ``{split}`` in it
    (``/data/in1k/{split}/shard-{000000..000146}.tar``). Class names come from
    ``root/classes.txt`` (one a line, in label order) when it exists. Decoded when read."""
    if root is None or image_size is None:
        raise ConfigError("dataset 'webdataset' needs `root` (shards in <root>/<split>/, or a "
                          "pattern with {split}) and `image_size`")
    spec = root.replace("{split}", split) if "{split}" in root else str(Path(root) / split)
    store = ShardStore(resolve_shards(spec, key=f"webdataset {split} split"), "plain",
                       image_size=image_size, channels=3, resample=Image.Resampling.BICUBIC)
    if store.labels is None:
        raise DataError(f"the shards of {spec} have samples without a label (a cls member or "
                        "a json 'label'); evaluation needs one for every image")
    names_file = Path(root.split("{split}")[0]) / "classes.txt"
    n = int(store.labels.max()) + 1
    classes = [str(c) for c in range(n)]
    if names_file.is_file():
        names = [x.strip() for x in names_file.read_text().splitlines() if x.strip()]
        if len(names) < n:
            raise DataError(f"{names_file} names {len(names)} classes but the shards have "
                            f"label {n - 1}; list one name a line for every label")
        classes = names
    return ImageArray(LazyImages(store, chw=(3, image_size, image_size)), store.labels,
                      classes, "webdataset")


def _load_torchvision(
    cls_name: str, split: str, root: str | None, image_size: int | None
) -> ImageArray:
    name = TORCHVISION_PREFIX + cls_name
    cls = getattr(torchvision.datasets, cls_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.utils.data.Dataset)):
        raise ConfigError(
            f"dataset {name!r}: torchvision.datasets has no dataset class {cls_name!r} "
            "(names are case-sensitive, e.g. 'torchvision:CIFAR10')"
        )
    # Pass only the arguments this class takes: most take `train`, some (SVHN, STL10) `split`.
    params = inspect.signature(cls).parameters
    kwargs: dict[str, object] = {}
    if "root" in params:
        if root is None:
            raise ConfigError(f"dataset {name!r} needs `data.root` (the torchvision root folder)")
        kwargs["root"] = root
    if "train" in params:
        if split not in ("train", "test"):
            raise ConfigError(
                f"dataset {name!r} split {split!r} is unknown; choose 'train' or 'test'"
            )
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    if "download" in params:
        kwargs["download"] = False
    try:
        ds = cls(**kwargs)
    except (RuntimeError, FileNotFoundError) as e:
        raise DataError(
            f"dataset {name!r} is not in {root} ({e}); download it first with torchvision, e.g. "
            f'`python -c "import torchvision; torchvision.datasets.{cls_name}('
            f'{root!r}, download=True)"`'
        ) from None

    classes = [str(c) for c in getattr(ds, "classes", [])]
    data, targets = getattr(ds, "data", None), getattr(ds, "targets", None)
    if _is_array_layout(data, targets):
        # Fast path (MNIST family, CIFAR): the whole split already is one (N, H, W[, 3]) array.
        x = torch.as_tensor(np.asarray(data))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        labels = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        if image_size is not None:
            x = resize_center_crop(x, image_size)
        x = x.contiguous()
    else:
        x, labels = _load_items(ds, name, image_size)
    if not classes:
        classes = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    return ImageArray(x, labels, classes, name)


def _is_array_layout(data: object, targets: object) -> bool:
    if not isinstance(data, (np.ndarray, torch.Tensor)) or targets is None:
        return False
    shape = tuple(data.shape)
    return (
        data.dtype in (np.uint8, torch.uint8)
        and (len(shape) == 3 or (len(shape) == 4 and shape[3] == 3))
        and len(targets) == shape[0]  # type: ignore[arg-type]
    )


def _load_items(
    ds: torch.utils.data.Dataset, name: str, image_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic path: index the dataset item by item, (PIL image, int label) pairs."""
    n = len(ds)  # type: ignore[arg-type]
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for i in tqdm(range(n), desc=f"loading {name}", disable=n <= _PROGRESS_MIN_FILES):
        img, label = ds[i]
        if not isinstance(img, Image.Image):
            raise DataError(f"dataset {name!r} item {i} is a {type(img).__name__}, not a PIL image")
        img = img if img.mode == "L" else img.convert("RGB")
        if image_size is not None:
            img = _resize_pil(img, image_size)
        arr = np.asarray(img)
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        labels.append(int(label))
    if {a.shape[0] for a in arrays} == {1, 3}:
        # A few grayscale images in an RGB set: widen them rather than fail on the stack.
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ConfigError(
            f"dataset {name!r} has images of different sizes {sorted(shapes)[:3]}...; set "
            "`data.image_size` to resize them to one size"
        )
    return torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.int64)
