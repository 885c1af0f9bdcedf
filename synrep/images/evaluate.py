"""`synrep eval-generator`: how well a text-to-image pipeline draws the fashion bank.

A small CNN trained on the real Fashion-MNIST train labels is the judge (its test accuracy is
reported beside the metrics):

- **class consistency**: the share of images of single-class captions that it assigns to the
  captioned class;
- **attribute adherence**: for caption pairs identical but for one attribute word (its lowest vs
  its highest value: dark/light, slim/wide, plain/patterned) rendered with the same seeds, the
  share of pairs whose measured attribute (:func:`synrep.concepts.fashion.measure_attributes`)
  moves the captioned way;
- **diversity**: mean pairwise distance between images of one caption in the judge's feature
  space, divided by the same for real test images of one class (>= 0.5 asked);
- **Frechet distance** between the judge's features of generated and real test images;
- **sharpness**: mean absolute difference between neighbouring pixels (0-255 scale, vertical and
  horizontal) of generated images, divided by the same for the real test images (reported: a
  decoder that draws the average of what a latent could be scores well below 1).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from synrep.captions.grammar import compose
from synrep.concepts import load_bank
from synrep.concepts.fashion import ATTRIBUTES, measure_attributes
from synrep.config import Config
from synrep.data.fashion_mnist import load_fashion_mnist
from synrep.images.render import Renderer
from synrep.layout import layout
from synrep.utils import ensure_writable_dir, write_json_atomic

TARGETS = {"class_consistency": 85.0, "attribute_adherence": 80.0, "diversity_ratio": 0.5}


class Judge(nn.Module):
    """A small CNN for 28 px Fashion-MNIST; ``features`` is its 128-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.286) / 0.353)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _gray(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 from grayscale or RGB renders."""
    return images if images.ndim == 3 else images.mean(-1).round().astype(np.uint8)


def _to_input(images: np.ndarray) -> torch.Tensor:
    """Judge input (N, 1, 28, 28) in [0, 1] from uint8 renders of any size."""
    x = torch.from_numpy(_gray(np.asarray(images))).float()[:, None] / 255.0
    if x.shape[-1] != 28:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    return x


def train_judge(root: str | None, path: Path, seed: int = 0, epochs: int = 3
                ) -> tuple[Judge, float]:
    """Train (or load from ``path``) the judge on the real train split; return it and its test
    accuracy in percent."""

    torch.manual_seed(seed)  # the judge's initial weights
    judge = Judge()
    xt, yt = load_fashion_mnist("test", root)
    if path.exists():
        judge.load_state_dict(load_file(str(path)))
    else:
        x, y = load_fashion_mnist("train", root)
        x, y = _to_input(x), torch.from_numpy(y)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
        steps = epochs * len(x) // 256
        for _ in tqdm(range(steps), desc="judge", dynamic_ncols=True):
            idx = torch.randint(len(x), (256,), generator=g)
            xb = x[idx]
            flip = torch.rand(len(xb), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(judge(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_file(judge.state_dict(), str(path))
    judge.eval()
    with torch.no_grad():
        acc = (judge(_to_input(xt)).argmax(1).numpy() == yt).mean() * 100
    return judge, float(acc)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` and ``b`` (N, d)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    # a small ridge keeps sqrtm stable when features have dead (constant) dimensions
    eps = 1e-6 * np.eye(a.shape[1])
    s1, s2 = np.cov(a, rowvar=False) + eps, np.cov(b, rowvar=False) + eps
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def sharpness(images: np.ndarray) -> float:
    """Mean absolute difference between vertically and horizontally neighbouring pixels of uint8
    images ``(N, H, W)`` (or ``(N, H, W, C)``, averaged over channels), on the 0-255 scale."""
    x = torch.from_numpy(_gray(images)).float()
    return float(((x[:, 1:] - x[:, :-1]).abs().mean() + (x[:, :, 1:] - x[:, :, :-1]).abs().mean())
                 / 2)


def _mean_pairwise(f: torch.Tensor) -> torch.Tensor:
    """(G, k, d) -> (G,) mean distance between the k members of each group."""
    d = torch.cdist(f, f)
    k = f.shape[1]
    return d.sum((1, 2)) / (k * (k - 1))


def evaluate_generator(cfg: Config, captions_per_class: int = 20, pairs_per_class: int = 4
                       ) -> dict[str, Any]:
    """Render the probe captions with ``cfg.images`` (any pipeline) and compute the metrics."""

    out = ensure_writable_dir(layout(cfg).generator_eval, "run.dir")
    judge, judge_acc = train_judge(cfg.eval.root, out / "judge.safetensors", cfg.run.seed)
    renderer = Renderer(cfg.images, cfg.run.device)
    k = max(2, cfg.images.images_per_caption)
    bank = load_bank("fashion")
    t0 = time.perf_counter()

    # 1. single-class captions, attributes drawn at random
    rng = random.Random(cfg.run.seed)
    caps, labels = [], []
    for concept in bank.concepts:
        for _ in range(captions_per_class):
            caps.append(compose(bank, concept, "c", rng))
            labels.append(concept.label)
    prompts = [c for c in caps for _ in range(k)]
    ids = [i for i in range(len(caps)) for _ in range(k)]
    ks = [j for _ in caps for j in range(k)]
    imgs = renderer.render(prompts, ids, ks, cfg.run.seed).images
    x = _to_input(imgs)
    with torch.no_grad():
        feats = judge.features(x)
        pred = judge.head(feats).argmax(1)
    y = torch.tensor([label for label in labels for _ in range(k)])
    consistency = float((pred == y).float().mean() * 100)
    per_class = {bank.concepts[c].name: float((pred[y == c] == c).float().mean() * 100)
                 for c in range(10)}
    gen_div = float(_mean_pairwise(feats.view(len(caps), k, -1)).mean())

    # real reference: groups of k real test images of one class
    xt, yt = load_fashion_mnist("test", cfg.eval.root)
    with torch.no_grad():
        real_feats = judge.features(_to_input(xt))
    g = torch.Generator().manual_seed(cfg.run.seed)
    groups = []
    for c in range(10):
        idx = torch.from_numpy(np.flatnonzero(yt == c))
        for _ in range(captions_per_class):
            groups.append(real_feats[idx[torch.randperm(len(idx), generator=g)[:k]]])
    real_div = float(_mean_pairwise(torch.stack(groups)).mean())
    fd = frechet_distance(feats.numpy().astype(np.float64),
                          real_feats.numpy().astype(np.float64))
    sharp_gen, sharp_real = sharpness(imgs), sharpness(xt)

    # 2. caption pairs that differ in one attribute: lowest vs highest value, same seeds
    pair_caps, meta = [], []
    for a_i, (attr, values) in enumerate(ATTRIBUTES.items()):
        for concept in bank.concepts:
            for p in range(pairs_per_class):
                s = random.Random(f"{cfg.run.seed}/pair/{attr}/{concept.label}/{p}")
                others = {o: s.choice(v) for o, v in ATTRIBUTES.items()
                          if o != attr and s.random() < 0.5}
                state = s.getstate()
                lo = compose(bank, concept, "c", s, attributes={**others, attr: values[0]})
                s.setstate(state)
                hi = compose(bank, concept, "c", s, attributes={**others, attr: values[-1]})
                pair_caps += [lo, hi]
                meta.append((attr, a_i))
    prompts = [c for c in pair_caps for _ in range(k)]
    # both captions of a pair share seeds: caption ids 2p and 2p+1 map to the same id p
    ids = [10_000 + i // 2 for i in range(len(pair_caps)) for _ in range(k)]
    ks = [j for _ in pair_caps for j in range(k)]
    pimgs = renderer.render(prompts, ids, ks, cfg.run.seed).images
    m = measure_attributes(_to_input(pimgs)).view(len(meta), 2, k, 3).mean(2)
    moved = {attr: [] for attr in ATTRIBUTES}
    for p, (attr, a_i) in enumerate(meta):
        moved[attr].append(bool(m[p, 1, a_i] > m[p, 0, a_i]))
    adherence = float(np.mean([v for vs in moved.values() for v in vs]) * 100)
    seconds = time.perf_counter() - t0

    results = {
        "pipeline": cfg.images.pipeline, "steps": renderer.steps,
        "guidance_scale": cfg.images.guidance_scale, "images_per_caption": k,
        "judge_test_accuracy": judge_acc,
        "class_consistency": consistency, "class_consistency_per_class": per_class,
        "attribute_adherence": adherence,
        "attribute_adherence_per_attribute": {a: float(np.mean(v) * 100)
                                              for a, v in moved.items()},
        "diversity_generated": gen_div, "diversity_real": real_div,
        "diversity_ratio": gen_div / real_div, "frechet_distance": fd,
        "sharpness_generated": sharp_gen, "sharpness_real": sharp_real,
        "sharpness_ratio": sharp_gen / sharp_real,
        "images_rendered": len(imgs) + len(pimgs), "seconds": round(seconds, 1),
        "targets": TARGETS}
    write_json_atomic(out / "results.json", results)
    _grid(imgs[::k][: 10 * captions_per_class], captions_per_class, out / "samples.png")
    print(f"generator {cfg.images.pipeline} (steps {renderer.steps}, guidance "
          f"{cfg.images.guidance_scale}); judge test accuracy {judge_acc:.1f} %")
    rows = [("class consistency", f"{consistency:.1f} %", ">= 85 %",
             consistency >= TARGETS["class_consistency"]),
            ("attribute adherence", f"{adherence:.1f} %", ">= 80 %",
             adherence >= TARGETS["attribute_adherence"]),
            ("diversity ratio", f"{gen_div / real_div:.2f} ({gen_div:.2f} / {real_div:.2f})",
             ">= 0.5", gen_div / real_div >= TARGETS["diversity_ratio"]),
            ("Frechet distance", f"{fd:.2f}", "(reported)", True),
            ("sharpness ratio", f"{sharp_gen / sharp_real:.2f} ({sharp_gen:.1f} / "
             f"{sharp_real:.1f})", "(reported)", True)]
    for name, value, target, ok in rows:
        print(f"  {name:20s} {value:24s} target {target:10s} {'OK' if ok else 'MISSED'}")
    print(f"results: {out / 'results.json'}; samples: {out / 'samples.png'}")
    return results


def _grid(images: np.ndarray, per_row: int, path: Path) -> None:
    """Save a grid (one row per class) as PNG."""

    n = len(images) // per_row * per_row
    if n == 0:
        return
    imgs = _gray(images[:n])
    h, w = imgs.shape[1:3]
    rows = imgs.reshape(n // per_row, per_row, h, w).transpose(0, 2, 1, 3)
    Image.fromarray(rows.reshape(n // per_row * h, per_row * w)).save(path)
