"""JEST wired to training: frozen scoring models, the reference-embedding cache, the per-step
selector of online mode, and the ``select`` stage (offline mode).

Selection units are caption groups (a caption and its generated images). A model scores a set of
groups by the multi-positive loss of its embeddings (``Method.score_embeddings``) of one
un-augmented view of each image, at ``selection.score_size`` (Flexi-JEST: lower than the training
resolution); :class:`~synrep.selection.jest.MultiposGroups` turns those embeddings into exact
conditional gains for the joint sampler. The reference model is frozen, so its embeddings of the
whole pool are computed once and cached by sample id (group index, image index).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from synrep import dist
from synrep.checkpoint import Checkpoint
from synrep.config import Config
from synrep.data.augment import resize
from synrep.data.shards import iter_groups, write_shard
from synrep.device import resolve_device, resolve_precision
from synrep.errors import CheckpointError, ConfigError
from synrep.factory import check_input_channels, checkpoint_config, load_method, pool_groups
from synrep.layout import layout
from synrep.methods import Method
from synrep.selection import jest
from synrep.selection.jest import MultiposGroups
from synrep.utils import atomic_output, ensure_writable_dir, json_dumps, write_json_atomic

# Coefficients (learner, reference) of each score, as in the sampler.
_COEF = {"learnability": (1.0, -1.0), "hard_learner": (1.0, 0.0), "easy_reference": (0.0, -1.0)}


def super_batch_size(b: int, filter_ratio: float) -> int:
    """The super-batch ``B`` whose ``(1 - f) B`` is exactly ``b``; a ConfigError otherwise."""
    if not (0 <= filter_ratio < 1):
        raise ConfigError(f"selection.filter_ratio must be in [0, 1), got {filter_ratio}")
    big = round(b / (1 - filter_ratio))
    if abs(big - b / (1 - filter_ratio)) > 1e-6 or jest.selected_count(big, filter_ratio) != b:
        raise ConfigError(
            f"train.batch_size={b} with selection.filter_ratio={filter_ratio} gives no whole "
            f"super-batch (b / (1 - f) = {b / (1 - filter_ratio):.3f}); choose them so that "
            "b / (1 - f) is an integer")
    return big


def _check_reference(cfg: Config) -> None:
    s = cfg.selection
    if s.score != "hard_learner" and not s.reference:
        raise ConfigError(
            f"selection.score={s.score} needs a frozen reference model: set "
            "selection.reference=<checkpoint>, trained with `synrep train` on a small curated "
            "set (or use selection.score=hard_learner)")


def check_selection(cfg: Config, b: int, big: int | None = None) -> int:
    """Validate ``cfg.selection`` for selecting ``b`` groups per super-batch; return ``B``
    (``b / (1 - f)``, or ``big`` where the caller fixed it, as the offline stage does)."""
    s = cfg.selection
    big = super_batch_size(b, s.filter_ratio) if big is None else big
    if s.chunks < 1 or (s.joint and s.chunks > b):
        raise ConfigError(
            f"selection.chunks={s.chunks} must be in [1, {b}]: each chunk adds at least one of "
            f"the {b} selected groups (train.batch_size)")
    if not (math.isfinite(s.temperature) and s.temperature > 0):
        raise ConfigError(f"selection.temperature must be > 0, got {s.temperature}")
    _check_reference(cfg)
    if s.score_size is not None and s.score_size < 1:
        raise ConfigError(f"selection.score_size must be >= 1 or null, got {s.score_size}")
    opts = cfg.method.options
    if not hasattr(opts, "images_per_caption"):
        raise ConfigError(
            f"selection selects caption groups: it needs a caption-group method (synclr, "
            f"stablerep, stablerep_pp), not method.name={cfg.method.name}")
    m = opts.images_per_caption
    if s.score_images is not None and not 2 <= s.score_images <= m:
        raise ConfigError(
            f"selection.score_images={s.score_images} must be in [2, {m}] "
            f"({opts.section}.images_per_caption): the multi-positive score needs two images "
            "of a caption")
    return big


def sampler_precision(cfg: Config, device: torch.device) -> str:
    """``selection.precision`` resolved: ``auto`` follows the precision training runs in."""
    p = cfg.selection.precision
    if p not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"selection.precision={p!r}: choose auto, fp32 or bf16")
    if p == "auto":
        return "bf16" if resolve_precision(cfg.train.precision, device) == "bf16" else "fp32"
    return p


def scoring_view(images: Tensor, size: int) -> Tensor:
    """uint8 (N, C, H, W) -> float (N, C, size, size) in [0, 1] (antialiased resize)."""
    return resize(images.float() / 255, size)


@torch.no_grad()
def score_groups(method: Method, images: Tensor, size: int) -> Tensor:
    """Embed caption groups for scoring: uint8 (G, m, C, H, W) -> (G, m, d), eval mode."""
    was_training = method.training
    method.eval()
    try:
        z = method.score_embeddings(scoring_view(images.flatten(0, 1), size))
    finally:
        method.train(was_training)
    return z.float().view(images.shape[0], images.shape[1], -1)


def load_frozen(path: str, cfg: Config, role: str, device: torch.device) -> Method:
    """A frozen scoring model (``role``: reference or learner) from a synrep checkpoint."""
    key = f"selection.{role}"
    if not Path(path).is_file():
        raise ConfigError(f"{key}={path!r} does not exist; pass a checkpoint written by "
                          "`synrep train` (RUN/train/checkpoints/final.safetensors)")
    try:
        other = checkpoint_config(Checkpoint(path))
    except CheckpointError as e:
        raise CheckpointError(f"{key}={e}") from None
    check_input_channels(other, cfg, f"{key}={path!r}")
    method, _ = load_method(path, device)
    return method.requires_grad_(False)


@torch.no_grad()
def embed_pool(method: Method, images: Tensor, size: int, device: torch.device,
               batch_groups: int = 256, desc: str = "embed") -> tuple[Tensor, float]:
    """Scoring embeddings of every image of a pool: uint8 (G, k, C, H, W) -> ((G, k, d), FLOPs)."""
    out, flops = [], 0.0
    bar = tqdm(range(0, len(images), batch_groups), desc=desc, disable=not dist.is_main(),
               dynamic_ncols=True, leave=False)
    for start in bar:
        chunk = images[start:start + batch_groups].to(device)
        counter = FlopCounterMode(display=False)
        with counter:
            out.append(score_groups(method, chunk, size).cpu())
        flops += counter.get_total_flops()
    return torch.cat(out), flops


def _cache_meta(cfg: Config, n_groups: int, k: int, size: int) -> dict[str, Any]:
    path = Path(cfg.selection.reference)
    if not path.is_file():
        raise ConfigError(f"selection.reference={str(path)!r} does not exist; pass a checkpoint "
                          "written by `synrep train` (RUN/train/checkpoints/final.safetensors)")
    st = path.stat()
    return {"reference": str(path.resolve()), "reference_size": st.st_size,
            "reference_mtime_ns": st.st_mtime_ns, "groups": n_groups, "k": k, "size": size,
            "data": json.loads(cfg.to_json())["data"]}


def reference_embeddings(cfg: Config, images: Tensor, size: int, device: torch.device,
                         learner_dim: int) -> tuple[Tensor, float]:
    """The frozen reference's embeddings of the pool (G, k, d), cached in the run directory.

    The cache (``RUN/train/reference_embeddings.safetensors``) is reused while the reference
    checkpoint, the data and the scoring size are unchanged. Returns (embeddings, FLOPs spent
    computing them).
    """
    path = layout(cfg).reference_embeddings
    meta = _cache_meta(cfg, images.shape[0], images.shape[1], size)
    cached = False
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            cached = json.loads((f.metadata() or {}).get("synrep", "{}")).get("key") == meta
    if not cached:
        # every rank loads the reference and embeds one group, so that a checkpoint that does
        # not fit (channels, embedding size) stops every rank at once, before the pool's pass
        model = load_frozen(cfg.selection.reference, cfg, "reference", device)
        with torch.no_grad():
            probe = score_groups(model, images[:1].to(device), size)
        _check_reference_dim(cfg, probe.shape[-1], learner_dim)
        if dist.is_main():
            emb, flops = embed_pool(model, images, size, device, desc="reference embeddings")
            path.parent.mkdir(parents=True, exist_ok=True)
            data = save({"embeddings": emb.contiguous()},
                        metadata={"synrep": json_dumps({"key": meta, "flops": flops}, path)})
            with atomic_output(path) as f:
                f.write(data)
        del model
    dist.barrier()
    with safe_open(str(path), framework="pt") as f:
        emb = f.get_tensor("embeddings")
        flops = float(json.loads(f.metadata()["synrep"])["flops"])
    _check_reference_dim(cfg, emb.shape[-1], learner_dim)  # a cache made for another learner
    return emb, flops


def _check_reference_dim(cfg: Config, dim: int, learner_dim: int) -> None:
    if dim != learner_dim:
        raise CheckpointError(
            f"selection.reference={cfg.selection.reference!r} embeds images in {dim} "
            f"dimensions but the learner in {learner_dim}; learnability subtracts the two "
            f"models' losses, so train the reference with this run's "
            f"{cfg.method.options.section}.proj_dim ({learner_dim})")


@dataclass
class Selection:
    """One step's choice: the training sub-batch and what to log."""

    batch: dict[str, Tensor]
    ids: Tensor  # (b,) global sample ids (group indices into the pool), in selection order
    stats: dict[str, float]


def _pairs(z: Tensor | None, temperature: float, precision: str) -> MultiposGroups | None:
    return None if z is None else MultiposGroups(z, temperature, precision)


def select_groups(learner: Tensor | None, reference: Tensor | None, b: int,
                  generator: torch.Generator, *, score: str, joint: bool, chunks: int,
                  temperature: float, loss_temperature: float, greedy: bool,
                  balance: bool, precision: str = "fp32",
                  ) -> tuple[jest.GlobalSelection, dict[str, float]]:
    """Select ``b`` of the (global) super-batch's caption groups from scoring embeddings.

    ``learner`` / ``reference`` are this rank's (n, m, d) embeddings (None where the score does
    not use the model). Joint: blocked sequential JEST sampling with exact multi-positive gains.
    Independent: each group's own loss against the whole super-batch (RHO-LOSS style), drawn
    without replacement. ``precision``: of the sampler's GEMMs (:class:`MultiposGroups`).
    Returns the selection and score statistics (per-image losses).
    """
    lp = _pairs(learner, loss_temperature, precision)
    rp = _pairs(reference, loss_temperature, precision)
    # One chunk is independent selection: MultiposGroups draws the first chunk from each group's
    # loss against the whole super-batch.
    sel = jest.global_joint_sample(lp, rp, b, chunks if joint else 1, generator, score=score,
                                   temperature=temperature, greedy=greedy, balance=balance)
    lg = None if lp is None else lp.gather()
    rg = None if rp is None else rp.gather()
    stats: dict[str, float] = {}
    idx = sel.indices
    for name, pairs in (("learner", lg), ("reference", rg)):
        if pairs is not None:
            per_image = pairs.example_losses() / pairs.m
            stats[f"select/{name}_loss_all"] = float(per_image.mean())
            stats[f"select/{name}_loss_selected"] = float(per_image[idx].mean())
    return sel, stats


class OnlineSelector:
    """Online JEST: picks each step's ``b`` training groups from a super-batch of ``B``."""

    def __init__(self, cfg: Config, method: Method, pool: Tensor, device: torch.device) -> None:
        s = cfg.selection
        self.cfg, self.device = cfg, device
        self.b = cfg.train.batch_size
        self.super_batch = check_selection(cfg, self.b)
        self.size = s.score_size or cfg.aug.size
        self.precision = sampler_precision(cfg, device)
        c_learner, c_reference = _COEF[s.score]
        self.use_learner, self.use_reference = c_learner != 0, c_reference != 0
        probe = pool[:2, :1].to(device)  # the learner's embedding size, from a 2-image forward
        dim = score_groups(method, probe, self.size).shape[-1]
        self.reference = None
        self.reference_flops = 0.0
        if self.use_reference:
            self.reference, self.reference_flops = reference_embeddings(
                cfg, pool, self.size, device, dim)
        self.score_flops: float | None = None  # learner scoring FLOPs of one step (measured)

    def generator(self, step: int) -> torch.Generator:
        # The same on every rank, and distinct from the per-rank augmentation generators.
        seed = (self.cfg.run.seed * 1_000_003 + step) * 1024 + 1023
        return torch.Generator(device=self.device).manual_seed(seed)

    def select(self, method: Method, batch: dict[str, Tensor], step: int) -> Selection:
        s = self.cfg.selection
        learner = reference = None
        n = s.score_images or batch["images"].shape[1]  # the first n drawn images of a caption
        if self.use_learner:
            images = batch["images"][:, :n]
            counter = FlopCounterMode(display=False) if self.score_flops is None else None
            if counter is not None:
                with counter:
                    learner = score_groups(method, images, self.size)
                self.score_flops = float(counter.get_total_flops()) * dist.world_size()
            else:
                learner = score_groups(method, images, self.size)
        else:
            self.score_flops = 0.0
        if self.reference is not None:
            index, pick = batch["index"].cpu(), batch["pick"][:, :n].cpu()
            reference = self.reference[index[:, None], pick].to(self.device)
        sel, stats = select_groups(
            learner, reference, self.b, self.generator(step), score=s.score, joint=s.joint,
            chunks=s.chunks, temperature=s.temperature,
            loss_temperature=self.cfg.method.options.temperature, greedy=s.greedy,
            balance=dist.world_size() > 1, precision=self.precision)
        local = sel.local.to(batch["images"].device)
        sub = {k: [v[i] for i in local.tolist()] if isinstance(v, list) else v[local]  # texts
               for k, v in batch.items()}
        ids = dist.gather_no_grad(batch["index"].to(self.device))[sel.indices.to(self.device)]
        return Selection(sub, ids.cpu(), stats)


# ---------------------------------------------------------------------------------------------
# Offline mode: the `select` stage


def select_done(cfg: Config) -> bool:
    path = layout(cfg).select_record
    if not path.exists():
        return False
    return json.loads(path.read_text()).get("config") == json.loads(cfg.to_json())["selection"]


def select_offline(cfg: Config) -> Path:
    """Score the whole pool, keep ``(1 - f)`` of every super-batch, write the kept ids
    (``RUN/select/ids.json``) and the kept caption groups as new shards (``RUN/select/shards``).

    Super-batches are consecutive slices of a seeded permutation of the pool; the last, partial
    one keeps ``(1 - f)`` of its own size. Returns the shard folder.
    """
    s = cfg.selection
    device = resolve_device(cfg)
    if s.super_batch is None:
        big = check_selection(cfg, cfg.train.batch_size)
    else:
        if s.super_batch < 1:
            raise ConfigError(f"selection.super_batch must be >= 1 or null, got {s.super_batch}")
        try:
            b = jest.selected_count(s.super_batch, s.filter_ratio)
        except ValueError as e:
            raise ConfigError(f"selection (super_batch={s.super_batch}): {e}") from None
        big = check_selection(cfg, b, big=s.super_batch)
    if s.score != "easy_reference" and not s.learner:
        raise ConfigError(
            f"the select stage with selection.score={s.score} needs a learner model: set "
            "selection.learner=<checkpoint> (or use selection.score=easy_reference)")
    shards, groups = pool_groups(cfg)
    images = groups.images  # (G, k, C, H, W)
    if s.score_images is not None and not 2 <= s.score_images <= images.shape[1]:
        raise ConfigError(f"selection.score_images={s.score_images} must be in "
                          f"[2, {images.shape[1]}] (the images per caption in the pool)")
    size = s.score_size or cfg.aug.size
    c_learner, c_reference = _COEF[s.score]
    emb: dict[str, Tensor | None] = {"learner": None, "reference": None}
    flops = 0.0
    for role, used in (("learner", c_learner != 0), ("reference", c_reference != 0)):
        if used:
            model = load_frozen(getattr(s, role), cfg, role, device)
            emb[role], f = embed_pool(model, images, size, device, desc=f"{role} embeddings")
            flops += f
    if s.score_images is not None:
        emb = {r: None if z is None else z[:, :s.score_images] for r, z in emb.items()}
    if emb["learner"] is not None and emb["reference"] is not None \
            and emb["learner"].shape[-1] != emb["reference"].shape[-1]:
        raise CheckpointError(
            f"selection.reference embeds images in {emb['reference'].shape[-1]} dimensions but "
            f"selection.learner in {emb['learner'].shape[-1]}; train both with the same "
            f"{cfg.method.options.section}.proj_dim")
    g = torch.Generator().manual_seed(cfg.run.seed)
    order = torch.randperm(len(images), generator=g)
    kept, t0 = [], time.perf_counter()
    sel_gen = torch.Generator().manual_seed(cfg.run.seed + 1)
    precision = sampler_precision(cfg, device)
    for start in tqdm(range(0, len(order), big), desc="select", dynamic_ncols=True):
        part = order[start:start + big]
        b = jest.selected_count(len(part), s.filter_ratio)
        chunks = min(s.chunks, b)  # only the last, partial super-batch can keep fewer than chunks
        sub = {r: None if z is None else z[part].to(device) for r, z in emb.items()}
        sel, _ = select_groups(sub["learner"], sub["reference"], b, sel_gen, score=s.score,
                               joint=s.joint, chunks=chunks, temperature=s.temperature,
                               loss_temperature=cfg.method.options.temperature, greedy=s.greedy,
                               balance=False, precision=precision)
        kept.append(part[sel.indices.cpu()])
    ids = torch.cat(kept).sort().values
    seconds = time.perf_counter() - t0

    paths = layout(cfg)
    ensure_writable_dir(paths.select, "run.dir")
    paths.select_record.unlink(missing_ok=True)  # the completion record goes last
    shard_dir = paths.selected_shards
    if shard_dir.exists():
        for old in shard_dir.iterdir():
            old.unlink()
    keep = set(ids.tolist())
    batch, n_shard = [], 0
    per_shard = cfg.images.shard_size
    for i, group in enumerate(iter_groups(shards)):
        if i >= len(images):
            break
        if i in keep:
            batch.append(group)
        if len(batch) == per_shard:
            write_shard(shard_dir / f"shard-{n_shard:05d}.tar", batch)
            batch, n_shard = [], n_shard + 1
    if batch:
        write_shard(shard_dir / f"shard-{n_shard:05d}.tar", batch)
    write_json_atomic(paths.select_record, {
        "config": json.loads(cfg.to_json())["selection"], "source": str(shards),
        "pool": len(images), "kept": len(ids), "super_batch": big,
        "scoring_flops": flops, "selection_seconds": seconds, "ids": ids.tolist()})
    print(f"kept {len(ids)} of {len(images)} caption groups ({s.score}, f={s.filter_ratio}); "
          f"shards: {shard_dir}")
    return shard_dir
