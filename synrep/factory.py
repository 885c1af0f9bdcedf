"""Factories: build a method, a training source and an optimizer from a config, and load any
model from any synrep checkpoint. The trainer, selection, evaluation, stages and benchmarks all
build through these functions, so each is written once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from synrep import dist
from synrep.captions.stage import read_rewrites
from synrep.checkpoint import Checkpoint
from synrep.config import Config, config_from_dict
from synrep.data.datasets import load_dataset, resize_center_crop
from synrep.data.index import resolve_shards
from synrep.data.shards import GroupArray, load_groups, marker_path
from synrep.data.sources import (
    ArraySource,
    FolderStore,
    LazyImages,
    MixtureSource,
    Planner,
    ShardStore,
    Source,
    group_texts,
    mixture_counts,
)
from synrep.errors import CheckpointError, ConfigError
from synrep.layout import layout
from synrep.methods import METHODS, Method
from synrep.models import Encoder, build_encoder
from synrep.models.backbones import PatchProjection
from synrep.utils import derive_seed


def shards_dir(cfg: Config, after_select: bool = True) -> str:
    """The caption-group shards a run trains on: ``data.shards``, else the ``select`` stage's
    output when the run has that stage (``after_select``), else the images stage's output."""
    if cfg.data.shards:
        return cfg.data.shards
    if after_select and "select" in cfg.run.stages:
        shards = layout(cfg).selected_shards
        if not shards.is_dir():
            raise ConfigError(f"no selected shards at {str(shards)!r}: run the select stage "
                              "first, or set data.shards=<folder of shards>")
        return str(shards)
    shards = str(layout(cfg).images)
    if not Path(shards).is_dir():
        raise ConfigError(
            f"data.source=shards: no images at {shards!r}; run the images stage first "
            "(add it to run.stages) or set data.shards=<folder of shards>")
    return shards


def pool_groups(cfg: Config, after_select: bool = True) -> tuple[str, GroupArray]:
    """(shard folder, :class:`~synrep.data.shards.GroupArray`) of the first
    ``data.max_captions`` caption groups of :func:`shards_dir`."""
    d = cfg.data
    for key in ("max_captions", "max_images_per_caption"):
        if getattr(d, key) is not None and getattr(d, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1 or null, got {getattr(d, key)}")
    shards = shards_dir(cfg, after_select)
    groups = load_groups(shards, max_groups=d.max_captions)
    if d.max_captions is not None and len(groups) < d.max_captions:
        raise ConfigError(
            f"data.max_captions={d.max_captions} but {shards!r} holds only {len(groups)} "
            "caption groups; render more images or lower it")
    return shards, groups


def _class_mask(labels: torch.Tensor, classes: list[int], where: str) -> torch.Tensor:
    """Boolean mask of the samples whose label is in ``data.classes`` (an error if none are)."""
    keep = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
    if not keep.any():
        raise ConfigError(f"data.classes={classes}: {where} has no samples with these labels "
                          f"(its labels are {sorted(set(labels.tolist()))[:20]})")
    return keep


#: ``data.loader=auto`` holds a training set in RAM up to this many bytes of decoded images.
MEMORY_LOADER_BYTES = 512 * 2**20


def build_source(cfg: Config, batch_kind: str, batch_size: int | None = None,
                 texts: bool = False, each_image: bool = False) -> Source:
    """The training batches described by ``cfg.data`` (``batch_size`` overrides
    ``train.batch_size``, for the super-batches of online selection; ``texts`` adds each caption
    group's caption, or a LaCLIP rewrite of it, to every batch for text-tower methods;
    ``each_image`` makes every image of a caption group its own sample, for methods that learn
    from single images). ``data.loader`` chooses RAM or streaming; both give the same batches."""
    d = cfg.data
    bs = batch_size or cfg.train.batch_size
    if d.source == "dataset":
        if batch_kind == "groups" or texts:
            raise ConfigError(f"method {cfg.method.name!r} trains on caption groups"
                              f"{' and their captions' if texts else ''}: set data.source=shards")
        if d.dataset == "imagefolder" and d.loader == "stream":
            return _stream_folder(cfg, bs)
        ds = load_dataset(d.dataset, d.split, root=d.root, image_size=d.image_size)
        images, labels = ds.images, ds.labels
        if isinstance(images, LazyImages):  # data.loader=memory: decode it all once
            images = images.load()
        if d.classes is not None:
            keep = _class_mask(labels, d.classes, f"{d.dataset}/{d.split}")
            images, labels = images[keep], labels[keep]
        return ArraySource(images, labels, bs, cfg.run.seed, dist.rank(), dist.world_size())
    if d.source == "mixture":
        return _mixture(cfg, batch_kind, bs, texts)
    if d.source == "webdataset":
        if batch_kind == "groups":
            raise ConfigError(
                f"method {cfg.method.name!r} trains on caption groups, and plain WebDataset "
                "shards hold one image a key: use data.source=shards (synrep's caption groups)")
        return _stream_shards(cfg, bs, "plain", texts, each_image=False)
    if _loader(cfg) == "stream":
        return _stream_shards(cfg, bs, "groups", texts, each_image and batch_kind != "groups",
                              m=cfg.method.options.images_per_caption
                              if batch_kind == "groups" else 1)
    return _memory_groups(cfg, batch_kind, bs, texts, each_image)


def _loader(cfg: Config) -> str:
    """``data.loader`` resolved for caption-group shards: ``auto`` holds up to
    :data:`MEMORY_LOADER_BYTES` of decoded images in RAM."""
    d = cfg.data
    if d.loader != "auto":
        return d.loader
    store = ShardStore(resolve_shards(shards_dir(cfg), complete_only=True), "groups",
                       image_size=d.image_size, max_images=d.max_images_per_caption)
    n = len(store) if d.max_captions is None else min(len(store), d.max_captions)
    one = store.fetch(torch.tensor([0]), None, None, 0)["images"]  # (1, k, C, H, W)
    return "memory" if n * one[0].numel() <= MEMORY_LOADER_BYTES else "stream"


def _memory_groups(cfg: Config, batch_kind: str, bs: int, texts: bool,
                   each_image: bool) -> Source:
    d = cfg.data
    opts = cfg.method.options
    captions = None
    shards, groups = pool_groups(cfg)
    images = groups.images  # (G, k, C, H, W)
    if d.image_size is not None and images.shape[-1] != d.image_size:
        g, k = images.shape[:2]
        images = resize_center_crop(images.flatten(0, 1), d.image_size).unflatten(0, (g, k))
    if d.max_images_per_caption is not None:
        if images.shape[1] < d.max_images_per_caption:
            raise ConfigError(
                f"data.max_images_per_caption={d.max_images_per_caption} but {shards!r} has "
                f"{images.shape[1]} images per caption")
        images = images[:, : d.max_images_per_caption]
    labels = None
    if all("label" in meta for meta in groups.metas):
        labels = torch.tensor([int(meta["label"]) for meta in groups.metas])
    if texts:  # language supervision: each group's caption, with its LaCLIP rewrites
        use = getattr(opts, "rewrites", False)  # LaCLIP (text-tower methods' option)
        rewrites = read_rewrites(layout(cfg).rewrites) if use else None
        captions = group_texts(groups.captions, groups.keys, groups.metas, rewrites,
                               repr(shards))
    if d.classes is not None:
        if labels is None:
            raise ConfigError(
                f"data.classes={d.classes} needs a label in every caption group's metadata, "
                f"but {shards!r} has groups without one; remove data.classes")
        keep = _class_mask(labels, d.classes, shards)
        images, labels = images[keep], labels[keep]
        if captions is not None:
            captions = [c for c, k in zip(captions, keep.tolist()) if k]
    m = opts.images_per_caption if batch_kind == "groups" else 1
    if each_image and batch_kind != "groups":  # (G, k, ...) -> G * k single images
        k = images.shape[1]
        images = images.flatten(0, 1)
        labels = labels.repeat_interleave(k) if labels is not None else None
        captions = [c for c in captions for _ in range(k)] if captions is not None else None
        m = None
    return ArraySource(images, labels, bs, cfg.run.seed, dist.rank(), dist.world_size(),
                       images_per_group=m, texts=captions)


def _shard_store(cfg: Config, paths: list[Path], kind: str, channels: int | None,
                 seed: int) -> ShardStore:
    """A :class:`ShardStore` with ``cfg.data``'s size, crop and image limit."""
    d = cfg.data
    return ShardStore(paths, kind, image_size=d.image_size, channels=channels, crop=d.crop,
                      scale=tuple(cfg.aug.scale), ratio=tuple(cfg.aug.ratio), seed=seed,
                      max_images=d.max_images_per_caption if kind == "groups" else None)


def _stream_shards(cfg: Config, bs: int, kind: str, texts: bool, each_image: bool,
                   m: int | None = None) -> Source:
    """A streaming source over caption-group (``kind`` groups) or plain shards."""
    d = cfg.data
    where = shards_dir(cfg) if kind == "groups" else d.shards
    store = _shard_store(cfg, resolve_shards(where, complete_only=kind == "groups"), kind,
                         cfg.model.in_chans if kind == "plain" else None, cfg.run.seed)
    n = len(store)
    if kind == "groups" and d.max_captions is not None:
        if n < d.max_captions:
            raise ConfigError(f"data.max_captions={d.max_captions} but {where!r} holds only {n} "
                              "caption groups; render more images or lower it")
        n = d.max_captions
    ids = np.arange(n)
    if d.classes is not None:
        if store.labels is None:
            raise ConfigError(f"data.classes={d.classes} needs a label for every sample, but "
                              f"{where!r} has samples without one; remove data.classes")
        ids = ids[_class_mask(store.labels[:n], d.classes, str(where)).numpy()]
    if len(ids) != len(store):
        store.keep(ids)
    counts = None
    if texts:
        use = getattr(cfg.method.options, "rewrites", False)
        counts = store.with_texts(read_rewrites(layout(cfg).rewrites) if use else None)
    if each_image:
        store.each_image()
        if counts is not None:
            counts = counts.repeat_interleave(store.k)
        m = None
    k = store.k if kind == "groups" and not each_image else None
    if k is None:
        m = None
    return Source(store, Planner(len(store), bs, cfg.run.seed, dist.rank(), dist.world_size(),
                                 k=k, m=m, text_counts=counts))


def _mixture(cfg: Config, batch_kind: str, bs: int, texts: bool) -> MixtureSource:
    """``data.mixture``: one source per entry (caption-group or plain shards, or a registered
    dataset as ``dataset:<name>``), each with its share of every batch and its own seed."""
    d = cfg.data
    if not d.mixture:
        raise ConfigError("data.source=mixture needs data.mixture: {<shards or "
                          "dataset:<name>>: weight, ...}")
    if texts and getattr(cfg.method.options, "rewrites", False):
        raise ConfigError("LaCLIP rewrites are not drawn on a data.mixture; set "
                          "method.rewrites=false")
    names = list(d.mixture)
    counts = mixture_counts(list(d.mixture.values()), bs, dist.world_size())
    opts = cfg.method.options
    sources: list[Source] = []
    for i, (name, count) in enumerate(zip(names, counts)):
        seed = derive_seed(cfg.run.seed, "mixture", i) % (1 << 40)
        where = f"data.mixture entry {name!r}"
        if name.startswith("dataset:"):
            if batch_kind == "groups" or texts:
                raise ConfigError(f"{where}: method {cfg.method.name!r} trains on caption groups "
                                  "or captions, which a labelled dataset does not have")
            ds = load_dataset(name[len("dataset:"):], d.split, root=d.root,
                              image_size=d.image_size).in_memory()
            sources.append(ArraySource(ds.images, ds.labels, count, seed, dist.rank(),
                                       dist.world_size()))
            continue
        paths = resolve_shards(name, key=where)
        kind = "groups" if all(marker_path(p).is_file() for p in paths) else "plain"
        if batch_kind == "groups" and kind != "groups":
            raise ConfigError(f"{where}: method {cfg.method.name!r} trains on caption groups, "
                              "but these shards hold one image a key")
        store = _shard_store(cfg, paths, kind, cfg.model.in_chans, seed)
        if texts:
            store.with_texts(None)
        k = m = None
        if kind == "groups" and batch_kind == "groups":
            k, m = store.k, opts.images_per_caption
        elif kind == "groups":
            store.each_image()
        sources.append(Source(store, Planner(len(store), count, seed, dist.rank(),
                                             dist.world_size(), k=k, m=m)))
    return MixtureSource(sources, names)


def _stream_folder(cfg: Config, bs: int) -> Source:
    d = cfg.data
    if d.root is None or d.image_size is None:
        raise ConfigError("data.loader=stream with data.dataset=imagefolder needs data.root "
                          "(a folder with <split>/<class>/) and data.image_size")
    store = FolderStore(Path(d.root) / d.split, d.image_size, cfg.model.in_chans, crop=d.crop,
                        scale=tuple(cfg.aug.scale), ratio=tuple(cfg.aug.ratio),
                        seed=cfg.run.seed)
    if d.classes is not None:
        store.keep(np.nonzero(_class_mask(store.labels, d.classes, str(d.root)).numpy())[0])
    return Source(store, Planner(len(store), bs, cfg.run.seed, dist.rank(), dist.world_size()))


def build_method(cfg: Config) -> Method:
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    encoder = build_encoder(cfg.model)
    return METHODS.get(cfg.method.name)(cfg, encoder)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No weight decay on biases, norms, position embeddings and class tokens (as in timm/DeiT).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def peak_lr(cfg: Config) -> float:
    """The peak learning rate: ``optim.lr`` is given at batch 256 and scaled linearly with
    ``train.batch_size`` (Goyal et al. 2017), as SimCLR, MAE and DINO do."""
    return cfg.optim.lr * cfg.train.batch_size / 256


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters at the peak learning rate, weight decay only
    on weights (:func:`param_groups`); the trainer sets each step's lr and weight decay."""
    groups = param_groups(model, cfg.optim.weight_decay)
    # PyTorch's fused AdamW updates every tensor in one kernel per parameter: on a CPU, 3.6x
    # faster than the default loop over parameters (8.5 against 30.5 ms for the quickstart's 86
    # tensors), which is ~10 % of its training step there.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=cfg.optim.betas,
                             fused=fused or None)


def checkpoint_config(ck: Checkpoint) -> Config:
    """The config a synrep checkpoint was trained with (a :class:`CheckpointError` if it is not
    one this synrep can read)."""
    try:
        return config_from_dict(ck.config, f"the config stored in {ck.path}")
    except ConfigError as e:
        raise CheckpointError(f"{str(ck.path)!r} was written by an incompatible synrep ({e})") \
            from None


def check_input_channels(other: Config, cfg: Config, key: str) -> None:
    """Refuse a model (the checkpoint named by config key ``key``, trained with ``other``) that
    takes other images than this run's data."""
    if other.model.in_chans != cfg.model.in_chans:
        raise CheckpointError(
            f"{key} takes {other.model.in_chans}-channel images but this run's data has "
            f"{cfg.model.in_chans}; use a model trained on images like these")


def _open_clip(spec: str) -> Any:
    """The open_clip package, or a :class:`ConfigError` saying how to install it."""
    try:
        import open_clip
    except ImportError:
        raise ConfigError(f"eval.model={spec!r} needs open_clip: pip install open_clip_torch "
                          "(or synrep[open_clip])") from None
    return open_clip


def check_external_model(spec: str, weights: str) -> None:
    """``eval.model`` names a loadable external model (a :class:`ConfigError` if not):
    ``local-dir:<folder>`` (timm's folder format), ``timm:<a timm model>`` with ``weights`` an
    existing file, ``open_clip:local-dir:<folder>`` (open_clip's folder format) or
    ``open_clip:<an open_clip model>`` with ``weights`` an existing file."""
    if spec.startswith("local-dir:"):
        return
    if spec.startswith("open_clip:"):
        name = spec[len("open_clip:"):]
        if name.startswith("local-dir:"):
            folder = Path(name[len("local-dir:"):])
            if not (folder / "open_clip_config.json").is_file():
                raise ConfigError(f"eval.model={spec!r}: {folder}/open_clip_config.json does not "
                                  "exist; point it at an open_clip model folder (synrep export "
                                  "writes one, as DIR/open_clip, for checkpoints with a text "
                                  "tower)")
            return
        if name not in _open_clip(spec).list_models():
            raise ConfigError(f"eval.model={spec!r}: open_clip has no model {name!r} "
                              "(open_clip.list_models() lists them)")
    elif not spec.startswith("timm:"):
        raise ConfigError(f"eval.model={spec!r}: choose timm:<name> (with eval.weights=FILE), "
                          "local-dir:<folder>, open_clip:<name> (with eval.weights=FILE), "
                          "open_clip:local-dir:<folder>, or '' for this run's checkpoint")
    elif not timm.is_model(spec[len("timm:"):]):
        raise ConfigError(f"eval.model={spec!r}: timm has no model {spec[len('timm:'):]!r}")
    if weights in ("", "teacher", "student") or not Path(weights).is_file():
        raise ConfigError(f"eval.model={spec!r} needs eval.weights=<a weights file "
                          f"(.safetensors or .pth)>; {weights!r} is not a file")


class _OpenClipImage(nn.Module):
    """open_clip's image tower as a timm-style backbone: its feature is the image embedding
    (``encode_image``, the projected feature zero-shot compares with text)."""

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.model = model
        with torch.inference_mode():
            self.num_features = int(model.encode_image(torch.zeros(1, 3, size, size)).shape[1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return x


class ExternalClip(nn.Module):
    """An open_clip model as evaluation uses one: ``encode_image`` on pixels in [0, 1] (its own
    normalisation applied) and ``encode_text`` on strings (its own tokenizer)."""

    def __init__(self, encoder: Encoder, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self.model = model
        self.tokenizer = tokenizer
        self.has_text_tower = True

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(list(texts)).to(dev))


def load_external(spec: str, weights: str = "", device: torch.device | str = "cpu"
                  ) -> tuple[Encoder, ExternalClip | None]:
    """An image model from outside synrep as an :class:`Encoder` (eval mode) with its input
    size in ``encoder.input_size``, and, for an open_clip model, the whole model for zero-shot
    (else None). Nothing is downloaded:

    - ``local-dir:<folder>``: a timm model folder (config.json + model.safetensors, as
      ``synrep export`` writes);
    - ``timm:<name>`` with ``weights`` a weights file;
    - ``open_clip:local-dir:<folder>``: an open_clip folder (open_clip_config.json + weights);
    - ``open_clip:<name>`` with ``weights`` a weights file.

    Each normalises with its own mean and std (timm's ``pretrained_cfg``, open_clip's
    preprocessing config); grayscale images are repeated over an RGB model's 3 channels.
    """
    check_external_model(spec, weights)
    if spec.startswith("open_clip:"):
        oc = _open_clip(spec)
        name = spec[len("open_clip:"):]
        try:
            model = oc.create_model(name, pretrained=None if name.startswith("local-dir:")
                                    else str(weights), device="cpu")
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise ConfigError(f"eval.model={spec!r}: open_clip cannot load it "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                              ) from None
        pcfg = oc.get_model_preprocess_cfg(model)
        size = pcfg["size"]
        size = int(size if isinstance(size, int) else size[-1])
        encoder = Encoder(_OpenClipImage(model.eval(), size), tuple(pcfg["mean"]),
                          tuple(pcfg["std"]))
        encoder.input_size = size
        clip = ExternalClip(encoder, model, oc.get_tokenizer(name))
        return clip.encoder.to(device).eval(), clip.to(device).eval()
    if spec.startswith("local-dir:"):
        folder = Path(spec[len("local-dir:"):])
        if not (folder / "config.json").is_file():
            raise ConfigError(f"eval.model={spec!r}: {folder}/config.json does not exist; "
                              "point it at a timm model folder (synrep export writes one)")
        model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
    else:
        model = timm.create_model(spec[len("timm:"):], pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(weights)})
    PatchProjection.replace(model)  # the same computation synrep's own ViTs run
    pcfg = model.pretrained_cfg
    encoder = Encoder(model, tuple(pcfg.get("mean", (0.5,))), tuple(pcfg.get("std", (0.5,))))
    encoder.input_size = int(pcfg.get("input_size", (0, 0, 0))[-1])
    return encoder.to(device).eval(), None


def load_external_encoder(spec: str, weights: str = "",
                          device: torch.device | str = "cpu") -> Encoder:
    """The image encoder of :func:`load_external` (any external model)."""
    return load_external(spec, weights, device)[0]


def load_method(path: str | Path, device: torch.device | str = "cpu") -> tuple[Method, Config]:
    """The whole trained method in a synrep checkpoint (eval mode) and its config."""
    ck = Checkpoint(path)
    cfg = checkpoint_config(ck)
    method = build_method(cfg)
    ck.load_model(method)
    return method.to(device).eval(), cfg


def load_encoder(path: str | Path, device: str | torch.device = "cpu",
                 weights: str = "teacher") -> tuple[Encoder, Config]:
    """The encoder in a synrep checkpoint (eval mode) and the config it was trained with.

    ``weights="teacher"`` takes the EMA teacher's encoder when the checkpoint has one (as DINO
    and iBOT evaluate), else the student's; ``"student"`` always takes the student's.
    """
    if weights not in ("teacher", "student"):
        raise ConfigError(f"eval.weights={weights!r}: choose teacher or student for a synrep "
                          "checkpoint (a weights file goes with eval.model=timm:<name>)")
    ck = Checkpoint(path)
    cfg = config_from_dict(ck.config, f"checkpoint {str(path)!r}")
    why = METHODS.get(cfg.method.name).no_plain_encoder if cfg.method.name in METHODS else ""
    if why:
        raise ConfigError(f"{str(path)!r}: {why}")
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
