"""The evaluation stage: frozen features of a checkpoint's encoder, then the configured protocols.

Features of the train and test splits are computed once, cached in ``RUN/eval/features_*.npz``, and
fed to every frozen-feature protocol (docs/methods.md section 1): L-BFGS logistic regression with C
chosen on a validation split (SynCLR's fine-grained protocol), a grid of SGD linear heads over
learning rates x poolings trained in one pass (DINOv2), weighted kNN (DINO), few-shot logistic
regression (mean and spread over seeded draws) and, for checkpoints with a text tower, zero-shot
classification (CLIP). ``finetune`` trains the whole encoder with layer-wise lr decay (opt-in). PCA
maps of patch features are drawn for a few test images. Results go to ``RUN/eval/results.json`` as
``{dataset: {key: value}}``; keys ending in ``_top1`` are top-1 accuracies in percent.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from synrep.checkpoint import Checkpoint
from synrep.concepts.fashion import CLASS_NAMES
from synrep.config import Config, EvalConfig, config_from_dict
from synrep.data.datasets import load_dataset
from synrep.data.sources import LazyImages
from synrep.errors import ConfigError
from synrep.eval.features import extract_features, load_features, save_features
from synrep.eval.fewshot import fewshot_probe
from synrep.eval.finetune import finetune as run_finetune
from synrep.eval.knn import knn_classify
from synrep.eval.linear import lbfgs_probe, pool_columns, sgd_probe_grid
from synrep.eval.pca import pca_maps, save_pca_figure
from synrep.eval.zeroshot import FASHION_TEMPLATES, class_embeddings, zero_shot_classify
from synrep.factory import checkpoint_config, load_encoder, load_external, load_method
from synrep.layout import layout
from synrep.methods import METHODS
from synrep.models import Encoder
from synrep.tracking import open_tracker, scalars_of
from synrep.utils import ensure_writable_dir, write_json_atomic

PROTOCOLS = ("linear", "sgd", "knn", "fewshot", "zeroshot", "finetune")
#: The results.json key that shows a protocol has run (zero-shot: or was skipped, see "skipped").
DONE_KEYS = {"linear": "linear_probe_top1", "sgd": "sgd_probe_top1", "knn": "knn_top1",
             "fewshot": "fewshot", "zeroshot": "zeroshot_top1", "finetune": "finetune_top1"}


def load_split(ecfg: EvalConfig, split: str, image_size: int, dataset: str | None = None,
                root: str | None = None):
    """One split of the evaluation dataset, cut to ``eval.limit_*`` images by a seeded draw."""
    ds = load_dataset(
        dataset or ecfg.dataset,
        split,
        root=root if root is not None else ecfg.root,
        image_size=ecfg.image_size or image_size,
    )
    if ecfg.classes is not None:
        ds = ds.select_classes(ecfg.classes)
    limit = ecfg.limit_test if split == ecfg.test_split else ecfg.limit_train
    if limit is not None and limit < len(ds):
        g = torch.Generator().manual_seed(0)
        ds = ds.subset(torch.randperm(len(ds), generator=g)[:limit].sort().values)
    return ds


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
    ds = load_split(ecfg, split, image_size, dataset, root)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return encoder.probe_features(x, ecfg.pool, ecfg.n_last_blocks)

    feats = extract_features(
        fn, ds.images, batch_size=ecfg.batch_size, device=device,
        desc=f"features {ds.name}/{split}", workers=ecfg.workers,
    )
    return feats, ds.labels


def _prompt_names(ecfg: EvalConfig, classes: list[str]) -> list[str]:
    """The class names zero-shot prompts use: ``eval.zeroshot_classnames``, else Fashion-MNIST's
    prompt names (the words the caption grammar writes), else the dataset's own class names."""
    if ecfg.zeroshot_classnames:
        if len(ecfg.zeroshot_classnames) != len(classes):
            raise ConfigError(
                f"eval.zeroshot_classnames has {len(ecfg.zeroshot_classnames)} names but the "
                f"evaluated set has {len(classes)} classes ({', '.join(classes)})")
        return list(ecfg.zeroshot_classnames)
    if ecfg.dataset == "fashion-mnist":
        return [CLASS_NAMES[c] for c in (ecfg.classes or range(len(CLASS_NAMES)))]
    return list(classes)


def results_key(ecfg: EvalConfig) -> str:
    """The results.json key of an evaluation: the dataset, with ``[labels]`` when
    ``eval.classes`` restricts it (e.g. ``fashion-mnist[5,7,8,9]``)."""
    if ecfg.classes is None:
        return ecfg.dataset
    return f"{ecfg.dataset}[{','.join(map(str, ecfg.classes))}]"


def eval_settings(ecfg: EvalConfig) -> dict[str, Any]:
    """Everything in ``eval`` that changes a result (all but the list of protocols): stored
    with the results, so a finished evaluation is reused only when made the same way."""
    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(ecfg))).items()
            if k != "protocols"}


def protocol_done(entry: dict[str, Any], protocol: str) -> bool:
    """Whether ``entry`` (one dataset of results.json) holds ``protocol``'s result."""
    return DONE_KEYS[protocol] in entry or protocol in entry.get("skipped", {})


def _load_text_model(checkpoint: str | Path, device: torch.device) -> Any | None:
    """The checkpoint's whole method when it trained a text tower (for zero-shot), else None."""
    cfg = config_from_dict(Checkpoint(checkpoint).config, f"checkpoint {str(checkpoint)!r}")
    if cfg.method.name not in METHODS:
        return None
    method, _ = load_method(checkpoint, device)
    return method if method.has_text_tower else None


def _trained_with(cfg: Config, checkpoint: str | Path) -> dict[str, Any]:
    """How the evaluated checkpoint was trained, for results.json: the recipe's compute settings
    from its config, and the precision and kernels the trainer ran with (RUN/train/env.json)."""
    ck_cfg = checkpoint_config(Checkpoint(checkpoint))
    out: dict[str, Any] = {"method": ck_cfg.method.name, "backbone": ck_cfg.model.backbone,
                           "steps": ck_cfg.train.steps, "batch_size": ck_cfg.train.batch_size,
                           "patch_drop": ck_cfg.model.patch_drop}
    env = layout(cfg).train_env
    if env.is_file() and Path(checkpoint).resolve().parent.parent == env.parent.resolve():
        try:
            data = json.loads(env.read_text())
        except ValueError:
            data = {}
        out.update({k: data[k] for k in ("precision", "attention", "kernels", "device")
                    if k in data})
    return out


def _input_size(cfg: Config, encoder: Encoder) -> int:
    """The image size evaluation feeds the encoder: an external model's own input size, else
    the size the run trains at (``eval.image_size``, when set, resizes the data before this)."""
    return int(getattr(encoder, "input_size", 0) or cfg.model.img_size)


def _weights_file(ecfg: EvalConfig, checkpoint: str | Path) -> Path:
    """The file whose change makes cached features stale: the checkpoint, or the external
    model's weights (``eval.weights`` for ``timm:``, ``model.safetensors`` of a folder)."""
    if ecfg.model.startswith("local-dir:"):
        folder = Path(ecfg.model[len("local-dir:"):])
        found = [folder / n for n in ("model.safetensors", "pytorch_model.bin")
                 if (folder / n).is_file()]
        return found[0] if found else folder / "config.json"
    if ecfg.model.startswith("open_clip:local-dir:"):
        folder = Path(ecfg.model[len("open_clip:local-dir:"):])
        found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        return found[0] if found else folder / "open_clip_config.json"
    if ecfg.model.startswith(("timm:", "open_clip:")):
        return Path(ecfg.weights)
    return Path(checkpoint)


def _cached_features(cfg: Config, encoder: Encoder, checkpoint: str | Path,
                     device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train and test features, from RUN/eval's cache when it was made the same way."""
    ecfg = cfg.eval
    feats = {}
    for split in (ecfg.train_split, ecfg.test_split):
        cache = layout(cfg).features_cache(results_key(ecfg), split)
        stamp = cache.with_name(cache.name + ".source")
        source = _weights_file(ecfg, checkpoint)
        key = json.dumps(
            {
                "checkpoint": str(Path(checkpoint).resolve()) if not ecfg.model else ecfg.model,
                "mtime": source.stat().st_mtime_ns,
                "pool": ecfg.pool,
                "n_last_blocks": ecfg.n_last_blocks,
                "weights": ecfg.weights,
                "root": ecfg.root,
                "image_size": ecfg.image_size,
                "limit": [ecfg.limit_train, ecfg.limit_test],
                "classes": ecfg.classes,
            }
        )
        if cache.exists() and stamp.exists() and stamp.read_text() == key:
            feats[split] = load_features(cache)
        else:
            feats[split] = embed_split(encoder, ecfg, split, _input_size(cfg, encoder), device)
            save_features(cache, *feats[split])
            stamp.write_text(key)
    return feats


def _pca_figure(cfg: Config, encoder: Encoder, device: torch.device) -> str | None:
    """PCA maps of ``eval.pca_images`` test images (spread over the classes) -> ``pca.png``."""

    n = cfg.eval.pca_images
    if n <= 0 or not encoder.is_vit:
        return None
    ecfg = cfg.eval
    ds = load_dataset(ecfg.dataset, ecfg.test_split, root=ecfg.root,
                      image_size=ecfg.image_size or _input_size(cfg, encoder))
    # Round-robin over the classes, first images of each: the same images for every checkpoint.
    by_class = [torch.nonzero(ds.labels == c).flatten() for c in torch.unique(ds.labels)]
    picks = [int(idx[i]) for i in range(n) for idx in by_class if i < len(idx)][:n]
    images = ds.images[picks]
    if isinstance(images, LazyImages):
        images = images.load()
    path = layout(cfg).pca
    save_pca_figure(images, pca_maps(encoder, images, device=device), path)
    return path.name


def check_eval(cfg: Config) -> None:
    """The eval stage's checks that need no write."""
    unknown = [p for p in cfg.eval.protocols if p not in PROTOCOLS]
    if unknown:
        raise ConfigError(f"eval.protocols: unknown {unknown}; choose from {list(PROTOCOLS)}")


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path) -> dict[str, Any]:
    """Run ``cfg.eval``'s protocols on the encoder in ``checkpoint``; write results.json."""
    ecfg = cfg.eval
    check_eval(cfg)
    ensure_writable_dir(layout(cfg).eval, "run.dir")
    device = torch.device(cfg.run.device)
    external_clip = None
    if ecfg.model:  # any image model: a timm or open_clip model with its weights, or a folder
        encoder, external_clip = load_external(ecfg.model, ecfg.weights, device)
        checkpoint = ecfg.model
    else:
        encoder, _ = load_encoder(checkpoint, device, ecfg.weights)
    size = _input_size(cfg, encoder)
    seed, vf = cfg.run.seed, ecfg.val_fraction
    res: dict[str, Any] = {}
    timings: dict[str, float] = {}
    skipped: dict[str, str] = {}

    frozen = [p for p in ecfg.protocols if p not in ("zeroshot", "finetune")]
    xtr = ytr = xte = yte = None
    if frozen:
        t0 = time.perf_counter()
        feats = _cached_features(cfg, encoder, checkpoint, device)
        (xtr, ytr), (xte, yte) = feats[ecfg.train_split], feats[ecfg.test_split]
        timings["features_s"] = round(time.perf_counter() - t0, 1)
        res["feature_dim"] = int(xtr.shape[1])

    def linear() -> dict[str, Any]:
        out = lbfgs_probe(xtr, ytr, xte, yte, cs=ecfg.linear_cs, val_fraction=vf, seed=seed,
                          max_iter=ecfg.linear_max_iter, device=device)
        return {"linear_probe_top1": out["top1"], "linear_probe_best_c": out["best_c"]}

    def sgd() -> dict[str, Any]:
        pools = None
        if encoder.is_vit:
            pools = pool_columns(ecfg.pool, ecfg.n_last_blocks, encoder.embed_dim)
        out = sgd_probe_grid(xtr, ytr, xte, yte, lrs=ecfg.sgd_lrs, pools=pools,
                             epochs=ecfg.sgd_epochs, val_fraction=vf, seed=seed, device=device)
        r = {"sgd_probe_top1": out["top1"], "sgd_probe_best_lr": out["best_lr"]}
        if "best_pool" in out:
            r["sgd_probe_best_pool"] = out["best_pool"]
        return r

    def knn() -> dict[str, Any]:
        out = knn_classify(xtr, ytr, xte, yte, k=ecfg.knn_k, temperature=ecfg.knn_temperature,
                           device=device)
        return {"knn_top1": out["top1"]}

    def fewshot() -> dict[str, Any]:
        out = fewshot_probe(xtr, ytr, xte, yte, shots=ecfg.fewshot_shots,
                            seeds=range(seed, seed + ecfg.fewshot_seeds), c=ecfg.fewshot_c,
                            device=device)
        r: dict[str, Any] = {f"fewshot_{n}shot_top1": v["mean"] for n, v in out.items()}
        r["fewshot"] = out
        return r

    def zeroshot() -> dict[str, Any]:
        model = external_clip if ecfg.model else _load_text_model(checkpoint, device)
        if model is None:
            skipped["zeroshot"] = (f"{ecfg.model} has no text tower" if ecfg.model
                                   else "the checkpoint has no text tower")
            return {}
        ds = load_split(ecfg, ecfg.test_split, size)
        img = extract_features(model.encode_image, ds.images, batch_size=ecfg.batch_size,
                               device=device, desc="image embeddings")
        with torch.inference_mode():
            cls = class_embeddings(model.encode_text, _prompt_names(ecfg, ds.classes),
                                   ecfg.zeroshot_templates or FASHION_TEMPLATES)
        return {"zeroshot_top1": zero_shot_classify(img, cls.cpu(), ds.labels)["top1"]}

    def finetune() -> dict[str, Any]:
        out = run_finetune(
            encoder, load_split(ecfg, ecfg.train_split, size),
            load_split(ecfg, ecfg.test_split, size),
            epochs=ecfg.finetune_epochs, batch_size=ecfg.finetune_batch_size, lr=ecfg.finetune_lr,
            layer_decay=ecfg.finetune_layer_decay, weight_decay=ecfg.finetune_weight_decay,
            warmup_epochs=ecfg.finetune_warmup_epochs,
            label_smoothing=ecfg.finetune_label_smoothing, seed=seed, device=device)
        return {"finetune_top1": out["top1"], "finetune_train_loss": out["train_loss"]}

    protocols = {"linear": linear, "sgd": sgd, "knn": knn, "fewshot": fewshot,
                 "zeroshot": zeroshot, "finetune": finetune}
    for name in ecfg.protocols:
        t = time.perf_counter()
        res.update(protocols[name]())
        timings[f"{name}_s"] = round(time.perf_counter() - t, 1)
    if ecfg.pca_images > 0:
        t = time.perf_counter()
        pca = _pca_figure(cfg, encoder, device)
        if pca is not None:
            res["pca_maps"] = pca
            timings["pca_s"] = round(time.perf_counter() - t, 1)
    if skipped:
        res["skipped"] = skipped
    res["checkpoint"] = str(checkpoint)
    if not ecfg.model:  # which training step was evaluated: an extended run is evaluated again
        res["checkpoint_step"] = Checkpoint(checkpoint).step
        res["trained_with"] = _trained_with(cfg, checkpoint)
    res["protocol"] = {"pool": ecfg.pool, "n_last_blocks": ecfg.n_last_blocks,
                       "weights": ecfg.weights}
    res["timings"] = timings
    res["settings"] = eval_settings(ecfg)
    results = {results_key(ecfg): res}
    path = layout(cfg).results
    # Keep other datasets' results already in the file.
    if path.exists():
        try:
            old = json.loads(path.read_text())
            old.update(results)
            results = old
        except json.JSONDecodeError:
            pass
    write_json_atomic(path, results)
    tracker = open_tracker(cfg, "eval")
    try:
        tracker.log(scalars_of(res, f"eval/{results_key(ecfg)}"), res.get("checkpoint_step", 0))
    finally:
        tracker.close()
    return results
