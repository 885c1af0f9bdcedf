"""k-means clusters of image features, and the clusters file MoCE trains with.

MoCE (docs/methods.md section 6, step 1) clusters the pretraining images with the features of a
pretrained MAE and keeps the centroids: each image's cluster centroid is the gate input of the
cluster-conditional experts, and expert search later assigns a downstream dataset's images to the
same centroids. The ``cluster`` stage that writes the file is in :mod:`synrep.stages.moce`.

A clusters file (``RUN/cluster/clusters.safetensors``) holds ``centroids`` (K, D), ``assign`` (N,)
(the cluster of each training image, in the order of the training source: caption-group shards are
flattened, every image a sample, as MAE-family methods train on them) and ``sizes`` (K,); its
metadata records the feature checkpoint, the data config and the k-means settings, so training
refuses clusters made from other data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from synrep.errors import ConfigError, DataError
from synrep.utils import atomic_output, json_dumps

__all__ = ["kmeans", "load_clusters", "nearest", "save_clusters"]


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


def load_clusters(path: str | Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(centroids (K, D), assign, metadata) of a clusters file written by the cluster stage."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"no clusters at {str(path)!r}: run the cluster stage first (add `cluster` to "
            "run.stages, or `synrep cluster CONFIG`), or set method.moce.cluster_file")
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


def save_clusters(path: str | Path, centroids: Tensor, assign: Tensor,
                  meta: dict[str, Any]) -> Path:
    """Write a clusters file atomically: ``centroids`` (K, D), ``assign`` (any shape) of cluster
    ids, their ``sizes`` (K,), and ``meta`` as JSON metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = torch.bincount(assign.flatten(), minlength=len(centroids))
    data = save({"centroids": centroids.contiguous(), "assign": assign.contiguous(),
                 "sizes": sizes}, metadata={"synrep-clusters": json_dumps(meta, path)})
    with atomic_output(path) as f:
        f.write(data)
    return path
