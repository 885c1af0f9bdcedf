"""The glyphs dataset: printed digits from the DejaVu fonts, the distant domain of the
negative-transfer study (benchmarks/negative_transfer.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from synrep.data.datasets import load_dataset
from synrep.data.glyphs import CLASSES, DEFAULT_ROOT, FACES, SIZES, provenance, render, warp
from synrep.errors import DataError
from tests.conftest import needs_fashion

needs_fonts = pytest.mark.skipif(
    not all((__import__("pathlib").Path(DEFAULT_ROOT) / f).is_file() for f in FACES),
    reason="needs fonts-dejavu-core (make test installs it)")


def _dot(y: int, x: int, size: int = 56) -> torch.Tensor:
    img = torch.zeros(1, 1, size, size)
    img[0, 0, y, x] = 1.0
    return img


def _centre(img: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted (row, column) of a (1, 1, H, W) image."""
    w = img[0, 0]
    ys, xs = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(w.shape[1]), indexing="ij")
    return float((w * ys).sum() / w.sum()), float((w * xs).sum() / w.sum())


@pytest.mark.parametrize("angle, scale, shear, shift", [
    (90.0, 1.0, 0.0, (0.0, 0.0)),
    (0.0, 0.5, 0.0, (0.0, 0.0)),
    (0.0, 1.0, 0.5, (0.0, 0.0)),
    (-30.0, 0.8, 0.2, (0.25, -0.125)),
])
def test_warp_moves_a_dot_where_the_formula_says(angle, scale, shear, shift):
    """A dot at normalised p lands at R(angle) [[1, shear], [0, 1]] (scale p) + shift."""
    size, (py, px) = 56, (18, 35)
    # pixel centres -> [-1, 1] (align_corners=False)
    p = torch.tensor([(2 * px + 1) / size - 1, (2 * py + 1) / size - 1])
    a = math.radians(angle)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    q = rot @ torch.tensor([[1.0, shear], [0.0, 1.0]]) @ (scale * p) + torch.tensor(shift)
    want_x, want_y = ((q + 1) * size - 1) / 2
    out = warp(_dot(py, px, size), torch.tensor([a]), torch.tensor([scale]),
               torch.tensor([shear]), torch.tensor([shift]))
    got_y, got_x = _centre(out)
    assert abs(got_x - float(want_x)) < 0.35 and abs(got_y - float(want_y)) < 0.35


@needs_fonts
def test_splits_are_fixed_balanced_and_prefix_stable():
    x, y = render("test")
    assert x.shape == (SIZES["test"], 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [SIZES["test"] // 10] * 10
    x2, y2 = render("test")
    assert np.array_equal(x, x2) and np.array_equal(y, y2)  # deterministic
    head, yh = render("test", n=300)
    assert np.array_equal(head, x[:300]) and np.array_equal(yh, y[:300])
    train, _ = render("train", n=300)
    assert not np.array_equal(train, head)  # another seed
    # dark background, bright strokes, like Fashion-MNIST; noise makes no two images equal
    assert 5 < x.mean() < 60 and x.max() == 255
    assert len({a.tobytes() for a in x[:1000]}) == 1000


@needs_fonts
def test_each_label_draws_its_digit():
    """Every base render a label points at correlates best with that digit drawn on its own
    (Pillow's middle anchor instead of the ink box), in every face and stroke."""
    from PIL import Image, ImageDraw, ImageFont

    from synrep.data.glyphs import _bases, base_index

    bases = _bases(None)[:, 0].flatten(1).numpy()
    for f, face in enumerate(FACES):
        font = ImageFont.truetype(f"{DEFAULT_ROOT}/{face}", size=40)
        for stroke in range(3):
            refs = []
            for d in CLASSES:
                img = Image.new("L", (56, 56), 0)
                ImageDraw.Draw(img).text((28, 28), d, fill=255, font=font, anchor="mm",
                                         stroke_width=stroke, stroke_fill=255)
                refs.append(np.asarray(img, dtype=np.float64).ravel())
            rows = [int(base_index(torch.tensor(f), torch.tensor(d), torch.tensor(stroke)))
                    for d in range(10)]
            corr = np.corrcoef(np.concatenate([bases[rows], np.stack(refs)]))[:10, 10:]
            assert (corr.argmax(1) == np.arange(10)).all(), (face, stroke, corr.round(2))


@needs_fonts
@needs_fashion
def test_registered_datasets_and_provenance():
    g = load_dataset("glyphs", "test")
    assert g.classes == CLASSES and g.images.shape == (10_000, 1, 28, 28)
    mix = load_dataset("fashion-glyphs", "test")
    assert len(mix.classes) == 20 and mix.classes[10:] == [f"digit {c}" for c in CLASSES]
    assert mix.images.shape == (20_000, 1, 28, 28)
    assert torch.equal(mix.images[10_000:], g.images) and torch.equal(mix.labels[10_000:],
                                                                      g.labels + 10)
    assert int(mix.labels[:10_000].max()) == 9
    prov = provenance()
    assert sorted(prov["fonts"]) == sorted(FACES)
    assert all(len(h) == 64 for h in prov["fonts"].values()) and prov["freetype"]


def test_missing_fonts_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y fonts-dejavu-core"):
        render("test", root=str(tmp_path), n=10)
    with pytest.raises(DataError, match="choose 'train' or 'test'"):
        render("val")
