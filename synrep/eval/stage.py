"""The evaluation stage: frozen features of a checkpoint's encoder, then the configured protocols.

Features of the train and test splits are computed once, cached in ``RUN/eval/features_*.npz``, and
fed to every protocol: L-BFGS logistic regression with C chosen on a validation split (SynCLR's
fine-grained protocol), a grid of SGD linear heads trained in one pass (DINOv2), and weighted kNN
(DINO). Results go to ``RUN/eval/results.json`` as ``{dataset: {protocol_top1: percent}}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from synrep.config import Config, EvalConfig, config_from_dict
from synrep.data.datasets import load_dataset
from synrep.errors import ConfigError
from synrep.eval.features import extract_features, load_features, save_features
from synrep.eval.knn import knn_classify
from synrep.eval.linear import lbfgs_probe, sgd_probe_grid
from synrep.models import Encoder, build_encoder
from synrep.train.checkpoint import Checkpoint
from synrep.utils import ensure_writable_dir, write_json_atomic

PROTOCOLS = ("linear", "sgd", "knn")
#: The results.json key each protocol's top-1 accuracy is written under.
TOP1_KEYS = {"linear": "linear_probe_top1", "sgd": "sgd_probe_top1", "knn": "knn_top1"}


def load_encoder(path: str | Path, device: str | torch.device = "cpu",
                 weights: str = "teacher") -> tuple[Encoder, Config]:
    """The encoder in a synrep checkpoint (eval mode) and the config it was trained with.

    ``weights="teacher"`` takes the EMA teacher's encoder when the checkpoint has one (as DINO
    and iBOT evaluate), else the student's; ``"student"`` always takes the student's.
    """
    if weights not in ("teacher", "student"):
        raise ConfigError(f"eval.weights={weights!r}: choose teacher or student")
    ck = Checkpoint(path)
    cfg = config_from_dict(ck.config, f"checkpoint {str(path)!r}")
    encoder = build_encoder(cfg.model)
    has_teacher = any(k.startswith("teacher.encoder.") for k in ck.model_state)
    prefix = "teacher.encoder." if weights == "teacher" and has_teacher else "encoder."
    state = ck.submodule_state(prefix)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(
            f"checkpoint {str(path)!r}: encoder weights do not fit its own config: "
            f"{str(e).splitlines()[0]}"
        ) from None
    return encoder.to(device).eval(), cfg


def embed_split(
    encoder: Encoder,
    ecfg: EvalConfig,
    split: str,
    image_size: int,
    device: str | torch.device = "cpu",
    dataset: str | None = None,
    root: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe features (N, D) and labels (N,) of one split of the evaluation dataset."""
    ds = load_dataset(
        dataset or ecfg.dataset,
        split,
        root=root if root is not None else ecfg.root,
        image_size=ecfg.image_size or image_size,
    )
    limit = ecfg.limit_test if split == ecfg.test_split else ecfg.limit_train
    if limit is not None and limit < len(ds):
        g = torch.Generator().manual_seed(0)
        ds = ds.subset(torch.randperm(len(ds), generator=g)[:limit].sort().values)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return encoder.probe_features(x, ecfg.pool, ecfg.n_last_blocks)

    feats = extract_features(
        fn, ds.images, batch_size=ecfg.batch_size, device=device, desc=f"features {ds.name}/{split}"
    )
    return feats, ds.labels


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path) -> dict[str, Any]:
    """Run ``cfg.eval``'s protocols on the encoder in ``checkpoint``; write results.json."""
    ecfg = cfg.eval
    unknown = [p for p in ecfg.protocols if p not in PROTOCOLS]
    if unknown:
        raise ConfigError(f"eval.protocols: unknown {unknown}; choose from {list(PROTOCOLS)}")
    out_dir = ensure_writable_dir(cfg.run_dir / "eval", "run.dir")
    device = torch.device(cfg.run.device)
    encoder, _ = load_encoder(checkpoint, device, ecfg.weights)
    t0 = time.perf_counter()
    feats = {}
    for split in (ecfg.train_split, ecfg.test_split):
        cache = out_dir / f"features_{ecfg.dataset.replace(':', '_')}_{split}.npz"
        stamp = out_dir / (cache.name + ".source")
        key = json.dumps(
            {
                "checkpoint": str(Path(checkpoint).resolve()),
                "mtime": Path(checkpoint).stat().st_mtime_ns,
                "pool": ecfg.pool,
                "n_last_blocks": ecfg.n_last_blocks,
                "weights": ecfg.weights,
                "root": ecfg.root,
                "image_size": ecfg.image_size,
                "limit": [ecfg.limit_train, ecfg.limit_test],
            }
        )
        if cache.exists() and stamp.exists() and stamp.read_text() == key:
            feats[split] = load_features(cache)
        else:
            feats[split] = embed_split(encoder, ecfg, split, cfg.model.img_size, device)
            save_features(cache, *feats[split])
            stamp.write_text(key)
    (xtr, ytr), (xte, yte) = feats[ecfg.train_split], feats[ecfg.test_split]
    t_feat = time.perf_counter() - t0

    # name -> (probe call, {result key: key in the probe's output})
    seed, vf = cfg.run.seed, ecfg.val_fraction
    protocols = {
        "linear": (lambda: lbfgs_probe(xtr, ytr, xte, yte, cs=ecfg.linear_cs, val_fraction=vf,
                                       seed=seed, max_iter=ecfg.linear_max_iter, device=device),
                   {TOP1_KEYS["linear"]: "top1", "linear_probe_best_c": "best_c"}),
        "sgd": (lambda: sgd_probe_grid(xtr, ytr, xte, yte, lrs=ecfg.sgd_lrs,
                                       epochs=ecfg.sgd_epochs, val_fraction=vf, seed=seed,
                                       device=device),
                {TOP1_KEYS["sgd"]: "top1", "sgd_probe_best_lr": "best_lr"}),
        "knn": (lambda: knn_classify(xtr, ytr, xte, yte, k=ecfg.knn_k,
                                     temperature=ecfg.knn_temperature, device=device),
                {TOP1_KEYS["knn"]: "top1"}),
    }
    res: dict[str, Any] = {}
    timings = {"features_s": round(t_feat, 1)}
    for name in ecfg.protocols:
        call, keys = protocols[name]
        t = time.perf_counter()
        out = call()
        res.update({key: out[src] for key, src in keys.items()})
        timings[f"{name}_s"] = round(time.perf_counter() - t, 1)
    res["feature_dim"] = int(xtr.shape[1])
    res["checkpoint"] = str(checkpoint)
    res["protocol"] = {"pool": ecfg.pool, "n_last_blocks": ecfg.n_last_blocks,
                       "weights": ecfg.weights}
    res["timings"] = timings
    results = {ecfg.dataset: res}
    path = out_dir / "results.json"
    # Keep other datasets' results already in the file.
    if path.exists():
        try:
            old = json.loads(path.read_text())
            old.update(results)
            results = old
        except json.JSONDecodeError:
            pass
    write_json_atomic(path, results)
    return results
