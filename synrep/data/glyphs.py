"""Glyphs: a second image domain, far from clothing, rendered offline at 28 px.

Printed digits 0-9 drawn from the six faces of the DejaVu core fonts (Debian package
``fonts-dejavu-core``: Sans, Sans Bold, Serif, Serif Bold, Sans Mono, Sans Mono Bold), white on
black like Fashion-MNIST, each with its own stroke width, random affine transform (rotation, scale,
shear, shift) and pixel noise. Labelled by digit. Pretraining on Fashion-MNIST mixed with these
(``fashion-glyphs``) measures negative transfer: how much a semantically distant part of the
pretraining set costs the downstream task (benchmarks/negative_transfer.py).

How an image is made, all batched tensor work after 60 base renders:

1. every (face, digit) is rendered once by Pillow/FreeType at 56 px, centred, for stroke widths
   0, 1 and 2 (180 bases);
2. each image picks a base and an affine transform: rotation +-20 degrees, scale 0.65-1.0, shear
   +-0.25, shift +-3 px (at 28 px), applied with ``grid_sample`` (bilinear) at 56 px;
3. a 2x2 mean pool gives 28 px (anti-aliased), Gaussian noise of a per-image sigma in [0, 12]
   grey levels is added, and the result is rounded to uint8.

Splits: 60,000 train and 10,000 test images from fixed seeds (1 and 2), with the same 10 classes
balanced by construction; the same fonts, Pillow and FreeType give the same pixels.
:func:`provenance` records the fonts' sha256 and the library versions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, features

from synrep.errors import DataError

#: Where Debian's fonts-dejavu-core puts the faces (``data.root`` / ``eval.root`` override it).
DEFAULT_ROOT = "/usr/share/fonts/truetype/dejavu"
FACES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
         "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")
CLASSES = [str(d) for d in range(10)]
SIZES = {"train": 60_000, "test": 10_000}
SEEDS = {"train": 1, "test": 2}
STROKES = (0, 1, 2)
BASE = 56  # render size; images are pooled 2x to 28 px
MAX_ROTATION = 20.0  # degrees
SCALE = (0.65, 1.0)
MAX_SHEAR = 0.25
MAX_SHIFT = 3 / 14  # 3 px at 28 px, in grid_sample's [-1, 1] units
MAX_NOISE = 12.0  # grey levels
_CHUNK = 4096  # images warped at once (noise is drawn per chunk, from its own seed)


def _faces(root: str | None) -> list[Path]:
    folder = Path(root or DEFAULT_ROOT)
    paths = [folder / f for f in FACES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"the glyphs dataset draws with the DejaVu core fonts, and {folder} lacks "
            f"{', '.join(missing)}; install them (apt-get install -y fonts-dejavu-core) or pass "
            "data.root= / eval.root= a folder holding these .ttf files")
    return paths


def _bases(root: str | None) -> torch.Tensor:
    """(faces x digits x strokes, 1, 56, 56) float renders in [0, 1], centred by ink box."""
    out = []
    for path in _faces(root):
        font = ImageFont.truetype(str(path), size=40)
        for digit in CLASSES:
            for stroke in STROKES:
                img = Image.new("L", (BASE, BASE), 0)
                draw = ImageDraw.Draw(img)
                left, top, right, bottom = draw.textbbox((0, 0), digit, font=font,
                                                          stroke_width=stroke)
                xy = ((BASE - (right - left)) / 2 - left, (BASE - (bottom - top)) / 2 - top)
                draw.text(xy, digit, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
                out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
    return torch.stack(out)[:, None]


def base_index(face: torch.Tensor, label: torch.Tensor, stroke: torch.Tensor) -> torch.Tensor:
    """The row of :func:`_bases` that draws digit ``label`` in ``FACES[face]`` with stroke
    ``STROKES[stroke]``."""
    return (face * len(CLASSES) + label) * len(STROKES) + stroke


def warp(images: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shear: torch.Tensor,
         shift: torch.Tensor) -> torch.Tensor:
    """Move each image's content by ``x -> R(angle) @ [[1, shear], [0, 1]] @ (scale * x) +
    shift`` in normalised coordinates ([-1, 1], x right, y down; ``shift`` (N, 2)), bilinear,
    zeros outside: (N, C, H, W) float -> the same shape."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    fwd = torch.stack([torch.stack([cos, cos * shear - sin], -1),
                       torch.stack([sin, sin * shear + cos], -1)], -2) * scale[:, None, None]
    inv = torch.linalg.inv(fwd)  # grid_sample asks, for each output point, where to read
    theta = torch.cat([inv, -(inv @ shift[:, :, None])], dim=2)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def render(split: str, root: str | None = None, n: int | None = None) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """The ``split``'s images, uint8 (N, 28, 28), and labels, int64 (N,) (first ``n`` only)."""
    if split not in SIZES:
        raise DataError(f"glyphs split {split!r} is unknown; choose 'train' or 'test'")
    size = SIZES[split]
    total = size if n is None else min(n, size)
    bases = _bases(root)
    # every draw is made for the whole split, so the first n images never depend on n
    g = torch.Generator().manual_seed(SEEDS[split])
    labels = (torch.arange(size) % len(CLASSES))[torch.randperm(size, generator=g)][:total]
    face = torch.randint(len(FACES), (size,), generator=g)[:total]
    stroke = torch.randint(len(STROKES), (size,), generator=g)[:total]
    u = torch.rand(size, 6, generator=g)[:total]
    angle = (u[:, 0] * 2 - 1) * MAX_ROTATION * torch.pi / 180
    scale = SCALE[0] + u[:, 1] * (SCALE[1] - SCALE[0])
    shear = (u[:, 2] * 2 - 1) * MAX_SHEAR
    shift = (u[:, 3:5] * 2 - 1) * MAX_SHIFT
    sigma = u[:, 5] * MAX_NOISE
    index = base_index(face, labels, stroke)
    images = np.empty((total, 28, 28), dtype=np.uint8)
    for start in range(0, total, _CHUNK):
        sl = slice(start, start + _CHUNK)
        noise = torch.randn(_CHUNK, 28, 28, generator=torch.Generator().manual_seed(
            SEEDS[split] * 100_003 + start))[: len(index[sl])]
        warped = warp(bases[index[sl]], angle[sl], scale[sl], shear[sl], shift[sl])
        small = F.avg_pool2d(warped, 2)[:, 0] * 255 + noise * sigma[sl, None, None]
        images[sl] = small.round().clamp(0, 255).to(torch.uint8).numpy()
    return images, labels.numpy().astype(np.int64)


def provenance(root: str | None = None) -> dict:
    """What the glyph images depend on: the fonts (name, sha256), Pillow and FreeType."""
    return {
        "fonts": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in _faces(root)},
        "pillow": PIL.__version__, "freetype": features.version("freetype2"),
        "seeds": SEEDS, "sizes": SIZES, "classes": CLASSES,
        "transform": {"rotation_deg": MAX_ROTATION, "scale": list(SCALE), "shear": MAX_SHEAR,
                      "shift_px": 3, "strokes": list(STROKES), "noise_grey_levels": MAX_NOISE},
    }
