"""MoCE's own stages: ``cluster`` (k-means of the pretraining images in a pretrained MAE's
feature space, before training) and ``search`` (the downstream dataset's expert route, exported as
a dense ViT, after training). See :mod:`synrep.methods.moce` for the method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from synrep.checkpoint import Checkpoint
from synrep.cluster import kmeans, load_clusters, save_clusters
from synrep.config import Config
from synrep.errors import CheckpointError, ConfigError, DataError
from synrep.eval.features import extract_features
from synrep.eval.stage import load_split
from synrep.factory import build_source, check_input_channels, load_encoder
from synrep.layout import layout
from synrep.methods.moce import export_expert, load_moce, search_experts
from synrep.stages.base import Stage, register_stage
from synrep.utils import write_json_atomic


def _moce(cfg: Config, stage: str):
    """``method.moce``'s options, or a clear error for a run of another method."""
    if cfg.method.name != "moce":
        raise ConfigError(f"the {stage} stage is MoCE's; this run's method is "
                          f"{cfg.method.name!r} (set method.name=moce)")
    return cfg.method.moce


# -- cluster ---------------------------------------------------------------------------------


def cluster_features(encoder, images: Tensor, device: torch.device | str = "cpu",
                     batch_size: int = 512, desc: str = "cluster features") -> Tensor:
    """L2-normalised mean patch-token features (N, D) of uint8 images (N, C, H, W)."""
    def fn(x: Tensor) -> Tensor:
        return F.normalize(encoder.probe_features(x, "avg", 1), dim=1)

    return extract_features(fn, images, batch_size=batch_size, device=device, desc=desc)


def _feature_checkpoint(cfg: Config) -> Path:
    path = _moce(cfg, "cluster").features
    if not path:
        raise ConfigError(
            "the cluster stage needs method.moce.features: a checkpoint whose encoder features "
            "cluster the images (MoCE uses a pretrained MAE), e.g. "
            "method.moce.features=runs/mae_fashion/train/checkpoints/final.safetensors")
    if not Path(path).is_file():
        raise ConfigError(f"method.moce.features={path!r} does not exist; train an MAE first "
                          "(synrep run configs/mae_fashion.yaml) and pass its final checkpoint")
    return Path(path)


def _key(cfg: Config, shape: tuple[int, ...]) -> dict[str, Any]:
    ck = _feature_checkpoint(cfg)
    st = ck.stat()
    m = _moce(cfg, "cluster")
    return {"features": str(ck.resolve()), "features_size": st.st_size,
            "features_mtime_ns": st.st_mtime_ns, "clusters": m.clusters,
            "iters": m.kmeans_iters, "seed": cfg.run.seed, "shape": list(shape),
            "data": json.loads(cfg.to_json())["data"]}


def _source_images(cfg: Config) -> Tensor:
    """The training source's images: (N, C, H, W) or caption groups (G, k, C, H, W)."""
    return build_source(cfg, "images", batch_size=1, each_image=True).images


def cluster_done(cfg: Config) -> bool:
    path = layout(cfg).clusters
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
    m = _moce(cfg, "cluster")
    if m.clusters < 1:
        raise ConfigError(f"method.moce.clusters={m.clusters} must be >= 1")
    ck = _feature_checkpoint(cfg)
    device = torch.device(cfg.run.device)
    try:
        encoder, other = load_encoder(ck, device, weights="student")
    except ConfigError as e:
        raise CheckpointError(f"method.moce.features={str(ck)!r}: {e}") from None
    check_input_channels(other, cfg, f"method.moce.features={str(ck)!r}")
    images = _source_images(cfg)
    lead = tuple(images.shape[:-3])
    flat = images.reshape(-1, *images.shape[-3:])
    size = other.model.img_size
    if flat.shape[-1] != size:
        flat = F.interpolate(flat.float(), size=(size, size), mode="bilinear",
                             antialias=True).round().clamp(0, 255).to(torch.uint8)
    with torch.inference_mode():
        feats = cluster_features(encoder, flat, device)
    tqdm.write(f"[cluster] k-means: {len(feats)} images, {m.clusters} clusters")
    centroids, assign, inertia = kmeans(feats, m.clusters, m.kmeans_iters, cfg.run.seed)
    sizes = torch.bincount(assign, minlength=m.clusters)
    meta = {"key": _key(cfg, lead), "inertia": inertia, "feature_dim": int(feats.shape[1]),
            "feature_img_size": size, "sizes": sizes.tolist()}
    out = save_clusters(layout(cfg).clusters, centroids, assign.reshape(lead), meta)
    print(f"[cluster] {out}: {m.clusters} clusters of {len(feats)} images, sizes "
          f"{min(sizes.tolist())}..{max(sizes.tolist())}, inertia {inertia:.4f}")
    return out


# -- search ---------------------------------------------------------------------------------


def _search_key(cfg: Config, checkpoint: Path) -> dict[str, Any]:
    e = cfg.eval
    return {"checkpoint": str(checkpoint.resolve()), "mtime_ns": checkpoint.stat().st_mtime_ns,
            "rule": "route", "dataset": e.dataset, "split": e.train_split, "root": e.root,
            "classes": e.classes, "limit": e.limit_train}


def search_done(cfg: Config) -> bool:
    out, ck = layout(cfg).expert_checkpoint, layout(cfg).final_checkpoint
    if not out.is_file() or not ck.is_file():
        return False
    try:
        stored = Checkpoint(out).extra.get("moce_expert", {}).get("key")
    except CheckpointError:
        return False
    return stored == _search_key(cfg, ck)


def check_searchable(cfg: Config) -> None:
    """Expert search exports one expert per MoE block, a normal-size ViT that equals the MoCE
    model only when every image takes one expert per block (``method.moce.top_k=1``); with
    top-k > 1 the routed model mixes k experts and no single-expert ViT reproduces it."""
    if cfg.method.name != "moce":
        raise ConfigError(f"the search stage exports an expert of a MoCE model; this run's "
                          f"method is {cfg.method.name!r} (set method.name=moce)")
    if cfg.method.moce.top_k != 1:
        raise ConfigError(
            f"the search stage exports one expert per MoE block, which is the MoCE model only "
            f"with method.moce.top_k=1 (this run has {cfg.method.moce.top_k}: each image mixes "
            f"{cfg.method.moce.top_k} experts); train with method.moce.top_k=1, or drop search "
            "from run.stages and evaluate the MoCE checkpoint itself")


def run_search(cfg: Config) -> Path:
    """Expert search for ``eval.dataset``'s train split (``eval.classes``, ``eval.limit_train``):
    writes RUN/search/expert.safetensors (a dense MAE checkpoint) and RUN/search/search.json."""
    check_searchable(cfg)
    ck = layout(cfg).final_checkpoint
    if not ck.is_file():
        raise ConfigError(f"no trained MoCE checkpoint at {str(ck)!r}: run the train stage first")
    device = torch.device(cfg.run.device)
    model = load_moce(ck, device)
    check_searchable(model.cfg)  # the checkpoint's own routing, whatever this config says
    feat_path = model.cfg.method.moce.features
    if not feat_path or not Path(feat_path).is_file():
        raise ConfigError(
            f"expert search embeds the downstream images with the clustering model "
            f"method.moce.features={feat_path!r}, which does not exist; keep that checkpoint")
    featurer, fcfg = load_encoder(feat_path, device, weights="student")
    ds = load_split(cfg.eval, cfg.eval.train_split, fcfg.model.img_size)
    with torch.inference_mode():
        feats = cluster_features(featurer, ds.images, device, desc="search features")
    found = search_experts(model, feats)
    key = _search_key(cfg, ck)
    out = export_expert(model, found.chosen, layout(cfg).expert_checkpoint,
                        extra={"key": key, "source": str(ck)})
    report = {"dataset": ds.name, "images": len(ds), "chosen": found.chosen,
              "blocks": model.moe_indices, "counts": found.counts.tolist(),
              "route_share": found.route_share,
              "cluster_hist": found.cluster_hist.tolist(), "checkpoint": str(out),
              "key": key}
    write_json_atomic(layout(cfg).search_report, report)
    print(f"[search] {ds.name}: {len(ds)} images -> experts {found.chosen} of blocks "
          f"{model.moe_indices}; dense ViT at {out}")
    return out


register_stage(Stage(
    "cluster", run_cluster, cluster_done, order=50,
    help="k-means of the pretraining images (MoCE) -> RUN/cluster"))
register_stage(Stage(
    "search", run_search, search_done, order=70, needs=("train",), check=check_searchable,
    help="MoCE expert search for eval.dataset -> RUN/search/expert.safetensors"))
