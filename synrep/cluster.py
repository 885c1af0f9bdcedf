"""The ``cluster`` stage: k-means on a pretrained encoder's features of the pretraining images.

MoCE (METHODS.md section 6, step 1) clusters the pretraining images with the features of a
pretrained MAE and keeps the centroids: each image's cluster centroid is the gate input of the
cluster-conditional experts, and expert search later assigns a downstream dataset's images to the
same centroids. Features are the mean of the last block's normalised patch tokens
(``probe_features(pool="avg")``), L2-normalised, so k-means groups images by cosine similarity.

``RUN/cluster/clusters.safetensors`` holds ``centroids`` (K, D), ``assign`` (N,) (the cluster of
each training image, in the order of the training source: caption-group shards are flattened,
every image a sample, as MAE-family methods train on them) and ``sizes`` (K,); its metadata
records the feature checkpoint, the data config and the k-means settings, so training refuses
clusters made from other data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from synrep.config import Config
from synrep.errors import CheckpointError, ConfigError, DataError

__all__ = ["cluster_features", "cluster_path", "kmeans", "load_clusters", "nearest",
           "run_cluster", "cluster_done"]


def _sq_dists(x: Tensor, c: Tensor) -> Tensor:
    """Squared Euclidean distances (N, K) between rows of ``x`` (N, D) and ``c`` (K, D)."""
    d = x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)[None]
    return d.clamp_min_(0)


def nearest(x: Tensor, centroids: Tensor, chunk: int = 65536) -> Tensor:
    """Index of the nearest centroid (K, D) for each row of ``x`` (N, D): (N,) long."""
    return torch.cat([_sq_dists(x[i:i + chunk], centroids).argmin(1)
                      for i in range(0, len(x), chunk)])


def kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """k-means with k-means++ seeding (Arthur and Vassilvitskii 2007) and Lloyd iterations.

    ``x`` (N, D) float. Returns ``centroids`` (k, D), ``assign`` (N,) long and the inertia
    (mean squared distance to the assigned centroid). Deterministic for a given ``seed``. A
    cluster that empties is re-seeded with the point farthest from its centroid. Stops early
    when no assignment changes.
    """
    x = x.float()
    n = len(x)
    if not 1 <= k <= n:
        raise ConfigError(f"k-means with {k} clusters needs 1 <= k <= {n} (the number of images)")
    g = torch.Generator().manual_seed(seed)
    centroids = torch.empty(k, x.shape[1])
    centroids[0] = x[torch.randint(n, (1,), generator=g)]
    d2 = _sq_dists(x, centroids[:1]).squeeze(1)
    for j in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than clusters: any point will do
            idx = torch.randint(n, (1,), generator=g)
        else:
            idx = torch.multinomial(d2 / total, 1, generator=g)
        centroids[j] = x[idx]
        d2 = torch.minimum(d2, _sq_dists(x, centroids[j:j + 1]).squeeze(1))
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        dist = _sq_dists(x, centroids)
        new = dist.argmin(1)
        counts = torch.bincount(new, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, new, x)
        empty = (counts == 0).nonzero().flatten()
        centroids = sums / counts.clamp_min(1)[:, None]
        if len(empty):
            far = dist.gather(1, new[:, None]).squeeze(1).argsort(descending=True)
            centroids[empty] = x[far[:len(empty)]]
            new = _sq_dists(x, centroids).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    dist = _sq_dists(x, centroids)
    assign = dist.argmin(1)
    inertia = float(dist.gather(1, assign[:, None]).mean())
    return centroids, assign, inertia


def cluster_features(encoder, images: Tensor, device: torch.device | str = "cpu",
                     batch_size: int = 512, desc: str = "cluster features") -> Tensor:
    """L2-normalised mean patch-token features (N, D) of uint8 images (N, C, H, W)."""
    from synrep.eval.features import extract_features

    def fn(x: Tensor) -> Tensor:
        return F.normalize(encoder.probe_features(x, "avg", 1), dim=1)

    return extract_features(fn, images, batch_size=batch_size, device=device, desc=desc)


def cluster_path(cfg: Config) -> Path:
    """The clusters file a MoCE run trains with: ``method.moce_cluster_file`` or RUN/cluster's."""
    if cfg.method.moce_cluster_file:
        return Path(cfg.method.moce_cluster_file)
    return cfg.run_dir / "cluster" / "clusters.safetensors"


def _feature_checkpoint(cfg: Config) -> Path:
    path = cfg.method.moce_features
    if not path:
        raise ConfigError(
            "the cluster stage needs method.moce_features: a checkpoint whose encoder features "
            "cluster the images (MoCE uses a pretrained MAE), e.g. "
            "method.moce_features=runs/mae_fashion/train/checkpoints/final.safetensors")
    if not Path(path).is_file():
        raise ConfigError(f"method.moce_features={path!r} does not exist; train an MAE first "
                          "(synrep run configs/mae_fashion.yaml) and pass its final checkpoint")
    return Path(path)


def _key(cfg: Config, shape: tuple[int, ...]) -> dict[str, Any]:
    ck = _feature_checkpoint(cfg)
    st = ck.stat()
    m = cfg.method
    return {"features": str(ck.resolve()), "features_size": st.st_size,
            "features_mtime_ns": st.st_mtime_ns, "clusters": m.moce_clusters,
            "iters": m.moce_kmeans_iters, "seed": cfg.run.seed, "shape": list(shape),
            "data": json.loads(cfg.to_json())["data"]}


def _source_images(cfg: Config) -> Tensor:
    """The training source's images: (N, C, H, W) or caption groups (G, k, C, H, W)."""
    from synrep.train.loop import build_source

    return build_source(cfg, "images", batch_size=1, each_image=True).images


def load_clusters(path: str | Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(centroids (K, D), assign, metadata) of a clusters file written by the cluster stage."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"no clusters at {str(path)!r}: run the cluster stage first (add `cluster` to "
            "run.stages, or `synrep cluster CONFIG`), or set method.moce_cluster_file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["synrep-clusters"])
            return f.get_tensor("centroids"), f.get_tensor("assign"), meta
    except (KeyError, json.JSONDecodeError, OSError) as e:
        raise DataError(f"{str(path)!r} is not a clusters file written by the cluster stage "
                        f"({type(e).__name__}: {e}); delete it and rerun the cluster stage") \
            from None
    except Exception as e:  # safetensors' own errors for truncated or foreign files
        raise DataError(f"{str(path)!r} cannot be read ({type(e).__name__}: {e}); delete it "
                        "and rerun the cluster stage") from None


def cluster_done(cfg: Config) -> bool:
    path = cfg.run_dir / "cluster" / "clusters.safetensors"
    if not path.is_file():
        return False
    try:
        _, _, meta = load_clusters(path)
    except DataError:
        return False
    key = meta.get("key", {})
    return key == _key(cfg, tuple(key.get("shape", ())))


def run_cluster(cfg: Config) -> Path:
    """Cluster the training source's images; write RUN/cluster/clusters.safetensors."""
    from synrep.eval.stage import load_encoder

    m = cfg.method
    if m.moce_clusters < 1:
        raise ConfigError(f"method.moce_clusters={m.moce_clusters} must be >= 1")
    ck = _feature_checkpoint(cfg)
    device = torch.device(cfg.run.device)
    try:
        encoder, other = load_encoder(ck, device, weights="student")
    except ConfigError as e:
        raise CheckpointError(f"method.moce_features={str(ck)!r}: {e}") from None
    if other.model.in_chans != cfg.model.in_chans:
        raise CheckpointError(
            f"method.moce_features={str(ck)!r} takes {other.model.in_chans}-channel images but "
            f"this run's data has {cfg.model.in_chans}")
    images = _source_images(cfg)
    lead = tuple(images.shape[:-3])
    flat = images.reshape(-1, *images.shape[-3:])
    size = other.model.img_size
    if flat.shape[-1] != size:
        flat = F.interpolate(flat.float(), size=(size, size), mode="bilinear",
                             antialias=True).round().clamp(0, 255).to(torch.uint8)
    with torch.inference_mode():
        feats = cluster_features(encoder, flat, device)
    tqdm.write(f"[cluster] k-means: {len(feats)} images, {m.moce_clusters} clusters")
    centroids, assign, inertia = kmeans(feats, m.moce_clusters, m.moce_kmeans_iters, cfg.run.seed)
    sizes = torch.bincount(assign, minlength=m.moce_clusters)
    out = cfg.run_dir / "cluster" / "clusters.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": _key(cfg, lead), "inertia": inertia, "feature_dim": int(feats.shape[1]),
            "feature_img_size": size, "sizes": sizes.tolist()}
    tmp = out.with_name(out.name + ".tmp")
    save_file({"centroids": centroids.contiguous(), "assign": assign.reshape(lead).contiguous(),
               "sizes": sizes}, str(tmp), metadata={"synrep-clusters": json.dumps(meta)})
    tmp.replace(out)
    print(f"[cluster] {out}: {m.moce_clusters} clusters of {len(feats)} images, sizes "
          f"{min(sizes.tolist())}..{max(sizes.tolist())}, inertia {inertia:.4f}")
    return out
