"""Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist``.

Fashion-MNIST (Xiao et al., 2017, arXiv:1708.07747) is the embedded default's real dataset: the mini
text-to-image pipeline is trained on it and encoders are evaluated on its test split. The files are
read straight from disk on every call (nothing is cached or downloaded); an IDX file is a small
big-endian header (magic, dtype code, dims) followed by the raw array.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from synrep.errors import ConfigError, DataError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_INSTALL_HINT = (
    "install it with `sudo apt-get install -y dataset-fashion-mnist` or point `data.root` at a "
    "folder holding the IDX files"
)

# IDX dtype codes (http://yann.lecun.com/exdb/mnist/); all multi-byte types are big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed, by a ``.gz`` suffix) into a native array.

    Raises:
        DataError: the file is missing, truncated, or its header is not a valid IDX header.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as e:
        # A truncated gzip stream raises EOFError, a corrupted one BadGzipFile (an OSError).
        raise DataError(
            f"IDX file {path} is truncated or corrupted ({e}); delete it and reinstall it"
        ) from None

    def bad(why: str) -> DataError:
        return DataError(
            f"IDX file {path} is truncated or corrupted: {why}; delete it and reinstall it"
        )

    if len(data) < 4:
        raise bad(f"only {len(data)} bytes, shorter than the 4-byte magic number")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise bad(f"magic number starts with {zero:#06x}, expected 0x0000")
    if code not in _IDX_DTYPES:
        raise bad(f"unknown dtype code {code:#04x}, expected one of {sorted(_IDX_DTYPES)}")
    if ndim == 0:
        raise bad("the header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise bad(f"the header declares {ndim} dims but the file has only {len(data)} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise bad(
            f"the header declares shape {dims} of {dtype.name} ({expected} bytes) but the payload "
            f"has {len(data) - header} bytes"
        )
    # astype copies into a writable, native-endian array (frombuffer over bytes is read-only).
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(dims)
        .astype(dtype.newbyteorder("="))
    )


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {root / (stem + '.gz')} (or {stem}) is missing; {_INSTALL_HINT}"
    )


def load_fashion_mnist(
    split: Literal["train", "test"], root: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load one Fashion-MNIST split.

    Returns:
        ``images`` uint8 (N, 28, 28) and ``labels`` int64 (N,), with N = 60000 (train) or 10000
        (test).
    """
    if split not in _PREFIX:
        raise ConfigError(f"Fashion-MNIST split {split!r} is unknown; choose 'train' or 'test'")
    root = Path(root if root is not None else DEFAULT_ROOT)
    prefix = _PREFIX[split]
    images_path = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(
            f"{images_path} holds {images.dtype} {images.shape}, expected uint8 (N, 28, 28); "
            f"{_INSTALL_HINT}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{labels_path} holds {labels.dtype} {labels.shape}, expected uint8 ({len(images)},) "
            f"to match {images_path}; {_INSTALL_HINT}"
        )
    if labels.size and labels.max() >= len(CLASSES):
        raise DataError(f"{labels_path} has label {labels.max()}, expected 0..{len(CLASSES) - 1}")
    return images, labels.astype(np.int64)
